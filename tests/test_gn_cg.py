"""The exact GN step (inner solver ``cg``) and the cost counters of every GN step, in float64.

Oracles: a dense GGN built here (``torch.func.jacrev`` of the logits, the logit Hessian of the
mean cross-entropy written out, ``Jᵀ H J`` explicitly) and the gradient by plain autograd;
forward passes counted by wrapping the model's ``forward``.
"""

import json

import pytest
import torch
from torch.func import functional_call, jacrev

from curvlab import Batch, load_checkpoint
from curvlab.errors import ConfigError, CurvlabError
from curvlab.linalg import NotPositiveDefiniteError, cg
from curvlab.models import ModelConfig
from curvlab.models.attention import math_attention
from curvlab.optim import GaussNewton
from curvlab.train import TrainConfig, train
from curvlab.train.gn import PASS_KINDS
from tests.cli_helpers import assert_clean_error
from tests.conftest import make_batch, make_model, train_checkpoint
from tests.dist_helpers import spawn

# small enough for a dense float64 GGN in a second (about 500 parameters, 12 tokens x 16 logits)
LLAMA_TEST = ModelConfig("llama", vocab_size=16, seq_len=6, d_model=4, n_layers=2, n_heads=1,
                         d_ff=8)
# LayerNorm, biases, a tied head
GPT_TEST = ModelConfig("gpt", vocab_size=16, seq_len=6, d_model=4, n_layers=2, n_heads=1,
                       d_ff=8, bias=True, tie_embeddings=True)


def _batches(count, seed, ignore=0):
    """``count`` micro-batches of 2 x 8 tokens; the first ``ignore`` targets of each ignored
    (so the token counts differ between micro-batches when ``ignore`` varies)."""
    out = []
    for k in range(count):
        b = make_batch(LLAMA_TEST, batch_size=2, seed=seed + k)
        if ignore:
            b.targets[0, : ignore + k] = -100
        out.append(b)
    return out


class _ForwardCounter:
    """Counts the model's forward calls, split by grad mode (the line search runs without)."""

    def __init__(self, model):
        self.grad = self.no_grad = 0
        forward = model.forward

        def counted(*args, **kwargs):
            if torch.is_grad_enabled():
                self.grad += 1
            else:
                self.no_grad += 1
            return forward(*args, **kwargs)

        model.forward = counted


@pytest.mark.parametrize("mode,blocks", [("gn", None), ("gn", "layer"), ("prox", None)])
def test_cost_counters_of_first_order_inner_solvers(mode, blocks):
    model = make_model(LLAMA_TEST)
    opt = GaussNewton(model, mode=mode, blocks=blocks, inner="adamw", line_search_range=3)
    inner, scored = _batches(3, 0, ignore=1), _batches(2, 10, ignore=2)
    counter = _ForwardCounter(model)
    r = opt.step(inner, scored)
    n_blocks = len(opt.blocks)
    assert set(r.passes) == set(PASS_KINDS)
    assert r.passes["inner_gradient"] == n_blocks * 3
    assert r.passes["loss"] == 3 * 2
    assert r.passes["gradient"] == r.passes["linearization"] == r.passes["ggn_product"] == 0
    # what actually ran: one forward (carrying the tangent, under the VJP) per inner gradient,
    # one forward without gradients per scored micro-batch and candidate
    assert counter.grad == r.passes["inner_gradient"]
    assert counter.no_grad == r.passes["loss"]
    tokens = [int((b.targets != -100).sum()) for b in inner + scored]
    assert tokens[0] != tokens[1]  # the counts below are of real token counts
    assert r.tokens_solve == sum(tokens[:3])
    assert r.tokens_line_search == sum(tokens[3:])  # once per micro-batch, as the fork
    assert r.cg_iterations is None and r.cg_residual is None and r.cg_converged is None


def test_cost_counters_without_line_search():
    model = make_model(LLAMA_TEST)
    opt = GaussNewton(model, inner="sgd", line_search=False)
    counter = _ForwardCounter(model)
    r = opt.step(_batches(2, 0))
    assert r.passes["loss"] == 0 and r.tokens_line_search == 0
    assert r.passes["inner_gradient"] == counter.grad == 2 and counter.no_grad == 0
    assert r.tokens_solve == 2 * 2 * LLAMA_TEST.seq_len


