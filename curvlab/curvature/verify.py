"""Self-checks of the curvature operators on a given model, in float64.

Each check compares a curvlab product with an independent computation on the same batch and
parameter blocks and reports the relative error ``‖a − b‖ / ‖b‖`` against a tolerance:

- ``hessian-vs-double-backward``: reverse-over-reverse autograd HVP (tol 1e-10);
- ``hessian-vs-finite-differences``: central differences of the gradient, step 1e-5 (tol 1e-5);
- ``ggn-vs-explicit-jacobian``: ``Jᵀ H_z J v`` with J materialized column by column (tol 1e-10);
- ``ggn-symmetric``: ``uᵀ(Gv) = vᵀ(Gu)`` (tol 1e-12) and ``ggn-psd``: ``vᵀGv >= 0``;
- ``ggn-cache``: cached and recomputed linearizations agree (tol 1e-12);
- ``model-vs-stock`` (when ``stock`` is given, e.g. the Hugging Face model as ``transformers``
  loads it by default): ``max|z − z_stock| / max|z_stock|`` of the logits on the batch
  (tol :data:`curvlab.models.hf.FIDELITY_RTOL`, float32 accuracy): the model analyzed is the
  model the user has.

An informational line also reports how far PyTorch's ``jvp(jacrev(loss))`` path (not used by
curvlab) is from double backward on this model: a large value means an upstream autodiff bug
(pytorch/functorch#534, layer_norm) touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, jacrev, jvp, vmap

from curvlab.curvature.blocks import Partition
from curvlab.curvature.model_fn import LogitsFn, default_logits_fn, model_params
from curvlab.curvature.operators import ggn, hessian
from curvlab.curvature.space import BlockSpace
from curvlab.data.batches import Batch
from curvlab.models.attention import math_attention
from curvlab.models.output import extract_logits


@dataclass(frozen=True)
class CheckResult:
    name: str
    error: float
    tolerance: float
    passed: bool
    informational: bool = False


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def verify_operators(
    model: nn.Module,
    batch: Batch,
    blocks: Partition,
    *,
    seed: int = 0,
    ignore_index: int = -100,
    logits_fn: LogitsFn | None = None,
    stock: nn.Module | None = None,
) -> list[CheckResult]:
    """Run every check (see module docstring) in float64 on ``blocks`` of ``model``, on the
    model's device (``batch`` is moved there); ``stock`` adds the ``model-vs-stock`` row."""
    logits_fn = logits_fn or default_logits_fn
    params = model_params(model, torch.float64)
    dev = next(iter(params.values())).device
    batch = batch.to(dev)
    space = BlockSpace(blocks, {n: p.shape for n, p in params.items()})
    names = space.params
    frozen = {k: v for k, v in params.items() if k not in names}
    targets = batch.targets.reshape(-1)
    n_tok = int((targets != ignore_index).sum())

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        t = space.to_tangents(x, names, params)
        active = {k: params[k] + t[k] for k in names}
        out = logits_fn(model, {**frozen, **active}, batch.inputs)
        return out.reshape(-1, out.shape[-1])

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits_of(x), targets, ignore_index=ignore_index)

    gen = torch.Generator().manual_seed(seed)
    n = space.size
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(dev)  # drawn on the CPU
    u = torch.randn(n, generator=gen, dtype=torch.float64).to(dev)
    x0 = torch.zeros(n, dtype=torch.float64, device=dev)
    kw = dict(dtype=torch.float64, ignore_index=ignore_index, logits_fn=logits_fn)
    H = hessian(model, batch, blocks, **kw)
    G = ggn(model, batch, blocks, cache=True, **kw)
    G_nocache = ggn(model, batch, blocks, cache=False, **kw)
    results = []
    with math_attention():
        hv = H @ v
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        (ref,) = torch.autograd.grad(g @ v, x)
        results.append(CheckResult("hessian-vs-double-backward", _rel(hv, ref), 1e-10,
                                   _rel(hv, ref) <= 1e-10))
        h = 1e-5
        gf = grad(loss_of)
        fd = (gf(x0 + h * v) - gf(x0 - h * v)) / (2 * h)
        results.append(CheckResult("hessian-vs-finite-differences", _rel(hv, fd), 1e-5,
                                   _rel(hv, fd) <= 1e-5))
        gv = G @ v
        z = logits_of(x0).detach()
        jv = jvp(logits_of, (x0,), (v,))[1]
        p = z.softmax(-1)
        mask = (targets != ignore_index).to(p.dtype)[:, None]
        hz = (p * jv - p * (p * jv).sum(-1, keepdim=True)) * mask / n_tok
        def jcol(e: torch.Tensor) -> torch.Tensor:
            return jvp(logits_of, (x0,), (e,))[1].reshape(-1)

        J = vmap(jcol, in_dims=1, out_dims=1, chunk_size=64)(
            torch.eye(n, dtype=torch.float64, device=dev))
        ref = J.T @ hz.reshape(-1)
        results.append(CheckResult("ggn-vs-explicit-jacobian", _rel(gv, ref), 1e-10,
                                   _rel(gv, ref) <= 1e-10))
        gu = G @ u
        asym = abs(float(u @ gv - v @ gu)) / max(abs(float(u @ gv)), 1e-300)
        results.append(CheckResult("ggn-symmetric", asym, 1e-12, asym <= 1e-12))
        quad = float(v @ gv)
        scale = float(gv.norm() * v.norm())
        neg = max(0.0, -quad) / max(scale, 1e-300)
        results.append(CheckResult("ggn-psd", neg, 1e-12, neg <= 1e-12))
        err = _rel(G_nocache @ v, gv)
        results.append(CheckResult("ggn-cache", err, 1e-12, err <= 1e-12))
        results.append(_upstream_check(model, batch, params, targets, ignore_index, logits_fn,
                                       gen))
    if stock is not None:
        results.insert(0, _stock_check(model, stock, batch, logits_fn, params))
    return results


