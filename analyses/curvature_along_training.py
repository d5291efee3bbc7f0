"""Curvature along training: GN, layerwise GN, AdamW and Muon from one warm-up, analyzed at every
few steps (issue 22; the question behind arXiv 2510.09378's result: why does GN need fewer steps?).

    python analyses/curvature_along_training.py [--out runs/curvature_along_training] [--jobs 2]
    python analyses/curvature_along_training.py --train-only      # the training half only
    python analyses/curvature_along_training.py --report-only     # tables/figures from stored files
    python analyses/curvature_along_training.py --gpu             # 45m preset on CUDA (not run yet)

1. Warm-up: AdamW from a fresh ``tiny`` model (:func:`gn_vs_baselines.warmup`), the shared start.
2. Training (``batch_size_study`` settings at its largest setting, 64 micro-batches of 8x64 tokens
   per outer step): GN, layerwise GN (inner lr 0.01), AdamW (lr 0.003) and Muon (lr 0.03; both
   the best learning rates of the study at 64 micro-batches), ``outer_steps`` outer steps, a
   checkpoint every ``checkpoint_every`` steps. Every run resumes (``TrainConfig(resume=True)``).
3. Spectra along every run (see :func:`spectra`): top eigenvalues of the Hessian and the GGN,
   the gradient's and the step's share of the top eigenspace, AdamW's preconditioned sharpness
   against ``38/η``, per-block spectra and their Jensen-Shannon heterogeneity; one HDF5 file per
   run, figures overlaid (``curvlab plot``), ``table.md`` / ``summary.json``.

The measured results are in docs/along-training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_size_study import GPU as STUDY_GPU  # noqa: E402
from batch_size_study import Settings as StudySettings  # noqa: E402
from batch_size_study import _common, _config, run_all  # noqa: E402
from gn_vs_baselines import parse_settings, warmup  # noqa: E402

# method -> learning rate (GN methods: the inner lr); the baselines' best lr at 64 micro-batches
# in the batch-size study (docs/train.md)
METHODS = {"gn": 0.01, "layerwise-gn": 0.01, "adamw": 3e-3, "muon": 3e-2}


@dataclass
class Settings(StudySettings):
    batches: tuple[int, ...] = (64,)
    outer_steps: int = 16
    checkpoint_every: int = 2
    target_loss: float = 2.2
    # spectra (sized to the CPU budget: see docs/along-training.md)
    spectra_every: int = 4  # analyze the checkpoints of steps that are multiples of this
    analysis_batches: int = 2  # micro-batches of micro_batch_size x seq_len tokens
    k: int = 3
    tol: float = 1e-5
    probes: int = 2
    slq_steps: int = 24
    spectra_dtype: str = "float64"
    # the Hessian's own top-k and shares (a second file per run): λ_max(H) for AdamW too (the
    # sharpness file has λ_max(P⁻¹H) there) and the gradient's share of H's top eigenspace
    hessian_pass: bool = True


QUICK = dict(warmup_steps=20, batches=(4,), outer_steps=4, checkpoint_every=2, target_loss=3.0,
             eval_batches=2, spectra_every=2, analysis_batches=1, k=2, probes=1, slq_steps=8)
GPU = {**STUDY_GPU, "batches": (64,), "outer_steps": 40, "checkpoint_every": 5,
       "spectra_every": 5, "analysis_batches": 8, "k": 10, "tol": 1e-6, "probes": 8,
       "slq_steps": 80, "hessian_pass": True}


# the figures copied to the docs (--figures); all of them are in OUT/figures/{ggn,hessian}
DOC_FIGURES = {"ggn": ("lambda_max_full", "sharpness", "heterogeneity", "gradient_share_full",
                       "step_share_full", "block_lambda_max"),
               "hessian": ("lambda_max_full", "gradient_share_full", "step_share_full")}


def run_folder(out: Path, method: str, lr: float) -> Path:
    return out / "runs" / f"{method}-lr{lr:g}"


def training(s: Settings, out: Path, workers: int) -> list[dict]:
    """The warm-up, then the four runs (``workers`` at once); their metrics rows."""
    warm = warmup(s, out, _common(s))
    M = s.batches[0]
    jobs = []
    for method, lr in METHODS.items():
        # _train_one resumes a folder that holds a run and reads a finished one back
        cfg = _config(s, warm, run_folder(out, method, lr), method, lr, M).replace(
            checkpoint_every=s.checkpoint_every)
        jobs.append((cfg, {"method": method, "lr": lr, "batches": M, "seed": 0}))
    return run_all(jobs, workers)


def _checkpoints(folder: Path, every: int) -> list[str]:
    """The run's ``step_*.pt`` at multiples of ``every`` (step order)."""
    found = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem[5:]))
    return [str(p) for p in found if int(p.stem[5:]) % every == 0]


