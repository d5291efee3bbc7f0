"""Reading results files (see docs/hdf5.md).

The reader opens the file for each access, read-only and without HDF5 file locks, so a file
can be inspected while an extraction is still writing it (its ``done`` flags say which column
chunks are there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlab.curvature.blocks import Partition
from curvlab.store.schema import (
    FORMAT,
    Provenance,
    StoreError,
    decode_name,
    encode_name,
    open_h5,
    read_partition,
)


@dataclass(frozen=True)
class BlockStatus:
    """How much of one stored block is written."""

    kind: str
    row: str
    col: str
    shape: tuple[int, int]
    dtype: str
    chunk_cols: int
    chunks_done: int
    chunks: int

    @property
    def complete(self) -> bool:
        return self.chunks_done == self.chunks


class Results:
    """A curvlab results file: provenance, partition, dense blocks, coupling maps."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with self._open() as f:
            if f.attrs.get("format") != FORMAT or "blocks" not in f:
                raise StoreError(f"cannot read {self.path}: not a curvlab results file")
            self.provenance = Provenance.from_attrs(f.attrs)
            self.partition: Partition = read_partition(f["blocks"])
            self.attrs: dict[str, Any] = {
                k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()
            }
        self.attrs.update(model=self.provenance.model, data=self.provenance.data)

    def _open(self):
        return open_h5(self.path, "r", "read", locking=False)

    def __repr__(self) -> str:
        return f"Results({str(self.path)!r}, kinds={self.kinds}, blocks={self.names})"

    @property
    def names(self) -> list[str]:
        return self.partition.names

    @property
    def kinds(self) -> list[str]:
        """Curvature kinds with stored blocks."""
        with self._open() as f:
            return sorted(decode_name(k) for k in f.get("curvature", {}))

    @property
    def coupling_kinds(self) -> list[str]:
        with self._open() as f:
            return sorted(decode_name(k) for k in f.get("coupling", {}))

    def _datasets(self, f, kind: str):
        group = f.get(f"curvature/{encode_name(kind)}")
        if group is None:
            raise StoreError(f"{self.path} has no {kind} blocks; stored kinds: "
                             f"{', '.join(self.kinds) or 'none'}")
        index = {n: i for i, n in enumerate(self.names)}
        found = [ds for row in group.values() for ds in row.values()]
        return sorted(found, key=lambda d: (index[d.attrs["row"]], index[d.attrs["col"]]))

    def pairs(self, kind: str) -> list[tuple[str, str]]:
        """The stored (row, col) block pairs of ``kind``, in partition order."""
        with self._open() as f:
            return [(str(d.attrs["row"]), str(d.attrs["col"])) for d in self._datasets(f, kind)]

    def status(self) -> list[BlockStatus]:
        """Every stored block with its number of written column chunks."""
        out = []
        with self._open() as f:
            for kind in self.kinds:
                for d in self._datasets(f, kind):
                    done = np.asarray(d.attrs["done"], dtype=bool)
                    out.append(BlockStatus(kind, str(d.attrs["row"]), str(d.attrs["col"]),
                                           tuple(d.shape), str(d.dtype), int(d.attrs["chunk_cols"]),
                                           int(done.sum()), len(done)))
        return out

    def block(self, kind: str, row: str, col: str | None = None,
              allow_incomplete: bool = False) -> torch.Tensor:
        """The dense block ``C[row, col]`` of curvature ``kind`` as a tensor [n_row, n_col].

        A lower-triangle pair that is not stored is returned as the transpose of the stored
        ``(col, row)`` block (curvature matrices are symmetric). An incomplete block raises a
        :class:`StoreError` unless ``allow_incomplete``; then unwritten columns are NaN.
        """
        col = row if col is None else col
        for name in (row, col):
            if name not in self.names:
                raise StoreError(f"unknown block {name!r}; blocks of {self.path}: "
                                 f"{', '.join(self.names)}")
        with self._open() as f:
            base = f"curvature/{encode_name(kind)}"
            key, transpose = f"{base}/{encode_name(row)}/{encode_name(col)}", False
            if key not in f:
                key, transpose = f"{base}/{encode_name(col)}/{encode_name(row)}", True
            if key not in f:
                raise StoreError(f"{self.path} does not hold {kind} block ({row}, {col})")
            ds = f[key]
            values = ds[()]
            done = np.asarray(ds.attrs["done"], dtype=bool)
            width = int(ds.attrs["chunk_cols"])
            stored = f"({ds.attrs['row']}, {ds.attrs['col']})"
        if not done.all():
            if not allow_incomplete:
                raise StoreError(
                    f"{kind} block {stored} in {self.path} is "
                    f"incomplete ({done.sum()} of {len(done)} column chunks written); resume the "
                    "extraction or pass allow_incomplete=True (missing columns read as NaN)")
            for j in np.flatnonzero(~done):
                values[:, j * width:(j + 1) * width] = np.nan
        out = torch.from_numpy(values)
        return out.T if transpose else out

    def coupling(self, kind: str):
        """The stored :class:`~curvlab.curvature.coupling.CouplingMap` of ``kind``."""
        from curvlab.curvature.coupling import CouplingMap

        with self._open() as f:
            g = f.get(f"coupling/{encode_name(kind)}")
            if g is None:
                raise StoreError(f"{self.path} has no {kind} coupling map; stored: "
                                 f"{', '.join(self.coupling_kinds) or 'none'}")
            return CouplingMap(
                names=tuple(str(n) for n in g.attrs["names"]),
                frobenius=torch.from_numpy(g["frobenius"][()]),
                stderr=torch.from_numpy(g["stderr"][()]),
                exact=torch.from_numpy(g["exact"][()].astype(bool)),
                kind=kind,
                probes=int(g.attrs["probes"]),
                seed=int(g.attrs["seed"]),
                exact_max=int(g.attrs["exact_max"]),
                distribution=str(g.attrs["distribution"]),
            )


def read(path: str | os.PathLike) -> Results:
    """Open a results file for reading (see :class:`Results`)."""
    return Results(path)
