"""Token sources: the embedded default corpus, plain text files, nanoGPT ``uint16`` token files.

A source string is one of:

- ``default``: English text of the Python documentation's topic pages (a snapshot of the
  standard library's ``pydoc_data.topics`` shipped with curvlab, so that it is byte-identical on
  every machine and Python version), byte-tokenized;
- a path to a text file (``.txt`` or any non-``.bin`` file), UTF-8, byte-tokenized;
- a path to a nanoGPT token file (``*.bin``: little-endian ``uint16`` token ids), or to a folder
  holding nanoGPT's ``train.bin`` and ``val.bin``.

Text sources are split into train (first ``1 - val_fraction`` of the tokens) and validation
(the rest). A single ``.bin`` file is split the same way; a folder uses its own two files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from curvlab.data.tokenizer import ByteTokenizer
from curvlab.errors import DataError


@dataclass(frozen=True)
class Corpus:
    """Tokens of one source, split into ``train`` and ``val`` (int64 numpy arrays)."""

    source: str
    tokenizer: str
    train: np.ndarray
    val: np.ndarray
    sha256: str
    vocab_size: int | None

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise DataError(f"unknown data split {name!r}; expected train or val")
        return self.train if name == "train" else self.val

    @property
    def max_token(self) -> int:
        return int(max(self.train.max(initial=0), self.val.max(initial=0)))


def _split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:cut], tokens[cut:]


def _read_bin(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size % 2:
        raise DataError(
            f"{path}: token file has an odd byte count ({size}); expected little-endian uint16 "
            "token ids (nanoGPT .bin format)"
        )
    if size == 0:
        raise DataError(f"{path}: token file is empty")
    return np.fromfile(path, dtype="<u2").astype(np.int64)


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def default_text() -> str:
    """The embedded default corpus as a string."""
    blob = resources.files("curvlab.data").joinpath("default_corpus.txt.gz").read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def source_tokenizer(source: str) -> str:
    """``byte`` for text sources (the default corpus, text files), ``none`` for token files."""
    path = Path(source)
    return "none" if source != "default" and (path.suffix == ".bin" or path.is_dir()) else "byte"


def load_corpus(source: str = "default", val_fraction: float = 0.1) -> Corpus:
    """Read and tokenize a source (see module docstring).

    The last two corpora are kept while their files are unchanged (size and modification time),
    so that a command building several batch streams of one source (analysis and validation
    batches, the provenance hash) reads and hashes it once. Their token arrays are read-only.
    """
    return _load_cached(source, float(val_fraction), _file_stamp(source))


def _file_stamp(source: str) -> tuple | None:
    """(size, mtime) of the files behind ``source`` (None for the embedded corpus)."""
    if source == "default":
        return None
    path = Path(source)
    files = [path / "train.bin", path / "val.bin"] if path.is_dir() else [path]
    return tuple((st.st_size, st.st_mtime_ns) if (st := _stat(f)) else None for f in files)


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


@functools.lru_cache(maxsize=2)
def _load_cached(source: str, val_fraction: float, stamp: tuple | None) -> Corpus:
    corpus = _read_corpus(source, val_fraction)
    corpus.train.setflags(write=False)
    corpus.val.setflags(write=False)
    return corpus


def _read_corpus(source: str, val_fraction: float) -> Corpus:
    if source == "default":
        tokens = ByteTokenizer().encode(default_text())
        train, val = _split(tokens, val_fraction)
        return Corpus("default", "byte", train, val, _sha256(train, val), 256)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source not found: {source}")
    if path.is_dir():
        files = [path / "train.bin", path / "val.bin"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{path}: folder has no {' or '.join(missing)} (nanoGPT token files)")
        train, val = (_read_bin(f) for f in files)
        return Corpus(str(path), "none", train, val, _sha256(train, val), None)
    if path.suffix == ".bin":
        train, val = _split(_read_bin(path), val_fraction)
        return Corpus(str(path), "none", train, val, _sha256(train, val), None)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not text:
        raise DataError(f"{path}: text file is empty")
    tokens = ByteTokenizer().encode(text)
    train, val = _split(tokens, val_fraction)
    return Corpus(str(path), "byte", train, val, _sha256(train, val), 256)
