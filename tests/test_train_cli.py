"""`curvlab train` end to end (skipped until the command is registered in curvlab/cli.py)."""

import json

import pytest

import curvlab
from curvlab.cli import cli
from curvlab.models import build_model
from tests.cli_helpers import assert_clean_error, run_cli
from tests.conftest import TRAIN_TEST

pytestmark = pytest.mark.skipif("train" not in cli.commands,
                                reason="curvlab train is not registered in curvlab/cli.py")

SMALL = TRAIN_TEST


def test_train_cli_runs_resumes_and_errors(tmp_path, capsys):
    init = curvlab.save_checkpoint(tmp_path / "init.pt", build_model(SMALL))
    out = tmp_path / "run"
    args = ["train", "--optimizer", "layerwise-gn", "--init", init, "--micro-batch-size", 2,
            "--inner-steps", 2, "--inner-lr", 3e-3, "--max-steps", 2, "--eval-every", 1,
            "--eval-batches", 1, "--checkpoint-every", 1, "--line-search", "1,0.5",
            "--no-progress", "--out", out]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "layerwise-gn: 2 steps" in stdout and "final.pt" in stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["ls_step"] in (1.0, 0.5)
    code, stdout, _ = run_cli(capsys, "info", out / "final.pt", "--json")
    assert code == 0 and json.loads(stdout)["optimizer"]["name"] == "layerwise-gn"
    code, stdout, err = run_cli(capsys, *args[:-2], "--max-steps", 3, "--resume", "--out", out)
    assert code == 0, err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert_clean_error(capsys, *args, match="already holds checkpoints")
    assert_clean_error(capsys, "train", "--optimizer", "newton", "--out", tmp_path / "x",
                       match="unknown optimizer 'newton'")
    assert_clean_error(capsys, "train", "--optimizer", "gn", "--inner-steps", 0, "--out",
                       tmp_path / "x", match="inner-steps must be >= 1")
    assert_clean_error(capsys, "train", "--optimizer", "gn", "--init", init, "--preset",
                       "small", "--out", tmp_path / "x", match="another model than --preset")
    assert_clean_error(capsys, "train", "--optimizer", "gn", "--line-search", "1,x", "--out",
                       tmp_path / "x", match="--line-search takes comma-separated numbers")
