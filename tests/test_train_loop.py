"""The training loop: every optimizer end to end, checkpoints, metrics, resume, errors.

A small LLaMA (vocab 256 for the byte-level default corpus) in float64, 16-token sequences.
"""

import json

import pytest
import torch

import curvlab
from curvlab.errors import ConfigError
from curvlab.train import OPTIMIZERS, TrainConfig, TrainingDivergedError, train
from tests.conftest import TRAIN_TEST, train_checkpoint

SMALL = TRAIN_TEST


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("init") / "init.pt")


def _config(init, **kw):
    base = dict(init=init, micro_batch_size=2, dtype="float64", max_steps=4, inner_steps=2,
                eval_every=1, eval_batches=2, lr=3e-3, inner_lr=3e-3)
    return TrainConfig(**{**base, **kw})


TIMES = {"wall_time", "step_time", "eval_time"}  # measured seconds: differ between runs


def _rows(path):
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_and_writes_a_checkpoint(tmp_path, init_ckpt, optimizer):
    out = tmp_path / "run"
    r = train(_config(init_ckpt, optimizer=optimizer, max_steps=3, checkpoint_every=2,
                      out=str(out)))
    vals = [row["val_loss"] for row in r.history]
    assert r.step == 3 and len(r.history) == 4 and vals[-1] < vals[0]
    # GN: 2 inner + as many line-search micro-batches (the reference's default)
    micro_batches = 1 if optimizer in ("adamw", "muon", "soap") else 2 + 2
    assert r.tokens == 3 * micro_batches * 2 * 16
    assert sorted(p.name for p in out.iterdir()) == ["final.pt", "metrics.jsonl",
                                                     "step_000002.pt"]
    model, info = curvlab.load_checkpoint(out / "final.pt")
    assert info.step == 3 and info.optimizer["name"] == optimizer
    assert info.data["batch_size"] == 2 and info.data["seq_len"] == 16
    assert info.metrics["val_loss"] == vals[-1]
    rows = _rows(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    if optimizer.endswith(("gn", "prox")):
        assert "inner_optimizer" in info.optimizer["hparams"]
        R = 10 if optimizer.startswith("layerwise") else 5  # the reference's ls_range
        grid = [2 ** (-i / 2) for i in range(R)]
        assert rows[1]["ls_step"] in grid and info.optimizer["hparams"]["line_search"] == grid
        assert len(rows[1]["ls_losses"]) == R and rows[1]["inner_decrease"] > 0


@pytest.mark.parametrize("optimizer,kw", [
    ("gn", dict(ema_decay=0.5, inner_optimizer="muon-adamw")),
    ("soap", dict(precondition_frequency=2, grad_accum=2)),
])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, init_ckpt, optimizer, kw):
    cfg = _config(init_ckpt, optimizer=optimizer, max_steps=4, checkpoint_every=2, **kw)
    whole = train(cfg.replace(out=str(tmp_path / "whole")))

    class Interrupt(Exception):
        pass

    def stop_at_3(row):
        if row["step"] == 3:  # after step_000002.pt, before step 4
            raise Interrupt

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        train(cfg.replace(out=str(part)), progress=stop_at_3)
    assert not (part / "final.pt").exists() and len(_rows(part / "metrics.jsonl")) == 4
    resumed = train(cfg.replace(out=str(part), resume=True))
    assert _rows(part / "metrics.jsonl") == _rows(tmp_path / "whole" / "metrics.jsonl")
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    # a finished run resumes to itself; a changed option is refused
    again = train(cfg.replace(out=str(part), resume=True))
    assert again.step == 4 and _rows(part / "metrics.jsonl") == _rows(
        tmp_path / "whole" / "metrics.jsonl")
    with pytest.raises(ConfigError, match="changed options: lr"):
        train(cfg.replace(out=str(part), resume=True, lr=1.0))


def test_target_loss_stops_the_run(tmp_path, init_ckpt):
    r = train(_config(init_ckpt, optimizer="gn", max_steps=10, target_loss=5.35))
    assert r.steps_to_target == r.step < 10
    assert r.val_loss <= 5.35 and r.tokens_to_target == r.tokens


def test_errors_are_clear_and_leave_no_corrupt_checkpoint(tmp_path, init_ckpt):
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="inner-steps must be >= 1"):
        TrainConfig(optimizer="gn", inner_steps=0)
    with pytest.raises(ConfigError, match="constant\\+inner-cosine needs a GN"):
        TrainConfig(optimizer="adamw", schedule="constant+inner-cosine")
    out = tmp_path / "other"
    with pytest.raises(ConfigError, match="holds another model than --preset tiny"):
        train(_config(init_ckpt, preset="tiny", out=str(out)))
    assert not out.exists()
    # a learning rate this large overflows the logits: NaN loss, an error, and only the
    # checkpoints written before remain (each loads)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match="NaN or Inf"):
        train(_config(init_ckpt, optimizer="adamw", lr=1e30, dtype="float32", max_steps=50,
                      checkpoint_every=1, out=str(out)))
    assert not (out / "final.pt").exists()
    for path in out.glob("*.pt"):
        model, _ = curvlab.load_checkpoint(path)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not list(out.glob(".*tmp"))
    # a run interrupted before its first checkpoint starts again from scratch
    def interrupt(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(init_ckpt, max_steps=2, out=str(tmp_path / "early")), progress=interrupt)
    with pytest.warns(UserWarning, match="holds no checkpoint yet .* again from step 0"):
        train(_config(init_ckpt, max_steps=2, out=str(tmp_path / "early"), resume=True))
    assert [r["step"] for r in _rows(tmp_path / "early" / "metrics.jsonl")] == [0, 1, 2]
    # --resume on a folder that holds no run (a typo) is refused, and nothing is written
    with pytest.raises(ConfigError, match=r"--resume: .*typo holds no run to resume"):
        train(_config(init_ckpt, max_steps=1, out=str(tmp_path / "typo"), resume=True))
    assert not (tmp_path / "typo").exists()
    # an existing run is not overwritten
    train(_config(init_ckpt, max_steps=1, out=str(tmp_path / "done")))
    with pytest.raises(ConfigError, match="--resume"):
        train(_config(init_ckpt, max_steps=1, out=str(tmp_path / "done")))
