"""curvlab.linalg against dense float64 references (torch.linalg.eigvalsh / solve / trace).

Test matrices are ``Q diag(λ) Qᵀ`` with a known spectrum and a seeded random orthogonal ``Q``;
the operator is a custom object that counts products, so that product accounting and the use of
block products ``op @ V`` are checked too.
"""

import importlib
import math
import os
import warnings

import numpy as np
import pytest
import torch

from curvlab.linalg import (
    ConvergenceWarning,
    DenseOperator,
    GhostEigenvalueWarning,
    NotPositiveDefiniteError,
    as_operator,
    block_spectral_densities,
    cg,
    check_operator,
    hutchinson,
    hutchpp,
    lanczos,
    spectral_density,
)
from curvlab.linalg.operator import random_probes

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These are many tiny products; on a loaded 2-core machine each multi-threaded MKL call on a
    150 x 10 block costs milliseconds of OpenMP wake-up, single-threaded microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sym(eigs, seed=0) -> torch.Tensor:
    """``Q diag(eigs) Qᵀ`` (float64) with a random orthogonal ``Q``."""
    eigs = torch.as_tensor(np.asarray(eigs, dtype=np.float64))
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    A = (Q * eigs) @ Q.T
    return (A + A.T) / 2


class Counting:
    """A matrix behind the operator interface, counting calls, columns and block calls."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.shape, self.dtype, self.device = matrix.shape, matrix.dtype, matrix.device
        self.calls = self.columns = self.block_calls = 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.columns += 1 if v.ndim == 1 else v.shape[1]
        self.block_calls += v.ndim == 2
        return self.matrix @ v


def _spectrum(n=150, seed=0):
    """Spread top, a tight cluster, a bulk, and a geometric (PSD) bottom."""
    rng = np.random.default_rng(seed)
    return np.concatenate([
        np.linspace(20, 11, 10),
        5 + 1e-4 * np.arange(40),
        rng.uniform(2, 4, n - 60),
        np.geomspace(1e-2, 1, 10),
    ])


EIGS = _spectrum()
A = sym(EIGS)
N = A.shape[0]
TRUE = torch.linalg.eigvalsh(A)  # ascending


# ---------------------------------------------------------------- operators


def test_as_operator_wraps_tensors_and_passes_operators_through():
    op = as_operator(A)
    assert isinstance(op, DenseOperator) and op.shape == (N, N) and op.dtype == F64
    v = torch.ones(N, dtype=F64)
    assert torch.equal(op @ v, A @ v)
    custom = Counting(A)
    assert as_operator(custom) is custom and check_operator(custom) == N


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(3, 4), ValueError, "square"),
    (torch.zeros(3), ValueError, "square"),
    (torch.zeros(2, 2, 2), ValueError, "square"),
    (torch.zeros(3, 3, dtype=torch.int64), ValueError, "floating"),
    (torch.zeros(0, 0), ValueError, "dimension 0"),
    ("not an operator", TypeError, "shape"),
])
def test_check_operator_rejects(bad, error, match):
    with pytest.raises(error, match=match):
        as_operator(bad)


# ---------------------------------------------------------------- lanczos


def _reference(which, k):
    top, bottom = TRUE.flip(0)[:k], TRUE[:k]
    return {"top": top, "bottom": bottom, "both": torch.cat([top, bottom.flip(0)])}[which]


@pytest.mark.parametrize("reorth", ["full", "selective"])
@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_lanczos_eigenvalues_match_eigvalsh(which, reorth):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged, no ghosts: no warning at all
        res = lanczos(A, 10, which, reorth=reorth, max_iter=N)
    ref = _reference(which, 10)
    assert res.eigenvalues.dtype == F64 and res.eigenvalues.shape == ref.shape
    assert torch.allclose(res.eigenvalues, ref, rtol=1e-8, atol=0)
    assert bool(res.converged.all())
    if which != "bottom":
        assert bool((res.eigenvalues.diff() <= 0).all())  # descending
    else:
        assert bool((res.eigenvalues.diff() >= 0).all())  # ascending


def test_ritz_vectors_and_residual_norms_are_honest():
    res = lanczos(A, 10, "both", max_iter=N, verify=True)
    V, lam = res.eigenvectors, res.eigenvalues
    assert V.shape == (N, 20) and V.dtype == F64
    assert torch.allclose(V.T @ V, torch.eye(20, dtype=F64), atol=1e-10)
    actual = torch.linalg.vector_norm(A @ V - V * lam, dim=0)
    norm = float(TRUE.abs().max())
    assert float(actual.max()) <= 10 * res.tol * norm
    # reported |β s| and the recomputed residuals agree with the direct computation
    assert torch.allclose(res.residual_norms, actual, rtol=1e-2, atol=1e-13 * norm)
    assert torch.allclose(res.verified_residual_norms, actual, rtol=1e-6, atol=1e-14 * norm)
    assert res.orthogonality < 1e-12


def test_lanczos_stops_early_and_counts_products():
    op = Counting(A)
    res = lanczos(op, 3, "top", tol=1e-10)
    assert torch.allclose(res.eigenvalues, TRUE.flip(0)[:3], rtol=1e-10, atol=0)
    assert bool(res.converged.all())
    assert res.products == op.calls == op.columns == res.iterations  # no restart, no verify
    assert res.products < N // 3  # the top is well separated: far fewer steps than n
    assert res.alpha.shape == res.beta.shape == (res.iterations,)
    assert res.alpha.dtype == res.beta.dtype == F64
    # T = tridiag(beta[:-1], alpha, beta[:-1]) has the Ritz values
    T = torch.diag(res.alpha) + torch.diag(res.beta[:-1], 1) + torch.diag(res.beta[:-1], -1)
    assert torch.allclose(torch.linalg.eigvalsh(T).flip(0)[:3], res.eigenvalues, rtol=1e-12)


def test_lanczos_verify_uses_one_block_product():
    op = Counting(A)
    res = lanczos(op, 4, verify=True)
    assert op.block_calls == 1 and res.products == op.columns == res.iterations + 4


def test_lanczos_is_deterministic_in_seed():
    a, b, c = lanczos(A, 3, seed=1), lanczos(A, 3, seed=1), lanczos(A, 3, seed=2)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert not torch.equal(a.alpha[:3], c.alpha[:3])


def test_exhausted_krylov_space_gives_exact_eigenvalues_with_multiplicity():
    eigs = np.concatenate([[3.0] * 5, [2.0] * 5, np.linspace(-1, 1, 30)])
    res = lanczos(sym(eigs, seed=1), 10, "top", max_iter=100)  # capped at n = 40
    assert res.iterations == 40
    assert torch.allclose(res.eigenvalues, torch.tensor([3.0] * 5 + [2.0] * 5, dtype=F64),
                          atol=1e-12, rtol=0)
    assert bool(res.converged.all())


def test_breakdown_restarts_find_multiplicities():
    # diagonal: each Krylov block spans {e_2-part, e_1-part} exactly and breaks down after 2 steps
    op = Counting(torch.diag(torch.tensor([2.0] * 20 + [1.0] * 20, dtype=F64)))
    res = lanczos(op, 5, "both")
    assert res.eigenvalues.shape == (10,)
    assert torch.allclose(res.eigenvalues, torch.tensor([2.0] * 5 + [1.0] * 5, dtype=F64),
                          atol=1e-14, rtol=0)
    assert bool(res.converged.all())
    assert int((res.beta[:-1] == 0).sum()) >= 4  # restarts after breakdowns
    assert res.products == op.calls < 2 * res.iterations


def test_distinct_spectrum_exact_after_n_steps():
    eigs = np.random.default_rng(3).normal(size=60)
    res = lanczos(sym(eigs, seed=3), 30, "both", max_iter=60)
    assert torch.allclose(res.eigenvalues, torch.from_numpy(np.sort(eigs)[::-1].copy()),
                          atol=1e-12, rtol=0)


def test_identity_breaks_down_immediately_and_restarts():
    op = Counting(torch.eye(50, dtype=F64))
    res = lanczos(op, 3, "both")
    assert res.eigenvalues.shape == (6,)
    assert torch.allclose(res.eigenvalues, torch.ones(6, dtype=F64), rtol=0, atol=1e-14)
    assert bool(res.converged.all()) and op.calls < 25


def test_ghost_eigenvalues_warn_without_reorthogonalization():
    # a few large, well separated eigenvalues converge fast; without reorthogonalization the
    # Lanczos vectors then lose orthogonality and a second copy of 100 appears
    # (the 4th and 5th eigenvalues sit in a cluster and take many steps to converge)
    B = sym(np.concatenate([[100.0, 50.0, 20.0], np.linspace(0, 1, 97)]), seed=2)
    with pytest.warns(GhostEigenvalueWarning, match="ghost"):
        plain = lanczos(B, 5, reorth="none", max_iter=100)
    assert int((plain.eigenvalues - 100).abs().lt(1e-6).sum()) >= 2  # the ghost is real
    assert plain.orthogonality > 1e-2
    for reorth in ["full", "selective"]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = lanczos(B, 5, reorth=reorth, max_iter=100)
        ref = torch.linalg.eigvalsh(B).flip(0)[:5]
        assert torch.allclose(res.eigenvalues, ref, rtol=1e-10, atol=0)


def test_ghost_warning_without_basis():
    B = sym(np.concatenate([[100.0, 50.0, 20.0], np.linspace(0, 1, 97)]), seed=2)
    with pytest.warns(GhostEigenvalueWarning, match="duplicate"):
        res = lanczos(B, 5, reorth="none", max_iter=100, return_vectors=False)
    assert res.eigenvectors is None and res.orthogonality is None


def test_not_converged_warns():
    with pytest.warns(ConvergenceWarning, match="not converged"):
        res = lanczos(A, 10, "bottom", max_iter=20)
    assert not bool(res.converged.all()) and res.iterations == 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=N + 1), "dimension"),
    (dict(k=N // 2 + 1, which="both"), "2k"),
    (dict(k=0), "at least 1"),
    (dict(k=10, max_iter=5), "max_iter"),
    (dict(k=3, which="middle"), "which"),
    (dict(k=3, reorth="partial"), "reorth"),
    (dict(k=3, return_vectors=False, verify=True), "verify"),
])
def test_lanczos_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos(A, **kwargs)


class _NaNAfter(Counting):
    def __init__(self, matrix, bad_call):
        super().__init__(matrix)
        self.bad_call = bad_call

    def __matmul__(self, v):
        out = super().__matmul__(v)
        if self.calls == self.bad_call:
            out = out.clone()
            out[3] = math.nan
        return out


def test_nan_operator_raises():
    with pytest.raises(ValueError, match="non-finite values at iteration 4$"):
        lanczos(_NaNAfter(A, 4), 3)


def test_basis_offload_to_cpu():
    res = lanczos(A, 5, basis_device="cpu")
    ref = lanczos(A, 5)
    assert res.eigenvectors.device == torch.device("cpu")
    assert torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=1e-14, atol=0)
    assert torch.allclose(res.eigenvectors, ref.eigenvectors, atol=1e-12)


def test_float32_products_float64_recurrence():
    res = lanczos(Counting(A.float()), 5, verify=True)
    assert res.eigenvectors.dtype == torch.float32
    assert res.alpha.dtype == res.beta.dtype == res.eigenvalues.dtype == F64
    assert torch.allclose(res.eigenvalues, TRUE.flip(0)[:5], rtol=1e-5, atol=0)
    assert float(res.verified_residual_norms.max()) < 1e-5 * float(TRUE.max())


# ---------------------------------------------------------------- SLQ


def test_slq_density_integrates_to_one_and_weights_sum_to_one():
    sd = spectral_density(A, probes=4, steps=30, seed=0)
    assert sd.probes == 4 and all(t.numel() == 30 for t in sd.nodes)
    for w in sd.weights:
        assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-12
    grid = sd.grid(4000)
    rho = sd.density(grid)
    assert float(rho.min()) >= 0
    assert abs(float(torch.trapezoid(rho, grid)) - 1) < 1e-6
    narrow = sd.density(grid, sigma=0.05)
    assert abs(float(torch.trapezoid(narrow, grid)) - 1) < 1e-6
    assert float(torch.trapezoid(rho * grid, grid)) == pytest.approx(sd.moment(1), rel=1e-6)
    assert sd.moment(0) == pytest.approx(1.0, abs=1e-12)


def test_slq_trace_and_moments_within_standard_errors():
    op = Counting(A)
    sd = spectral_density(op, probes=10, steps=30, seed=1)
    assert op.calls == op.block_calls == 30 and op.columns == sd.products == 300
    trace = float(TRUE.sum())
    assert sd.trace_stderr > 0
    assert abs(sd.trace_estimate - trace) <= 4 * sd.trace_stderr
    # Gauss quadrature with 30 nodes is exact for t², so moment(2) is Hutchinson's estimate of
    # tr(A²)/n with the same probes: check it against a direct computation
    z = random_probes(as_operator(A), 10, torch.Generator().manual_seed(1)) / math.sqrt(N)
    direct = float(((A @ z) ** 2).sum(0).mean())
    assert sd.moment(2) == pytest.approx(direct, rel=1e-10)


def test_slq_with_n_steps_reproduces_the_spectrum():
    sd = spectral_density(A, probes=1, steps=500, seed=3)  # steps capped at n
    assert sd.steps == N and sd.nodes[0].numel() == N
    assert torch.allclose(sd.nodes[0], TRUE, atol=1e-10, rtol=0)
    # the weights are the squared components of the probe along the eigenvectors
    z = random_probes(as_operator(A), 1, torch.Generator().manual_seed(3))[:, 0]
    assert sd.trace_estimate == pytest.approx(float(z @ A @ z), rel=1e-10)


@pytest.mark.parametrize("reorth", ["none", "selective"])
def test_slq_other_reorthogonalizations(reorth):
    sd = spectral_density(A, probes=3, steps=40, seed=0, reorth=reorth)
    full = spectral_density(A, probes=3, steps=40, seed=0)
    assert sd.trace_estimate == pytest.approx(full.trace_estimate, rel=1e-10)
    grid = full.grid(2000)
    assert float(torch.trapezoid(sd.density(grid), grid)) == pytest.approx(1.0, abs=1e-6)


def test_slq_low_rank_stops_at_breakdown():
    rng = np.random.default_rng(4)
    L = sym(np.concatenate([rng.uniform(1, 2, 5), np.zeros(95)]), seed=4)
    op = Counting(L)
    sd = spectral_density(op, probes=3, steps=60, seed=0)
    assert all(t.numel() <= 8 for t in sd.nodes)
    assert op.calls < 20 and sd.products == 3 * op.calls
    for w in sd.weights:
        assert abs(float(w.sum()) - 1) < 1e-12


def test_block_spectral_densities_equal_single_calls():
    blocks = {"a": A[:40, :40], "b": A[40:, 40:]}
    out = block_spectral_densities(blocks, probes=2, steps=10, seed=5)
    assert list(out) == ["a", "b"]
    for name, block in blocks.items():
        single = spectral_density(block, probes=2, steps=10, seed=5)
        assert out[name].n == block.shape[0]
        assert all(torch.equal(x, y) for x, y in zip(out[name].nodes, single.nodes))


# ---------------------------------------------------------------- trace estimators


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_within_standard_errors(distribution):
    op = Counting(A)
    est = hutchinson(op, samples=100, seed=0, distribution=distribution, block_size=32)
    assert est.samples == est.matvecs == op.columns == 100
    assert op.calls == op.block_calls == 4  # ceil(100 / 32) block products
    assert 0 < est.stderr and abs(est.estimate - float(TRUE.sum())) <= 4 * est.stderr


def test_standard_errors_match_theory():
    # Var(zᵀAz) = 2 (‖A‖_F² − Σ A_ii²) for Rademacher z; SLQ's trace is the same estimator
    sd_theory = math.sqrt(2 * (float((A**2).sum()) - float((A.diagonal() ** 2).sum())))
    est = hutchinson(A, samples=400, seed=1)
    assert est.stderr == pytest.approx(sd_theory / math.sqrt(400), rel=0.2)
    sd = spectral_density(A, probes=100, steps=5, seed=1)
    assert sd.trace_stderr == pytest.approx(sd_theory / math.sqrt(100), rel=0.3)


def test_hutchinson_rademacher_exact_on_diagonal():
    D = torch.diag(torch.arange(1.0, 51.0, dtype=F64))
    est = hutchinson(D, samples=7, seed=0)
    assert est.estimate == pytest.approx(float(D.trace()), rel=1e-14) and est.stderr < 1e-12


def test_hutchpp_within_standard_errors_and_better_than_hutchinson():
    eigs = 1.0 / np.arange(1, 201) ** 2  # fast decay: the sketch captures most of the trace
    B = sym(eigs, seed=6)
    op = Counting(B)
    pp = hutchpp(op, matvecs=60, seed=0)
    assert pp.matvecs == op.columns == 60 and pp.samples == 20
    assert op.block_calls == op.calls
    assert abs(pp.estimate - eigs.sum()) <= 4 * pp.stderr
    plain = hutchinson(B, samples=60, seed=0)
    assert pp.stderr < plain.stderr / 10


def test_hutchpp_exact_for_low_rank():
    rng = np.random.default_rng(7)
    L = sym(np.concatenate([rng.uniform(1, 5, 8), np.zeros(92)]), seed=7)
    est = hutchpp(L, matvecs=30, seed=0)
    assert est.estimate == pytest.approx(float(L.trace()), rel=1e-10)
    assert est.stderr < 1e-10


def test_trace_argument_errors():
    with pytest.raises(ValueError, match="distribution"):
        hutchinson(A, samples=4, distribution="uniform")
    with pytest.raises(ValueError, match="3 matvecs"):
        hutchpp(A, matvecs=2)


# ---------------------------------------------------------------- CG


def test_cg_matches_solve_with_damping():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(N, generator=g, dtype=F64)
    B = torch.randn(N, 3, generator=g, dtype=F64)
    shifted = A + 0.1 * torch.eye(N, dtype=F64)
    res = cg(A, b, damping=0.1, tol=1e-12)
    x = torch.linalg.solve(shifted, b)
    assert bool(res.converged) and res.x.shape == (N,)
    assert torch.allclose(res.x, x, rtol=0, atol=1e-8 * float(x.abs().max()))
    assert float(res.residual_norm) <= 1e-12 * float(b.norm())
    op = Counting(A)
    block = cg(op, B, damping=0.1, tol=1e-12)
    assert block.x.shape == (N, 3) and bool(block.converged.all())
    assert torch.allclose(block.x, torch.linalg.solve(shifted, B), rtol=0, atol=1e-8)
    assert op.calls == op.block_calls == block.iterations  # one block product per step


def test_cg_initial_guess_and_iteration_cap():
    b = torch.ones(N, dtype=F64)
    x = torch.linalg.solve(A, b)
    assert cg(A, b, x0=x, tol=1e-8).iterations == 0
    capped = cg(A, b, max_iter=3)
    assert capped.iterations == 3 and not bool(capped.converged)


def test_cg_indefinite_raises_unless_damped():
    B = sym(np.linspace(-1, 1, 50), seed=8)
    b = torch.ones(50, dtype=F64)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite .* add damping"):
        cg(B, b)
    with pytest.raises(ValueError):  # NotPositiveDefiniteError is a ValueError
        cg(B, b, damping=0.5)
    res = cg(B, b, damping=1.5, tol=1e-10)
    assert torch.allclose(res.x, torch.linalg.solve(B + 1.5 * torch.eye(50, dtype=F64), b),
                          atol=1e-8)


def test_cg_nan_operator_raises():
    with pytest.raises(ValueError, match="non-finite values at iteration 2"):
        cg(_NaNAfter(A, 2), torch.ones(N, dtype=F64))


# ---------------------------------------------------------------- bounded memory (issue 20)


def _scratch_fds(folder) -> list[str]:
    """Open descriptors of this process pointing into ``folder`` (deleted files included)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return out


