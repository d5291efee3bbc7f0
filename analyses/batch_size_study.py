"""Steps to a target loss vs tokens per step for every method (arXiv 2510.09378, Fig. 1 and the
critical-batch-size figure), tuned and seeded, with its cost; and the study's ablations.

    python analyses/batch_size_study.py [--out runs/batch_size_study] [--jobs 2] [--quick | --gpu]
                                        [--methods gn,muon,...]
    python analyses/batch_size_study.py --ablations [--out ...]   # schedules, line search on/off
    python analyses/batch_size_study.py --report-only [--target-loss X]

1. Warm-ups: AdamW from a fresh model, one per seed (model init and data seed ``seed``) ->
   ``warmup/final.pt`` (seed 0), ``warmup-seed{s}/final.pt``: the start of every run of that
   seed.
2. For every tokens-per-step setting (``batches``: micro-batches of ``micro_batch_size x
   seq_len`` tokens per outer step; inner steps for the GN methods, as many fresh micro-batches
   for their line search, gradient accumulation for the baselines), all with a global cosine to
   ``outer_steps`` outer steps:

   - **sweep** (the seeds of ``sweep_seeds``): AdamW, Muon and SOAP at every learning rate of
     ``lrs``, the GN methods at every inner learning rate of ``gn_lrs`` (Muon/AdamW inner
     solver);
   - **replicas** (the other seeds): every method at the learning rate the sweep chose for that
     setting (fewest steps to ``target_loss`` on the sweep seeds, ties: lower best loss);
   - **exact GN** (``gn-cg``, every seed and setting): GN whose inner solve is conjugate
     gradients on exact GGN products to ``cg_tol`` (at most ``cg_max_iter`` iterations), no
     inner learning rate; these runs stop at ``cg_stop_loss`` (their cost), the others run all
     ``outer_steps``. At ``damping = 0`` (the paper's GN) G is singular and ``cg_max_iter`` binds:
     a truncated-CG GN step;
   - **damped exact GN** (``gn-cg-damped``, the seeds of ``damped_seeds``, every setting): the
     same with ``damping = exact_damping`` and at most ``damped_cg_max_iter`` iterations: the
     step of the damped GN model ``(G + λI) Δ = −g`` to ``cg_tol`` where CG gets there within
     the limit (the report gives the largest residual).

   A run's seed sets its warm-up, its training micro-batches and its validation micro-batches.
3. Report (``table.md``, ``summary.json``): per setting and method the chosen learning rate,
   how often the chosen runs' line search took its smallest step, outer steps to the target as
   median and range over the seeds, the ratio to GN (per seed, median and range); the cost of
   reaching the target (solve and line-search tokens, gradient-equivalents, training seconds)
   and of each whole run (CPU seconds). Gradient-equivalents weigh the pass counts of the
   metrics rows (``passes_total``) by the cost of each pass kind in gradients, measured once in
   this process on the study's model and micro-batch (``benchmarks/pass_costs.py`` ->
   ``pass_costs.json``). Figures: ``steps_vs_batch.png`` (median and range),
   ``cost_curves.png`` (validation loss against outer steps, tokens read, gradient-equivalents
   and training seconds, every seed, one row per setting), ``gn_diagnostics.png``.

``--ablations`` (at ``ablation_batches`` micro-batches per step): GN and GN-prox with the global
cosine, constant + inner cosine and constant schedules, and with the line search off
(``use_line_search=False``); for GN also a line-search range of 10 and a third of the inner
learning rate (probes of why GN's line search takes its smallest step); ``ablations.md``,
``ablations.png``.

Every run lives in its own folder and resumes (``TrainConfig(resume=True)``); a finished run's row
(``row.json``, with the CPU seconds its process spent) is read back, not rerun. ``--jobs N`` runs
N training runs at once in separate processes (one thread each): on a 2-core machine ``--jobs 2``
halves the wall time. ``--methods`` restricts what runs now (the report shows every finished
run). The measured results are in docs/train.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from gn_vs_baselines import (  # noqa: E402
    CommonSettings,
    has_run,
    parse_settings,
    to_target,
    warmup,
)

from curvlab.train import TrainConfig, TrainingDivergedError, train  # noqa: E402

GN_METHODS = ("gn", "gn-prox", "layerwise-gn", "layerwise-gn-prox")
EXACT = "gn-cg"  # GN with the CG inner solver at λ = 0 (truncated at cg_max_iter iterations)
DAMPED = "gn-cg-damped"  # the same at λ = exact_damping, up to damped_cg_max_iter iterations
EXACTS = (EXACT, DAMPED)
BASELINES = ("adamw", "muon", "soap")


@dataclass
class Settings(CommonSettings):
    batches: tuple[int, ...] = (4, 16, 64)
    outer_steps: int = 30
    target_loss: float = 2.1
    # trimmed to fit the CPU budget: GN-prox and the layerwise methods are not rerun (their
    # one-seed numbers are in docs/train.md)
    gn_methods: tuple[str, ...] = ("gn",)
    gn_lrs: dict[str, list[float]] = field(default_factory=lambda: {
        "gn": [1e-3, 3e-3, 1e-2, 3e-2]})
    lrs: dict[str, list[float]] = field(default_factory=lambda: {
        "adamw": [1e-3, 3e-3, 1e-2], "muon": [3e-3, 1e-2, 3e-2, 1e-1],
        "soap": [1e-3, 3e-3, 1e-2, 3e-2]})
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seeds: tuple[int, ...] = (0,)
    # trimmed to fit the CPU budget: sweep points not run (method, setting, lr): the largest
    # inner lr at 16 and 64 (0.01 already overshoots there in the one-seed study) and the
    # baselines' point that was worst at 16 and 64 micro-batches in the one-seed study
    skip: tuple[tuple[str, int, float], ...] = (
        ("gn", 16, 3e-2), ("gn", 64, 3e-2), ("adamw", 64, 1e-3), ("muon", 64, 3e-3),
        ("soap", 64, 1e-3))
    # order of the runs (each phase after the previous one; a study stopped at a deadline
    # keeps the earlier phases): (1) the sweep and the exact-GN runs of the sweep seeds,
    # (2) replicas of these methods and exact-GN replicas at these settings, (3) the rest
    replicate_first: tuple[str, ...] = ("gn", "muon", "soap")
    exact_replica_batches: tuple[int, ...] = ()
    exact: bool = True
    cg_tol: float = 1e-6
    cg_max_iter: int = 10
    cg_stop_loss: float | None = 2.1  # the exact-GN runs stop at this validation loss
    # the damped exact GN row: λ, the CG iteration limit (docs/optim.md: cg_tol is reached in ~60
    # at λ = 0.1 at the warm-up; later steps need more), the seeds (trimmed to the CPU budget)
    exact_damping: float | None = 0.1
    damped_cg_max_iter: int = 100
    damped_seeds: tuple[int, ...] = (0,)
    ablation_batches: int = 16


QUICK = dict(warmup_steps=20, batches=(1, 2), outer_steps=4, target_loss=3.0,
             eval_batches=2, lrs={"adamw": [3e-3], "muon": [1e-2, 3e-2], "soap": [3e-3]},
             gn_lrs={"gn": [3e-3, 1e-2]}, seeds=(0, 1), cg_max_iter=3, cg_stop_loss=None,
             damped_cg_max_iter=5,
             skip=(), exact_replica_batches=(1,), ablation_batches=2)
GPU = dict(preset="45m", device="cuda", seq_len=512, micro_batch_size=16, warmup_steps=300,
           batches=(4, 16, 64), outer_steps=100, target_loss=1.6, eval_every=5,
           eval_batches=16, cg_max_iter=20, cg_stop_loss=1.6, skip=(),
           exact_replica_batches=(4, 16, 64), ablation_batches=64)


def _common(s: Settings) -> dict:
    return dict(seq_len=s.seq_len, micro_batch_size=s.micro_batch_size, device=s.device,
                eval_every=s.eval_every, eval_batches=s.eval_batches)


def _has_cg() -> bool:
    """Whether this curvlab's trainer has the CG inner solver."""
    return {"cg_tol", "cg_max_iter"} <= {f.name for f in dataclasses.fields(TrainConfig)}


