"""Corpora: the tokens of a data source, split into train and validation.

A source (see :mod:`curvlab.data.sources`) is ``default`` (English text of the Python
documentation's topic pages, a snapshot of the standard library's ``pydoc_data.topics``
shipped with curvlab so that it is byte-identical on every machine), a text file (plain,
``.jsonl``, ``.parquet``), a folder of ``.txt`` files, a token file (``.bin``, ``.npy``), or a
folder with ``train.X`` and ``val.X``.

Text is tokenized by ``tokenizer`` (``byte``, or a path to a Hugging Face tokenizer, see
:mod:`curvlab.data.tokenizer`); documents are joined with the tokenizer's end-of-text token
(a newline if it has none). Tokenized text is cached (:mod:`curvlab.data.cache`), so that a
large corpus is tokenized once per (files, tokenizer); token arrays of files are
memory-mapped, never copied into memory whole.

Splits: a single source is split into train (the first ``1 - val_fraction`` of its tokens) and
val (the rest); a folder with ``train.X`` / ``val.X`` uses its two files; ``all`` is every token
of the source.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from curvlab.data import cache as token_cache
from curvlab.data.sources import (
    PIECE_BYTES,
    Part,
    documents,
    read_token_file,
    resolve_source,
)
from curvlab.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, tokenizer_files
from curvlab.errors import DataError

SPLITS = ("train", "val", "all")
_BATCH_CHARS = 4 << 20  # characters of text per encode_batch call
_BATCH_DOCS = 2048


class JoinedTokens:
    """Two token arrays read as one (``all`` of a two-file source), without a copy.

    Supports ``len`` and indexing by integer arrays (what batches need); ``np.asarray``
    concatenates (a copy).
    """

    def __init__(self, first: np.ndarray, second: np.ndarray) -> None:
        self.first, self.second, self._n = first, second, len(first)
        self.dtype = np.result_type(first.dtype, second.dtype)

    def __len__(self) -> int:
        return self._n + len(self.second)

    def __getitem__(self, index: Any) -> np.ndarray:
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise TypeError("JoinedTokens is indexed by integer arrays")
        out = np.empty(index.shape, dtype=self.dtype)
        head = index < self._n
        out[head] = self.first[index[head]]
        out[~head] = self.second[index[~head] - self._n]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        joined = np.concatenate([self.first, self.second])
        return joined if dtype is None else joined.astype(dtype)


@dataclass(frozen=True)
class Corpus:
    """Tokens of one source, split into ``train`` and ``val`` (read-only integer arrays, often
    memory-mapped; batches convert windows to int64).

    ``tokenizer``: ``byte``, the tokenizer's path, or ``none`` (a token file);
    ``tokenizer_sha256`` its files' hash; ``sha256``: SHA-256 of all token ids (int64
    little-endian, train then val); ``max_id``: the largest id; ``vocab_size``: the tokenizer's
    vocabulary (None for token files); ``val_fraction``: how train and val were cut from one
    stream (None: two files); ``whole``: all tokens of a one-stream source.
    """

    source: str
    tokenizer: str
    train: np.ndarray
    val: np.ndarray
    sha256: str
    vocab_size: int | None
    tokenizer_sha256: str | None = None
    max_id: int | None = None
    eot_id: int | None = None
    val_fraction: float | None = None
    whole: np.ndarray | None = None

    def split(self, name: str) -> np.ndarray | JoinedTokens:
        """The tokens of split ``train``, ``val`` or ``all``."""
        if name not in SPLITS:
            raise DataError(f"unknown data split {name!r}; expected train, val or all")
        if name == "all":
            return self.whole if self.whole is not None else JoinedTokens(self.train, self.val)
        return self.train if name == "train" else self.val

    @property
    def max_token(self) -> int:
        if self.max_id is not None:
            return self.max_id
        return int(max(self.train.max(initial=0), self.val.max(initial=0)))

    @property
    def num_tokens(self) -> int:
        return len(self.train) + len(self.val)


def _split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:cut], tokens[cut:]


def default_text() -> str:
    """The embedded default corpus as a string."""
    blob = resources.files("curvlab.data").joinpath("default_corpus.txt.gz").read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def source_tokenizer(source: str) -> str:
    """``none`` for token sources (``.bin``/``.npy`` files or folders), else ``byte`` (what a
    text source is tokenized with when no model says otherwise)."""
    from curvlab.data.sources import is_token_source

    return "none" if is_token_source(source) else "byte"


def load_corpus(
    source: str = "default",
    val_fraction: float = 0.1,
    tokenizer: str = "byte",
    text_field: str = "text",
    *,
    tokenizer_sha256: str | None = None,
    cache: str | os.PathLike | bool | None = None,
) -> Corpus:
    """Read (and tokenize) a source; see the module docstring.

    ``tokenizer``: ``byte`` (``auto`` means ``byte`` here: a caller that knows the model
    resolves ``auto`` first, see :func:`curvlab.data.bind_tokenizer`) or a tokenizer path;
    ignored for token files. ``tokenizer_sha256``: the hash the tokenizer must have.
    ``text_field``: the jsonl field / Parquet column of the documents. ``cache``: the token
    cache folder (None: ``$CURVLAB_CACHE`` or the default, False: off; see
    :mod:`curvlab.data.cache`).

    The last two corpora are kept in memory while their files are unchanged (size and
    modification time), so that a command building several batch streams of one source reads
    and hashes it once. Their token arrays are read-only.
    """
    src = resolve_source(source)
    tokenizer = "byte" if tokenizer == "auto" else tokenizer
    if src.tokens:
        tokenizer, tokenizer_sha256 = "none", None
    if src.tokens or source == "default" or src.parts[0].format not in ("jsonl", "parquet"):
        text_field = "text"
    folder = token_cache.cache_dir(cache)
    stamp = _stamp(list(src.files) + (tokenizer_files(tokenizer) if tokenizer not in
                                      ("byte", "none") else []))
    return _load_cached(source, float(val_fraction), tokenizer, tokenizer_sha256, text_field,
                        str(folder) if folder else None, stamp)


def _stamp(files: list[Path]) -> tuple:
    """(name, size, mtime) of ``files``: a changed file is read again."""
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(f), None, None))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _load_cached(source: str, val_fraction: float, tokenizer: str, tokenizer_sha: str | None,
                 text_field: str, folder: str | None, stamp: tuple) -> Corpus:
    corpus = _read_corpus(source, val_fraction, tokenizer, tokenizer_sha, text_field,
                          Path(folder) if folder else None)
    for a in (corpus.train, corpus.val, corpus.whole):
        if isinstance(a, np.ndarray) and a.flags.writeable:
            a.setflags(write=False)
    return corpus


def _read_corpus(source: str, val_fraction: float, tokenizer: str, tokenizer_sha: str | None,
                 text_field: str, folder: Path | None) -> Corpus:
    if source == "default":  # small: encoded in memory, in one call
        tok = ByteTokenizer() if tokenizer == "byte" else load_tokenizer(tokenizer, tokenizer_sha)
        tokens = tok.encode(default_text())
        stats = token_cache.TokenStats()
        stats.add(tokens)
        train, val = _split(tokens, val_fraction)
        return Corpus("default", tok.name, train, val, stats.sha256, tok.vocab_size,
                      tok.sha256, stats.max, tok.eot_id, val_fraction, tokens)
    src = resolve_source(source)
    if src.tokens:
        arrays = [read_token_file(p.files[0]) for p in src.parts]
        key = token_cache.entry_key("token-file-stats", token_cache.files_sha256(src.files)) \
            if folder is not None else ""
        meta = _joint_stats(arrays, folder, key)
        if meta["min"] < 0:
            raise DataError(f"{src.source}: token id {meta['min']} < 0")
        name, vocab, tok_sha, eot = "none", None, None, None
    else:
        if tokenizer == "none":
            raise DataError(f"{source} is text, but no tokenizer was given (tokenizer 'none')")
        tok = load_tokenizer(tokenizer, tokenizer_sha)
        parts = [_tokenize(p, tok, text_field, folder) for p in src.parts]
        arrays = [a for a, _ in parts]
        if len(parts) == 1:
            meta = parts[0][1]
        else:
            key = token_cache.entry_key("joint-stats", *(m["key"] for _, m in parts))
            meta = _joint_stats(arrays, folder, key)
        name, vocab, tok_sha, eot = tok.name, tok.vocab_size, tok.sha256, tok.eot_id
    if len(arrays) == 1:
        train, val = _split(arrays[0], val_fraction)
        return Corpus(src.source, name, train, val, meta["sha256"], vocab, tok_sha,
                      meta["max"], eot, val_fraction, arrays[0])
    return Corpus(src.source, name, arrays[0], arrays[1], meta["sha256"], vocab, tok_sha,
                  meta["max"], eot)


def _joint_stats(arrays: list[np.ndarray], folder: Path | None, key: str) -> dict[str, Any]:
    """Count, id range and SHA-256 of the concatenated ``arrays`` (from the cache if there)."""
    count = sum(len(a) for a in arrays)
    meta = token_cache.read_meta(folder, key) if folder is not None else None
    if meta is not None and meta.get("count") == count:
        return meta
    stats = token_cache.TokenStats()
    for a in arrays:
        stats.add(a)
    meta = stats.meta()
    if folder is not None:
        token_cache.write_meta(folder, key, meta)
    return meta


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536
                    else np.uint32)


def _tokenize(part: Part, tok: Tokenizer, text_field: str, folder: Path | None
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """The tokens of a text part (from the cache, or encoded now and cached) and their
    metadata (count, min, max, sha256, key)."""
    field = text_field if part.format in ("jsonl", "parquet") else None
    key = token_cache.entry_key(
        "text-tokens", part.format, token_cache.files_sha256(part.files),
        tok.sha256 or tok.name, tok.backend, field, PIECE_BYTES if part.format == "text" else None)
    hit = token_cache.read_tokens(folder, key)
    if hit is not None:
        return hit[0], {**hit[1], "key": key}
    sink = token_cache.TokenSink(folder, key, _dtype(tok.vocab_size))
    try:
        _encode_documents(part, tok, text_field, sink)
    except BaseException:
        sink.abort()
        raise
    if not sink.stats.count:
        sink.abort()
        raise DataError(f"{part.name}: no tokens (every document is empty)")
    tokens = sink.finish({"source": part.name, "tokenizer": tok.name})
    return tokens, {**sink.stats.meta(), "key": key}


def _encode_documents(part: Part, tok: Tokenizer, text_field: str,
                      sink: token_cache.TokenSink) -> None:
    """Encode the documents of ``part`` in batches into ``sink``, a separator between two
    non-empty documents."""
    separator = tok.separator
    started = False
    batch: list[tuple[str, bool, str]] = []
    chars = 0

    def flush() -> None:
        nonlocal started
        try:
            ids = tok.encode_batch([text for text, _, _ in batch])
        except DataError:
            raise
        except Exception as e:  # the tokenizer libraries raise plain Exceptions
            raise _encode_error(tok, batch, e) from None
        for (_, new, _), x in zip(batch, ids):
            if not len(x):
                continue
            if new and started:
                sink.add(separator)
            sink.add(x)
            started = True
        batch.clear()

    for doc in documents(part, text_field):
        batch.append(doc)
        chars += len(doc[0])
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            flush()
            chars = 0
    if batch:
        flush()


def _encode_error(tok: Tokenizer, batch: list[tuple[str, bool, str]], error: Exception
                  ) -> DataError:
    """A one-line error naming the first document of ``batch`` the tokenizer fails on."""
    for text, _, where in batch:
        try:
            tok.encode_batch([text])
        except Exception as e:  # noqa: BLE001 - the library's own exception types
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            return DataError(f"{where}: the tokenizer cannot encode this document ({msg[:160]})")
    msg = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DataError(f"{batch[0][2]}: the tokenizer failed ({msg[:160]})")
