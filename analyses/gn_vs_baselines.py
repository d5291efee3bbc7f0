"""Full and layerwise Gauss-Newton against AdamW, Muon and SOAP (arXiv 2510.09378, Fig. 1-2).

    python analyses/gn_vs_baselines.py [--out runs/gn_vs_baselines] [--quick] [--gpu]

1. Warm-up: AdamW from a fresh model for ``warmup_steps`` steps -> ``warmup/final.pt``, the
   shared start of every run.
2. From it: AdamW, Muon and SOAP, each at a few learning rates, with ``grad_accum`` micro-batches
   per step (a large batch: as many tokens per step as a GN inner solve); GN, GN-prox-linear and
   layerwise GN with ``inner_steps`` inner Muon/AdamW steps per outer step. Global cosine
   schedules over ``max_steps``; every run goes to ``max_steps`` (so that the target can be
   changed afterwards with ``--report-only --target-loss X``).
3. ``table.md`` / ``summary.json``: outer steps (and tokens) to the target per method (baselines:
   their best learning rate), ``loss_vs_step.png``, ``loss_vs_tokens.png``.

Settings: the default (CPU) uses the ``tiny`` preset and finishes in about 10-25 minutes on 2
cores; ``--quick`` is a smoke test (a few minutes); ``--gpu`` runs the ``45m`` preset on CUDA.

Several GPUs: ``torchrun --standalone --nproc-per-node 4 analyses/gn_vs_baselines.py --gpu``
runs every training run data-parallel (same numbers as one process, see docs/distributed.md);
rank 0 prints and writes the table and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvlab import distributed
from curvlab.train import TrainConfig, TrainingDivergedError, train


@dataclass
class CommonSettings:
    """Model, data, warm-up, evaluation and learning-rate sweeps shared by the analyses."""

    preset: str = "tiny"
    device: str = "cpu"
    seq_len: int = 64
    micro_batch_size: int = 8
    warmup_steps: int = 100
    warmup_lr: float = 3e-3
    eval_every: int = 2
    eval_batches: int = 8
    inner_lr: float = 0.01
    lrs: dict[str, list[float]] = field(default_factory=lambda: {
        "adamw": [1e-3, 3e-3, 1e-2], "muon": [3e-3, 1e-2, 3e-2], "soap": [1e-3, 3e-3, 1e-2]})


@dataclass
class Settings(CommonSettings):
    inner_steps: int = 8
    baseline_steps: int = 300
    gn_steps: int = 40
    target_loss: float = 2.35
    gn_methods: tuple[str, ...] = ("gn", "gn-prox", "layerwise-gn")


QUICK = dict(warmup_steps=30, inner_steps=4, baseline_steps=40, gn_steps=6, target_loss=2.9,
             eval_batches=4, lrs={"adamw": [3e-3], "muon": [1e-2], "soap": [3e-3]})
GPU = dict(preset="45m", device="cuda", seq_len=512, micro_batch_size=16, warmup_steps=300,
           inner_steps=16, baseline_steps=2000, gn_steps=150, target_loss=1.6, eval_every=5,
           eval_batches=16)


def warmup(s, out: Path, common: dict, seed: int = 0) -> Path:
    """The shared start of every run: AdamW for ``s.warmup_steps`` steps at ``s.warmup_lr``
    from a fresh ``s.preset`` model -> ``out/warmup/final.pt`` (kept if it exists). ``seed``
    (model init and data order): 0 writes ``warmup``, others ``warmup-seed{seed}``."""
    folder = out / ("warmup" if seed == 0 else f"warmup-seed{seed}")
    warm = folder / "final.pt"
    if not distributed.broadcast_object(warm.exists()):  # the same decision on every rank
        t = time.perf_counter()
        r = train(TrainConfig(optimizer="adamw", preset=s.preset, lr=s.warmup_lr, seed=seed,
                              max_steps=s.warmup_steps, out=str(folder), **common))
        print(f"warm-up seed {seed}: AdamW {s.warmup_steps} steps, val loss {r.val_loss:.4f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    return warm


def has_run(folder: Path) -> bool:
    """Whether ``folder`` holds a (possibly unfinished) training run to resume."""
    return (folder / "metrics.jsonl").is_file() or any(folder.glob("*.pt"))


def run(s: Settings, out: Path) -> list[dict]:
    common = dict(seq_len=s.seq_len, micro_batch_size=s.micro_batch_size,
                  device=s.device, eval_every=s.eval_every, eval_batches=s.eval_batches)
    warm = warmup(s, out, common)
    runs = [(name, s.inner_lr) for name in s.gn_methods]
    runs += [(name, lr) for name, lrs in s.lrs.items() for lr in lrs]
    results = []
    for name, lr in runs:
        gn = name not in s.lrs
        folder = out / "runs" / f"{name}-lr{lr:g}"
        cfg = TrainConfig(
            optimizer=name, init=str(warm), resume=has_run(folder), out=str(folder),
            max_steps=s.gn_steps if gn else s.baseline_steps,
            **(dict(inner_steps=s.inner_steps, inner_lr=lr) if gn
               else dict(lr=lr, grad_accum=s.inner_steps)), **common)
        t = time.perf_counter()
        try:
            r = train(cfg)
        except TrainingDivergedError as e:  # a too-large learning rate is a result of a sweep
            print(f"{name:<14} lr {lr:<7g} diverged: {e}", flush=True)
            continue
        wall = time.perf_counter() - t
        row = {"method": name, "lr": lr, "steps": r.step, "val_loss": r.val_loss,
               "best_val_loss": min(h["val_loss"] for h in r.history if h["val_loss"]),
               "wall_s": round(wall, 1),
               "curve": [(h["step"], h["tokens"], h["val_loss"]) for h in r.history
                         if h["val_loss"] is not None]}
        results.append(row)
        print(f"{name:<14} lr {lr:<7g} {r.step} steps, best val {row['best_val_loss']:.4f}  "
              f"({wall:.0f} s)", flush=True)
    return results


def to_target(results: list[dict], target: float) -> list[dict]:
    """Add the first evaluated step (and tokens) with validation loss <= target to each run."""
    out = []
    for r in results:
        hit = next(((step, tokens) for step, tokens, loss in r["curve"] if loss <= target),
                   (None, None))
        out.append({**r, "steps_to_target": hit[0], "tokens_to_target": hit[1]})
    return out


def best_per_method(results: list[dict]) -> dict[str, dict]:
    """Each method's run with the fewest steps to the target (else the lowest loss)."""
    best: dict[str, dict] = {}
    for r in results:
        key = (r["steps_to_target"] is None, r["steps_to_target"] or 0, r["best_val_loss"])
        cur = best.get(r["method"])
        if cur is None or key < (cur["steps_to_target"] is None, cur["steps_to_target"] or 0,
                                 cur["best_val_loss"]):
            best[r["method"]] = r
    return best


