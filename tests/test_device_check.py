"""The CPU smoke mode of benchmarks/device_check.py (the prepared GPU check): it runs every part
on the tiny preset within its time budget, writes its JSON and markdown, and its own self-checks
(errors within their stated bounds) pass. Its numbers are not asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run(tmp_path, capsys):
    rc = _script().main([str(tmp_path), "--device", "cpu", "--preset", "tiny",
                         "--budget", "40"])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "device_check.json").read_text())
    assert rc == 0, (data["failed_checks"], out[-3000:])
    assert data["failed_checks"] == []
    parts = data["parts"]
    assert list(parts) == ["verify", "products", "lanczos", "gpt2", "gn", "torchrun",
                          "compile"]
    for name, part in parts.items():
        assert part["status"] == "done" or part["status"].startswith(("stopped", "skipped")), \
            (name, part["status"])
    assert parts["compile"]["status"] == "skipped: --compile-backend none"
    checks = {c["name"] for c in parts["verify"]["checks"]}
    assert {"hessian-vs-double-backward", "ggn-vs-explicit-jacobian"} <= checks
    assert all(c["passed"] for p in parts.values() for c in p["checks"])
    md = (tmp_path / "device_check.md").read_text()
    assert md.startswith("# curvlab device check: CPU") and "## products" in md
    assert data["meta"]["preset"] == "tiny" and data["meta"]["device"] == "cpu"


def test_refuses_cuda_without_a_gpu_and_unknown_parts(tmp_path, capsys):
    module = _script()
    if not torch.cuda.is_available():
        assert module.main([str(tmp_path)]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    assert module.main([str(tmp_path), "--device", "cpu", "--parts", "verify,nope"]) == 1
    assert "unknown part(s) nope" in capsys.readouterr().err
