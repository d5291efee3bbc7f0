"""First-order optimizers: AdamW (PyTorch's), Muon with an AdamW side, SOAP, SGD.

No maintained Muon or SOAP package is installable offline here, so both are implemented in this
module from their papers / reference code (written for readability, not speed):

- **Muon** (Jordan et al. 2024): for a hidden weight matrix ``W [m, n]`` with gradient ``G``,
  momentum ``B ← μ B + G``, Nesterov ``U = G + μ B``, then ``O ≈ U (UᵀU)^{-1/2}`` (the nearest
  semi-orthogonal matrix) by 5 quintic Newton-Schulz iterations with coefficients
  ``(3.4445, −4.7750, 2.0315)``, and ``W ← W − lr · 0.2 √max(m, n) · O``. The factor
  ``0.2 √max(m, n)`` gives the update the RMS of a typical AdamW update (Liu et al. 2025,
  "Muon is scalable"), so one learning rate serves the Muon and the AdamW parameters.
  Newton-Schulz runs in the parameter dtype (the reference uses bfloat16 on GPUs).
  Embeddings, the LM head and 1-D parameters use AdamW (``muon=False`` groups).
- **SOAP** (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner. For every
  dimension ``i`` of size ``<= max_precond_dim`` of a matrix parameter, a factor
  ``GG_i ← β_s GG_i + (1 − β_s) G_(i) G_(i)ᵀ`` (``G_(i)`` the gradient unfolded along ``i``)
  and an orthonormal basis ``Q_i`` of its eigenvectors. The gradient is rotated,
  ``G' = G ×_i Q_iᵀ``; Adam's second moment is kept in the rotated space, the first moment in
  the original space (rotated when used); the Adam direction is rotated back. As in the
  reference code, the first basis comes from ``eigh`` (in float64) and every
  ``precondition_frequency`` steps the basis is refreshed by one power iteration,
  ``Q_i ← qr(GG_i Q_i)``, after sorting its columns (and the second moment along ``i``) by the
  estimated eigenvalues ``diag(Q_iᵀ GG_i Q_i)``: the basis moves smoothly, so the second moment
  stays meaningful across refreshes, and QR cannot fail on the degenerate factors of embedding
  rows that never occur (a float32 ``eigh`` returned NaN there without raising: found by the
  baseline analysis). 1-D parameters get plain Adam (the reference's ``precondition_1d=False``).

Every optimizer applies decoupled weight decay ``p ← p (1 − lr · wd)`` before its update (``sgd``:
PyTorch's coupled L2 decay); weight decay is given to the groups of matrices only (see
:func:`param_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch.optim import Optimizer

from curvlab.errors import ConfigError

INNER_OPTIMIZERS = ("adamw", "muon-adamw", "sgd")
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate ``U Vᵀ`` of ``g = U S Vᵀ`` by quintic Newton-Schulz iterations
    ``X ← a X + (b A + c A²) X``, ``A = X Xᵀ``, from ``X₀ = g / ‖g‖_F``."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + eps)
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x if wide else x.T


def _adamw_update(p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
    b1, b2 = group["betas"]
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))


class Muon(Optimizer):
    """Muon on groups with ``muon=True`` (2-D hidden matrices), AdamW on the other groups."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, weight_decay=weight_decay, muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ConfigError("Muon groups must hold 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state = self.state[p]
                if not group["muon"]:
                    _adamw_update(p, p.grad, state, group)
                    continue
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                u = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                scale = 0.2 * math.sqrt(max(p.shape))
                p.add_(newton_schulz(u, group["ns_steps"]), alpha=-group["lr"] * scale)


