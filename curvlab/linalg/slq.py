"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

The spectral density of ``A`` (``n × n``, eigenpairs ``(λ_i, u_i)``) is the probability measure
``φ(t) = (1/n) Σ_i δ(t − λ_i)``. For a unit probe ``v = z/‖z‖`` (``z`` Rademacher),
``vᵀ f(A) v = Σ_i (u_iᵀ v)² f(λ_i)`` is an unbiased estimate of ``∫ f dφ`` because
``E[(u_iᵀ v)²] = 1/n``. ``m`` Lanczos steps from ``v`` give ``T_m = S diag(θ) Sᵀ``, and the
Gauss quadrature rule ``vᵀ f(A) v ≈ Σ_j τ_j f(θ_j)`` with nodes ``θ_j`` (Ritz values) and weights
``τ_j = S_{0j}²`` (``Σ_j τ_j = 1``) is exact for polynomials of degree ``< 2m``. Averaging the
rules of several probes gives the SLQ estimate of ``φ`` (Ubaru, Chen & Saad 2017; Ghorbani,
Krishnan & Xiao 2019 for neural-network Hessians).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from curvlab.linalg.lanczos import _CHECK_EVERY, Reorth, _Recurrence
from curvlab.linalg.operator import Operator, as_operator, random_probes
from curvlab.linalg.progress import Progress, ProgressFn


