"""curvlab.sharpness against dense float64 oracles written here: the gradient and the Hessian by
torch.func on a model of 468 parameters, eigh / eig, AdamW's update replayed from consecutive
checkpoints of a real (float64) training run, and the Jensen-Shannon distance by scipy."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import norm
from torch.func import functional_call, grad, jacfwd

import curvlab
from curvlab.checkpoint import load_checkpoint
from curvlab.curvature.blocks import partition
from curvlab.curvature.operators import ggn, hessian
from curvlab.errors import ConfigError, CurvlabError
from curvlab.linalg import SpectralDensity, lanczos
from curvlab.models import ModelConfig, build_model
from curvlab.sharpness import (
    adam_preconditioner,
    checkpoint_lr,
    checkpoint_threshold,
    gradient_share,
    js_distances,
    loss_gradient,
    parameter_vector,
    preconditioned_sharpness,
    stability_threshold,
)
from curvlab.train import TrainConfig, train

VOCAB = 16
SMALL = ModelConfig("llama", vocab_size=VOCAB, seq_len=8, d_model=4, n_layers=2, n_heads=1,
                    d_ff=8)
RUN_CFG = SMALL.replace(n_layers=1)  # the training runs: 300 parameters


def batches(seed: int = 0):
    """Two analysis batches; the second has ignored targets (the mean is over the others)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows in (2, 3):
        tokens = torch.randint(0, VOCAB, (rows, SMALL.seq_len + 1), generator=gen)
        out.append(curvlab.Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    out[1].targets[0, :3] = -100
    return out


def flat_of(tensors, part):
    """Partition coordinates of a per-parameter dict, written out from the partition's parts."""
    return torch.cat([tensors[p.param].reshape(-1)[p.start:p.stop] for b in part for p in b.parts])


_ORACLES: dict = {}


def oracle(model, bs, part):
    """:func:`dense_oracle`, once per model and partition (the batches are always ``batches()``)."""
    key = (id(model), tuple((p.param, p.start, p.stop) for b in part for p in b.parts))
    if key not in _ORACLES:
        _ORACLES[key] = dense_oracle(model, bs, part)
    return _ORACLES[key]


def dense_oracle(model, bs, part):
    """Mean token cross-entropy, its gradient and its dense Hessian (forward-over-reverse
    ``jacfwd(grad)``) in the coordinates of ``part``, from the model's plain forward."""
    base = {n: p.detach() for n, p in model.named_parameters()}
    index = {}
    for b in part:
        for p in b.parts:
            index.setdefault(p.param, []).append((p.start, p.stop))
    sizes = [p.stop - p.start for b in part for p in b.parts]
    names = [p.param for b in part for p in b.parts]
    ranges = [(p.start, p.stop) for b in part for p in b.parts]
    n_tokens = sum(int((b.targets != -100).sum()) for b in bs)

    def loss(x):
        params = dict(base)
        for piece, name, (a, z) in zip(torch.split(x, sizes), names, ranges):
            flat = params[name].reshape(-1)
            mask = torch.zeros_like(flat)
            mask[a:z] = 1
            delta = torch.zeros_like(flat).index_put((torch.arange(a, z),), piece)
            params[name] = (flat * (1 - mask) + delta).view(base[name].shape)
        total = 0
        for b in bs:
            logits = functional_call(model, params, (b.inputs,))
            total = total + torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB), b.targets.reshape(-1), ignore_index=-100,
                reduction="sum")
        return total / n_tokens

    x0 = flat_of(base, part)
    return loss(x0), grad(loss)(x0), jacfwd(grad(loss))(x0)


@pytest.fixture(scope="module")
def model():
    m = build_model(SMALL, seed=3).double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in m.parameters():  # O(1) logits, generic norm weights
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)) if p.ndim == 1 \
                else p.mul_(6.0)
    return m.eval()


@pytest.mark.parametrize("spec", ["layer", "heads", ["head=lm_head.weight[4:12]",
                                                     "b=layers.1.mlp.*", "embed_tokens.weight"]])