@pytest.mark.parametrize("which, size", [("top", 11), ("bottom", 13), ("both", 21)])
@pytest.mark.parametrize("where", [None, "disk"])
def test_restarted_lanczos_equals_full_basis_and_eigvalsh(which, size, where, tmp_path):
    scale = float(TRUE.abs().max())
    full = lanczos(A, 10, which, tol=1e-12, max_iter=N)
    op = Counting(A)
    res = lanczos(op, 10, which, tol=1e-12, basis_size=size, basis_device=where,
                  scratch_dir=tmp_path, max_iter=3000, verify=True)
    assert res.restarts > 0 and bool(res.converged.all())  # restarts were forced
    ref = _reference(which, 10)
    assert float((res.eigenvalues - ref).abs().max()) <= 1e-10 * scale
    assert float((res.eigenvalues - full.eigenvalues).abs().max()) <= 1e-10 * scale
    V = res.eigenvectors
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1], dtype=F64), atol=1e-10)
    assert float(res.verified_residual_norms.max()) <= 1e-10 * scale
    assert res.products == op.columns and res.orthogonality < 1e-12
    # the arrowhead-plus-tridiagonal T of the last cycle has the Ritz values
    l = res.coupling.numel()
    T = torch.diag(res.alpha) + torch.diag(res.beta[:-1], 1) + torch.diag(res.beta[:-1], -1)
    T[l, :l] = T[:l, l] = res.coupling
    ev = torch.linalg.eigvalsh(T)
    assert float((res.eigenvalues[:, None] - ev).abs().min(1).values.max()) <= 1e-12 * scale
    assert res.alpha.shape[0] <= size and os.listdir(tmp_path) == []


