"""Full vs layerwise (and other) GN preconditioners along a training run.

Trains the `tiny` preset with AdamW (`curvlab train`), keeps checkpoints along the run, and runs
`curvlab compare` over them; writes compare.h5, the comparison figures (decrease per
preconditioner vs training step, condition numbers), and, for the last checkpoint, the GGN
coupling heatmap and full vs block-diagonal spectra (`curvlab extract` / `spectrum` / `plot`).

    python analyses/compare_through_training.py [--out runs/compare] [--steps 300] [--quick]

The measured results are in docs/compare.md. Set OMP_NUM_THREADS=1 on a shared CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

from curvlab.cli import main as curvlab_cli


def run(*args: object) -> None:
    print("$ curvlab", " ".join(map(str, args)), flush=True)
    try:
        curvlab_cli([str(a) for a in args])
    except SystemExit as e:
        if e.code:
            sys.exit(e.code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="30 steps, fewer tokens (a smoke run)")
    args = ap.parse_args()
    steps = 30 if args.quick else args.steps
    every = max(1, steps // 3)
    out = args.out
    os.makedirs(out, exist_ok=True)
    run_dir = os.path.join(out, "run")
    init = os.path.join(out, "init.pt")  # the untrained model (train's --seed 0 start)
    run("init", "--preset", "tiny", "--seed", "0", "-o", init)
    run("train", "--optimizer", "adamw", "--preset", "tiny", "--lr", "3e-3", "--seq-len", "32",
        "--max-steps", steps, "--checkpoint-every", every, "--eval-every", every,
        "--no-progress", "--out", run_dir)
    ckpts = [init] + [os.path.join(run_dir, f"step_{s:06d}.pt")
                      for s in range(every, steps + 1, every)]
    ckpts = [c for c in ckpts if os.path.exists(c)]
    data = ["--batch-size", 4 if args.quick else 8, "--seq-len", 32,
            "--batches", 1 if args.quick else 2]
    run("compare", *ckpts, *data, "--val-batches", 1 if args.quick else 2,
        "--damping", "1e-2,1e-1", "-o", os.path.join(out, "compare.h5"), "--overwrite",
        "--plot", os.path.join(out, "plots"))
    last = ckpts[-1]
    run("extract", last, *data, "--blocks", "qkv", "--pairs", "diag", "--dtype", "float32",
        "-o", os.path.join(out, "qkv.h5"), "--force")
    run("spectrum", last, *data, "--k", 10, "--blockdiag", "--density", "--probes", 4,
        "--steps", 40, "-o", os.path.join(out, "spectra.h5"), "--overwrite")
    for name in ("qkv.h5", "spectra.h5"):
        run("plot", os.path.join(out, name), "-o", os.path.join(out, "plots"))
    print(f"outputs in {out}/")


if __name__ == "__main__":
    main()
