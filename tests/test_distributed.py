"""Data-parallel curvature on 2 CPU processes (gloo): products, eigenvalues, comparison inputs
and the CLI under torchrun equal one process on the union of the shards."""

from __future__ import annotations

import os
import time

import h5py
import numpy as np
import pytest
import torch

import curvlab
from curvlab import distributed
from curvlab.compare.kfac import kfac_factors, linear_layers
from curvlab.compare.per_token import empirical_statistics, ggn_diagonal
from curvlab.compare.problem import Problem
from curvlab.linalg import lanczos
from tests.conftest import GPT_TEST, LLAMA_TEST, make_batch, make_model
from tests.dist_helpers import spawn, torchrun


def _batches(cfg):
    # 3 rows per batch: uneven shards (2 + 1 rows) on 2 processes
    return [make_batch(cfg, batch_size=3, seed=s) for s in (0, 1)]


def _probes(n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _quantities(model, batches) -> dict:
    """Everything compared between 1 and 2 processes (each process passes its shards)."""
    out = {}
    for kind in ("ggn", "hessian", "mcfisher"):
        kw = {"seed": 3} if kind == "mcfisher" else {}
        op = curvlab.curvature_operator(kind, model, batches, "layer", cache=kind == "ggn", **kw)
        V = _probes(op.shape[1])
        out[kind] = op.matmat(V)
        out[kind + "_vec"] = op @ V[:, 0]
        out[kind + "_loop"] = op.matmat(V, vectorize=False)
        if kind == "ggn":
            out["tokens"] = op.num_tokens
            out["eigs"] = lanczos(op, k=3, seed=0).eigenvalues
            out["blockdiag"] = op.block_diagonal() @ V[:, 1]
    problem = Problem(model, batches, "layer")
    out["loss"], out["grad"] = problem.loss, problem.grad
    out["val_loss"] = problem.loss_at(batches, problem.grad, 0.1)
    params = dict(model.named_parameters())
    factors = kfac_factors(model, params, batches, linear_layers(model, problem.space),
                           estimator="mc", samples=2, seed=1)
    out["kfac"] = [(f.A, f.B) for f in factors]
    # per-token pullbacks: exact and Monte-Carlo diag(G), diag(F) and Shampoo's factors
    tp = Problem(model, batches, "layer", dense_max=0)
    out["diag_exact"] = ggn_diagonal(tp, exact_max=10**9).values
    out["diag_mc"] = ggn_diagonal(tp, exact_max=0, samples=2, seed=1).values
    stats = empirical_statistics(tp, [n for n, p in params.items() if p.ndim == 2][:3])
    out["diag_f"] = stats.diagonal.values
    out["shampoo"] = [t for lr in stats.factors.values() for t in lr]
    return out


FAMILIES = {"llama": LLAMA_TEST, "gpt": GPT_TEST}  # RMSNorm and LayerNorm models


def _on_rank(rank: int) -> dict:
    out = {}
    for family, cfg in FAMILIES.items():
        shards = [b.shard() for b in _batches(cfg)]
        out[family] = _quantities(make_model(cfg), shards)
        out[family]["rows"] = [b.inputs.shape[0] for b in shards]
    return out


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    ranks = spawn(_on_rank, tmp_path=tmp_path_factory.mktemp("ranks"))
    return {family: (_quantities(make_model(cfg), _batches(cfg)), [r[family] for r in ranks])
            for family, cfg in FAMILIES.items()}


def _close(a, b, rtol=1e-10, atol=1e-12):
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_products_equal_one_process_on_the_union_of_the_shards(gathered, family):
    single, ranks = gathered[family]
    assert [r["rows"] for r in ranks] == [[2, 2], [1, 1]]  # both ranks really held shards
    for r in ranks:
        assert r["tokens"] == single["tokens"]
        for kind in ("ggn", "hessian", "mcfisher"):
            for suffix in ("", "_vec", "_loop"):
                assert _close(r[kind + suffix], single[kind + suffix]), (kind, suffix)
        assert _close(r["blockdiag"], single["blockdiag"])
    # a shard alone is not the whole: the reduction is what makes them equal
    cfg = LLAMA_TEST if family == "llama" else GPT_TEST
    alone = curvlab.ggn(make_model(cfg), [b.shard(0, 2) for b in _batches(cfg)], "layer")
    assert not _close(alone.matmat(_probes(alone.shape[1])), single["ggn"])


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_top_eigenvalues_equal_one_process_and_agree_across_ranks(gathered, family):
    single, ranks = gathered[family]
    assert torch.equal(ranks[0]["eigs"], ranks[1]["eigs"])  # replicated Lanczos, same values
    assert _close(ranks[0]["eigs"], single["eigs"], rtol=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_gradient_loss_and_kfac_equal_one_process(gathered, family):
    single, ranks = gathered[family]
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) < 1e-12 * abs(single["loss"])
        assert abs(r["val_loss"] - single["val_loss"]) < 1e-12 * abs(single["val_loss"])
        assert _close(r["grad"], single["grad"])
        assert len(r["kfac"]) == len(single["kfac"]) > 0
        for (a, b), (a1, b1) in zip(r["kfac"], single["kfac"]):
            assert _close(a, a1) and _close(b, b1)
        for key in ("diag_exact", "diag_mc", "diag_f"):  # MC labels do not depend on shards
            assert _close(r[key], single[key]), key
        assert all(_close(a, b) for a, b in zip(r["shampoo"], single["shampoo"]))


def _dead_peer(rank: int) -> dict:
    model = make_model(LLAMA_TEST)
    op = curvlab.ggn(model, [b.shard() for b in _batches(LLAMA_TEST)], "layer")
    if rank == 1:
        os._exit(0)  # dies without a word, in the middle of the analysis
    start = time.perf_counter()
    try:
        op @ _probes(op.shape[1])[:, 0]
        return {"error": None, "seconds": time.perf_counter() - start}
    except Exception as e:  # noqa: BLE001 - the point: which error, how fast
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}


