"""Precision (fp32 / tf32 / bf16) and torch.compile of the curvature products, on the CPU.

Every product is checked against an independent float64 product on the same batch and vector:
fp32 to 1e-5, bf16 (autocast) to the stated 3e-2 (bfloat16 has an 8-bit mantissa; observed
about 5e-3 here), TF32 equals fp32 exactly on the CPU (it is a no-op there), compiled products
equal eager ones to 1e-12 in float64.
"""

from __future__ import annotations

import copy
import warnings

import h5py
import pytest
import torch

import curvlab
from curvlab.curvature.precision import (
    CompiledProduct,
    CompileWarning,
    check_precision,
    precision_context,
)
from curvlab.errors import ConfigError
from curvlab.linalg import lanczos
from tests.cli_helpers import assert_clean_error, run_cli
from tests.conftest import GPT_TEST, LLAMA_TEST, TRAIN_TEST, make_batch, make_model

BF16_TOL = 3e-2
MICRO = curvlab.ModelConfig("llama", vocab_size=16, seq_len=4, d_model=8, n_layers=1, n_heads=2,
                            d_ff=8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module", params=[LLAMA_TEST, GPT_TEST], ids=["llama", "gpt"])
def case(request):
    cfg = request.param
    batch = make_batch(cfg, batch_size=2)
    m64 = make_model(cfg, dtype=torch.float64)
    m32 = copy.deepcopy(m64).float()
    n = curvlab.models.num_parameters(m64)
    v = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return m64, m32, batch, v


@pytest.mark.parametrize("kind", ["ggn", "hessian", "efisher"])
def test_fresh_products_at_each_precision_against_float64(case, kind):
    m64, m32, batch, v = case
    ref = curvlab.curvature_operator(kind, m64, batch, "param", cache=False) @ v
    out = {}
    for precision in ("fp32", "tf32", "bf16"):
        op = curvlab.curvature_operator(kind, m32, batch, "param", cache=False,
                                        precision=precision)
        assert op.precision == precision and op.dtype == torch.float32
        out[precision] = op @ v.float()
        assert out[precision].dtype == torch.float32  # results in the parameters' dtype
    assert rel(out["fp32"], ref) < 1e-5
    assert torch.equal(out["tf32"], out["fp32"])  # TF32 is a no-op on the CPU
    err = rel(out["bf16"], ref)
    assert 1e-5 < err < BF16_TOL  # really computed in bfloat16, and close


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_cached_bf16_products_against_float64(case, kind):
    """The linearization traced under autocast (bf16 logits: H_z from float32 logits, a bf16
    cotangent for the stored VJP) gives the product of the fresh path."""
    m64, m32, batch, v = case
    if kind == "hessian" and m32.config.family == "gpt":
        pytest.skip("one family is enough for the linearized Hessian (slow to trace)")
    ref = curvlab.curvature_operator(kind, m64, batch, "param", cache=False) @ v
    op = curvlab.curvature_operator(kind, m32, batch, "param", cache=True, precision="bf16")
    got = op @ v.float()
    assert op.engine.cached and got.dtype == torch.float32
    assert 1e-5 < rel(got, ref) < BF16_TOL


def test_bf16_vectorized_products_and_lanczos_stay_float32(case):
    m64, m32, batch, v = case
    V = torch.randn(v.shape[0], 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    exact = curvlab.ggn(m64, batch, "layer", cache=False)
    op = curvlab.ggn(m32, batch, "layer", cache=False, precision="bf16")
    got = op.matmat(V.float(), vectorize=True)  # under vmap
    assert rel(got, exact.matmat(V, vectorize=False)) < BF16_TOL
    top = lanczos(op, k=2, tol=1e-4, seed=0, return_vectors=True)
    ref = lanczos(exact, k=2, tol=1e-10, seed=0)
    assert top.eigenvectors.dtype == torch.float32 and top.alpha.dtype == torch.float64
    assert rel(top.eigenvalues, ref.eigenvalues) < BF16_TOL


def test_precision_errors_are_one_line_config_errors():
    assert check_precision("bf16", torch.float32) == "bf16"
    assert check_precision("fp32", torch.float64) == "fp32"
    with pytest.raises(ConfigError, match="needs float32 parameters, got float64"):
        check_precision("tf32", torch.float64)
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        check_precision("fp16", torch.float32)
    model, batch = make_model(LLAMA_TEST), make_batch(LLAMA_TEST)
    with pytest.raises(ConfigError, match="precision bf16 needs float32"):
        curvlab.ggn(model, batch, precision="bf16")


def test_cuda_tf32_flag_is_set_inside_and_restored():
    """The flag is process state; no GPU is needed to set it. On the CPU nothing is touched."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    with precision_context("tf32", "cuda"):
        assert matmul.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "high"  # readers of either API agree
    assert matmul.allow_tf32 == before
    with precision_context("fp32", "cuda"):
        assert matmul.allow_tf32 is False
    with precision_context("tf32", "cpu"):
        assert matmul.allow_tf32 == before
    assert matmul.allow_tf32 == before
    with precision_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("cache,backend,batches", [(False, "aot_eager", 2), (True, "eager", 1)],
                         ids=["fresh", "cached"])
def test_compiled_ggn_products_equal_eager(cache, backend, batches):
    """``aot_eager`` runs dynamo + AOT autograd without C++ code generation, ``eager`` dynamo
    alone (fast enough for a test; the cached product's traced graph is large); the one-time
    tracing, the whole-graph requirement and one compiled closure per batch are curvlab's."""
    model = make_model(MICRO)
    data = [make_batch(MICRO, seed=s) for s in range(batches)]
    n = curvlab.models.num_parameters(model)
    V = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eager = curvlab.ggn(model, data, "param", cache=cache)
    op = curvlab.ggn(model, data, "param", cache=cache, compile=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        got = torch.stack([op @ V[:, i] for i in range(2)], 1)
    compiled = [s["compiled"] for s in op.engine._states]
    assert all(isinstance(c, CompiledProduct) and c.compiled is not None and not c.failed
               for c in compiled)
    want = eager.matmat(V, vectorize=False)
    assert rel(got, want) < 1e-12


def test_compile_failure_warns_once_and_runs_eagerly():
    model, batch = make_model(MICRO), make_batch(MICRO)
    n = curvlab.models.num_parameters(model)
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op = curvlab.hessian(model, [batch, make_batch(MICRO, seed=1)], "param", cache=False,
                         compile="no_such_backend")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = op @ v, op @ v
    msgs = [str(w.message) for w in caught if w.category is CompileWarning]
    assert len(msgs) == 1 and "torch.compile failed for the hessian" in msgs[0]
    assert "running them eagerly" in msgs[0] and "\n" not in msgs[0]
    ref = curvlab.hessian(model, [batch, make_batch(MICRO, seed=1)], "param", cache=False) @ v
    assert rel(first, ref) < 1e-12 and rel(second, ref) < 1e-12
    with pytest.raises(ConfigError, match="compile must be"):
        curvlab.ggn(model, batch, compile=3)


def test_cli_precision_in_provenance_and_refusal(tmp_path, capsys):
    model = curvlab.build_model(TRAIN_TEST, seed=0)  # byte vocabulary: the default corpus
    spec = curvlab.DataSpec(seq_len=8, batch_size=2)
    ckpt = curvlab.save_checkpoint(tmp_path / "m.pt", model, data=spec.to_dict())
    code, out, err = run_cli(capsys, "spectrum", ckpt, "--k", "2", "--precision", "bf16",
                             "-o", tmp_path / "s.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs["precision"] == "bf16" and f.attrs["dtype"] == "float32"
    prov = curvlab.store.schema.Provenance.from_attrs({"checkpoint": "x", "dtype": "float64",
                                                       "device": "cpu",
                                                       "checkpoint_sha256": "0"})
    assert prov.precision == "fp32"  # files written before the attribute existed
    assert_clean_error(capsys, "extract", ckpt, "--precision", "tf32", "-o", tmp_path / "e.h5",
                       match="--precision tf32 needs --dtype float32")
    assert not (tmp_path / "e.h5").exists()


def test_gn_inner_gradient_and_training_at_bf16():
    from curvlab.curvature.model_fn import model_params
    from curvlab.train import TrainConfig, inner_gradient, train

    m64 = make_model(LLAMA_TEST)
    m32 = copy.deepcopy(m64).float()
    batch = make_batch(LLAMA_TEST)
    gen = torch.Generator().manual_seed(2)
    t64 = model_params(m64)
    d64 = {k: 0.01 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
           for k, p in t64.items()}
    t32, d32 = model_params(m32), {k: d.float() for k, d in d64.items()}

    def flat(r):
        return torch.cat([g.reshape(-1) for g in r.grad.values()])

    for mode in ("gn", "prox"):
        ref = inner_gradient(m64, t64, d64, batch, mode=mode)
        fp32 = inner_gradient(m32, t32, d32, batch, mode=mode)
        bf16 = inner_gradient(m32, t32, d32, batch, mode=mode, precision="bf16")
        assert rel(flat(fp32), flat(ref)) < 1e-5
        assert 1e-5 < rel(flat(bf16), flat(ref)) < BF16_TOL
        assert abs(bf16.model_loss - ref.model_loss) < BF16_TOL * abs(ref.model_loss)
        assert all(g.dtype == torch.float32 for g in bf16.grad.values())
    with pytest.raises(ConfigError, match="precision bf16 needs dtype float32"):
        TrainConfig(precision="bf16", dtype="float64")
    runs = {p: train(TrainConfig(optimizer="adamw", max_steps=1, micro_batch_size=2, seq_len=16,
                                 eval_batches=1, precision=p)) for p in ("fp32", "bf16")}
    a, b = (runs[p].history[-1]["train_loss"] for p in ("fp32", "bf16"))
    assert abs(a - b) < BF16_TOL * abs(a)
