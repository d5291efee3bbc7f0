"""Dense block extraction and coupling maps against the dense curvature matrix, in float64.

The kill test runs an extraction in a subprocess, kills it with SIGKILL while it waits after a
known number of chunks, then checks the file and resumes it.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import curvlab
from curvlab import store
from curvlab.curvature.coupling import coupling_map, coupling_products, known_columns
from curvlab.curvature.extract import (
    LimitError,
    check_limits,
    extract_blocks,
    plan_extraction,
    resolve_pairs,
    sub_operator,
)
from curvlab.curvature.operators import curvature_operator
from curvlab.errors import ConfigError
from tests.conftest import GPT_TEST, LLAMA_TEST, make_batch, make_model

ROOT = Path(__file__).resolve().parents[1]
# small blocks of both LayerNorm-free and attention parameters; names with '/', '%' and dots
SPECS = {
    "llama": ["layers.0.input_layernorm.weight", "attn/q%=layers.0.self_attn.q_proj.weight",
              "norm.weight", "up=layers.1.mlp.up_proj.weight[0:5]"],
    "gpt": ["transformer.h.0.ln_1.weight", "attn/qkv=transformer.h.0.attn.c_attn.weight[0:6]",
            "transformer.h.1.mlp.c_fc.bias"],
}


def problem(family="llama", kinds=("ggn",), cache=False):
    """A tiny model, its small-block partition and operators. ``cache=False`` by default: the
    cached linearization costs seconds to trace and changes nothing extraction does."""
    cfg = LLAMA_TEST if family == "llama" else GPT_TEST
    model, batch = make_model(cfg), make_batch(cfg)
    part = curvlab.partition(model, SPECS[family])
    ops = {k: curvature_operator(k, model, batch, part, cache=cache) for k in kinds}
    return cfg, model, part, ops


def provenance(checkpoint, cfg):
    return store.make_provenance(checkpoint, cfg.to_dict(), {"source": "test", "seed": 0},
                                 "float64", "cpu")


def dense_block(dense, part, row, col):
    off = dict(zip(part.names, part.offsets))
    size = dict(zip(part.names, part.sizes))
    return dense[off[row]:off[row] + size[row], off[col]:off[col] + size[col]]


@pytest.fixture
def checkpoint(tmp_path):
    model = make_model(LLAMA_TEST)
    return curvlab.save_checkpoint(tmp_path / "model.pt", model)


def test_resolve_pairs():
    _, _, part, _ = problem()
    names = part.names
    assert resolve_pairs(part, "diag") == [(n, n) for n in names]
    upper = resolve_pairs(part, "all")
    assert len(upper) == len(names) * (len(names) + 1) // 2
    assert all(names.index(r) <= names.index(c) for r, c in upper)
    assert resolve_pairs(part, "norm.weight:attn/q%,up,norm.weight:attn/q%") == [
        ("norm.weight", "attn/q%"), ("up", "up")]
    assert resolve_pairs(part, [("up", "norm.weight")]) == [("up", "norm.weight")]
    with pytest.raises(ConfigError, match="unknown block pair 'up:nope'.*valid blocks: "):
        resolve_pairs(part, "up:nope")
    with pytest.raises(ConfigError, match="unknown block 'x'"):
        resolve_pairs(part, [("x", "up")])


@pytest.mark.parametrize("family, kind, cache", [("llama", "ggn", True),
                                                 ("llama", "hessian", False),
                                                 ("gpt", "efisher", False)])
def test_extracted_blocks_equal_dense(tmp_path, checkpoint, family, kind, cache):
    cfg, _, part, ops = problem(family, (kind,), cache)
    dense = ops[kind].to_dense()
    seen = []
    plan = plan_extraction(ops, "all", chunk_cols=5)
    with store.create_file(tmp_path / "r.h5", provenance(checkpoint, cfg), part) as w:
        result = extract_blocks(ops, "all", w, chunk_cols=5, progress=seen.append)
    n = part.size
    assert sum(seen) == result.products == plan.products == plan.products_total == n
    assert plan.disk_bytes == plan.disk_bytes_total == 8 * sum(
        part.sizes[i] * part.sizes[j] for i in range(len(part)) for j in range(i, len(part)))
    r = store.read(tmp_path / "r.h5")
    assert r.pairs(kind) == resolve_pairs(part, "all")  # the upper triangle, diagonal included
    for row, col in resolve_pairs(part, "all"):
        block = r.block(kind, row, col)
        assert block.dtype == torch.float64
        assert (block - dense_block(dense, part, row, col)).abs().max() <= 1e-12
        # the lower triangle is the transpose
        assert (r.block(kind, col, row) - dense_block(dense, part, col, row)).abs().max() < 1e-12
    assert all(s.complete for s in r.status())


def test_diag_and_explicit_pairs(tmp_path, checkpoint):
    cfg, _, part, ops = problem()
    dense = ops["ggn"].to_dense()
    with store.create_file(tmp_path / "r.h5", provenance(checkpoint, cfg), part) as w:
        extract_blocks(ops, "diag", w, chunk_cols=64)
        extract_blocks(ops, "up:norm.weight", w, chunk_cols=3)  # a lower-triangle pair, as given
    r = store.read(tmp_path / "r.h5")
    assert set(r.pairs("ggn")) == {(n, n) for n in part.names} | {("up", "norm.weight")}
    for row, col in r.pairs("ggn"):
        assert (r.block("ggn", row, col) - dense_block(dense, part, row, col)).abs().max() < 1e-12
    # a chunk is never wider than its block
    widths = {(s.row, s.col): s.chunk_cols for s in r.status()}
    assert widths == {("layers.0.input_layernorm.weight",) * 2: 8, ("attn/q%",) * 2: 64,
                      ("norm.weight",) * 2: 8, ("up", "up"): 40, ("up", "norm.weight"): 3}


KILLED_RUN = """
import sys, time
import curvlab
from curvlab import store
from curvlab.curvature.extract import extract_blocks
from tests.test_extract import problem, provenance

