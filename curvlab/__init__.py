"""curvlab: exact curvature analysis for transformer language models."""

__version__ = "0.1.0"

from curvlab.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint  # noqa: E402
from curvlab.curvature.blocks import Partition, layer_partition, param_partition, partition  # noqa: E402
from curvlab.data import Batch, BatchStream, DataSpec, load_corpus  # noqa: E402
from curvlab.errors import CurvlabError  # noqa: E402
from curvlab.models import ModelConfig, build_model, lm_loss, math_attention, preset  # noqa: E402

__all__ = [
    "Batch",
    "BatchStream",
    "CheckpointInfo",
    "CurvlabError",
    "DataSpec",
    "ModelConfig",
    "Partition",
    "__version__",
    "build_model",
    "layer_partition",
    "lm_loss",
    "load_checkpoint",
    "load_corpus",
    "math_attention",
    "param_partition",
    "partition",
    "preset",
    "save_checkpoint",
]
