"""SOAP's eigenbasis: first basis by float64 eigh, refreshes by sorted power iteration + QR."""

import pytest
import torch

from curvlab.train import optimizers
from curvlab.train.optimizers import SOAP


def _degenerate_factor(n: int = 32, used: int = 5) -> torch.Tensor:
    """G Gᵀ of an embedding-like gradient: only ``used`` rows are non-zero (tokens seen)."""
    g = torch.zeros(n, 8)
    g[:used] = torch.randn(used, 8, generator=torch.Generator().manual_seed(0))
    return g @ g.T


def test_eigenvectors_of_a_degenerate_factor_are_finite_orthonormal_and_sorted():
    gg = _degenerate_factor()
    q = optimizers._eigenvectors(gg)
    assert q.dtype == gg.dtype and torch.isfinite(q).all()
    assert torch.allclose(q.T @ q, torch.eye(32), atol=1e-5)
    d = (q.T @ gg @ q).diagonal()
    assert (d[:-1] >= d[1:] - 1e-4).all()  # largest first, as the refresh sorts
    assert torch.allclose(q.T @ gg @ q, torch.diag(d), atol=1e-4 * gg.abs().max())


def test_eigenvectors_fall_back_to_the_identity_when_eigh_fails(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(
        torch.linalg.LinAlgError("no")))
    assert torch.equal(optimizers._eigenvectors(_degenerate_factor()), torch.eye(32))
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (m * float("nan"), m * float("nan")))
    assert torch.equal(optimizers._eigenvectors(_degenerate_factor()), torch.eye(32))


def test_refresh_sorts_the_second_moment_with_the_basis_and_converges_to_the_eigenbasis():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    gg = a @ a.T
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    q0 = torch.linalg.eigh(gg)[1].flip(-1)[:, perm]  # the eigenbasis, columns shuffled
    v = torch.arange(6 * 4, dtype=torch.float64).reshape(6, 4)
    state = {"GG": [gg, None], "Q": [q0, None], "exp_avg_sq": v.clone()}
    SOAP._refresh(state)
    # columns re-sorted by eigenvalue, rows of the rotated second moment moved with them
    order = torch.argsort(perm)
    assert torch.equal(state["exp_avg_sq"], v[order])
    d = state["Q"][0].T @ gg @ state["Q"][0]
    assert torch.allclose(d, torch.diag(d.diagonal()), atol=1e-8 * gg.abs().max())
    # from a poor basis, repeated refreshes (power iterations) approach the eigenbasis
    state = {"GG": [gg, None], "Q": [torch.eye(6, dtype=torch.float64), None],
             "exp_avg_sq": v.clone()}
    for _ in range(200):
        SOAP._refresh(state)
    d = state["Q"][0].T @ gg @ state["Q"][0]
    off = d - torch.diag(d.diagonal())
    assert off.abs().max() < 1e-6 * gg.abs().max()


def test_soap_stays_finite_on_an_embedding_with_unused_rows():
    """The regression behind the refresh: a 256 x 64 embedding whose gradient touches a few rows
    only, many refreshes, float32."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256, 64, generator=gen) * 0.02)
    opt = SOAP([p], lr=3e-3, betas=(0.9, 0.999), precondition_frequency=2)
    for _ in range(40):
        rows = torch.randint(0, 12, (6,), generator=gen)
        p.grad = torch.zeros_like(p)
        p.grad[rows] = torch.randn(6, 64, generator=gen) * 1e-3
        opt.step()
        assert torch.isfinite(p).all()
    q = opt.state[p]["Q"][0]
    assert torch.allclose(q.T @ q, torch.eye(256), atol=1e-4)


if __name__ == "__main__":
    pytest.main([__file__])
