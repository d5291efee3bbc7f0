"""Data sources: what a ``--data`` string names, and readers for each file format.

A source is ``default`` (the embedded corpus), a file, or a folder:

- text: a plain UTF-8 file (any suffix not below: one document), ``.jsonl`` (one JSON object
  per line, the document in field ``text_field``), ``.parquet`` (column ``text_field``; needs
  the optional ``pyarrow``), a folder of ``.txt`` files (each one document, in path order,
  subfolders included);
- token ids: ``.bin`` (nanoGPT: little-endian ``uint16``), ``.npy`` (a 1-D integer array:
  ``int32``, ``uint32``, ``int64``, ...; any vocabulary);
- a folder holding ``train.X`` and ``val.X`` of one of these formats (``X`` = ``bin``, ``npy``,
  ``jsonl``, ``parquet``, ``txt``): the two files are the two splits.

Readers stream: a text file is read in pieces of about 1 MB cut at the start of a line, jsonl
line by line, Parquet by record batches, so memory stays bounded whatever the file size.
Every problem is a :class:`DataError` naming the file (and the line, row or column).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curvlab.errors import DataError

TOKEN_FORMATS = ("bin", "npy")
TEXT_FORMATS = ("text", "jsonl", "parquet")
_SPLIT_SUFFIXES = (".bin", ".npy", ".jsonl", ".parquet", ".txt")
PIECE_BYTES = 1 << 20  # a text file is encoded in pieces of about this size
_SPACE = frozenset(b" \t\n\r\x0b\x0c")


@dataclass(frozen=True)
class Part:
    """Files read as one token stream: one file, or the documents of a folder of ``.txt``."""

    files: tuple[Path, ...]
    format: str  # "text", "jsonl", "parquet", "bin" or "npy"

    @property
    def tokens(self) -> bool:
        return self.format in TOKEN_FORMATS

    @property
    def name(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent}/*.txt"


@dataclass(frozen=True)
class Source:
    """A resolved data source: one part (split by ``val_fraction``) or two (train, val)."""

    source: str
    parts: tuple[Part, ...]

    @property
    def tokens(self) -> bool:
        """True if the source holds token ids (no tokenizer is applied)."""
        return bool(self.parts) and self.parts[0].tokens

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(f for p in self.parts for f in p.files)


def file_format(path: Path) -> str:
    """The format of a file, from its suffix."""
    return {".bin": "bin", ".npy": "npy", ".jsonl": "jsonl", ".parquet": "parquet"}.get(
        path.suffix.lower(), "text")


def is_token_source(source: str) -> bool:
    """True if ``source`` holds token ids (``.bin``/``.npy`` files, or a folder of them)."""
    if source == "default":
        return False
    path = Path(source)
    if path.is_dir():
        return any((path / f"train.{x}").is_file() or (path / f"val.{x}").is_file()
                   for x in TOKEN_FORMATS)
    return file_format(path) in TOKEN_FORMATS


def resolve_source(source: str) -> Source:
    """The files behind a source string (see module docstring); ``default`` has none."""
    if source == "default":
        return Source("default", ())
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source not found: {source}")
    if not path.is_dir():
        return Source(str(path), (Part((path,), file_format(path)),))
    for suffix in _SPLIT_SUFFIXES:
        train, val = path / f"train{suffix}", path / f"val{suffix}"
        if train.is_file() and val.is_file():
            fmt = file_format(train)
            return Source(str(path), (Part((train,), fmt), Part((val,), fmt)))
        if suffix != ".txt" and (train.is_file() or val.is_file()):
            have, lack = (train, val) if train.is_file() else (val, train)
            raise DataError(f"{path}: folder has {have.name} but no {lack.name}")
    texts = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not texts:
        raise DataError(f"{path}: folder holds neither train.bin/val.bin (nanoGPT token files), "
                        "train.X/val.X files, nor .txt files")
    return Source(str(path), (Part(tuple(texts), "text"),))


# -- token files ----------------------------------------------------------------------------


def read_token_file(path: Path) -> np.ndarray:
    """The ids of a ``.bin`` or ``.npy`` file, memory-mapped (read-only, no copy)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise DataError(f"{path}: token file is empty")
    if file_format(path) == "bin":
        if size % 2:
            raise DataError(
                f"{path}: token file has an odd byte count ({size}); expected little-endian "
                "uint16 token ids (nanoGPT .bin format)")
        try:
            return np.memmap(path, dtype="<u2", mode="r")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a .npy array file ({msg[:160]})") from None
    if not isinstance(a, np.ndarray):
        raise DataError(f"{path}: not a .npy array file (an .npz archive?)")
    if a.dtype.kind not in "iu":
        raise DataError(f"{path}: .npy array holds {a.dtype} values; token ids must be integers "
                        "(int32, uint32, int64, ...)")
    if a.ndim != 1:
        raise DataError(f"{path}: .npy array has shape {a.shape}; expected a 1-D array of token "
                        "ids")
    if a.size == 0:
        raise DataError(f"{path}: .npy array is empty")
    return a