def _config(s: Settings, warm: Path, out: Path, method: str, lr: float | None, batches: int,
            seed: int = 0, **changes) -> TrainConfig:
    if method in EXACTS:
        damped = method == DAMPED
        per_step = dict(optimizer="gn", inner_steps=batches, inner_optimizer="cg",
                        cg_tol=s.cg_tol, target_loss=s.cg_stop_loss,
                        cg_max_iter=s.damped_cg_max_iter if damped else s.cg_max_iter,
                        damping=s.exact_damping if damped else 0.0)
    elif method in GN_METHODS:
        per_step = dict(optimizer=method, inner_steps=batches, inner_lr=lr)
    else:
        per_step = dict(optimizer=method, lr=lr, grad_accum=batches)
    return TrainConfig(init=str(warm), resume=True, out=str(out), seed=seed,
                       max_steps=s.outer_steps, checkpoint_every=10, **per_step, **_common(s),
                       **changes)


def _cpu_seconds() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _train_one(job: tuple[dict, dict]) -> dict | None:
    """One training run (in a worker process under ``--jobs``); its row (also written to the
    run's ``row.json``; a finished run's is read back), or None if it diverged (a too-large
    learning rate is a result of a sweep, not an error)."""
    cfg_dict, meta = job
    if meta.pop("single_thread"):
        import torch

        torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(cfg_dict)
    done = Path(cfg.out) / "row.json"
    if done.exists():
        row = json.loads(done.read_text())
        return None if "diverged" in row else row
    cfg = cfg.replace(resume=has_run(Path(cfg.out)))
    t, cpu = time.perf_counter(), _cpu_seconds()
    try:
        r = train(cfg)
    except TrainingDivergedError as e:
        print(f"{meta['method']:<10} M={meta['batches']:<3} seed {meta['seed']} lr "
              f"{meta['lr']!s:<7} diverged: {e}", flush=True)
        done.write_text(json.dumps({**meta, "diverged": str(e),  # not rerun either
                                    "cpu_s": round(_cpu_seconds() - cpu, 1)}))
        return None
    rows = [h for h in r.history if h["val_loss"] is not None]
    grid = cfg.line_search_grid if cfg.is_gn and cfg.use_line_search else ()
    ls = [h.get("ls_step") for h in r.history[1:]]
    row = {**meta, "steps": r.step, "val_loss": r.val_loss,
           "best_val_loss": min(h["val_loss"] for h in rows),
           "tokens_per_step": r.tokens // max(r.step, 1), "wall_s": round(r.wall_time, 1),
           "cpu_s": round(_cpu_seconds() - cpu, 1),
           "curve": [(h["step"], h["tokens"], h["val_loss"]) for h in rows],
           "costs": [{"tokens_solve": h.get("tokens_solve"),
                      "tokens_line_search": h.get("tokens_line_search"),
                      "passes": h.get("passes_total"),
                      "train_s": (None if h.get("eval_time") is None
                                  else h["wall_time"] - h["eval_time"])} for h in rows],
           "ls_steps": ls, "ls_floor": (sum(a == min(grid) for a in ls if a is not None)
                                        if grid else None),
           "inner_decrease": [h.get("inner_decrease") for h in r.history[1:]],
           "cg_iterations": [h.get("cg_iterations") for h in r.history[1:]],
           "cg_residual": [h.get("cg_residual") for h in r.history[1:]]}
    done.write_text(json.dumps(row))
    print(f"{meta['method']:<10} M={meta['batches']:<3} seed {meta['seed']} lr "
          f"{meta['lr']!s:<7} best val {row['best_val_loss']:.4f} "
          f"({time.perf_counter() - t:.0f} s, {row['cpu_s']:.0f} s CPU)", flush=True)
    return row


