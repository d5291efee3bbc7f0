"""HDF5 results files: provenance, the block partition, dense curvature blocks written chunk by
chunk (resumable, valid after a crash), coupling maps. Layout: docs/hdf5.md.

Step-axis files (``curvlab spectrum RUN_DIR``; written and read by :mod:`curvlab.trajectory`):
the same root provenance and ``/blocks``, plus ``/steps`` int64 [n], ``/checkpoints`` and
``/checkpoint_sha256`` str [n], ``/optimizers`` str [n] (JSON), ``/complete`` bool [n],
``/step/<step>/spectrum/<kind>/<target>/...`` (the single-file spectrum layout of
:mod:`curvlab.store.spectrum`, one group per checkpoint, its ``complete`` attribute set last),
``/step/<step>/{gradient,sharpness,heterogeneity}`` and flat per-quantity arrays over the step
axis in ``/series/`` (``lambda_max/<target>``, ``gradient_share/<target>``,
``step_share/<target>``, ``sharpness``, ``sharpness_threshold``, ``lr``, ``block_lambda_max``,
``block_trace``, ``js_distance``); root attribute ``layout = "steps"``.

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
