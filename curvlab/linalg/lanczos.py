"""The Lanczos process: extreme eigenpairs of a symmetric operator from a Krylov space.

From a unit vector ``q_0`` the recurrence

    β_j q_{j+1} = A q_j − α_j q_j − β_{j−1} q_{j−1},    α_j = q_jᵀ A q_j,   β_j = ‖·‖

builds an orthonormal basis ``Q_m = [q_0 … q_{m−1}]`` of the Krylov space
``span{q_0, A q_0, …, A^{m−1} q_0}`` with ``Q_mᵀ A Q_m = T_m = tridiag(β, α, β)`` and
``A Q_m = Q_m T_m + β_{m−1} q_m e_mᵀ``. An eigenpair ``T_m s = θ s`` gives a Ritz pair
``(θ, y = Q_m s)`` with residual ``‖A y − θ y‖ = |β_{m−1} s_{m−1}|``; the extreme Ritz values
converge first. :class:`_Recurrence` runs ``b`` such recurrences side by side with block products
(one per Lanczos step); :func:`lanczos` (``b = 1``) and :func:`curvlab.linalg.spectral_density`
(``b`` = probes) both use it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from curvlab.linalg.errors import ConvergenceWarning, GhostEigenvalueWarning
from curvlab.linalg.operator import Operator, as_operator, matmat

Which = Literal["top", "bottom", "both"]
Reorth = Literal["full", "selective", "none"]

_CHECK_EVERY = 5  # Lanczos steps between host-side checks (convergence, breakdown, NaN)


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Ritz pairs of a symmetric operator ``A`` (``n × n``) from ``iterations`` Lanczos steps.

    eigenvalues: float64 CPU tensor. ``which="top"``: the ``k`` largest, descending;
        ``"bottom"``: the ``k`` smallest, ascending; ``"both"``: the ``k`` largest then the ``k``
        smallest, all ``2k`` descending. Fewer only if the Krylov space was exhausted early
        without a way to restart (``reorth="none"`` and ``return_vectors=False``).
    eigenvectors: ``(n, len(eigenvalues))`` unit Ritz vectors ``Q s`` in the operator's dtype on
        the basis device (the operator's device unless ``basis_device`` was given), or ``None``.
    residual_norms: float64, ``|β_{m−1} s_{m−1}|`` = ``‖A y − θ y‖`` in exact arithmetic (an
        honest estimate as long as ``Q`` stays orthonormal; see ``verified_residual_norms``).
    converged: bool, ``residual_norms <= tol · max|θ|`` (``max|θ|`` over all Ritz values ≈ ‖A‖₂).
    alpha, beta: float64 CPU tensors of length ``iterations``; ``T = tridiag(beta[:-1], alpha,
        beta[:-1])`` and ``beta[-1]`` couples ``q_{m−1}`` to the next (unused) Lanczos vector.
        ``beta[j] == 0`` marks a breakdown (invariant subspace) followed by a restart.
    iterations: Lanczos steps ``m`` kept in ``T`` (products wasted on a breakdown are not).
    products: operator-vector products (columns), all included.
    orthogonality: ``max_j |q_jᵀ q_m|`` of the kept basis and the next Lanczos vector, or ``None``
        when no basis was kept; ~1e-15 with full reorthogonalization in float64.
    verified_residual_norms: ``‖A y − θ y‖`` recomputed with one block product when
        ``verify=True``, else ``None``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residual_norms: torch.Tensor
    converged: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    iterations: int
    products: int
    which: str
    tol: float
    orthogonality: float | None = None
    verified_residual_norms: torch.Tensor | None = None


class _Basis:
    """The Lanczos vectors of ``b`` recurrences, stored on ``device`` in chunks of shape
    ``(b, c, n)`` that grow geometrically (no up-front allocation of ``max_steps`` vectors)."""

    def __init__(self, n: int, b: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.n, self.b, self.capacity, self.dtype, self.device = n, b, capacity, dtype, device
        self.blocks: list[torch.Tensor] = []
        self.fill: list[int] = []

    @property
    def size(self) -> int:
        return sum(self.fill)

    def views(self) -> list[torch.Tensor]:
        return [blk[:, :f] for blk, f in zip(self.blocks, self.fill)]

    def append(self, q: torch.Tensor) -> None:
        """Store the columns of ``q`` (``(n, b)``, any device) as the next basis vectors."""
        if not self.blocks or self.fill[-1] == self.blocks[-1].shape[1]:
            c = max(1, min(max(8, self.size // 2), 256, self.capacity - self.size))
            self.blocks.append(torch.empty(self.b, c, self.n, dtype=self.dtype, device=self.device))
            self.fill.append(0)
        self.blocks[-1][:, self.fill[-1]] = q.T.to(self.device)
        self.fill[-1] += 1

    def truncate(self, size: int) -> None:
        """Keep the first ``size`` vectors."""
        while self.size > size:
            drop = min(self.fill[-1], self.size - size)
            self.fill[-1] -= drop
            if self.fill[-1] == 0:
                self.blocks.pop()
                self.fill.pop()

    def project_out(self, w: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """``w − Q Qᵀ w`` per column, classical Gram–Schmidt repeated ``passes`` times
        ("twice is enough"); computed on the basis device, returned on ``w``'s device."""
        x = w.T.to(self.device).unsqueeze(-1)  # (b, n, 1)
        views = self.views()
        for _ in range(passes):
            coeffs = [torch.bmm(v, x) for v in views]
            for v, c in zip(views, coeffs):
                x = x - torch.bmm(v.transpose(1, 2), c)
        return x.squeeze(-1).T.to(w.device)

    def max_overlap(self, w: torch.Tensor) -> float:
        """``max |Qᵀ w|`` over all columns (a measure of lost orthogonality)."""
        x = w.T.to(self.device).unsqueeze(-1)
        return max((float(torch.bmm(v, x).abs().max()) for v in self.views()), default=0.0)

    def ritz_vectors(self, S: np.ndarray, column: int = 0) -> torch.Tensor:
        """Unit columns of ``Q S`` for recurrence ``column``; ``S`` is ``(size, r)``."""
        S = torch.as_tensor(S, dtype=self.dtype, device=self.device)
        Y = torch.zeros(self.n, S.shape[1], dtype=self.dtype, device=self.device)
        offset = 0
        for v in self.views():
            Y += v[column].T @ S[offset : offset + v.shape[1]]
            offset += v.shape[1]
        return Y / torch.linalg.vector_norm(Y, dim=0).clamp_min(torch.finfo(self.dtype).tiny)


