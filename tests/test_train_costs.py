"""Cost columns of the training metrics: tokens read by the solve and by the line search, pass
counts, step / evaluation / wall seconds, kept across a resume.

Every count is checked against an independent count of the micro-batches the run read (their
non-ignored targets, re-drawn from the stream here) and of the passes each method runs.
"""

import json

import pytest

import curvlab
from curvlab.train import TrainConfig, train
from tests.conftest import train_checkpoint

TIMES = ("wall_time", "step_time", "eval_time")


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("init") / "init.pt")


def _config(init, **kw):
    base = dict(init=init, micro_batch_size=2, dtype="float64", max_steps=3, inner_steps=2,
                eval_every=2, eval_batches=1, lr=3e-3, inner_lr=3e-3)
    return TrainConfig(**{**base, **kw})


def _targets(cfg: TrainConfig, first: int, count: int) -> int:
    """Non-ignored target tokens of train micro-batches ``first .. first + count − 1``."""
    stream = curvlab.BatchStream(curvlab.DataSpec(seq_len=16, batch_size=cfg.micro_batch_size,
                                                  seed=cfg.seed))
    return sum(int((stream.batch(i).targets != -100).sum()) for i in range(first, first + count))


def _check_times(history):
    walls = [r["wall_time"] for r in history]
    assert walls[0] == 0.0 and all(b > a for a, b in zip(walls, walls[1:]))
    steps = [r["step_time"] for r in history[1:]]
    assert history[0]["step_time"] is None and all(t > 0 for t in steps)
    # wall = updates + evaluations (4-decimal rounding of each column)
    for i, r in enumerate(history[1:], 1):
        assert r["eval_time"] >= history[i - 1]["eval_time"] - 1e-4
        assert r["wall_time"] == pytest.approx(sum(steps[:i]) + r["eval_time"], abs=1e-3)


@pytest.mark.parametrize("optimizer,K", [("adamw", 1), ("muon", 3)])
def test_baseline_counts_every_accumulated_micro_batch(tmp_path, init_ckpt, optimizer, K):
    cfg = _config(init_ckpt, optimizer=optimizer, grad_accum=K, out=str(tmp_path / "run"))
    r = train(cfg)
    for t, row in enumerate(r.history):
        assert row["tokens_solve"] == _targets(cfg, 0, t * K)
        assert row["tokens_line_search"] == 0
        assert row["passes_total"] == ({"gradient": t * K} if t else {})
        assert row["tokens"] == t * K * 2 * 16  # positions: every target here counts
    assert r.history[1]["passes"] == {"gradient": K}
    _check_times(r.history)
    _, info = curvlab.load_checkpoint(tmp_path / "run" / "final.pt")
    assert info.metrics["tokens_solve"] == _targets(cfg, 0, 3 * K)
    assert info.metrics["passes_gradient"] == 3 * K


@pytest.mark.parametrize("optimizer,ls_batches", [("gn", None), ("layerwise-gn", 1),
                                                  ("gn-prox", 3)])
def test_gn_counts_solve_and_line_search_micro_batches_once(tmp_path, init_ckpt, optimizer,
                                                            ls_batches):
    cfg = _config(init_ckpt, optimizer=optimizer, line_search_batches=ls_batches)
    n, m = cfg.inner_steps, cfg.ls_batches
    assert m == (ls_batches or n)
    r = train(cfg)
    blocks = len(curvlab.layer_partition(r.model)) if optimizer.startswith("layerwise") else 1
    R = len(cfg.line_search_grid)
    for t, row in enumerate(r.history):
        # outer step s reads micro-batches s(n+m) .. s(n+m)+n-1 (solve), then m (line search)
        assert row["tokens_solve"] == sum(_targets(cfg, s * (n + m), n) for s in range(t))
        assert row["tokens_line_search"] == sum(_targets(cfg, s * (n + m) + n, m)
                                                for s in range(t))
        if t:
            assert row["passes_total"]["inner_gradient"] == t * blocks * n
            assert row["passes_total"]["loss"] == t * R * m  # every candidate re-reads them
            assert row["passes"]["ggn_product"] == row["passes"]["gradient"] == 0
    _check_times(r.history)


def test_cg_counts_products(tmp_path, init_ckpt):
    cfg = _config(init_ckpt, optimizer="gn", inner_optimizer="cg", cg_max_iter=3, cg_tol=1e-12,
                  damping=1e-2, max_steps=2)
    r = train(cfg)
    for row in r.history[1:]:
        its = row["cg_iterations"]
        assert 1 <= its <= 3 and row["cg_residual"] >= 0
        # one product per micro-batch per iteration at least; no first-order inner steps
        assert row["passes"]["ggn_product"] >= its * cfg.inner_steps
    assert r.history[-1]["passes_total"]["ggn_product"] == sum(
        row["passes"]["ggn_product"] for row in r.history[1:])


def test_resume_keeps_the_cumulative_counts(tmp_path, init_ckpt):
    cfg = _config(init_ckpt, optimizer="gn", max_steps=4, checkpoint_every=2)
    whole = train(cfg.replace(out=str(tmp_path / "whole")))

    class Interrupt(Exception):
        pass

    def stop_at_3(row):
        if row["step"] == 3:  # after step_000002.pt
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg.replace(out=str(tmp_path / "part")), progress=stop_at_3)
    resumed = train(cfg.replace(out=str(tmp_path / "part"), resume=True))
    rows = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    for a, b in zip(rows, whole.history):
        for k in ("tokens", "tokens_solve", "tokens_line_search", "passes_total"):
            assert a[k] == b[k], k
    assert rows[-1]["tokens_solve"] == resumed.history[-1]["tokens_solve"] == sum(
        _targets(cfg, s * 4, 2) for s in range(4))
    _check_times(resumed.history)  # the clock continues from the checkpoint


def test_resume_of_a_checkpoint_without_costs_reports_null(tmp_path, init_ckpt):
    import torch

    cfg = _config(init_ckpt, optimizer="adamw", max_steps=2, checkpoint_every=1,
                  out=str(tmp_path / "run"))

    class Interrupt(Exception):
        pass

    def stop(row):
        if row["step"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, progress=stop)
    path = tmp_path / "run" / "step_000001.pt"
    raw = torch.load(path, weights_only=True)
    del raw["extra"]["trainer"]["costs"]  # as written before the cost columns existed
    torch.save(raw, path)
    with pytest.warns(UserWarning, match="without cost counts"):
        r = train(cfg.replace(resume=True))
    assert r.history[-1]["tokens_solve"] is None and r.history[-1]["passes_total"] is None
    assert r.history[-1]["passes"] == {"gradient": 1}
