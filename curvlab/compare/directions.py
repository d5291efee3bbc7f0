"""Preconditioners ``P`` and their directions ``d = −P⁻¹ g``.

All act on the coordinates of the partition (n of them). With ``G`` the GGN, ``λ >= 0`` the
damping and ``BD(G) = blockdiag(G_11, ..., G_bb)`` its block diagonal over the partition:

==============  =====================================================================
``full``        ``P = G + λI`` (full Gauss-Newton)
``layerwise``   ``P = BD(G) + λI`` (block-diagonal Gauss-Newton, one block per partition block)
``diag``        ``P = diag(G) + λI`` (diagonal Gauss-Newton)
``adam``        ``P = diag(F)^{1/2} + λI``, ``F`` the empirical Fisher (Adam's second moment
                without moving averages: ``diag F`` is the mean over tokens of squared
                per-token gradients); here λ plays Adam's ε
``kfac``        per ``nn.Linear`` layer ``P = B ⊗ A + λI`` (:mod:`curvlab.compare.kfac`), other
                coordinates (norms, embeddings, tied heads) ``diag(G) + λ``
``identity``    ``P = I`` (gradient descent; λ is ignored)
==============  =====================================================================

How ``P⁻¹`` is applied:

- ``full`` / ``layerwise``: per unit (the whole matrix, resp. each block ``G_bb``) a dense
  eigendecomposition ``U diag(w) Uᵀ`` when the unit has at most ``dense_max`` coordinates
  (``P⁻¹ v = U (Uᵀ v / (w + λ))``; one decomposition serves every damping), else conjugate
  gradients (:func:`curvlab.linalg.cg`) on ``G`` (``G_bb``) with ``damping=λ`` and relative
  tolerance ``cg_tol``;
- diagonal and Kronecker preconditioners in closed form (K-FAC through the eigendecompositions
  of A and B: ``(B ⊗ A + λI)⁻¹ = (U_B ⊗ U_A) (w_B ⊗ w_A + λ)⁻¹ (U_B ⊗ U_A)ᵀ``).

``diag(G)`` and ``diag(F)`` are exact where a block is held densely, else Hutchinson estimates
(:meth:`curvlab.compare.problem.Curvature.diagonal`); an estimate below 0 is clamped to 0.

A singular ``P`` raises :class:`~curvlab.compare.errors.SingularPreconditionerError`: with
``λ = 0`` a unit of more than ``N (V − 1)`` coordinates (the rank bound of a GGN over N tokens
and V classes), a dense unit whose smallest eigenvalue is below ``n ε`` times its largest, a CG
solve that meets a non-positive curvature or does not converge, or a zero diagonal entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvlab.compare.errors import CompareError, SingularPreconditionerError
from curvlab.compare.kfac import KFACFactors, kfac_factors, linear_layers
from curvlab.compare.problem import Curvature, Problem
from curvlab.errors import ConfigError
from curvlab.linalg import NotPositiveDefiniteError, cg

PRECONDITIONERS = ("full", "layerwise", "diag", "adam", "kfac", "identity")


def check_names(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate preconditioner names (unknown -> :class:`ConfigError` listing the valid ones)."""
    names = tuple(names)
    bad = [n for n in names if n not in PRECONDITIONERS]
    if bad:
        raise ConfigError(f"unknown preconditioner {bad[0]!r}; valid: {', '.join(PRECONDITIONERS)}")
    if not names:
        raise ConfigError(f"no preconditioner given; valid: {', '.join(PRECONDITIONERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"preconditioner listed twice: {', '.join(names)}")
    return names


@dataclass(frozen=True)
class SolveInfo:
    """How ``P⁻¹ g`` was computed: ``method`` (``dense``, ``cg``, ``dense+cg``, ``diagonal``,
    ``kronecker``, ``identity``), CG ``iterations`` (summed over blocks), the largest relative
    residual ``‖r‖ / ‖b‖`` of a CG solve (0 for closed forms) and whether all solves converged."""

    method: str
    iterations: int = 0
    residual: float = 0.0
    converged: bool = True


def _columns(v: torch.Tensor) -> torch.Tensor:
    return v if v.ndim == 2 else v[:, None]


class Preconditioner:
    """``P`` for one damping: ``solve(v) = P⁻¹ v``, ``apply(v) = P v``, ``inv_sqrt(V) =
    P^{-1/2} V`` (``None`` when not available in closed form); ``v`` of shape (n,) or (n, k)."""

    name: str
    damping: float
    info: SolveInfo

    def solve(self, v: torch.Tensor, x0: torch.Tensor | None = None,
              tol: float | None = None) -> torch.Tensor:
        """``P⁻¹ v``; ``x0`` a warm start and ``tol`` a relative tolerance for iterative
        solves (default: the preconditioner's). Only solves at the default tolerance update
        :attr:`info`."""
        raise NotImplementedError

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inv_sqrt(self, v: torch.Tensor) -> torch.Tensor | None:
        return None

    @property
    def has_inv_sqrt(self) -> bool:
        return False


class DiagonalPreconditioner(Preconditioner):
    """``P = diag(values) + λI``."""

    def __init__(self, name: str, values: torch.Tensor, damping: float, method: str = "diagonal"):
        self.name, self.damping = name, float(damping)
        self.p = values + damping
        if not bool((self.p > 0).all()):
            zeros = int((self.p <= 0).sum())
            raise SingularPreconditionerError(
                f"{name} preconditioner is singular ({zeros} zero diagonal entries at damping "
                f"{damping:g}); use a damping > 0")
        self.info = SolveInfo(method)

    def solve(self, v, x0=None, tol=None):
        return v / (self.p if v.ndim == 1 else self.p[:, None])

    def apply(self, v):
        return v * (self.p if v.ndim == 1 else self.p[:, None])

    def inv_sqrt(self, v):
        r = self.p.rsqrt()
        return v * (r if v.ndim == 1 else r[:, None])

    @property
    def has_inv_sqrt(self) -> bool:
        return True


class CurvaturePreconditioner(Preconditioner):
    """``P = C + λI`` (``blocks=False``) or ``blockdiag(C_11, ..., C_bb) + λI`` (``blocks=True``)
    for a :class:`Curvature` ``C``; dense eigendecompositions or CG per unit (module docstring)."""

    def __init__(self, name: str, curv: Curvature, damping: float, *, blocks: bool,
                 rank_bound: int, cg_tol: float = 1e-6, cg_max_iter: int | None = None) -> None:
        self.name, self.curv, self.damping = name, curv, float(damping)
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        n = curv.n
        self.units: list[tuple[slice, int | None]] = (
            [(curv.slice(i), i) for i in range(len(curv.names))] if blocks
            else [(slice(0, n), None)])
        what = lambda i: "G" if i is None else f"block {curv.names[i]!r} of G"  # noqa: E731
        for s, i in self.units:
            if damping == 0 and s.stop - s.start > rank_bound:
                raise SingularPreconditionerError(
                    f"{name}: {what(i)} is singular without damping (rank <= N(V-1) = "
                    f"{rank_bound} < {s.stop - s.start} coordinates); use a damping > 0")
        self.eig = [self._eigh(i) for _, i in self.units]
        if damping == 0:
            for (s, i), e in zip(self.units, self.eig):
                size = s.stop - s.start
                if e is not None and e[0][0] <= size * torch.finfo(e[0].dtype).eps * e[0][-1]:
                    raise SingularPreconditionerError(
                        f"{name}: {what(i)} is singular without damping (smallest eigenvalue "
                        f"{float(e[0][0]):.2e}); use a damping > 0")
        methods = {"dense" if e is not None else "cg" for e in self.eig}
        self.info = SolveInfo("dense+cg" if len(methods) == 2 else methods.pop())

    def _eigh(self, i: int | None):
        e = self.curv.eigh(i)
        return None if e is None else (e[0].clamp(min=0), e[1])

    def _op(self, i: int | None):
        return self.curv.op if i is None else self.curv.sub(i)

    def solve(self, v, x0=None, tol=None):
        out = torch.empty_like(v)
        its, worst, ok = 0, 0.0, True
        for (s, i), e in zip(self.units, self.eig):
            b = v[s]
            if e is not None:
                w, U = e
                scale = 1 / (w + self.damping)
                out[s] = U @ ((U.T @ b) * (scale if b.ndim == 1 else scale[:, None]))
                continue
            try:
                r = cg(self._op(i), b, damping=self.damping, tol=tol or self.cg_tol,
                       max_iter=self.cg_max_iter, x0=None if x0 is None else x0[s])
            except NotPositiveDefiniteError:
                raise SingularPreconditionerError(
                    f"{self.name}: conjugate gradients met non-positive curvature at damping "
                    f"{self.damping:g} (G is singular); use a damping > 0") from None
            self.curv.products += r.iterations * (1 if b.ndim == 1 else b.shape[1])
            rel = float((r.residual_norm / b.norm(dim=0).double().cpu().clamp_min(1e-300)).max())
            its, worst, ok = its + r.iterations, max(worst, rel), ok and bool(r.converged.all())
            if self.damping == 0 and not ok:
                raise SingularPreconditionerError(
                    f"{self.name}: conjugate gradients did not converge without damping "
                    f"(relative residual {rel:.1e}; G is probably singular); use a damping > 0")
            out[s] = r.x
        if tol is None:
            self.info = SolveInfo(self.info.method, its, worst, ok)
        return out

    def apply(self, v):
        parts = []
        for s, i in self.units:
            cv = self.curv.matvec(v[s]) if i is None else self.curv.block_matvec(i, v[s])
            parts.append(cv + self.damping * v[s])
        return torch.cat(parts)

    @property
    def has_inv_sqrt(self) -> bool:
        return all(e is not None for e in self.eig)

    def inv_sqrt(self, v):
        if not self.has_inv_sqrt:
            return None
        out = torch.empty_like(v)
        for (s, _), (w, U) in zip(self.units, self.eig):
            scale = (w + self.damping).rsqrt()
            out[s] = U @ ((U.T @ v[s]) * (scale if v.ndim == 1 else scale[:, None]))
        return out


class KFACPreconditioner(Preconditioner):
    """``B ⊗ A + λI`` on each K-FAC layer's (weight, bias) coordinates, ``diag(G) + λ`` on the
    rest. Coordinates of a layer: its weight row-major ``(o, i)``, then its bias ``o`` (the
    augmented input column ``i = in``)."""

    def __init__(self, factors: list[KFACFactors], offsets: dict[str, int], diag: torch.Tensor,
                 damping: float) -> None:
        self.name, self.damping = "kfac", float(damping)
        self.layers = []
        covered = torch.zeros(diag.shape[0], dtype=torch.bool, device=diag.device)
        for f in factors:
            wa, ua = torch.linalg.eigh((f.A + f.A.T) / 2)
            wb, ub = torch.linalg.eigh((f.B + f.B.T) / 2)
            wa, wb = wa.clamp(min=0), wb.clamp(min=0)
            lam = wb[:, None] * wa[None, :] + damping
            if not bool((lam > 0).all()):
                raise SingularPreconditionerError(
                    f"kfac: the Kronecker factors of {f.layer.module!r} are singular at damping "
                    f"{damping:g}; use a damping > 0")
            ly = f.layer
            w0 = offsets[ly.weight]
            b0 = offsets[ly.bias] if ly.bias else None
            self.layers.append((ly, w0, b0, ua, ub, lam))
            covered[w0:w0 + ly.out_features * ly.in_features] = True
            if b0 is not None:
                covered[b0:b0 + ly.out_features] = True
        self.rest = ~covered
        self.diag = DiagonalPreconditioner("kfac", diag[self.rest], damping)
        self.info = SolveInfo("kronecker")

    def _map(self, v: torch.Tensor, power: float) -> torch.Tensor:
        V = _columns(v)
        out = torch.empty_like(V)
        for ly, w0, b0, ua, ub, lam in self.layers:
            o, i, k = ly.out_features, ly.in_features, V.shape[1]
            m = V[w0:w0 + o * i].reshape(o, i, k)
            if b0 is not None:
                m = torch.cat([m, V[b0:b0 + o].reshape(o, 1, k)], dim=1)
            m = m.permute(2, 0, 1)  # [k, out, in(+1)]
            m = ub @ ((ub.T @ m @ ua) * lam.pow(power)) @ ua.T
            m = m.permute(1, 2, 0)
            out[w0:w0 + o * i] = m[:, :i].reshape(o * i, k)
            if b0 is not None:
                out[b0:b0 + o] = m[:, i]
        rest = V[self.rest]
        p = self.diag.p[:, None]
        out[self.rest] = rest * p.pow(power)
        return out if v.ndim == 2 else out[:, 0]

    def solve(self, v, x0=None, tol=None):
        return self._map(v, -1.0)

    def apply(self, v):
        return self._map(v, 1.0)

    def inv_sqrt(self, v):
        return self._map(v, -0.5)

    @property
    def has_inv_sqrt(self) -> bool:
        return True


class PreconditionerBuilder:
    """Builds preconditioners for one :class:`Problem`, computing each reference quantity once
    (``diag(G)``, ``diag(F)``, the K-FAC factors) and reusing it for every damping."""

    def __init__(self, problem: Problem, *, cg_tol: float = 1e-6, cg_max_iter: int | None = None,
                 diag_probes: int = 64, kfac_estimator: str = "mc", kfac_samples: int = 4,
                 seed: int = 0) -> None:
        self.problem = problem
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self.diag_probes, self.seed = diag_probes, seed
        self.kfac_estimator, self.kfac_samples = kfac_estimator, kfac_samples
        self._cache: dict[str, object] = {}

    def _once(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def diag_ggn(self) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """``diag(G)`` clamped at 0 and per block whether it is exact (else Hutchinson)."""
        def f():
            d, exact = self.problem.ggn.diagonal(self.diag_probes, self.seed)
            return d.clamp(min=0), exact
        return self._once("diag", f)

    def diag_efisher(self) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """``diag(F)`` of the empirical Fisher, clamped at 0, and per block whether exact."""
        def f():
            d, exact = self.problem.efisher().diagonal(self.diag_probes, self.seed + 1)
            return d.clamp(min=0), exact
        return self._once("efisher", f)

    def kfac_factors(self) -> list[KFACFactors]:
        def f():
            p = self.problem
            layers = linear_layers(p.model, p.space)
            return kfac_factors(p.model, p.params, p.batches, layers,
                                estimator=self.kfac_estimator, samples=self.kfac_samples,
                                seed=self.seed, logits_fn=p.logits_fn,
                                ignore_index=p.ignore_index)
        return self._once("kfac", f)

    def make(self, name: str, damping: float) -> Preconditioner:
        """The preconditioner ``name`` (see :data:`PRECONDITIONERS`) at damping ``damping``."""
        check_names([name])
        if damping < 0:
            raise ConfigError(f"damping must be >= 0, got {damping:g}")
        p = self.problem
        if name in ("full", "layerwise"):
            return CurvaturePreconditioner(name, p.ggn, damping, blocks=name == "layerwise",
                                           rank_bound=p.rank_bound, cg_tol=self.cg_tol,
                                           cg_max_iter=self.cg_max_iter)
        if name == "diag":
            return DiagonalPreconditioner("diag", self.diag_ggn()[0], damping)
        if name == "adam":
            return DiagonalPreconditioner("adam", self.diag_efisher()[0].sqrt(), damping)
        if name == "identity":
            ones = torch.ones(p.n, dtype=p.dtype, device=p.device)
            return DiagonalPreconditioner("identity", ones, 0.0, method="identity")
        offsets = {name: off for name, start, _, off in p.space.segments if start == 0}
        return KFACPreconditioner(self.kfac_factors(), offsets, self.diag_ggn()[0], damping)

    def kfac_coverage(self) -> int:
        """Coordinates covered by K-FAC layers (the rest use ``diag(G)``)."""
        total = 0
        for f in self.kfac_factors():
            total += f.layer.out_features * (f.layer.in_features + (f.layer.bias is not None))
        return total


def direction(pre: Preconditioner, g: torch.Tensor, x0: torch.Tensor | None = None
              ) -> torch.Tensor:
    """``d = −P⁻¹ g`` (``x0``: a warm start for ``−d``, used by CG solves); ``pre.info`` then
    says how it was solved."""
    d = -pre.solve(g, x0)
    if not bool(torch.isfinite(d).all()):
        raise CompareError(f"{pre.name} direction holds NaN or Inf values")
    return d