def _stock_check(model, stock, batch, logits_fn, params) -> CheckResult:
    from curvlab.models.hf import FIDELITY_RTOL

    with torch.no_grad():
        z = logits_fn(model, params, batch.inputs).double().cpu()
        stock_dev = next(stock.parameters()).device
        z_stock = extract_logits(stock(batch.inputs.to(stock_dev))).double().cpu()
    err = float((z - z_stock).abs().max() / z_stock.abs().max().clamp_min(1e-300))
    return CheckResult("model-vs-stock", err, FIDELITY_RTOL, err <= FIDELITY_RTOL)


def _upstream_check(model, batch, params, targets, ignore_index, logits_fn, gen) -> CheckResult:
    """PyTorch's ``jvp(jacrev(loss))`` HVP over all parameters vs double backward."""
    names = list(params)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out = logits_fn(model, p, batch.inputs)
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), targets,
                                                 ignore_index=ignore_index)

    v = {k: torch.randn(params[k].shape, generator=gen, dtype=torch.float64).to(params[k].device)
         for k in names}
    upstream = jvp(jacrev(loss), (params,), (v,))[1]
    leaves = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    dot = sum((g * v[k]).sum() for g, k in zip(grads, names))
    ref = torch.autograd.grad(dot, list(leaves.values()))
    a = torch.cat([upstream[k].reshape(-1) for k in names])
    b = torch.cat([r.reshape(-1) for r in ref])
    err = _rel(a, b)
    return CheckResult("upstream-jvp-of-jacrev (not used by curvlab)", err, 1e-8, err <= 1e-8,
                       informational=True)


def small_blocks(model: nn.Module, max_size: int = 256) -> Partition:
    """A few small blocks spread over the model for verification: the first and last 1-D
    parameters (norm weights / biases) and the first rows of the last 2-D parameter."""
    from curvlab.curvature.blocks import Block, Part

    named = list(model.named_parameters())
    vectors = [(n, p) for n, p in named if p.ndim == 1 and p.numel() <= max_size]
    chosen: list[Block] = []
    for n, p in ([vectors[0], vectors[-1]] if len(vectors) > 1 else vectors):
        chosen.append(Block(n, (Part(n, 0, p.numel()),)))
    matrices = [(n, p) for n, p in named if p.ndim >= 2]
    if matrices:
        n, p = matrices[-1]
        per_row = p.numel() // p.shape[0]
        rows = max(1, min(p.shape[0], max_size // per_row))
        chosen.append(Block(f"{n}[0:{rows}]", (Part(n, 0, rows * per_row),)))
    return Partition(tuple(chosen), "verify")