def test_restarted_lanczos_keeps_at_most_basis_size_vectors(monkeypatch):
    sizes = []

    class Spy(Counting):
        def __matmul__(self, v):
            sizes.append(rec_basis[0].size)
            return super().__matmul__(v)

    lz = importlib.import_module("curvlab.linalg.lanczos")
    rec_basis = []
    original = lz._make_basis

    def spy(*args, **kw):
        basis = original(*args, **kw)
        rec_basis.append(basis)
        return basis

    monkeypatch.setattr(lz, "_make_basis", spy)
    res = lanczos(Spy(A), 5, tol=1e-10, basis_size=8)
    assert res.restarts > 0 and max(sizes) == 8 and sum(b.numel() for b in
                                                        rec_basis[0].blocks) <= 8 * N


def test_disk_basis_is_removed_after_the_run_and_an_interruption(tmp_path):
    seen = []

    class Interrupt(Counting):
        def __init__(self, matrix, at):
            super().__init__(matrix)
            self.at = at

        def __matmul__(self, v):
            seen.append(_scratch_fds(tmp_path))
            if self.calls + 1 == self.at:
                raise KeyboardInterrupt
            return super().__matmul__(v)

    lanczos(Interrupt(A, 10**9), 3, basis_size=6, basis_device="disk", scratch_dir=tmp_path)
    # while it ran, the scratch file was open but already unlinked from the folder
    assert seen and all(len(s) == 1 and s[0].endswith("(deleted)") for s in seen)
    assert os.listdir(tmp_path) == [] and _scratch_fds(tmp_path) == []
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        lanczos(Interrupt(A, 7), 3, basis_size=6, basis_device="disk", scratch_dir=tmp_path)
    assert len(seen) == 7 and len(seen[-1]) == 1
    assert os.listdir(tmp_path) == [] and _scratch_fds(tmp_path) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=5, basis_size=5), "basis_size=5 must be at least"),
    (dict(k=3, which="both", basis_size=6), "at least k'\\+1=7"),
    (dict(k=3, basis_size=10, reorth="none"), "needs reorth='full'"),
    (dict(k=3, max_iter=0), "max_iter must be at least 1"),
])
def test_restart_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos(A, **kwargs)


