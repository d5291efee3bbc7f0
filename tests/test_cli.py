import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import curvlab
from tests.cli_helpers import assert_clean_error, run_cli


def test_module_entry_point_and_version():
    r = subprocess.run([sys.executable, "-m", "curvlab", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and curvlab.__version__ in r.stdout
    r = subprocess.run([sys.executable, "-m", "curvlab", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "info" in r.stdout


def test_init_and_info(tmp_path, capsys):
    path = tmp_path / "tiny.pt"
    code, out, _ = run_cli(capsys, "init", "--preset", "tiny", "-o", path)
    assert code == 0 and path.exists()
    code, out, _ = run_cli(capsys, "info", path)
    assert code == 0
    for word in ("llama", "133,440", "embed", "layer.0", "layer.1", "head", "source=default"):
        assert word in out
    code, out, _ = run_cli(capsys, "info", path, "--json")
    d = json.loads(out)
    assert d["parameters"] == 133_440 and d["blocks"]["names"] == [
        "embed", "layer.0", "layer.1", "head"]
    assert sum(d["blocks"]["sizes"]) == d["parameters"]


def test_info_nanogpt(tmp_path, capsys):
    from tests.test_checkpoint import _nanogpt_checkpoint

    _nanogpt_checkpoint(tmp_path / "ckpt.pt")
    code, out, _ = run_cli(capsys, "info", tmp_path / "ckpt.pt", "--json")
    d = json.loads(out)
    assert code == 0 and d["format"] == "nanogpt" and d["step"] == 250
    assert d["blocks"]["names"] == ["embed", "layer.0", "layer.1", "head"]
    # tied head counted once, in the embedding block
    assert d["blocks"]["sizes"][0] == 40 * 16 + 12 * 16


def test_bad_inputs(tmp_path, capsys):
    assert_clean_error(capsys, "info", tmp_path / "nope.pt", match="checkpoint not found")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert_clean_error(capsys, "info", tmp_path / "text.pt", match="not a checkpoint")
    run_cli(capsys, "init", "-o", tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    assert_clean_error(capsys, "info", tmp_path / "trunc.pt", match="truncated")
    obj = torch.load(tmp_path / "good.pt", weights_only=True)
    obj["model"]["config"]["family"] = "rwkv"
    torch.save(obj, tmp_path / "fam.pt")
    assert_clean_error(capsys, "info", tmp_path / "fam.pt", match="unknown model family")
    obj = torch.load(tmp_path / "good.pt", weights_only=True)
    obj["model"]["config"]["vocab_size"] = 300
    torch.save(obj, tmp_path / "vocab.pt")
    assert_clean_error(capsys, "info", tmp_path / "vocab.pt", match="does not match" if False
                       else "but the model config needs")
    assert_clean_error(capsys, "init", "--preset", "huge", "-o", tmp_path / "x.pt",
                       match="unknown preset")


def test_debug_shows_traceback(tmp_path, capsys):
    with pytest.raises(curvlab.CurvlabError):
        from curvlab.cli import main

        main(["--debug", "info", str(tmp_path / "nope.pt")])


def test_data_errors_through_cli(tmp_path, capsys):
    # bad data inputs reach the user as one-line errors too
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    assert_clean_error(capsys, "init", "-o", tmp_path / "x.pt", "--data", tmp_path / "odd.bin",
                       match="odd byte count")
    (tmp_path / "big.bin").write_bytes(np.array([5, 999] * 64, dtype="<u2").tobytes())
    assert_clean_error(capsys, "init", "-o", tmp_path / "x.pt", "--data", tmp_path / "big.bin",
                       match="token id 999 >= model vocab size 256")
