"""The curvlab HDF5 schema: names, provenance, the stored partition (see docs/hdf5.md).

This module and the rest of :mod:`curvlab.store` speak numpy and h5py; torch tensors are
converted at the boundary. Nothing here knows how curvature is computed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import h5py
import numpy as np

from curvlab.curvature.blocks import Block, Part, Partition
from curvlab.errors import ConfigError, CurvlabError

FORMAT = "curvlab-results"
FORMAT_VERSION = 1
LOSS = "mean token cross-entropy"
STR = h5py.string_dtype()  # variable-length UTF-8
DTYPES = ("float32", "float64")

# Provenance fields that must be equal for a file to be resumed (the rest describe the run).
IDENTITY = ("checkpoint_sha256", "model", "data", "dtype", "precision", "loss")


class StoreError(CurvlabError):
    """An output file is unreadable, unwritable, or belongs to another computation."""


def encode_name(name: str) -> str:
    """A block name as an HDF5 link name: ``%`` -> ``%25``, ``/`` -> ``%2F``, and the name
    ``.`` -> ``%2E``; everything else (dots included) is kept."""
    if not name:
        raise ConfigError("block names must not be empty")
    key = name.replace("%", "%25").replace("/", "%2F")
    return "%2E" if key == "." else key


def decode_name(key: str) -> str:
    """Inverse of :func:`encode_name` (percent-decoding)."""
    return unquote(key)


def dtype_name(dtype: Any) -> str:
    """``"float32"`` or ``"float64"`` from a string, numpy dtype or torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; expected float32 or float64")
    return name


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes. For a folder (a Hugging Face model): SHA-256 over its
    files in sorted order of each one's relative path (UTF-8, then a NUL byte) followed by the
    32-byte SHA-256 digest of its bytes."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            for f in files:
                h.update(f.relative_to(path).as_posix().encode() + b"\0")
                h.update(bytes.fromhex(sha256_file(f, bufsize)))
            return h.hexdigest()
        with open(path, "rb") as f:
            while chunk := f.read(bufsize):
                h.update(chunk)
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> tuple[str, str]:
    import torch

    from curvlab._version import __version__

    return str(__version__), str(torch.__version__)  # torch's is a str subclass h5py rejects


@dataclass(frozen=True)
class Provenance:
    """What a results file was computed from. Stored as root attributes; ``model`` and ``data``
    as JSON. On resume the :data:`IDENTITY` fields must match."""

    checkpoint: str
    checkpoint_sha256: str
    model: dict[str, Any]
    data: dict[str, Any]
    dtype: str
    device: str
    precision: str = "fp32"  # of the products (curvlab.curvature.precision); older files: fp32
    loss: str = LOSS
    curvlab_version: str = ""
    torch_version: str = ""
    created: str = field(default_factory=_now)

    def to_attrs(self) -> dict[str, str]:
        d = {k: str(v) for k, v in asdict(self).items()}
        d["model"] = json.dumps(self.model, sort_keys=True)
        d["data"] = json.dumps(self.data, sort_keys=True)
        return d

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Provenance:
        d = {f.name: attrs[f.name] for f in fields(cls) if f.name in attrs}
        for key in ("model", "data"):
            d[key] = json.loads(d.get(key, "{}"))
        return cls(**{k: str(v) if isinstance(v, bytes) else v for k, v in d.items()})

    def differences(self, other: Provenance) -> list[str]:
        """What differs in the identity fields, as ``'<what> differs (file X, now Y)'``."""
        out = []
        for key in IDENTITY:
            a, b = getattr(self, key), getattr(other, key)
            if isinstance(a, dict):
                # compare through JSON so that tuples/lists and int/float keys agree
                a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
                for k in sorted(set(a) | set(b)):
                    if a.get(k) != b.get(k):
                        out.append(f"{key}.{k} differs (file {a.get(k)!r}, now {b.get(k)!r})")
            elif a != b:
                short = (lambda s: s[:12]) if key == "checkpoint_sha256" else (lambda s: s)
                out.append(f"{key} differs (file {short(a)}, now {short(b)})")
        return out


