"""curvlab: exact curvature analysis for transformer language models.

Public API (docs/api.md: one section each, with a runnable example):

- models and data: :func:`preset`, :class:`ModelConfig`, :func:`build_model`, :func:`lm_loss`,
  :class:`DataSpec`, :class:`BatchStream`, :class:`Batch`, :func:`load_corpus`; tokenizers and
  sources in :mod:`curvlab.data` (``bind_tokenizer``, ``auto_tokenizer``, ``load_tokenizer``,
  ``analysis_batches``, see docs/data.md);
- checkpoints: :func:`load_model`, :func:`load_checkpoint`, :func:`save_checkpoint`;
- partitions: :func:`partition`, :func:`layer_partition`, :func:`param_partition`;
- curvature operators: :func:`ggn`, :func:`hessian`, :func:`fisher`, :func:`curvature_operator`
  (:class:`CurvatureOperator`: ``@``, ``block``, ``block_diagonal``, ``to_dense``);
- checks: :func:`verify_operators`;
- linear algebra: :mod:`curvlab.linalg` (``lanczos``, ``spectral_density``, ``hutchpp``, ``cg``);
- dense blocks and HDF5: :func:`plan_extraction`, :func:`check_limits`, :func:`extract_blocks`,
  :func:`coupling_map`, :mod:`curvlab.store` (``create_file``, ``read``), see docs/hdf5.md;
- preconditioners: :func:`compare_preconditioners`, :func:`compare_checkpoints`;
- training: :class:`TrainConfig` and ``curvlab.train.train`` (``curvlab train``; the name
  ``curvlab.train`` is the subpackage), and Gauss-Newton in your own loop:
  :class:`curvlab.optim.GaussNewton` (docs/optim.md);
- several processes (``torchrun``): :mod:`curvlab.distributed` (``init``, ``is_main``,
  ``Batch.shard``), see docs/distributed.md;
- curvature along a training run (every checkpoint on the same batches, one step-axis
  file): :func:`spectra_along`, :func:`read_trajectory` (docs/api.md); the quantities per
  checkpoint in :mod:`curvlab.sharpness` (:func:`loss_gradient`, :func:`gradient_share`,
  :func:`adam_preconditioner`, :func:`preconditioned_sharpness`, :func:`stability_threshold`,
  :func:`js_distances`);
- errors: :class:`CurvlabError` (every error a user can cause).
"""

from curvlab import (  # noqa: E402
    compare,
    curvature,
    data,
    distributed,
    errors,
    linalg,
    models,
    optim,
    store,
    train,
)
from curvlab._version import __version__
from curvlab.checkpoint import (  # noqa: E402
    CheckpointInfo,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from curvlab.compare import CompareResult, compare_checkpoints, compare_preconditioners  # noqa: E402
from curvlab.curvature.blocks import (  # noqa: E402
    Block,
    Part,
    Partition,
    layer_partition,
    param_partition,
    partition,
)
from curvlab.curvature.coupling import CouplingMap, coupling_map  # noqa: E402
from curvlab.curvature.extract import (  # noqa: E402
    ExtractionPlan,
    check_limits,
    extract_blocks,
    plan_extraction,
)
from curvlab.curvature.operators import (  # noqa: E402
    BlockDiagonalOperator,
    CurvatureOperator,
    curvature_operator,
    fisher,
    ggn,
    hessian,
)
from curvlab.curvature.verify import verify_operators  # noqa: E402
from curvlab.data import Batch, BatchStream, DataSpec, load_corpus  # noqa: E402
from curvlab.errors import CurvlabError  # noqa: E402
from curvlab.models import ModelConfig, build_model, lm_loss, math_attention, preset  # noqa: E402
from curvlab.optim import GaussNewton, GNStep  # noqa: E402
from curvlab.sharpness import (  # noqa: E402
    adam_preconditioner,
    checkpoint_lr,
    checkpoint_threshold,
    gradient_share,
    js_distances,
    loss_gradient,
    parameter_vector,
    preconditioned_sharpness,
    stability_threshold,
)
from curvlab.train import TrainConfig, TrainingDivergedError, TrainResult  # noqa: E402
from curvlab.trajectory import (  # noqa: E402
    Trajectory,
    find_checkpoints,
    read_trajectory,
    spectra_along,
)

__all__ = [
    "CompareResult",
    "adam_preconditioner",
    "checkpoint_lr",
    "checkpoint_threshold",
    "gradient_share",
    "js_distances",
    "loss_gradient",
    "parameter_vector",
    "preconditioned_sharpness",
    "stability_threshold",
    "GNStep",
    "GaussNewton",
    "optim",
    "compare",
    "distributed",
    "compare_checkpoints",
    "compare_preconditioners",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "train",
    "CouplingMap",
    "ExtractionPlan",
    "check_limits",
    "coupling_map",
    "extract_blocks",
    "plan_extraction",
    "store",
    "Batch",
    "BatchStream",
    "Block",
    "BlockDiagonalOperator",
    "CheckpointInfo",
    "CurvatureOperator",
    "CurvlabError",
    "DataSpec",
    "ModelConfig",
    "Part",
    "Partition",
    "__version__",
    "build_model",
    "curvature",
    "curvature_operator",
    "data",
    "errors",
    "fisher",
    "ggn",
    "hessian",
    "layer_partition",
    "linalg",
    "lm_loss",
    "load_checkpoint",
    "load_model",
    "load_corpus",
    "math_attention",
    "models",
    "param_partition",
    "partition",
    "preset",
    "save_checkpoint",
    "verify_operators",
    "Trajectory",
    "find_checkpoints",
    "read_trajectory",
    "spectra_along",
]