def test_gradient_and_theta_in_operator_coordinates(model, spec):
    bs = batches()
    part = partition(model, spec)
    op = hessian(model, bs, part, cache=spec == "heads")  # cached linearization and fresh
    _, g, H = oracle(model, bs, part)
    got = loss_gradient(op)
    assert got.dtype == torch.float64 and got.shape == g.shape
    assert torch.allclose(got, g, rtol=0, atol=1e-12 * float(g.abs().max()))
    theta = flat_of(dict(model.named_parameters()), part).detach()
    assert torch.equal(parameter_vector(model, op), theta)
    # the operator's Hessian is the oracle's (same coordinates, same loss)
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    assert torch.allclose(op @ V, H @ V, rtol=0, atol=1e-10 * float((H @ V).abs().max()))
    # the GGN operator's gradient is the same loss's
    assert torch.allclose(loss_gradient(ggn(model, bs, part, cache=False)), g, rtol=0,
                          atol=1e-12 * float(g.abs().max()))


# a part of θ (232 coordinates): Lanczos to full accuracy stays quick
SUB = ["layers.1.*", "lm_head.weight"]


def test_gradient_share_of_top_eigenspace(model):
    bs = batches()
    part = partition(model, SUB)
    op = hessian(model, bs, part, cache=False)
    _, g, H = oracle(model, bs, part)
    w, U = torch.linalg.eigh((H + H.T) / 2)
    k = 4
    V = U[:, -k:]  # explicit top-k eigenvectors
    expected = float((V.T @ g).pow(2).sum() / g.pow(2).sum())
    res = lanczos(op, k=k, tol=1e-12)
    assert torch.allclose(res.eigenvalues, w.flip(0)[:k], rtol=1e-10, atol=0)
    share = gradient_share(res.eigenvectors, loss_gradient(op))
    assert abs(share - expected) < 1e-10
    assert 0 < share < 1
    # the step's share in the same way, for any vector
    d = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(gradient_share(res.eigenvectors, d)
               - float((V.T @ d).pow(2).sum() / d.pow(2).sum())) < 1e-10
    # exact cases: in the span, orthogonal to it, zero, one vector
    assert abs(gradient_share(V, V @ torch.arange(1.0, k + 1, dtype=torch.float64)) - 1) < 1e-14
    assert abs(gradient_share(V, U[:, 0] + U[:, 1])) < 1e-14
    assert math.isnan(gradient_share(V, torch.zeros_like(g)))
    assert abs(gradient_share(V[:, -1], g) - float((V[:, -1] @ g) ** 2 / (g @ g))) < 1e-14
    with pytest.raises(ConfigError):
        gradient_share(V, g[:-1])


def test_preconditioned_sharpness_is_top_of_inverse_p_times_h(model):
    bs = batches()
    part = partition(model, SUB)
    op = hessian(model, bs, part, cache=False)
    _, _, H = oracle(model, bs, part)
    p = torch.rand(op.shape[0], generator=torch.Generator().manual_seed(2),
                   dtype=torch.float64) * 10 + 0.05
    ev = np.linalg.eigvals((H / p[:, None]).numpy())  # P⁻¹H, not symmetric
    assert np.abs(ev.imag).max() < 1e-8 * np.abs(ev).max()
    top = np.sort(ev.real)[::-1][:3]
    res = preconditioned_sharpness(op, p, k=3, tol=1e-12)
    assert np.allclose(res.eigenvalues.numpy(), top, rtol=1e-10, atol=0)
    # the symmetric form's eigenvectors w: P^{-1/2} w are eigenvectors of P⁻¹H
    u = res.eigenvectors[:, 0] / p.sqrt()
    lam = float(res.eigenvalues[0])
    assert torch.linalg.norm(H @ u / p - lam * u) < 1e-9 * lam * torch.linalg.norm(u)
    # P = I: the Hessian's own top eigenvalue
    plain = preconditioned_sharpness(op, torch.ones(op.shape[0], dtype=torch.float64), k=1,
                                     tol=1e-12)
    assert abs(float(plain.eigenvalues[0]) - float(torch.linalg.eigvalsh(H)[-1])) < 1e-10 * lam
    with pytest.raises(CurvlabError):
        preconditioned_sharpness(op, -p, k=1)


