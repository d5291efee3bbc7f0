"""Preconditioner comparison (curvlab.compare) against dense float64 linear algebra.

Oracles: torch.linalg.solve / eigh on the dense GGN (itself checked against an explicit JᵀHJ in
test_operators), per-token gradients for the empirical-Fisher diagonal, explicit Kronecker
products for K-FAC, a direct functional_call for the validation loss.
"""

import math

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvlab
from curvlab import store
from curvlab.compare import (
    CompareError,
    PreconditionerBuilder,
    Problem,
    SingularPreconditionerError,
    compare_checkpoints,
    compare_preconditioners,
    direction,
    format_evolution,
    format_table,
    ggn_diagonal,
    kfac_factors,
    linear_layers,
    pencil_ritz,
    preconditioned_spectrum,
    read_compare,
    write_compare,
)
from curvlab.errors import ConfigError, CurvlabError
from curvlab.models import ModelConfig
from tests.conftest import LLAMA_TEST, make_batch, make_model

LAM = 1e-2
TINY = ModelConfig("llama", vocab_size=16, seq_len=4, d_model=4, n_layers=1, n_heads=1, d_ff=6)


@pytest.fixture(scope="module")
def setup():
    model = make_model(LLAMA_TEST)
    batch, val = make_batch(LLAMA_TEST), make_batch(LLAMA_TEST, seed=7)
    dense = Problem(model, batch, "layer", dense_max=4096, cache=False)
    G = dense.ggn.dense()
    return model, batch, val, dense, G


