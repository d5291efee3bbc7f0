"""Every supported Hugging Face family, through the path users take: a tiny random model
saved with ``save_pretrained`` and loaded with ``curvlab.load_model``.

For each family: (a) float32 logits equal the stock model's own forward (float32, its default
attention); (b) float64 logits equal them to 1e-5 relative; (c) a dispatch spy sees no
floating-point operation below float64 in the float64 forward nor in one GGN product; (d) the
top GGN eigenvalue from curvlab's Lanczos equals the one of a dense float64 GGN built here from
a Jacobian by plain reverse-mode autograd and the per-token softmax Hessian.
"""

from __future__ import annotations

import pytest
import torch

import curvlab
from curvlab.models.float64 import LowPrecisionSpy
from tests import hf_families

transformers = pytest.importorskip(
    "transformers", reason="optional dependency transformers not installed (.ci/run installs it)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _inputs(seed: int, shape=(2, hf_families.SEQ)) -> torch.Tensor:
    return torch.randint(0, hf_families.VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def dense_top_ggn_eigenvalue(model: torch.nn.Module, batch: curvlab.Batch) -> float:
    """λ_max(G), G = Σ_t J_tᵀ H_t J_t with H_t = (diag p_t − p_t p_tᵀ)/N, from A = Lᵀ J where
    L L ᵀ = H per token (L_t = (diag √p_t − p_t √p_tᵀ)/√N): the nonzero eigenvalues of
    G = Aᵀ A are those of A Aᵀ (rows: tokens × vocabulary). J by one reverse-mode pass per
    logit (autograd.grad), independent of curvlab's operators."""
    params = [p for p in model.parameters()]
    logits = model(batch.inputs).logits.reshape(-1, hf_families.VOCAB)
    rows = []
    for i in range(logits.numel()):
        g = torch.autograd.grad(logits.reshape(-1)[i], params, retain_graph=True,
                                allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                               for x, p in zip(g, params)]))
    J = torch.stack(rows).reshape(logits.shape[0], logits.shape[1], -1)  # [N, V, n]
    p = logits.detach().softmax(-1)
    n_tok = p.shape[0]
    sq = p.sqrt()
    L = (torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]) / n_tok ** 0.5  # [N, V, V]
    A = torch.einsum("tvw,tvn->twn", L, J).reshape(-1, J.shape[-1])
    return float(torch.linalg.eigvalsh(A @ A.T)[-1])


@pytest.mark.parametrize("family", list(hf_families.FAMILIES))
def test_family(family, tmp_path):
    if not hf_families.available(family):
        pytest.skip(f"{family}: not in the installed transformers {transformers.__version__}")
    folder = hf_families.save(family, tmp_path / family)
    stock = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = _inputs(3)
    with torch.no_grad():
        z_stock = stock(x).logits

    model32, _ = curvlab.load_model(folder)
    with torch.no_grad():
        assert _rel(model32(x).logits, z_stock) < 1e-5  # (a)

    model, info = curvlab.load_model(folder, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    spy = LowPrecisionSpy()
    with spy, torch.no_grad():
        z64 = model(x).logits
    assert z64.dtype == torch.float64
    assert _rel(z64, z_stock) < 1e-5  # (b)
    assert not spy.ops, spy.summary()  # (c) forward

    tokens = _inputs(4, (1, 9))
    batch = curvlab.Batch(tokens[:, :-1], tokens[:, 1:])
    G = curvlab.ggn(model, batch, dtype=torch.float64)
    v = torch.randn(G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spy = LowPrecisionSpy()
    with spy:
        Gv = G @ v
    assert not spy.ops, spy.summary()  # (c) GGN product
    assert torch.allclose(G @ v, Gv, rtol=0, atol=1e-13 * float(Gv.abs().max()))  # repeatable

    top = float(curvlab.linalg.lanczos(G, k=1, tol=1e-13, return_vectors=False).eigenvalues[0])
    ref = dense_top_ggn_eigenvalue(model, batch)
    assert abs(top - ref) <= 1e-10 * ref, (top, ref)  # (d)