def test_stability_thresholds():
    assert stability_threshold("adamw", 1e-3, (0.9, 0.999)) == ("adam", pytest.approx(38000))
    assert stability_threshold("adamw", 1e-3) == ("adam", pytest.approx(38000))
    assert stability_threshold("adamw", 0.01, (0.95, 0.95))[1] == pytest.approx(3.9 / 0.05 / 0.01)
    assert stability_threshold("adamw", 0.5, (0.0, 0.9)) == ("adam", pytest.approx(4.0))
    for name in ("muon", "soap", "sgd"):
        assert stability_threshold(name, 0.02) == ("gd", pytest.approx(100.0))
    for name in ("gn", "gn-prox", "layerwise-gn", "layerwise-gn-prox", "nanogpt"):
        assert stability_threshold(name, 0.01) is None
    assert stability_threshold("adamw", None) is None
    assert stability_threshold("adamw", 0.0) is None


# -- a real AdamW run (float64) and its checkpoints --------------------------------------------

def _run(tmp, optimizer, steps, **kw):
    data = tmp / "tokens.npy"
    if not data.exists():
        np.save(data, np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.int64))
        curvlab.save_checkpoint(tmp / "init.pt", build_model(RUN_CFG, seed=5).double())
    out = tmp / optimizer
    cfg = TrainConfig(optimizer=optimizer, init=str(tmp / "init.pt"), data=str(data), seq_len=8,
                      micro_batch_size=2, max_steps=steps, checkpoint_every=1, eval_every=steps,
                      eval_batches=1, dtype="float64", out=str(out), **kw)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharpness-runs")
    # a large eps and few steps: ε's place (after the square root) and the bias corrections
    # change the update by far more than the tolerance
    adamw = _run(tmp, "adamw", 2, lr=0.02, eps=1e-3, betas=(0.8, 0.99), weight_decay=0.1,
                 grad_accum=2, schedule="cosine", final_lr_frac=0.1)
    muon = _run(tmp, "muon", 1, lr=0.02)
    gn = _run(tmp, "gn", 1, inner_steps=2)
    return {"adamw": adamw, "muon": muon, "gn": gn, "init": tmp / "init.pt"}


def test_adam_preconditioner_reproduces_the_adamw_updates(runs):
    """θ_t = θ_{t−1}(1 − η_t λ) − η_t m_t / ((1 − β₁^t) p_t) for both steps t of the run, with p_t
    = adam_preconditioner of checkpoint t and η_t = checkpoint_lr of checkpoint t."""
    b1, wd = 0.8, 0.1
    prev, _ = load_checkpoint(runs["init"], dtype=torch.float64)
    bs = batches()
    for t in (1, 2):
        path = runs["adamw"] / f"step_{t:06d}.pt"
        model, info = load_checkpoint(path, dtype=torch.float64)
        part = partition(model, "param")
        op = hessian(model, bs, part, cache=False)
        p = adam_preconditioner(info, op, model)
        lr = checkpoint_lr(info)
        stored = info.extra["trainer"]["method"]["optimizer"]
        assert all(group["lr"] == pytest.approx(lr, rel=1e-14) for group in stored["param_groups"])
        # the first moments, in the trainer's group order: hidden matrices, other matrices,
        # vectors (each in named_parameters order)
        names = [n for n, q in model.named_parameters()]
        shapes = dict(model.named_parameters())
        hidden = [n for n in names if n.startswith("layers.") and shapes[n].ndim == 2]
        order = hidden + [n for n in names if shapes[n].ndim == 2 and n not in hidden] + \
            [n for n in names if shapes[n].ndim == 1]
        state = stored["state"]
        m = flat_of({n: state[i]["exp_avg"] for i, n in enumerate(order)}, part)
        v = flat_of({n: state[i]["exp_avg_sq"] for i, n in enumerate(order)}, part)
        assert all(float(state[i]["step"]) == t for i in range(len(order)))
        # the explicit formula
        assert torch.allclose(p, (v / (1 - 0.99**t)).sqrt() + 1e-3, rtol=1e-13, atol=0)
        decay = flat_of({n: torch.full(shapes[n].shape, wd if shapes[n].ndim == 2 else 0.0,
                                       dtype=torch.float64) for n in names}, part)
        before = parameter_vector(prev, op)
        predicted = before * (1 - lr * decay) - lr / (1 - b1**t) * m / p
        assert torch.allclose(parameter_vector(model, op), predicted, rtol=0, atol=1e-13)
        # ε inside the square root, or no bias correction, would not reproduce the step
        wrong = (v / (1 - 0.99**t) + 1e-3).sqrt()
        assert (before * (1 - lr * decay) - lr / (1 - b1**t) * m / wrong
                - parameter_vector(model, op)).abs().max() > 1e-6
        prev = model
    # the live optimizer gives the same (a short loop of torch.optim.AdamW itself)
    live = build_model(SMALL, seed=5).double()
    opt = torch.optim.AdamW(live.parameters(), lr=0.01, betas=(0.9, 0.95), eps=1e-4)
    for s in range(2):
        opt.zero_grad()
        curvlab.lm_loss(live(bs[s].inputs), bs[s].targets).backward()
        opt.step()
    op = hessian(live, bs, "layer", cache=False)
    vs = {n: opt.state[q]["exp_avg_sq"] for n, q in live.named_parameters()}
    expected = flat_of(vs, op.partition).div(1 - 0.95**2).sqrt() + 1e-4
    assert torch.allclose(adam_preconditioner(opt, op, live), expected, rtol=1e-13, atol=0)