@dataclass(frozen=True, eq=False)
class SpectralDensity:
    """Per-probe Gauss quadrature rules of the spectral density ``φ`` of an ``n × n`` operator.

    nodes, weights: one float64 CPU tensor per probe (Ritz values ascending, and the squared first
        components of the eigenvectors of ``T``; each probe's weights sum to 1). A probe whose
        Krylov space was exhausted early (breakdown) has fewer than ``steps`` nodes.
    n: the dimension. steps: Lanczos steps per probe (``min(steps, n)`` as run).
    products: operator-vector products (columns); they were done as ``steps`` block products.
    """

    nodes: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]
    n: int
    steps: int
    products: int

    @property
    def probes(self) -> int:
        return len(self.nodes)

    def _per_probe(self, p: float) -> torch.Tensor:
        return torch.stack([(w * t**p).sum() for t, w in zip(self.nodes, self.weights)])

    def moment(self, p: float) -> float:
        """``∫ t^p dφ(t) ≈ tr(A^p)/n``: the mean over probes of ``Σ_j τ_j θ_j^p`` (exact for
        integer ``p < 2·steps`` up to the probe noise)."""
        return float(self._per_probe(p).mean())

    @property
    def trace_estimate(self) -> float:
        """Estimate of ``tr A = n · ∫ t dφ``: ``n`` times the mean over probes of ``Σ τ_j θ_j``
        (that is ``n · vᵀ A v``, Hutchinson's estimator with these probes)."""
        return self.n * self.moment(1)

    @property
    def trace_stderr(self) -> float:
        """Standard error of :attr:`trace_estimate` from the spread of the probes (NaN for one)."""
        per_probe = self._per_probe(1)
        if per_probe.numel() < 2:
            return math.nan
        return float(self.n * per_probe.std() / math.sqrt(per_probe.numel()))

    def default_sigma(self) -> float:
        """Gaussian width used by :meth:`density` by default: 1% of the node range
        (of ``max |θ|`` if all nodes coincide; 1 if they are all zero)."""
        nodes = torch.cat(self.nodes)
        width = float(nodes.max() - nodes.min()) or float(nodes.abs().max()) or 100.0
        return 0.01 * width

    def grid(self, num: int = 1000, sigma: float | None = None) -> torch.Tensor:
        """``num`` equally spaced points from ``min θ − 6σ`` to ``max θ + 6σ`` (float64)."""
        sigma = self.default_sigma() if sigma is None else sigma
        nodes = torch.cat(self.nodes)
        return torch.linspace(float(nodes.min()) - 6 * sigma, float(nodes.max()) + 6 * sigma, num,
                              dtype=torch.float64)

    def density(self, grid: torch.Tensor | np.ndarray, sigma: float | None = None) -> torch.Tensor:
        """Smoothed density ``φ_σ(t) = (1/probes) Σ_probes Σ_j τ_j N(t; θ_j, σ²)`` on ``grid``
        (float64 CPU tensor of the grid's shape). It integrates to 1 over a grid that extends a
        few ``σ`` beyond the nodes; ``sigma`` defaults to :meth:`default_sigma`."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        t = torch.as_tensor(grid, dtype=torch.float64)
        nodes, weights = torch.cat(self.nodes), torch.cat(self.weights) / self.probes
        z = (t.reshape(-1, 1) - nodes) / sigma
        rho = (weights * torch.exp(-0.5 * z**2)).sum(1) / (sigma * math.sqrt(2 * math.pi))
        return rho.reshape(t.shape)


def spectral_density(
    op: Operator | torch.Tensor,
    *,
    probes: int = 10,
    steps: int = 80,
    seed: int = 0,
    reorth: Reorth = "full",
    basis_device: torch.device | str | None = None,
    block_size: int | None = None,
    scratch_dir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> SpectralDensity:
    """SLQ estimate of the spectral density of the symmetric operator ``op``.

    ``probes`` Rademacher vectors (drawn on the CPU with ``seed``, normalized to unit length) are
    run through ``min(steps, n)`` Lanczos steps, ``block_size`` probes at a time (default: all
    together): one block product ``op @ V`` (``V`` of shape ``(n, block_size)``) per step. The
    probes of a group are drawn when the group starts, so the rules equal those of one group
    only when ``block_size >= probes``; each group is an independent sample either way. With
    ``reorth="full"`` the basis holds ``block_size × steps`` vectors (``basis_device="cpu"`` puts
    it in host memory, ``"disk"`` in a scratch file in ``scratch_dir``, as for
    :func:`~curvlab.linalg.lanczos`); ``"none"`` keeps three vectors per probe of a group:
    ghost copies then split the weight of a converged eigenvalue among themselves, which leaves
    the quadrature (and the density) accurate (Greenbaum 1989), so no warning is raised. A probe
    whose Krylov space becomes invariant (breakdown) stops there: its rule is then exact. With
    ``steps >= n`` the nodes are the eigenvalues of ``op`` (those with a nonzero component along
    the probe). ``progress`` is called with a :class:`~curvlab.linalg.progress.Progress` after
    every block product.
    """
    op = as_operator(op)
    n = op.shape[0]
    if probes < 1 or steps < 1:
        raise ValueError(f"probes and steps must be at least 1, got {probes} and {steps}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if reorth not in ("full", "selective", "none"):
        raise ValueError(f"reorth must be 'full', 'selective' or 'none', got {reorth!r}")
    steps = min(steps, n)
    group = probes if block_size is None else min(block_size, probes)
    gen = torch.Generator().manual_seed(seed)
    nodes, weights, products = [], [], 0
    for first in range(0, probes, group):
        count = min(group, probes - first)
        V = random_probes(op, count, gen) / math.sqrt(n)
        rec = _Recurrence(op, V, steps, reorth, basis_device, reorth != "none", scratch_dir)
        try:
            while rec.steps < steps:
                rec.step()
                if progress is not None:
                    progress(Progress("slq", products + rec.products, probes * steps))
                if rec.steps % _CHECK_EVERY == 0 and bool((rec.broken_at >= 0).all()):
                    break
            alpha, beta, broken = rec.sync()
        finally:
            rec.close()
        del V
        products += rec.products
        for c in range(count):
            m = int(broken[c]) + 1 if broken[c] >= 0 else rec.steps
            theta, S = eigh_tridiagonal(alpha[:m, c], beta[: m - 1, c])
            nodes.append(torch.from_numpy(theta))
            weights.append(torch.from_numpy(S[0] ** 2))
    return SpectralDensity(tuple(nodes), tuple(weights), n, steps, products)


def block_spectral_densities(
    ops: Mapping[str, Operator | torch.Tensor],
    *,
    probes: int = 10,
    steps: int = 80,
    seed: int = 0,
    reorth: Reorth = "full",
    basis_device: torch.device | str | None = None,
    block_size: int | None = None,
    scratch_dir: str | os.PathLike | None = None,
) -> dict[str, SpectralDensity]:
    """:func:`spectral_density` of each operator of ``ops`` (e.g. the diagonal blocks of a
    curvature matrix), keyed like ``ops``. Every block uses the same ``seed``, so each result
    does not depend on which other blocks are in the mapping."""
    return {
        name: spectral_density(op, probes=probes, steps=steps, seed=seed, reorth=reorth,
                               basis_device=basis_device, block_size=block_size,
                               scratch_dir=scratch_dir)
        for name, op in ops.items()
    }
