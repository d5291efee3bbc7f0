"""The token cache: a text corpus is tokenized once per (files, tokenizer).

Location: ``$CURVLAB_CACHE`` if set, else ``$XDG_CACHE_HOME/curvlab``, else
``~/.cache/curvlab``; entries live in its ``tokens/`` folder. ``CURVLAB_CACHE=off`` (or ``0``,
``no``, ``false``) turns the cache off: text is then tokenized on every load and its tokens are
held in memory. Every entry may be deleted at any time (``rm -r ~/.cache/curvlab``).

An entry is named by a SHA-256 over a format version, the *contents* of the source files (not
their names or dates), the tokenizer's hash and backend version, and the options that change
the tokens (the jsonl/Parquet field): ``KEY.tokens`` holds the token ids (raw little-endian
``uint8``/``uint16``/``uint32``, memory-mapped when read), ``KEY.json`` their count, dtype,
largest id and SHA-256. The ``.json`` file is written last, each file to a temporary name and
renamed, so an interrupted or concurrent tokenization never leaves an entry that looks complete.
Token files (``.bin``, ``.npy``) get ``.json``-only entries (their SHA-256 and id range), so
that a large token file is not re-hashed token by token on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from curvlab.errors import DataError

ENV = "CURVLAB_CACHE"
_OFF = ("off", "0", "no", "false", "none")
FORMAT = 1
_HASH_CHUNK = 1 << 20  # tokens per hashing step (8 MB of int64)


def cache_dir(option: str | os.PathLike | bool | None = None) -> Path | None:
    """The token cache folder (None: caching is off).

    ``option``: None -> ``$CURVLAB_CACHE`` / the default (see module docstring); False -> off;
    True -> the default folder; a path -> that folder.
    """
    if option is False:
        return None
    if option is None or option is True:
        env = os.environ.get(ENV)
        if env is not None and option is None:
            if env.strip().lower() in _OFF:
                return None
            if env.strip():
                return Path(env).expanduser() / "tokens"
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
        return Path(base) / "curvlab" / "tokens"
    return Path(option).expanduser() / "tokens"


def files_sha256(files: Iterable[Path]) -> str:
    """SHA-256 over the contents of ``files`` in order (their names do not count)."""
    h = hashlib.sha256()
    for f in files:
        fh = hashlib.sha256()
        try:
            with open(f, "rb") as stream:
                while block := stream.read(1 << 24):
                    fh.update(block)
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e.strerror})") from None
        h.update(fh.digest())
    return h.hexdigest()


def entry_key(*parts: Any) -> str:
    """The cache key of the JSON-serializable ``parts``."""
    blob = json.dumps([FORMAT, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class TokenStats:
    """Running count, id range and SHA-256 (of the int64 little-endian ids) of a token stream."""

    def __init__(self) -> None:
        self.count = 0
        self.min: int | None = None
        self.max: int | None = None
        self._h = hashlib.sha256()

    def add(self, ids: np.ndarray) -> None:
        for i in range(0, len(ids), _HASH_CHUNK):
            part = np.asarray(ids[i:i + _HASH_CHUNK])
            if not len(part):
                continue
            lo, hi = int(part.min()), int(part.max())
            self.min = lo if self.min is None else min(self.min, lo)
            self.max = hi if self.max is None else max(self.max, hi)
            self._h.update(part.astype("<i8").tobytes())
            self.count += len(part)

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()

    def meta(self) -> dict[str, Any]:
        return {"count": self.count, "min": self.min, "max": self.max, "sha256": self.sha256}


def read_meta(folder: Path | None, key: str) -> dict[str, Any] | None:
    """The metadata of entry ``key`` (None if absent, unreadable, or from another format)."""
    if folder is None:
        return None
    try:
        meta = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def write_meta(folder: Path | None, key: str, meta: dict[str, Any]) -> None:
    """Write entry ``key``'s metadata atomically; a cache that cannot be written is skipped."""
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, **meta}, f)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        pass


def read_tokens(folder: Path | None, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The memory-mapped tokens of a complete entry and its metadata, else None."""
    meta = read_meta(folder, key)
    if meta is None or "dtype" not in meta:
        return None
    path = folder / f"{key}.tokens"
    try:
        dtype = np.dtype(meta["dtype"])
        if path.stat().st_size != int(meta["count"]) * dtype.itemsize or not meta["count"]:
            return None
        return np.memmap(path, dtype=dtype, mode="r"), meta
    except (OSError, TypeError, ValueError, KeyError):
        return None


class TokenSink:
    """Collects a token stream: into a cache entry (memory-mapped at the end) when ``folder`` is
    given and writable, else in memory. ``dtype``: the smallest unsigned type of the ids."""

    def __init__(self, folder: Path | None, key: str, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.stats = TokenStats()
        self.folder, self.key = folder, key
        self._chunks: list[np.ndarray] = []
        self._file = None
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.",
                                                 suffix=".tokens.tmp")
                self._file = os.fdopen(fd, "wb")
            except OSError:
                self._file = None

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        self.stats.add(ids)
        if self.stats.max >= np.iinfo(self.dtype).max + 1 or self.stats.min < 0:
            raise DataError(f"tokenizer produced id {self.stats.max} outside its vocabulary")
        part = np.asarray(ids).astype(self.dtype)
        if self._file is not None:
            self._file.write(part.tobytes())
        else:
            self._chunks.append(part)

    def finish(self, meta: dict[str, Any]) -> np.ndarray:
        """The whole stream (memory-mapped from the cache, or in memory); ``meta`` is stored
        with it."""
        full = {**meta, **self.stats.meta(), "dtype": self.dtype.str}
        if self._file is None:
            return np.concatenate(self._chunks) if self._chunks else np.zeros(0, self.dtype)
        self._file.close()
        path = self.folder / f"{self.key}.tokens"
        if not self.stats.count:
            Path(self._tmp).unlink(missing_ok=True)
            return np.zeros(0, self.dtype)
        os.replace(self._tmp, path)
        write_meta(self.folder, self.key, full)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def abort(self) -> None:
        """Drop a partial stream (after an error)."""
        if self._file is not None:
            self._file.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._file = None