def run_all(jobs: list[tuple[TrainConfig, dict]], workers: int) -> list[dict]:
    payload = [(cfg.to_dict(), {**meta, "single_thread": workers > 1}) for cfg, meta in jobs]
    if workers <= 1 or len(payload) <= 1:
        results = [_train_one(j) for j in payload]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(min(workers, len(payload)),
                                 mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_train_one, payload))
    return [r for r in results if r is not None]


def _cost(method: str, batches: int) -> int:
    """Relative cost of a run, to start the most expensive first (workers finish together)."""
    return batches * (100 if method == DAMPED else 20 if method == EXACT
                      else 4 if "layerwise" in method else 2 if method in GN_METHODS else 1)


def _job(s: Settings, warm: dict[int, Path], out: Path, method: str, lr: float | None,
         M: int, seed: int) -> tuple[TrainConfig, dict]:
    name = method if lr is None else f"{method}-lr{lr:g}"
    folder = out / "runs" / f"seed{seed}" / f"M{M}" / name
    return (_config(s, warm[seed], folder, method, lr, M, seed),
            {"method": method, "lr": lr, "batches": M, "seed": seed})


def _sweep(s: Settings) -> dict[str, list[float]]:
    return {**{m: s.gn_lrs.get(m, [s.inner_lr]) for m in s.gn_methods}, **s.lrs}


