"""HDF5 results files: provenance, the block partition, dense curvature blocks written chunk by
chunk (resumable, valid after a crash), coupling maps. Layout: docs/hdf5.md.

Writing: :func:`make_provenance`, :func:`create_file` / :func:`open_for_resume` ->
:class:`Writer` (``target(kind, row, col, dtype, chunk_cols)`` -> :class:`BlockTarget`,
``write_coupling``). Reading: :func:`read` -> :class:`Results`.
"""

from curvlab.store.reader import BlockStatus, Results, read
from curvlab.store.schema import (
    FORMAT,
    FORMAT_VERSION,
    LOSS,
    Provenance,
    StoreError,
    decode_name,
    encode_name,
    make_provenance,
    sha256_file,
)
from curvlab.store.writer import BlockTarget, Writer, check_output, create_file, open_for_resume

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LOSS",
    "BlockStatus",
    "BlockTarget",
    "Provenance",
    "Results",
    "StoreError",
    "Writer",
    "check_output",
    "create_file",
    "decode_name",
    "encode_name",
    "make_provenance",
    "open_for_resume",
    "read",
    "sha256_file",
]
