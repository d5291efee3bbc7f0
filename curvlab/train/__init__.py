"""Training: baselines (AdamW, Muon, SOAP) and Gauss-Newton methods (full / layerwise,
GN / GN-prox-linear) writing curvlab checkpoints; see docs/train.md.

```python
from curvlab.train import TrainConfig, train

result = train(TrainConfig(optimizer="gn", preset="tiny", max_steps=20, out="runs/gn"))
```
"""

from curvlab.train.config import (
    BASELINES,
    GN_METHODS,
    INNER_SOLVERS,
    OPTIMIZERS,
    TrainConfig,
    TrainingDivergedError,
)
from curvlab.train.gauss_newton import GaussNewton, GNStep, as_batch, mean_loss
from curvlab.train.gn import (
    PASS_KINDS,
    Direction,
    InnerGradient,
    cg_direction,
    inner_gradient,
    linearized_vjp,
    logits_function,
    solve_direction,
)
from curvlab.train.line_search import DEFAULT_GRID, LineSearchResult, line_search, reference_grid
from curvlab.train.loop import TrainResult, train
from curvlab.train.optimizers import (
    INNER_OPTIMIZERS,
    SOAP,
    Muon,
    build_optimizer,
    hidden_matrices,
    newton_schulz,
)
from curvlab.train.schedules import SCHEDULES, lr_factor

__all__ = [
    "BASELINES",
    "DEFAULT_GRID",
    "Direction",
    "GNStep",
    "GaussNewton",
    "GN_METHODS",
    "INNER_OPTIMIZERS",
    "INNER_SOLVERS",
    "InnerGradient",
    "LineSearchResult",
    "Muon",
    "OPTIMIZERS",
    "PASS_KINDS",
    "SCHEDULES",
    "SOAP",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "as_batch",
    "build_optimizer",
    "cg_direction",
    "hidden_matrices",
    "inner_gradient",
    "line_search",
    "linearized_vjp",
    "logits_function",
    "lr_factor",
    "mean_loss",
    "newton_schulz",
    "reference_grid",
    "solve_direction",
    "train",
]
