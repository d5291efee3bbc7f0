"""Writing results files: chunked, resumable, valid after ``kill -9`` at any moment.

Crash safety comes from doing all metadata work up front. A block dataset is created with all
its column chunks allocated at once (HDF5 early allocation, no fill values written, so the file
is sparse until written) and a ``done`` attribute of fixed size; after that, writing a chunk
only overwrites preallocated raw bytes. Each chunk is written, flushed, marked done (an
in-place attribute update) and flushed again, so a chunk marked done is on disk and a killed
run leaves a readable file in which only the unmarked chunks are missing.

Files use the library's default (earliest) format bounds: with ``libver="latest"`` HDF5 sets
file consistency flags while a file is open for writing, and a killed run's file then refuses
to open without ``h5clear``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from curvlab.curvature.blocks import Partition
from curvlab.fileutil import temp_beside
from curvlab.store.schema import (
    FORMAT,
    FORMAT_VERSION,
    STR,
    Provenance,
    StoreError,
    decode_name,
    dtype_name,
    encode_name,
    open_h5,
    partition_differences,
    read_partition,
    write_partition,
)

MAX_CHUNK_BYTES = 2**32 - 1  # HDF5's limit on one chunk
MAX_CHUNKS = 60_000  # the ``done`` attribute must fit in an object header (64 KiB)


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 remedy: str = "pass --overwrite") -> Path:
    """Raise a :class:`StoreError` unless a new results file can be written at ``path``
    (parent folders are created); ``remedy`` completes the message for an existing file."""
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"cannot write {path}: it is a folder")
    if path.exists() and not overwrite:
        raise StoreError(f"{path} exists; {remedy} or choose another output file")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"cannot write {path}: {parent} is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
    return path


class BlockTarget:
    """One dense block ``/curvature/<kind>/<row>/<col>`` [n_row, n_col] and its column chunks.

    Chunk ``j`` holds columns ``[j * chunk_cols, min(n_col, (j + 1) * chunk_cols))``.
    """

    def __init__(self, writer: Writer, dataset: h5py.Dataset) -> None:
        self._writer = writer
        self._ds = dataset
        self.kind = decode_name(dataset.parent.parent.name.rsplit("/", 1)[-1])
        self.row, self.col = str(dataset.attrs["row"]), str(dataset.attrs["col"])
        self.shape: tuple[int, int] = tuple(int(s) for s in dataset.shape)  # type: ignore
        self.chunk_cols = int(dataset.attrs["chunk_cols"])
        self._done = np.array(dataset.attrs["done"], dtype=bool)

    @property
    def n_chunks(self) -> int:
        return len(self._done)

    @property
    def done(self) -> np.ndarray:
        """Which column chunks are written (a copy)."""
        return self._done.copy()

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def columns(self, j: int) -> tuple[int, int]:
        """The column range ``[start, stop)`` of chunk ``j``."""
        return j * self.chunk_cols, min(self.shape[1], (j + 1) * self.chunk_cols)

    def squared_norm(self) -> float:
        """``||block||_F²`` (float64) of a complete block, read chunk by chunk."""
        if not self.complete:
            raise ValueError(f"{self.kind}[{self.row}, {self.col}] is not complete")
        return float(sum(np.square(self._ds[:, slice(*self.columns(j))], dtype=np.float64).sum()
                         for j in range(self.n_chunks)))

    def write(self, j: int, values: Any) -> None:
        """Write chunk ``j`` ([n_row, stop - start], a numpy array or torch tensor), flush, mark
        it done, flush."""
        a, b = self.columns(j)
        values = _to_numpy(values)
        if values.shape != (self.shape[0], b - a):
            raise ValueError(f"chunk {j} of {self.kind}[{self.row}, {self.col}] needs shape "
                             f"{(self.shape[0], b - a)}, got {values.shape}")
        self._ds[:, a:b] = values
        self._writer.flush()
        self._done[j] = True
        self._ds.attrs.modify("done", self._done)
        if self._done.all():
            self._ds.attrs.modify("complete", True)
        self._writer.flush()


class Writer:
    """A results file open for writing. Use :func:`create_file` or :func:`open_for_resume`."""

    def __init__(self, path: Path, file: h5py.File, provenance: Provenance,
                 partition: Partition) -> None:
        self.path, self.file = path, file
        self.provenance, self.partition = provenance, partition
        self._sizes = dict(zip(partition.names, partition.sizes))

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def _key(self, kind: str, row: str, col: str) -> str:
        for name in (row, col):
            if name not in self._sizes:
                raise StoreError(f"unknown block {name!r}; blocks of {self.path}: "
                                 f"{', '.join(self.partition.names)}")
        return f"curvature/{encode_name(kind)}/{encode_name(row)}/{encode_name(col)}"

    def kind_options(self, kind: str, options: Mapping[str, Any]) -> None:
        """Record how curvature ``kind`` was computed beyond the provenance (e.g. Monte-Carlo
        samples and seed) as JSON attribute ``options``; a resumed file must agree."""
        group = self.file.require_group(f"curvature/{encode_name(kind)}")
        text = json.dumps(dict(options), sort_keys=True)
        if "options" in group.attrs and group.attrs["options"] != text:
            raise StoreError(f"cannot resume {self.path}: {kind} options differ "
                             f"(file {group.attrs['options']}, now {text})")
        group.attrs["options"] = text
        self.flush()

    def find(self, kind: str, row: str, col: str) -> BlockTarget | None:
        """The stored block, or None."""
        key = self._key(kind, row, col)
        return BlockTarget(self, self.file[key]) if key in self.file else None

    def target(self, kind: str, row: str, col: str, dtype: Any, chunk_cols: int) -> BlockTarget:
        """The block dataset for (kind, row, col): created with all chunks allocated, or the
        existing one (whose own chunk width then wins) after checking its dtype."""
        dtype = dtype_name(dtype)
        if dtype != self.provenance.dtype:
            raise StoreError(f"{self.path} holds {self.provenance.dtype} results, not {dtype}")
        existing = self.find(kind, row, col)
        if existing is not None:
            return existing
        shape = (self._sizes[row], self._sizes[col])
        width = max(1, min(int(chunk_cols), shape[1]))
        itemsize = np.dtype(dtype).itemsize
        if shape[0] * width * itemsize > MAX_CHUNK_BYTES:
            most = max(1, MAX_CHUNK_BYTES // (shape[0] * itemsize))
            raise StoreError(f"a column chunk of block {row} ({shape[0]} rows x {width}) is over "
                             f"HDF5's 4 GiB chunk limit; use at most {most} columns per chunk")
        n_chunks = math.ceil(shape[1] / width)
        if n_chunks > MAX_CHUNKS:
            raise StoreError(f"block ({row}, {col}) would have {n_chunks} column chunks, more "
                             f"than {MAX_CHUNKS}; use at least {math.ceil(shape[1] / MAX_CHUNKS)} "
                             "columns per chunk")
        key = self._key(kind, row, col)
        parent = self.file.require_group(key.rsplit("/", 1)[0])
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((shape[0], width))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # no metadata changes while writing
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # and no bytes written up front
        ds = parent.create_dataset(key.rsplit("/", 1)[1], shape=shape, dtype=dtype, dcpl=dcpl)
        ds.attrs["row"], ds.attrs["col"] = row, col
        ds.attrs["chunk_cols"] = np.int64(width)
        ds.attrs["done"] = np.zeros(n_chunks, dtype=bool)
        ds.attrs["complete"] = False
        self.flush()
        return BlockTarget(self, ds)

    def has_coupling(self, kind: str) -> bool:
        return f"coupling/{encode_name(kind)}" in self.file

    def write_coupling(self, kind: str, coupling: Any) -> None:
        """Write ``/coupling/<kind>`` from a coupling map (``names``, ``frobenius``, ``stderr``,
        ``exact``, and attributes ``probes``, ``seed``, ``exact_max``, ``distribution``),
        replacing an earlier one."""
        key = f"coupling/{encode_name(kind)}"
        if key in self.file:
            del self.file[key]
        group = self.file.create_group(key)
        group.create_dataset("frobenius", data=_to_numpy(coupling.frobenius).astype(np.float64))
        group.create_dataset("stderr", data=_to_numpy(coupling.stderr).astype(np.float64))
        group.create_dataset("exact", data=_to_numpy(coupling.exact).astype(bool))
        group.attrs.create("names", np.array(list(coupling.names), dtype=object), dtype=STR)
        for attr in ("probes", "seed", "exact_max"):
            group.attrs[attr] = np.int64(getattr(coupling, attr))
        group.attrs["distribution"] = str(coupling.distribution)
        self.flush()


def create_file(
    path: str | os.PathLike,
    provenance: Provenance,
    partition: Partition,
    *,
    param_shapes: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Writer:
    """Create a results file with root attributes and ``/blocks`` (written to a temporary file
    and renamed, so ``path`` never holds a half-made skeleton) and open it for writing."""
    path = check_output(path, overwrite)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"], f.attrs["format_version"] = FORMAT, FORMAT_VERSION
            for key, value in provenance.to_attrs().items():
                f.attrs[key] = value
            write_partition(f.create_group("blocks"), partition, param_shapes)
            f.create_group("curvature")
            f.create_group("coupling")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Writer(path, open_h5(path, "r+", "write"), provenance, partition)


def open_for_resume(path: str | os.PathLike, provenance: Provenance,
                    partition: Partition) -> Writer:
    """Open an existing results file to continue it. It must come from the same checkpoint
    (SHA-256), model, data, dtype and loss, and have the same blocks; otherwise
    ``StoreError("cannot resume <path>: <what differs>")``."""
    path = Path(path)
    f = open_h5(path, "r+", "resume")
    with contextlib.ExitStack() as guard:
        guard.callback(f.close)
        if f.attrs.get("format") != FORMAT or "blocks" not in f:
            raise StoreError(f"cannot resume {path}: not a curvlab results file")
        stored = Provenance.from_attrs(f.attrs)
        diffs = stored.differences(provenance)
        diffs += partition_differences(read_partition(f["blocks"]), partition)
        if diffs:
            raise StoreError(f"cannot resume {path}: {'; '.join(diffs)}")
        guard.pop_all()
    return Writer(path, f, stored, partition)

