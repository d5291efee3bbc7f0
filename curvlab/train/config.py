"""Training configuration (one frozen dataclass) and training errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from curvlab.curvature.precision import PRECISIONS
from curvlab.data.batches import WINDOWS
from curvlab.errors import ConfigError, CurvlabError
from curvlab.models.config import PRESETS, strict_from_dict
from curvlab.train.line_search import reference_grid
from curvlab.train.optimizers import INNER_OPTIMIZERS
from curvlab.train.schedules import SCHEDULES

BASELINES = ("adamw", "muon", "soap")
GN_METHODS = ("gn", "gn-prox", "layerwise-gn", "layerwise-gn-prox")
OPTIMIZERS = BASELINES + GN_METHODS
DTYPES = ("float32", "float64")
# fields that may change when a run is resumed (they do not change the trajectory, except
# max_steps, which also sets the length of a cosine schedule)
RESUMABLE_CHANGES = ("max_steps", "target_loss", "eval_every", "eval_batches",
                     "checkpoint_every", "out", "resume", "device", "init")


# the GN inner solvers: the first-order optimizers, or "cg", the exact GN step by conjugate
# gradients on GGN products (curvlab.train.gn.cg_direction)
INNER_SOLVERS = INNER_OPTIMIZERS + ("cg",)


class TrainingDivergedError(CurvlabError):
    """The loss or the parameters became NaN or Inf."""


CG_WARM_STARTS = ("point", "direction")


def check_cg(inner: Any, mode: str, tol: float, max_iter: int,
             warm_start: str = "point") -> None:
    """Refuse, in one line, a cg inner solve that cannot run: GN-prox (its inner problem is the
    cross-entropy of the linearized logits, not a quadratic), ``tol`` outside ``(0, 1)``,
    ``max_iter`` < 1. The tolerances are checked whatever the solver, so that a bad value is
    never silently ignored."""
    if inner == "cg" and mode == "prox":
        raise ConfigError("inner solver cg needs the quadratic GN model; GN-prox's inner problem "
                          "(the cross-entropy of the linearized logits) is not quadratic: use "
                          "gn / layerwise-gn or a first-order inner optimizer")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (
            math.isfinite(tol) and 0 < tol < 1):
        raise ConfigError(f"cg-tol must be a relative residual in (0, 1), got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"cg-max-iter must be an integer >= 1, got {max_iter}")
    if warm_start not in CG_WARM_STARTS:
        raise ConfigError(f"cg-warm-start must be one of {', '.join(CG_WARM_STARTS)}, got "
                          f"{warm_start!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run.

    optimizer: ``adamw``, ``muon``, ``soap`` (baselines, learning rate ``lr``, ``grad_accum``
    micro-batches per step) or ``gn``, ``gn-prox``, ``layerwise-gn``, ``layerwise-gn-prox``
    (``inner_steps`` steps of ``inner_optimizer`` at ``inner_lr`` per outer step, one fresh
    micro-batch each, then a line search on ``line_search_batches`` fresh micro-batches, by
    default as many as ``inner_steps``, over the step sizes ``1/√2^i``, ``i <
    line_search_range`` (5 for full GN / GN-prox, 10 for the layerwise methods, as the
    reference's two scripts) unless an explicit ``line_search`` grid is given;
    ``use_line_search=False``: step 1, no line-search batches). Model: ``init`` checkpoint,
    else a fresh ``preset`` (default ``tiny``) built
    with ``seed``. Data: ``data`` source, ``seq_len`` (default the model's), micro-batches of
    ``micro_batch_size`` sequences, batch ``i`` of the stream fixed by (``seed``, ``i``).
    ``precision`` (``fp32``, ``tf32``, ``bf16``; the last two with ``dtype="float32"``): the
    arithmetic of the baselines' forward passes and of the GN inner gradients
    (:mod:`curvlab.curvature.precision`); parameters, optimizer states, the line search and the
    evaluation stay in ``dtype``.
    """

    optimizer: str = "adamw"
    preset: str | None = None
    init: str | None = None
    data: str = "default"
    tokenizer: str = "auto"  # of text data: auto (the init checkpoint's, else byte), byte, PATH
    text_field: str = "text"  # jsonl field / Parquet column of the text
    seq_len: int | None = None
    micro_batch_size: int = 8
    windows: str = "random"
    seed: int = 0
    # baselines
    lr: float = 1e-3
    grad_accum: int = 1
    # optimizer hyper-parameters (baselines and the GN inner optimizer)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    momentum: float = 0.95
    ns_steps: int = 5
    shampoo_beta: float = 0.95
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    # Gauss-Newton
    inner_optimizer: str = "muon-adamw"
    inner_steps: int = 16
    inner_lr: float = 0.01
    cg_tol: float = 1e-6
    cg_max_iter: int = 100
    cg_warm_start: str = "point"
    warm_start: bool = True
    use_line_search: bool = True
    line_search: tuple[float, ...] | None = None
    line_search_range: int | None = None
    line_search_batches: int | None = None
    damping: float = 0.0
    # schedule and evaluation
    schedule: str = "cosine"
    warmup_steps: int = 0
    final_lr_frac: float = 0.0
    ema_decay: float = 0.0
    max_steps: int = 100
    target_loss: float | None = None
    eval_every: int = 10
    eval_batches: int = 4
    # output and execution
    checkpoint_every: int = 0
    out: str | None = None
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.line_search is not None:
            object.__setattr__(self, "line_search", tuple(float(s) for s in self.line_search))

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(self.optimizer in OPTIMIZERS,
              f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        check(self.inner_optimizer in INNER_SOLVERS,
              f"unknown inner optimizer {self.inner_optimizer!r}; valid: "
              f"{', '.join(INNER_SOLVERS)}")
        check_cg(self.inner_optimizer, self.mode if self.is_gn else "gn", self.cg_tol,
                 self.cg_max_iter, self.cg_warm_start)
        check(self.preset is None or self.preset in PRESETS,
              f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        check(self.schedule in SCHEDULES,
              f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        check(self.is_gn or self.schedule != "constant+inner-cosine",
              "schedule constant+inner-cosine needs a GN optimizer (it has inner steps)")
        check(self.windows in WINDOWS, f"unknown windows mode {self.windows!r}")
        check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        check(self.precision in PRECISIONS,
              f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        check(self.precision == "fp32" or self.dtype == "float32",
              f"precision {self.precision} needs dtype float32 (TF32 and bfloat16 autocast leave "
              "float64 untouched)")
        for name in ("inner_steps", "micro_batch_size", "grad_accum", "eval_every",
                     "eval_batches", "ns_steps", "precondition_frequency", "max_precond_dim"):
            check(getattr(self, name) >= 1,
                  f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "warmup_steps"):
            check(getattr(self, name) >= 0, f"{name.replace('_', '-')} must be >= 0")
        check(self.seq_len is None or self.seq_len >= 1, "seq-len must be >= 1")
        for name in ("lr", "inner_lr", "eps"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, f"{name.replace('_', '-')} must be > 0")
        for name in ("weight_decay", "grad_clip", "damping", "final_lr_frac"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{name.replace('_', '-')} must be >= 0")
        check(all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2,
              "betas must be two numbers in [0, 1)")
        check(0 <= self.momentum < 1 and 0 <= self.shampoo_beta < 1,
              "momentum and shampoo-beta must be in [0, 1)")
        check(0 <= self.ema_decay < 1, "ema-decay must be in [0, 1)")
        check(self.line_search is None or (bool(self.line_search) and all(
            math.isfinite(s) and s > 0 for s in self.line_search)),
              "line-search needs one or more positive step sizes")
        for name in ("line_search_range", "line_search_batches"):
            value = getattr(self, name)
            check(value is None or value >= 1,
                  f"{name.replace('_', '-')} must be >= 1, got {value}")
        check(self.line_search is None or self.line_search_range is None,
              "give --line-search (explicit step sizes) or --line-search-range, not both")
        check(not self.resume or self.out is not None, "--resume needs --out")

    @property
    def is_gn(self) -> bool:
        return self.optimizer in GN_METHODS

    @property
    def layerwise(self) -> bool:
        return self.optimizer.startswith("layerwise")

    @property
    def line_search_grid(self) -> tuple[float, ...]:
        """The step sizes tried: the explicit ``line_search`` grid, else ``1/√2^i`` for ``i <
        line_search_range`` (default 5, layerwise 10)."""
        if self.line_search is not None:
            return self.line_search
        return reference_grid(self.line_search_range or (10 if self.layerwise else 5))

    @property
    def ls_batches(self) -> int:
        """Line-search micro-batches per outer step (0 without a line search)."""
        if not self.is_gn or not self.use_line_search:
            return 0
        return self.line_search_batches or self.inner_steps

    @property
    def mode(self) -> str:
        """``prox`` for the prox-linear variants, else ``gn``."""
        return "prox" if self.optimizer.endswith("prox") else "gn"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["line_search"] = None if self.line_search is None else list(self.line_search)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return strict_from_dict(cls, d, "train config")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters of the chosen optimizer (stored in checkpoints)."""
        shared = ["betas", "eps", "weight_decay", "grad_clip", "schedule", "warmup_steps",
                  "final_lr_frac", "ema_decay", "max_steps", "micro_batch_size"]
        if self.is_gn and self.inner_optimizer == "cg":  # no lr, schedule or moments apply
            keys = ["inner_optimizer", "inner_steps", "cg_tol", "cg_max_iter", "cg_warm_start",
                    "warm_start",
                    "use_line_search", "line_search", "line_search_range",
                    "line_search_batches", "damping"]
            shared = ["max_steps", "micro_batch_size", "ema_decay"]
        elif self.is_gn:
            keys = ["inner_optimizer", "inner_steps", "inner_lr", "warm_start",
                    "use_line_search", "line_search", "line_search_range",
                    "line_search_batches", "damping"]
            if self.inner_optimizer != "adamw":
                keys += ["momentum"] + (["ns_steps"] if self.inner_optimizer != "sgd" else [])
        else:
            keys = ["lr", "grad_accum"]
            keys += {"adamw": [], "muon": ["momentum", "ns_steps"],
                     "soap": ["shampoo_beta", "precondition_frequency", "max_precond_dim"]
                     }[self.optimizer]
        d = self.to_dict()
        if self.is_gn:  # the resolved line search: the grid tried and its micro-batches
            d["line_search"] = list(self.line_search_grid) if self.use_line_search else []
            d["line_search_batches"] = self.ls_batches
        return {k: d[k] for k in keys + shared}

    def changes_for_resume(self, stored: dict[str, Any]) -> list[str]:
        """Fields that differ from a stored config and may not change on resume."""
        mine = self.to_dict()
        # a field added since the stored run was written counts with its default value
        defaults = {f.name: f.default for f in dataclasses.fields(self)
                    if f.default is not dataclasses.MISSING}
        return [k for k in mine if k not in RESUMABLE_CHANGES
                and stored.get(k, defaults.get(k)) != mine[k]]
