"""Dense curvature blocks, column chunk by column chunk, streamed into a sink.

Block ``C[r, c]`` ([n_r, n_c]) of a curvature operator is materialized by products with
identity columns: chunk ``j`` is ``C[r, c] E_j`` with ``E_j`` the columns ``[a_j, b_j)`` of the
n_c x n_c identity. All row blocks requested for the same column block share those products (a
product yields the whole column space at once; rows are split off afterwards), so extracting
every pair costs one product per coordinate of θ, not one per coordinate and row block.

``pairs="all"`` means the upper triangle with the diagonal (row index <= column index in the
partition): curvature matrices are symmetric, so ``C[c, r] = C[r, c]ᵀ``.

This module knows nothing of files: it writes to any object with the :class:`BlockSink`
interface (:class:`curvlab.store.Writer` is one) and never prints; ``progress`` is called
with the number of column products done (e.g. ``tqdm.update``).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from curvlab import distributed
from curvlab.curvature.blocks import Partition
from curvlab.curvature.operators import CurvatureOperator, available_memory
from curvlab.curvature.space import BlockSpace
from curvlab.errors import ConfigError, CurvlabError

Pair = tuple[str, str]
Progress = Callable[[int], None]
GiB = 2**30
DEFAULT_MAX_DISK = 20 * GiB  # or 90% of the free space, whichever is smaller
DISK_FRACTION, MEMORY_FRACTION = 0.9, 0.8


class LimitError(CurvlabError):
    """An extraction is estimated to exceed a disk, memory or time limit."""


class BlockTarget(Protocol):
    """Where one dense block goes: column chunks of width ``chunk_cols``."""

    shape: tuple[int, int]
    chunk_cols: int
    n_chunks: int
    done: np.ndarray

    def columns(self, j: int) -> tuple[int, int]: ...

    def write(self, j: int, values: torch.Tensor) -> None: ...


class BlockSink(Protocol):
    """Creates and finds block targets (implemented by :class:`curvlab.store.Writer`)."""

    def find(self, kind: str, row: str, col: str) -> BlockTarget | None: ...

    def target(self, kind: str, row: str, col: str, dtype: Any, chunk_cols: int
               ) -> BlockTarget: ...


class _MirrorTarget:
    """A block target of rank 0's sink as seen by another rank: same layout, writes dropped."""

    def __init__(self, shape: tuple[int, int], chunk_cols: int, done: np.ndarray) -> None:
        self.shape, self.chunk_cols = shape, chunk_cols
        self.n_chunks = math.ceil(shape[1] / chunk_cols)
        self.done = done

    def columns(self, j: int) -> tuple[int, int]:
        return j * self.chunk_cols, min(self.shape[1], (j + 1) * self.chunk_cols)

    def write(self, j: int, values: torch.Tensor) -> None:
        pass


class MirrorSink:
    """Rank 0's sink on the other ``torchrun`` ranks: the same targets (shapes, chunk widths,
    done flags), so every rank runs the same products in the same order; nothing is written."""

    def __init__(self, partition: Partition,
                 snapshot: Mapping[tuple[str, str, str], tuple[int, np.ndarray]]) -> None:
        self.sizes = dict(zip(partition.names, partition.sizes))
        self.targets = {key: _MirrorTarget((self.sizes[key[1]], self.sizes[key[2]]), width, done)
                        for key, (width, done) in snapshot.items()}

    def find(self, kind: str, row: str, col: str) -> BlockTarget | None:
        return self.targets.get((kind, row, col))

    def target(self, kind: str, row: str, col: str, dtype: Any, chunk_cols: int) -> BlockTarget:
        key = (kind, row, col)
        if key not in self.targets:
            shape = (self.sizes[row], self.sizes[col])
            self.targets[key] = _MirrorTarget(shape, chunk_cols,
                                              np.zeros(math.ceil(shape[1] / chunk_cols), bool))
        return self.targets[key]


def shared_sink(sink: BlockSink | None, partition: Partition, kinds: Sequence[str]
                ) -> BlockSink | None:
    """Under ``torchrun``: ``sink`` on rank 0 (the only writer), a :class:`MirrorSink` of it on
    the other ranks (rank 0's targets broadcast once). One process: ``sink`` itself."""
    if not distributed.active():
        return sink
    snapshot = None
    if distributed.is_main() and sink is not None:
        snapshot = {}
        for kind in kinds:
            for row in partition.names:
                for col in partition.names:
                    t = sink.find(kind, row, col)
                    if t is not None:
                        snapshot[(kind, row, col)] = (t.chunk_cols, np.array(t.done, bool))
    snapshot = distributed.broadcast_object(snapshot)
    if distributed.is_main():
        return sink
    return MirrorSink(partition, snapshot or {})