def _project(x: torch.Tensor, qs: list[torch.Tensor | None], back: bool = False) -> torch.Tensor:
    """``x ×_i Q_iᵀ`` for every dimension (``Q_i`` with ``back``); ``None``: identity."""
    for q in qs:
        x = x.movedim(0, -1) if q is None else torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def _eigenvectors(gg: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD factor, largest eigenvalue first, computed in float64 with
    a tiny relative jitter (float32 ``eigh`` can return NaN on a nearly degenerate factor)."""
    g64 = gg.double()
    jitter = 1e-12 * float(g64.diagonal().abs().max().clamp_min(1e-30))
    eye = torch.eye(gg.shape[0], dtype=g64.dtype, device=gg.device)
    try:
        q = torch.linalg.eigh(g64 + jitter * eye)[1]
    except torch.linalg.LinAlgError:
        q = None
    if q is None or not torch.isfinite(q).all():
        return torch.eye(gg.shape[0], dtype=gg.dtype, device=gg.device)
    return q.flip(-1).to(gg.dtype)


class SOAP(Optimizer):
    """Shampoo-eigenbasis Adam (see the module docstring)."""

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000) -> None:
        if precondition_frequency < 1:
            raise ConfigError("SOAP precondition_frequency must be >= 1")
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim)
        super().__init__(params, defaults)

    @staticmethod
    def _accumulate(state: dict, g: torch.Tensor, beta: float) -> None:
        for i, gg in enumerate(state["GG"]):
            if gg is not None:
                others = [d for d in range(g.ndim) if d != i]
                gg.mul_(beta).add_(torch.tensordot(g, g, dims=(others, others)), alpha=1 - beta)

    @staticmethod
    def _refresh(state: dict) -> None:
        """One power iteration per factor, ``Q_i ← qr(GG_i Q_i)``, after sorting the columns of
        ``Q_i`` (and the second moment along ``i``) by the estimated eigenvalues."""
        for i, (gg, q) in enumerate(zip(state["GG"], state["Q"])):
            if gg is None:
                continue
            order = torch.argsort((q.T @ gg @ q).diagonal(), descending=True)
            state["exp_avg_sq"] = state["exp_avg_sq"].index_select(i, order)
            q_new = torch.linalg.qr(gg @ q[:, order])[0]
            if torch.isfinite(q_new).all():
                state["Q"][i] = q_new

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["GG"] = [g.new_zeros(d, d)
                                   if d <= group["max_precond_dim"] and p.ndim > 1 else None
                                   for d in p.shape]
                    self._accumulate(state, g, 0.0)
                    state["Q"] = [None if gg is None else _eigenvectors(gg) for gg in state["GG"]]
                state["step"] += 1
                t = state["step"]
                g_rot = _project(g, state["Q"])
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g_rot, g_rot, value=1 - b2)
                m_rot = _project(state["exp_avg"], state["Q"])
                direction = _project(m_rot / (state["exp_avg_sq"].sqrt() + group["eps"]),
                                     state["Q"], back=True)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction, alpha=-group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t))
                self._accumulate(state, g, group["shampoo_beta"])
                if t % group["precondition_frequency"] == 0:
                    self._refresh(state)


def param_groups(
    params: Mapping[str, torch.Tensor], hidden: Iterable[str], weight_decay: float,
    muon: bool = False,
) -> list[dict]:
    """Groups: hidden matrices (``muon`` flag), other matrices, vectors (no weight decay)."""
    hidden = set(hidden)
    groups = {"hidden": [], "matrix": [], "vector": []}
    for name, p in params.items():
        key = "vector" if p.ndim < 2 else ("hidden" if name in hidden else "matrix")
        groups[key].append(p)
    out = []
    for key, ps in groups.items():
        if ps:
            group = {"params": ps, "weight_decay": 0.0 if key == "vector" else weight_decay}
            if muon:
                group["muon"] = key == "hidden"
            out.append(group)
    return out


def build_optimizer(
    name: str, params: Mapping[str, torch.Tensor], hidden: Iterable[str], *, lr: float,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    momentum: float = 0.95, ns_steps: int = 5, shampoo_beta: float = 0.95,
    precondition_frequency: int = 10, max_precond_dim: int = 10000,
) -> Optimizer:
    """An optimizer over named tensors: ``adamw``, ``muon`` / ``muon-adamw`` (Muon on
    ``hidden`` matrices, AdamW elsewhere), ``soap``, ``sgd`` (heavy ball, ``momentum``)."""
    if name in ("muon", "muon-adamw"):
        return Muon(param_groups(params, hidden, weight_decay, muon=True), lr=lr,
                    momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps)
    groups = param_groups(params, hidden, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    if name == "soap":
        return SOAP(groups, lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                    precondition_frequency=precondition_frequency,
                    max_precond_dim=max_precond_dim)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=False)
    raise ConfigError(f"unknown optimizer {name!r}")


def hidden_matrices(model: torch.nn.Module) -> list[str]:
    """2-D parameters inside the transformer blocks (Muon's parameters); embeddings, the head
    and 1-D parameters are not hidden."""
    from curvlab.curvature.blocks import layer_partition

    part = layer_partition(model)
    return [name for block in part if block.name.startswith("layer.")
            for name in block.params if model.get_parameter(name).ndim == 2]


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