# -- documents ------------------------------------------------------------------------------

Doc = tuple[str, bool, str]  # (text, starts a new document, where: "FILE: line 3", ...)


def documents(part: Part, text_field: str = "text") -> Iterator[Doc]:
    """The documents of a text part, streamed; a plain text file comes in pieces (the
    second and later pieces do not start a new document)."""
    reader = {"text": _text_pieces, "jsonl": _jsonl_docs, "parquet": _parquet_docs}[part.format]
    for f in part.files:
        yield from reader(f, text_field)


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _cut(buf: bytes, start: int) -> int:
    """The first line start at or after ``start`` that follows a newline and begins with a
    non-space byte (a cut there splits no pre-token of byte-level BPE tokenizers); -1 if none."""
    i = buf.find(b"\n", max(start - 1, 0))
    while i != -1 and i + 1 < len(buf):
        if buf[i + 1] not in _SPACE:
            return i + 1
        i = buf.find(b"\n", i + 1)
    return -1


def _text_pieces(path: Path, _field: str) -> Iterator[Doc]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, first, buf = 0, True, b""
    with _open(path) as f:
        while True:
            try:
                block = f.read(PIECE_BYTES)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror})") from None
            buf += block
            cut = _cut(buf, PIECE_BYTES) if block else len(buf)
            if cut == -1:
                continue
            piece, buf = buf[:cut], buf[cut:]
            try:
                text = decoder.decode(piece, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte "
                                f"{offset + e.start})") from None
            if first and not text and not block:
                raise DataError(f"{path}: text file is empty")
            if text:
                yield text, first, f"{path}: byte {offset}"
                first = False
            offset += len(piece)
            if not block:
                return


def _jsonl_docs(path: Path, field: str) -> Iterator[Doc]:
    n = 0
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not UTF-8 ({e.reason})") from None
            except ValueError as e:
                raise DataError(f"{path}: line {lineno} is not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(obj).__name__}, not an "
                                f"object with a {field!r} field")
            if field not in obj:
                keys = ", ".join(list(obj)[:6]) or "none"
                raise DataError(f"{path}: line {lineno} has no field {field!r} (fields: {keys}; "
                                "--text-field chooses another)")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{path}: line {lineno}: field {field!r} is a JSON "
                                f"{type(text).__name__}, not a string")
            n += 1
            yield text, True, f"{path}: line {lineno}"
    if not n:
        raise DataError(f"{path}: no documents (empty jsonl file)")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError("reading Parquet files needs the optional package 'pyarrow' "
                        "(pip install pyarrow, or pip install 'curvlab[parquet]')") from None
    return pyarrow, pyarrow.parquet


def _parquet_docs(path: Path, field: str) -> Iterator[Doc]:
    pa, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a Parquet file ({str(e).splitlines()[0][:160]})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        cols = ", ".join(schema.names[:8]) or "none"
        raise DataError(f"{path}: no column {field!r} (columns: {cols}; --text-field chooses "
                        "another)")
    typ = schema.field(field).type
    is_text = pa.types.is_string(typ) or pa.types.is_large_string(typ) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ))
    if not is_text:
        raise DataError(f"{path}: column {field!r} holds {typ}, not text")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: Parquet file has no rows")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=4096):
            col = batch.column(0)
            if col.null_count:
                i = next(j for j, v in enumerate(col.is_null().to_pylist()) if v)
                raise DataError(f"{path}: column {field!r} is null in row {row + i + 1} "
                                f"(index {row + i})")
            for j, text in enumerate(col.to_pylist()):
                yield text, True, f"{path}: row {row + j + 1}"
            row += len(col)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet data after row {row} "
                        f"({str(e).splitlines()[0][:160]})") from None
