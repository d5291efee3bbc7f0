"""Curvature operators against independent float64 computations.

Oracles: reverse-over-reverse double backward (plain autograd), central finite differences of
the gradient, an explicit Jᵀ H_z J from a materialized Jacobian, and curvlinops' GGN. Never
``torch.func.hessian`` / ``jacrev`` as the inner derivative (wrong through layer_norm).
"""

import pytest
import torch
from torch.func import functional_call, jacrev

import curvlab
from curvlab.curvature.blocks import partition
from curvlab.curvature.model_fn import FlatLogits
from curvlab.curvature.operators import fisher, ggn, hessian
from curvlab.errors import ConfigError, CurvlabError
from curvlab.models import lm_loss
from tests.conftest import make_batch, make_model


def _flat_loss(model, batch, ignore_index=-100):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def unflatten(theta):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = theta[i:i + k].view(s)
            i += k
        return out

    def logits(theta):
        return functional_call(model, unflatten(theta), (batch.inputs,), tie_weights=True)

    def loss(theta):
        return lm_loss(logits(theta), batch.targets, ignore_index)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss, logits, theta


def _double_backward_hessian(loss, theta):
    t = theta.clone().requires_grad_(True)
    with curvlab.math_attention():
        (g,) = torch.autograd.grad(loss(t), t, create_graph=True)
        rows = [torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(t.numel())]
    return torch.stack(rows)


@pytest.mark.parametrize("cache", [True, False])
def test_hessian_equals_double_backward_and_finite_differences(cfg, cache):
    model, batch = make_model(cfg), make_batch(cfg)
    loss, _, theta = _flat_loss(model, batch)
    H = hessian(model, batch, cache=cache).to_dense()
    ref = _double_backward_hessian(loss, theta)
    assert (H - ref).norm() <= 1e-10 * ref.norm()
    # central differences of the gradient, column by column on a few coordinates per block
    h = 1e-6
    gfun = torch.func.grad(loss)
    idx = torch.randperm(theta.numel(), generator=torch.Generator().manual_seed(0))[:12]
    for i in idx:
        e = torch.zeros_like(theta)
        e[i] = h
        col = (gfun(theta + e) - gfun(theta - e)) / (2 * h)
        assert (col - H[:, i]).norm() <= 1e-6 * max(col.norm(), 1e-3)


def _explicit_ggn(model, batch, ignore_index=-100):
    _, logits, theta = _flat_loss(model, batch)
    with curvlab.math_attention():
        z = logits(theta).reshape(-1, model.config.vocab_size)
        J = jacrev(lambda t: logits(t).reshape(-1, model.config.vocab_size))(theta)  # 1st order
    mask = batch.targets.reshape(-1) != ignore_index
    n = int(mask.sum())
    p = z.softmax(-1)
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for i in range(z.shape[0]):
        if mask[i]:
            Hz = (torch.diag(p[i]) - torch.outer(p[i], p[i])) / n
            G += J[i].T @ Hz @ J[i]
    return G, J, p, mask, n


@pytest.mark.parametrize("cache", [True, False])
def test_ggn_equals_explicit_jacobian_product(cfg, cache):
    model, batch = make_model(cfg), make_batch(cfg)
    G = ggn(model, batch, cache=cache).to_dense()
    ref, *_ = _explicit_ggn(model, batch)
    assert (G - ref).norm() <= 1e-12 * ref.norm()
    assert (G - G.T).abs().max() <= 1e-12 * G.abs().max()
    assert torch.linalg.eigvalsh(G).min() >= -1e-10 * G.abs().max()