def _spectra_one(job: dict) -> dict:
    """One step-axis file (``curvlab.spectra_along``), in a worker process; resumes."""
    import torch

    import curvlab

    torch.set_num_threads(1)
    t, cpu = time.perf_counter(), cpu_seconds()
    out = Path(job.pop("out"))
    curvlab.spectra_along(job.pop("checkpoints"), out, resume=out.exists(), **job)
    wall, used = time.perf_counter() - t, cpu_seconds() - cpu
    print(f"spectra: {out.name} ({wall:.0f} s, {used:.0f} s CPU)", flush=True)
    return {"file": str(out), "wall_s": round(wall, 1), "cpu_s": round(used, 1)}


def spectra(s: Settings, out: Path, workers: int) -> list[dict]:
    """Per run two step-axis files on the same analysis batches (``analysis_batches``
    micro-batches of the training data, seed 0), ``spectra_dtype``:

    - ``<run>-ggn.h5``: the GGN on the layer partition, the whole operator and every block
      (top ``k``, SLQ densities, per-block top eigenvalue/trace and Jensen-Shannon distances:
      ``heterogeneity``), the gradient's and the step's share of each top-``k`` eigenspace, and
      the sharpness (AdamW: ``λ_max(P⁻¹H)``, others ``λ_max(H)``) beside its threshold;
    - ``<run>-hessian.h5`` (``hessian_pass``): the Hessian's top ``k`` and the gradient/step
      shares of its top-``k`` eigenspace.
    """
    common = dict(blocks="layer", k=s.k, tol=s.tol, seed=0, dtype=s.spectra_dtype,
                  device=s.device, data={"batches": s.analysis_batches})
    jobs = []
    for method, lr in METHODS.items():
        name = run_folder(out, method, lr).name
        cks = _checkpoints(run_folder(out, method, lr), s.spectra_every)
        jobs.append({"out": str(out / "spectra" / f"{name}-ggn.h5"), "checkpoints": cks,
                     "kind": "ggn", "full": True, "density": True, "probes": s.probes,
                     "steps": s.slq_steps, "heterogeneity": True, "gradient_share": True,
                     "sharpness": True, **common})
    for method, lr in METHODS.items() if s.hessian_pass else ():
        name = run_folder(out, method, lr).name
        cks = _checkpoints(run_folder(out, method, lr), s.spectra_every)
        jobs.append({"out": str(out / "spectra" / f"{name}-hessian.h5"), "checkpoints": cks,
                     "kind": "hessian", "block_names": (), "full": True,
                     "gradient_share": True, **{**common, "blocks": None}})
    (out / "spectra").mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        return [_spectra_one(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_spectra_one, jobs))


def _val_losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}


def _f(x: float, fmt: str = "{:.3g}") -> str:
    return "-" if x is None or not np.isfinite(x) else fmt.format(x)


def _series_at(path: Path, key: str, step: int) -> float:
    """``series[key]`` of a step-axis file at ``step`` (NaN: no file, step not done)."""
    from curvlab import read_trajectory

    if not path.exists():
        return float("nan")
    t = read_trajectory(path)
    hit = np.nonzero((t.steps == step) & t.complete)[0]
    return float(t.series[key][hit[0]]) if len(hit) and key in t.series else float("nan")


