import torch

from curvlab.curvature.blocks import partition
from curvlab.curvature.verify import small_blocks, verify_operators
from tests.cli_helpers import assert_clean_error, run_cli
from tests.conftest import GPT_TEST, make_batch, make_model


def test_verify_passes_on_both_families(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    results = verify_operators(model, batch, small_blocks(model))
    assert [r.name for r in results if not r.informational] == [
        "hessian-vs-double-backward", "hessian-vs-finite-differences",
        "ggn-vs-explicit-jacobian", "ggn-symmetric", "ggn-psd", "ggn-cache"]
    assert all(r.passed for r in results if not r.informational)


def test_verify_detects_upstream_layer_norm_fault():
    # the informational check reports PyTorch's jacrev fault on a LayerNorm model; if PyTorch
    # fixes functorch#534 this starts failing, and the DESIGN notes should be updated
    model, batch = make_model(GPT_TEST), make_batch(GPT_TEST)
    results = verify_operators(model, batch, partition(model, "qkv"))
    upstream = [r for r in results if r.informational][0]
    assert upstream.error > 1e-6


def test_verify_detects_a_wrong_operator(monkeypatch):
    model, batch = make_model(GPT_TEST), make_batch(GPT_TEST)
    import curvlab.curvature.logit_space as ls

    original = ls.LogitCurvature.__call__
    monkeypatch.setattr(ls.LogitCurvature, "__call__", lambda self, u: 1.01 * original(self, u))
    results = {r.name: r for r in verify_operators(model, batch, small_blocks(model))}
    assert not results["ggn-vs-explicit-jacobian"].passed
    assert results["hessian-vs-double-backward"].passed


def test_verify_cli(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "verify")
    assert code == 0 and out.count("PASS") == 12 and "all checks passed" in out
    run_cli(capsys, "init", "--preset", "gpt-tiny", "-o", tmp_path / "g.pt")
    code, out, _ = run_cli(capsys, "verify", tmp_path / "g.pt", "--blocks", "transformer.ln_f.*")
    assert code == 0 and "transformer.ln_f.*" in out and "FAIL" not in out
    assert_clean_error(capsys, "verify", tmp_path / "g.pt", "--blocks", "nope.*",
                       match="no parameter matches 'nope.*'")
    assert torch.get_default_dtype() == torch.float32
