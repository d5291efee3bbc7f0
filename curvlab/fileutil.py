"""Temporary files next to their destination, renamed into place when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(path: Path) -> tuple[int, str]:
    """``mkstemp`` in ``path``'s folder with the permissions a plain ``open`` would give
    (``mkstemp`` makes files readable by their owner only)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp
