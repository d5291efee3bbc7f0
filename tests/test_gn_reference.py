"""The GN outer loop against an independent re-implementation of the reference's loop.

The reference (natalieabreu/full-gauss-newton, ``llama_train_gn.py`` / ``_layerwise.py``): the
inner variables θ' persist across outer steps, every candidate ``1/√2^i`` of the line search is
scored on fresh micro-batches drawn after the inner ones, the lowest wins. The loop below is
written from that description with reverse-mode autograd only (``JΔ`` by the double-VJP trick,
no ``torch.func``), a plain SGD inner solver, no clipping, no weight decay and a constant
learning rate, in float64; the trainer must match it to 1e-10.
"""

import math

import pytest
import torch

import curvlab
from curvlab.curvature.blocks import layer_partition
from curvlab.models import build_model
from curvlab.models.output import extract_logits
from curvlab.train import GaussNewton, TrainConfig, train
from tests.conftest import TRAIN_TEST, train_checkpoint

B, T, INNER, LR, STEPS = 2, 16, 3, 2.0, 3


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("ref") / "init.pt", seed=3,
                            seq_len=T, batch_size=B)


def _logits(model, params, inputs):
    z = extract_logits(torch.func.functional_call(model, params, (inputs,)))
    return z.reshape(-1, z.shape[-1])


def _inner_grad(model, theta, delta, batch, block):
    """∂/∂Δ of L(z) + g_zᵀJΔ + ½ (JΔ)ᵀ H_z JΔ over the block, by reverse mode only."""
    leaves = {k: v.clone().requires_grad_(k in block) for k, v in theta.items()}
    with curvlab.math_attention():
        z = _logits(model, leaves, batch.inputs)
    y = batch.targets.reshape(-1)
    n = y.numel()
    p = z.detach().softmax(-1)
    g = (p - torch.nn.functional.one_hot(y, z.shape[-1]).double()) / n
    # JΔ: u ↦ Jᵀu is linear, so JΔ = ∂/∂u ⟨Jᵀu, Δ⟩
    u = torch.zeros_like(z, requires_grad=True)
    jtu = torch.autograd.grad(z, [leaves[k] for k in block], u, create_graph=True)
    (jd,) = torch.autograd.grad(sum((a * delta[k]).sum() for a, k in zip(jtu, block)), u)
    hjd = (p * jd - p * (p * jd).sum(-1, keepdim=True)) / n
    grads = torch.autograd.grad(z, [leaves[k] for k in block], g + hjd)
    return dict(zip(block, grads))


def _loss(model, params, batches):
    with torch.no_grad():
        return sum(float(torch.nn.functional.cross_entropy(
            _logits(model, params, b.inputs), b.targets.reshape(-1))) for b in batches) / len(
            batches)


def _reference_run(init, layerwise):
    model, _ = curvlab.load_checkpoint(init, dtype=torch.float64)
    stream = curvlab.BatchStream(curvlab.DataSpec(seq_len=T, batch_size=B))
    return _reference_loop(model, layerwise, stream.batch)


def _reference_loop(model, layerwise, batch):
    """The reference's outer loop on ``model`` (left unchanged); ``batch(i)``: micro-batch i."""
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    blocks = ([list(b.params) for b in layer_partition(model)] if layerwise
              else [list(theta)])
    grid = [1 / math.sqrt(2) ** i for i in range(10 if layerwise else 5)]
    point = {k: v.clone() for k, v in theta.items()}  # θ', carried across outer steps
    chosen = []
    for t in range(STEPS):
        first = t * 2 * INNER  # inner micro-batches, then as many for the line search
        inner = [batch(first + k) for k in range(INNER)]
        scored = [batch(first + INNER + j) for j in range(INNER)]
        for block in blocks:
            for b in inner:
                delta = {k: point[k] - theta[k] for k in block}
                for k, g in _inner_grad(model, theta, delta, b, block).items():
                    point[k] = point[k] - LR * g
        direction = {k: point[k] - theta[k] for k in theta}
        losses = [_loss(model, {k: theta[k] + a * direction[k] for k in theta}, scored)
                  for a in grid]
        best = min(range(len(grid)), key=lambda i: (losses[i], -grid[i]))
        chosen.append(grid[best])
        theta = {k: theta[k] + grid[best] * direction[k] for k in theta}
    return theta, point, chosen


@pytest.mark.parametrize("optimizer", ["gn", "layerwise-gn"])
def test_trainer_equals_an_independent_reference_loop(init_ckpt, optimizer):
    theta, point, chosen = _reference_run(init_ckpt, optimizer == "layerwise-gn")
    cfg = TrainConfig(optimizer=optimizer, init=init_ckpt, micro_batch_size=B, seq_len=T,
                      dtype="float64", inner_optimizer="sgd", momentum=0.0, grad_clip=0.0,
                      weight_decay=0.0, schedule="constant", inner_steps=INNER, inner_lr=LR,
                      max_steps=STEPS, eval_every=STEPS, eval_batches=1)
    r = train(cfg)
    assert [row["ls_step"] for row in r.history[1:]] == pytest.approx(chosen, rel=1e-15)
    assert any(a < 1 for a in chosen)  # the warm start's (1 − α) Δ matters in this run
    for k, p in r.model.named_parameters():
        assert (p - theta[k]).norm() <= 1e-10 * theta[k].norm(), k


