"""Bring your own model: Hugging Face folders and custom modules."""

import re
import sys

import pytest
import torch
from torch import nn

import curvlab
from curvlab.curvature.blocks import partition
from curvlab.curvature.operators import ggn, hessian
from curvlab.curvature.verify import verify_operators
from curvlab.errors import CurvlabError
from tests.cli_helpers import assert_clean_error, run_cli

transformers = pytest.importorskip(
    "transformers", reason="optional dependency transformers not installed (.ci/run installs it)")


def _tiny(kind, path=None):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
            bos_token_id=0, eos_token_id=1))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
            eos_token_id=1))
    with torch.no_grad():  # O(1) logits and generic norm weights
        for p in model.parameters():
            p.mul_(5.0) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
    if path is not None:
        model.save_pretrained(path)
    return model


def _batch(seed=0, vocab=32, t=8):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, t + 1), generator=g)
    return curvlab.Batch(tokens[:, :-1], tokens[:, 1:])


@pytest.fixture(params=["llama", "gpt2"])
def hf_folder(request, tmp_path):
    _tiny(request.param, tmp_path / request.param)
    return tmp_path / request.param


def test_products_equal_independent_computations(hf_folder):
    model, info = curvlab.load_model(hf_folder, dtype=torch.float64)
    assert info.kind == "huggingface" and not info.notes
    results = verify_operators(model, _batch(), partition(model, "layer"))
    failed = [r for r in results if not (r.passed or r.informational)]
    assert not failed, failed


def test_float64_is_float64_end_to_end(tmp_path):
    """Stock Llama keeps RMSNorm and rotary tables in float32 after .double(): curvlab patches
    them; finite differences show the difference."""
    model = _tiny("llama").double().eval()
    from curvlab.models.hf import prepare_hf_model

    prepare_hf_model(model, float64=False)  # math attention only
    blocks = partition(model, "layer")
    fd_stock = {r.name: r for r in verify_operators(model, _batch(), blocks)}
    prepare_hf_model(model, float64=True)
    fd_patched = {r.name: r for r in verify_operators(model, _batch(), blocks)}
    fd, db = "hessian-vs-finite-differences", "hessian-vs-double-backward"
    assert fd_stock[fd].error > 1e-5 and fd_patched[fd].error < 1e-6
    assert fd_stock[db].error > 1e-10 and fd_patched[db].error < 1e-12


def test_layer_partition_matches_structure(hf_folder):
    model, _ = curvlab.load_model(hf_folder)
    part = partition(model, "layer")
    assert part.names == ["embed", "layer.0", "layer.1", "head"]
    params = {b.name: set(b.params) for b in part}
    if "llama" in str(hf_folder):
        assert params["embed"] == {"model.embed_tokens.weight"}
        assert params["head"] == {"model.norm.weight", "lm_head.weight"}
    else:
        assert params["embed"] == {"transformer.wte.weight", "transformer.wpe.weight"}
        assert params["head"] == {"transformer.ln_f.weight", "transformer.ln_f.bias"}  # tied head
    assert all(n.startswith(("model.layers.1.", "transformer.h.1.")) for n in params["layer.1"])
    assert part.size == sum(p.numel() for p in model.parameters())


def test_cli_on_hf_folder(hf_folder, tmp_path, capsys):
    import numpy as np

    tokens = tmp_path / "tok.bin"
    np.random.default_rng(0).integers(0, 32, 4000).astype("<u2").tofile(tokens)
    code, out, _ = run_cli(capsys, "info", hf_folder)
    assert code == 0 and "huggingface" in out and "layer.1" in out
    fidelity = float(re.search(r"fidelity +logits (\S+) relative to the stock \w+ model", out)[1])
    assert fidelity < 1e-5
    code, out, _ = run_cli(capsys, "verify", hf_folder, "--data", tokens, "--seq-len", 8)
    assert code == 0 and "all checks passed" in out
    row = re.search(r"PASS +model-vs-stock +rel\. error +(\S+)", out)
    assert row and float(row[1]) < 1e-5
    code, out, _ = run_cli(capsys, "spectrum", hf_folder, "--data", tokens, "--seq-len", 8,
                           "--batch-size", 2, "--k", 3, "-o", tmp_path / "s.h5")
    assert code == 0 and "full" in out
    code, out, _ = run_cli(capsys, "extract", hf_folder, "--data", tokens, "--seq-len", 8,
                           "--batch-size", 2, "--blocks", "layer", "--pairs", "head",
                           "-o", tmp_path / "e.h5")
    assert code == 0 and (tmp_path / "e.h5").exists()
    big = tmp_path / "big.bin"
    np.array([3, 40] * 100, dtype="<u2").tofile(big)
    assert_clean_error(capsys, "verify", hf_folder, "--data", big, "--seq-len", 8,
                       match="token id 40 >= model vocab size 32")