def test_thresholds_and_lr_of_checkpoints(runs):
    _, info = load_checkpoint(runs["adamw"] / "step_000002.pt")
    cfg = TrainConfig.from_dict(info.extra["train_config"])
    # the lr of update 2 (schedule index 1): the cosine from 1 to 0.1 over 2 steps, half-way
    assert checkpoint_lr(info) == pytest.approx(0.02 * (0.1 + 0.9 * 0.5), rel=1e-14)
    _, first = load_checkpoint(runs["adamw"] / "step_000001.pt")
    assert checkpoint_lr(first) == pytest.approx(0.02, rel=1e-14)
    assert cfg.betas == (0.8, 0.99)
    assert checkpoint_threshold(info) == ("adam", pytest.approx((2 + 1.6) / (0.2 * 0.011)))
    _, muon = load_checkpoint(runs["muon"] / "final.pt")
    assert checkpoint_lr(muon) == pytest.approx(0.02)
    assert checkpoint_threshold(muon) == ("gd", pytest.approx(100.0))
    _, gn = load_checkpoint(runs["gn"] / "final.pt")
    assert checkpoint_lr(gn) is None and checkpoint_threshold(gn) is None
    _, init = load_checkpoint(runs["init"])
    assert checkpoint_lr(init) is None and checkpoint_threshold(init) is None


def test_no_adam_preconditioner_without_adamw_state(runs):
    bs = batches()
    for path in (runs["muon"] / "final.pt", runs["gn"] / "final.pt", runs["init"]):
        model, info = load_checkpoint(path, dtype=torch.float64)
        assert adam_preconditioner(info, hessian(model, bs, cache=False), model) is None
    with pytest.raises(ConfigError):
        adam_preconditioner({"state": {}}, hessian(model, bs, cache=False), model)


# -- Jensen-Shannon distances between block densities ------------------------------------------

def _density(nodes, weights):
    nodes = [torch.as_tensor(x, dtype=torch.float64) for x in nodes]
    weights = [torch.as_tensor(w, dtype=torch.float64) for w in weights]
    return SpectralDensity(tuple(nodes), tuple(weights), n=10, steps=len(nodes[0]),
                           products=0)


def _scipy_js(dens, grid, sigma):
    edges = np.concatenate([[-np.inf], (grid[1:] + grid[:-1]) / 2, [np.inf]])
    masses = []
    for d in dens:
        nodes = torch.cat(d.nodes).numpy()
        w = torch.cat(d.weights).numpy() / d.probes
        c = norm.cdf((edges[:, None] - nodes[None]) / sigma)
        masses.append(((c[1:] - c[:-1]) * w).sum(1))
    b = len(dens)
    return np.array([[jensenshannon(masses[i], masses[j], base=2) if i != j else 0.0
                      for j in range(b)] for i in range(b)])


