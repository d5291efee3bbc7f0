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
from typing import Any

import numpy as np
import torch

from curvlab.data.corpus import Corpus, load_corpus
from curvlab.errors import DataError

WINDOWS = ("random", "contiguous")
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to reproduce a stream of batches."""

    source: str = "default"
    seq_len: int = 64
    batch_size: int = 8
    seed: int = 0
    windows: str = "random"
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.windows not in WINDOWS:
            raise DataError(f"unknown windows mode {self.windows!r}; expected random or contiguous")
        if self.seq_len < 1 or self.batch_size < 1:
            raise DataError("seq_len and batch_size must be positive")

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
        self.spec = spec
        self.corpus = corpus if corpus is not None else load_corpus(spec.source, spec.val_fraction)
        self.split = split
        self.tokens = self.corpus.split(split)
        if len(self.tokens) < spec.seq_len + 1:
            raise DataError(
                f"{self.corpus.source}: {split} split has {len(self.tokens)} tokens, fewer than "
                f"seq_len + 1 = {spec.seq_len + 1}"
            )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise a :class:`DataError` if any token id of the corpus is >= ``vocab_size``."""
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
        window = torch.from_numpy(self.tokens[rows])
        return Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())

    def batches(self, count: int, start: int = 0) -> list[Batch]:
        return [self.batch(start + i) for i in range(count)]


def analysis_spec(base: dict[str, Any] | None = None, **overrides: Any) -> DataSpec:
    """A :class:`DataSpec` from a stored one (e.g. a checkpoint's ``info.data``) with the
    non-``None`` ``overrides`` applied; fields missing from both take their defaults."""
    return DataSpec.from_dict(dict(base or {})).replace(**overrides)


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
