"""K-FAC factors of the Gauss-Newton matrix for ``nn.Linear`` layers ("K-FAC-expand").

For a linear layer ``y_t = W a_t (+ b)`` applied at positions ``t`` (every token of every
sequence, and every call of the module), with ``ā_t = [a_t; 1]`` when the bias is included, the
GGN block of ``vec(W)`` (row-major, index ``(o, i)``) is approximated by

    G_W ≈ B ⊗ A,     A = (1/T) Σ_t ā_t ā_tᵀ,     B = N Σ_t E_ŷ[b_t b_tᵀ],

with T the number of positions the layer saw, N the number of non-ignored target tokens (so
``T = N`` for a layer applied once per token when no target is ignored) and
``b_t = ∂L̂/∂y_t`` the gradient of the mean loss
``L̂ = (1/N) Σ_n ℓ(z_n, ŷ_n)`` at labels ŷ drawn from the model, ``ŷ_n ~ softmax(z_n)``: since
``E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag p − p pᵀ``, ``E[b_t b_tᵀ]`` is the GGN's output-side factor (the
weight-sharing positions are treated as independent examples, i.e. cross-position terms
``t ≠ t'`` are dropped, as in Eschenhagen et al. 2023, "K-FAC for modern architectures").

Estimators of ``E_ŷ``:

- ``"mc"``: ``samples`` label draws per token (explicit ``seed``), one backward pass each;
- ``"exact"``: the expectation in closed form, ``Σ_n Σ_c`` with ``ŷ_n`` replaced by the columns
  ``s_c = √p_c (e_c − p)`` of a square root of ``diag p − p pᵀ``, one token at a time so that no
  cross-token terms enter: ``N · V`` backward passes (vectorized), for small models and tests.

For a model whose logits are one linear layer of fixed features (``z_n = W a_n + b``) the
``"exact"`` factors are ``B = Σ_n H_n`` (``H_n = (diag p_n − p_n p_nᵀ)/N``, non-ignored tokens)
and ``A = (1/T) Σ_t ā_t ā_tᵀ``, while ``G_W = Σ_n H_n ⊗ ā_n ā_nᵀ``: equal when all ``a_n`` are
equal (K-FAC's approximation is ``E[H ⊗ ā āᵀ] ≈ E[H] ⊗ E[ā āᵀ]``).

Factors are collected with forward hooks on the selected ``nn.Linear`` modules (the hook saves
the input and adds a zero "probe" to the output, whose gradient is ``b_t``); the forward pass
runs through ``torch.func.functional_call`` at the given parameters, with the math attention
kernel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from curvlab import distributed
from curvlab.curvature.logit_space import (
    label_cotangents,
    sample_labels,
    token_columns,
    token_cotangents,
)
from curvlab.curvature.model_fn import LogitsFn, default_logits_fn
from curvlab.curvature.space import BlockSpace
from curvlab.data.batches import Batch
from curvlab.errors import ConfigError
from curvlab.models.attention import math_attention

ESTIMATORS = ("mc", "exact")


@dataclass(frozen=True)
class LinearLayer:
    """An ``nn.Linear`` module whose weight (and bias, if ``bias`` is set) the partition covers
    whole; ``bias`` is ``None`` when the module has no bias or the partition leaves it out."""

    module: str
    weight: str
    bias: str | None
    out_features: int
    in_features: int


@dataclass(frozen=True, eq=False)
class KFACFactors:
    """``A`` ([in(+1), in(+1)], input second moment; last row/column the bias coordinate when
    ``layer.bias``) and ``B`` ([out, out], output-gradient factor) of one layer;
    ``positions`` T and ``tokens`` N of the normalization."""

    layer: LinearLayer
    A: torch.Tensor
    B: torch.Tensor
    positions: int
    tokens: int


def whole_parameters(space: BlockSpace) -> dict[str, int]:
    """Parameters that one part of the partition covers whole: name -> offset of their first
    coordinate (their elements follow row-major)."""
    count: dict[str, int] = {}
    whole: dict[str, int] = {}
    for name, start, stop, offset in space.segments:
        count[name] = count.get(name, 0) + 1
        if start == 0 and stop == space.shapes[name].numel():
            whole[name] = offset
    return {name: off for name, off in whole.items() if count[name] == 1}


def linear_layers(model: nn.Module, space: BlockSpace) -> list[LinearLayer]:
    """The ``nn.Linear`` modules K-FAC applies to: the weight is a parameter under the module's
    own name (tied weights, e.g. GPT's LM head sharing the embedding, are excluded), covered
    whole by one part of the partition; a bias is included when covered whole, and a bias
    covered only in part excludes the layer. Everything else is left to a diagonal."""
    seen = {name for name, *_ in space.segments}
    is_whole = whole_parameters(space)
    out = []
    for mname, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        prefix = f"{mname}." if mname else ""
        w, b = f"{prefix}weight", f"{prefix}bias"
        if w not in is_whole:
            continue
        bias = None
        if module.bias is not None and b in seen:
            if b not in is_whole:
                continue
            bias = b
        out.append(LinearLayer(mname, w, bias, module.out_features, module.in_features))
    return out


def kfac_factors(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Sequence[Batch],
    layers: Sequence[LinearLayer],
    *,
    estimator: str = "mc",
    samples: int = 1,
    seed: int = 0,
    logits_fn: LogitsFn | None = None,
    ignore_index: int = -100,
    chunk: int = 64,
) -> list[KFACFactors]:
    """K-FAC factors (module docstring) of ``layers`` at ``params`` on ``batches`` (the loss is
    the mean over the non-ignored tokens of all batches). Layers whose module is never called
    in the forward pass get no factors (and are left to a diagonal by the preconditioner)."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown K-FAC estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if estimator == "mc" and samples < 1:
        raise ConfigError("K-FAC needs at least 1 Monte-Carlo sample")
    if not layers:
        return []
    fn = logits_fn or default_logits_fn
    modules = dict(model.named_modules())
    dtype = next(iter(params.values())).dtype
    # the loss is the mean over the tokens of every rank's shard (one process: these batches)
    total = int(distributed.sum_scalars(
        sum(int((b.targets != ignore_index).sum()) for b in batches))[0])
    gen = torch.Generator().manual_seed(seed)
    sums_a = {ly.module: 0.0 for ly in layers}
    sums_b = {ly.module: 0.0 for ly in layers}
    positions = dict.fromkeys(sums_a, 0)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(name: str, bias: bool):
        def fwd(module, args, output):
            a = args[0].detach().reshape(-1, args[0].shape[-1])
            if bias:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            probe = torch.zeros_like(output, requires_grad=True)
            records.setdefault(name, []).append((a, probe))
            return output + probe
        return fwd

    handles = [modules[ly.module].register_forward_hook(hook(ly.module, ly.bias is not None))
               for ly in layers]
    try:
        for batch in batches:
            records.clear()
            with torch.enable_grad(), math_attention():
                out = fn(model, dict(params), batch.inputs)
                z = out.reshape(-1, out.shape[-1])
            for ly in layers:
                for a, _ in records.get(ly.module, []):
                    sums_a[ly.module] = sums_a[ly.module] + a.T @ a
                    positions[ly.module] += a.shape[0]
            probes = [(ly.module, p) for ly in layers for _, p in records.get(ly.module, [])]
            if not probes:
                continue
            targets = batch.targets.reshape(-1)
            mask = (targets != ignore_index).to(dtype)
            p = torch.softmax(z.detach(), dim=-1)
            if estimator == "exact":  # root columns of diag p − ppᵀ, one token at a time
                cots = token_cotangents(p, mask / total, *token_columns(
                    p, targets, kind="exact", ignore_index=ignore_index), chunk=chunk)
            else:
                labels = sample_labels(p, samples, gen, batch.token_range)  # [samples, N]
                cots = label_cotangents(p, mask / total, labels, chunk=chunk)
            for cot in cots:
                grads = torch.autograd.grad(z, [q for _, q in probes], grad_outputs=cot,
                                            retain_graph=True, is_grads_batched=True)
                for (name, _), g in zip(probes, grads):
                    g = g.reshape(-1, g.shape[-1])  # [k · positions, out]
                    sums_b[name] = sums_b[name] + g.T @ g
    finally:
        for h in handles:
            h.remove()
    if distributed.active():  # sums over the shards of all ranks, one collective
        device = next(iter(params.values())).device
        keys = [ly.module for ly in layers]
        sums = [torch.as_tensor(d[k], dtype=dtype, device=device).clone()
                for k in keys for d in (sums_a, sums_b)]
        counts = torch.tensor([float(positions[k]) for k in keys], dtype=torch.float64,
                              device=device)
        distributed.all_reduce_([*sums, counts])
        for i, k in enumerate(keys):
            sums_a[k], sums_b[k] = sums[2 * i], sums[2 * i + 1]
        positions = {k: int(round(float(v))) for k, v in zip(keys, counts)}
    out = []
    for ly in layers:
        t = positions[ly.module]
        if t == 0:
            continue  # never called as a module (e.g. weights used functionally): no factors
        scale = total / samples if estimator == "mc" else float(total)
        out.append(KFACFactors(ly, sums_a[ly.module] / t, scale * sums_b[ly.module], t, total))
    return out
