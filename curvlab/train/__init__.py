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
    OPTIMIZERS,
    TrainConfig,
    TrainingDivergedError,
)
from curvlab.train.gn import (
    Direction,
    InnerGradient,
    inner_gradient,
    linearized_vjp,
    logits_function,
    solve_direction,
)
from curvlab.train.line_search import DEFAULT_GRID, LineSearchResult, line_search
from curvlab.train.loop import TrainResult, hidden_matrices, mean_loss, train
from curvlab.train.optimizers import (
    INNER_OPTIMIZERS,
    SOAP,
    Muon,
    build_optimizer,
    newton_schulz,
)
from curvlab.train.schedules import SCHEDULES, lr_factor

__all__ = [
    "BASELINES",
    "DEFAULT_GRID",
    "Direction",
    "GN_METHODS",
    "INNER_OPTIMIZERS",
    "InnerGradient",
    "LineSearchResult",
    "Muon",
    "OPTIMIZERS",
    "SCHEDULES",
    "SOAP",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "build_optimizer",
    "hidden_matrices",
    "inner_gradient",
    "line_search",
    "linearized_vjp",
    "logits_function",
    "lr_factor",
    "mean_loss",
    "newton_schulz",
    "solve_direction",
    "train",
]
