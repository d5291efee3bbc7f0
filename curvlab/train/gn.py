"""Gauss-Newton subproblems: the inner gradient, the inner solve, full and layerwise directions.

At the outer iterate θ_t the network is linearized, ``z(θ_t + Δ) ≈ z_t + J Δ`` (J the Jacobian
of the logits of one micro-batch). With ``L`` the mean token cross-entropy over the micro-batch's
``N`` non-ignored target tokens (``scale = 1/N``), the inner losses of ``Δ`` are

- ``gn``:   ``m(Δ) = L(z_t) + g_zᵀ JΔ + ½ (JΔ)ᵀ H_z (JΔ) + ½ λ ‖Δ‖²``, whose minimizer is
  ``−(G + λI)⁻¹ ∇L`` with ``G = Jᵀ H_z J``; gradient ``Jᵀ (g_z + H_z JΔ) + λΔ``;
- ``prox``: ``m(Δ) = L(z_t + JΔ) + ½ λ ‖Δ‖²`` (GN-prox-linear: the exact cross-entropy of the
  linearized logits); gradient ``Jᵀ g_z(z_t + JΔ) + λΔ``,

with ``g_z`` per token ``(p − e_y)/N`` and ``H_z`` per token ``(diag p − p pᵀ)/N`` from
:mod:`curvlab.curvature.logit_space` (λ is an optional Levenberg-Marquardt damping, 0 by
default as in arXiv 2510.09378). One inner gradient is one forward pass carrying the tangent Δ
(``torch.func.jvp``) inside one VJP — the uncached GGN product of
:class:`curvlab.curvature.operators.CurvatureOperator` with ``g_z`` added to the cotangent.

Δ may cover only some parameters (a block); the others stay frozen at θ_t.

Under ``torchrun`` (:mod:`curvlab.distributed`) the batches are this process's rows of each
micro-batch: ``N`` is the token count of all ranks, every rank differentiates the sum over its
rows, and one ``all_reduce`` per inner gradient (gradient and losses in one buffer) gives every
rank the single-process result on the whole micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import jvp, vjp

from curvlab import distributed
from curvlab.curvature.blocks import Block, Part, Partition
from curvlab.curvature.logit_space import LogitCurvature, logit_gradient
from curvlab.curvature.model_fn import LogitsFn, default_logits_fn
from curvlab.curvature.operators import ggn
from curvlab.curvature.precision import check_precision, precision_context
from curvlab.data.batches import Batch
from curvlab.errors import CurvlabError
from curvlab.linalg.cg import cg
from curvlab.models.attention import math_attention
from curvlab.train.config import TrainingDivergedError

MODES = ("gn", "prox")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class InnerGradient:
    """The inner gradient on one micro-batch.

    grad: ``∂m/∂Δ`` per active parameter. loss: ``L(θ_t)`` on the micro-batch.
    model_loss: ``m(Δ)`` (inner loss at the Δ the gradient was taken at).
    """

    grad: Tensors
    loss: float
    model_loss: float


def logits_function(
    model: nn.Module, theta: Mapping[str, torch.Tensor], names: Sequence[str], inputs: torch.Tensor,
    logits_fn: LogitsFn | None = None,
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """Flat logits ``[N, V]`` as a function of the parameters ``names`` (others fixed at
    ``theta``); the function shape the curvature operators differentiate."""
    fn = logits_fn or default_logits_fn
    frozen = {k: v for k, v in theta.items() if k not in names}

    def logits(active: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = fn(model, {**frozen, **active}, inputs)
        return out.reshape(-1, out.shape[-1])

    return logits


def linearized_vjp(
    fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], primals: Mapping[str, torch.Tensor],
    tangent: Mapping[str, torch.Tensor],
    cotangent: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Tensors]:
    """``(z, J t, Jᵀ u)`` with ``u = cotangent(z, J t)``: one forward pass carrying the tangent,
    then one VJP through the same graph (no second forward pass)."""

    def with_tangent(p):
        z, jz = jvp(fn, (p,), (tangent,))
        return z, (z, jz)

    _, vjp_fn, (z, jz) = vjp(with_tangent, dict(primals), has_aux=True)
    z, jz = z.detach(), jz.detach()
    return z, jz, vjp_fn(cotangent(z, jz))[0]


def token_counts(batches: Sequence[Batch], ignore_index: int = -100) -> list[int]:
    """Non-ignored target tokens of every micro-batch, summed over ``torchrun`` ranks (the
    batches are this rank's shards; one collective for all of them)."""
    local = [int((b.targets != ignore_index).sum()) for b in batches]
    return [int(round(c)) for c in distributed.sum_scalars(*local)]


def inner_gradient(
    model: nn.Module, theta: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
    batch: Batch, *, mode: str = "gn", damping: float = 0.0, ignore_index: int = -100,
    logits_fn: LogitsFn | None = None, num_tokens: int | None = None, precision: str = "fp32",
) -> InnerGradient:
    """Gradient of the inner loss ``m`` (module docstring) w.r.t. ``delta`` (its keys are the
    active parameters) on ``batch``, at the linearization point ``theta``.

    ``precision``: the arithmetic of the forward pass carrying Δ and of the VJP (``fp32``,
    ``tf32``, ``bf16``: :mod:`curvlab.curvature.precision`; the logit-space terms, the losses
    and the gradient stay in the parameters' dtype).

    Under ``torchrun`` ``batch`` is this rank's rows of the micro-batch and the result (on every
    rank) is that of the whole micro-batch: one ``all_reduce`` of the gradient and the losses.
    ``num_tokens``: the micro-batch's non-ignored target tokens over all ranks, if known
    (:func:`token_counts`); else counted here (one more collective)."""
    if mode not in MODES:
        raise CurvlabError(f"unknown GN mode {mode!r}; expected one of {MODES}")
    names = list(delta)
    targets = batch.targets.reshape(-1)
    n = token_counts([batch], ignore_index)[0] if num_tokens is None else int(num_tokens)
    if n == 0:
        raise CurvlabError("micro-batch has no target tokens that are not ignored")
    scale = 1.0 / n
    first = theta[names[0]]
    check_precision(precision, first.dtype)
    fn = logits_function(model, theta, names, batch.inputs, logits_fn)
    values: dict[str, torch.Tensor] = {}

    def ce(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            z, targets, ignore_index=ignore_index, reduction="sum") * scale

    def cotangent(z: torch.Tensor, jz: torch.Tensor) -> torch.Tensor:
        low = z.dtype  # bf16 under autocast: the logit-space terms in the parameters' dtype
        z, jz = z.to(first.dtype), jz.to(first.dtype)
        values["loss"] = ce(z)
        if mode == "prox":
            values["model"] = ce(z + jz)
            return logit_gradient(z + jz, targets, scale=scale,
                                  ignore_index=ignore_index).to(low)
        curvature = LogitCurvature(z, targets, kind="ggn", scale=scale, ignore_index=ignore_index)
        g = logit_gradient(z, targets, scale=scale, ignore_index=ignore_index,
                           probs=curvature.probs)  # one softmax for both
        hjz = curvature(jz)
        values["model"] = values["loss"] + (g * jz).sum() + 0.5 * (jz * hjz).sum()
        return (g + hjz).to(low)

    primals = {k: theta[k] for k in names}
    with torch.enable_grad(), math_attention(), precision_context(precision, first.device):
        _, _, grad = linearized_vjp(fn, primals, delta, cotangent)
    losses = torch.stack([values["loss"].detach(), values["model"].detach()])
    if distributed.active():  # sums over the ranks' rows: one collective per inner gradient
        grad = {k: g.contiguous() for k, g in grad.items()}
        distributed.all_reduce_([*grad.values(), losses])
    loss, model_loss = losses[0], losses[1]
    if damping:  # the damping term is replicated, added after the reduction
        grad = {k: g + damping * delta[k] for k, g in grad.items()}
        model_loss = model_loss + 0.5 * damping * sum((d * d).sum() for d in delta.values())
    return InnerGradient(grad, float(loss), float(model_loss))


@dataclass(frozen=True, eq=False)
class Direction:
    """A GN direction Δ (per inner variable) and what the inner solve saw.

    loss: mean ``L(θ_t)`` over the inner micro-batches (the first block's solve).
    decrease: ``L(θ_t) − m(Δ)`` on the last micro-batch of each block's solve, averaged over the
    blocks: the loss decrease the inner model predicts.
    inner_losses: ``L(θ_t)`` per inner micro-batch; inner_model_losses: ``m(Δ)`` at each inner
    step of the first block (at the Δ its gradient was taken at).
    passes: what the solve ran, per micro-batch (:data:`PASS_KINDS`).
    cg_iterations / cg_residual / cg_converged (:func:`cg_direction` only): the largest CG
    iteration count and relative residual over the blocks, and whether every block converged.
    """

    delta: Tensors
    loss: float
    decrease: float
    inner_losses: tuple[float, ...] = ()
    inner_model_losses: tuple[float, ...] = ()
    passes: Mapping[str, int] = field(default_factory=dict)
    cg_iterations: int | None = None
    cg_residual: float | None = None
    cg_converged: bool | None = None


# what one step ran, counted per micro-batch (GNStep.passes): a forward-only loss, a
# forward+backward gradient, one linearization of the logits (jvp traced once), one inner
# gradient (tangent forward + VJP, :func:`linearized_vjp`), one GGN product
PASS_KINDS = ("loss", "gradient", "linearization", "inner_gradient", "ggn_product")


def count_passes(**counts: int) -> dict[str, int]:
    """A ``{kind: count}`` mapping with every kind of :data:`PASS_KINDS` (0 where not given)."""
    unknown = sorted(set(counts) - set(PASS_KINDS))
    if unknown:
        raise ValueError(f"unknown pass kind {unknown[0]!r}; expected one of {PASS_KINDS}")
    return {k: int(counts.get(k, 0)) for k in PASS_KINDS}


def solve_direction(
    model: nn.Module, theta: Mapping[str, torch.Tensor], point: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer, batches: Sequence[Batch], blocks: Sequence[Sequence[str]],
    *, mode: str = "gn", damping: float = 0.0, clip: float = 0.0,
    lr: Callable[[int], float] | None = None, ignore_index: int = -100,
    logits_fns: Sequence[LogitsFn | None] | None = None, precision: str = "fp32",
) -> Direction:
    """Minimize the inner loss over each block in turn, others frozen at ``theta``.

    ``point`` holds the optimizer's variables ``θ' = θ_t + Δ`` (every parameter of a block,
    updated in place; their start is the warm start). For each block, one optimizer step per
    micro-batch of ``batches`` on the inner gradient (clipped to global norm ``clip`` over the
    block if > 0), learning rate ``lr(k)`` at inner step ``k``. One block holding all parameters
    is full GN; the layer partition is layerwise GN (every block from the same θ_t, solutions
    merged). ``logits_fns``: the logits function of each micro-batch (None: the model's
    forward). ``precision``: that of every inner gradient (:func:`inner_gradient`). Returns
    ``Δ = θ' − θ_t`` for every key of ``point``.

    Under ``torchrun`` ``batches`` are this rank's rows of the micro-batches; every inner
    gradient is all-reduced (:func:`inner_gradient`), so ``point`` and the optimizer stay the
    same on every rank and the result is the single-process one on the whole micro-batches.
    """
    counts = token_counts(batches, ignore_index)
    fns = list(logits_fns) if logits_fns is not None else [None] * len(batches)
    losses, model_losses, decreases = [], [], []
    for b, block in enumerate(blocks):
        params = [point[k] for k in block]
        for k, batch in enumerate(batches):
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr(k)
            delta = {name: point[name] - theta[name] for name in block}
            r = inner_gradient(model, theta, delta, batch, mode=mode, damping=damping,
                               ignore_index=ignore_index, logits_fn=fns[k],
                               num_tokens=counts[k], precision=precision)
            if b == 0:
                losses.append(r.loss)
                model_losses.append(r.model_loss)
            for name, p in zip(block, params):
                p.grad = r.grad[name]
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
            optimizer.step()
            for p in params:
                p.grad = None
        decreases.append(r.loss - r.model_loss)
    delta = {name: point[name] - theta[name] for name in point}
    return Direction(delta, sum(losses) / len(losses), sum(decreases) / len(decreases),
                     tuple(losses), tuple(model_losses),
                     count_passes(inner_gradient=len(blocks) * len(batches)))


def cg_direction(
    model: nn.Module, theta: Mapping[str, torch.Tensor], batches: Sequence[Batch],
    blocks: Sequence[Sequence[str]], *, damping: float = 0.0, tol: float = 1e-6,
    max_iter: int = 100, x0: Mapping[str, torch.Tensor] | None = None, ignore_index: int = -100,
    logits_fns: Sequence[LogitsFn | None] | None = None, precision: str = "fp32",
    cache: bool | str = False,
) -> Direction:
    """The exact GN direction: ``(G + λI) Δ = −g`` solved by conjugate gradients
    (:func:`curvlab.linalg.cg`) on exact GGN products, per block.

    The objective is that of the outer step, the mean over the ``K`` micro-batches of each
    micro-batch's mean token cross-entropy, ``L(θ) = (1/K) Σ_k L_k(θ)`` (the loss the step
    reports and the line search scores): ``g = (1/K) Σ_k ∇L_k(θ_t)`` and ``G = (1/K) Σ_k
    J_kᵀ H_k J_k`` with ``H_k`` per token ``(diag p − p pᵀ)/N_k`` (so micro-batch ``k``'s tokens
    weigh ``1/(K N_k)``; :func:`curvlab.ggn` with ``normalization="batches"``). Δ minimizes the
    quadratic model ``m(Δ) = L(θ_t) + gᵀΔ + ½ Δᵀ(G + λI)Δ``, the average of the inner losses
    ``m`` of the module docstring over the micro-batches. ``g`` and ``L_k(θ_t)`` come from one
    :func:`inner_gradient` at ``Δ = 0`` per micro-batch (all blocks at once); ``G`` from one
    linearization of the logits per micro-batch (cached when it fits, ``cache`` as for
    :func:`curvlab.ggn`), shared by the blocks, each product the sum over the micro-batches.

    Every block ``b`` (one block of every parameter: full GN; the layer partition: layerwise
    GN) solves its own diagonal block, ``(G_bb + λI) Δ_b = −g_b``, the others frozen at θ_t,
    from ``x0`` (per parameter; None: 0) to the relative residual
    ``‖(G_bb + λI)Δ_b + g_b‖ <= tol ‖g_b‖`` or ``max_iter`` iterations. A search direction with
    ``pᵀ(G_bb + λI)p <= 0`` (possible at ``λ = 0``: ``G`` is singular) ends that block's solve
    at its current iterate, reported through the residual and ``cg_converged``, never a NaN.
    No learning rate, weight decay or clipping applies.

    Under ``torchrun`` ``batches`` are this rank's rows of the micro-batches: the inner
    gradients and every product are all-reduced, and every rank runs the same CG on the same
    vectors, so the result is the single-process one on the whole micro-batches.

    ``Direction.decrease`` is ``L(θ_t) − m(Δ_b)`` averaged over the blocks (from the final
    residual ``r``: ``m(Δ) − L = ½ gᵀΔ − ½ rᵀΔ``); ``inner_model_losses`` holds ``m(Δ_b)`` per
    block.
    """
    counts = token_counts(batches, ignore_index)
    fns = list(logits_fns) if logits_fns is not None else [None] * len(batches)
    names = [n for block in blocks for n in block]
    zero = {n: torch.zeros_like(theta[n]) for n in names}
    losses, grads = [], []
    for k, batch in enumerate(batches):
        r = inner_gradient(model, theta, zero, batch, ignore_index=ignore_index,
                           logits_fn=fns[k], num_tokens=counts[k], precision=precision)
        losses.append(r.loss)
        grads.append(r.grad)
    K = len(batches)
    g = {n: sum(gr[n] for gr in grads) / K for n in names}
    part = Partition(tuple(Block(f"block.{b}", tuple(Part(n, 0, theta[n].numel()) for n in bl))
                           for b, bl in enumerate(blocks)))
    op = ggn(model, list(batches), part, ignore_index=ignore_index, cache=cache,
             logits_fn=fns, precision=precision, normalization="batches")
    loss = sum(losses) / K
    delta: Tensors = {}
    decreases, model_losses, iterations, residuals, converged = [], [], [], [], []
    products = 0
    for b in range(len(blocks)):
        sub = op.block(f"block.{b}") if len(blocks) > 1 else op
        space = sub.row_space
        gb = space.flatten_dict({n: g[n] for n in space.params})
        start = None if x0 is None else space.flatten_dict({n: x0[n] for n in space.params})
        try:
            res = cg(sub, -gb, damping=damping, tol=tol, max_iter=max_iter, x0=start,
                     on_breakdown="stop")
        except ValueError as e:  # the operator returned NaN/Inf
            raise TrainingDivergedError(f"CG on block {b}: {e}") from None
        products += res.products
        gnorm = float(gb.norm())
        residuals.append(float(res.residual_norm) / gnorm if gnorm > 0 else 0.0)
        iterations.append(res.iterations)
        converged.append(bool(res.converged))
        change = 0.5 * float(gb @ res.x) - 0.5 * float(res.residual @ res.x)
        decreases.append(-change)
        model_losses.append(loss + change)
        delta.update({n: v.clone() for n, v in space.unflatten(res.x).items()})
    passes = count_passes(inner_gradient=K, linearization=K if op.engine.cached else 0,
                          ggn_product=K * products)
    return Direction(delta, loss, sum(decreases) / len(decreases), tuple(losses),
                     tuple(model_losses), passes, max(iterations), max(residuals),
                     all(converged))