def test_lanczos_progress_reports():
    reports = []
    res = lanczos(A, 4, tol=1e-10, basis_size=9, progress=reports.append)
    assert [r.done for r in reports[:3]] == [1, 2, 3]
    assert all(r.task == "lanczos" and r.total >= r.done for r in reports)
    assert reports[-1].done == res.products and reports[-1].converged == 4
    assert np.allclose(reports[-1].values, res.eigenvalues.numpy())
    assert reports[-1].restarts == res.restarts > 0
    assert any(r.values is not None and r.converged < 4 for r in reports)


def test_slq_probe_blocks_and_disk_basis(tmp_path):
    ref = spectral_density(A, probes=4, steps=20, seed=3)
    same = spectral_density(A, probes=4, steps=20, seed=3, block_size=4, basis_device="disk",
                            scratch_dir=tmp_path)
    for a, b in zip(ref.nodes + ref.weights, same.nodes + same.weights):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    reports = []
    one = spectral_density(A, probes=4, steps=20, seed=3, block_size=1, progress=reports.append)
    assert one.probes == 4 and one.products == 80 and reports[-1].done == 80
    assert all(abs(float(w.sum()) - 1) < 1e-12 for w in one.weights)
    assert abs(one.trace_estimate - float(TRUE.sum())) < 4 * one.trace_stderr
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="block_size"):
        spectral_density(A, block_size=0)


def test_hutchpp_in_place_sketch_matches_qr_and_reports():
    # the same estimate as an explicit QR of the same sketch (r <= block_size: same draws)
    op = as_operator(A)
    gen = torch.Generator().manual_seed(5)
    S = random_probes(op, 10, gen)
    Q = torch.linalg.qr(A @ S).Q
    top = float((Q * (A @ Q)).sum())
    Z = random_probes(op, 10, gen)
    Z = Z - Q @ (Q.T @ Z)
    expect = top + float((Z * (A @ Z)).sum(0).mean())
    reports = []
    est = hutchpp(A, matvecs=30, seed=5, progress=reports.append)
    assert abs(est.estimate - expect) <= 1e-10 * abs(expect)
    assert reports[-1].done == 30 and reports[-1].task == "hutchpp"
