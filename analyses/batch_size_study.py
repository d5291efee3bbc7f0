"""Steps to a target loss vs tokens per step for every method (arXiv 2510.09378, Fig. 1 and the
critical-batch-size figure), and the study's ablations.

    python analyses/batch_size_study.py [--out runs/batch_size_study] [--jobs 2] [--quick | --gpu]
    python analyses/batch_size_study.py --ablations [--out ...]   # schedules, line search on/off
    python analyses/batch_size_study.py --report-only [--target-loss X]

1. Warm-up: AdamW from a fresh model -> ``warmup/final.pt``, the shared start of every run.
2. For every tokens-per-step setting (``batches``: micro-batches of ``micro_batch_size x
   seq_len`` tokens per outer step; inner steps for the GN methods, as many fresh micro-batches
   for their line search, gradient accumulation for the baselines): AdamW, Muon and SOAP at each
   learning rate of a small sweep, and GN, GN-prox, layerwise GN, layerwise GN-prox at one inner
   learning rate, all with a global cosine schedule to ``outer_steps`` outer steps.
3. Report (``table.md``, ``summary.json``): per setting, each method's outer steps to the target
   (baselines: their best learning rate *at that setting*) and its ratio to GN;
   ``steps_vs_batch.png`` (log-log), ``loss_vs_step.png`` at the largest setting,
   ``gn_diagnostics.png`` (line-search steps and predicted inner decreases of the GN methods).

``--ablations`` (at ``ablation_batches`` micro-batches per step): GN and GN-prox with the global
cosine, constant + inner cosine and constant schedules, and with the line search off
(``use_line_search=False``); for GN also a line-search range of 10 and a third of the inner
learning rate (probes of why GN's line search takes its smallest step); ``ablations.md``,
``ablations.png``.

Every run lives in its own folder and resumes (``TrainConfig(resume=True)``): an interrupted study
continues where it stopped, finished runs are read back, not rerun. ``--jobs N`` runs N training
runs at once in separate processes (one thread each): on a 2-core machine ``--jobs 2`` halves the
wall time. The measured results are in docs/train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gn_vs_baselines import (  # noqa: E402
    CommonSettings,
    best_per_method,
    parse_settings,
    to_target,
    warmup,
)

from curvlab.train import TrainConfig, TrainingDivergedError, train  # noqa: E402

GN_METHODS = ("gn", "gn-prox", "layerwise-gn", "layerwise-gn-prox")
BASELINES = ("adamw", "muon", "soap")


@dataclass
class Settings(CommonSettings):
    batches: tuple[int, ...] = (4, 16, 64)
    outer_steps: int = 30
    target_loss: float = 2.2
    gn_methods: tuple[str, ...] = GN_METHODS
    ablation_batches: int = 16


QUICK = dict(warmup_steps=20, batches=(1, 2, 4), outer_steps=4, target_loss=3.0,
             eval_batches=2, lrs={"adamw": [3e-3], "muon": [1e-2], "soap": [3e-3]},
             ablation_batches=2)
GPU = dict(preset="45m", device="cuda", seq_len=512, micro_batch_size=16, warmup_steps=300,
           batches=(4, 16, 64), outer_steps=100, target_loss=1.6, eval_every=5,
           eval_batches=16, ablation_batches=64)


def _common(s: Settings) -> dict:
    return dict(seq_len=s.seq_len, micro_batch_size=s.micro_batch_size, device=s.device,
                eval_every=s.eval_every, eval_batches=s.eval_batches)


def _config(s: Settings, warm: Path, out: Path, method: str, lr: float, batches: int,
            **changes) -> TrainConfig:
    gn = method in GN_METHODS
    per_step = (dict(inner_steps=batches, inner_lr=lr) if gn
                else dict(lr=lr, grad_accum=batches))
    return TrainConfig(optimizer=method, init=str(warm), resume=True, out=str(out),
                       max_steps=s.outer_steps, checkpoint_every=10, **per_step, **_common(s),
                       **changes)


def _train_one(job: tuple[dict, dict]) -> dict | None:
    """One training run (in a worker process under ``--jobs``); its row, or None if it
    diverged (a too-large learning rate is a result of a sweep, not an error)."""
    cfg_dict, meta = job
    if meta.pop("single_thread"):
        import torch

        torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(cfg_dict)
    t = time.perf_counter()
    try:
        r = train(cfg)
    except TrainingDivergedError as e:
        print(f"{meta['method']:<18} M={meta['batches']:<3} lr {meta['lr']:<7g} diverged: {e}",
              flush=True)
        return None
    rows = [h for h in r.history if h["val_loss"] is not None]
    row = {**meta, "steps": r.step, "val_loss": r.val_loss,
           "best_val_loss": min(h["val_loss"] for h in rows),
           "tokens_per_step": r.tokens // max(r.step, 1), "wall_s": round(r.wall_time, 1),
           "curve": [(h["step"], h["tokens"], h["val_loss"]) for h in rows],
           "ls_steps": [h.get("ls_step") for h in r.history[1:]],
           "inner_decrease": [h.get("inner_decrease") for h in r.history[1:]]}
    print(f"{meta['method']:<18} M={meta['batches']:<3} lr {meta['lr']:<7g} "
          f"best val {row['best_val_loss']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return row


def run_all(jobs: list[tuple[TrainConfig, dict]], workers: int) -> list[dict]:
    payload = [(cfg.to_dict(), {**meta, "single_thread": workers > 1}) for cfg, meta in jobs]
    if workers <= 1:
        results = [_train_one(j) for j in payload]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_train_one, payload))
    return [r for r in results if r is not None]


def study_jobs(s: Settings, warm: Path, out: Path) -> list[tuple[TrainConfig, dict]]:
    jobs = []
    for M in s.batches:
        runs = [(m, s.inner_lr) for m in s.gn_methods]
        runs += [(m, lr) for m, lrs in s.lrs.items() for lr in lrs]
        for method, lr in runs:
            folder = out / "runs" / f"M{M}" / f"{method}-lr{lr:g}"
            jobs.append((_config(s, warm, folder, method, lr, M),
                         {"method": method, "lr": lr, "batches": M}))
    # the most expensive first: workers finish together
    return sorted(jobs, key=lambda j: -j[1]["batches"] * (4 if "layerwise" in j[1]["method"]
                                                           else 2 if j[1]["method"] in GN_METHODS
                                                           else 1))


ABLATIONS = {
    "cosine": dict(schedule="cosine"),
    "constant+inner-cosine": dict(schedule="constant+inner-cosine"),
    "constant": dict(schedule="constant"),
    "no line search": dict(schedule="cosine", use_line_search=False),
}
# GN only: does the line search's smallest step bind (range 10 instead of 5), or is the inner
# learning rate too large for the inner solve (a third of it)?
GN_PROBES = {
    "line-search range 10": dict(schedule="cosine", line_search_range=10),
    "inner lr / 3": dict(schedule="cosine"),
}


def ablation_jobs(s: Settings, warm: Path, out: Path) -> list[tuple[TrainConfig, dict]]:
    jobs, M = [], s.ablation_batches
    variants = [(m, name, changes) for m in ("gn", "gn-prox") for name, changes in
                ABLATIONS.items()] + [("gn", name, changes) for name, changes in GN_PROBES.items()]
    for method, name, changes in variants:
        lr = s.inner_lr / 3 if name == "inner lr / 3" else s.inner_lr
        folder = out / "ablations" / f"{method}-{name.replace(' ', '-').replace('/', 'div')}"
        jobs.append((_config(s, warm, folder, method, lr, M, **changes),
                     {"method": method, "lr": lr, "batches": M, "variant": name}))
    return jobs


def _per_setting(results: list[dict], s: Settings) -> dict[int, dict[str, dict]]:
    """Each setting's best run per method (baselines: best learning rate at that setting)."""
    rows = to_target(results, s.target_loss)
    return {M: best_per_method([r for r in rows if r["batches"] == M]) for M in s.batches}


