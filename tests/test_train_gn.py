"""Gauss-Newton inner problems, directions, line search and optimizers, in float64.

Oracles: the quadratic / prox-linear models built explicitly from a materialized Jacobian
(first-order ``jacrev`` only) and differentiated by plain autograd; dense solves with the GGN
from ``curvlab.ggn(...).to_dense()``; CG from ``curvlab.linalg.cg``.
"""

import math

import pytest
import torch
from torch.func import functional_call, jacrev

import curvlab
from curvlab.curvature.blocks import layer_partition
from curvlab.curvature.model_fn import model_params
from curvlab.errors import CurvlabError
from curvlab.linalg import cg
from curvlab.train import (
    SOAP,
    build_optimizer,
    inner_gradient,
    line_search,
    newton_schulz,
    solve_direction,
)
from curvlab.train.schedules import lr_factor
from tests.conftest import LLAMA_TEST, make_batch, make_model


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def _explicit(model, batch):
    """z_t [N, V], the Jacobian J [N·V, P] and the unflatten map, from plain autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def unflat(theta):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def logits(theta):
        with curvlab.math_attention():
            z = functional_call(model, unflat(theta), (batch.inputs,), tie_weights=True)
        return z.reshape(-1, z.shape[-1])

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return logits(theta).detach(), jacrev(lambda t: logits(t).reshape(-1))(theta), names, unflat


@pytest.mark.parametrize("mode", ["gn", "prox"])
def test_inner_gradient_is_autograd_of_the_explicit_model(cfg, mode):
    model, batch = make_model(cfg), make_batch(cfg)
    z, J, names, unflat = _explicit(model, batch)
    y = batch.targets.reshape(-1)
    n, V = z.shape
    p = z.softmax(-1)
    g = (p - torch.nn.functional.one_hot(y, V)) / n
    Hz = torch.stack([(torch.diag(p[i]) - torch.outer(p[i], p[i])) / n for i in range(n)])
    loss0 = torch.nn.functional.cross_entropy(z, y)
    damping = 0.3

    def m(delta):  # the inner loss of the module docstring, written out
        jd = (J @ delta).view(n, V)
        if mode == "gn":
            value = loss0 + (g * jd).sum() + 0.5 * torch.einsum("na,nab,nb->", jd, Hz, jd)
        else:
            value = torch.nn.functional.cross_entropy(z + jd, y)
        return value + 0.5 * damping * delta.pow(2).sum()

    gen = torch.Generator().manual_seed(0)
    delta = 0.1 * torch.randn(J.shape[1], generator=gen, dtype=torch.float64)
    # a block: only layer.0 is active, the rest is frozen at θ_t
    block = list(layer_partition(model)["layer.0"].params)
    mask = torch.cat([torch.full((model.get_parameter(k).numel(),), float(k in block),
                                 dtype=torch.float64) for k in names])
    for active, d in ((names, delta), (block, delta * mask)):
        d = d.clone().requires_grad_(True)
        value = m(d)
        (ref,) = torch.autograd.grad(value, d)
        theta = model_params(model)
        r = inner_gradient(model, theta, {k: v for k, v in unflat(d.detach()).items()
                                          if k in active}, batch, mode=mode, damping=damping)
        got = _flat(r.grad, active)
        want = _flat(unflat(ref), active)
        assert (got - want).norm() <= 1e-10 * want.norm()
        assert math.isclose(r.model_loss, float(value.detach()), rel_tol=1e-12)
        assert math.isclose(r.loss, float(loss0), rel_tol=1e-12)


def _heavy_ball(lmax, lmin):
    """Optimal heavy-ball (SGD momentum) parameters for a quadratic with spectrum [lmin, lmax]."""
    a, b = math.sqrt(lmax), math.sqrt(lmin)
    return 4 / (a + b) ** 2, ((a - b) / (a + b)) ** 2


def _solve(model, batch, blocks, lr, momentum, damping, steps):
    theta = model_params(model)
    point = {k: v.clone() for k, v in theta.items()}
    opt = build_optimizer("sgd", point, [], lr=lr, momentum=momentum)
    return solve_direction(model, theta, point, opt, [batch] * steps, blocks, damping=damping)


def test_gn_direction_equals_dense_and_cg_solves():
    """The inner problem solved to convergence (heavy ball on one fixed micro-batch) gives
    Δ = −(G + λI)⁻¹ ∇L. G of this model is singular (rank 312 of 1640), hence λ = 2% of λ_max
    (Levenberg-Marquardt damping)."""
    model, batch = make_model(LLAMA_TEST), make_batch(LLAMA_TEST)
    op = curvlab.ggn(model, batch)
    G = op.to_dense()
    loss = curvlab.lm_loss(model(batch.inputs), batch.targets)
    grad = op.row_space.from_tangents(dict(zip(
        [n for n, _ in model.named_parameters()],
        torch.autograd.grad(loss, list(model.parameters())))))
    lmax = float(torch.linalg.eigvalsh(G)[-1])
    damping = 0.02 * lmax
    want = -torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=G.dtype), grad)
    sol = cg(op, -grad, damping=damping, tol=1e-12)
    assert (sol.x - want).norm() <= 1e-8 * want.norm()
    names = [n for n, _ in model.named_parameters()]
    lr, momentum = _heavy_ball(lmax + damping, damping)
    d = _solve(model, batch, [names], lr, momentum, damping, 100)
    got = op.row_space.from_tangents(d.delta)
    assert (got - want).norm() <= 1e-7 * want.norm()
    # the predicted decrease of the quadratic model at the solution: ½ ∇Lᵀ (G + λI)⁻¹ ∇L
    assert math.isclose(d.decrease, float(-0.5 * grad @ want), rel_tol=1e-6)


def test_layerwise_direction_equals_block_diagonal_solve():
    model, batch = make_model(LLAMA_TEST), make_batch(LLAMA_TEST)
    op = curvlab.ggn(model, batch)  # layer partition: embed, layer.0, layer.1, head
    Gb = op.block_diagonal().to_dense()
    loss = curvlab.lm_loss(model(batch.inputs), batch.targets)
    grad = op.row_space.from_tangents(dict(zip(
        [n for n, _ in model.named_parameters()],
        torch.autograd.grad(loss, list(model.parameters())))))
    lmax = float(torch.linalg.eigvalsh(Gb)[-1])
    damping = 0.02 * lmax
    want = -torch.linalg.solve(Gb + damping * torch.eye(Gb.shape[0], dtype=Gb.dtype), grad)
    lr, momentum = _heavy_ball(lmax + damping, damping)
    blocks = [list(b.params) for b in layer_partition(model)]
    d = _solve(model, batch, blocks, lr, momentum, damping, 100)
    got = op.row_space.from_tangents(d.delta)
    assert (got - want).norm() <= 1e-7 * want.norm()
    # and it is not the full GN direction
    full = -torch.linalg.solve(op.to_dense() + damping * torch.eye(Gb.shape[0],
                                                                   dtype=Gb.dtype), grad)
    assert (got - full).norm() > 1e-2 * full.norm()


def test_line_search_picks_the_best_candidate():
    r = line_search(lambda eta: (eta - 0.45) ** 2)
    assert r.step == 0.5 and r.index == 2 and len(r.losses) == 5
    assert line_search(lambda eta: 1.0, (1.0, 0.5)).step == 1.0  # ties: the larger step
    assert line_search(lambda eta: 1.0, (0.5, 1.0, 0.25)).step == 1.0
    r = line_search(lambda eta: math.nan if eta > 0.6 else eta, (1.0, 0.71, 0.5, 0.35))
    assert r.step == 0.35
    with pytest.raises(CurvlabError, match="NaN or Inf"):
        line_search(lambda eta: math.inf)


def test_newton_schulz_orthogonalizes():
    g = torch.randn(16, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for x in (g, g.T):
        s = torch.linalg.svdvals(newton_schulz(x))
        assert s.min() > 0.6 and s.max() < 1.25  # the quintic's band around 1


def test_soap_rotates_into_the_shampoo_eigenbasis():
    """SOAP's first step is Adam's first step (±lr elementwise) in the eigenbasis of G Gᵀ and
    Gᵀ G, where the rotated gradient Q_Lᵀ G Q_R is diagonal: the update is −lr · Q_L sign(D) Q_Rᵀ,
    −lr times the orthogonal polar factor U Vᵀ of G (what Muon approximates)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(5, 5, dtype=torch.float64)  # square: no null space, unique eigenbases
    p.grad = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    opt = SOAP([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    opt.step()
    U, _, Vh = torch.linalg.svd(p.grad)
    assert torch.allclose(p, -0.1 * U @ Vh, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "muon", "soap", "sgd"])
def test_optimizers_minimize_a_least_squares_problem(name):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    params = {"w": torch.zeros(12, 8, dtype=torch.float64), "b": torch.zeros(8,
                                                                        dtype=torch.float64)}
    target = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    opt = build_optimizer(name, params, ["w"], lr=0.02, momentum=0.9, precondition_frequency=5)

    def loss():
        return ((A @ params["w"] + params["b"] - target) ** 2).mean()

    first = float(loss())
    for _ in range(100):
        for v in params.values():
            v.requires_grad_(True)
        value = loss()
        grads = torch.autograd.grad(value, list(params.values()))
        for v, g in zip(params.values(), grads):
            v.requires_grad_(False)
            v.grad = g
        opt.step()
    assert float(loss()) < 0.5 * first


def test_schedules():
    assert lr_factor("constant", 5, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0
    assert math.isclose(lr_factor("cosine", 5, 10), 0.5)
    # global cosine over all inner steps: step 1 of 2, inner 0 of 4 is half way
    assert math.isclose(lr_factor("cosine", 1, 2, inner=0, inner_steps=4), 0.5)
    assert math.isclose(lr_factor("constant+inner-cosine", 7, 10, inner=2, inner_steps=4), 0.5)
    assert math.isclose(lr_factor("constant", 0, 10, warmup=4), 0.25)