def chosen_lrs(s: Settings, results: list[dict]) -> dict[tuple[int, str], float]:
    """The learning rate per (setting, method) with the fewest steps to the target over the
    sweep seeds (median; ties: the lower median best validation loss)."""
    rows = to_target([r for r in results if r["seed"] in s.sweep_seeds], s.target_loss)
    groups: dict[tuple[int, str], dict[float, list[dict]]] = {}
    for r in rows:
        if r["method"] not in EXACTS:
            groups.setdefault((r["batches"], r["method"]), {}).setdefault(r["lr"], []).append(r)
    pick = {}
    for key, by_lr in groups.items():
        def score(lr: float, by_lr: dict[float, list[dict]] = by_lr) -> tuple[float, float]:
            runs = by_lr[lr]
            return (statistics.median(_steps(r) for r in runs),
                    statistics.median(r["best_val_loss"] for r in runs))
        pick[key] = min(by_lr, key=score)
    return pick


def _steps(r: dict) -> float:
    return r["steps_to_target"] if r["steps_to_target"] is not None else math.inf


def study(s: Settings, warm: dict[int, Path], out: Path, workers: int,
          methods: set[str] | None) -> list[dict]:
    """The runs in three phases (``Settings.replicate_first``): sweep and exact GN on the sweep
    seeds; the first replicas at the chosen learning rates; the rest."""
    def wanted(m: str) -> bool:
        return methods is None or m in methods

    def by_cost(jobs: list) -> list:
        return sorted(jobs, key=lambda j: -_cost(j[1]["method"], j[1]["batches"]))

    cg = s.exact and _has_cg()
    if s.exact and not cg:
        print("exact GN skipped: this curvlab has no inner_optimizer='cg'", flush=True)
    exact = cg and wanted(EXACT)
    skip = {(m, M, float(lr)) for m, M, lr in s.skip}
    first = [_job(s, warm, out, m, lr, M, seed) for seed in s.sweep_seeds for M in s.batches
             for m, lrs in _sweep(s).items() if wanted(m) for lr in lrs
             if (m, M, float(lr)) not in skip]
    if exact:
        first += [_job(s, warm, out, EXACT, None, M, seed) for seed in s.sweep_seeds
                  for M in s.batches]
    if cg and s.exact_damping is not None and wanted(DAMPED):
        first += [_job(s, warm, out, DAMPED, None, M, seed) for seed in s.damped_seeds
                  for M in s.batches]
    results = run_all(by_cost(first), workers)
    pick = chosen_lrs(s, results)
    replicas = [_job(s, warm, out, m, lr, M, seed) for (M, m), lr in pick.items()
                for seed in s.seeds if seed not in s.sweep_seeds]
    exacts = ([_job(s, warm, out, EXACT, None, M, seed) for seed in s.seeds
               if seed not in s.sweep_seeds for M in s.batches] if exact else [])
    second = [j for j in replicas if j[1]["method"] in s.replicate_first] + [
        j for j in exacts if j[1]["batches"] in s.exact_replica_batches]
    third = [j for j in replicas + exacts if j not in second]
    results += run_all(by_cost(second), workers)
    # the rest cheapest first: what a deadline cuts is the most expensive
    return results + run_all(by_cost(third)[::-1], workers)