def report(s: Settings, results: list[dict], out: Path) -> str:
    per = _per_setting(results, s)
    tokens = s.micro_batch_size * s.seq_len
    methods = [m for m in (*s.gn_methods, *s.lrs) if any(m in per[M] for M in s.batches)]
    lines = [f"target validation loss {s.target_loss}; preset {s.preset}; micro-batches of "
             f"{s.micro_batch_size}x{s.seq_len} tokens; {s.outer_steps} outer steps; "
             "baselines at their best learning rate per setting", "",
             "| method | " + " | ".join(f"{M} micro-batches ({M * tokens:,} tok/step)"
                                        for M in s.batches) + " |",
             "|---|" + "---|" * len(s.batches)]
    for m in methods:
        cells = []
        for M in s.batches:
            r, gn = per[M].get(m), per[M].get("gn", {})
            if r is None:
                cells.append("-")
                continue
            steps = r["steps_to_target"]
            ref = gn.get("steps_to_target")
            shown = f"{steps}" if steps is not None else f"> {r['steps']}"
            ratio = f" ({steps / ref:.2f}x GN)" if steps and ref else ""
            lr = f", lr {r['lr']:g}" if m in s.lrs else ""
            cells.append(f"{shown}{ratio}{lr}; best {r['best_val_loss']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    top = max(s.batches)
    fo = [per[top][m] for m in s.lrs if m in per[top]]
    gn = per[top].get("gn")
    if fo and gn:
        best_fo = min(fo, key=lambda r: (r["steps_to_target"] is None,
                                         r["steps_to_target"] or 0, r["best_val_loss"]))
        lines += ["", f"At {top} micro-batches per step: GN {_fmt(gn)}, best first-order "
                  f"method {best_fo['method']} {_fmt(best_fo)}."]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {"settings": asdict(s), "runs": results}, indent=1))
    _plot(per, s, out)
    return text