# -- the exact GN step (inner solver cg) against dense float64 oracles -----------------------

def _dense(model, batches):
    """θ (flat), g and G of ``L = (1/K) Σ_k L_k`` (L_k the mean token cross-entropy of
    micro-batch k) at the model's parameters: ``g`` by autograd, ``G = (1/K) Σ_k J_kᵀ H_k J_k``
    with J_k from ``jacrev`` of the logits and ``H_k`` per token ``(diag p − p pᵀ)/N_k``."""
    named = list(model.named_parameters())
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflat(t):
        out, i = {}, 0
        for (n, _), s in zip(named, shapes):
            out[n] = t[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def logits(t, batch):
        with math_attention():
            z = functional_call(model, unflat(t), (batch.inputs,), tie_weights=True)
        return z.reshape(-1, z.shape[-1])

    P = theta.numel()
    g, G = torch.zeros(P, dtype=theta.dtype), torch.zeros(P, P, dtype=theta.dtype)
    for batch in batches:
        y = batch.targets.reshape(-1)
        keep = y != -100
        N = int(keep.sum())

        def loss(t, batch=batch, y=y, N=N):
            return torch.nn.functional.cross_entropy(logits(t, batch), y, ignore_index=-100,
                                                     reduction="sum") / N

        t = theta.clone().requires_grad_(True)
        g += torch.autograd.grad(loss(t), t)[0] / len(batches)
        z = logits(theta, batch).detach()
        J = jacrev(lambda t, batch=batch: logits(t, batch))(theta)  # [T, V, P]
        p = torch.softmax(z, -1)
        H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / N  # [T, V, V]
        H = H * keep[:, None, None]
        HJ = torch.einsum("tvw,twq->tvq", H, J)
        G += J.reshape(-1, P).T @ HJ.reshape(-1, P) / len(batches)
    return theta, g, G, [n for n, _ in named]


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _block_mask(opt, names, model):
    """Block id of every coordinate of θ (the GaussNewton object's blocks)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    of = {n: b for b, block in enumerate(opt.blocks) for n in block}
    return torch.cat([torch.full((sizes[n],), of[n]) for n in names])


def _blockdiag(G, ids):
    return G * (ids[:, None] == ids[None, :])


@pytest.mark.parametrize("cfg,blocks", [(LLAMA_TEST, None), (LLAMA_TEST, "layer"),
                                        (GPT_TEST, None)])
def test_one_cg_step_is_the_dense_damped_gn_step(cfg, blocks):
    model = make_model(cfg)
    batch = _batches(1, 3, ignore=2)
    theta, g, G, names = _dense(model, batch)
    lam = 0.1
    opt = GaussNewton(model, blocks=blocks, inner="cg", damping=lam, line_search=[1.0],
                      cg_tol=1e-13, cg_max_iter=3000)
    if blocks is not None:
        G = _blockdiag(G, _block_mask(opt, names, model))
        assert len(opt.blocks) == 4  # embed, two layers, head
    want = theta - torch.linalg.solve(G + lam * torch.eye(len(g), dtype=g.dtype), g)
    counter = _ForwardCounter(model)
    r = opt.step(batch, _batches(1, 20))
    got = _flat_params(model)
    assert r.step_size == 1.0 and r.cg_converged
    assert (got - want).abs().max() <= 1e-9 * max(1.0, want.abs().max())
    assert r.cg_residual <= 1e-13
    # the quadratic model's decrease, against the dense model (layerwise: the blocks' decreases
    # averaged, as for the other inner solvers; with blockdiag G they sum to the merged one's)
    d = want - theta
    change = float(g @ d + 0.5 * d @ (G + lam * torch.eye(len(g), dtype=g.dtype)) @ d)
    assert r.predicted_decrease == pytest.approx(-change / len(opt.blocks), rel=1e-8)
    assert r.lr == 0.0
    # products recompute the forward pass (no cached linearization): one forward carrying the
    # tangent per inner gradient and per product, one without gradients per candidate
    assert r.passes["inner_gradient"] == 1 and r.passes["linearization"] == 0
    assert r.passes["ggn_product"] >= r.cg_iterations > 0
    if blocks is None:
        assert r.passes["ggn_product"] == r.cg_iterations
    assert counter.grad == r.passes["inner_gradient"] + r.passes["ggn_product"]
    assert counter.no_grad == r.passes["loss"] == 1


def test_several_micro_batches_solve_with_the_mean_of_their_mean_losses():
    model = make_model(LLAMA_TEST)
    inner = _batches(3, 5, ignore=1)  # different token counts: mean of means ≠ token mean
    theta, g, G, _ = _dense(model, inner)
    # the token-weighted mean (one batch of all rows) gives a different step: the test can fail
    _, g_tok, G_tok, _ = _dense(model, [Batch(torch.cat([b.inputs for b in inner]),
                                              torch.cat([b.targets for b in inner]))])
    lam = 0.2
    opt = GaussNewton(model, inner="cg", damping=lam, line_search=False, cg_tol=1e-12,
                      cg_max_iter=3000)
    r = opt.step(inner)
    assert r.cg_converged
    want = theta - torch.linalg.solve(G + lam * torch.eye(len(g), dtype=g.dtype), g)
    assert (_flat_params(model) - want).abs().max() <= 1e-9 * max(1.0, want.abs().max())
    other = theta - torch.linalg.solve(G_tok + lam * torch.eye(len(g), dtype=g.dtype), g_tok)
    assert (other - want).abs().max() > 1e-4
    losses = [float(torch.nn.functional.cross_entropy(
        model_logits, b.targets.reshape(-1), ignore_index=-100))
        for b, model_logits in [(b, _logits_at(model, theta, b)) for b in inner]]
    assert r.loss == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert r.passes["inner_gradient"] == 3 and r.passes["linearization"] == 0
    assert r.passes["ggn_product"] == 3 * r.cg_iterations  # every product sums 3 micro-batches


def _logits_at(model, theta, batch):
    named = list(model.named_parameters())
    out, i = {}, 0
    for n, p in named:
        out[n] = theta[i:i + p.numel()].view(p.shape)
        i += p.numel()
    with math_attention():
        z = functional_call(model, out, (batch.inputs,), tie_weights=True)
    return z.reshape(-1, z.shape[-1])


def _dense_cg(A, b, x0, iterations):
    """Plain CG on a dense matrix, ``iterations`` steps from ``x0``."""
    x = x0.clone()
    r = b - A @ x
    p = r.clone()
    for _ in range(iterations):
        Ap = A @ p
        alpha = (r @ r) / (p @ Ap)
        x = x + alpha * p
        r_new = r - alpha * Ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


@pytest.mark.parametrize("rule", ["point", "direction", None])
def test_warm_start_is_the_previous_solution(rule):
    """Two steps of 4 CG iterations each (not converged, so the start matters), step 0.5: the
    second solve starts at the first solution's point θ_0 + Δ_0, i.e. x0 = (1 − 0.5) Δ_0 (the
    reference's rule, "point"), at x0 = Δ_0 ("direction") or at 0 (no warm start)."""
    model = make_model(LLAMA_TEST)
    lam, its = 0.1, 4
    opt = GaussNewton(model, inner="cg", damping=lam, line_search=[0.5], cg_tol=1e-14,
                      cg_max_iter=its, warm_start=rule is not None,
                      cg_warm_start=rule or "point")
    first, second = _batches(1, 30), _batches(1, 40)
    theta, g, G, _ = _dense(model, first)
    eye = torch.eye(len(g), dtype=g.dtype)
    d1 = _dense_cg(G + lam * eye, -g, torch.zeros_like(g), its)
    r1 = opt.step(first, _batches(1, 50))
    assert r1.step_size == 0.5 and not r1.cg_converged and r1.cg_iterations == its
    assert (_flat_params(model) - (theta + 0.5 * d1)).abs().max() <= 1e-9
    theta2, g2, G2, _ = _dense(model, second)
    x0 = {"point": 0.5 * d1, "direction": d1, None: torch.zeros_like(g2)}[rule]
    d2 = _dense_cg(G2 + lam * eye, -g2, x0, its)
    r2 = opt.step(second, _batches(1, 60))
    assert (_flat_params(model) - (theta2 + 0.5 * d2)).abs().max() <= 1e-9
    warm = rule is not None
    assert r2.passes["ggn_product"] == its + (1 if warm else 0)  # x0 costs one product
    assert (opt.cg_delta is not None) == warm


def test_point_warm_start_after_a_full_step_starts_from_zero():
    """α = 1 puts θ_{t+1} at the solution's point: the reference's rule starts the next solve
    at x0 = 0 (no product spent on x0), the "direction" rule at Δ_t."""
    lam, its = 0.1, 4
    for rule, warm_products in (("point", 0), ("direction", 1)):
        model = make_model(LLAMA_TEST)
        opt = GaussNewton(model, inner="cg", damping=lam, line_search=[1.0], cg_tol=1e-14,
                          cg_max_iter=its, cg_warm_start=rule)
        opt.step(_batches(1, 30), _batches(1, 50))
        theta2, g2, G2, _ = _dense(model, _batches(1, 40))
        x0 = torch.zeros_like(g2) if rule == "point" else opt_delta(opt)
        d2 = _dense_cg(G2 + lam * torch.eye(len(g2), dtype=g2.dtype), -g2, x0, its)
        r2 = opt.step(_batches(1, 40), _batches(1, 60))
        assert (_flat_params(model) - (theta2 + d2)).abs().max() <= 1e-9
        assert r2.passes["ggn_product"] == its + warm_products


def opt_delta(opt):
    """The stored warm start x0 of a cg GaussNewton, flat in named_parameters() order."""
    return torch.cat([opt.cg_delta[n].reshape(-1) for n in opt.names])


def test_warm_start_survives_state_dict():
    model = make_model(LLAMA_TEST)
    kw = dict(inner="cg", damping=0.1, line_search=[0.5], cg_max_iter=3)
    opt = GaussNewton(model, **kw)
    opt.step(_batches(1, 0), _batches(1, 1))
    state = opt.state_dict()
    clone = make_model(LLAMA_TEST)
    clone.load_state_dict(model.state_dict())
    resumed = GaussNewton(clone, **kw)
    resumed.load_state_dict(state)
    a = opt.step(_batches(1, 2), _batches(1, 3))
    b = resumed.step(_batches(1, 2), _batches(1, 3))
    assert a.passes == b.passes
    assert torch.equal(_flat_params(model), _flat_params(clone))
    with pytest.raises(CurvlabError, match="another inner solver"):
        GaussNewton(make_model(LLAMA_TEST), inner="adamw").load_state_dict(state)


def test_singular_ggn_without_damping_stops_at_the_iteration_limit():
    """λ = 0: G has rank ≤ N (V − 1) < P. CG stops at cg_max_iter; the step is finite and
    reports the true relative residual."""
    model = make_model(LLAMA_TEST)
    batch = _batches(1, 7)
    theta, g, G, _ = _dense(model, batch)
    assert int(torch.linalg.matrix_rank(G)) < len(g)
    opt = GaussNewton(model, inner="cg", damping=0.0, line_search=False, cg_tol=1e-15,
                      cg_max_iter=6)
    r = opt.step(batch)
    after = _flat_params(model)
    assert torch.isfinite(after).all()
    assert r.cg_iterations == 6 and r.cg_converged is False
    d = after - theta
    true_residual = float((G @ d + g).norm() / g.norm())
    assert 1e-15 < r.cg_residual and r.cg_residual == pytest.approx(true_residual, rel=1e-6)


def test_cg_refusals():
    model = make_model(LLAMA_TEST)
    with pytest.raises(ConfigError, match="not quadratic"):
        GaussNewton(model, mode="prox", inner="cg")
    for bad in (0.0, -1e-3, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="cg-tol"):
            GaussNewton(model, inner="cg", cg_tol=bad)
    for bad in (0, -2, 2.5):
        with pytest.raises(ConfigError, match="cg-max-iter"):
            GaussNewton(model, inner="cg", cg_max_iter=bad)
    with pytest.raises(ConfigError, match="not quadratic"):
        TrainConfig(optimizer="layerwise-gn-prox", inner_optimizer="cg")
    with pytest.raises(ConfigError, match="cg-tol"):
        TrainConfig(optimizer="gn", inner_optimizer="cg", cg_tol=2.0)
    with pytest.raises(ConfigError, match="cg-max-iter"):
        TrainConfig(optimizer="gn", inner_optimizer="cg", cg_max_iter=0)
    with pytest.raises(ConfigError, match="cg-warm-start"):
        GaussNewton(model, inner="cg", cg_warm_start="previous")
    with pytest.raises(ConfigError, match="cg-warm-start"):
        TrainConfig(optimizer="gn", inner_optimizer="cg", cg_warm_start="x")


@pytest.mark.parametrize("args,message", [
    (["--optimizer", "gn-prox", "--inner-optimizer", "cg"], "not quadratic"),
    (["--optimizer", "gn", "--inner-optimizer", "cg", "--cg-tol", "0"], "cg-tol"),
    (["--optimizer", "gn", "--inner-optimizer", "cg", "--cg-max-iter", "0"], "cg-max-iter"),
])
def test_cli_refuses_in_one_line(tmp_path, capsys, args, message):
    err = assert_clean_error(capsys, "train", *args, "--out", tmp_path / "run", match=message)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "run").exists()


