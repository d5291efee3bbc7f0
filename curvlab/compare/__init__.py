"""Full vs layerwise (and other) Gauss-Newton preconditioners: directions and metrics.

```python
from curvlab.compare import compare_preconditioners

result = compare_preconditioners(model, batches, val_batches, dampings=(1e-3, 1e-2))
result.ratio("layerwise", 1e-3)          # predicted decrease at the best step, vs full GN
```

Modules: :mod:`~curvlab.compare.problem` (G, g, loss, dense caches),
:mod:`~curvlab.compare.directions` (preconditioners, ``d = −P⁻¹ g``),
:mod:`~curvlab.compare.kfac` (K-FAC factors), :mod:`~curvlab.compare.per_token` (per-token
pullbacks: diagonals of G and F, Shampoo's factors), :mod:`~curvlab.compare.metrics` (spectra,
off-diagonal energy), :mod:`~curvlab.compare.api` (the comparison and its results),
:mod:`~curvlab.compare.report` (text table), :mod:`~curvlab.compare.h5` (``/compare`` in
HDF5). Figures: :func:`curvlab.plot.compare_figures` (results know no figures). See
docs/compare.md.
"""

from curvlab.compare.api import (
    DEFAULT_DAMPINGS,
    DEFAULT_PRECONDITIONERS,
    STEP_GRID,
    CheckpointComparison,
    CompareResult,
    check_same_model,
    compare_checkpoints,
    compare_preconditioners,
)
from curvlab.compare.directions import (
    PRECONDITIONERS,
    Preconditioner,
    PreconditionerBuilder,
    SolveInfo,
    direction,
)
from curvlab.compare.errors import CompareError, SingularPreconditionerError
from curvlab.compare.h5 import read_compare, write_compare
from curvlab.compare.kfac import KFACFactors, LinearLayer, kfac_factors, linear_layers
from curvlab.compare.metrics import (
    DirectionMetrics,
    OffDiagonalEnergy,
    Spectrum,
    measure_direction,
    off_diagonal_energy,
    pencil_ritz,
    preconditioned_spectrum,
)
from curvlab.compare.per_token import (
    DiagonalEstimate,
    DiagonalInfo,
    empirical_statistics,
    ggn_diagonal,
    rotated_diagonal,
)
from curvlab.compare.problem import Curvature, Problem
from curvlab.compare.report import format_evolution, format_table

__all__ = [
    "DEFAULT_DAMPINGS",
    "DEFAULT_PRECONDITIONERS",
    "PRECONDITIONERS",
    "STEP_GRID",
    "CheckpointComparison",
    "CompareError",
    "CompareResult",
    "Curvature",
    "DiagonalEstimate",
    "DiagonalInfo",
    "DirectionMetrics",
    "KFACFactors",
    "LinearLayer",
    "OffDiagonalEnergy",
    "Preconditioner",
    "PreconditionerBuilder",
    "Problem",
    "SingularPreconditionerError",
    "SolveInfo",
    "Spectrum",
    "check_same_model",
    "compare_checkpoints",
    "compare_preconditioners",
    "direction",
    "empirical_statistics",
    "format_evolution",
    "format_table",
    "ggn_diagonal",
    "kfac_factors",
    "linear_layers",
    "measure_direction",
    "off_diagonal_energy",
    "pencil_ritz",
    "preconditioned_spectrum",
    "read_compare",
    "rotated_diagonal",
    "write_compare",
]