def test_a_dead_rank_gives_an_error_not_a_hang(tmp_path):
    timeout = 10.0
    try:
        spawn(_dead_peer, tmp_path=tmp_path, timeout=timeout)
    except FileNotFoundError:  # rank 1 wrote nothing: it died
        pass
    r = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert r["error"] is not None
    assert r["seconds"] < timeout + 20


def _mismatch(rank: int, out: str) -> dict:
    from curvlab.cli import main

    argv = ["spectrum", out, "--k", str(2 + rank), "-o", f"{out}.h5"]  # --k differs
    try:
        main(argv)
    except SystemExit as e:
        return {"code": e.code}
    return {"code": 0}


def test_mismatched_command_lines_are_refused_on_every_rank(tmp_path, capfd):
    ckpt = tmp_path / "m.pt"
    curvlab.save_checkpoint(ckpt, curvlab.build_model(LLAMA_TEST), data={"seq_len": 8,
                                                                        "batch_size": 2})
    os.environ.pop("WORLD_SIZE", None)
    # spawn() initializes the group itself; main() must only check, not re-initialize
    codes = [r["code"] for r in spawn(_mismatch, str(ckpt), tmp_path=tmp_path)]
    assert codes == [1, 1]
    err = capfd.readouterr().err
    assert "rank 1 has a different command line than rank 0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.pt.h5").exists()


# -- the CLI under torchrun -----------------------------------------------------------------

def _checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    cfg = curvlab.ModelConfig("llama", vocab_size=256, seq_len=16, d_model=8, n_layers=2,
                              n_heads=2, d_ff=12)
    curvlab.save_checkpoint(path, curvlab.build_model(cfg), data={"seq_len": 8,
                                                                  "batch_size": 3})
    return path