@pytest.mark.parametrize("layerwise", [False, True])
def test_gauss_newton_on_a_hugging_face_llama_equals_the_reference_loop(tmp_path, layerwise):
    """A Hugging Face Llama loaded in float64 is float64 end to end: curvlab.optim.GaussNewton
    (torch.func products) and the reverse-mode-only reference agree as on curvlab's models."""
    pytest.importorskip("transformers")
    from tests import hf_families

    folder = hf_families.save("llama", tmp_path / "llama")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hf_families.VOCAB, (STEPS * 2 * INNER, B, T + 1), generator=gen)

    def batch(i):
        return curvlab.Batch(tokens[i, :, :-1], tokens[i, :, 1:])

    ref_model, _ = curvlab.load_model(folder, dtype=torch.float64)
    theta, _, chosen = _reference_loop(ref_model, layerwise, batch)
    model, _ = curvlab.load_model(folder, dtype=torch.float64)
    opt = curvlab.GaussNewton(model, blocks="layer" if layerwise else None, inner="sgd",
                              momentum=0.0, grad_clip=0.0, weight_decay=0.0, inner_lr=LR)
    steps = []
    for t in range(STEPS):
        first = t * 2 * INNER
        r = opt.step([batch(first + k) for k in range(INNER)],
                     [batch(first + INNER + j) for j in range(INNER)])
        steps.append(r.step_size)
    assert steps == pytest.approx(chosen, rel=1e-15)
    for k, p in model.named_parameters():
        assert (p - theta[k]).norm() <= 1e-12 * theta[k].norm(), k


def test_after_a_partial_step_the_next_solve_starts_at_the_previous_inner_solution(init_ckpt):
    model, _ = curvlab.load_checkpoint(init_ckpt, dtype=torch.float64)
    stream = curvlab.BatchStream(curvlab.DataSpec(seq_len=T, batch_size=B))
    batches = stream.batches(8)
    gn = GaussNewton(model, inner="sgd", momentum=0.0, grad_clip=0.0, weight_decay=0.0,
                     inner_lr=LR, line_search=(0.5,))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    r = gn.step(batches[:2], batches[2:4])
    assert r.step_size == 0.5
    for k, p in model.named_parameters():
        full = (p.detach() - before[k]) / 0.5  # Δ_t
        assert torch.allclose(gn.point[k], before[k] + full, rtol=0, atol=1e-14)
    # the next solve: its first inner gradient is taken at Δ = θ' − θ_{t+1} = (1 − α) Δ_t; a
    # fresh object started at θ_{t+1} (Δ = 0) takes another step
    state = gn.state_dict()
    cold = GaussNewton(model, inner="sgd", momentum=0.0, grad_clip=0.0, weight_decay=0.0,
                       inner_lr=LR, line_search=False, warm_start=False)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    warm_step = GaussNewton(model, inner="sgd", momentum=0.0, grad_clip=0.0,
                            weight_decay=0.0, inner_lr=LR, line_search=False)
    warm_step.load_state_dict(state)
    w = warm_step.step(batches[4:5])
    warm = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    c = cold.step(batches[4:5])
    assert w.inner_model_losses[0] < w.loss  # m((1 − α)Δ_t) < m(0) = L(θ_{t+1})
    assert c.inner_model_losses[0] == pytest.approx(c.loss, rel=1e-14)  # cold: Δ = 0
    assert max(float((warm[k] - q.detach()).abs().max())
               for k, q in model.named_parameters()) > 1e-6


def test_float64_checkpoints_round_trip_exactly(tmp_path):
    model = build_model(TRAIN_TEST, seed=1).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # values a float32 cannot hold
            p.add_(1e-12 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    path = curvlab.save_checkpoint(tmp_path / "f64.pt", model)
    for load in (curvlab.load_checkpoint, curvlab.load_model):
        back, _ = load(path, dtype=torch.float64)
        for (k, p), (_, q) in zip(model.named_parameters(), back.named_parameters()):
            assert q.dtype == torch.float64 and torch.equal(p, q), k
    # a float32 checkpoint analyzed in float64 keeps its float32 values exactly
    path32 = curvlab.save_checkpoint(tmp_path / "f32.pt", model.float())
    back, _ = curvlab.load_checkpoint(path32, dtype=torch.float64)
    for p, q in zip(model.parameters(), back.parameters()):
        assert torch.equal(p.double(), q)


def test_line_search_defaults_are_the_reference_grid_and_batch_layout():
    root = 1 / math.sqrt(2)
    for optimizer, R in (("gn", 5), ("gn-prox", 5), ("layerwise-gn", 10),
                         ("layerwise-gn-prox", 10)):
        cfg = TrainConfig(optimizer=optimizer, inner_steps=7)
        assert cfg.line_search_grid == pytest.approx([root ** i for i in range(R)], rel=1e-15)
        assert cfg.ls_batches == 7  # as many fresh micro-batches as the inner solve used
    assert TrainConfig(optimizer="gn", line_search_range=3).line_search_grid == pytest.approx(
        [1, root, 0.5], rel=1e-15)
    assert TrainConfig(optimizer="gn", line_search=(0.3, 1.0)).line_search_grid == (0.3, 1.0)
    assert TrainConfig(optimizer="gn", line_search_batches=2).ls_batches == 2
    assert TrainConfig(optimizer="gn", use_line_search=False).ls_batches == 0
    assert TrainConfig(optimizer="adamw").ls_batches == 0
    with pytest.raises(curvlab.errors.ConfigError, match="not both"):
        TrainConfig(optimizer="gn", line_search=(1.0,), line_search_range=3)


def test_no_line_search_takes_the_whole_step_and_reads_only_inner_batches(init_ckpt):
    cfg = TrainConfig(optimizer="gn", init=init_ckpt, micro_batch_size=B, seq_len=T,
                      dtype="float64", inner_steps=2, max_steps=2, eval_every=2,
                      eval_batches=1, use_line_search=False)
    r = train(cfg)
    assert [row["ls_step"] for row in r.history[1:]] == [1.0, 1.0]
    assert all(row["ls_losses"] == [] for row in r.history[1:])
    assert r.tokens == 2 * 2 * B * T
