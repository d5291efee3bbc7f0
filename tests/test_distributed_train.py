"""Data-parallel training on 2 CPU processes (gloo): the same losses and parameters as one
process, only rank 0 writes, resume, configuration errors; and `curvlab train` under torchrun.

Micro-batches of 3 sequences split 2 + 1 across the ranks, so a mean of per-rank means (instead
of token sums over the token count of all ranks) would not match. float64 throughout.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import curvlab
from curvlab.errors import ConfigError
from curvlab.models import build_model
from curvlab.train import TrainConfig, train
from tests.cli_helpers import run_cli
from tests.conftest import TRAIN_TEST
from tests.dist_helpers import spawn, torchrun

SMALL = TRAIN_TEST
RTOL = 1e-9  # float64: only the order of the token sums differs


def _config(init: str, **kw) -> TrainConfig:
    base = dict(init=init, micro_batch_size=3, dtype="float64", eval_every=1, eval_batches=2,
                lr=3e-3, inner_lr=3e-3, inner_steps=2, max_steps=1, line_search=(1.0, 0.5))
    return TrainConfig(**{**base, **kw})


def _configs(init: str, root: str) -> dict[str, TrainConfig]:
    return {
        "gn": _config(init, optimizer="gn"),
        "layerwise-gn-prox": _config(init, optimizer="layerwise-gn-prox", damping=0.1),
        "adamw": _config(init, optimizer="adamw", max_steps=3, grad_accum=2, checkpoint_every=2,
                         out=f"{root}/adamw"),
        "muon": _config(init, optimizer="muon", max_steps=2, grad_accum=2, grad_clip=0.01),
    }


def _resume_config(init: str, out: str) -> TrainConfig:
    return _config(init, optimizer="gn", max_steps=3, checkpoint_every=1, ema_decay=0.5,
                   out=out)


def _summary(result) -> dict:
    return {"history": [{k: v for k, v in r.items()
                         if k not in ("wall_time", "step_time", "eval_time")}
                        for r in result.history],
            "params": {k: p.detach().clone() for k, p in result.model.named_parameters()},
            "checkpoint": result.checkpoint}


class _Interrupt(Exception):
    pass


def _stop_at_2(row):
    if row["step"] == 2:  # after step_000002.pt
        raise _Interrupt


def _ranks(rank: int, init: str, root: str) -> dict:
    """Every scenario on one rank of 2 (run by ``spawn``); file writes of the training loop are
    recorded."""
    import curvlab.train.loop as loop

    writes: list[str] = []

    def recorded(name, fn):
        def wrapper(path, *args, **kwargs):
            writes.append(f"{name} {path}")
            return fn(path, *args, **kwargs)
        return wrapper

    loop.save_checkpoint = recorded("save_checkpoint", loop.save_checkpoint)
    loop._write_jsonl = recorded("write_jsonl", loop._write_jsonl)
    loop.open = recorded("open", open)  # the metrics rows are appended with open(path, "a")
    pathlib.Path.mkdir = recorded("mkdir", pathlib.Path.mkdir)

    rows_seen: set[int] = set()  # sequences per forward pass of this rank's model

    def count_rows(module, args):
        if isinstance(module, torch.nn.Embedding):
            rows_seen.add(args[0].shape[0])

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count_rows)
    results = {name: _summary(train(cfg)) for name, cfg in _configs(init, root).items()}
    hook.remove()
    # an interrupted run resumed by both ranks from the checkpoints rank 0 wrote
    cfg = _resume_config(init, f"{root}/resume")
    try:
        train(cfg, progress=_stop_at_2)
    except _Interrupt:
        pass
    results["resumed"] = _summary(train(cfg.replace(resume=True)))
    # a run interrupted on ONE process (see the fixture), resumed on two
    cross = _resume_config(init, f"{root}/cross").replace(resume=True)
    results["cross"] = _summary(train(cross))
    errors = {}
    for name, bad in [("mismatch", _config(init, lr=1e-3 if rank == 1 else 3e-3)),
                      ("too small", _config(init, micro_batch_size=1)),
                      ("overwrite", _config(init, out=f"{root}/adamw"))]:
        try:
            train(bad)
            errors[name] = None
        except ConfigError as e:
            errors[name] = str(e)
    return {"results": results, "errors": errors, "writes": writes, "rows": rows_seen}


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.pt"
    model = build_model(SMALL, seed=0).double()
    spec = curvlab.DataSpec(seq_len=16, batch_size=3)
    return str(curvlab.save_checkpoint(path, model, data=spec.to_dict()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, init_ckpt):
    """(every scenario on 2 processes, rank 0 first; the same on 1 process; the out folder)."""
    root = tmp_path_factory.mktemp("dist")
    results = tmp_path_factory.mktemp("results")
    try:  # interrupted on one process after step 2; the 2 processes resume it
        train(_resume_config(init_ckpt, str(root / "cross")), progress=_stop_at_2)
    except _Interrupt:
        pass
    two = spawn(_ranks, init_ckpt, str(root), tmp_path=results, timeout=60)
    single_root = tmp_path_factory.mktemp("single")
    one = {name: _summary(train(cfg)) for name, cfg in _configs(init_ckpt,
                                                                 str(single_root)).items()}
    one["resumed"] = _summary(train(_resume_config(init_ckpt, str(single_root / "resume"))))
    return two, one, root


def _assert_close_runs(two: dict, one: dict) -> None:
    assert len(two["history"]) == len(one["history"])
    for a, b in zip(two["history"], one["history"]):
        assert a.keys() == b.keys()
        for k, v in b.items():
            if isinstance(v, float):
                assert a[k] == pytest.approx(v, rel=RTOL, abs=1e-12), (k, a, b)
            elif isinstance(v, list):
                assert a[k] == pytest.approx(v, rel=RTOL, abs=1e-12), (k, a, b)
            else:
                assert a[k] == v, (k, a, b)
    for k, p in one["params"].items():
        torch.testing.assert_close(two["params"][k], p, rtol=RTOL, atol=1e-12)


def _assert_moved(params: dict) -> None:
    start = dict(build_model(SMALL, seed=0).double().named_parameters())
    moved = [k for k, p in params.items() if (p - start[k]).abs().max() > 1e-6]
    assert len(moved) > len(params) // 2, moved


@pytest.mark.parametrize("name", ["gn", "layerwise-gn-prox"])
def test_gn_step_on_two_processes_equals_one_process(runs, name):
    two, one, _ = runs
    r0, r1 = (r["results"][name] for r in two)
    _assert_close_runs(r0, one[name])
    assert r0["history"][1]["ls_step"] == one[name]["history"][1]["ls_step"]
    assert r0["history"][1]["inner_decrease"] > 0
    _assert_moved(r0["params"])
    # every rank holds the same model (the reductions give every rank the same numbers)
    for k, p in r0["params"].items():
        assert torch.equal(p, r1["params"][k]), k
    assert r0["history"] == r1["history"]


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_baseline_with_grad_accum_on_two_processes_equals_one_process(runs, name):
    two, one, _ = runs
    r0, r1 = (r["results"][name] for r in two)
    _assert_close_runs(r0, one[name])
    assert [r["step"] for r in r0["history"]] == list(range(len(r0["history"])))
    vals = [r["val_loss"] for r in r0["history"]]
    assert vals[-1] < vals[0]  # it trained
    _assert_moved(r0["params"])
    for k, p in r0["params"].items():
        assert torch.equal(p, r1["params"][k]), k
    assert r0["history"] == r1["history"]


def test_each_rank_computes_on_its_rows(runs):
    two, _, _ = runs
    # micro-batches of 3 sequences: rank 0 runs rows 0-1, rank 1 row 2 (training, GN inner,
    # line search and evaluation batches alike)
    assert two[0]["rows"] == {2} and two[1]["rows"] == {1}


def test_only_rank_0_writes(runs):
    two, one, root = runs
    writes0, writes1 = two[0]["writes"], two[1]["writes"]
    assert writes1 == []
    out = root / "adamw"
    assert f"save_checkpoint {out / 'step_000002.pt'}" in writes0
    assert writes0.count(f"save_checkpoint {out / 'final.pt'}") == 1
    assert any(w.startswith("mkdir") for w in writes0)
    assert sorted(p.name for p in out.iterdir()) == ["final.pt", "metrics.jsonl",
                                                     "step_000002.pt"]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # written once, not once per rank
    hist = two[0]["results"]["adamw"]["history"]
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in hist]
    model, info = curvlab.load_checkpoint(out / "final.pt")
    assert info.step == 3 and info.metrics["val_loss"] == hist[-1]["val_loss"]
    # every rank returns the path of the checkpoint rank 0 wrote
    assert two[1]["results"]["adamw"]["checkpoint"] == str(out / "final.pt")


def test_resume_on_two_processes_equals_an_uninterrupted_run(runs):
    two, one, root = runs
    for r in two:
        _assert_close_runs(r["results"]["resumed"], one["resumed"])
    rows = [json.loads(line) for line in open(root / "resume" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert sorted(p.name for p in (root / "resume").iterdir()) == [
        "final.pt", "metrics.jsonl", "step_000001.pt", "step_000002.pt", "step_000003.pt"]


def test_a_run_interrupted_on_one_process_resumes_on_two(runs):
    two, one, root = runs
    for r in two:
        _assert_close_runs(r["results"]["cross"], one["resumed"])
    rows = [json.loads(line) for line in open(root / "cross" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_configuration_errors_are_raised_on_every_rank(runs):
    two, _, _ = runs
    for r in two:
        errors = r["errors"]
        assert "rank 1 has a different training configuration than rank 0 (lr: " in \
            errors["mismatch"]
        assert "a batch of 1 sequences cannot be split across 2 processes" in \
            errors["too small"]
        assert "already holds checkpoints" in errors["overwrite"]


def test_train_cli_under_torchrun_equals_one_process(tmp_path, capsys, init_ckpt):
    args = ["train", "--optimizer", "adamw", "--init", init_ckpt, "--micro-batch-size", "3",
            "--grad-accum", "2", "--lr", "3e-3", "--max-steps", "2", "--eval-every", "1",
            "--eval-batches", "2", "--dtype", "float64", "--no-progress"]
    proc = torchrun([*args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("adamw: 2 steps") == 1, proc.stdout  # rank 1 prints nothing
    assert "2 processes" in proc.stdout, proc.stdout
    code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "one")
    assert code == 0, err
    assert "processes" not in stdout
    assert (tmp_path / "two" / "final.pt").exists()
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2]
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for k in b.keys() - {"wall_time", "step_time", "eval_time"}:
            assert (a[k] is None) == (b[k] is None) and (
                b[k] is None or a[k] == pytest.approx(b[k], rel=RTOL)), (k, a, b)
    assert two[-1]["val_loss"] < two[0]["val_loss"]
    m2, _ = curvlab.load_checkpoint(tmp_path / "two" / "final.pt")
    m1, _ = curvlab.load_checkpoint(tmp_path / "one" / "final.pt")
    for p, q in zip(m2.parameters(), m1.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # float32 checkpoints