def report(s: Settings, results: list[dict], out: Path) -> str:
    results = to_target(results, s.target_loss)
    best = best_per_method(results)
    ref = best.get("gn", {}).get("steps_to_target")
    lines = [f"target validation loss {s.target_loss} (preset {s.preset}, micro-batch "
             f"{s.micro_batch_size}x{s.seq_len}, {s.inner_steps} micro-batches per step)", "",
             "| method | lr | outer steps to target | tokens to target | steps / GN steps | "
             "best val loss | wall s |", "|---|---|---|---|---|---|---|"]
    for name, r in best.items():
        steps = r["steps_to_target"]
        ratio = f"{steps / ref:.2f}" if steps and ref else "-"
        tokens = f"{r['tokens_to_target']:,}" if r["tokens_to_target"] else "-"
        reached = steps if steps is not None else f"> {r['steps']}"
        lines.append(f"| {name} | {r['lr']:g} | {reached} | {tokens} | {ratio} | "
                     f"{r['best_val_loss']:.4f} | {r['wall_s']} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"settings": s.__dict__, "runs": results},
                                                 indent=1))
    plot(best, s, out)
    return text


def plot(best: dict[str, dict], s: Settings, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis, index, fname in (("outer step", 0, "loss_vs_step.png"),
                               ("tokens", 1, "loss_vs_tokens.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in best.items():
            xs = [c[index] for c in r["curve"]]
            ax.plot(xs, [c[2] for c in r["curve"]], label=f"{name} (lr {r['lr']:g})",
                    linestyle="-" if name not in s.lrs else "--")
        ax.axhline(s.target_loss, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xlabel(axis)
        ax.set_ylabel("validation loss")
        ax.set_title(f"{s.preset}: from a shared AdamW warm-up")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def parse_settings(doc: str, default_out: str, cls: type, quick: dict, gpu: dict,
                   extra: Callable[[argparse.ArgumentParser], None] | None = None,
                   ) -> tuple[argparse.Namespace, Any]:
    """The analyses' shared command line (``--out``, ``--quick``, ``--gpu``, ``--target-loss``,
    ``--report-only``, plus ``extra``'s options) and the settings it selects."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--quick", action="store_true", help="a smoke test of a few minutes")
    ap.add_argument("--gpu", action="store_true", help="the 45m preset on CUDA")
    ap.add_argument("--target-loss", type=float, default=None)
    ap.add_argument("--report-only", action="store_true",
                    help="recompute tables and figures from the stored results (e.g. another "
                         "target)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    s = cls(**(gpu if args.gpu else quick if args.quick else {}))
    if args.target_loss is not None:
        s.target_loss = args.target_loss
    return args, s


def main() -> None:
    args, s = parse_settings(__doc__, "runs/gn_vs_baselines", Settings, QUICK, GPU)
    out = Path(args.out)
    distributed.init()  # under torchrun: every training run is data-parallel
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 reports
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.png"):
            old.unlink()
    t = time.perf_counter()
    if args.report_only:
        results = json.loads((out / "summary.json").read_text())["runs"]
    else:
        results = run(s, out)
    if not distributed.is_main():
        distributed.shutdown()
        return
    print(report(s, results, out))
    print(f"total {time.perf_counter() - t:.0f} s; wrote {out}/table.md, summary.json, "
          f"loss_vs_step.png, loss_vs_tokens.png")
    distributed.shutdown()


if __name__ == "__main__":
    main()
