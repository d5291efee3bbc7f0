"""One outer step of (layerwise) Gauss-Newton / GN-prox-linear, as an optimizer object.

:class:`GaussNewton` is the one implementation of the outer step: ``curvlab train`` runs its GN
methods through it, and users call it from their own training loops (it is exported as
``curvlab.optim.GaussNewton``; see docs/optim.md).

One call ``step(inner_batches, line_search_batches)`` at the model's parameters ``θ_t``:

1. **Inner solve** (:func:`curvlab.train.gn.solve_direction`): the inner optimizer minimizes the
   inner loss ``m(Δ)`` of the network linearized at ``θ_t`` (:mod:`curvlab.train.gn`) over its
   variables ``θ' = θ_t + Δ``, one step per inner micro-batch, for every block in turn (one block
   holding every trainable parameter: full GN; the layer partition: layerwise GN, every block
   from the same ``θ_t``, the solutions merged).
2. **Line search**: ``Δ_t = θ' − θ_t``; every candidate ``α`` (default ``1/√2^i``,
   ``i = 0 … R−1``) is scored by the true mean loss at ``θ_t + α Δ_t`` on the line-search
   micro-batches; the lowest wins, ties to the larger step.
3. **Update**: ``θ_{t+1} = θ_t + α_t Δ_t`` (in place, on the model's parameters).
4. **Warm start**: the inner variables are *kept*: the next solve starts from the same
   ``θ' = θ_t + Δ_t``, i.e. from ``Δ = θ' − θ_{t+1} = (1 − α_t) Δ_t`` at the new linearization
   point, with the inner optimizer's state (moments, step counts) kept. ``warm_start=False``:
   every solve starts at ``Δ = 0`` with a fresh optimizer state.

This follows the authors' code (natalieabreu/full-gauss-newton): the outer loop of ``main`` in
``EasyLM/models/llama/llama_train_gn.py`` (``inner_state`` carried across outer steps and stored
as ``warmstart_params``; ``reset_start`` = ``warm_start=False``; the line search over
``1/sqrt(2)**i for i in range(ls_range)``, ``ls_range`` 5, each candidate scored on
``inner_loop_iter`` fresh batches drawn after the inner ones, ``min`` over the losses) and the
outer loop of ``llama_train_gn_layerwise.py`` (one persistent state per layer, merged
direction, one global line search, ``ls_range`` 10).

Losses are mean token cross-entropies over the non-ignored targets of each micro-batch; a list
of micro-batches scores the mean of their means. Under ``torchrun`` every rank passes its rows of
each micro-batch: token counts, losses and inner gradients are summed over the ranks (one
collective each), so the model, the inner variables and every decision are the same on every
rank and equal a single process on the whole micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlab import distributed
from curvlab.curvature.blocks import Partition, partition
from curvlab.curvature.model_fn import LogitsFn, default_logits_fn, extract_logits
from curvlab.curvature.precision import check_precision
from curvlab.data.batches import Batch
from curvlab.errors import ConfigError, CurvlabError
from curvlab.train.config import INNER_SOLVERS, TrainConfig, TrainingDivergedError, check_cg
from curvlab.train.gn import MODES, cg_direction, count_passes, solve_direction, token_counts
from curvlab.train.line_search import line_search, reference_grid
from curvlab.train.optimizers import build_optimizer, hidden_matrices
from curvlab.train.schedules import SCHEDULES, lr_factor

BatchLike = Batch | tuple | Mapping[str, torch.Tensor]
Tensors = dict[str, torch.Tensor]
# the reference's ``ls_range``: 5 in llama_train_gn.py (full GN, GN-prox), 10 in
# llama_train_gn_layerwise.py
LINE_SEARCH_RANGE = {"full": 5, "layerwise": 10}


@dataclass(frozen=True)
class GNStep:
    """What one outer step did.

    loss: mean ``L(θ_t)`` over the inner micro-batches. step_size: the chosen ``α_t``.
    line_search_steps / line_search_losses: every candidate and its score (empty without a
    line search). predicted_decrease: ``L(θ_t) − m(Δ)`` on the last inner micro-batch of each
    block's solve, averaged over the blocks. inner_losses: ``L(θ_t)`` per inner micro-batch;
    inner_model_losses: ``m(Δ)`` per inner step of the first block (at the Δ the gradient was
    taken at). lr: the inner learning rate of the first inner step. step: the outer step's
    0-based index.

    Cost (token counts are of the whole micro-batches, summed over ``torchrun`` ranks):
    tokens_solve: non-ignored target tokens of the inner micro-batches (each counted once; how
    often the solve went over them is in ``passes``). tokens_line_search: target tokens of the
    line-search micro-batches, each counted once however many candidates score it (0 without a
    line search): solve and line-search tokens charged separately, once per micro-batch read, as
    the reference's third-party fork counts them (gmbabreu/full-gauss-newton,
    ``EasyLM/training_progress.py``); the candidates' re-reads are ``passes["loss"]``.
    passes: ``{kind: count}`` over :data:`curvlab.train.gn.PASS_KINDS`, each count one pass
    over one micro-batch: ``loss`` (forward only: the line search), ``gradient`` (forward +
    backward), ``linearization`` (the logits' ``torch.func.linearize`` on a micro-batch,
    traced once and reused by products), ``inner_gradient`` (one linearized-model gradient: a
    forward pass carrying the tangent and one VJP; the first-order inner solvers take one per
    inner step and block), ``ggn_product`` (one GGN product on one micro-batch; the ``cg``
    solver). cg_iterations /
    cg_residual / cg_converged (``cg`` solver only, else None): CG iterations (the largest over
    the blocks), the final relative residual ``‖(G + λI)Δ + g‖ / ‖g‖`` (the largest over the
    blocks), and whether every block reached ``cg_tol``.
    """

    step: int
    loss: float
    step_size: float
    line_search_steps: tuple[float, ...]
    line_search_losses: tuple[float, ...]
    predicted_decrease: float
    inner_losses: tuple[float, ...]
    inner_model_losses: tuple[float, ...]
    lr: float
    tokens_solve: int = 0
    tokens_line_search: int = 0
    passes: Mapping[str, int] = field(default_factory=dict)
    cg_iterations: int | None = None
    cg_residual: float | None = None
    cg_converged: bool | None = None


@dataclass(frozen=True)
class _Item:
    """A normalized micro-batch: shifted inputs/targets and the optional attention mask."""

    batch: Batch
    attention_mask: torch.Tensor | None = None


def as_batch(obj: BatchLike, ignore_index: int = -100) -> tuple[Batch, torch.Tensor | None]:
    """``(Batch, attention_mask or None)`` from a micro-batch as users have them.

    - a :class:`curvlab.Batch`: ``targets[:, t]`` is the token predicted from
      ``inputs[:, :t+1]`` (already shifted: curvlab's convention);
    - a pair ``(inputs, targets)`` of ``[B, T]`` integer tensors, already shifted the same way;
    - a Hugging Face style mapping with ``input_ids`` and optional ``labels`` and
      ``attention_mask``. ``labels`` are *unshifted*, as Hugging Face models take them (the model
      shifts internally: logits at position ``t`` predict ``labels[:, t+1]``); here they are
      shifted once: ``targets[:, t] = labels[:, t+1]``, the last position ignored, so the loss is
      exactly the model's own ``loss`` output. Without ``labels``, ``labels = input_ids`` with the
      positions where ``attention_mask == 0`` ignored (padding never counts). The mask is passed
      to the model (``attention_mask=``) in every forward pass.
    """
    mask = None
    if isinstance(obj, Batch):
        inputs, targets = obj.inputs, obj.targets
    elif isinstance(obj, Mapping):
        if "input_ids" not in obj:
            raise CurvlabError(f"a dict batch needs 'input_ids' (got keys {sorted(obj)})")
        inputs = obj["input_ids"]
        mask = obj.get("attention_mask")
        labels = obj.get("labels")
        if labels is None:
            labels = inputs if mask is None else inputs.masked_fill(mask == 0, ignore_index)
        if not isinstance(labels, torch.Tensor) or labels.shape != inputs.shape:
            raise CurvlabError("batch 'labels' must be a tensor of the shape of 'input_ids'")
        targets = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)],
                            dim=-1)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        inputs, targets = obj
    else:
        raise CurvlabError(f"a batch must be a curvlab.Batch, an (inputs, targets) pair or a dict "
                           f"with 'input_ids', not {type(obj).__name__}")
    for name, t in (("inputs", inputs), ("targets", targets), ("attention_mask", mask)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.ndim != 2:
            raise CurvlabError(f"batch {name} must be a 2-D integer tensor [batch, tokens]")
    if targets.shape != inputs.shape or (mask is not None and mask.shape != inputs.shape):
        raise CurvlabError(f"batch inputs {tuple(inputs.shape)} and targets "
                           f"{tuple(targets.shape)} (and attention_mask) must have one shape")
    if isinstance(obj, Batch):
        return obj, None
    return Batch(inputs, targets.long()), mask


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
            ) -> torch.Tensor:
    """Sum of the token cross-entropies over the targets that are not ``ignore_index``."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=ignore_index, reduction="sum")


def mean_loss(model: nn.Module, params: Mapping[str, torch.Tensor] | None,
              batches: Sequence[Batch], *,
              logits_fns: Sequence[LogitsFn | None] | LogitsFn | None = None,
              ignore_index: int = -100) -> float:
    """Mean over ``batches`` of the mean token cross-entropy at ``params`` (the model's own
    parameters if None; parameters missing from ``params`` keep their values); no gradients.
    ``logits_fns``: one logits function for all batches or one per batch (None: the model's
    forward).

    Under ``torchrun`` the batches are this rank's rows of each batch: token sums and counts
    are summed over ranks (one collective), so every rank gets the loss of the whole batches.
    """
    fns = (list(logits_fns) if isinstance(logits_fns, (list, tuple))
           else [logits_fns] * len(batches))
    sums, counts = [], []
    with torch.no_grad():
        for b, fn in zip(batches, fns):
            if params is None and fn is None:
                logits = extract_logits(model(b.inputs))
            else:
                logits = (fn or default_logits_fn)(
                    model, dict(model.named_parameters()) if params is None else params,
                    b.inputs)
            sums.append(float(ce_sum(logits, b.targets, ignore_index)))
            counts.append(int((b.targets != ignore_index).sum()))
    totals = distributed.sum_scalars(*sums, *counts)
    m = len(batches)
    return sum(s / c if c else math.nan for s, c in zip(totals[:m], totals[m:])) / m


def _with_mask(fn: LogitsFn | None, mask: torch.Tensor | None) -> LogitsFn | None:
    """The logits function of one micro-batch: the user's, or ``model(inputs,
    attention_mask=mask)`` at the given parameters."""
    if mask is None:
        return fn
    if fn is not None:
        raise CurvlabError("a batch with an attention_mask cannot be combined with logits_fn; "
                           "apply the mask inside logits_fn")
    return lambda model, params, inputs: default_logits_fn(model, params, inputs,
                                                           attention_mask=mask)


def _is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


class GaussNewton:
    """Gauss-Newton (``mode="gn"``) or GN-prox-linear (``mode="prox"``) outer steps on ``model``'s
    trainable parameters (``requires_grad``), full or layerwise; see the module docstring for
    the algorithm and the reference it follows.

    model: any ``nn.Module`` whose forward maps ``[B, T]`` token ids to logits ``[B, T, V]`` (a
    tensor, a tuple starting with one, or an object with ``.logits``), or ``logits_fn(model,
    params, inputs)`` to say how. A Hugging Face ``transformers`` model is prepared by
    :func:`curvlab.models.hf.prepare_hf_model` (its family's eager attention, which forward-mode
    AD needs; float64 throughout for float64 parameters; checked against its own forward).
    blocks: ``None`` (full GN: one block), ``"layer"`` (layerwise GN: embedding / each
    transformer layer / final norm + head), a :class:`curvlab.Partition`, or a list of block
    specifications ``[name=]GLOB`` (:func:`curvlab.partition`). Blocks hold whole parameters;
    trainable parameters in no block stay fixed.
    inner: ``"muon-adamw"`` (Muon on the hidden matrices of the transformer layers, AdamW on the
    rest), ``"adamw"``, ``"sgd"`` (heavy ball), or a callable ``params -> torch.optim.Optimizer``
    given the list of inner variables (one tensor per trainable parameter, in
    ``named_parameters()`` order). The learning rate of every parameter group is set to
    ``inner_lr × schedule`` before every inner step. ``"cg"``: the exact GN step instead, ``(G
    + λI) Δ = −g`` solved by conjugate gradients on exact GGN products to the relative residual
    ``cg_tol`` (at most ``cg_max_iter`` iterations per block), with ``G`` and ``g`` of the mean
    over the inner micro-batches of their mean token cross-entropies, the objective the step
    reports and the line search scores (:func:`curvlab.train.gn.cg_direction`); every block
    solves its own diagonal block, then one line search on the merged step. No learning rate,
    schedule, weight decay, momentum or clipping applies to it (``GNStep.lr`` is 0). Its warm
    start is the reference's rule for the inner variables (module docstring, step 4): the next
    solve starts at the previous solution's point ``θ' = θ_{t−1} + Δ_{t−1}``, i.e. ``x0 = (1 −
    α_{t−1}) Δ_{t−1}`` (``0`` after a full step) with ``cg_warm_start="point"`` (default);
    ``cg_warm_start="direction"`` starts from ``x0 = Δ_{t−1}`` instead (a deviation, measured in
    docs/optim.md); ``warm_start=False``: ``x0 = 0``. ``mode="prox"`` refuses cg (the
    prox-linear inner problem is not quadratic).
    schedule: ``"constant"`` (default here), ``"cosine"`` (one global cosine over all
    ``total_steps × inner steps`` inner steps; ``curvlab train``'s default) or
    ``"constant+inner-cosine"``; see :mod:`curvlab.train.schedules`.
    line_search: True (candidates ``1/√2^i``, ``i < line_search_range``; the range defaults to
    5 with one block and 10 with several, as the reference's two scripts), False (``α = 1``, no
    scoring batches needed), or an explicit sequence of step sizes.
    damping: Levenberg-Marquardt ``λ`` of the inner problem (0, as in the paper).
    grad_clip: inner gradients clipped to this global norm per block (0: off).
    precision: arithmetic of the inner gradients (``fp32``, ``tf32``, ``bf16``;
    :mod:`curvlab.curvature.precision`); the line search scores the true loss in the
    parameters' dtype.
    Defaults equal :class:`curvlab.TrainConfig`'s, so ``curvlab train --optimizer gn`` and this
    object take the same steps.
    """

    def __init__(
        self, model: nn.Module, *, mode: str = "gn",
        blocks: None | str | Partition | Sequence[str] = None,
        inner: str | Callable[[list[torch.Tensor]], torch.optim.Optimizer] = "muon-adamw",
        inner_lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-3, momentum: float = 0.95, ns_steps: int = 5,
        grad_clip: float = 1.0, damping: float = 0.0,
        line_search: bool | Sequence[float] = True, line_search_range: int | None = None,
        warm_start: bool = True, schedule: str = "constant", total_steps: int | None = None,
        warmup_steps: int = 0, final_lr_frac: float = 0.0,
        logits_fn: LogitsFn | None = None, ignore_index: int = -100, precision: str = "fp32",
        cg_tol: float = 1e-6, cg_max_iter: int = 100, cg_warm_start: str = "point",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown GN mode {mode!r}; expected one of {', '.join(MODES)}")
        if isinstance(inner, str) and inner not in INNER_SOLVERS:
            raise ConfigError(f"unknown inner optimizer {inner!r}; valid: "
                              f"{', '.join(INNER_SOLVERS)}, or a callable")
        check_cg(inner, mode, cg_tol, cg_max_iter, cg_warm_start)
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if schedule == "cosine" and not total_steps:
            raise ConfigError("schedule 'cosine' needs total_steps (outer steps of the run)")
        for name, value in (("inner_lr", inner_lr), ("eps", eps)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be > 0, got {value}")
        for name, value in (("damping", damping), ("grad_clip", grad_clip),
                            ("weight_decay", weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be >= 0, got {value}")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model has no trainable parameters (requires_grad=True)")
        if _is_transformers_model(model):
            from curvlab.models.hf import prepare_hf_model

            prepare_hf_model(model, float64=next(model.parameters()).dtype == torch.float64)
        self.model, self.mode = model, mode
        self.blocks = self._blocks(model, blocks, trainable)
        self.names = [n for block in self.blocks for n in block]
        if line_search is True:
            R = line_search_range or LINE_SEARCH_RANGE["full" if len(self.blocks) == 1
                                                        else "layerwise"]
            self.line_search_grid: tuple[float, ...] = reference_grid(R)
        elif line_search is False:
            self.line_search_grid = ()
        else:
            self.line_search_grid = tuple(float(s) for s in line_search)
            if not self.line_search_grid or not all(
                    math.isfinite(s) and s > 0 for s in self.line_search_grid):
                raise ConfigError("line_search needs one or more positive step sizes")
        self.inner, self.inner_lr = inner, float(inner_lr)
        self.hyper = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                          momentum=momentum, ns_steps=ns_steps)
        self.grad_clip, self.damping, self.warm_start = grad_clip, damping, warm_start
        self.schedule, self.total_steps = schedule, total_steps
        self.warmup_steps, self.final_lr_frac = warmup_steps, final_lr_frac
        self.logits_fn, self.ignore_index = logits_fn, ignore_index
        self.precision = check_precision(precision, next(model.parameters()).dtype)
        self.steps = 0
        self.cg_tol, self.cg_max_iter = float(cg_tol), int(cg_max_iter)
        self.cg_warm_start = cg_warm_start
        # the inner variables θ' of the first-order inner solvers; cg keeps its last Δ instead
        self.point: Tensors = ({} if inner == "cg" else
                               {n: model.get_parameter(n).detach().clone() for n in self.names})
        self.cg_delta: Tensors | None = None
        self.optimizer = self._new_optimizer()

    @classmethod
    def from_config(cls, model: nn.Module, cfg: TrainConfig) -> GaussNewton:
        """The object ``curvlab train`` steps for a GN method of ``cfg``."""
        return cls(model, mode=cfg.mode, blocks="layer" if cfg.layerwise else None,
                   inner=cfg.inner_optimizer, inner_lr=cfg.inner_lr, betas=cfg.betas,
                   eps=cfg.eps, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                   ns_steps=cfg.ns_steps, grad_clip=cfg.grad_clip, damping=cfg.damping,
                   line_search=(cfg.line_search_grid if cfg.use_line_search else False),
                   warm_start=cfg.warm_start, schedule=cfg.schedule, total_steps=cfg.max_steps,
                   warmup_steps=cfg.warmup_steps, final_lr_frac=cfg.final_lr_frac,
                   precision=cfg.precision, cg_tol=cfg.cg_tol, cg_max_iter=cfg.cg_max_iter,
                   cg_warm_start=cfg.cg_warm_start)

    @staticmethod
    def _blocks(model: nn.Module, spec: Any, trainable: list[str]) -> list[list[str]]:
        if spec is None:
            return [trainable]
        part = spec if isinstance(spec, Partition) else partition(model, spec)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        out = []
        for block in part:
            for p in block.parts:
                if p.param not in shapes:
                    raise ConfigError(f"block {block.name!r}: the model has no parameter "
                                      f"{p.param!r}")
                if p.size != math.prod(shapes[p.param]):
                    raise ConfigError(f"block {block.name!r} holds a slice of {p.param}; GN "
                                      "blocks hold whole parameters")
            names = [n for n in block.params if n in set(trainable)]
            if names:
                out.append(names)
        if not out:
            raise ConfigError("no block holds a trainable parameter")
        return out

    def _new_optimizer(self) -> torch.optim.Optimizer | None:
        if self.inner == "cg":
            return None
        if callable(self.inner):
            opt = self.inner([self.point[n] for n in self.names])
            if not isinstance(opt, torch.optim.Optimizer):
                raise ConfigError("inner(params) must return a torch.optim.Optimizer")
            return opt
        hidden: list[str] = []
        if self.inner == "muon-adamw":
            try:
                hidden = [n for n in hidden_matrices(self.model) if n in self.point]
            except ConfigError:
                raise ConfigError(
                    "inner 'muon-adamw' applies Muon to the matrices of the transformer layers, "
                    "and this model has none that curvlab recognizes ('layers.N.' / 'h.N.' "
                    "names); use inner='adamw', 'sgd' or a callable") from None
        return build_optimizer(self.inner, self.point, hidden, lr=self.inner_lr, **self.hyper)

    def lr(self, step: int, inner: int, inner_steps: int) -> float:
        """Inner learning rate at inner step ``inner`` of outer step ``step``."""
        return self.inner_lr * lr_factor(self.schedule, step, self.total_steps or 1,
                                         inner=inner, inner_steps=inner_steps,
                                         warmup=self.warmup_steps, final=self.final_lr_frac)

    def _items(self, batches: Iterable[BatchLike], what: str) -> list[_Item]:
        if isinstance(batches, (Batch, Mapping)) or (
                isinstance(batches, tuple) and len(batches) == 2
                and all(isinstance(t, torch.Tensor) for t in batches)):
            raise CurvlabError(f"{what} must be a list of micro-batches, not one batch")
        device = next(self.model.parameters()).device
        items = []
        for i, b in enumerate(batches):
            batch, mask = as_batch(b, self.ignore_index)
            for t in (batch.inputs, batch.targets, mask):
                if t is not None and t.device != device:
                    raise CurvlabError(f"{what}[{i}] is on {t.device}, the model on {device}; "
                                       "move the batch with .to(device)")
            items.append(_Item(batch, mask))
        return items

    def step(self, inner_batches: Sequence[BatchLike],
             line_search_batches: Sequence[BatchLike] = ()) -> GNStep:
        """One outer step (module docstring): the inner solve over ``inner_batches`` (one inner
        step per micro-batch, every block), the line search scored on ``line_search_batches``
        (the reference draws as many fresh micro-batches as the inner solve used), and the
        update of the model's parameters in place.

        Raises :class:`~curvlab.errors.CurvlabError` for bad input (no inner batches, batches on
        another device, no line-search batches while the line search is on, a micro-batch with
        no target tokens) and :class:`~curvlab.train.TrainingDivergedError` when a loss or the
        direction is NaN/Inf; in every such case the model's parameters are unchanged (after a
        divergence the warm start is reset: the next solve starts at ``Δ = 0``).
        """
        inner = self._items(inner_batches, "inner_batches")
        scored = self._items(line_search_batches, "line_search_batches")
        if not inner:
            raise CurvlabError("step() needs at least one inner micro-batch")
        searching = len(self.line_search_grid) > 0
        if searching and not scored:
            raise CurvlabError("the line search needs line_search_batches (fresh micro-batches; "
                               "or line_search=False for α = 1)")
        counts = token_counts([i.batch for i in inner + scored], self.ignore_index)
        if any(c == 0 for c in counts):
            raise CurvlabError("a micro-batch has no target tokens that are not ignored")
        t, n = self.steps, len(inner)
        params = dict(self.model.named_parameters())
        theta = {k: p.detach() for k, p in params.items()}  # θ_t (shared storage)
        if not self.warm_start:
            self._reset()
        fns = [_with_mask(self.logits_fn, i.attention_mask) for i in inner]
        try:
            if self.inner == "cg":
                d = cg_direction(
                    self.model, theta, [i.batch for i in inner], self.blocks,
                    damping=self.damping, tol=self.cg_tol, max_iter=self.cg_max_iter,
                    x0=self.cg_delta, ignore_index=self.ignore_index, logits_fns=fns,
                    precision=self.precision)
            else:
                d = solve_direction(
                    self.model, theta, self.point, self.optimizer, [i.batch for i in inner],
                    self.blocks, mode=self.mode, damping=self.damping, clip=self.grad_clip,
                    lr=lambda k: self.lr(t, k, n), ignore_index=self.ignore_index,
                    logits_fns=fns, precision=self.precision)
        except TrainingDivergedError:
            self._reset()
            raise
        if not (math.isfinite(d.loss) and all(torch.isfinite(d.delta[k]).all()
                                               for k in self.names)):
            self._reset()
            raise TrainingDivergedError(
                f"GN step {t + 1}: the loss at θ_t or the inner solution is NaN or Inf (loss "
                f"{d.loss:.4g}); the model's parameters are unchanged and the warm start is reset")
        if searching:
            fns = [_with_mask(self.logits_fn, i.attention_mask) for i in scored]

            def score(alpha: float) -> float:
                trial = {**theta, **{k: theta[k] + alpha * d.delta[k] for k in self.names}}
                return mean_loss(self.model, trial, [i.batch for i in scored], logits_fns=fns,
                                 ignore_index=self.ignore_index)

            try:
                ls = line_search(score, self.line_search_grid)
            except CurvlabError as e:
                self._reset()
                raise TrainingDivergedError(f"GN step {t + 1}: {e}; the model's parameters are "
                                            "unchanged and the warm start is reset") from None
            alpha, steps, losses = ls.step, self.line_search_grid, ls.losses
        else:
            alpha, steps, losses = 1.0, (), ()
        with torch.no_grad():
            for k in self.names:
                params[k].add_(d.delta[k], alpha=alpha)
        # warm start as the reference: the inner variables θ' stay where the solve left them;
        # for cg that point is θ_t + Δ_t, so the next solve (at θ_{t+1}) starts at (1 − α) Δ_t
        if self.inner == "cg" and self.warm_start:
            keep = 1.0 if self.cg_warm_start == "direction" else 1.0 - alpha
            self.cg_delta = (None if keep == 0.0 else
                             {k: keep * d.delta[k].detach() for k in self.names})
        self.steps += 1
        passes = dict(d.passes)
        passes["loss"] = passes.get("loss", 0) + len(steps) * len(scored)
        return GNStep(t, d.loss, alpha, tuple(steps), tuple(losses), d.decrease,
                      d.inner_losses, d.inner_model_losses,
                      0.0 if self.inner == "cg" else self.lr(t, 0, n),
                      tokens_solve=sum(counts[:n]),
                      tokens_line_search=sum(counts[n:]) if steps else 0,
                      passes=count_passes(**passes), cg_iterations=d.cg_iterations,
                      cg_residual=d.cg_residual, cg_converged=d.cg_converged)

    def _reset(self) -> None:
        """Inner variables back to the model's parameters, fresh inner optimizer state (cg:
        the next solve from ``x0 = 0``)."""
        with torch.no_grad():
            for k, p in self.point.items():
                p.copy_(self.model.get_parameter(k))
        self.optimizer = self._new_optimizer()
        self.cg_delta = None

    def state_dict(self) -> dict[str, Any]:
        """The warm-start point ``θ'``, the inner optimizer's state (None for cg), cg's warm
        start ``cg_delta`` (the next solve's ``x0``, or None for 0) and the outer step count:
        with the model's own ``state_dict`` everything a resumed run needs."""
        return {"point": {k: v.detach().clone() for k, v in self.point.items()},
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "steps": self.steps,
                "cg_delta": (None if self.cg_delta is None else
                             {k: v.detach().clone() for k, v in self.cg_delta.items()})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            point, opt, steps = state["point"], state["optimizer"], int(state["steps"])
        except (KeyError, TypeError, ValueError):
            raise CurvlabError("not a GaussNewton state_dict (needs point, optimizer, steps)"
                               ) from None
        if (opt is None) != (self.optimizer is None):
            raise CurvlabError("GaussNewton state_dict is of another inner solver ("
                               f"{'cg' if opt is None else 'an optimizer'}), this one uses "
                               f"{'cg' if self.optimizer is None else 'an optimizer'}")
        missing = sorted(set(self.point) - set(point))
        if missing:
            raise CurvlabError(f"GaussNewton state_dict lacks the inner variable {missing[0]}")
        with torch.no_grad():
            for k, p in self.point.items():
                if tuple(point[k].shape) != tuple(p.shape):
                    raise CurvlabError(f"GaussNewton state_dict: {k} has shape "
                                       f"{tuple(point[k].shape)}, the model {tuple(p.shape)}")
                p.copy_(point[k])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(opt)
        delta = state.get("cg_delta")
        if delta is not None:
            missing = sorted(set(self.names) - set(delta))
            if missing:
                raise CurvlabError(f"GaussNewton state_dict: cg_delta lacks {missing[0]}")
            for k in self.names:
                if tuple(delta[k].shape) != tuple(self.model.get_parameter(k).shape):
                    raise CurvlabError(f"GaussNewton state_dict: cg_delta {k} has shape "
                                       f"{tuple(delta[k].shape)}")
            device = next(self.model.parameters()).device
            dtype = next(self.model.parameters()).dtype
            delta = {k: delta[k].detach().to(device=device, dtype=dtype).clone()
                     for k in self.names}
        self.cg_delta = delta
        self.steps = steps