def _fmt(r: dict) -> str:
    steps = r["steps_to_target"]
    return (f"{steps} steps to the target" if steps is not None
            else f"not at the target in {r['steps']} steps") + \
        f" (best val {r['best_val_loss']:.3f})"


def _style(m: str) -> dict:
    """One color per method in every figure (whatever subset a figure shows)."""
    order = (*GN_METHODS, *BASELINES)
    return {"linestyle": "-" if m in GN_METHODS else "--",
            "marker": "o" if m in GN_METHODS else "s",
            "color": f"C{order.index(m)}" if m in order else None}


def _plot(per: dict[int, dict[str, dict]], s: Settings, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = s.micro_batch_size * s.seq_len
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in (*s.gn_methods, *s.lrs):
        pts = [(M * tokens, per[M][m]["steps_to_target"]) for M in s.batches
               if m in per[M] and per[M][m]["steps_to_target"] is not None]
        if pts:
            ax.plot(*zip(*pts), label=m, **_style(m))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("tokens per outer step")
    ax.set_ylabel(f"outer steps to val loss {s.target_loss}")
    ax.set_title(f"{s.preset}: steps to target vs batch (missing: not reached)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "steps_vs_batch.png", dpi=120)
    plt.close(fig)

    top = max(s.batches)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, r in per[top].items():
        ax.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]],
                label=m + (f" (lr {r['lr']:g})" if m in s.lrs else ""),
                linestyle=_style(m)["linestyle"], color=_style(m)["color"])
    ax.axhline(s.target_loss, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("outer step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{s.preset}, {top * tokens:,} tokens per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_step.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in s.gn_methods:
        r = per[top].get(m)
        if r is None:
            continue
        xs = range(1, len(r["ls_steps"]) + 1)
        a1.plot(xs, r["ls_steps"], label=m, marker=".", color=_style(m)["color"])
        a2.plot(xs, r["inner_decrease"], label=m, marker=".", color=_style(m)["color"])
    a1.set_xlabel("outer step")
    a1.set_ylabel("line-search step size")
    a2.set_xlabel("outer step")
    a2.set_ylabel("predicted decrease L(θ) − m(Δ)")
    a2.set_yscale("symlog", linthresh=1e-3)  # negative: the last inner model value is above L
    a2.axhline(0, color="gray", linewidth=0.8)
    a1.legend(fontsize=8)
    fig.suptitle(f"GN methods at {top * tokens:,} tokens per step")
    fig.tight_layout()
    fig.savefig(out / "gn_diagnostics.png", dpi=120)
    plt.close(fig)


def report_ablations(s: Settings, results: list[dict], out: Path) -> str:
    rows = to_target(results, s.target_loss)
    lines = [f"ablations at {s.ablation_batches} micro-batches per step "
             f"({s.ablation_batches * s.micro_batch_size * s.seq_len:,} tokens), "
             f"{s.outer_steps} outer steps, target {s.target_loss}", "",
             "| method | variant | steps to target | final val loss | best val loss | "
             "mean line-search step |", "|---|---|---|---|---|---|"]
    for r in rows:
        steps = r["steps_to_target"] if r["steps_to_target"] is not None else f"> {r['steps']}"
        ls = [a for a in r["ls_steps"] if a is not None]
        lines.append(f"| {r['method']} | {r['variant']} | {steps} | {r['val_loss']:.4f} | "
                     f"{r['best_val_loss']:.4f} | {sum(ls) / len(ls):.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "ablations.md").write_text(text)
    (out / "ablations.json").write_text(json.dumps({"settings": asdict(s), "runs": results},
                                                   indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, method in zip(axes, ("gn", "gn-prox")):
        for r in rows:
            if r["method"] == method:
                ax.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]],
                        label=r["variant"])
        ax.set_title(method)
        ax.set_xlabel("outer step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss")
    fig.tight_layout()
    fig.savefig(out / "ablations.png", dpi=120)
    plt.close(fig)
    return text


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--ablations", action="store_true",
                        help="schedules and line search on/off for GN and GN-prox")
        ap.add_argument("--jobs", type=int, default=1, help="training runs at once (processes)")

    args, s = parse_settings(__doc__, "runs/batch_size_study", Settings, QUICK, GPU, extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    name = "ablations.json" if args.ablations else "summary.json"
    if args.report_only:
        results = json.loads((out / name).read_text())["runs"]
    else:
        warm = warmup(s, out, _common(s))
        jobs = (ablation_jobs if args.ablations else study_jobs)(s, warm, out)
        results = run_all(jobs, args.jobs)
    print((report_ablations if args.ablations else report)(s, results, out))
    import resource

    cpu = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"total {time.perf_counter() - t:.0f} s wall, {cpu:.0f} s CPU ({os.cpu_count()} CPUs, "
          f"--jobs {args.jobs}); wrote {out}")


if __name__ == "__main__":
    main()
