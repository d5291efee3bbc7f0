"""Peak RSS and wall time of `curvlab spectrum` top-10 GGN eigenvalues vs parameter count.

    python benchmarks/bench_memory.py [--cases small,45m,gpt2,150m] [--work DIR] [--out FILE]

Each case runs ``curvlab spectrum`` as a user would, in its own subprocess (one thread:
``OMP_NUM_THREADS=1``), on a randomly initialized model: the ``small``, ``45m`` and ``150m``
presets (curvlab checkpoints) and GPT-2 124M (``transformers.GPT2Config()`` defaults, the real
50,257-token vocabulary, saved with ``save_pretrained``). Data: random token ids (a ``.npy``
token file), 4 sequences of 128 tokens (one batch, 512 tokens per product). Options:
``--k 10 --tol 1e-3 --max-iter 120 --basis-device disk --max-memory 8G`` and the default basis
size (``max(2k+1, 20) = 21``); where the memory plan refuses, the case is rerun with the
option the refusal names, and the table says so. Peak RSS is ``ru_maxrss`` of the child
(``RUSAGE_CHILDREN`` of a wrapper process per case).

Written beside each measurement: the plan's estimate and the ratio of the measured peak to
``model + one product's activations + (m + 3) vectors`` (the issue's bound, with the product's
activations taken as the plan's), where model = the resident memory the plan measured before
the first product (parameters, data and the libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CURVLAB = [sys.executable, "-m", "curvlab"]
SETTINGS = ["--k", "10", "--tol", "1e-3", "--max-iter", "120", "--basis-device", "disk",
            "--max-memory", "8G", "--seq-len", "128", "--batch-size", "4"]

WRAP = r"""
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:])
print(f"@@ rc={r.returncode} maxrss={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}"
      f" wall={time.perf_counter() - t:.1f}", file=sys.stderr)
"""


def make_inputs(case: str, work: Path) -> tuple[str, str, int]:
    """(model path, token file, parameters) of a case, created once in ``work``."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    if case == "gpt2":
        path, vocab = work / "gpt2", 50257
        if not (path / "config.json").exists():
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    else:
        import curvlab

        path = work / f"{case}.pt"
        cfg = curvlab.preset(case, seq_len=128)
        vocab = cfg.vocab_size
        if not path.exists():
            curvlab.save_checkpoint(path, curvlab.build_model(cfg, seed=0), data={})
    tokens = work / f"tokens{vocab}.npy"
    if not tokens.exists():
        ids = np.random.default_rng(0).integers(0, vocab, 200_000).astype(np.int32)
        np.save(tokens, ids)
    params = _parameters(case, path)
    return str(path), str(tokens), params


def _parameters(case: str, path: Path) -> int:
    if case == "gpt2":
        import json as _json

        c = _json.loads((path / "config.json").read_text())
        d, L, V, P = c["n_embd"], c["n_layer"], c["vocab_size"], c["n_positions"]
        return V * d + P * d + L * (12 * d * d + 13 * d) + 2 * d
    import curvlab

    model, _ = curvlab.load_checkpoint(path)
    return curvlab.models.num_parameters(model)


def run_case(model: str, tokens: str, extra: list[str], out: Path, log: Path) -> dict:
    """One ``curvlab spectrum`` run in a wrapper subprocess: rc, peak RSS, wall, plan, table."""
    cmd = [sys.executable, "-c", WRAP, *CURVLAB, "spectrum", model, "--data", tokens,
           *SETTINGS, *extra, "-o", str(out), "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + proc.stderr)
    text = proc.stdout + proc.stderr
    m = re.search(r"@@ rc=(\d+) maxrss=(\d+) wall=([\d.]+)", text)
    row = {"rc": int(m.group(1)), "maxrss": int(m.group(2)), "wall": float(m.group(3)),
           "command": " ".join(["curvlab", "spectrum", "MODEL", "--data", "TOKENS", *SETTINGS,
                                *extra])}
    plan = re.search(r"^memory plan: .*$", text, re.M)
    row["plan"] = plan.group(0) if plan else None
    err = re.search(r"^(?:Error|error): (.*)$", text, re.M)
    row["error"] = err.group(1) if err else None
    full = re.search(r"^full\s+([\d,]+)\s+(\S+)\s+(\S+)\s+(\d+)/(\d+)\s+(\d+)", text, re.M)
    if full:
        row.update(size=int(full.group(1).replace(",", "")), top=float(full.group(2)),
                   kth=float(full.group(3)), converged=f"{full.group(4)}/{full.group(5)}",
                   products=int(full.group(6)))
    return row


def _gib(text: str, name: str) -> float | None:
    """A ``name X.Y GiB|MiB|KiB`` term of the plan line, in GiB."""
    m = re.search(rf"{name}[^,;()]*?([\d.]+) (GiB|MiB|KiB|B)\b", text or "")
    if not m:
        return None
    return float(m.group(1)) / {"GiB": 1, "MiB": 1024, "KiB": 1024**2, "B": 1024**3}[m.group(2)]


def bound_ratio(row: dict, basis_size: int) -> tuple[float | None, float | None]:
    """(bound in GiB, measured / bound): model (resident) + product + (m + 3) vectors."""
    plan = row.get("plan")
    resident, product = _gib(plan, "resident"), _gib(plan, "product")
    if resident is None or product is None or "size" not in row:
        return None, None
    vector = row["size"] * 4 / 2**30
    bound = resident + product + (basis_size + 3) * vector
    return bound, row["maxrss"] / 2**30 / bound


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="small,45m,gpt2,150m")
    ap.add_argument("--work", default=None, help="Folder for models and tokens [a temp dir].")
    ap.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="curvlab-bench-"))
    rows = []
    for case in args.cases.split(","):
        model, tokens, params = make_inputs(case, work)
        extra: list[str] = []
        row = run_case(model, tokens, extra, work / f"{case}.h5", work / f"{case}.log")
        note = ""
        hint = re.search(r"; (--.*?) would fit", row.get("error") or "")
        if row["rc"] != 0 and hint:  # follow the plan's advice once
            note = f"plan refused; reran with {hint.group(1)}"
            extra = hint.group(1).split(" (")[0].split()
            row = run_case(model, tokens, extra, work / f"{case}.h5", work / f"{case}.log")
        size = next((int(extra[i + 1]) for i, a in enumerate(extra) if a == "--basis-size"), 21)
        bound, ratio = bound_ratio(row, size)
        row.update(case=case, params=params, note=note, bound=bound, ratio=ratio)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\n# curvlab spectrum top-10 GGN, {platform.machine()} CPU, 1 thread, "
          f"{time.strftime('%Y-%m-%d')}; {' '.join(SETTINGS)}")
    print("| model | parameters | peak RSS | plan (peak estimate) | bound: model + product + "
          "(m+3) vectors | measured / bound | wall | products | converged | λ_1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        est = re.search(r"cpu ~([\d.]+ \w+)", r.get("plan") or "")
        bound = f"{r['bound']:.2f} GiB" if r.get("bound") else "-"
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
        status = "" if r["rc"] == 0 else f" (exit {r['rc']}: {r.get('error')})"
        print(f"| {r['case']} | {r['params']:,} | {r['maxrss'] / 2**30:.2f} GiB{status} | "
              f"{est.group(1) if est else '-'} | {bound} | {ratio} | {r['wall']:.0f} s | "
              f"{r.get('products', '-')} | {r.get('converged', '-')} | "
              f"{r.get('top', float('nan')):.4e} |" + (f" {r['note']}" if r["note"] else ""))


if __name__ == "__main__":
    main()