class DictOutput(nn.Module):
    """A custom LM whose forward returns a dict without a 'logits' key."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 6)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.out = nn.Linear(6, 16)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return {"scores": self.out(h)}


def test_custom_module_through_logits_fn():
    torch.manual_seed(0)
    model = DictOutput().double()
    batch = _batch(vocab=16)
    with pytest.raises(CurvlabError, match="cannot find logits in the model output of type dict"):
        ggn(model, batch) @ torch.zeros(sum(p.numel() for p in model.parameters()),
                                        dtype=torch.float64)

    def logits_fn(m, params, inputs):
        return torch.func.functional_call(m, params, (inputs,))["scores"]

    part = partition(model, "layer")
    assert part.names == ["embed", "layer.0", "layer.1", "head"]
    results = verify_operators(model, batch, part, logits_fn=logits_fn)
    assert all(r.passed for r in results if not r.informational)
    H = hessian(model, batch, logits_fn=logits_fn).to_dense()
    assert torch.allclose(H, H.T, atol=1e-12)


def test_bad_inputs(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert_clean_error(capsys, "info", tmp_path / "empty", match="no config.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert_clean_error(capsys, "info", tmp_path / "bad", match="Hugging Face")
    model = DictOutput().double()
    with pytest.raises(CurvlabError, match="token id 20 >= vocabulary size 16"):
        ggn(model, curvlab.Batch(torch.tensor([[1, 20]]), torch.tensor([[2, 3]])))
    _tiny("llama", tmp_path / "ok")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert_clean_error(capsys, "info", tmp_path / "ok", match="optional package 'transformers'")


def _old_gemma_norms(model):
    """What curvlab did before: every ``*RMSNorm`` forward replaced by ``w · x̂`` (Gemma's norm
    is ``(1 + w) · x̂``)."""
    import types

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(forward, m)


def test_the_spy_sees_what_stock_float64_keeps_in_float32():
    from curvlab.models.float64 import LowPrecisionSpy, float64_computation

    model = _tiny("llama").double()
    spy = LowPrecisionSpy()
    with spy, torch.no_grad():
        model(_batch().inputs)
    assert {"aten.cos", "aten.sin", "aten.mul"} <= set(spy.ops)  # rotary tables, norms
    spy = LowPrecisionSpy()
    with spy, float64_computation(), torch.no_grad():
        model(_batch().inputs)
    assert not spy.ops, spy.summary()  # the mode keeps every operation in float64, but ...
    rotary = model.model.rotary_emb
    dim = model.config.hidden_size // model.config.num_attention_heads
    exact = 1.0 / (model.config.rope_parameters["rope_theta"]
                   ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    assert rotary.inv_freq.dtype == torch.float64 and not torch.equal(rotary.inv_freq, exact)
    from curvlab.models.hf import prepare_hf_model

    prepare_hf_model(model, float64=True)  # ... a buffer computed in float32 stays rounded
    assert torch.equal(model.model.rotary_emb.inv_freq, exact)  # until recomputed
    spy = LowPrecisionSpy()
    with spy, torch.no_grad():
        model(_batch().inputs)
    assert not spy.ops, spy.summary()


def test_a_model_unlike_the_stock_one_is_refused(tmp_path, capsys, monkeypatch):
    from tests import hf_families

    folder = hf_families.save("gemma", tmp_path / "gemma")
    tokens = tmp_path / "tok.bin"
    import numpy as np

    np.random.default_rng(0).integers(0, hf_families.VOCAB, 4000).astype("<u2").tofile(tokens)
    # verify on the folder: the model-vs-stock row passes
    code, out, _ = run_cli(capsys, "verify", folder, "--data", tokens, "--seq-len", 8)
    assert code == 0 and "PASS  model-vs-stock" in out
    # the model curvlab used to build (Gemma's norm guessed from its class name)
    model, _ = curvlab.load_model(folder, dtype=torch.float64)
    _old_gemma_norms(model)
    from curvlab.models.hf import load_stock

    batch = _batch(vocab=hf_families.VOCAB)
    rows = {r.name: r for r in verify_operators(model, batch, partition(model, "layer"),
                                                stock=load_stock(folder))}
    assert not rows["model-vs-stock"].passed and rows["model-vs-stock"].error > 0.5
    # at load such a preparation is refused in one line, and no results file is written
    import curvlab.models.hf as hf

    original = hf._set_eager
    monkeypatch.setattr(hf, "_set_eager", lambda m: (original(m), _old_gemma_norms(m)))
    with pytest.raises(curvlab.errors.CheckpointError,
                       match=r"gemma: the prepared model's logits differ from the stock gemma "
                             r"model \(float32, sdpa attention\) by .* relative"):
        curvlab.load_model(folder, dtype=torch.float64)
    out_file = tmp_path / "s.h5"
    assert_clean_error(capsys, "spectrum", folder, "--data", tokens, "--seq-len", 8,
                       "--k", 2, "-o", out_file, match="differ from the stock gemma model")
    assert not out_file.exists()


def _gelu_derivative(x, g):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))
        (d,) = torch.autograd.grad(y, x, g)
    return d


class _Gelu(torch.autograd.Function):
    """tanh-GeLU with a hand-written backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _gelu_derivative(x, g)


class _WrongGelu(_Gelu):
    """Its backward is twice the derivative of its forward."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2.0 * _gelu_derivative(x, g)


class _NumpyGelu(_Gelu):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.from_numpy(torch.nn.functional.gelu(x.detach()).numpy())


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


@pytest.mark.parametrize("fn, match", [
    (_Gelu, None),
    (_WrongGelu, r"module model.layers.0.mlp.act_fn calls a custom autograd.Function .*"
                 r"_WrongGelu: its backward is not the derivative of its forward"),
    (_NumpyGelu, r"module model.layers.0.mlp.act_fn .*\._NumpyGelu: its forward is not made of "
                 r"differentiable torch operations"),
])
def test_custom_autograd_functions_are_checked_and_run_through_their_forward(fn, match):
    from curvlab.models.hf import prepare_hf_model

    model = _tiny("llama").double()
    model.model.layers[0].mlp.act_fn = _Act(fn)
    if match is not None:
        with pytest.raises(curvlab.errors.CheckpointError, match=match):
            prepare_hf_model(model, float64=True)
        return
    notes = prepare_hf_model(model, float64=True)
    assert any("model.layers.0.mlp.act_fn runs _Gelu" in n for n in notes)
    results = verify_operators(model, _batch(), partition(model, "layer"))  # jvp, double bwd
    failed = [r for r in results if not (r.passed or r.informational)]
    assert not failed, failed