cfg, _, part, ops = problem(kinds=("ggn", "hessian"))
writer = store.create_file(sys.argv[2], provenance(sys.argv[1], cfg), part)
chunks = 0

def progress(n):
    global chunks
    chunks += 1
    print("chunk", chunks, flush=True)
    if chunks == int(sys.argv[3]):
        time.sleep(600)  # killed here

extract_blocks(ops, "all", writer, chunk_cols=8, progress=progress)
"""


def test_killed_extraction_resumes_to_the_same_numbers(tmp_path, checkpoint):
    path, stop = tmp_path / "killed.h5", 5  # chunks of ggn's second column block are left
    script, log, errors = tmp_path / "run.py", tmp_path / "out.txt", tmp_path / "err.txt"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out, open(errors, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(checkpoint), str(path), str(stop)],
            stdout=out, stderr=err, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while f"chunk {stop}\n" not in log.read_text():
            assert proc.poll() is None, f"extraction ended early: {errors.read_text()}"
            assert time.monotonic() < deadline, "extraction subprocess timed out"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # it sleeps in the progress callback of chunk `stop`
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    cfg, _, part, ops = problem(kinds=("ggn", "hessian"))
    killed = store.read(path)
    status = killed.status()
    # every requested block was created up front; killed after 5 chunks: the first column
    # block (1 chunk) and 4 of the 8 chunks of the second, shared by its two row blocks
    assert len(status) == 2 * len(resolve_pairs(part, "all"))
    done = {(s.kind, s.row, s.col): s.chunks_done for s in status if s.chunks_done}
    n0 = "layers.0.input_layernorm.weight"
    assert done == {("ggn", n0, n0): 1, ("ggn", n0, "attn/q%"): 4,
                    ("ggn", "attn/q%", "attn/q%"): 4}
    assert [s.complete for s in status].count(True) == 1
    with pytest.raises(store.StoreError, match=r"incomplete \(4 of 8 column chunks"):
        killed.block("ggn", "attn/q%", "attn/q%")
    partial = killed.block("ggn", "attn/q%", "attn/q%", allow_incomplete=True)
    assert torch.isfinite(partial[:, :32]).all() and torch.isnan(partial[:, 32:]).all()

    prov = provenance(checkpoint, cfg)
    with store.open_for_resume(path, prov, part) as w:
        plan = plan_extraction(ops, "all", sink=w, chunk_cols=8, time_products=False)
        assert 0 < plan.products < plan.products_total
        assert 0 < plan.disk_bytes < plan.disk_bytes_total
        seen = []
        result = extract_blocks(ops, "all", w, chunk_cols=8, progress=seen.append)
    assert result.chunks_skipped > 0 and sum(seen) == result.products == plan.products

    with store.create_file(tmp_path / "whole.h5", prov, part) as w:
        extract_blocks(ops, "all", w, chunk_cols=8)
    resumed, whole = store.read(path), store.read(tmp_path / "whole.h5")
    assert all(s.complete for s in resumed.status())
    for kind in ("ggn", "hessian"):
        assert resumed.pairs(kind) == whole.pairs(kind) == resolve_pairs(part, "all")
        for row, col in whole.pairs(kind):
            a, b = resumed.block(kind, row, col), whole.block(kind, row, col)
            assert (a - b).abs().max() <= 1e-12


def test_resume_against_another_checkpoint_refuses(tmp_path, checkpoint):
    cfg, model, part, ops = problem()
    path = tmp_path / "r.h5"
    with store.create_file(path, provenance(checkpoint, cfg), part) as w:
        extract_blocks(ops, "diag", w)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    other = curvlab.save_checkpoint(tmp_path / "other.pt", model)
    with pytest.raises(store.StoreError, match="cannot resume .*checkpoint_sha256 differs"):
        store.open_for_resume(path, provenance(other, cfg), part)
    wider = cfg.to_dict() | {"d_ff": 16}
    prov = store.make_provenance(checkpoint, wider, {"source": "test", "seed": 0}, "float64",
                                 "cpu")
    with pytest.raises(store.StoreError, match="cannot resume .*model.d_ff differs"):
        store.open_for_resume(path, prov, part)


def test_limits_refuse_oversized_requests(tmp_path):
    _, _, part, ops = problem()
    plan = plan_extraction(ops, "all", chunk_cols=8, time_products=True, probe_columns=2)
    assert plan.seconds > 0 and plan.seconds_per_product["ggn"] > 0
    assert plan.memory_bytes > 2 * 8 * 8 * (part.size)  # at least a chunk's input and output
    with pytest.raises(LimitError, match=r"disk .* over the 1.0 KiB limit \(max_disk_bytes\).*"
                                         r"pass --force"):
        check_limits(plan, max_disk_bytes=1024, disk_path=tmp_path)
    with pytest.raises(LimitError, match=r"memory .* \(max_memory_bytes; fewer columns"):
        check_limits(plan, max_memory_bytes=1000, disk_path=tmp_path)
    with pytest.raises(LimitError, match=r"time .* over the 0.0 s limit \(max_seconds\)"):
        check_limits(plan, max_seconds=1e-9, disk_path=tmp_path)
    check_limits(plan, max_disk_bytes=1024, max_memory_bytes=1, force=True)
    check_limits(plan, disk_path=tmp_path / "not" / "yet")  # defaults: tiny plan passes
    big = plan.__class__(**{**plan.__dict__, "disk_bytes": 10**15})
    with pytest.raises(LimitError, match="default: 20 GiB or 90% of the .* free"):
        check_limits(big, disk_path=tmp_path)


def test_sub_operator_rows_share_products():
    _, _, part, ops = problem()
    op = ops["ggn"]
    dense = op.to_dense()
    sub = sub_operator(op, ["up", "norm.weight"], ["attn/q%"])
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(sub.shape[1], 3, dtype=torch.float64, generator=gen)
    expected = torch.cat([dense_block(dense, part, "up", "attn/q%"),
                          dense_block(dense, part, "norm.weight", "attn/q%")]) @ v
    assert (sub.matmat(v) - expected).abs().max() < 1e-12


def _dense_frobenius(dense, part):
    return torch.tensor([[dense_block(dense, part, r, c).norm() for c in part.names]
                         for r in part.names], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_coupling_map_against_dense(kind):
    _, _, part, ops = problem(kinds=(kind,))
    op = ops[kind]
    dense = op.to_dense()
    F = _dense_frobenius(dense, part)
    blockdiag = torch.block_diag(*[dense_block(dense, part, n, n) for n in part.names])
    energy = float((dense - blockdiag).norm() / dense.norm())

    exact = coupling_map(op, exact_max=10**6)
    assert exact.exact.all() and (exact.stderr == 0).all()
    assert torch.allclose(exact.frobenius, F, rtol=1e-10, atol=0)
    assert exact.off_diagonal_energy() == pytest.approx(energy, rel=1e-10)

    seen = []
    mixed = coupling_map(op, exact_max=10, probes=48, seed=1, progress=seen.append)
    assert sum(seen) == coupling_products(part.sizes, 10, 48)
    small = torch.tensor([n <= 10 for n in part.sizes])
    assert torch.equal(mixed.exact, small[:, None] | small[None, :])
    assert not mixed.exact.all()
    est = ~mixed.exact
    assert (mixed.stderr[est] > 0).all() and (mixed.stderr[~est] == 0).all()
    assert torch.allclose(mixed.frobenius[~est], F[~est], rtol=1e-10, atol=0)
    z = (mixed.frobenius[est] - F[est]).abs() / mixed.stderr[est]
    assert (z < 4).all(), z
    assert torch.equal(mixed.frobenius, mixed.frobenius.T)
    assert mixed.off_diagonal_energy() == pytest.approx(energy, rel=0.1)
    again = coupling_map(op, exact_max=10, probes=48, seed=1)
    assert torch.equal(again.frobenius, mixed.frobenius)
    other = coupling_map(op, exact_max=10, probes=48, seed=2, distribution="gaussian")
    assert not torch.equal(other.frobenius[est], mixed.frobenius[est])
    assert ((other.frobenius[est] - F[est]).abs() / other.stderr[est] < 4).all()


def test_coupling_map_takes_known_block_norms_instead_of_products():
    _, _, part, ops = problem(kinds=("ggn",))
    op = ops["ggn"]
    dense = op.to_dense()
    F2 = _dense_frobenius(dense, part) ** 2
    names = part.names
    # the upper triangle only (what `extract --pairs all` stores): symmetry supplies the rest
    upper = {(r, c): float(F2[i, j]) for i, r in enumerate(names) for j, c in enumerate(names)
             if i <= j}
    seen = []
    m = coupling_map(op, exact_max=10**6, known=upper, progress=seen.append)
    assert sum(seen) == 0 and m.exact.all()
    assert torch.allclose(m.frobenius, F2.sqrt(), rtol=1e-12, atol=0)
    # one column known: its products are skipped, every other entry is computed as before
    first = {(r, names[0]): float(F2[i, 0]) for i, r in enumerate(names)}
    assert known_columns(names, first) == {0}
    assert known_columns(names, {(names[0], names[0]): 1.0}) == set()
    seen = []
    mixed = coupling_map(op, exact_max=10, probes=48, seed=1, known=first, progress=seen.append)
    plain = coupling_map(op, exact_max=10, probes=48, seed=1)
    assert sum(seen) == coupling_products(part.sizes, 10, 48, skip={0}) < coupling_products(
        part.sizes, 10, 48)
    assert torch.allclose(mixed.frobenius[:, 0], F2[:, 0].sqrt(), rtol=1e-12, atol=0)
    assert mixed.exact[:, 0].all() and mixed.exact[0, :].all()
    # the probes of the other blocks are the same draws as without `known`
    rest = ~(mixed.exact | plain.exact)
    assert rest.any()
    assert torch.equal(mixed.frobenius[rest], plain.frobenius[rest])


def test_coupling_map_rejects_bad_options():
    _, _, _, ops = problem()
    with pytest.raises(ConfigError, match="probe distribution"):
        coupling_map(ops["ggn"], distribution="uniform")
    with pytest.raises(ConfigError, match="at least 2 probes"):
        coupling_map(ops["ggn"], probes=1)


def test_off_diagonal_energy_of_a_block_diagonal_map_is_zero():
    cmap = curvlab.curvature.coupling.CouplingMap(
        ("a", "b"), torch.diag(torch.tensor([3.0, 4.0])), torch.zeros(2, 2),
        torch.ones(2, 2, dtype=torch.bool))
    assert cmap.off_diagonal_energy() == 0.0
    full = cmap.__class__(("a", "b"), torch.tensor([[3.0, 4.0], [0.0, 0.0]]),
                          torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert full.off_diagonal_energy() == pytest.approx(0.8)
    assert np.isfinite(full.off_diagonal_energy())


@pytest.fixture
def extract_cli():
    from curvlab.cli import cli

    if "extract" not in cli.commands:
        pytest.skip("the `curvlab extract` command is not in curvlab/cli.py yet")


def test_cli_extract_resume_and_errors(tmp_path, capsys, extract_cli):
    from tests.cli_helpers import assert_clean_error, run_cli

    tokens = tmp_path / "tokens.bin"  # nanoGPT format, ids below the test model's vocabulary
    np.random.default_rng(0).integers(0, 32, 2000).astype("<u2").tofile(tokens)
    spec = curvlab.DataSpec(source=str(tokens), seq_len=8, batch_size=2)
    ckpt = curvlab.save_checkpoint(tmp_path / "m.pt", make_model(LLAMA_TEST),
                                   data=spec.to_dict())
    out = tmp_path / "out.h5"
    args = ["extract", ckpt, "--curvature", "ggn,mcfisher", "--blocks", "n=norm.weight",
            "--blocks", "q/0=layers.0.self_attn.q_proj.weight[0:2]", "--pairs", "all",
            "--chunk", "5", "-o", out]
    code, text, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "ggn" in text and "mcfisher" in text and f"wrote {out}" in text
    r = store.read(out)
    assert r.kinds == ["ggn", "mcfisher"] and r.coupling_kinds == ["ggn", "mcfisher"]
    assert all(s.complete for s in r.status()) and len(r.status()) == 6
    assert r.attrs["data"]["tokens"] == 16 and r.attrs["data"]["batches"] == 1
    data = r.attrs["data"]
    assert data["corpus_sha256"] == curvlab.data.load_corpus(data["source"],
                                                             data["val_fraction"]).sha256
    assert r.attrs["checkpoint_sha256"] == store.sha256_file(ckpt)
    model, _ = curvlab.load_checkpoint(ckpt, dtype=torch.float64)
    batches = curvlab.data.analysis_batches(spec, 1)
    op = curvature_operator("ggn", model, batches, r.partition, cache=False)
    dense = op.to_dense()
    for row, col in r.pairs("ggn"):
        block = dense_block(dense, r.partition, row, col)
        assert (r.block("ggn", row, col) - block).abs().max() < 1e-12
    code, text, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "0 column products" in text
    assert_clean_error(capsys, *args, match="exists; resume it (--resume)")
    assert_clean_error(capsys, *args, "--resume", "--seed", "1",
                       match="cannot resume " + str(out) + ": data.seed differs (file 0, now 1)")
    (tmp_path / "bad.h5").write_bytes(b"garbage" * 50)
    assert_clean_error(capsys, *args[:-1], tmp_path / "bad.h5", "--resume",
                       match="not a readable HDF5 file")
    assert_clean_error(capsys, *args[:-1], ckpt / "x.h5", match="is not a folder")
    assert_clean_error(capsys, *args[:2], "--curvature", "fisher", match="unknown curvature")