def test_torchrun_extract_and_spectrum_equal_one_process(tmp_path, capsys):
    from tests.cli_helpers import run_cli

    ckpt = _checkpoint(tmp_path)
    common = ["--blocks", "a=layers.0.self_attn.*", "--blocks", "m=layers.1.mlp.*",
              "--blocks", "n=norm.weight", "--dtype", "float64", "--batches", "2"]
    p = torchrun(["extract", str(ckpt), *common, "--curvature", "ggn,mcfisher",
                  "-o", str(tmp_path / "two.h5")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote ") == 1  # rank 0 alone prints
    assert "(2 processes)" in p.stdout
    code, _, _ = run_cli(capsys, "extract", ckpt, *common, "--curvature", "ggn,mcfisher",
                         "-o", tmp_path / "one.h5")
    assert code == 0
    two, one = curvlab.store.read(tmp_path / "two.h5"), curvlab.store.read(tmp_path / "one.h5")
    assert two.kinds == one.kinds and len(two.pairs("ggn")) == len(one.pairs("ggn")) == 3
    for kind in one.kinds:
        for row, col in one.pairs(kind):
            assert np.allclose(two.block(kind, row, col), one.block(kind, row, col),
                               rtol=1e-10, atol=1e-14), (kind, row, col)
    with h5py.File(tmp_path / "two.h5") as f, h5py.File(tmp_path / "one.h5") as g:
        assert f.attrs["data"] == g.attrs["data"]  # provenance: the whole batches

    p = torchrun(["spectrum", str(ckpt), "--k", "3", "--dtype", "float64", "--batches", "2",
                  "-o", str(tmp_path / "s2.h5")])
    assert p.returncode == 0, p.stderr[-3000:]
    code, _, _ = run_cli(capsys, "spectrum", ckpt, "--k", "3", "--dtype", "float64",
                         "--batches", "2", "-o", tmp_path / "s1.h5")
    assert code == 0
    from curvlab.store.spectrum import read_spectra

    with h5py.File(tmp_path / "s2.h5") as f, h5py.File(tmp_path / "s1.h5") as g:
        a, b = read_spectra(f)["ggn"]["full"], read_spectra(g)["ggn"]["full"]
    assert np.allclose(a["eigenvalues"], b["eigenvalues"], rtol=1e-9)


def test_torchrun_errors_end_every_rank_quickly(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (tmp_path / "taken.h5").write_bytes(b"not ours")
    start = time.perf_counter()
    p = torchrun(["spectrum", str(ckpt), "--k", "2", "-o", str(tmp_path / "taken.h5")])
    assert p.returncode != 0
    assert "error (rank 0):" in p.stderr and "taken.h5" in p.stderr
    assert "Traceback" not in p.stderr.split("error (rank 0):")[1].splitlines()[0]
    assert time.perf_counter() - start < 90
    assert (tmp_path / "taken.h5").read_bytes() == b"not ours"
    p = torchrun(["info", str(ckpt)])
    assert p.returncode != 0 and "does not run under torchrun" in p.stderr


def test_one_process_is_untouched():
    assert not distributed.active() and distributed.world_size() == 1
    b = make_batch(LLAMA_TEST, batch_size=3)
    assert b.shard() is b and b.token_range == (0, 3 * LLAMA_TEST.seq_len)
    s = b.shard(1, 2)
    assert s.inputs.shape[0] == 1 and s.token_range == (2 * LLAMA_TEST.seq_len,
                                                         3 * LLAMA_TEST.seq_len)
    with pytest.raises(curvlab.errors.ConfigError, match="cannot be split across 4"):
        b.shard(0, 4)


def _datasets(group, prefix=""):
    out = {}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            out.update(_datasets(item, f"{prefix}{key}/"))
        elif item.dtype.kind in "fiub":
            out[prefix + key] = item[()]
    return out


def test_torchrun_compare_equals_one_process(tmp_path, capsys):
    from tests.cli_helpers import run_cli

    ckpt = _checkpoint(tmp_path)
    args = ["--preconditioners", "full,layerwise,diag,kfac,soap,muon", "--damping", "1e-2",
            "--blocks", "a=layers.0.*", "--blocks", "b=layers.1.*", "--batches", "2",
            "--val-batches", "2", "--no-spectrum"]
    p = torchrun(["compare", str(ckpt), *args, "-o", str(tmp_path / "two.h5")])
    assert p.returncode == 0, p.stderr[-3000:]
    code, _, _ = run_cli(capsys, "compare", ckpt, *args, "-o", tmp_path / "one.h5")
    assert code == 0
    with h5py.File(tmp_path / "two.h5") as f, h5py.File(tmp_path / "one.h5") as g:
        two, one = _datasets(f["compare"]), _datasets(g["compare"])
    assert two.keys() == one.keys() and len(one) > 5
    for key in one:
        assert np.allclose(two[key], one[key], rtol=1e-6, atol=1e-12, equal_nan=True), key


def test_local_device_under_nccl_is_the_rank_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.local_device("cuda:0") == "cuda:0"  # no process group: as asked
    monkeypatch.setattr(distributed, "_nccl", lambda: True)
    assert distributed.local_device("cuda:0") == "cuda:3"
    assert distributed.local_device("cuda") == "cuda:3"
    assert distributed.local_device("cpu") == "cpu"  # CPU tensors go over gloo


def test_default_backend_gives_each_process_its_own_gpu_or_uses_gloo(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.default_backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.default_backend() == "gloo"  # 2 processes, 1 GPU: they share it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.default_backend() == "cpu:gloo,cuda:nccl"