def test_fisher_equals_explicit_outer_products(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    _, J, p, mask, n = _explicit_ggn(model, batch)
    y = batch.targets.reshape(-1)
    F = torch.zeros(J.shape[-1], J.shape[-1], dtype=J.dtype)
    for i in range(J.shape[0]):
        g = J[i].T @ (p[i] - torch.nn.functional.one_hot(y[i], p.shape[-1]).to(p.dtype))
        F += torch.outer(g, g) / n
    ours = fisher(model, batch, kind="empirical").to_dense()
    assert (ours - F).norm() <= 1e-12 * F.norm()


def test_mc_fisher_is_unbiased_for_the_ggn():
    from tests.conftest import LLAMA_TEST

    model, batch = make_model(LLAMA_TEST), make_batch(LLAMA_TEST, batch_size=1)
    part = partition(model, ["layers.1.mlp.down_proj.weight"])
    G = ggn(model, batch, part).to_dense()
    F = fisher(model, batch, part, kind="mc", mc_samples=4000, seed=1).to_dense()
    assert (F - G).norm() <= 0.08 * G.norm()
    F2 = fisher(model, batch, part, kind="mc", mc_samples=4000, seed=1).to_dense()
    assert torch.equal(F, F2)


def test_ggn_matches_curvlinops(cfg):
    curvlinops = pytest.importorskip("curvlinops")
    model, batch = make_model(cfg), make_batch(cfg)


    params = list(model.parameters())
    ref_op = curvlinops.GGNLinearOperator(FlatLogits(model), torch.nn.CrossEntropyLoss(), params,
                                          [(batch.inputs, batch.targets.reshape(-1))])
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    ref = torch.as_tensor(ref_op @ v)
    ours = ggn(model, batch) @ v
    assert (ours - ref).norm() <= 1e-10 * ref.norm()


def test_hessian_matches_curvlinops_on_rmsnorm_model():
    # curvlinops' Hessian inherits PyTorch's layer_norm fault (GPT) and fails on SiLU (forward
    # AD through silu_backward under no_grad): compare on the RMSNorm model, on the parameters
    # after the last SiLU (last MLP output projection, final RMSNorm, head).
    curvlinops = pytest.importorskip("curvlinops")
    from tests.conftest import LLAMA_TEST

    model, batch = make_model(LLAMA_TEST), make_batch(LLAMA_TEST)
    names = ["layers.1.mlp.down_proj.weight", "norm.weight", "lm_head.weight"]
    params = dict(model.named_parameters())

    ref_op = curvlinops.HessianLinearOperator(
        FlatLogits(model), torch.nn.CrossEntropyLoss(), [params[n] for n in names],
        [(batch.inputs, batch.targets.reshape(-1))])
    op = hessian(model, batch, partition(model, names))
    v = torch.randn(op.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.as_tensor(ref_op @ v)
    assert (op @ v - ref).norm() <= 1e-10 * ref.norm()


def test_blocks_restriction_block_diagonal_and_tied_weights(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    op = ggn(model, batch, "layer")
    D = op.to_dense()
    offs, sizes, names = op.partition.offsets, op.partition.sizes, op.partition.names
    for (r, ro, rs) in zip(names, offs, sizes):
        for (c, co, cs) in zip(names, offs, sizes):
            blk = op.block(r, c).to_dense()
            assert blk.shape == (rs, cs)
            assert torch.allclose(blk, D[ro:ro + rs, co:co + cs], rtol=0, atol=1e-13)
    BD = op.block_diagonal().to_dense()
    ref = torch.block_diag(*[D[o:o + s, o:o + s] for o, s in zip(offs, sizes)])
    assert torch.allclose(BD, ref, rtol=0, atol=1e-13)
    assert op.shape[0] == sum(p.numel() for p in model.parameters())  # tied weights once


def test_partial_partition_acts_on_subspace(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    full = hessian(model, batch, "param")
    D = full.to_dense()
    pnames = full.partition.names
    sub = hessian(model, batch, "qkv")
    S = sub.to_dense()
    # the qkv space picks rows/cols of the full Hessian
    idx = []
    for block in sub.partition:
        for part in block.parts:
            off = full.partition.offsets[pnames.index(part.param)]
            idx += list(range(off + part.start, off + part.stop))
    idx = torch.tensor(idx)
    assert torch.allclose(S, D[idx][:, idx], rtol=0, atol=1e-12)


def test_accumulation_over_batches_and_ignore_index(cfg):
    model = make_model(cfg)
    b1, b2 = make_batch(cfg, seed=1), make_batch(cfg, seed=2)
    t2 = b2.targets.clone()
    t2[0, :3] = -100
    b2 = curvlab.Batch(b2.inputs, t2)
    both = curvlab.Batch(torch.cat([b1.inputs, b2.inputs]), torch.cat([b1.targets, b2.targets]))
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for make in (ggn, hessian):
        a = make(model, [b1, b2]) @ V
        b = make(model, both) @ V
        assert torch.allclose(a, b, rtol=0, atol=1e-12 * b.abs().max())
    ref, *_ = _explicit_ggn(model, both)
    assert torch.allclose(ggn(model, [b1, b2]) @ V, ref @ V, atol=1e-12 * ref.abs().max())


def test_product_forms(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    op = ggn(model, batch, "param")
    n = op.shape[0]
    V = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cols = torch.stack([op @ V[:, i] for i in range(5)], dim=1)
    assert torch.allclose(op @ V, cols, atol=1e-13)
    assert torch.allclose(op.matmat(V, chunk_size=2, vectorize=True), cols, atol=1e-13)
    assert torch.allclose(op.matmat(V, vectorize=False), cols, atol=1e-13)
    bd = op.block_diagonal()
    assert torch.allclose(bd.matmat(V, vectorize=True), bd.matmat(V, vectorize=False),
                          atol=1e-13)
    d = op.row_space.unflatten(V[:, 0])
    out = op @ d
    assert set(out) == set(d) and torch.allclose(op.row_space.flatten_dict(out), cols[:, 0])
    sp = op.to_scipy()
    assert abs(sp.matvec(V[:, 0].numpy()) - cols[:, 0].numpy()).max() < 1e-13
    with pytest.raises(ConfigError, match="entries"):
        op @ torch.zeros(n + 1, dtype=torch.float64)


def test_float32_close_to_float64(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ref = ggn(model, batch) @ v
    op32 = ggn(model, batch, dtype=torch.float32)
    assert op32.dtype == torch.float32
    assert (op32 @ v.float() - ref).norm() <= 1e-4 * ref.norm()


def test_unknown_block_and_bad_params(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    op = ggn(model, batch)
    with pytest.raises(ConfigError, match="unknown block 'nope'; valid blocks: embed"):
        op.block("nope")
    with pytest.raises(ConfigError, match="unknown block preset"):
        ggn(model, batch, "diagonal")
    with pytest.raises(ConfigError, match="no parameter matches"):
        ggn(model, batch, ["zzz.*"])
    with pytest.raises(ConfigError, match="overlap"):
        ggn(model, batch, ["a=*.0.*", "b=*.0.*"])
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(CurvlabError, match="NaN or Inf"):
        ggn(model, batch)


def test_logit_gradient_and_curvature_equal_autograd_of_the_mean_cross_entropy():
    from curvlab.curvature.logit_space import LogitCurvature, logit_gradient

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 4, -100, 2, 2, 1, -100])
    scale = 1.0 / 5  # 5 tokens not ignored

    def loss(z):
        return torch.nn.functional.cross_entropy(z, y, ignore_index=-100, reduction="sum") * scale

    g = torch.func.grad(loss)(z)
    H = torch.func.hessian(loss)(z).reshape(35, 35)
    lc = LogitCurvature(z, y, kind="ggn", scale=scale)
    for probs in (None, lc.probs):
        assert torch.allclose(logit_gradient(z, y, scale=scale, probs=probs), g, atol=1e-15)
    assert torch.equal(lc.probs, torch.softmax(z, -1))  # shared probs are not modified
    u = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(lc(u).reshape(-1), H @ u.reshape(-1), atol=1e-15)


def test_sample_labels_follow_the_probabilities_and_do_not_depend_on_the_shard():
    from curvlab.curvature.logit_space import sample_labels

    p = torch.tensor([[0.7, 0.0, 0.3], [0.1, 0.2, 0.7], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]],
                     dtype=torch.float64)
    labels = sample_labels(p, 20000, torch.Generator().manual_seed(0))
    assert labels.shape == (20000, 4)
    freq = torch.stack([(labels == c).double().mean(0) for c in range(3)], dim=1)
    assert torch.allclose(freq, p, atol=0.015)
    assert (labels[:, 0] != 1).all() and (labels[:, 2] == 1).all()  # zero mass never drawn
    # the last 2 tokens alone, drawn as a shard of the 4: the same labels
    shard = sample_labels(p[2:], 20000, torch.Generator().manual_seed(0), token_range=(2, 4),
                          chunk_tokens=1)
    assert torch.equal(shard, labels[:, 2:])
