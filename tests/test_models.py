import pytest
import torch
from torch.func import functional_call, grad, jvp

from curvlab.errors import ConfigError
from curvlab.models import (
    PRESETS,
    ModelConfig,
    build_model,
    lm_loss,
    math_attention,
    num_parameters,
    preset,
    second_order_active,
    set_attention,
)
from tests.conftest import make_batch, make_model


@pytest.mark.parametrize("name", ["tiny", "small", "gpt-tiny", "gpt-small"])
def test_shapes_and_sizes(name):
    cfg = preset(name)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    assert model(x).shape == (2, 16, cfg.vocab_size)
    n = num_parameters(model)
    if name == "tiny":
        assert n < 1_000_000
    if name == "small":
        assert 1_000_000 < n < 10_000_000


def test_paper_presets():
    for name, (d, ff, layers, heads) in {"45m": (512, 2048, 4, 8),
                                          "150m": (768, 3072, 12, 16)}.items():
        c = PRESETS[name]
        assert (c.d_model, c.d_ff, c.n_layers, c.n_heads, c.vocab_size, c.seq_len) == (
            d, ff, layers, heads, 32000, 1024)
        assert c.family == "llama" and not c.tie_embeddings
    assert preset("45m", vocab_size=256, seq_len=128).vocab_size == 256


def test_llama_has_no_biases_and_untied_head():
    model = build_model(preset("tiny"))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    assert model.lm_head.weight is not model.embed_tokens.weight


def test_gpt_tied_head_counts_once():
    model = build_model(preset("gpt-tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_unknown_preset_and_family():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown model family"):
        ModelConfig(family="mamba")


def test_causality(cfg):
    model = make_model(cfg)
    x = make_batch(cfg).inputs
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % cfg.vocab_size
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_fused_and_math_attention_agree(cfg):
    model = make_model(cfg)
    x = make_batch(cfg).inputs
    set_attention(model, "sdpa")
    fused = model(x)
    set_attention(model, "math")
    assert torch.allclose(fused, model(x), atol=1e-12)


def test_attention_auto_selection():
    assert not second_order_active()
    with math_attention():
        assert second_order_active()
    seen = []

    def f(x):
        seen.append(second_order_active())
        return x

    jvp(f, (torch.ones(2),), (torch.ones(2),))
    assert seen == [True]


def _loss_fn(model, batch):
    names = [n for n, _ in model.named_parameters()]

    def loss(flat):
        params, i = {}, 0
        for n, p in model.named_parameters():
            params[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        logits = functional_call(model, params, (batch.inputs,), tie_weights=True)
        return lm_loss(logits, batch.targets)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss, theta, names


def test_jvp_through_attention_matches_finite_differences(cfg):
    model = make_model(cfg)
    batch = make_batch(cfg)
    loss, theta, _ = _loss_fn(model, batch)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(3), dtype=theta.dtype)
    _, dir_deriv = jvp(loss, (theta,), (v,))
    h = 1e-5
    fd = (loss(theta + h * v) - loss(theta - h * v)) / (2 * h)
    assert torch.allclose(dir_deriv, fd, rtol=1e-7, atol=1e-10)


def test_forward_over_reverse_matches_finite_differences(cfg):
    model = make_model(cfg)
    batch = make_batch(cfg)
    loss, theta, _ = _loss_fn(model, batch)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(4), dtype=theta.dtype)
    _, hvp = jvp(grad(loss), (theta,), (v,))
    h = 1e-6
    fd = (grad(loss)(theta + h * v) - grad(loss)(theta - h * v)) / (2 * h)
    assert (hvp - fd).norm() <= 1e-6 * hvp.norm()  # central differences: O(h²) error
    # and double backward (plain autograd; eval mode picks the math kernel)
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(t), t, create_graph=True)
    (hvp2,) = torch.autograd.grad(g @ v, t)
    assert torch.allclose(hvp, hvp2, rtol=1e-10, atol=1e-13)


def test_build_is_deterministic():
    a = build_model(preset("tiny"), seed=5)
    b = build_model(preset("tiny"), seed=5)
    c = build_model(preset("tiny"), seed=6)
    pa, pb, pc = (torch.cat([p.reshape(-1) for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
