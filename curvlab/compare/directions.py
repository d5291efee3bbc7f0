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
``shampoo``     per matrix ``W [m, c]``: ``P = L^{1/4} ⊗ R^{1/4} + λI`` (so ``d_W ≈
                −L^{-1/4} G R^{-1/4}``), other coordinates ``adam``
``soap``        per matrix: ``P = (Q_L ⊗ Q_R) diag(√D + λ) (Q_L ⊗ Q_R)ᵀ``, Adam's diagonal in
                Shampoo's eigenbasis; other coordinates ``adam``
``muon``        per hidden matrix ``d_W = −0.2 √max(m, c) · NS(g_W)`` (not a linear P), other
                coordinates the ``adam`` direction
``identity``    ``P = I`` (gradient descent; λ is ignored)
==============  =====================================================================

The first-order baselines, on one batch (no moving averages, no momentum):

- ``shampoo`` / ``soap`` (curvlab's ``SOAP`` optimizer, :mod:`curvlab.train.optimizers`):
  for a matrix parameter ``W [m, c]`` covered whole by one part of the partition, the
  Kronecker factors of the per-token gradients ``G_n = ∇_W ℓ_n`` (per *token*, as ``diag F``),
  ``L = (1/(N c)) Σ_n G_n G_nᵀ`` and ``R = (1/(N m)) Σ_n G_nᵀ G_n``
  (:func:`curvlab.compare.per_token.empirical_statistics`; normalized so that for isotropic
  per-token gradients ``L^{1/4} ⊗ R^{1/4} = diag(F)^{1/2}``, i.e. λ is in the units of the
  gradient, as for ``adam``), with eigendecompositions ``L = Q_L diag(w_L) Q_Lᵀ``,
  ``R = Q_R diag(w_R) Q_Rᵀ``. ``shampoo``: eigenvalues ``w_L^{1/4} w_R^{1/4} + λ`` in that
  basis. ``soap``: eigenvalues ``√D + λ`` with ``D = (1/N) Σ_n (Q_Lᵀ G_n Q_R)²``, the diagonal
  of F in the rotated basis (:func:`~curvlab.compare.per_token.rotated_diagonal`); with
  ``Q = I`` it is ``adam``. A factor with more than ``max_precond_dim`` rows is replaced by its
  diagonal (identity basis on that side, as the optimizer does). Vectors (norms, biases) and
  partly covered matrices get ``adam``.
- ``muon`` (curvlab's ``Muon`` optimizer): for each hidden matrix (2-D parameters inside the
  transformer blocks, :func:`curvlab.train.hidden_matrices`) covered whole, the orthogonalized
  gradient by the optimizer's own :func:`curvlab.train.newton_schulz` (5 quintic steps), times
  the optimizer's ``0.2 √max(m, c)``; on a single batch Muon's first (Nesterov) step is this
  (Newton-Schulz is scale-invariant). Elsewhere (embeddings, head, vectors) the ``adam``
  direction ``−g / (diag(F)^{1/2} + λ)``, as the optimizer gives those parameters to AdamW.
  λ acts only on that side. The map is not linear in g, so it has no spectrum.

How ``P⁻¹`` is applied:

- ``full`` / ``layerwise``: per unit (the whole matrix, resp. each block ``G_bb``) a dense
  eigendecomposition ``U diag(w) Uᵀ`` when the unit has at most ``dense_max`` coordinates
  (``P⁻¹ v = U (Uᵀ v / (w + λ))``; one decomposition serves every damping), else conjugate
  gradients (:func:`curvlab.linalg.cg`) on ``G`` (``G_bb``) with ``damping=λ`` and relative
  tolerance ``cg_tol``;
- diagonal and Kronecker preconditioners in closed form (:class:`EigenbasisPreconditioner`:
  K-FAC through the eigendecompositions of A and B, ``(B ⊗ A + λI)⁻¹ = (U_B ⊗ U_A)
  (w_B ⊗ w_A + λ)⁻¹ (U_B ⊗ U_A)ᵀ``, Shampoo and SOAP in the eigenbases of L and R).

``diag(G)`` (:func:`curvlab.compare.per_token.ggn_diagonal`) is the diagonal of the dense block
where a block is held densely, else exact from per-token root columns of ``diag p − ppᵀ`` when
their ``N · V`` pullbacks are at most ``diag_exact_max``, else a Monte-Carlo estimate with
``diag_samples`` labels per token (a sum of squares: never negative, never clamped).
``diag(F)`` is always exact (one pullback per token).

A singular ``P`` raises :class:`~curvlab.compare.errors.SingularPreconditionerError`: with
``λ = 0`` a unit of more than ``N (V − 1)`` coordinates (the rank bound of a GGN over N tokens
and V classes), a dense unit whose smallest eigenvalue is below ``n ε`` times its largest, a CG
solve that meets a non-positive curvature or does not converge, or a zero diagonal entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curvlab.compare.errors import CompareError, SingularPreconditionerError
from curvlab.compare.kfac import KFACFactors, kfac_factors, linear_layers, whole_parameters
from curvlab.compare.per_token import (
    DiagonalEstimate,
    EmpiricalStatistics,
    empirical_statistics,
    ggn_diagonal,
    rotated_diagonal,
)
from curvlab.compare.problem import Curvature, Problem
from curvlab.errors import ConfigError
from curvlab.linalg import NotPositiveDefiniteError, cg

PRECONDITIONERS = ("full", "layerwise", "diag", "adam", "kfac", "shampoo", "soap", "muon",
                   "identity")


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
    linear: bool = True  # False: ``solve`` is a nonlinear map of g (muon); no apply/spectrum

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


@dataclass(frozen=True, eq=False)
class KroneckerUnit:
    """``P`` on the coordinates of one matrix: its ``rows x cols`` weight row-major from
    offset ``weight``, then (``bias`` not None) a bias column of ``rows`` coordinates from
    offset ``bias``; ``P = (U_left ⊗ U_right) diag(values) (U_left ⊗ U_right)ᵀ`` with
    orthonormal ``left`` [rows, rows] and ``right`` [cols(+1), cols(+1)] (``None``: the
    identity) and ``values`` [rows, cols(+1)] (damping included, > 0)."""

    weight: int
    bias: int | None
    rows: int
    cols: int
    left: torch.Tensor | None
    right: torch.Tensor | None
    values: torch.Tensor


class EigenbasisPreconditioner(Preconditioner):
    """``P`` block-diagonal over :class:`KroneckerUnit` s (K-FAC, Shampoo, SOAP), ``diag(rest)``
    on the other coordinates (``rest_values`` [n], damping included; used where no unit
    covers a coordinate). ``P^p v`` for any power p in closed form."""

    def __init__(self, name: str, units: list[KroneckerUnit], rest_values: torch.Tensor,
                 damping: float, method: str = "kronecker") -> None:
        self.name, self.damping, self.units = name, float(damping), units
        covered = torch.zeros(rest_values.shape[0], dtype=torch.bool, device=rest_values.device)
        for u in units:
            if not bool((u.values > 0).all()):
                raise SingularPreconditionerError(
                    f"{name}: the Kronecker factors of a {u.rows}x{u.cols} matrix are singular "
                    f"at damping {damping:g}; use a damping > 0")
            covered[u.weight:u.weight + u.rows * u.cols] = True
            if u.bias is not None:
                covered[u.bias:u.bias + u.rows] = True
        self.rest = ~covered
        self.p = rest_values[self.rest]
        if not bool((self.p > 0).all()):
            raise SingularPreconditionerError(
                f"{name} preconditioner is singular ({int((self.p <= 0).sum())} zero diagonal "
                f"entries at damping {damping:g}); use a damping > 0")
        self.info = SolveInfo(method)

    def _map(self, v: torch.Tensor, power: float) -> torch.Tensor:
        V = _columns(v)
        out = torch.empty_like(V)
        k = V.shape[1]
        for u in self.units:
            o, i = u.rows, u.cols
            m = V[u.weight:u.weight + o * i].reshape(o, i, k)
            if u.bias is not None:
                m = torch.cat([m, V[u.bias:u.bias + o].reshape(o, 1, k)], dim=1)
            m = m.permute(2, 0, 1)  # [k, rows, cols(+1)]
            if u.left is not None:
                m = u.left.T @ m
            if u.right is not None:
                m = m @ u.right
            m = m * u.values.pow(power)
            if u.right is not None:
                m = m @ u.right.T
            if u.left is not None:
                m = u.left @ m
            m = m.permute(1, 2, 0)
            out[u.weight:u.weight + o * i] = m[:, :i].reshape(o * i, k)
            if u.bias is not None:
                out[u.bias:u.bias + o] = m[:, i]
        out[self.rest] = V[self.rest] * self.p[:, None].pow(power)
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


def _eigh(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues and eigenvectors of a symmetric PSD factor; eigenvalues below
    ``d ε max(w)`` (roundoff of a rank-deficient factor, which Shampoo's fourth root would
    magnify to ``(d ε)^{1/4}`` of the largest) are set to 0. A 1-D factor is a diagonal: its
    values and ``None`` (the identity basis)."""
    if factor.ndim == 1:
        return factor.clamp(min=0), None
    w, q = torch.linalg.eigh((factor + factor.T) / 2)
    floor = factor.shape[0] * torch.finfo(w.dtype).eps * w.max().clamp(min=0)
    return torch.where(w > floor, w, 0.0), q


def kfac_preconditioner(factors: list[KFACFactors], offsets: dict[str, int],
                        diag: torch.Tensor, damping: float) -> EigenbasisPreconditioner:
    """``B ⊗ A + λI`` on each K-FAC layer's (weight, bias) coordinates, ``diag(G) + λ`` on the
    rest. Coordinates of a layer: its weight row-major ``(o, i)``, then its bias ``o`` (the
    augmented input column ``i = in``)."""
    units = []
    for f in factors:
        wa, ua = _eigh(f.A)
        wb, ub = _eigh(f.B)
        ly = f.layer
        units.append(KroneckerUnit(offsets[ly.weight], offsets[ly.bias] if ly.bias else None,
                                   ly.out_features, ly.in_features, ub, ua,
                                   wb[:, None] * wa[None, :] + damping))
    return EigenbasisPreconditioner("kfac", units, diag + damping, damping)


class MuonDirection(Preconditioner):
    """Muon's direction map (module docstring): ``solve(g)`` returns, per hidden matrix unit
    ``(offset, rows, cols)``, ``0.2 √max(rows, cols) · NS(g_W)`` and ``g / adam`` elsewhere
    (``adam`` the damped ``diag(F)^{1/2} + λ``). Not linear: no ``apply`` or ``inv_sqrt``."""

    linear = False

    def __init__(self, units: list[tuple[int, int, int]], adam: torch.Tensor,
                 damping: float, steps: int = 5) -> None:
        from curvlab.train import newton_schulz  # the optimizer's own iteration

        self.name, self.damping, self.units, self.steps = "muon", float(damping), units, steps
        self.ns = newton_schulz
        self.adam = adam
        if not bool((adam > 0).all()):
            raise SingularPreconditionerError(
                f"muon: the Adam side is singular at damping {damping:g}; use a damping > 0")
        self.info = SolveInfo("newton-schulz")

    def solve(self, v, x0=None, tol=None):
        if v.ndim != 1:
            raise CompareError("muon's direction map takes one vector")
        out = v / self.adam
        for off, rows, cols in self.units:
            m = v[off:off + rows * cols].reshape(rows, cols)
            scale = 0.2 * math.sqrt(max(rows, cols))
            out[off:off + rows * cols] = scale * self.ns(m, self.steps).reshape(-1)
        return out

    def apply(self, v):
        raise CompareError("muon is not a linear preconditioner (no P to apply)")


class PreconditionerBuilder:
    """Builds preconditioners for one :class:`Problem`, computing each reference quantity once
    (``diag(G)``, ``diag(F)`` and the Kronecker factors of the per-token gradients, SOAP's
    rotated diagonal, the K-FAC factors) and reusing it for every damping."""

    def __init__(self, problem: Problem, *, cg_tol: float = 1e-6, cg_max_iter: int | None = None,
                 diag_exact_max: int = 4096, diag_samples: int = 64,
                 kfac_estimator: str = "mc", kfac_samples: int = 4,
                 max_precond_dim: int = 10000, seed: int = 0) -> None:
        if diag_exact_max < 0 or diag_samples < 1:
            raise ConfigError("diag_exact_max must be >= 0 and diag_samples >= 1")
        if max_precond_dim < 1:
            raise ConfigError("max_precond_dim must be >= 1")
        self.problem = problem
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self.diag_exact_max, self.diag_samples, self.seed = diag_exact_max, diag_samples, seed
        self.kfac_estimator, self.kfac_samples = kfac_estimator, kfac_samples
        self.max_precond_dim = max_precond_dim
        self._cache: dict[str, object] = {}

    def _once(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def diag_ggn(self) -> DiagonalEstimate:
        """``diag(G)``: dense, exact or Monte-Carlo per block
        (:func:`curvlab.compare.per_token.ggn_diagonal`)."""
        return self._once("diag", lambda: ggn_diagonal(
            self.problem, exact_max=self.diag_exact_max, samples=self.diag_samples,
            seed=self.seed))

    def matrices(self) -> dict[str, int]:
        """2-D parameters covered whole by one part of the partition -> their offsets (the
        matrices of ``shampoo``, ``soap``; ``muon`` takes the hidden ones)."""
        p = self.problem
        return {name: off for name, off in whole_parameters(p.space).items()
                if len(p.space.shapes[name]) == 2}

    def empirical(self) -> EmpiricalStatistics:
        """``diag(F)`` and the Kronecker factors of :meth:`matrices` (one per-token pass)."""
        return self._once("empirical", lambda: empirical_statistics(
            self.problem, list(self.matrices()), max_dim=self.max_precond_dim))

    def diag_efisher(self) -> DiagonalEstimate:
        """``diag(F)`` of the empirical Fisher, exact (per-token gradients)."""
        return self.empirical().diagonal

    def kronecker_eigen(self) -> dict[str, tuple[tuple[torch.Tensor, torch.Tensor | None],
                                                 tuple[torch.Tensor, torch.Tensor | None]]]:
        """Per matrix the eigendecompositions ``((w_L, Q_L), (w_R, Q_R))`` of its factors."""
        return self._once("eigen", lambda: {
            m: (_eigh(left), _eigh(right))
            for m, (left, right) in self.empirical().factors.items()})

    def soap_diagonal(self) -> dict[str, torch.Tensor]:
        """SOAP's ``D`` per matrix (:func:`curvlab.compare.per_token.rotated_diagonal`)."""
        return self._once("soap", lambda: rotated_diagonal(self.problem, {
            m: (el[1], er[1]) for m, (el, er) in self.kronecker_eigen().items()}))

    def kfac_factors(self) -> list[KFACFactors]:
        def f():
            p = self.problem
            layers = linear_layers(p.model, p.space)
            return kfac_factors(p.model, p.params, p.batches, layers,
                                estimator=self.kfac_estimator, samples=self.kfac_samples,
                                seed=self.seed, logits_fn=p.logits_fn,
                                ignore_index=p.ignore_index)
        return self._once("kfac", f)

    def _adam(self, damping: float) -> torch.Tensor:
        return self.diag_efisher().values.sqrt() + damping

    def _kronecker(self, name: str, damping: float) -> EigenbasisPreconditioner:
        units = []
        offsets = self.matrices()
        soap = self.soap_diagonal() if name == "soap" else None
        for m, ((wl, ql), (wr, qr)) in self.kronecker_eigen().items():
            rows, cols = self.problem.space.shapes[m]
            if soap is not None:
                values = soap[m].sqrt() + damping
            else:
                values = wl.pow(0.25)[:, None] * wr.pow(0.25)[None, :] + damping
            units.append(KroneckerUnit(offsets[m], None, rows, cols, ql, qr, values))
        return EigenbasisPreconditioner(name, units, self._adam(damping), damping)

    def muon_matrices(self) -> dict[str, int]:
        """Muon's matrices: hidden 2-D parameters (inside the transformer blocks) covered whole
        by one part of the partition -> their offsets."""
        from curvlab.train import hidden_matrices

        hidden = set(hidden_matrices(self.problem.model))
        return {m: off for m, off in self.matrices().items() if m in hidden}

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
            return DiagonalPreconditioner("diag", self.diag_ggn().values, damping)
        if name == "adam":
            return DiagonalPreconditioner("adam", self.diag_efisher().values.sqrt(), damping)
        if name == "identity":
            ones = torch.ones(p.n, dtype=p.dtype, device=p.device)
            return DiagonalPreconditioner("identity", ones, 0.0, method="identity")
        if name in ("shampoo", "soap"):
            return self._kronecker(name, damping)
        if name == "muon":
            units = [(off, *p.space.shapes[m]) for m, off in self.muon_matrices().items()]
            return MuonDirection(units, self._adam(damping), damping)
        offsets = {name: off for name, start, _, off in p.space.segments if start == 0}
        return kfac_preconditioner(self.kfac_factors(), offsets, self.diag_ggn().values,
                                   damping)

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