# -- pairs and sub-operators -----------------------------------------------------------------

def resolve_pairs(partition: Partition, pairs: str | Sequence[str | Pair]) -> list[Pair]:
    """Block pairs from ``"diag"`` (every diagonal block), ``"all"`` (upper triangle with the
    diagonal), a comma-separated string or a list of ``"ROW:COL"`` / ``"NAME"`` (the diagonal
    block) / ``(row, col)``. Duplicates are dropped; order is kept."""
    names = partition.names
    if pairs == "diag":
        return [(n, n) for n in names]
    if pairs == "all":
        return [(a, b) for i, a in enumerate(names) for b in names[i:]]
    items = pairs.split(",") if isinstance(pairs, str) else list(pairs)
    out: list[Pair] = []
    for item in items:
        pair = _parse_pair(item, names) if isinstance(item, str) else tuple(item)
        for name in pair:
            partition[name]  # raises ConfigError naming the valid blocks
        if pair not in out:
            out.append(pair)  # type: ignore[arg-type]
    if not out:
        raise ConfigError("no block pairs requested")
    return out


def _parse_pair(item: str, names: list[str]) -> Pair:
    item = item.strip()
    if item in names:
        return item, item
    splits = [(item[:i], item[i + 1:]) for i, ch in enumerate(item) if ch == ":"]
    for a, b in splits:
        if a in names and b in names:
            return a, b
    raise ConfigError(f"unknown block pair {item!r}: expected ROW:COL or a block name; "
                      f"valid blocks: {', '.join(names)}")


def sub_operator(op: CurvatureOperator, rows: Sequence[str], cols: Sequence[str]
                 ) -> CurvatureOperator:
    """The operator restricted to row blocks ``rows`` x column blocks ``cols`` (each list in
    the given order) of ``op.partition``; one product gives all its rows at once."""
    shapes = op.row_space.shapes
    row = BlockSpace(op.partition.select(list(rows)), shapes)
    col = BlockSpace(op.partition.select(list(cols)), shapes)
    label = f"{op.kind}[{'+'.join(rows)}, {'+'.join(cols)}]"
    return CurvatureOperator(op.engine, op.partition, row, col, label)