def make_provenance(
    checkpoint: str | os.PathLike,
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    dtype: Any,
    device: Any,
    precision: str = "fp32",
) -> Provenance:
    """Provenance of a computation on ``checkpoint`` (its SHA-256 is computed here).

    ``model`` is the model config as a dict; ``data`` the data description (source,
    tokenizer, seq_len, batch_size, batches, seed, windows, tokens, ...); ``precision`` the
    arithmetic of the curvature products (``fp32``, ``tf32``, ``bf16``).
    """
    curvlab_version, torch_version = _versions()
    return Provenance(
        checkpoint=str(checkpoint), checkpoint_sha256=sha256_file(checkpoint),
        model=dict(model), data=dict(data), dtype=dtype_name(dtype), device=str(device),
        precision=str(precision),
        curvlab_version=curvlab_version, torch_version=torch_version,
    )


def open_h5(path: str | os.PathLike, mode: str, what: str, locking: bool | None = None):
    """``h5py.File(path, mode)`` with one-line :class:`StoreError` messages
    (``cannot <what> <path>: ...``)."""
    try:
        return h5py.File(path, mode, locking=locking)
    except FileNotFoundError:
        raise StoreError(f"cannot {what} {path}: no such file") from None
    except BlockingIOError:
        raise StoreError(f"cannot {what} {path}: the file is open in another process") from None
    except OSError as e:
        if os.path.isdir(path):
            raise StoreError(f"cannot {what} {path}: it is a folder") from None
        if os.path.isfile(path) and not h5py.is_hdf5(path):
            raise StoreError(f"cannot {what} {path}: not a readable HDF5 file") from None
        raise StoreError(f"cannot {what} {path}: {str(e).splitlines()[0]}") from None


# -- the partition in /blocks ---------------------------------------------------------------

def write_partition(
    group: h5py.Group, partition: Partition, param_shapes: Mapping[str, Any] | None = None
) -> None:
    """Write ``/blocks``: ``names``, ``params`` (JSON ``[[param, start, stop], ...]`` per block),
    ``sizes``, ``offsets``; attrs ``preset`` and ``param_shapes`` (JSON, may be ``{}``)."""
    params = [json.dumps([[p.param, p.start, p.stop] for p in b.parts]) for b in partition]
    group.create_dataset("names", data=np.array(partition.names, dtype=object), dtype=STR)
    group.create_dataset("params", data=np.array(params, dtype=object), dtype=STR)
    group.create_dataset("sizes", data=np.array(partition.sizes, dtype=np.int64))
    group.create_dataset("offsets", data=np.array(partition.offsets, dtype=np.int64))
    group.attrs["preset"] = partition.preset
    shapes = {k: [int(s) for s in v] for k, v in (param_shapes or {}).items()}
    group.attrs["param_shapes"] = json.dumps(shapes)


def read_partition(group: h5py.Group) -> Partition:
    names = [n.decode() if isinstance(n, bytes) else n for n in group["names"][()]]
    params = [json.loads(p) for p in group["params"].asstr()[()]]
    blocks = tuple(
        Block(str(name), tuple(Part(str(p), int(a), int(b)) for p, a, b in parts))
        for name, parts in zip(names, params)
    )
    return Partition(blocks, str(group.attrs.get("preset", "custom")))


def partition_differences(stored: Partition, now: Partition) -> list[str]:
    """How two partitions differ, as short phrases (empty when they are the same)."""
    if stored.names != now.names:
        def show(p: Partition) -> str:
            names = p.names
            return ", ".join(names[:6]) + (f", ... ({len(names)} blocks)" if len(names) > 6 else "")
        return [f"blocks differ (file: {show(stored)}; now: {show(now)})"]
    return [f"block {a.name!r} covers different parameter ranges"
            for a, b in zip(stored, now) if a.parts != b.parts]