@pytest.fixture(scope="module")
def result(setup):
    model, batch, val, *_ = setup
    return compare_preconditioners(model, batch, val, dampings=(LAM, 1e-9), dense_max=4096,
                                   kfac_estimator="exact", spectrum=False, cache=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two checkpoints of one (smaller) model, compared with spectra."""
    folder = tmp_path_factory.mktemp("run")
    a = curvlab.save_checkpoint(folder / "a.pt", make_model(TINY, seed=0), step=20)
    b = curvlab.save_checkpoint(folder / "b.pt", make_model(TINY, seed=1), step=10)
    return compare_checkpoints([a, b], make_batch(TINY), make_batch(TINY, seed=3),
                               dampings=(1e-3, 1e-1), cache=False)


def blockdiag(G, problem):
    out = torch.zeros_like(G)
    for i in range(len(problem.ggn.names)):
        s = problem.ggn.slice(i)
        out[s, s] = G[s, s]
    return out


def test_cg_and_dense_directions_equal_dense_solves(setup):
    model, batch, _, dense, G = setup
    lam, g, eye = 0.1, dense.grad, torch.eye(G.shape[0], dtype=G.dtype)
    full_ref = -torch.linalg.solve(G + lam * eye, g)
    layer_ref = -torch.linalg.solve(blockdiag(G, dense) + lam * eye, g)
    cgp = Problem(model, batch, "layer", dense_max=0)  # every solve by conjugate gradients
    assert torch.equal(cgp.grad, g)
    for problem, method, tol in ((dense, "dense", 1e-10), (cgp, "cg", 1e-7)):
        builder = PreconditionerBuilder(problem, cg_tol=1e-9)
        for name, ref in (("full", full_ref), ("layerwise", layer_ref)):
            pre = builder.make(name, lam)
            d = direction(pre, problem.grad)
            assert pre.info.method == method and pre.info.converged
            assert (d - ref).norm() <= tol * ref.norm(), (name, method)


def test_predicted_decrease_of_the_gn_direction(result, setup):
    *_, dense, G = setup
    g, eye = dense.grad, torch.eye(G.shape[0], dtype=G.dtype)
    # damped: d = −(G + λI)⁻¹g minimizes m(d) + ½λ‖d‖², whose minimum is −½ gᵀ(G + λI)⁻¹g
    r = result.row("full", LAM)
    damped_min = -0.5 * float(g @ torch.linalg.solve(G + LAM * eye, g))
    assert math.isclose(-r.decrease_unit + 0.5 * LAM * r.norm**2, damped_min, rel_tol=1e-9)
    # λ -> 0: the decrease tends to ½ gᵀG⁺g (g lies in the range of a GGN)
    w, U = torch.linalg.eigh(G)
    keep = w > 1e-10 * w.max()
    coef = U[:, keep].T @ g
    optimum = 0.5 * float((coef**2 / w[keep]).sum())
    assert math.isclose(result.row("full", 1e-9).decrease_unit, optimum, rel_tol=1e-5)
    assert result.row("full", 1e-9).step_best == pytest.approx(1.0, rel=1e-5)
    assert result.row("full", LAM).cosine_full == pytest.approx(1.0)
    # no preconditioner beats full GN's decrease at the best step (it minimizes m + ½λ‖d‖²,
    # so compare at λ -> 0 where that is m itself)
    best = result.row("full", 1e-9).decrease_best
    assert all(result.row(n, 1e-9).decrease_best <= best * (1 + 1e-6)
               for n in result.preconditioners)


def test_block_split_sums_and_layerwise_own_terms(result):
    for row in result.rows:
        for a in (1.0, 0.3, None):
            assert sum(row.block_change(a)) == pytest.approx(
                row.model_change(row.step_best if a is None else a), rel=1e-9, abs=1e-12)
        assert sum(row.block_share()) == pytest.approx(1.0)
    # layerwise: blockdiag(G) d = −g − λd, so d_bᵀG_bb d_b = −g_bᵀd_b − λ‖d_b‖²
    r = result.row("layerwise", LAM)
    assert sum(r.block_own_curvature) == pytest.approx(-r.grad_dot - LAM * r.norm**2, rel=1e-8)
    # on this model the cross-block curvature adds to every block (the unit step overshoots)
    assert all(c > o for c, o in zip(r.block_curvature, r.block_own_curvature))


def test_validation_loss_matches_a_direct_evaluation(result, setup):
    model, _, val, dense, _ = setup
    builder = PreconditionerBuilder(dense)
    d = direction(builder.make("layerwise", LAM), dense.grad)
    row = result.row("layerwise", LAM)
    alpha = row.val_steps[2]
    tangents = dense.space.to_tangents(alpha * d, dense.space.params, dense.params)
    params = {k: p.detach() + tangents[k] for k, p in model.named_parameters()}
    with torch.no_grad():
        logits = functional_call(model, params, (val.inputs,))
    assert row.val_losses[2] == pytest.approx(float(curvlab.lm_loss(logits, val.targets)),
                                              rel=1e-10)
    with torch.no_grad():
        base = curvlab.lm_loss(model(val.inputs), val.targets)
    assert row.val_loss == pytest.approx(float(base))
    assert row.val_steps == pytest.approx(tuple(s * row.step_best for s in result.step_grid))


def test_preconditioned_condition_numbers(setup, runs):
    *_, dense, G = setup
    builder = PreconditionerBuilder(dense)
    full = builder.make("full", LAM)
    for method in ("dense", "lanczos"):
        s = preconditioned_spectrum(dense.ggn, full, LAM, method=method, steps=30)
        assert s.condition == pytest.approx(1.0, abs=1e-6), method
    assert preconditioned_spectrum(dense.ggn, full, LAM).method == "analytic"
    assert runs[0].result.row("full", 1e-3).spectrum.condition == 1
    # layerwise: exact dense spectrum of P^{-1/2}(G + λI)P^{-1/2}
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    P = blockdiag(G, dense) + LAM * eye
    L = torch.linalg.cholesky(P)  # eigenvalues of the pencil (G + λI, P): of L⁻¹(G + λI)L⁻ᵀ
    C = torch.linalg.solve_triangular(L, G + LAM * eye, upper=False)
    ref = torch.linalg.eigvalsh(torch.linalg.solve_triangular(L, C.T, upper=False))
    lay = builder.make("layerwise", LAM)
    spec = preconditioned_spectrum(dense.ggn, lay, LAM)
    assert spec.method == "dense"
    assert spec.top == pytest.approx(float(ref.max()), rel=1e-8)
    assert spec.bottom == pytest.approx(float(ref.min()), rel=1e-6)
    ident = preconditioned_spectrum(dense.ggn, builder.make("identity", LAM), LAM)
    w = torch.linalg.eigvalsh(G)
    assert ident.top == pytest.approx(float(w.max()) + LAM, rel=1e-9)
    assert ident.condition == pytest.approx((float(w.max()) + LAM) / (float(w.min()) + LAM),
                                            rel=1e-6)
    # Lanczos run long enough agrees; Rayleigh–Ritz with CG solves gives inner bounds
    lz = preconditioned_spectrum(dense.ggn, lay, LAM, method="lanczos", steps=200, tol=1e-10)
    assert lz.top == pytest.approx(spec.top, rel=1e-6)
    top, bottom, m = pencil_ritz(lambda v: G @ v + LAM * v, lambda v: P @ v,
                                 lambda v: torch.cholesky_solve(v[:, None], L)[:, 0],
                                 G.shape[0], steps=40,
                                 seed=0, dtype=G.dtype, device=G.device)
    assert m == 40 and bottom >= spec.bottom * (1 - 1e-8)
    assert spec.top * (1 + 1e-8) >= top >= 0.9 * spec.top


@pytest.fixture(scope="module")
def token_grads(setup):
    """Per-token gradients ∇ℓ_n by one autograd call per token: {parameter: [N, *shape]}."""
    model, batch, *_ = setup
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    with curvlab.math_attention():
        logits = functional_call(model, params, (batch.inputs,)).reshape(-1, 32)
    ce = nn.functional.cross_entropy(logits, batch.targets.reshape(-1), reduction="none")
    rows = [torch.autograd.grad(ce[n], list(params.values()), retain_graph=True)
            for n in range(ce.numel())]
    return {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(params)}


def test_diagonals_equal_dense_diagonals(setup, token_grads):
    model, batch, _, dense, G = setup
    builder = PreconditionerBuilder(dense)
    diag = builder.diag_ggn()
    assert diag.info.estimators == ("dense",) * 4 and diag.info.rel_errors == (0.0,) * 4
    assert torch.allclose(diag.values, G.diagonal(), rtol=1e-12, atol=0)
    # empirical Fisher: the mean over tokens of squared per-token gradients
    sq = dense.space.from_tangents({k: (g**2).sum(0) for k, g in token_grads.items()})
    fdiag = builder.diag_efisher()
    assert fdiag.info.estimators == ("exact",) * 4 and fdiag.info.pullbacks == 16
    assert torch.allclose(fdiag.values, sq / 16, rtol=1e-10, atol=1e-300)
    adam = builder.make("adam", LAM)
    assert torch.allclose(adam.apply(torch.ones_like(sq)), fdiag.values.sqrt() + LAM)
    # blocks not held densely: exact from per-token root columns (N·V = 16·32 pullbacks)
    mixed = PreconditionerBuilder(Problem(model, batch, "layer", dense_max=260)).diag_ggn()
    assert mixed.info.estimators == ("dense", "exact", "exact", "exact")
    assert mixed.info.pullbacks == 16 * 32
    assert torch.allclose(mixed.values, G.diagonal(), rtol=1e-10, atol=0)


def test_exact_ggn_diagonal_is_the_dense_diagonal(cfg):
    # both model families (RMSNorm llama, LayerNorm gpt with biases and a tied head)
    model, batch = make_model(cfg), make_batch(cfg)
    G = Problem(model, batch, "layer", dense_max=4096, cache=False).ggn.dense()
    est = ggn_diagonal(Problem(model, batch, "layer", dense_max=0, cache=False),
                       exact_max=16 * 32)
    assert est.info.estimators == ("exact",) * 4 and est.info.samples == 0
    assert torch.allclose(est.values, G.diagonal(), rtol=1e-10, atol=1e-14 * G.diagonal().max())


def test_monte_carlo_ggn_diagonal_is_nonnegative_and_converges(setup):
    *_, G = setup
    model, batch, *_ = setup
    problem = Problem(model, batch, "layer", dense_max=0, cache=False)
    exact = G.diagonal()
    errors = {}
    # label draws per token, one pullback per sequence and draw; seed 0: relative errors 0.33
    # and 0.071 (over seeds 0-4: 0.18-0.33 and 0.043-0.071), stated bounds 0.38 and 0.106
    for samples in (25, 400):
        est = ggn_diagonal(problem, exact_max=0, samples=samples, seed=0)
        assert est.info.estimators == ("mc",) * 4 and est.info.samples == samples
        assert est.info.pullbacks == 2 * samples  # 2 sequences
        assert bool((est.values >= 0).all())
        errors[samples] = float((est.values - exact).norm() / exact.norm())
        # the stated standard error is of the size of the measured error
        assert errors[samples] <= max(est.info.rel_errors)
    assert errors[400] < 0.09
    assert 2 < errors[25] / errors[400] < 8  # ~ 1/√S: 4
    again = ggn_diagonal(problem, exact_max=0, samples=25, seed=0)
    assert torch.equal(again.values, ggn_diagonal(problem, exact_max=0, samples=25,
                                                  seed=0).values)


def _sym_power(m, power):
    w, q = torch.linalg.eigh(m)
    w = torch.where(w > m.shape[0] * 2.3e-16 * w.max(), w, 0.0)  # roundoff of a PSD matrix
    return q @ torch.diag(w**power) @ q.T


def test_first_order_baselines_equal_dense_constructions(setup, token_grads):
    from curvlab.train import newton_schulz  # Muon's own iteration, by design

    model, batch, _, dense, G = setup
    builder = PreconditionerBuilder(dense)
    N = 16
    g = {k: t.mean(0) for k, t in token_grads.items()}
    assert torch.allclose(dense.space.from_tangents(g), dense.grad, rtol=1e-10, atol=1e-15)
    adam = {k: (t**2).mean(0).sqrt() + LAM for k, t in token_grads.items()}
    refs = {name: {k: -g[k] / adam[k] for k in g} for name in ("shampoo", "soap", "muon")}
    hidden = [k for k in g if k.startswith("layers.") and g[k].ndim == 2]
    assert len(hidden) == 14
    for k, Gn in token_grads.items():
        if Gn.ndim != 3:
            continue
        m, c = Gn.shape[1:]
        L = torch.einsum("nij,nkj->ik", Gn, Gn) / (N * c)
        R = torch.einsum("nji,njk->ik", Gn, Gn) / (N * m)
        P = torch.kron(_sym_power(L, 0.25), _sym_power(R, 0.25)) + LAM * torch.eye(m * c,
                                                                          dtype=L.dtype)
        refs["shampoo"][k] = -torch.linalg.solve(P, g[k].reshape(-1)).reshape(m, c)
        QL, QR = torch.linalg.eigh(L)[1], torch.linalg.eigh(R)[1]
        D = (QL.T @ Gn @ QR).square().mean(0)
        Q = torch.kron(QL, QR)
        P = Q @ torch.diag(D.sqrt().reshape(-1) + LAM) @ Q.T
        refs["soap"][k] = -torch.linalg.solve(P, g[k].reshape(-1)).reshape(m, c)
        if k in hidden:
            o = newton_schulz(g[k])
            sv = torch.linalg.svdvals(o)
            assert 0.6 < float(sv.min()) and float(sv.max()) < 1.3  # orthogonalized
            refs["muon"][k] = -0.2 * math.sqrt(max(m, c)) * o
    for name, ref in refs.items():
        pre = builder.make(name, LAM)
        d = direction(pre, dense.grad)
        expect = dense.space.from_tangents(ref)
        assert (d - expect).norm() <= 1e-10 * expect.norm(), name
    assert not builder.make("muon", LAM).linear
    for name in ("shampoo", "soap"):  # closed-form P, P^{-1/2} consistent
        pre = builder.make(name, LAM)
        P = pre.apply(torch.eye(dense.n, dtype=torch.float64))
        assert torch.allclose(P, P.T, atol=1e-14)
        assert torch.allclose(pre.inv_sqrt(pre.inv_sqrt(P)), torch.eye(dense.n,
                              dtype=P.dtype), atol=1e-8)


class LinearLM(nn.Module):
    """Logits are one linear layer of embedded tokens."""

    def __init__(self, vocab=7, width=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        return self.head(self.emb(x))


def test_kfac_on_a_single_linear_layer_is_the_kronecker_formula():
    torch.manual_seed(0)
    model = LinearLM().double()
    tokens = torch.randint(0, 7, (3, 6))
    targets = torch.randint(0, 7, (3, 6))
    targets[0, :2] = -100  # ignored targets: B sums over the others, A over all positions
    batch = curvlab.Batch(tokens, targets)
    problem = Problem(model, batch, "param")
    layers = linear_layers(model, problem.space)
    assert [ly.module for ly in layers] == ["head"] and layers[0].bias == "head.bias"
    (f,) = kfac_factors(model, problem.params, problem.batches, layers, estimator="exact")
    with torch.no_grad():
        a = model.emb(tokens).reshape(-1, 3)
        p = model(tokens).reshape(-1, 7).softmax(-1)
    abar = torch.cat([a, torch.ones(18, 1, dtype=a.dtype)], dim=1)
    mask = targets.reshape(-1) != -100
    n = int(mask.sum())
    B = sum(torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(18) if mask[i]) / n
    assert torch.allclose(f.A, abar.T @ abar / 18, rtol=1e-12)
    assert torch.allclose(f.B, B, rtol=1e-10, atol=1e-14)
    # Monte-Carlo factors approach the exact ones
    (mc,) = kfac_factors(model, problem.params, problem.batches, layers, samples=3000, seed=1)
    assert (mc.B - B).norm() <= 0.1 * B.norm()
    # the preconditioner: (B ⊗ A + λI) on (head.weight row-major, head.bias), diag(G) + λ on emb
    pre = PreconditionerBuilder(problem, kfac_estimator="exact").make("kfac", LAM)
    P = pre.apply(torch.eye(problem.n, dtype=torch.float64))
    G = problem.ggn.dense()
    emb, head = slice(0, 21), slice(21, 49)
    K = torch.kron(B, abar.T @ abar / 18)  # index (o, i), i = 3 is the bias column
    order = [o * 4 + i for o in range(7) for i in range(3)] + [o * 4 + 3 for o in range(7)]
    assert torch.allclose(P[head, head], K[order][:, order] + LAM * torch.eye(28), atol=1e-14)
    assert torch.allclose(P[emb, emb], torch.diag(G.diagonal()[emb]) + LAM * torch.eye(21))
    assert P[emb, head].abs().max() == 0
    assert torch.allclose(pre.solve(P @ problem.grad), problem.grad, rtol=1e-9)
    assert torch.allclose(pre.inv_sqrt(pre.inv_sqrt(P)), torch.eye(problem.n, dtype=P.dtype),
                          atol=1e-9)


def test_kfac_layers_of_transformers():
    gpt = make_model(curvlab.models.ModelConfig(
        "gpt", vocab_size=32, seq_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=16, bias=True,
        tie_embeddings=True))
    space = Problem(gpt, make_batch(LLAMA_TEST), "layer").space
    names = [ly.module for ly in linear_layers(gpt, space)]
    assert "lm_head" not in names  # tied to the embedding: left to diag(G)
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    # a partition that splits c_attn by rows leaves it to the diagonal
    qkv = Problem(gpt, make_batch(LLAMA_TEST), "qkv").space
    assert linear_layers(gpt, qkv) == []


def test_singular_without_damping_is_a_clear_error(setup):
    model, batch, val, *_ = setup
    assert issubclass(SingularPreconditionerError, CurvlabError)  # one-line CLI error
    with pytest.raises(SingularPreconditionerError, match=r"singular without damping \(rank"):
        compare_preconditioners(model, batch, val, preconditioners=("full",), dampings=(0.0,),
                                cache=False)
    absent = next(t for t in range(32) if t not in batch.inputs)
    block = [f"embed_tokens.weight[{absent}:{absent + 1}]"]  # no gradient, no curvature
    with pytest.raises(SingularPreconditionerError, match="smallest eigenvalue"):
        compare_preconditioners(model, batch, val, preconditioners=("layerwise",),
                                dampings=(0.0,), blocks=block, cache=False)
    # conjugate gradients on a singular but consistent system (g is in the range of a GGN)
    # converge to the minimum-norm solution −G⁺g
    present = int(batch.inputs[0, 0])
    two = [f"a=embed_tokens.weight[{absent}:{absent + 1}]",
           f"b=embed_tokens.weight[{present}:{present + 1}]"]
    cgp = Problem(model, batch, two, dense_max=0, cache=False)
    G = Problem(model, batch, two, cache=False).ggn.dense()
    d = direction(PreconditionerBuilder(cgp, cg_tol=1e-12).make("full", 0.0), cgp.grad)
    assert torch.allclose(d, -torch.linalg.pinv(G, hermitian=True) @ cgp.grad, rtol=1e-8)
    assert d[:8].abs().max() == 0


def test_bad_options_are_clear_errors(setup):
    model, batch, val, *_ = setup
    with pytest.raises(ConfigError, match="unknown preconditioner 'sophia'; valid: full, "
                                          "layerwise, diag, adam, kfac, shampoo, soap, muon, "
                                          "identity$"):
        compare_preconditioners(model, batch, val, preconditioners=("full", "sophia"))
    with pytest.raises(ConfigError, match="diag_exact_max must be >= 0 and diag_samples >= 1"):
        compare_preconditioners(model, batch, val, diag_samples=0)
    with pytest.raises(ConfigError, match="dampings must be finite and >= 0"):
        compare_preconditioners(model, batch, val, dampings=(-1.0,))
    with pytest.raises(ConfigError, match="unknown K-FAC estimator"):
        kfac_factors(model, {}, [batch], ["x"], estimator="exactish")


def test_checkpoints_of_one_run_and_of_different_models(tmp_path, runs):
    a = runs[1].checkpoint
    other = curvlab.save_checkpoint(tmp_path / "c.pt", make_model(
        ModelConfig("llama", vocab_size=16, seq_len=4, d_model=4, n_layers=1, n_heads=1,
                    d_ff=8)))
    batch, val = make_batch(TINY), make_batch(TINY, seed=3)
    with pytest.raises(CompareError, match=r"different models \(d_ff 6 vs 8\); compare "
                                           "checkpoints of one run"):
        compare_checkpoints([a, other], batch, val)
    assert [r.step for r in runs] == [10, 20]
    assert all(r.result.ratio(n, 1e-3) > 0 for r in runs for n in r.result.preconditioners)
    assert runs[0].result.ratio("full", 1e-3) == 1
    text = format_evolution(runs)
    assert "layerwise" in text and "      10" in text
    assert "validation-loss decrease at the line-searched step" in text and "muon" in text


def test_hdf5_round_trip_table_and_figures(runs, tmp_path):
    result = runs[-1].result
    prov = store.make_provenance(runs[0].checkpoint, TINY.to_dict(), {"source": "test"},
                                 "float64", "cpu")
    with store.create_file(tmp_path / "c.h5", prov, result.partition) as w:
        write_compare(w, runs)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        g = f["compare/1"]
        assert g["decrease_best"].shape == (9, 2) and g["val_losses"].shape == (9, 2, 5)
        assert g["block_curvature"].shape == (9, 2, 3) and g.attrs["step"] == 20
        assert list(g["diagonals/ggn/estimators"].asstr()) == ["dense"] * 3
        assert list(g["diagonals/efisher/estimators"].asstr()) == ["exact"] * 3
        assert g["diagonals/efisher"].attrs["pullbacks"] == 8  # tokens
        muon = list(result.preconditioners).index("muon")
        assert g["spectrum_method"].asstr()[muon, 0] == ""  # not a linear P
        assert g["solve_method"].asstr()[muon, 0] == "newton-schulz"
        assert list(f["compare"].attrs["preconditioners"]) == list(result.preconditioners)
        assert f.attrs["format"] == "curvlab-results" and len(g.attrs["checkpoint_sha256"]) == 64
    back = read_compare(tmp_path / "c.h5")
    assert [b.step for b in back] == [10, 20]
    assert back[1].result.rows == result.rows
    assert back[1].result.off_diagonal == result.off_diagonal
    assert back[1].result.diagonals == result.diagonals and result.diagonals
    assert {r.spectrum.method for r in result.rows if r.spectrum} == {"analytic", "dense"}
    assert [r.preconditioner for r in result.rows if r.spectrum is None] == ["muon"] * 2
    text = format_table(result, per_block=True)
    assert "layerwise" in text and "off-diagonal energy" in text and "block share" in text
    assert "diag(G) per block: embed dense, layer.0 dense, head dense" in text
    from curvlab import plot

    names, lams = result.preconditioners, result.dampings
    ratio = np.array([[result.ratio(n, lam) for lam in lams] for n in names])
    kappa = np.array([[s.condition if (s := result.row(n, lam).spectrum) else np.nan
                       for lam in lams] for n in names])
    for fig in (plot.figure_compare_decrease(names, lams, ratio),
                plot.figure_condition_numbers(names, lams, kappa),
                plot.figure_compare_vs_step([0, 10], names, np.stack([ratio[:, 0]] * 2),
                                            damping=LAM)):
        assert plot.save(fig, str(tmp_path / "fig"))
    assert result.off_diagonal.exact and 0 < result.off_diagonal.value < 1


def test_cli_lists_and_validates_preconditioner_names(capsys):
    from tests.cli_helpers import assert_clean_error, run_cli

    code, out, _ = run_cli(capsys, "compare", "--help")
    assert code == 0
    help_text = " ".join(out.split())
    assert "full, layerwise, diag, adam, kfac, shampoo, soap, muon, identity" in help_text
    # checked before any checkpoint or data is read: one line, exit 1
    for bad, match in (("full,sophia", "error: unknown preconditioner 'sophia'; valid: full, "
                                       "layerwise, diag, adam, kfac, shampoo, soap, muon, "
                                       "identity"),
                       ("muon,muon", "error: preconditioner listed twice: muon, muon")):
        assert_clean_error(capsys, "compare", "missing.pt", "--preconditioners", bad,
                           match=match)


def test_results_know_no_figures():
    """Importing curvlab and its result modules loads neither matplotlib nor curvlab.plot."""
    import subprocess
    import sys

    code = ("import sys, curvlab, curvlab.compare, curvlab.store, curvlab.spectra; "
            "print(sorted(m for m in ('matplotlib', 'curvlab.plot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