def identity_columns(n: int, start: int, stop: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """Columns ``[start, stop)`` of the n x n identity."""
    eye = torch.zeros(n, stop - start, dtype=dtype, device=device)
    eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
    return eye


@dataclass(frozen=True)
class _Group:
    """One column block and the row blocks that share its products."""

    col: str
    rows: tuple[str, ...]
    width: int  # columns per chunk


def _groups(kind: str, op: CurvatureOperator, pairs: list[Pair], sink: BlockSink | None,
            chunk_cols: int) -> list[_Group]:
    part = op.partition
    index = {n: i for i, n in enumerate(part.names)}
    sizes = dict(zip(part.names, part.sizes))
    by_col: dict[tuple[str, int], list[str]] = {}
    for row, col in pairs:
        found = sink.find(kind, row, col) if sink is not None else None
        width = found.chunk_cols if found is not None else max(1, min(chunk_cols, sizes[col]))
        by_col.setdefault((col, width), []).append(row)
    return [_Group(col, tuple(sorted(rows, key=index.get)), width)
            for (col, width), rows in sorted(by_col.items(), key=lambda kv: index[kv[0][0]])]


def _chunks_todo(group: _Group, n_col: int, done: list[np.ndarray | None], resume: bool):
    """For each chunk: (j, start, stop, indices of the rows that still need it)."""
    for j in range(math.ceil(n_col / group.width)):
        a, b = j * group.width, min(n_col, (j + 1) * group.width)
        need = [i for i, flags in enumerate(done)
                if not (resume and flags is not None and flags[j])]
        yield j, a, b, need


# -- planning --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractionPlan:
    """Estimated cost of an extraction (what is still to do when resuming).

    ``products``: column products (one curvature-vector product each); ``disk_bytes``: block
    bytes still to write (``Σ n_row · n_col · itemsize`` over the missing chunks);
    ``memory_bytes``: peak estimate, the largest chunk's identity input ``[n_col, w]`` and
    output ``[Σ n_row, w]`` (twice, for copies) plus the linearization cache and a per-column
    working set (two parameter-sized vectors and one forward's activations, per vmapped
    column); ``seconds``: ``products`` times the time per product, measured on one chunk's
    worth of columns (at most ``probe_columns``) per kind.
    """

    kinds: tuple[str, ...]
    pairs: tuple[Pair, ...]
    products: int
    products_total: int
    disk_bytes: int
    disk_bytes_total: int
    memory_bytes: int
    seconds: float | None
    seconds_per_product: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"

    def describe(self) -> str:
        t = "?" if self.seconds is None else format_seconds(self.seconds)
        return (f"{len(self.pairs)} block pair(s) x {len(self.kinds)} kind(s): "
                f"{self.products:,} of {self.products_total:,} column products to do, "
                f"{format_bytes(self.disk_bytes)} to write "
                f"(of {format_bytes(self.disk_bytes_total)}), "
                f"peak memory ~{format_bytes(self.memory_bytes)}, time ~{t}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _memory_per_column(op: CurvatureOperator) -> tuple[int, int]:
    """(resident bytes, bytes per vmapped column) of products with ``op`` (an estimate)."""
    forward = op.engine.estimate_cache_bytes()
    itemsize = op.dtype.itemsize
    return forward, 2 * op.engine.num_params * itemsize + forward // 2


def time_product(op: CurvatureOperator, columns: int = 32, product_chunk: int | None = 32
                 ) -> float:
    """Seconds per column product of ``op``: the second of two ``matmat`` calls on ``columns``
    identity columns (the first builds the linearization cache and warms up). Vectorized
    products get cheaper per column with more columns: time as many as a chunk has."""
    n = op.shape[1]
    eye = identity_columns(n, 0, max(1, min(columns, n)), op.dtype, op.device)
    op.matmat(eye, product_chunk)
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    start = time.perf_counter()
    op.matmat(eye, product_chunk)
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    return (time.perf_counter() - start) / eye.shape[1]


def plan_extraction(
    operators: Mapping[str, CurvatureOperator],
    pairs: str | Sequence[str | Pair],
    *,
    sink: BlockSink | None = None,
    chunk_cols: int = 64,
    product_chunk: int | None = 32,
    resume: bool = True,
    time_products: bool = True,
    probe_columns: int = 32,
) -> ExtractionPlan:
    """Estimate what :func:`extract_blocks` with the same arguments will cost (see
    :class:`ExtractionPlan`). ``time_products`` times products with :func:`time_product`
    (two ``matmat`` calls of up to ``probe_columns`` columns per kind with work to do)."""
    todo: dict[str, int] = {}
    products_total = disk = disk_total = memory = 0
    all_pairs: list[Pair] = []
    device = "cpu"
    for kind, op in operators.items():
        pairs_k = resolve_pairs(op.partition, pairs)
        all_pairs += [p for p in pairs_k if p not in all_pairs]
        sizes = dict(zip(op.partition.names, op.partition.sizes))
        itemsize, device = op.dtype.itemsize, str(op.device)
        resident, per_column = _memory_per_column(op)
        todo[kind] = 0
        for g in _groups(kind, op, pairs_k, sink, chunk_cols):
            n_col, n_rows = sizes[g.col], sum(sizes[r] for r in g.rows)
            for _, a, b, need in _chunks_todo(g, n_col, _done_flags(kind, g, sink), resume):
                if need:
                    todo[kind] += b - a
                    disk += sum(sizes[g.rows[i]] for i in need) * (b - a) * itemsize
            products_total += n_col
            disk_total += n_rows * n_col * itemsize
            vmapped = min(g.width, product_chunk or g.width)
            memory = max(memory, 2 * (n_col + n_rows) * g.width * itemsize + resident
                         + vmapped * per_column)
    probe = min(probe_columns, chunk_cols, product_chunk or chunk_cols)
    rates = {kind: time_product(operators[kind], probe, product_chunk)
             for kind, n in todo.items() if time_products and n}
    seconds = sum(rates.get(k, 0.0) * n for k, n in todo.items()) if time_products else None
    return ExtractionPlan(tuple(operators), tuple(all_pairs), sum(todo.values()),
                          products_total, disk, disk_total, memory, seconds, rates, device)


def _done_flags(kind: str, group: _Group, sink: BlockSink | None) -> list[np.ndarray | None]:
    if sink is None:
        return [None] * len(group.rows)
    found = [sink.find(kind, r, group.col) for r in group.rows]
    return [t.done if t is not None else None for t in found]


def _existing_dir(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def check_limits(
    plan: ExtractionPlan,
    *,
    max_disk_bytes: int | None = None,
    max_memory_bytes: int | None = None,
    max_seconds: float | None = None,
    force: bool = False,
    disk_path: str | Path = ".",
) -> None:
    """Raise a :class:`LimitError` naming every exceeded limit, unless ``force``.

    Defaults: disk ``min(20 GiB, 90% of the free space at disk_path)``, memory 80% of the
    available memory of the plan's device, no time limit.
    """
    if force:
        return
    over = []
    if max_disk_bytes is None:
        free = shutil.disk_usage(_existing_dir(Path(disk_path))).free
        limit, why = min(DEFAULT_MAX_DISK, int(DISK_FRACTION * free)), (
            f"default: 20 GiB or 90% of the {format_bytes(free)} free, whichever is smaller")
    else:
        limit, why = max_disk_bytes, "max_disk_bytes"
    if plan.disk_bytes > limit:
        over.append(f"disk {format_bytes(plan.disk_bytes)} over the {format_bytes(limit)} "
                    f"limit ({why})")
    if max_memory_bytes is None:
        avail = available_memory(torch.device(plan.device))
        limit, why = int(MEMORY_FRACTION * avail), (
            f"default: 80% of the {format_bytes(avail)} available")
    else:
        limit, why = max_memory_bytes, "max_memory_bytes"
    if plan.memory_bytes > limit:
        over.append(f"memory {format_bytes(plan.memory_bytes)} over the {format_bytes(limit)} "
                    f"limit ({why}; fewer columns per chunk need less)")
    if max_seconds is not None and plan.seconds is not None and plan.seconds > max_seconds:
        over.append(f"time {format_seconds(plan.seconds)} over the "
                    f"{format_seconds(max_seconds)} limit (max_seconds)")
    if over:
        raise LimitError(f"extraction estimated to need {'; '.join(over)}; pass --force "
                         "(force=True) to run anyway")


# -- extraction ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`extract_blocks` did."""

    products: int  # column products computed
    chunks_written: int  # (block, column chunk) pieces written
    chunks_skipped: int  # already done (resume)
    seconds: float


def extract_blocks(
    operators: Mapping[str, CurvatureOperator],
    pairs: str | Sequence[str | Pair],
    sink: BlockSink,
    *,
    chunk_cols: int = 64,
    product_chunk: int | None = 32,
    resume: bool = True,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Materialize the dense blocks ``pairs`` (see :func:`resolve_pairs`) of each operator
    (``{kind: operator}``) into ``sink``, ``chunk_cols`` columns per chunk.

    Every target is created before the first product (existing ones keep their own chunk
    width). Each chunk is one ``matmat`` with identity columns (vmapped ``product_chunk``
    columns at a time), shared by all row blocks of its column block, written as soon as it
    is computed. ``resume`` skips chunks the sink marks done; ``progress(n)`` is called after
    each chunk with its number of column products.
    """
    start = time.perf_counter()
    work = []
    for kind, op in operators.items():
        for g in _groups(kind, op, resolve_pairs(op.partition, pairs), sink, chunk_cols):
            targets = [sink.target(kind, r, g.col, op.dtype, g.width) for r in g.rows]
            work.append((op, g, targets))
    products = written = skipped = 0
    for op, g, targets in work:
        sub = sub_operator(op, g.rows, [g.col])
        done = [t.done for t in targets]
        for j, a, b, need in _chunks_todo(g, sub.shape[1], done, resume):
            skipped += len(targets) - len(need)
            if not need:
                continue
            values = sub.matmat(identity_columns(sub.shape[1], a, b, op.dtype, op.device),
                                product_chunk)
            pieces = torch.split(values, [t.shape[0] for t in targets], dim=0)
            for i in need:
                targets[i].write(j, pieces[i])
            products += b - a
            written += len(need)
            if progress is not None:
                progress(b - a)
    return ExtractionResult(products, written, skipped, time.perf_counter() - start)