def test_js_distances_against_scipy():
    gen = np.random.default_rng(7)
    dens = []
    for shift in (0.0, 0.3, 2.0):
        nodes = [np.sort(gen.normal(shift, 0.5, 6)) for _ in range(3)]
        weights = [(lambda w: w / w.sum())(gen.random(6)) for _ in range(3)]
        dens.append(_density(nodes, weights))
    grid, D = js_distances(dens, points=400)
    all_nodes = torch.cat([torch.cat(d.nodes) for d in dens])
    sigma = 0.01 * float(all_nodes.max() - all_nodes.min())
    assert grid[0] == pytest.approx(float(all_nodes.min()) - 6 * sigma)
    assert grid[-1] == pytest.approx(float(all_nodes.max()) + 6 * sigma)
    assert np.allclose(D.numpy(), _scipy_js(dens, grid.numpy(), sigma), rtol=0, atol=1e-10)
    assert torch.equal(D, D.T) and torch.all(D.diagonal() == 0)
    assert 0 < D[0, 1] < D[0, 2] < 1  # farther apart, more different
    # an explicit grid and width
    grid2 = torch.linspace(-3, 5, 200, dtype=torch.float64)
    _, D2 = js_distances(dens, grid2, sigma=0.2)
    assert np.allclose(D2.numpy(), _scipy_js(dens, grid2.numpy(), 0.2), rtol=0, atol=1e-10)
    # identical densities: 0; disjoint supports: 1 (base 2)
    a = _density([[0.0, 1.0]], [[0.5, 0.5]])
    far = _density([[100.0, 101.0]], [[0.5, 0.5]])
    _, D3 = js_distances([a, a, far], points=2000)
    assert D3[0, 1] == 0 and abs(float(D3[0, 2]) - 1) < 1e-10
    with pytest.raises(ConfigError):
        js_distances([a, far], torch.tensor([1.0, 0.0]))
    with pytest.raises(ConfigError):
        js_distances([])


def test_js_distances_of_block_hessian_spectra(model):
    """On the layer blocks of a Hessian: SLQ with as many steps as a block's dimension gives its
    eigenvalues; the distances equal scipy's on those exact spectra."""
    bs = batches()
    op = hessian(model, bs, ["q=layers.1.self_attn.q_proj.weight",
                             "down=layers.1.mlp.down_proj.weight",
                             "norms=layers.*layernorm.weight", "head=lm_head.weight[0:4]"],
                 cache=False)
    _, _, H = oracle(model, bs, op.partition)
    dens, exact = [], []
    for name, off, size in zip(op.partition.names, op.partition.offsets, op.partition.sizes):
        dens.append(curvlab.linalg.spectral_density(op.block(name), probes=2, steps=size))
        w = torch.linalg.eigvalsh(H[off:off + size, off:off + size])
        exact.append(_density([w], [torch.full((size,), 1.0 / size, dtype=torch.float64)]))
    grid, D = js_distances(dens, points=300)
    nodes = torch.cat([torch.cat(d.nodes) for d in dens])
    sigma = 0.01 * float(nodes.max() - nodes.min())
    assert np.allclose(D.numpy(), _scipy_js(dens, grid.numpy(), sigma), atol=1e-10, rtol=0)
    # the SLQ rules' nodes are the blocks' eigenvalues (weights differ: random probes)
    for d, e in zip(dens, exact):
        for nodes_p in d.nodes:
            dist = (nodes_p[:, None] - e.nodes[0][None]).abs().min(1).values
            assert float(dist.max()) < 1e-8 * float(H.abs().max())
    assert D.shape == (4, 4) and float(D.max()) > 0.1  # blocks differ


# -- the end-to-end check: `curvlab spectrum RUN_DIR` against dense float64 -------------

