"""Deterministic batches of next-token prediction windows.

A batch is ``inputs [B, T]`` and ``targets [B, T]`` (int64) with ``targets = inputs`` shifted by
one token. Batch ``i`` of a :class:`DataSpec` depends only on (tokens, seed, split, i), never on
earlier draws, so the same batch comes back on any machine, after a resume, or out of order.

- ``windows="random"``: start positions drawn uniformly from ``[0, N - T - 1]`` by numpy's PCG64
  seeded with ``(seed, split, i)``.
- ``windows="contiguous"``: sequence ``j = i*B + r`` of the split is ``tokens[j*T : j*T + T]``,
  targets ``tokens[j*T + 1 : j*T + T + 1]``, so an analysis is reproducible from the file alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlab.data.corpus import SPLITS, Corpus, JoinedTokens, load_corpus
from curvlab.data.sources import is_token_source
from curvlab.data.tokenizer import BYTE_VOCAB, load_tokenizer, tokenizer_sha256
from curvlab.errors import DataError

WINDOWS = ("random", "contiguous")
_SPLIT_IDS = {"train": 0, "val": 1, "all": 2}


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to reproduce a stream of batches.

    ``source``: see :mod:`curvlab.data.corpus`. ``tokenizer``: ``auto``, ``byte`` or the path
    of a tokenizer (folder or ``tokenizer.json``) for text sources; :func:`bind_tokenizer`
    turns ``auto`` into the model's tokenizer, and unbound ``auto`` reads text as bytes.
    ``tokenizer_sha256``: the hash the tokenizer's files must have (recorded with a checkpoint;
    None: not checked). ``text_field``: the jsonl field / Parquet column holding the documents.
    """

    source: str = "default"
    seq_len: int = 64
    batch_size: int = 8
    seed: int = 0
    windows: str = "random"
    val_fraction: float = 0.1
    tokenizer: str = "auto"
    tokenizer_sha256: str | None = None
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.windows not in WINDOWS:
            raise DataError(f"unknown windows mode {self.windows!r}; expected random or contiguous")
        if self.seq_len < 1 or self.batch_size < 1:
            raise DataError("seq_len and batch_size must be positive")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise DataError("tokenizer must be auto, byte or a path")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError("text_field must be a non-empty field name")

    def corpus(self) -> Corpus:
        """The corpus of this spec (:func:`~curvlab.data.load_corpus` of its fields)."""
        return load_corpus(self.source, self.val_fraction, self.tokenizer, self.text_field,
                           tokenizer_sha256=self.tokenizer_sha256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> DataSpec:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Batch:
    """One batch: ``inputs`` and ``targets`` of shape ``[B, T]`` (int64).

    A shard of a larger batch (rows ``row_start .. row_start+B-1`` of ``full_rows``, see
    :meth:`shard`) remembers where it came from, so that seeded draws per token (Monte-Carlo
    Fisher labels) are the same as on the whole batch.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    row_start: int = 0
    full_rows: int | None = None

    def to(self, device: torch.device | str) -> Batch:
        return dataclasses.replace(self, inputs=self.inputs.to(device),
                                   targets=self.targets.to(device))

    @property
    def num_tokens(self) -> int:
        """Target positions ``B·T`` of this batch (ignored targets included; the losses count
        the non-ignored ones)."""
        return self.targets.numel()

    @property
    def token_range(self) -> tuple[int, int]:
        """``(first token, tokens of the whole batch)`` in the flattened ``[B·T]`` order."""
        T = self.targets.shape[-1] if self.targets.ndim > 1 else 1
        full = self.full_rows if self.full_rows is not None else self.targets.shape[0]
        return self.row_start * T, full * T

    def shard(self, rank: int | None = None, world: int | None = None) -> Batch:
        """This process's rows of the batch under ``torchrun`` (itself on one process)."""
        from curvlab.distributed import shard_rows

        start, stop = shard_rows(self.inputs.shape[0], rank, world)
        if (start, stop) == (0, self.inputs.shape[0]):
            return self
        return Batch(self.inputs[start:stop], self.targets[start:stop],
                     self.row_start + start, self.full_rows or self.inputs.shape[0])


class BatchStream:
    """Indexable, deterministic batches of one split of a corpus."""

    def __init__(self, spec: DataSpec, corpus: Corpus | None = None, split: str = "train") -> None:
        if split not in SPLITS:
            raise DataError(f"unknown data split {split!r}; expected train, val or all")
        self.spec = spec
        self.corpus = corpus if corpus is not None else spec.corpus()
        self.split = split
        self.tokens: np.ndarray | JoinedTokens = self.corpus.split(split)
        need = spec.seq_len + 1
        if len(self.tokens) < need:
            total = self.corpus.num_tokens
            if split != "all" and total >= need:
                hint = f"--split all uses all {total:,} tokens of the source"
                if self.corpus.val_fraction is not None:
                    share = 1 - self.corpus.val_fraction if split == "train" else \
                        self.corpus.val_fraction
                    hint = (f"it is {share:.0%} of one stream; " + hint
                            + " (e.g. a file that is already held out)")
            else:
                hint = "use a shorter --seq-len or a longer source"
            raise DataError(
                f"{self.corpus.source}: {split} split has {len(self.tokens):,} tokens, fewer "
                f"than seq_len + 1 = {need}; {hint}"
            )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise a :class:`DataError` if any token id of the corpus is >= ``vocab_size``, or if
        text was read as bytes by an unbound ``auto`` tokenizer for a model whose vocabulary is
        not the byte vocabulary (see :func:`bind_tokenizer`)."""
        if (self.spec.tokenizer == "auto" and self.corpus.tokenizer == "byte"
                and vocab_size != BYTE_VOCAB):
            raise _no_tokenizer(self.spec.source, vocab_size)
        top = self.corpus.max_token
        if top >= vocab_size:
            raise DataError(
                f"{self.corpus.source}: token id {top} >= model vocab size {vocab_size}"
            )

    @property
    def num_contiguous_batches(self) -> int:
        """Number of whole contiguous-window batches in the split."""
        T, B = self.spec.seq_len, self.spec.batch_size
        return (len(self.tokens) - 1) // T // B

    def batch(self, index: int) -> Batch:
        T, B = self.spec.seq_len, self.spec.batch_size
        if index < 0:
            raise DataError(f"batch index must be >= 0, got {index}")
        if self.spec.windows == "random":
            rng = np.random.default_rng([self.spec.seed, _SPLIT_IDS[self.split], index])
            starts = rng.integers(0, len(self.tokens) - T, size=B)
        else:
            if index >= self.num_contiguous_batches:
                raise DataError(
                    f"contiguous batch {index} is past the end of the {self.split} split "
                    f"({self.num_contiguous_batches} batches of {B}x{T} tokens)"
                )
            starts = (index * B + np.arange(B)) * T
        rows = starts[:, None] + np.arange(T + 1)[None, :]
        window = torch.from_numpy(np.asarray(self.tokens[rows], dtype=np.int64))
        return Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())

    def batches(self, count: int, start: int = 0) -> list[Batch]:
        return [self.batch(start + i) for i in range(count)]


def analysis_spec(base: dict[str, Any] | None = None, **overrides: Any) -> DataSpec:
    """A :class:`DataSpec` from a stored one (e.g. a checkpoint's ``info.data``) with the
    non-``None`` ``overrides`` applied; fields missing from both take their defaults. A
    ``tokenizer`` override drops the stored ``tokenizer_sha256`` (the user's choice is
    taken as it is)."""
    base = dict(base or {})
    if overrides.get("tokenizer") is not None:
        base.pop("tokenizer_sha256", None)
    return DataSpec.from_dict(base).replace(**overrides)


def _no_tokenizer(source: str, vocab_size: int | None) -> DataError:
    what = "the default corpus" if source == "default" else source
    vocab = f"vocabulary {vocab_size:,}" if vocab_size is not None else "an unknown vocabulary"
    return DataError(
        f"{what} is text, but no tokenizer is known for this model ({vocab}, not the byte "
        f"vocabulary of {BYTE_VOCAB}): pass --tokenizer PATH (a tokenizer folder or "
        "tokenizer.json), --tokenizer byte, or token ids (--data a .bin/.npy file)")


def bind_tokenizer(spec: DataSpec, auto: tuple[str, str | None] = ("byte", None),
                   vocab_size: int | None = None) -> DataSpec:
    """``spec`` with its tokenizer made concrete for a model, checked, and hashed.

    ``auto``: what ``tokenizer="auto"`` means for the model, ``(choice, sha256)`` from
    :func:`~curvlab.data.tokenizer.auto_tokenizer` (``byte`` for a fresh curvlab model).
    Text sources: the tokenizer is loaded (a recorded hash that no longer matches is an
    error); ``none`` (no tokenizer known) becomes ``byte`` for a model with the byte vocabulary
    of 256 and is an error for any other ``vocab_size``. Token sources use their ids as they
    are: ``auto`` becomes ``none`` (a model trained on token files has no known tokenizer,
    whatever its starting point had), a tokenizer named explicitly stays in the spec (so that a
    checkpoint records it), hashed. The result has ``tokenizer`` ``byte``, ``none`` or an
    absolute path, and its ``tokenizer_sha256``.
    """
    choice, expect = spec.tokenizer, spec.tokenizer_sha256
    if choice == "auto":
        choice, expect = ("none", None) if is_token_source(spec.source) else auto
    if choice in ("byte", "none"):
        if choice == "none" and not is_token_source(spec.source):
            if vocab_size != BYTE_VOCAB:
                raise _no_tokenizer(spec.source, vocab_size)
            choice = "byte"
        return dataclasses.replace(spec, tokenizer=choice, tokenizer_sha256=None)
    if is_token_source(spec.source):
        sha = expect if expect is not None else tokenizer_sha256(choice)
        return dataclasses.replace(spec, tokenizer=str(Path(choice).resolve()),
                                   tokenizer_sha256=sha)
    tok = load_tokenizer(choice, expect)
    return dataclasses.replace(spec, tokenizer=tok.name, tokenizer_sha256=tok.sha256)


def analysis_batches(
    spec: DataSpec, count: int, vocab_size: int | None = None, split: str = "train",
    start: int = 0,
) -> list[Batch]:
    """Batches ``start .. start+count-1`` of ``spec`` (checked against ``vocab_size``)."""
    if count < 1:
        raise DataError(f"number of batches must be >= 1, got {count}")
    stream = BatchStream(spec, split=split)
    if vocab_size is not None:
        stream.check_vocab(vocab_size)
    return stream.batches(count, start)