# -- curvlab train with cg: resume, and two processes ----------------------------------------

@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("init") / "init.pt")


def _cg_config(init, **kw):
    base = dict(init=init, optimizer="gn", inner_optimizer="cg", micro_batch_size=2,
                dtype="float64", inner_steps=2, eval_every=1, eval_batches=1, damping=0.1,
                cg_tol=1e-8, cg_max_iter=3, line_search=(1.0, 0.5))
    return TrainConfig(**{**base, **kw})


def test_train_with_cg_resumes_with_its_warm_start(tmp_path, init_ckpt):
    """3 CG iterations (not converged), so the resumed run must start step 4's solve from the
    stored Δ of step 3 to equal the uninterrupted run."""
    # step sizes below 1: the reference's warm start x0 = (1 − α) Δ is never 0
    cfg = _cg_config(init_ckpt, max_steps=4, checkpoint_every=2, line_search=(0.5, 0.25))
    whole = train(cfg.replace(out=str(tmp_path / "whole")))

    class Interrupt(Exception):
        pass

    def stop_at_3(row):
        if row["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg.replace(out=str(tmp_path / "part")), progress=stop_at_3)
    resumed = train(cfg.replace(out=str(tmp_path / "part"), resume=True))
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    cold = train(cfg.replace(out=str(tmp_path / "cold"), warm_start=False))
    assert not all(torch.equal(p, q) for p, q in zip(whole.model.parameters(),
                                                     cold.model.parameters()))
    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")][1:]
    assert len(rows) == 4 and all(row["lr"] == 0.0 for row in rows)
    # the metrics report the solve: iteration limit hit, residual above the tolerance, finite
    # (measured: 0.07, 0.69, 1.36, 0.79 — 3 iterations from the previous Δ can end worse than
    # the residual 1 of x0 = 0 where the direction turns)
    assert all(row["cg_iterations"] == 3 and 1e-8 < row["cg_residual"] < 10 for row in rows)
    assert all(row["passes"]["ggn_product"] == 2 * (3 + (row["step"] > 1)) for row in rows)
    _, info = load_checkpoint(tmp_path / "whole" / "final.pt")
    hp = info.optimizer["hparams"]
    assert hp["inner_optimizer"] == "cg" and hp["cg_tol"] == 1e-8 and hp["cg_max_iter"] == 3
    assert "inner_lr" not in hp
    with pytest.raises(ConfigError, match="changed options: cg_max_iter"):
        train(cfg.replace(out=str(tmp_path / "part"), resume=True, cg_max_iter=5))


def _cg_steps(rank, world):
    """Two cg steps (the second warm-started) on this rank's rows of 4-row micro-batches
    (uneven token counts across rows and micro-batches)."""
    torch.set_num_threads(1)
    model = make_model(LLAMA_TEST)
    opt = GaussNewton(model, inner="cg", damping=0.1, line_search_range=3, cg_tol=1e-10,
                      cg_max_iter=6)

    def batches(count, seed):
        out = []
        for k in range(count):
            b = make_batch(LLAMA_TEST, batch_size=4, seed=seed + k)
            b.targets[rank * (4 // world), : 1 + k] = -100  # the first row of this shard
            out.append(b.shard(rank, world) if world > 1 else b)
        return out

    steps = [opt.step(batches(2, 10 * t), batches(2, 10 * t + 5)) for t in range(2)]
    return {"params": _flat_params(model), "steps": steps}


def test_cg_on_two_processes_equals_one_process(tmp_path):
    two = spawn(_cg_steps, 2, tmp_path=tmp_path)
    one = _cg_steps_one()
    for r in two:
        # float64; only the order of the token sums differs (measured 1.5e-11 after 2 steps)
        assert (r["params"] - one["params"]).abs().max() <= 1e-9 * one["params"].abs().max()
        for a, b in zip(r["steps"], one["steps"]):
            assert (a.passes, a.tokens_solve, a.tokens_line_search, a.cg_iterations,
                    a.step_size) == (b.passes, b.tokens_solve, b.tokens_line_search,
                                     b.cg_iterations, b.step_size)
            assert a.loss == pytest.approx(b.loss, rel=1e-12)
            assert a.cg_residual == pytest.approx(b.cg_residual, rel=1e-6, abs=1e-14)
    assert torch.equal(two[0]["params"], two[1]["params"])


def _cg_steps_one():
    """The single-process run with the same ignored targets as the two ranks together."""
    torch.set_num_threads(1)
    model = make_model(LLAMA_TEST)
    opt = GaussNewton(model, inner="cg", damping=0.1, line_search_range=3, cg_tol=1e-10,
                      cg_max_iter=6)

    def batches(count, seed):
        out = []
        for k in range(count):
            b = make_batch(LLAMA_TEST, batch_size=4, seed=seed + k)
            for rank in range(2):
                b.targets[rank * 2, : 1 + k] = -100
            out.append(b)
        return out

    steps = [opt.step(batches(2, 10 * t), batches(2, 10 * t + 5)) for t in range(2)]
    return {"params": _flat_params(model), "steps": steps}


def test_cg_stops_at_a_direction_without_positive_curvature():
    """A = diag(2, 1, −0.5), b = 1: the first step has pᵀAp = 2.5 > 0 (x = 1.2 b), the second
    direction p = r + 1.52 b has pᵀAp < 0: with on_breakdown="stop" the column keeps x = 1.2 b
    and its residual; the second column (b = e_1, one step to the exact solution) is unaffected."""
    A = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError):
        cg(A, b, tol=1e-12)
    r = cg(A, b, tol=1e-12, on_breakdown="stop")
    assert bool(r.breakdown) and not bool(r.converged) and r.iterations == 1
    assert torch.allclose(r.x, 1.2 * b, rtol=0, atol=1e-15)
    assert float(r.residual_norm) == pytest.approx(4.56 ** 0.5, rel=1e-14)
    assert torch.allclose(r.residual, b - A @ r.x, rtol=0, atol=1e-14) and r.products == 2
    B = torch.stack([b, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)], dim=1)
    rb = cg(A, B, tol=1e-12, on_breakdown="stop", max_iter=5)
    assert rb.breakdown.tolist() == [True, False] and rb.converged.tolist() == [False, True]
    assert torch.allclose(rb.x[:, 0], 1.2 * b, rtol=0, atol=1e-15)
    assert torch.allclose(rb.x[:, 1], torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="on_breakdown"):
        cg(A, b, on_breakdown="ignore")
