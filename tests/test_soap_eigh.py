import pytest
import torch

from curvlab.train import optimizers


def test_soap_eigenvectors_survive_eigh_failure(monkeypatch):
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    gg = a @ a.T
    real = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    q = optimizers._eigenvectors(gg, None)
    assert calls == [torch.float32, torch.float64] and q.dtype == torch.float32
    d = q.T @ gg @ q
    assert torch.allclose(d, torch.diag(d.diagonal()), atol=1e-3 * gg.abs().max())
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(
        torch.linalg.LinAlgError("no")))
    prev = torch.eye(6)
    assert optimizers._eigenvectors(gg, prev) is prev


if __name__ == "__main__":
    pytest.main([__file__])