def test_run_folder_quantities_equal_dense_float64(runs, tmp_path, capsys):
    """For every checkpoint of the AdamW run: the stored top eigenvalues of H (whole and per
    block), the gradient's and the step's share of the top-k eigenspace, the preconditioned
    sharpness λ_max(P⁻¹H) with P rebuilt here from the raw optimizer state, its threshold, and
    the blocks' Jensen-Shannon distances equal dense float64 computations."""
    import h5py

    from curvlab.cli import load_analysis_inputs
    from tests.cli_helpers import run_cli

    out = tmp_path / "along.h5"
    code, _, err = run_cli(capsys, "spectrum", runs["adamw"], "--curvature", "hessian",
                           "--blocks", "layer", "--k", 3, "--tol", "1e-12", "--dtype", "float64",
                           "--cache", "off", "--gradient-share", "--sharpness",
                           "--heterogeneity", "--probes", 2, "--steps", 10, "--no-progress",
                           "-o", out)
    assert code == 0, err
    loaded = []
    for s in (1, 2):
        model, info, _, bs = load_analysis_inputs(
            str(runs["adamw"] / f"step_00000{s}.pt"), None, None, None, 1, None, None, "train",
            "float64")
        loaded.append((model, info, bs))
    part = partition(loaded[0][0], "layer")
    thetas = [flat_of(dict(m.named_parameters()), part).detach() for m, _, _ in loaded]
    t = curvlab.read_trajectory(out)
    assert list(t.steps) == [1, 2] and t.block_names == part.names
    with h5py.File(out, "r") as f:
        for i, s in enumerate((1, 2)):
            model, info, bs = loaded[i]
            _, g, H = dense_oracle(model, bs, part)
            H = (H + H.T) / 2
            w, U = torch.linalg.eigh(H)
            top = f[f"step/{s}/spectrum/hessian/full/eigenvalues"][()]
            np.testing.assert_allclose(top, w.flip(0)[:3].numpy(), rtol=1e-10, atol=0)
            assert t.series["lambda_max/full"][i] == top[0]
            # shares of the top-1..3 eigenspaces: explicit eigenvectors
            V = U.flip(1)[:, :3]
            want = [float((V[:, :j].T @ g).square().sum() / g.square().sum()) for j in (1, 2, 3)]
            np.testing.assert_allclose(f[f"step/{s}/gradient/share/full"][()], want,
                                       rtol=1e-10, atol=1e-12)
            stepped = f[f"step/{s}/gradient/step_share/full"][()]
            if i < 1:
                d = thetas[i + 1] - thetas[i]
                want = [float((V[:, :j].T @ d).square().sum() / d.square().sum())
                        for j in (1, 2, 3)]
                np.testing.assert_allclose(stepped, want, rtol=1e-10, atol=1e-12)
            else:
                assert np.isnan(stepped).all()
            # AdamW's preconditioned sharpness: P from the raw state, eig of P⁻¹H (not symmetric)
            raw = torch.load(runs["adamw"] / f"step_00000{s}.pt", weights_only=True)
            stored = raw["extra"]["trainer"]["method"]["optimizer"]
            names = [n for n, _ in model.named_parameters()]
            shapes = dict(model.named_parameters())
            hidden = [n for n in names if n.startswith("layers.") and shapes[n].ndim == 2]
            order = hidden + [n for n in names if shapes[n].ndim == 2 and n not in hidden] + \
                [n for n in names if shapes[n].ndim == 1]
            v = flat_of({n: stored["state"][j]["exp_avg_sq"].double()
                         for j, n in enumerate(order)}, part)
            p = (v / (1 - 0.99**s)).sqrt() + 1e-3
            lam = float(np.linalg.eigvals((H / p[:, None]).numpy()).real.max())
            sg = f[f"step/{s}/sharpness"]
            assert sg.attrs["kind"] == "adam"
            assert abs(sg.attrs["value"] - lam) < 1e-10 * lam
            eta = stored["param_groups"][0]["lr"]
            assert sg.attrs["lr"] == pytest.approx(eta, rel=1e-14)
            assert sg.attrs["threshold"] == pytest.approx((2 + 2 * 0.8) / (0.2 * eta), rel=1e-14)
            assert t.series["sharpness"][i] == sg.attrs["value"]
            # per block: top eigenvalue of the dense diagonal block; JS of the stored densities
            for b, (off, size) in enumerate(zip(part.offsets, part.sizes)):
                wb = torch.linalg.eigvalsh(H[off:off + size, off:off + size])
                assert abs(t.series["block_lambda_max"][i, b] - float(wb[-1])) < 1e-10 * w[-1]
            dens = []
            for name in part.names:
                dg = f[f"step/{s}/spectrum/hessian/{name}/density"]
                nodes, weights = dg["nodes"][()], dg["weights"][()]
                dens.append(_density([x[np.isfinite(x)] for x in nodes],
                                     [x[np.isfinite(x)] for x in weights]))
            grid = f[f"step/{s}/heterogeneity/grid"][()]
            all_nodes = torch.cat([torch.cat(d.nodes) for d in dens])
            sigma = 0.01 * float(all_nodes.max() - all_nodes.min())
            np.testing.assert_allclose(t.series["js_distance"][i],
                                       _scipy_js(dens, grid, sigma), rtol=0, atol=1e-10)
