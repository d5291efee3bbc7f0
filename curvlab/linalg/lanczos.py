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
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from curvlab.linalg.errors import ConvergenceWarning, GhostEigenvalueWarning
from curvlab.linalg.operator import Operator, as_operator, matmat
from curvlab.linalg.progress import Progress, ProgressFn

Which = Literal["top", "bottom", "both"]
Reorth = Literal["full", "selective", "none"]

_CHECK_EVERY = 5  # Lanczos steps between host-side checks (convergence, breakdown, NaN)
_SLAB_ELEMENTS = 1 << 24  # elements of the basis a sweep of a disk basis (or a restart) holds


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
    restarts: int = 0
    coupling: torch.Tensor | None = None


class _Basis:
    """The Lanczos vectors of ``b`` recurrences (at most ``capacity`` per recurrence).

    In memory (``device`` a torch device): chunks of shape ``(b, c, n)`` that grow
    geometrically (no up-front allocation of ``capacity`` vectors). Every operation is a sweep
    over *row slabs* (:meth:`_slabs`): in memory one slab holding every row, on disk
    (:class:`_DiskBasis`) slabs of rows read from the scratch file, so that the algorithms below
    are written once for both stores.
    """

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
        if self.size >= self.capacity:
            raise RuntimeError(f"Lanczos basis is full ({self.capacity} vectors)")
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

    def close(self) -> None:
        """Release the storage (the scratch file of a disk basis)."""
        self.blocks, self.fill = [], []

    @property
    def compute_device(self) -> torch.device:
        """Where the projections run (the host for a disk basis)."""
        return self.device

    def _slabs(self, rows: int | None = None, write: bool = False
               ) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """``(row slice, parts)`` per slab: ``parts`` are ``(b, c_i, rows)`` tensors holding
        vectors ``0 … size−1`` (in order) restricted to the slab's rows. With ``write=True``
        changes made to ``parts`` are stored (in memory they are views: nothing to do)."""
        views = self.views()
        step = rows or self.n
        for lo in range(0, self.n, step):
            sl = slice(lo, min(self.n, lo + step))
            yield sl, [v[:, :, sl] for v in views]

    def _coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """``Qᵀ x`` per recurrence: ``(b, size, 1)`` for ``x`` of shape ``(b, n, 1)``."""
        c = x.new_zeros(self.b, self.size, 1)
        for sl, parts in self._slabs():
            off = 0
            for v in parts:
                c[:, off : off + v.shape[1]] += torch.bmm(v, x[:, sl])
                off += v.shape[1]
        return c

    def project_out(self, w: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """``w − Q Qᵀ w`` per column, classical Gram–Schmidt repeated ``passes`` times
        ("twice is enough"); computed on the basis' compute device (in place there) and
        returned on ``w``'s device. One sweep over the basis per pass plus one: the update of a
        slab of rows by pass ``p`` and its coefficients for pass ``p + 1`` share a read."""
        x = w.T.to(self.compute_device).unsqueeze(-1)  # (b, n, 1)
        if self.size == 0:
            return w
        c = self._coefficients(x)
        for p in range(passes):
            nxt = x.new_zeros(self.b, self.size, 1) if p + 1 < passes else None
            for sl, parts in self._slabs():
                xs, off = x[:, sl], 0
                for v in parts:
                    xs.baddbmm_(v.transpose(1, 2), c[:, off : off + v.shape[1]], alpha=-1)
                    off += v.shape[1]
                if nxt is not None:
                    off = 0
                    for v in parts:
                        nxt[:, off : off + v.shape[1]] += torch.bmm(v, xs)
                        off += v.shape[1]
            c = nxt
        return x.squeeze(-1).T.to(w.device)

    def max_overlap(self, w: torch.Tensor) -> float:
        """``max |Qᵀ w|`` over all columns (a measure of lost orthogonality)."""
        if self.size == 0:
            return 0.0
        x = w.T.to(self.compute_device).unsqueeze(-1)
        return float(self._coefficients(x).abs().max())

    def ritz_vectors(self, S: np.ndarray, column: int = 0) -> torch.Tensor:
        """Unit columns of ``Q S`` for recurrence ``column``; ``S`` is ``(size, r)``; returned
        on the basis' compute device."""
        S = torch.as_tensor(S, dtype=self.dtype, device=self.compute_device)
        Y = torch.zeros(self.n, S.shape[1], dtype=self.dtype, device=self.compute_device)
        for sl, parts in self._slabs():
            off = 0
            for v in parts:
                Y[sl] += v[column].T @ S[off : off + v.shape[1]]
                off += v.shape[1]
        return Y / torch.linalg.vector_norm(Y, dim=0).clamp_min(torch.finfo(self.dtype).tiny)

    def rotate(self, S: np.ndarray) -> None:
        """Replace the basis by ``Q S`` (``S``: ``(size, l)``, ``l <= size``; ``b = 1``), in
        place, a slab of rows at a time (extra memory: ``l`` rows of one slab)."""
        l = S.shape[1]
        St = torch.as_tensor(S.T.copy(), dtype=self.dtype, device=self.compute_device)
        rows = max(1, _SLAB_ELEMENTS // max(1, self.size))
        for _, parts in self._slabs(rows, write=True):
            new = torch.zeros(l, parts[0].shape[2], dtype=self.dtype, device=self.compute_device)
            off = 0
            for v in parts:
                new += St[:, off : off + v.shape[1]] @ v[0]
                off += v.shape[1]
            off = 0
            for v in parts:  # write Q S into the first l vectors of this slab
                take = min(v.shape[1], l - off)
                if take <= 0:
                    break
                v[0, :take] = new[off : off + take]
                off += take
        self.truncate(l)


class _DiskBasis(_Basis):
    """A basis in a scratch file (``(slabs, capacity, b, rows)`` of the operator dtype),
    read and written with ``pread``/``pwrite`` one slab of rows at a time, so that it costs
    disk (and the kernel's page cache), not resident memory: a sweep holds one slab of all
    vectors (about ``_SLAB_ELEMENTS`` elements) in a host buffer. The file is unlinked right
    after it is created (POSIX), so it disappears when the process ends however it ends;
    :meth:`close` releases it earlier."""

    def __init__(self, n: int, b: int, capacity: int, dtype: torch.dtype, folder: str | None):
        super().__init__(n, b, capacity, dtype, torch.device("cpu"))
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.rows = max(1, min(n, _SLAB_ELEMENTS // max(1, capacity * b)))
        self.nslabs = -(-n // self.rows)
        self._size = 0
        fd, path = tempfile.mkstemp(prefix=".curvlab-basis-", suffix=".tmp", dir=folder)
        self.fd: int | None = fd
        self.path = path
        try:
            os.unlink(path)  # POSIX: the space is freed when the descriptor closes
            self.unlinked = True
        except OSError:  # (Windows) removed by close()
            self.unlinked = False
        try:
            os.ftruncate(fd, self.nslabs * capacity * b * self.rows * self.itemsize)
        except OSError as e:
            self.close()
            raise ValueError(f"cannot create the disk basis in {folder or 'the temp folder'}: "
                             f"{e.strerror or e}") from None
        self._buf = torch.empty(capacity * b * self.rows, dtype=dtype)

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if not self.unlinked:
                Path(self.path).unlink(missing_ok=True)

    def __del__(self) -> None:
        self.close()

    def _offset(self, slab: int, vector: int) -> int:
        return ((slab * self.capacity + vector) * self.b * self.rows) * self.itemsize

    def _io(self, buf: torch.Tensor, offset: int, write: bool) -> None:
        view = memoryview(buf.view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            part = view[done:]
            got = (os.pwritev(self.fd, [part], offset + done) if write
                   else os.preadv(self.fd, [part], offset + done))
            if got <= 0:
                raise OSError(f"short {'write' if write else 'read'} on the disk basis")
            done += got

    def append(self, q: torch.Tensor) -> None:
        if self._size >= self.capacity:
            raise RuntimeError(f"Lanczos basis is full ({self.capacity} vectors)")
        qt = q.T.to(device="cpu", dtype=self.dtype)  # (b, n)
        row = torch.zeros(self.b, self.rows, dtype=self.dtype)
        for s in range(self.nslabs):
            lo, hi = s * self.rows, min(self.n, (s + 1) * self.rows)
            row[:, : hi - lo] = qt[:, lo:hi]
            if hi - lo < self.rows:
                row[:, hi - lo :] = 0
            self._io(row, self._offset(s, self._size), write=True)
        self._size += 1

    def truncate(self, size: int) -> None:
        self._size = min(self._size, size)

    def _slabs(self, rows: int | None = None, write: bool = False
               ) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        size = self._size
        if size == 0:
            return
        buf = self._buf[: size * self.b * self.rows]
        view = buf.view(size, self.b, self.rows)
        for s in range(self.nslabs):
            lo, hi = s * self.rows, min(self.n, (s + 1) * self.rows)
            self._io(buf, self._offset(s, 0), write=False)
            yield slice(lo, hi), [view[:, :, : hi - lo].transpose(0, 1)]
            if write:
                self._io(buf, self._offset(s, 0), write=True)


def _make_basis(n: int, b: int, capacity: int, dtype: torch.dtype,
                where: torch.device | str | None, default: torch.device,
                scratch_dir: str | os.PathLike | None) -> _Basis:
    """A basis in memory on ``where`` (default: the operator's device) or, for
    ``where="disk"``, in a scratch file in ``scratch_dir`` (default: the temp folder)."""
    if where == "disk":
        return _DiskBasis(n, b, capacity, dtype, None if scratch_dir is None else str(scratch_dir))
    return _Basis(n, b, capacity, dtype, torch.device(where) if where is not None else default)


class _Recurrence:
    """``b`` independent Lanczos recurrences started from the unit columns of ``q0`` (``(n, b)``),
    advanced together with one block product per step.

    Vectors live on the operator's device in its dtype; ``alpha``/``beta`` are float64 tensors on
    the same device (``capacity`` rows: the most steps kept at once), written every step without
    a host synchronization. A breakdown (``β_j <= 10 ε √(j+1) ‖T‖``, ε of the operator dtype) is
    recorded in ``broken_at`` and the column continues with a zero vector; callers look at it in
    :meth:`sync` and truncate/restart or ignore the column. ``reorth="selective"`` reads ``T`` on
    the host every step.

    After a thick restart (:meth:`thick_restart`, ``b = 1``) the first ``l`` steps are locked
    Ritz pairs: ``alpha[:l]`` holds their Ritz values, ``spike`` (``l`` float64 numbers) their
    coupling to vector ``l``, and the projected matrix is ``T = tridiag(beta, alpha, beta)``
    plus ``spike`` in row and column ``l`` (an arrowhead followed by a tridiagonal).
    """

    def __init__(
        self,
        op: Operator,
        q0: torch.Tensor,
        capacity: int,
        reorth: str,
        basis_device: torch.device | str | None,
        keep_basis: bool,
        scratch_dir: str | os.PathLike | None = None,
    ) -> None:
        n, b = q0.shape
        dev = op.device
        self.op, self.reorth, self.capacity = op, reorth, capacity
        self.eps = torch.finfo(op.dtype).eps
        self.alpha = torch.zeros(capacity, b, dtype=torch.float64, device=dev)
        self.beta = torch.zeros(capacity, b, dtype=torch.float64, device=dev)
        self.scale = torch.zeros(b, dtype=torch.float64, device=dev)  # Gershgorin bound of ‖T‖
        self.broken_at = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.q, self.q_prev = q0, torch.zeros_like(q0)
        self.beta_prev = torch.zeros(b, dtype=op.dtype, device=dev)
        self.basis = (_make_basis(n, b, capacity, op.dtype, basis_device, dev, scratch_dir)
                      if keep_basis else None)
        self.locked: list[torch.Tensor | None] = [None] * b  # selective: converged Ritz vectors
        self.locked_values: list[list[float]] = [[] for _ in range(b)]
        self.spike: np.ndarray | None = None  # thick restart: coupling of the locked pairs
        self.steps = 0
        self.products = 0

    def close(self) -> None:
        """Release the basis (removes a disk basis' scratch file)."""
        if self.basis is not None:
            self.basis.close()

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
        # w −= α q + β q_prev, in place (no host synchronization, no temporary vectors)
        w = w.clone() if w is q else w
        w.addcmul_(q, alpha.to(w.dtype), value=-1).addcmul_(self.q_prev, self.beta_prev, value=-1)
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
        self.q_prev, self.q = q, w.div_(torch.where(small, 1.0, beta)).masked_fill_(small, 0.0)
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
                y = self.basis.ritz_vectors(S[:, [i]], c)[:, 0].to(w.device)
                y = self._orthogonalize(y, self.locked[c])
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

    def thick_restart(self, S: np.ndarray, theta: np.ndarray, beta_last: float) -> None:
        """Thick restart (Wu & Simon 2000; ``b = 1``, full reorthogonalization): keep the Ritz
        vectors ``Y = Q S`` (``S``: ``(steps, l)`` eigenvectors of ``T``, ``theta`` their Ritz
        values) and continue from the current next vector ``q``. From
        ``A Q = Q T + β q eᵀ``: ``A Y = Y diag(θ) + q (β S[-1])ᵀ``, so the new projected
        matrix is ``diag(θ)`` bordered by ``spike = β S[-1]`` in row and column ``l`` and the
        recurrence goes on from ``q`` (its projection removes the ``Y`` components)."""
        l = theta.size
        self.basis.rotate(S)
        self.alpha.zero_()
        self.beta.zero_()
        self.alpha[:l, 0] = torch.as_tensor(theta, dtype=torch.float64)
        self.spike = beta_last * S[-1].copy()
        self.steps = l
        self.q_prev = torch.zeros_like(self.q)
        self.beta_prev.zero_()
        self.broken_at.fill_(-1)


def _random_start(op: Operator, b: int, generator: torch.Generator) -> torch.Tensor:
    """``b`` Gaussian unit columns on the operator's device, drawn on the CPU."""
    v = torch.randn(op.shape[0], b, generator=generator, dtype=torch.float64)
    return (v / v.norm(dim=0)).to(dtype=op.dtype, device=op.device)


def _ritz(
    alpha: np.ndarray, beta: np.ndarray, spike: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values (ascending), eigenvectors of ``T`` and residual bounds ``|β_{m−1} s_{m−1}|``.
    ``T = tridiag(beta[:-1], alpha, beta[:-1])``, bordered by ``spike`` in row/column
    ``len(spike)`` after a thick restart (then solved densely: ``T`` is at most the basis size)."""
    if spike is None or spike.size == 0 or alpha.size <= spike.size:
        theta, S = eigh_tridiagonal(alpha, beta[:-1])
    else:
        l = spike.size
        T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
        T[l, :l] = T[:l, l] = spike
        theta, S = np.linalg.eigh(T)
    return theta, S, np.abs(beta[-1] * S[-1])


def _wanted(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the wanted Ritz values, in the output order documented on LanczosResult."""
    desc = np.argsort(theta, kind="stable")[::-1]
    if which == "top":
        return desc[:k]
    if which == "bottom":
        return desc[::-1][:k]
    return desc if theta.size < 2 * k else np.concatenate([desc[:k], desc[-k:]])


def _kept(theta: np.ndarray, which: str, keep: int) -> np.ndarray:
    """Indices of the ``keep`` Ritz values a thick restart keeps: the wanted end(s) of the
    spectrum (for ``"both"`` split between the two ends)."""
    order = np.argsort(theta, kind="stable")
    if which == "top":
        return order[::-1][:keep]
    if which == "bottom":
        return order[:keep]
    hi = (keep + 1) // 2
    return np.concatenate([order[::-1][:hi], order[: keep - hi]])


def _converged(
    alpha: np.ndarray, beta: np.ndarray, block_start: int, which: str, k: int, tol: float,
    spike: np.ndarray | None = None,
) -> bool:
    """All wanted Ritz pairs have ``|β_{m−1} s_{m−1}| <= tol · max|θ|``, and so do the extreme
    Ritz values (in the wanted direction) of the block begun at the last restart: that block
    explores the complement of the invariant subspaces found before it."""
    theta, _, bounds = _ritz(alpha, beta, spike)
    sel, limit = _wanted(theta, which, k), tol * np.abs(theta).max()
    if sel.size < (2 * k if which == "both" else k) or (bounds[sel] > limit).any():
        return False
    if block_start == 0:
        return True
    _, _, last = _ritz(alpha[block_start:], beta[block_start:])
    ends = {"top": [-1], "bottom": [0], "both": [0, -1]}[which]
    return bool((last[ends] <= limit).all())


def _block_adds_nothing(
    alpha: np.ndarray, beta: np.ndarray, block_start: int, which: str, k: int, tol: float,
    spike: np.ndarray | None = None,
) -> bool:
    """After a breakdown of a restarted block: the wanted eigenvalues are the same (to
    ``tol · max|θ|``) with and without that block, so further restarts are not expected to help.
    (A block that adds a copy of a wanted eigenvalue reveals a multiplicity: keep going.)"""
    theta = _ritz(alpha, beta, spike)[0]
    before = _ritz(alpha[:block_start], beta[:block_start], spike)[0]
    now, then = theta[_wanted(theta, which, k)], before[_wanted(before, which, k)]
    limit = tol * np.abs(theta).max()
    wanted = 2 * k if which == "both" else k
    return now.size == then.size == wanted and bool((np.abs(now - then) <= limit).all())


def default_basis_size(k: int, which: str = "top") -> int:
    """ARPACK's default ``ncv``: ``max(2k' + 1, 20)`` vectors (``k' = k``, ``2k`` for both)."""
    wanted = 2 * k if which == "both" else k
    return max(2 * wanted + 1, 20)


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
    basis_size: int | None = None,
    scratch_dir: str | os.PathLike | None = None,
    verify: bool = False,
    progress: ProgressFn | None = None,
) -> LanczosResult:
    """Extreme eigenpairs of the symmetric operator ``op`` by the Lanczos process.

    Runs at most ``max_iter`` steps (default ``min(n, max(100, 10 k'))``, ``k' = k`` or ``2k``
    for ``which="both"``; capped at ``n``; with ``basis_size``: ``max(300, 30 k')``, not capped)
    from a Gaussian start vector drawn with ``seed``, and stops at the first check (every few
    steps once ``k'`` Ritz values exist) where all wanted Ritz pairs satisfy
    ``|β_{m−1} s_{m−1}| <= tol · max|θ|`` (relative residual). A breakdown
    ``β_j ≈ 0`` means the Krylov space is an invariant subspace: its Ritz values are exact;
    the process then restarts from a random vector orthogonal to the basis (when one is kept) so
    that repeated eigenvalues are found with their multiplicity. With ``max_iter >= n`` (and no
    ``basis_size``) the whole space is spanned and the eigenvalues are exact to rounding.

    ``basis_size=m`` bounds the basis to ``m`` vectors (``k' + 1 <= m``) by **thick restart**
    (Wu & Simon 2000, the symmetric case of Krylov–Schur): when ``m`` vectors are kept and the
    wanted pairs are not converged, ``T_m = S Θ Sᵀ`` is solved, the ``l = k' + (m − k')//2``
    (at most ``m − 1``) Ritz vectors ``Y = Q_m S_l`` at the wanted end(s) replace the basis
    (``A Y = Y Θ_l + q_{m+1} (β_m S_l[m−1])ᵀ``, so ``Q = [Y, q_{m+1}]`` stays a Krylov
    decomposition with an arrowhead ``T``), and Lanczos continues from ``q_{m+1}``. Needs
    ``reorth="full"``. Memory: ``m`` basis vectors plus three working vectors.

    Reorthogonalization: ``"full"`` projects every new vector against all kept ones (two passes
    of classical Gram–Schmidt; cost ``O(n m)`` per step, ``m`` vectors kept); ``"selective"``
    only against converged Ritz vectors (Parlett–Scott; one host sync per step); ``"none"`` is
    the bare three-term recurrence: orthogonality is lost as soon as a Ritz value converges and
    ghost copies of converged eigenvalues appear, which raises :class:`GhostEigenvalueWarning`.
    ``basis_device="cpu"`` keeps the Krylov basis in host memory (products stay on the
    operator's device; each step then moves two vectors each way for the projection);
    ``basis_device="disk"`` keeps it in a scratch file in ``scratch_dir`` (default: the
    temporary folder), read a slab of rows at a time, removed at the end of the call (also when
    it raises) and unlinked from the folder from the start. ``verify=True`` recomputes the
    residual norms with one block product of the Ritz vectors. ``progress`` is called with a
    :class:`~curvlab.linalg.progress.Progress` after every step (Ritz values and residuals as of
    the last check).

    Raises ``ValueError`` for ``k < 1``, ``k`` (``2k`` for ``"both"``) larger than ``n`` or
    ``max_iter``, ``basis_size < k' + 1`` or without ``reorth="full"``, an unknown
    ``which``/``reorth``, and an operator that returns NaN/Inf.
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
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    bounded = basis_size is not None and basis_size < n
    if basis_size is not None:
        if basis_size < wanted + 1:
            raise ValueError(f"basis_size={basis_size} must be at least k'+1={wanted + 1} "
                             f"({wanted} wanted eigenvalues and one new direction)")
        if bounded and reorth != "full":
            raise ValueError(f"basis_size needs reorth='full' (thick restarts keep an "
                             f"orthonormal basis), got reorth={reorth!r}")
    if bounded:
        max_steps = max(300, 30 * wanted) if max_iter is None else max_iter
    else:
        max_steps = min(n, max(100, 10 * wanted) if max_iter is None else max_iter)
    if max_steps < wanted:
        raise ValueError(f"max_iter={max_iter} is smaller than the {wanted} wanted eigenvalues")
    if verify and not return_vectors:
        raise ValueError("verify=True needs return_vectors=True")

    gen = torch.Generator().manual_seed(seed)
    keep_basis = reorth != "none" or return_vectors
    capacity = min(basis_size, max_steps) if bounded else max_steps
    keep = min(wanted + (capacity - wanted) // 2, capacity - 1)
    rec = _Recurrence(op, _random_start(op, 1, gen), capacity, reorth, basis_device, keep_basis,
                      scratch_dir)
    try:
        return _lanczos_loop(op, rec, gen, k, which, wanted, tol, max_steps, keep,
                             return_vectors, verify, reorth, progress)
    finally:
        rec.close()


def _lanczos_loop(op, rec: _Recurrence, gen, k, which, wanted, tol, max_steps, keep,
                  return_vectors, verify, reorth, progress) -> LanczosResult:
    """The iteration of :func:`lanczos` (one loop for the full and the restarted basis)."""
    capacity = rec.capacity
    done, restarts = 0, 0  # steps kept (wasted breakdown steps are not), thick restarts
    block_start, next_check = 0, wanted  # first step of the current Krylov block; next check
    report: tuple[np.ndarray, np.ndarray, int] | None = None

    def tell() -> None:
        if progress is not None:
            values, res, conv = report if report is not None else (None, None, 0)
            progress(Progress("lanczos", rec.products, max(max_steps, rec.products), values,
                              res, conv, restarts))

    while True:
        rec.step()
        done += 1
        m = rec.steps
        if m < min(next_check, capacity) and done < max_steps:
            tell()
            continue
        young = block_start > 0 and m - block_start < _CHECK_EVERY  # restarts often break early
        next_check = m + (1 if young else _CHECK_EVERY)
        alpha, beta, broken = rec.sync()
        alpha, beta, spike = alpha[:, 0], beta[:, 0], rec.spike
        if broken[0] >= 0:  # invariant subspace: exact Ritz values; restart to look beyond it
            done -= m - (int(broken[0]) + 1)
            m = int(broken[0]) + 1
            rec.truncate(m)
            alpha, beta = alpha[:m], np.append(beta[: m - 1], 0.0)
            if block_start > 0 and _block_adds_nothing(alpha, beta, block_start, which, k, tol,
                                                       spike):
                break
            if done >= max_steps:
                break
            if m >= capacity:  # no room for a new block: compress to the wanted Ritz pairs
                theta, S, _ = _ritz(alpha, beta, spike)
                sel = _kept(theta, which, keep)
                rec.thick_restart(S[:, sel], theta[sel], 0.0)
                restarts += 1
                m = rec.steps
                alpha, beta, spike = theta[sel], np.zeros(m), rec.spike
            if not rec.restart(gen):
                break
            block_start, next_check = m, m + 1
        elif done >= max_steps or _converged(alpha, beta, block_start, which, k, tol, spike):
            break
        elif m >= capacity:  # the basis is full: thick restart
            theta, S, bounds = _ritz(alpha, beta, spike)
            sel = _kept(theta, which, keep)
            rec.thick_restart(S[:, sel], theta[sel], float(beta[-1]))
            restarts += 1
            block_start, next_check = 0, rec.steps + 1
        theta, _, bounds = _ritz(alpha, beta, spike)
        w = _wanted(theta, which, k)
        scale = np.abs(theta).max() or 1.0
        report = (theta[w], bounds[w] / scale, int((bounds[w] <= tol * scale).sum()))
        tell()

    theta, S, bounds = _ritz(alpha, beta, spike)
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
    report = (theta[sel], bounds[sel] / (np.abs(theta).max() or 1.0), int(converged.sum()))
    tell()

    if sel.size < wanted:
        warnings.warn(
            f"Krylov space exhausted after {m} steps: only {sel.size} of {wanted} eigenvalues "
            f"(use reorth='full' or return_vectors=True to restart)",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif not converged.all():
        warnings.warn(
            f"{int((~converged).sum())} of {wanted} Ritz pairs not converged to tol={tol:g} "
            f"after {done} Lanczos steps (max_iter={max_steps})",
            ConvergenceWarning,
            stacklevel=3,
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
        iterations=done,
        products=products,
        which=which,
        tol=tol,
        orthogonality=orthogonality,
        verified_residual_norms=verified,
        restarts=restarts,
        coupling=None if spike is None else torch.from_numpy(spike.copy()),
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