def finished_rows(out: Path) -> list[dict]:
    """Every finished run's row under ``out/runs`` (diverged runs left out)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/*/row.json"))]
    return [r for r in rows if "diverged" not in r]


def pass_costs(s: Settings, out: Path) -> dict:
    """Cost of each pass kind in gradients on the study's model (``pass_costs.json``: measured
    once, then read back)."""
    path = out / "pass_costs.json"
    if not path.exists():
        import torch
        from pass_costs import measure

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the runs under --jobs
        try:
            path.write_text(json.dumps(measure(s.preset, s.micro_batch_size, s.seq_len,
                                               device=s.device), indent=1))
        finally:
            torch.set_num_threads(threads)
    return json.loads(path.read_text())


def _grad_equiv(passes: dict | None, ratios: dict[str, float]) -> float | None:
    if passes is None:
        return None
    from pass_costs import gradient_equivalents

    return gradient_equivalents(passes, ratios)


def _hit(r: dict) -> int | None:
    """Index in the curve of the first evaluation at or below the target."""
    return next((i for i, c in enumerate(r["curve"]) if c[0] == r["steps_to_target"]), None)


def _span(values: list[float], fmt: str = "{:g}") -> str:
    """``median [min-max]`` of values where inf means 'not reached' (``> steps``)."""
    def f(v: float) -> str:
        return "n/r" if math.isinf(v) else fmt.format(v)
    med = statistics.median(values)
    if len(values) == 1:
        return f(med)
    return f"{f(med)} [{f(min(values))}-{f(max(values))}]"


def report(s: Settings, results: list[dict], out: Path) -> str:
    rows = to_target(results, s.target_loss)
    ratios = pass_costs(s, out)["ratios"]
    pick = chosen_lrs(s, results)
    tokens = s.micro_batch_size * s.seq_len
    methods = [m for m in (*s.gn_methods, *EXACTS, *s.lrs) if any(r["method"] == m for r in rows)]
    # the chosen runs: per (setting, method) every seed at the chosen learning rate
    chosen: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        key = (r["batches"], r["method"])
        if r["method"] in EXACTS or pick.get(key) == r["lr"]:
            chosen.setdefault(key, []).append(r)
    for v in chosen.values():
        v.sort(key=lambda r: r["seed"])

    def gn_by_seed(M: int) -> dict[int, dict]:
        return {r["seed"]: r for r in chosen.get((M, "gn"), [])}

    head = (f"target validation loss {s.target_loss}; preset {s.preset}; micro-batches of "
            f"{s.micro_batch_size}x{s.seq_len} tokens; {s.outer_steps} outer steps; seeds "
            f"{', '.join(map(str, s.seeds))} (learning rates chosen on seed(s) "
            f"{', '.join(map(str, s.sweep_seeds))}); steps to target: median [min-max] over "
            "the seeds, n/r = not reached; ratio: per seed to GN at the same setting")
    lines = [head, "", "| method | " + " | ".join(
        f"{M} micro-batches ({M * tokens:,} tok/step)" for M in s.batches) + " |",
        "|---|" + "---|" * len(s.batches)]
    for m in methods:
        cells = []
        for M in s.batches:
            runs = chosen.get((M, m))
            if not runs:
                cells.append("-")
                continue
            steps = [_steps(r) for r in runs]
            gn = gn_by_seed(M)
            rat = [_steps(r) / _steps(gn[r["seed"]]) for r in runs
                   if r["seed"] in gn and math.isfinite(_steps(gn[r["seed"]]))
                   and math.isfinite(_steps(r))]
            text = f"{_span(steps)} (n={len(runs)})"
            if m != "gn" and rat and len(rat) == len(runs):
                text += f"; {_span(rat, '{:.2f}')}x GN"
            elif m != "gn" and gn:
                lo = [s.outer_steps / _steps(gn[r["seed"]]) for r in runs if r["seed"] in gn
                      and math.isinf(_steps(r)) and math.isfinite(_steps(gn[r["seed"]]))]
                if lo:
                    text += f"; > {min(lo):.1f}x GN where not reached"
            if m in EXACTS:
                its = [i for r in runs for i in r["cg_iterations"] if i is not None]
                res = [x for r in runs for x in r["cg_residual"] if x is not None]
                if its:
                    text += f"; CG its {statistics.median(its):g}, residual ≤ {max(res):.1e}"
            else:
                text += f"; lr {pick[(M, m)]:g}"
            if runs[0]["ls_floor"] is not None:
                n_ls = [sum(a is not None for a in r["ls_steps"]) for r in runs]
                floor = [r["ls_floor"] for r in runs]
                flag = " **at floor most steps**" if statistics.median(
                    [f / max(n, 1) for f, n in zip(floor, n_ls)]) > 0.5 else ""
                text += f"; floor {'/'.join(map(str, floor))} of {n_ls[0]}{flag}"
            text += f"; best {statistics.median(r['best_val_loss'] for r in runs):.3f}"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")

    lines += ["", "cost to the target (median over the seeds that reached it; GE = "
              "gradient-equivalents, passes weighted by the measured cost of each kind in "
              "gradients; seconds: training, evaluation excluded) and per whole run (CPU s, "
              "median)", "",
              "| method | setting | tokens solve / line search to target | GE to target | "
              "s to target | run: steps / GE / CPU s |", "|---|---|---|---|---|---|"]
    for m in methods:
        for M in s.batches:
            runs = chosen.get((M, m))
            if not runs:
                continue
            hits = [(r, _hit(r)) for r in runs]
            hits = [(r, i) for r, i in hits if i is not None]
            c = [r["costs"][i] for r, i in hits]
            if c and all(x["tokens_solve"] is not None for x in c):
                tok = (f"{statistics.median(x['tokens_solve'] for x in c):,.0f} / "
                       f"{statistics.median(x['tokens_line_search'] for x in c):,.0f}")
                ge = f"{statistics.median(_grad_equiv(x['passes'], ratios) for x in c):,.0f}"
                sec = f"{statistics.median(x['train_s'] for x in c):.1f}"
            else:
                tok = ge = sec = "n/r"
            whole = [_grad_equiv(r["costs"][-1]["passes"], ratios) for r in runs]
            whole_ge = (f"{statistics.median(whole):,.0f}" if None not in whole else "-")
            lines.append(
                f"| {m} | {M} | {tok} | {ge} | {sec} | "
                f"{statistics.median(r['steps'] for r in runs):g} / {whole_ge} / "
                f"{statistics.median(r['cpu_s'] for r in runs):.0f} |")
    lines += ["", "pass costs in gradients (" + pass_costs(s, out)["machine"] + "): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())]
    sweep = sorted({(r["batches"], r["method"], r["lr"]) for r in rows
                    if r["seed"] in s.sweep_seeds and r["method"] not in EXACTS},
                   key=lambda x: (x[0], x[1], x[2]))
    lines += ["", "sweep (seed(s) " + ", ".join(map(str, s.sweep_seeds)) +
              "): steps to target / best val loss per learning rate", ""]
    for M in s.batches:
        for m in (*s.gn_methods, *s.lrs):
            got = [(lr, [r for r in rows if (r["batches"], r["method"], r["lr"]) == (M, m, lr)
                         and r["seed"] in s.sweep_seeds]) for (MM, mm, lr) in sweep
                   if (MM, mm) == (M, m)]
            if got:
                lines.append(f"- M={M} {m}: " + "; ".join(
                    f"{lr:g}: {_span([_steps(r) for r in rs])} / "
                    f"{min(r['best_val_loss'] for r in rs):.3f}" for lr, rs in got))
    cpu = sum(r["cpu_s"] for r in results)
    lines += ["", f"CPU seconds of all {len(results)} runs: {cpu:,.0f}"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {"settings": asdict(s), "chosen_lrs": [[M, m, lr] for (M, m), lr in pick.items()],
         "runs": results}, indent=1))
    _plot(chosen, s, out, ratios)
    return text


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
                     {"method": method, "lr": lr, "batches": M, "seed": 0, "variant": name}))
    return jobs


def _style(m: str) -> dict:
    """One color per method in every figure (whatever subset a figure shows)."""
    order = (*GN_METHODS, *BASELINES, *EXACTS)
    gn = m in GN_METHODS or m in EXACTS
    return {"linestyle": "-" if gn else "--", "marker": "o" if gn else "s",
            "color": f"C{order.index(m)}" if m in order else None}


def _plot(chosen: dict[tuple[int, str], list[dict]], s: Settings, out: Path,
          ratios: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = s.micro_batch_size * s.seq_len
    methods = sorted({m for _, m in chosen}, key=lambda m: (*GN_METHODS, *EXACTS,
                                                            *BASELINES).index(m))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for j, m in enumerate(methods):
        pts = []
        shift = 2 ** (0.06 * (j - (len(methods) - 1) / 2))  # methods side by side, not on top
        for M in s.batches:
            steps = [_steps(r) for r in chosen.get((M, m), [])]
            if steps and math.isfinite(statistics.median(steps)):
                fin = [x for x in steps if math.isfinite(x)]
                pts.append((M * tokens * shift, statistics.median(steps), min(fin), max(steps)))
        if pts:
            x, med, lo, hi = zip(*pts)
            hi = [h if math.isfinite(h) else s.outer_steps for h in hi]
            ax.errorbar(x, med, yerr=[[a - b for a, b in zip(med, lo)],
                                      [b - a for a, b in zip(med, hi)]],
                        label=m, capsize=3, **_style(m))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("tokens per outer step")
    ax.set_ylabel(f"outer steps to val loss {s.target_loss}")
    ax.set_title(f"{s.preset}: median and range over seeds (missing: not reached)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "steps_vs_batch.png", dpi=120)
    plt.close(fig)

    # validation loss against steps, tokens read (solve + line search) and training seconds
    fig, axes = plt.subplots(len(s.batches), 4, figsize=(17, 3.3 * len(s.batches)),
                             squeeze=False)
    for row, M in zip(axes, s.batches):
        for m in methods:
            for i, r in enumerate(chosen.get((M, m), [])):
                ys = [c[2] for c in r["curve"]]
                xs = ([c[0] for c in r["curve"]],
                      [(x["tokens_solve"] or 0) + (x["tokens_line_search"] or 0)
                       for x in r["costs"]],
                      [_grad_equiv(x["passes"], ratios) or 0 for x in r["costs"]],
                      [x["train_s"] for x in r["costs"]])
                for ax, x in zip(row, xs):
                    if None in x:
                        continue
                    ax.plot(x, ys, color=_style(m)["color"], linestyle=_style(m)["linestyle"],
                            linewidth=1, alpha=0.8,
                            label=(m + ("" if m in EXACTS else
                                        f" (lr {pick_lr(chosen, M, m):g})")) if i == 0
                            else None)
        for ax, name in zip(row, ("outer step", "tokens read (solve + line search)",
                                  "gradient-equivalents (measured pass costs)",
                                  "training seconds (loaded 2-core VM)")):
            ax.axhline(s.target_loss, color="gray", linewidth=0.8, linestyle=":")
            ax.set_xlabel(name)
            ax.set_title(f"{M} micro-batches ({M * tokens:,} tokens) per step", fontsize=9)
        row[0].set_ylabel("validation loss")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cost_curves.png", dpi=110)
    plt.close(fig)

    top = max(s.batches)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in methods:
        if m not in GN_METHODS and m not in EXACTS:
            continue
        for i, r in enumerate(chosen.get((top, m), [])):
            xs = range(1, len(r["ls_steps"]) + 1)
            kw = dict(marker=".", color=_style(m)["color"], alpha=0.8,
                      label=m if i == 0 else None)
            a1.plot(xs, r["ls_steps"], **kw)
            if m in EXACTS:
                a2.plot(xs, [x if x is not None else math.nan for x in r["cg_residual"]], **kw)
            else:
                a2.plot(xs, r["inner_decrease"], **kw)
    a1.set_xlabel("outer step")
    a1.set_ylabel("line-search step size")
    a2.set_xlabel("outer step")
    a2.set_ylabel("L(θ) − m(Δ) (GN) / CG residual (CG)")
    a2.set_yscale("symlog", linthresh=1e-3)
    a2.axhline(0, color="gray", linewidth=0.8)
    a1.legend(fontsize=8)
    fig.suptitle(f"GN methods at {top * tokens:,} tokens per step (every seed)")
    fig.tight_layout()
    fig.savefig(out / "gn_diagnostics.png", dpi=120)
    plt.close(fig)


def pick_lr(chosen: dict[tuple[int, str], list[dict]], M: int, m: str) -> float:
    return chosen[(M, m)][0]["lr"]


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
        ap.add_argument("--methods", default=None,
                        help="comma-separated methods to run now (gn, gn-cg, adamw, ...); the "
                             "report shows every finished run")

    args, s = parse_settings(__doc__, "runs/batch_size_study", Settings, QUICK, GPU, extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    methods = None if args.methods is None else set(args.methods.split(","))
    known = {*GN_METHODS, *EXACTS, *BASELINES}
    if methods is not None and not methods <= known:
        sys.exit(f"error: unknown method(s) {', '.join(sorted(methods - known))}; valid: "
                 f"{', '.join(sorted(known))}")
    if args.report_only:
        results = (json.loads((out / "ablations.json").read_text())["runs"] if args.ablations
                   else finished_rows(out))
    elif args.ablations:
        warm = warmup(s, out, _common(s))
        results = run_all(ablation_jobs(s, warm, out), args.jobs)
    else:
        warm = _warmups(s, out, args.jobs)
        pass_costs(s, out)  # measured before the runs load the machine
        study(s, warm, out, args.jobs, methods)
        results = finished_rows(out)
    print((report_ablations if args.ablations else report)(s, results, out))
    import resource

    cpu = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"total {time.perf_counter() - t:.0f} s wall, {cpu:.0f} s CPU ({os.cpu_count()} CPUs, "
          f"--jobs {args.jobs}); wrote {out}")


def _warmup_one(job: tuple[dict, str, int]) -> str:
    sd, out, seed = job
    import torch

    torch.set_num_threads(1)
    s = Settings(**sd)
    return str(warmup(s, Path(out), _common(s), seed=seed))


def _warmups(s: Settings, out: Path, workers: int) -> dict[int, Path]:
    """One warm-up per seed (``warmup`` for seed 0, ``warmup-seed{s}`` for the others), in
    parallel under ``--jobs``."""
    todo = [seed for seed in s.seeds
            if not (out / ("warmup" if seed == 0 else f"warmup-seed{seed}") / "final.pt").exists()]
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        jobs = [(asdict(s), str(out), seed) for seed in todo]
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn")) as p:
            list(p.map(_warmup_one, jobs))
    return {seed: warmup(s, out, _common(s), seed=seed) for seed in s.seeds}


if __name__ == "__main__":
    main()