class _Recurrence:
    """``b`` independent Lanczos recurrences started from the unit columns of ``q0`` (``(n, b)``),
    advanced together with one block product per step.

    Vectors live on the operator's device in its dtype; ``alpha``/``beta`` are float64 tensors on
    the same device, written every step without a host synchronization. A breakdown
    (``β_j <= 10 ε √(j+1) ‖T‖``, ε of the operator dtype) is recorded in ``broken_at`` and the
    column continues with a zero vector; callers look at it in :meth:`sync` and truncate/restart
    or ignore the column. ``reorth="selective"`` reads ``T`` on the host every step.
    """

    def __init__(
        self,
        op: Operator,
        q0: torch.Tensor,
        max_steps: int,
        reorth: str,
        basis_device: torch.device | str | None,
        keep_basis: bool,
    ) -> None:
        n, b = q0.shape
        dev = op.device
        self.op, self.reorth, self.max_steps = op, reorth, max_steps
        self.eps = torch.finfo(op.dtype).eps
        self.alpha = torch.zeros(max_steps, b, dtype=torch.float64, device=dev)
        self.beta = torch.zeros(max_steps, b, dtype=torch.float64, device=dev)
        self.scale = torch.zeros(b, dtype=torch.float64, device=dev)  # Gershgorin bound of ‖T‖
        self.broken_at = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.q, self.q_prev = q0, torch.zeros_like(q0)
        self.beta_prev = torch.zeros(b, dtype=op.dtype, device=dev)
        bdev = torch.device(basis_device) if basis_device is not None else dev
        self.basis = _Basis(n, b, max_steps, op.dtype, bdev) if keep_basis else None
        self.locked: list[torch.Tensor | None] = [None] * b  # selective: converged Ritz vectors
        self.locked_values: list[list[float]] = [[] for _ in range(b)]
        self.steps = 0
        self.products = 0

    def step(self) -> None:
        """One Lanczos step for every column: one (block) product and, per ``reorth``, a
        projection against the kept basis (full) or the converged Ritz vectors (selective)."""
        j, q = self.steps, self.q
        if self.basis is not None:
            self.basis.append(q)
        w = matmat(self.op, q)
        self.products += q.shape[1]
        alpha = (q * w).sum(0, dtype=torch.float64)
        self.alpha[j] = alpha
        w = w - alpha.to(w.dtype) * q - self.beta_prev * self.q_prev
        if self.reorth == "full":
            w = self.basis.project_out(w)
        elif self.reorth == "selective":
            w = self._selective(w, j)
        beta = (w * w).sum(0, dtype=torch.float64).sqrt()
        self.beta[j] = beta
        self.scale = torch.maximum(self.scale, alpha.abs() + beta + self.beta_prev.double())
        small = beta <= 10 * self.eps * math.sqrt(j + 1) * self.scale
        self.broken_at = torch.where(small & (self.broken_at < 0), j, self.broken_at)
        beta = torch.where(small, 0.0, beta).to(w.dtype)
        self.q_prev, self.q = q, torch.where(small, 0.0, w / torch.where(small, 1.0, beta))
        self.beta_prev = beta
        self.steps = j + 1

    def _selective(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """Selective orthogonalization (Parlett & Scott 1979): keep ``w`` orthogonal to the Ritz
        vectors of ``T_j`` whose residual bound ``|β_j s_j|`` is below ``√ε ‖T_j‖``; those are the
        directions along which plain Lanczos loses orthogonality and grows ghost copies."""
        alpha = self.alpha[: j + 1].cpu().numpy()
        beta = self.beta[:j].cpu().numpy()
        broken = self.broken_at.cpu().numpy()
        for c in range(w.shape[1]):
            if broken[c] >= 0:
                continue
            wc = self._orthogonalize(w[:, c], self.locked[c])
            beta_j = float(wc.double().norm())
            theta, S = eigh_tridiagonal(alpha[:, c], beta[:, c])
            tol = math.sqrt(self.eps) * np.abs(theta).max()
            new = [
                i for i in range(theta.size)
                if abs(beta_j * S[-1, i]) <= tol
                and all(abs(theta[i] - v) > tol for v in self.locked_values[c])
            ]
            for i in new:  # one at a time so that the locked vectors stay orthonormal
                y = self._orthogonalize(self.basis.ritz_vectors(S[:, [i]], c)[:, 0], self.locked[c])
                if float(y.norm()) > 0.5:
                    y = (y / y.norm()).unsqueeze(1)
                    old = self.locked[c]
                    self.locked[c] = y if old is None else torch.cat([old, y], dim=1)
                    self.locked_values[c].append(float(theta[i]))
            w[:, c] = self._orthogonalize(wc, self.locked[c]) if new else wc
        return w

    @staticmethod
    def _orthogonalize(v: torch.Tensor, Y: torch.Tensor | None) -> torch.Tensor:
        if Y is None:
            return v
        return v - (Y @ (Y.T @ v.to(Y.device))).to(v.device)

    def sync(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copy ``alpha``, ``beta`` (``(steps, b)``) and ``broken_at`` (``(b,)``) to the host.

        Raises ``ValueError`` if the operator produced NaN/Inf (they propagate into α and β).
        """
        alpha = self.alpha[: self.steps].cpu().numpy().copy()
        beta = self.beta[: self.steps].cpu().numpy().copy()
        bad = ~(np.isfinite(alpha) & np.isfinite(beta)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"operator returned non-finite values at iteration {int(np.argmax(bad)) + 1}"
            )
        return alpha, beta, self.broken_at.cpu().numpy()

    def truncate(self, m: int) -> None:
        """Forget the steps after ``m`` (used after a breakdown at step ``m − 1``)."""
        self.steps = m
        self.alpha[m:] = 0
        self.beta[m - 1 :] = 0
        self.broken_at.fill_(-1)
        self.q = torch.zeros_like(self.q)
        self.q_prev = torch.zeros_like(self.q)
        self.beta_prev.zero_()
        if self.basis is not None:
            self.basis.truncate(m)

    def restart(self, generator: torch.Generator) -> bool:
        """Continue from a random unit vector orthogonal to the kept basis (``β = 0`` coupling),
        so that the next steps explore the complement of the invariant subspace found so far.
        Returns ``False`` when there is no basis to orthogonalize against."""
        if self.basis is None:
            return False
        v = self.basis.project_out(_random_start(self.op, self.q.shape[1], generator))
        norm = v.double().norm(dim=0)
        if bool((norm <= 1e3 * self.eps).any()):
            return False
        self.q = v / norm.to(v.dtype)
        return True


def _random_start(op: Operator, b: int, generator: torch.Generator) -> torch.Tensor:
    """``b`` Gaussian unit columns on the operator's device, drawn on the CPU."""
    v = torch.randn(op.shape[0], b, generator=generator, dtype=torch.float64)
    return (v / v.norm(dim=0)).to(dtype=op.dtype, device=op.device)


def _ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values (ascending), eigenvectors of ``T`` and residual bounds ``|β_{m−1} s_{m−1}|``."""
    theta, S = eigh_tridiagonal(alpha, beta[:-1])
    return theta, S, np.abs(beta[-1] * S[-1])


def _wanted(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the wanted Ritz values, in the output order documented on LanczosResult."""
    desc = np.argsort(theta, kind="stable")[::-1]
    if which == "top":
        return desc[:k]
    if which == "bottom":
        return desc[::-1][:k]
    return desc if theta.size < 2 * k else np.concatenate([desc[:k], desc[-k:]])


def _converged(
    alpha: np.ndarray, beta: np.ndarray, block_start: int, which: str, k: int, tol: float
) -> bool:
    """All wanted Ritz pairs have ``|β_{m−1} s_{m−1}| <= tol · max|θ|``, and so do the extreme
    Ritz values (in the wanted direction) of the block begun at the last restart: that block
    explores the complement of the invariant subspaces found before it."""
    theta, _, bounds = _ritz(alpha, beta)
    sel, limit = _wanted(theta, which, k), tol * np.abs(theta).max()
    if sel.size < (2 * k if which == "both" else k) or (bounds[sel] > limit).any():
        return False
    if block_start == 0:
        return True
    _, _, last = _ritz(alpha[block_start:], beta[block_start:])
    ends = {"top": [-1], "bottom": [0], "both": [0, -1]}[which]
    return bool((last[ends] <= limit).all())


def _block_adds_nothing(
    alpha: np.ndarray, beta: np.ndarray, block_start: int, which: str, k: int, tol: float
) -> bool:
    """After a breakdown of a restarted block: the wanted eigenvalues are the same (to
    ``tol · max|θ|``) with and without that block, so further restarts are not expected to help.
    (A block that adds a copy of a wanted eigenvalue reveals a multiplicity: keep going.)"""
    theta, before = _ritz(alpha, beta)[0], _ritz(alpha[:block_start], beta[:block_start])[0]
    now, then = theta[_wanted(theta, which, k)], before[_wanted(before, which, k)]
    limit = tol * np.abs(theta).max()
    wanted = 2 * k if which == "both" else k
    return now.size == then.size == wanted and bool((np.abs(now - then) <= limit).all())


def lanczos(
    op: Operator | torch.Tensor,
    k: int = 10,
    which: Which = "top",
    *,
    max_iter: int | None = None,
    tol: float = 1e-8,
    reorth: Reorth = "full",
    seed: int = 0,
    return_vectors: bool = True,
    basis_device: torch.device | str | None = None,
    verify: bool = False,
) -> LanczosResult:
    """Extreme eigenpairs of the symmetric operator ``op`` by the Lanczos process.

    Runs at most ``max_iter`` steps (default ``min(n, max(100, 10 k'))``, ``k' = k`` or ``2k``
    for ``which="both"``; capped at ``n``) from a Gaussian start vector drawn with ``seed``, and
    stops at the first check (every few steps once ``k'`` Ritz values exist) where all wanted
    Ritz pairs satisfy ``|β_{m−1} s_{m−1}| <= tol · max|θ|`` (relative residual). A breakdown
    ``β_j ≈ 0`` means the Krylov space is an invariant subspace: its Ritz values are exact;
    the process then restarts from a random vector orthogonal to the basis (when one is kept) so
    that repeated eigenvalues are found with their multiplicity. With ``max_iter >= n`` the
    whole space is spanned and the eigenvalues are exact to rounding.

    Reorthogonalization: ``"full"`` projects every new vector against all kept ones (two passes
    of classical Gram–Schmidt; cost ``O(n m)`` per step, ``m`` vectors kept); ``"selective"``
    only against converged Ritz vectors (Parlett–Scott; one host sync per step); ``"none"`` is
    the bare three-term recurrence: orthogonality is lost as soon as a Ritz value converges and
    ghost copies of converged eigenvalues appear, which raises :class:`GhostEigenvalueWarning`.
    ``basis_device="cpu"`` keeps the Krylov basis in host memory (products stay on the
    operator's device; each step then moves two vectors each way for the projection).
    ``verify=True`` recomputes the residual norms with one block product of the Ritz vectors.

    Raises ``ValueError`` for ``k < 1``, ``k`` (``2k`` for ``"both"``) larger than ``n`` or
    ``max_iter``, an unknown ``which``/``reorth``, and an operator that returns NaN/Inf.
    Warns :class:`ConvergenceWarning` when wanted pairs are not converged at the end.
    """
    op = as_operator(op)
    n = op.shape[0]
    if which not in ("top", "bottom", "both"):
        raise ValueError(f"which must be 'top', 'bottom' or 'both', got {which!r}")
    if reorth not in ("full", "selective", "none"):
        raise ValueError(f"reorth must be 'full', 'selective' or 'none', got {reorth!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    wanted = 2 * k if which == "both" else k
    if wanted > n:
        what = f"2k={wanted}" if which == "both" else f"k={k}"
        raise ValueError(f"{what} eigenvalues requested but the operator has dimension {n}")
    max_steps = min(n, max(100, 10 * wanted) if max_iter is None else max_iter)
    if max_steps < wanted:
        raise ValueError(f"max_iter={max_iter} is smaller than the {wanted} wanted eigenvalues")
    if verify and not return_vectors:
        raise ValueError("verify=True needs return_vectors=True")

    gen = torch.Generator().manual_seed(seed)
    keep_basis = reorth != "none" or return_vectors
    rec = _Recurrence(op, _random_start(op, 1, gen), max_steps, reorth, basis_device, keep_basis)
    block_start, next_check = 0, wanted  # first step of the current Krylov block; next check
    while True:
        rec.step()
        m = rec.steps
        if m < min(next_check, max_steps):
            continue
        young = block_start > 0 and m - block_start < _CHECK_EVERY  # restarts often break early
        next_check = m + (1 if young else _CHECK_EVERY)
        alpha, beta, broken = rec.sync()
        alpha, beta = alpha[:, 0], beta[:, 0]
        if broken[0] >= 0:  # invariant subspace: exact Ritz values; restart to look beyond it
            m = int(broken[0]) + 1
            rec.truncate(m)
            alpha, beta = alpha[:m], np.append(beta[: m - 1], 0.0)
            if block_start > 0 and _block_adds_nothing(alpha, beta, block_start, which, k, tol):
                break
            if m >= max_steps or not rec.restart(gen):
                break
            block_start, next_check = m, m + 1
        elif m >= max_steps or _converged(alpha, beta, block_start, which, k, tol):
            break

    theta, S, bounds = _ritz(alpha, beta)
    sel = _wanted(theta, which, k)
    converged = bounds[sel] <= tol * np.abs(theta).max()
    vectors = rec.basis.ritz_vectors(S[:, sel]) if return_vectors else None
    products = rec.products
    verified = None
    if verify:
        Y = vectors.to(op.device)
        R = matmat(op, Y) - Y * torch.as_tensor(theta[sel], dtype=Y.dtype, device=Y.device)
        verified = (R * R).sum(0, dtype=torch.float64).sqrt().cpu()
        products += Y.shape[1]
    orthogonality = rec.basis.max_overlap(rec.q) if rec.basis is not None else None

    if sel.size < wanted:
        warnings.warn(
            f"Krylov space exhausted after {m} steps: only {sel.size} of {wanted} eigenvalues "
            f"(use reorth='full' or return_vectors=True to restart)",
            ConvergenceWarning,
            stacklevel=2,
        )
    elif not converged.all():
        warnings.warn(
            f"{int((~converged).sum())} of {wanted} Ritz pairs not converged to tol={tol:g} "
            f"after {m} Lanczos steps (max_iter={max_steps})",
            ConvergenceWarning,
            stacklevel=2,
        )
    if reorth == "none":
        _warn_ghosts(theta, bounds, orthogonality, math.sqrt(rec.eps))

    return LanczosResult(
        eigenvalues=torch.from_numpy(theta[sel].copy()),
        eigenvectors=vectors,
        residual_norms=torch.from_numpy(bounds[sel].copy()),
        converged=torch.from_numpy(converged),
        alpha=torch.from_numpy(alpha.copy()),
        beta=torch.from_numpy(beta.copy()),
        iterations=m,
        products=products,
        which=which,
        tol=tol,
        orthogonality=orthogonality,
        verified_residual_norms=verified,
    )


def _warn_ghosts(
    theta: np.ndarray, bounds: np.ndarray, orthogonality: float | None, sqrt_eps: float
) -> None:
    """Warn if converged Ritz values come in duplicate copies or ``max |Qᵀ q| > √ε``."""
    scale = np.abs(theta).max()
    good = np.sort(theta[bounds <= sqrt_eps * scale])
    copies = int((np.diff(good) <= sqrt_eps * scale).sum())
    lost = orthogonality is not None and orthogonality > sqrt_eps
    if copies or lost:
        overlap = "" if orthogonality is None else f", max |Qᵀq| = {orthogonality:.1e}"
        warnings.warn(
            f"reorth='none': Lanczos vectors lost orthogonality ({copies} converged Ritz values "
            f"duplicate others{overlap}); eigenvalues may contain spurious copies (ghosts); "
            f"use reorth='full'",
            GhostEigenvalueWarning,
            stacklevel=3,
        )