def report(s: Settings, out: Path, figures: Path | None = None) -> str:
    """``table.md`` and ``summary.json`` from the step-axis files; the figures (``curvlab
    plot`` of the files, overlaid per quantity) into ``out/figures`` (and ``figures``).
    λ_max(H): from the Hessian pass where it ran, else the sharpness file's λ_max(H) (every
    method but AdamW, whose sharpness is λ_max(P⁻¹H))."""
    from curvlab import read_trajectory
    from curvlab.plot import render_along

    tokens = s.analysis_batches * s.micro_batch_size * s.seq_len
    lines = [f"preset {s.preset}, {s.batches[0]} micro-batches of {s.micro_batch_size}x"
             f"{s.seq_len} tokens per outer step, {s.outer_steps} outer steps from one AdamW "
             f"warm-up; curvature of the mean token cross-entropy on {s.analysis_batches} "
             f"analysis micro-batches ({tokens:,} tokens), {s.spectra_dtype}; G = GGN, "
             f"H = Hessian; shares of the gradient g and of the step to the next analyzed "
             f"checkpoint in the top-{s.k} eigenspace of G; JS: Jensen-Shannon distance "
             "between the layer blocks' GGN densities (mean / max over pairs)", "",
             "| run | step | val loss | λ_max(G) | λ_max(H) | g share | step share | "
             "sharpness | threshold | sharpness / threshold | JS mean / max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for method, lr in METHODS.items():
        folder = run_folder(out, method, lr)
        g = read_trajectory(out / "spectra" / f"{folder.name}-ggn.h5")
        hess = out / "spectra" / f"{folder.name}-hessian.h5"
        val = _val_losses(folder)
        for i, step in enumerate(g.steps):
            if not g.complete[i]:
                continue
            sharp, th = g.series["sharpness"][i], g.series["sharpness_threshold"][i]
            kind = str(g.series["sharpness_kind"][i])
            lam_h = _series_at(hess, "lambda_max/full", int(step))
            if not np.isfinite(lam_h) and kind != "adam":
                lam_h = float(sharp)
            js = g.series["js_distance"][i]
            b = js.shape[0]
            off = js[~np.eye(b, dtype=bool)]
            row = {"method": method, "lr": lr, "step": int(step), "val_loss": val.get(int(step)),
                   "lambda_max_ggn": float(g.series["lambda_max/full"][i]),
                   "lambda_max_hessian": lam_h,
                   "gradient_share_ggn": float(g.series["gradient_share/full"][i]),
                   "step_share_ggn": float(g.series["step_share/full"][i]),
                   "gradient_share_hessian": _series_at(hess, "gradient_share/full", int(step)),
                   "sharpness": float(sharp), "sharpness_kind": kind,
                   "threshold": float(th), "lr_at_step": float(g.series["lr"][i]),
                   "block_lambda_max": g.series["block_lambda_max"][i].tolist(),
                   "block_trace": g.series["block_trace"][i].tolist(),
                   "blocks": g.block_names, "js": js.tolist(),
                   "mean_js": float(off.mean()), "max_js": float(off.max())}
            summary.append(row)
            label = {"adam": "λ(P⁻¹H)", "gd": "λ(H)", "none": "λ(H)"}.get(kind, kind)
            ratio = sharp / th if np.isfinite(th) else np.nan
            lines.append(
                f"| {method} | {step} | {_f(row['val_loss'], '{:.3f}')} | "
                f"{_f(row['lambda_max_ggn'])} | {_f(lam_h)} | "
                f"{_f(row['gradient_share_ggn'], '{:.2f}')} | "
                f"{_f(row['step_share_ggn'], '{:.3f}')} | {label} {_f(sharp)} | "
                f"{'38/η ' if kind == 'adam' else '2/η ' if kind == 'gd' else ''}{_f(th)} | "
                f"{_f(ratio, '{:.3f}')} | {row['mean_js']:.3f} / {row['max_js']:.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"settings": asdict(s), "rows": summary},
                                                 indent=1))
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    for kind in ("ggn", "hessian"):
        paths = [str(out / "spectra" / f"{run_folder(out, m, lr).name}-{kind}.h5")
                 for m, lr in METHODS.items()]
        if not all(Path(p).exists() for p in paths):
            continue
        for path in render_along(paths, str(figs / kind)):
            if figures is not None and Path(path).stem in DOC_FIGURES[kind]:
                figures.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, figures / f"along_{kind}_{Path(path).name}")
    return text


def cpu_seconds() -> float:
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--jobs", type=int, default=2, help="training runs at once (processes)")
        ap.add_argument("--train-only", action="store_true", help="stop after the training")
        ap.add_argument("--figures", default=None,
                        help="also copy the figures here (docs/figures for the docs)")

    args, s = parse_settings(__doc__, "runs/curvature_along_training", Settings, QUICK, GPU,
                             extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if not args.report_only:
        rows = training(s, out, args.jobs)
        (out / "training.json").write_text(json.dumps({"settings": asdict(s), "runs": rows},
                                                      indent=1))
        print(f"training: {time.perf_counter() - t:.0f} s wall, {cpu_seconds():.0f} s CPU "
              f"({os.cpu_count()} CPUs, --jobs {args.jobs})", flush=True)
    if args.train_only:
        return
    if not args.report_only:
        t2, c2 = time.perf_counter(), cpu_seconds()
        files = spectra(s, out, args.jobs)
        (out / "spectra.json").write_text(json.dumps(files, indent=1))
        print(f"spectra: {time.perf_counter() - t2:.0f} s wall, {cpu_seconds() - c2:.0f} s CPU",
              flush=True)
    print(report(s, out, Path(args.figures) if args.figures else None))
    print(f"total {time.perf_counter() - t:.0f} s wall, {cpu_seconds():.0f} s CPU "
          f"({os.cpu_count()} CPUs, --jobs {args.jobs}); wrote {out}")


if __name__ == "__main__":
    main()
