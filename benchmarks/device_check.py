"""One prepared check of the whole toolkit on one GPU (or, smaller, on the CPU).

    python benchmarks/device_check.py OUT_DIR                              # CUDA, preset 45m
    python benchmarks/device_check.py OUT_DIR --device cpu --preset tiny   # CPU smoke run

Writes ``OUT_DIR/device_check.json`` and ``OUT_DIR/device_check.md`` after every case, so a run
stopped at any point leaves the results so far. On one H100/H200 it is sized for 8 minutes in all
(a 420 s budget plus start-up; ``benchmarks/device_check.sh`` kills it at 480 s). Parts, in
order, each with a share of the time budget (``--budget`` seconds in all; time a part does not
use passes to the next):

- ``verify``: the float64 self-checks of ``curvlab verify`` (:func:`curvlab.verify_operators`)
  on the preset, small blocks, on the device;
- ``products``: gradient, GGN (cached linearization and fresh), Hessian products at fp32, TF32
  and bf16 (``--precision``; TF32 only on CUDA: a no-op on CPU): time (median), ratio to the
  gradient of the same precision, peak ``torch.cuda.max_memory_allocated`` over the model and
  batch, relative error against the float64 product on the same batch;
- ``lanczos``: curvlab's top-10 GGN eigenvalues vs scipy ``eigsh`` over a curvlinops GGN operator
  (time, products, error against a tight float64 curvlab run); skipped with the reason if
  curvlinops is not installed;
- ``gpt2``: top-10 GGN eigenvalues of GPT-2 124M (``transformers.GPT2Config()``, random init,
  the real 50,257-token vocabulary; curvlab's GPT family in the same shape without
  transformers), 4x128 tokens, restarted Lanczos with a 21-vector basis, fp32 and bf16
  products: time, products, peak GPU memory, host peak RSS (on CPU: a one-layer GPT-2 shape
  of curvlab's GPT family);
- ``gn``: one GN inner gradient (:func:`curvlab.train.gn.inner_gradient`) vs one gradient, and
  one full outer GN step through ``curvlab.train.train(TrainConfig(optimizer="gn",
  max_steps=1))``;
- ``torchrun``: ``curvlab spectrum`` on 2 processes on the one device (gloo) equals 1 process;
- ``compile``: the products with ``compile`` (``--compile-backend``, default inductor on CUDA,
  none on CPU), last because a compilation cannot be stopped once started: a case starts only
  with enough of the budget left.

Self-checks (errors within stated bounds) are listed with their bounds; the exit status is 1 if
one fails, 0 otherwise (a part stopped at its budget is reported, not failed). Numbers are never
asserted: they are what the machine gave.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing curvlab
    sys.path.insert(0, str(REPO))

import curvlab  # noqa: E402
from curvlab.curvature.precision import precision_context  # noqa: E402

PARTS = ("verify", "products", "lanczos", "gpt2", "gn", "torchrun", "compile")
# compile last: one compilation can take minutes and cannot be stopped, so it gets what is left
SHARES = {"verify": 0.06, "products": 0.21, "lanczos": 0.17, "gpt2": 0.18, "gn": 0.10,
          "torchrun": 0.12, "compile": 0.16}
# relative error bounds of the self-checks against float64 on the same batch
BOUNDS = {"fp32": 1e-3, "tf32": 5e-2, "bf16": 2.5e-1}


class BudgetExceeded(Exception):
    """A part ran past its deadline (raised inside products and solver callbacks)."""


@dataclass(frozen=True)
class Sizes:
    """Batch shapes ``(sequences, tokens per sequence)`` and repeats per device kind."""

    products: tuple[int, int]
    lanczos: tuple[int, int]
    gn: tuple[int, int]
    inner_steps: int
    torchrun: tuple[int, int]
    verify: tuple[int, int]
    repeats: int
    compile_seconds: float  # time a compile case needs at least (else it is skipped)
    hessian_cache: bool | str  # "auto" (cached if it fits) or False
    verify_block_size: int  # small_blocks(max_size=...)
    k: int  # eigenvalues of the lanczos part
    gpt2: tuple[int, int] = (4, 128)  # the GPT-2 124M top-10 case (issue 20)
    gpt2_full: bool = True  # GPT-2 124M itself (else a one-layer GPT-2 shape, same vocabulary)


CUDA_SIZES = Sizes(products=(8, 1024), lanczos=(4, 512), gn=(8, 1024), inner_steps=8,
                   torchrun=(4, 128), verify=(1, 16), repeats=5, compile_seconds=60.0,
                   hessian_cache="auto", verify_block_size=256, k=10)
# the CPU smoke run: small enough for a test on a 2-core machine (the linearized Hessian and
# larger blocks are tested elsewhere)
CPU_SIZES = Sizes(products=(2, 16), lanczos=(2, 16), gn=(2, 16), inner_steps=2,
                  torchrun=(2, 16), verify=(1, 8), repeats=1, compile_seconds=20.0,
                  hessian_cache=False, verify_block_size=64, k=5, gpt2=(2, 16),
                  gpt2_full=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 on the CPU."""
    a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Report:
    """Results so far, written to ``out/device_check.{json,md}`` after every change."""

    def __init__(self, out: Path, meta: dict[str, Any], budget: float) -> None:
        self.out, self.meta, self.budget = out, meta, budget
        self.start = time.perf_counter()
        self.parts: dict[str, dict[str, Any]] = {}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    def part(self, name: str) -> dict[str, Any]:
        return self.parts.setdefault(name, {"status": "running", "seconds": 0.0, "rows": [],
                                            "checks": [], "notes": []})

    def row(self, part: str, **row: Any) -> None:
        self.part(part)["rows"].append(row)
        self.save()

    def check(self, part: str, name: str, value: float, bound: float) -> bool:
        ok = bool(math.isfinite(value) and value <= bound)
        self.part(part)["checks"].append({"name": name, "value": value, "bound": bound,
                                          "passed": ok})
        self.say(f"  check {name}: {value:.2e} (bound {bound:.2g}) {'ok' if ok else 'FAILED'}")
        self.save()
        return ok

    def note(self, part: str, text: str) -> None:
        self.part(part)["notes"].append(text)
        self.say(f"  note: {text}")
        self.save()

    def failed_checks(self) -> list[str]:
        """Failed self-checks and parts that raised (a part stopped at its budget is not)."""
        return ([f"{p}: {c['name']}" for p, d in self.parts.items() for c in d["checks"]
                 if not c["passed"]] +
                [f"{p}: {d['status']}" for p, d in self.parts.items()
                 if d["status"].startswith("failed")])

    def save(self) -> None:
        data = {"meta": self.meta, "budget_seconds": self.budget,
                "elapsed_seconds": round(self.elapsed(), 2), "parts": self.parts,
                "failed_checks": self.failed_checks()}
        for name, text in (("device_check.json", json.dumps(data, indent=1, default=str)),
                           ("device_check.md", self.markdown())):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# curvlab device check: {m['device_name']}", "",
                 f"curvlab {m['curvlab']}, torch {m['torch']}, CUDA {m['cuda']}, Python "
                 f"{m['python']}; preset `{m['preset']}` ({m['parameters']:,} parameters); "
                 f"{self.elapsed():.0f} s of a {self.budget:.0f} s budget.", ""]
        for name, d in self.parts.items():
            lines += [f"## {name}: {d['status']} ({d['seconds']:.1f} s)", ""]
            rows = d["rows"]
            if rows:
                keys = list(dict.fromkeys(k for r in rows for k in r))
                lines.append("| " + " | ".join(keys) + " |")
                lines.append("|" + "---|" * len(keys))
                for r in rows:
                    lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
                lines.append("")
            for c in d["checks"]:
                lines.append(f"- check `{c['name']}`: {c['value']:.2e} <= {c['bound']:.2g}: "
                             f"{'passed' if c['passed'] else '**FAILED**'}")
            for n in d["notes"]:
                lines.append(f"- {n}")
            lines.append("")
        return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.2e}"
    return str(v)


class Clock:
    """Deadlines of the parts: part ``i`` ends at the start plus the budget shares of parts
    ``0..i`` (time an early part does not use passes to the later ones)."""

    def __init__(self, report: Report, parts: list[str], budget: float) -> None:
        total = sum(SHARES[p] for p in parts)
        acc, self.ends = 0.0, {}
        for p in parts:
            acc += SHARES[p] / total
            self.ends[p] = report.start + acc * budget
        self.deadline = report.start + budget

    def left(self, part: str) -> float:
        return self.ends.get(part, self.deadline) - time.perf_counter()

    def guard(self, part: str) -> None:
        if time.perf_counter() > self.ends.get(part, self.deadline):
            raise BudgetExceeded(part)


class Bench:
    """The model, device and helpers shared by the parts."""

    def __init__(self, args: argparse.Namespace, report: Report, clock: Clock) -> None:
        self.args, self.report, self.clock = args, report, clock
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.sizes = CUDA_SIZES if self.cuda else CPU_SIZES
        self.repeats = args.repeats or self.sizes.repeats
        self.cfg = curvlab.preset(args.preset)
        self.model = curvlab.build_model(self.cfg, seed=0).to(self.device).eval()
        self.n = curvlab.models.num_parameters(self.model)
        self.products: ProductBench | None = None

    def batch(self, shape: tuple[int, int], index: int = 0) -> curvlab.Batch:
        b, t = shape
        t = min(t, self.cfg.seq_len)
        spec = curvlab.DataSpec(seq_len=t, batch_size=b, seed=0)
        return curvlab.BatchStream(spec).batch(index).to(self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any], part: str, warmup: int = 1) -> float:
        """Median seconds of ``fn`` over the repeats after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            self.clock.guard(part)
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    @contextmanager
    def peak(self) -> Iterator[dict[str, float | None]]:
        """``{"mib": peak allocated over the start}`` of the block (CUDA; None on CPU)."""
        out: dict[str, float | None] = {"mib": None}
        if self.cuda:
            self.sync()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        yield out
        if self.cuda:
            self.sync()
            out["mib"] = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def precisions(self) -> list[str]:
        return ["fp32", "tf32", "bf16"] if self.cuda else ["fp32", "bf16"]

    def compile_backend(self) -> str | None:
        b = self.args.compile_backend
        return None if b == "none" else b


def run_part(bench: Bench, name: str, fn: Callable[[Bench], None]) -> None:
    rep = bench.report
    d = rep.part(name)
    left = bench.clock.left(name)
    if left <= 0 and name in bench.clock.ends:
        d["status"] = "skipped: no time left in the budget"
        rep.say(f"{name}: skipped (no time left)")
        rep.save()
        return
    rep.say(f"{name}: start ({left:.0f} s of budget)")
    t = time.perf_counter()
    try:
        fn(bench)
        d["status"] = "done"
    except BudgetExceeded:
        d["status"] = "stopped at its time budget (partial)"
    except Skip as e:
        d["status"] = f"skipped: {e}"
    except Exception as e:  # a failing part is a result; the others still run
        first = str(e).splitlines()[0][:200] if str(e) else ""
        d["status"] = f"failed: {type(e).__name__}: {first}"
        d["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    d["seconds"] = round(time.perf_counter() - t, 2)
    rep.say(f"{name}: {d['status']} ({d['seconds']:.1f} s)")
    rep.save()
    if bench.cuda:
        torch.cuda.empty_cache()


class Skip(Exception):
    """The part cannot run here (reason in the message)."""


# -- verify -----------------------------------------------------------------------------------

def part_verify(bench: Bench) -> None:
    from curvlab.curvature.verify import small_blocks, verify_operators

    model64 = copy.deepcopy(bench.model).double()
    batch = bench.batch(bench.sizes.verify, index=3)
    blocks = small_blocks(model64, bench.sizes.verify_block_size)
    bench.report.note("verify", f"blocks {', '.join(blocks.names)} ({blocks.size} coordinates), "
                                f"{batch.num_tokens} tokens, float64")
    t = time.perf_counter()
    results = verify_operators(model64, batch, blocks, seed=0)
    bench.sync()
    for r in results:
        bench.report.row("verify", check=r.name, rel_error=r.error, tolerance=r.tolerance,
                         result="info" if r.informational else ("pass" if r.passed else "FAIL"))
        if not r.informational:
            bench.report.check("verify", r.name, r.error, r.tolerance)
    bench.report.note("verify", f"all checks in {time.perf_counter() - t:.1f} s")
    del model64


# -- products ---------------------------------------------------------------------------------

def _loss(model: torch.nn.Module, batch: curvlab.Batch) -> torch.Tensor:
    logits = model(batch.inputs)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1])
                                             if logits.dtype == torch.bfloat16 else
                                             logits.reshape(-1, logits.shape[-1]),
                                             batch.targets.reshape(-1))


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


class ProductBench:
    """The products part's batch, vector and float64 references (shared with ``compile``)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.batch = bench.batch(bench.sizes.products)
        gen = torch.Generator().manual_seed(0)
        self.v = torch.randn(bench.n, generator=gen).to(bench.device)
        model64 = copy.deepcopy(bench.model).double()
        model64.zero_grad(set_to_none=True)
        _loss(model64, self.batch).backward()
        v64 = self.v.double()
        self.refs = {"gradient": _flat_grad(model64).cpu()}
        self.refs["ggn"] = (curvlab.ggn(model64, self.batch, "param", cache=False) @ v64).cpu()
        self.refs["hessian"] = (curvlab.hessian(model64, self.batch, "param", cache=False)
                                @ v64).cpu()
        del model64
        if bench.cuda:
            torch.cuda.empty_cache()
        self.gradient_time: dict[str, float] = {}

    def case(self, part: str, name: str, precision: str,
             make: Callable[[], Callable[[], torch.Tensor]], ref: str,
             compile_backend: str | None = None) -> None:
        """Time ``make()()`` (first call: setup + first product), check it against float64. A
        case that raises is a row with its error and a failed check; the next case runs."""
        bench, rep = self.bench, self.bench.report
        bench.clock.guard(part)
        label = f"{name} {precision}{' compiled' if compile_backend else ''}"
        try:
            with bench.peak() as peak:
                t0 = time.perf_counter()
                run = make()
                first = run()  # setup (linearization, compilation) + first product
                bench.sync()
                setup = time.perf_counter() - t0
                seconds = bench.timed(run, part)
        except BudgetExceeded:
            raise
        except Exception as e:  # one path failing is a result; the other cases still run
            msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            rep.row(part, case=name, precision=precision, error=msg)
            rep.check(part, f"{label} runs", math.inf, 0.0)
            traceback.print_exc()
            return
        base = self.gradient_time.get(precision)
        err = rel(first, self.refs[ref])
        row = dict(case=name, precision=precision, ms=1e3 * seconds,
                   per_gradient=seconds / base if base else None,
                   first_call_s=setup, peak_mib=peak["mib"], rel_err_vs_fp64=err)
        if compile_backend:
            row["compile"] = compile_backend
        rep.row(part, **row)
        rep.say(f"  {name} {precision}: {1e3 * seconds:.2f} ms, error {err:.1e}")
        rep.check(part, f"{label} vs float64", err, BOUNDS[precision])

    def gradient(self, precision: str, train: bool = False) -> Callable[[], torch.Tensor]:
        model, batch, device = self.bench.model, self.batch, self.bench.device

        def run() -> torch.Tensor:
            model.train(train)
            model.zero_grad(set_to_none=True)
            with precision_context(precision, device):
                loss = _loss(model, batch)
            loss.backward()
            model.eval()
            return _flat_grad(model)
        return run

    def operator(self, kind: str, cache: Any, precision: str = "fp32",
                 compile: str | None = None) -> Callable[[], Callable[[], torch.Tensor]]:
        def make() -> Callable[[], torch.Tensor]:
            op = curvlab.curvature_operator(kind, self.bench.model, self.batch, "param",
                                            cache=cache, precision=precision,
                                            compile=compile or False)
            return lambda: op @ self.v
        return make


def _product_bench(bench: Bench) -> ProductBench:
    if getattr(bench, "products", None) is None:
        bench.products = ProductBench(bench)
        bench.report.say("  float64 references done")
    return bench.products


def part_products(bench: Bench) -> None:
    part, rep = "products", bench.report
    pb = _product_bench(bench)
    rep.note(part, f"batch {tuple(pb.batch.inputs.shape)} ({pb.batch.num_tokens:,} tokens), "
                   f"one random vector; median of {bench.repeats} after a warm-up; peak = max "
                   "allocated over model + batch during the case (CUDA)")
    if not bench.cuda:
        rep.note(part, "tf32 not run: a no-op on the CPU (it gives the fp32 numbers)")
    for precision in bench.precisions():
        bench.clock.guard(part)
        with bench.peak() as peak:
            g = pb.gradient(precision)()
            seconds = bench.timed(pb.gradient(precision), part)
        pb.gradient_time[precision] = seconds
        err = rel(g, pb.refs["gradient"])
        rep.row(part, case="gradient (math attention)", precision=precision, ms=1e3 * seconds,
                per_gradient=1.0, peak_mib=peak["mib"], rel_err_vs_fp64=err)
        rep.check(part, f"gradient {precision} vs float64", err, BOUNDS[precision])
        with bench.peak() as peak:
            seconds = bench.timed(pb.gradient(precision, train=True), part)
        rep.row(part, case="gradient (fused SDPA, train mode)", precision=precision,
                ms=1e3 * seconds, per_gradient=seconds / pb.gradient_time[precision],
                peak_mib=peak["mib"])
        hcache = bench.sizes.hessian_cache
        for name, kind, cache, ref in (("GGN, cached linearization", "ggn", True, "ggn"),
                                       ("GGN, fresh", "ggn", False, "ggn"),
                                       ("Hessian (cached if it fits)" if hcache else
                                        "Hessian, fresh", "hessian", hcache, "hessian")):
            pb.case(part, name, precision, pb.operator(kind, cache, precision), ref)
        bench.model.zero_grad(set_to_none=True)


def part_compile(bench: Bench) -> None:
    """The products of ``products`` with ``compile`` (fp32), smallest graphs first."""
    part, rep = "compile", bench.report
    backend = bench.compile_backend()
    if backend is None:
        raise Skip("--compile-backend none")
    pb = _product_bench(bench)
    if "fp32" not in pb.gradient_time:
        pb.gradient_time["fp32"] = bench.timed(pb.gradient("fp32"), part)
    rep.note(part, f"torch.compile(backend={backend!r}) of the product closures, fp32, batch "
                   f"{tuple(pb.batch.inputs.shape)}; first_call_s includes the compilation; a "
                   "case starts only with enough of the budget left, and cannot be stopped "
                   "once compiling")
    for name, kind, cache, ref in (("GGN, fresh", "ggn", False, "ggn"),
                                   ("Hessian, fresh", "hessian", False, "hessian"),
                                   ("GGN, cached linearization", "ggn", True, "ggn")):
        if bench.clock.left(part) < bench.sizes.compile_seconds:
            rep.note(part, f"compiled '{name}' not run: under {bench.sizes.compile_seconds:.0f} "
                           "s of the budget left")
            continue
        pb.case(part, name, "fp32", pb.operator(kind, cache, compile=backend), ref,
                compile_backend=backend)


# -- lanczos ----------------------------------------------------------------------------------

def part_lanczos(bench: Bench) -> None:
    from curvlab.curvature.model_fn import FlatLogits
    from curvlab.linalg import lanczos

    part, rep, k = "lanczos", bench.report, bench.args.k or bench.sizes.k
    model, batch = bench.model, bench.batch(bench.sizes.lanczos, index=1)
    rep.note(part, f"top-{k} GGN eigenvalues, batch {tuple(batch.inputs.shape)}, tolerance 1e-5 "
                   "(relative residual); error: max relative difference from a float64 curvlab "
                   "run to 1e-9")

    class Guarded:
        """``op`` with a product counter and the part's deadline."""

        def __init__(self, op: Any) -> None:
            self.op, self.products = op, 0
            self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

        def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
            bench.clock.guard(part)
            self.products += 1 if x.ndim == 1 else x.shape[1]
            return self.op @ x

    model64 = copy.deepcopy(model).double()
    t = time.perf_counter()
    ref = lanczos(Guarded(curvlab.ggn(model64, batch)), k=k, tol=1e-9, seed=1)
    ref_ev = ref.eigenvalues.double()
    del model64
    rep.row(part, method="curvlab lanczos, float64 (reference)", seconds=time.perf_counter() - t,
            products=ref.products, max_rel_err=0.0, converged=int(ref.converged.sum()))

    def err(ev: torch.Tensor) -> float:
        ev = torch.as_tensor(ev, dtype=torch.float64).sort(descending=True).values[:k]
        return float(((ev - ref_ev[:len(ev)]).abs() / ref_ev[:len(ev)].abs()).max())

    times = {}
    for precision in (["fp32", "tf32"] if bench.cuda else ["fp32"]):
        bench.clock.guard(part)
        with bench.peak() as peak:
            t = time.perf_counter()
            op = Guarded(curvlab.ggn(model, batch, precision=precision))
            res = lanczos(op, k=k, tol=1e-5, seed=0)
            bench.sync()
            times[precision] = time.perf_counter() - t
        e = err(res.eigenvalues)
        rep.row(part, method=f"curvlab lanczos, cached GGN, {precision}",
                seconds=times[precision], products=res.products, max_rel_err=e,
                converged=int(res.converged.sum()), peak_mib=peak["mib"])
        rep.check(part, f"curvlab top-{k} {precision} vs float64", e,
                  1e-3 if precision == "fp32" else BOUNDS[precision])
    try:
        import curvlinops
        from scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError as e:
        rep.row(part, method="scipy eigsh over curvlinops", seconds=None,
                products=None, max_rel_err=None, converged=f"skipped: {e}")
        return
    bench.clock.guard(part)
    import numpy as np

    with bench.peak() as peak:
        t = time.perf_counter()
        peer = curvlinops.GGNLinearOperator(
            FlatLogits(model), torch.nn.CrossEntropyLoss(), list(model.parameters()),
            [(batch.inputs, batch.targets.reshape(-1))], check_deterministic=False)
        count = {"n": 0}

        def mv(x: np.ndarray) -> np.ndarray:
            bench.clock.guard(part)
            count["n"] += 1
            y = peer @ torch.as_tensor(np.asarray(x).reshape(-1), dtype=torch.float32,
                                       device=bench.device)
            return y.detach().double().cpu().numpy()

        sp = LinearOperator((bench.n, bench.n), matvec=mv, dtype=np.float64)
        try:
            vals = eigsh(sp, k=k, which="LA", tol=1e-5, return_eigenvectors=False)
        except BudgetExceeded:
            seconds = time.perf_counter() - t
            rep.row(part, method="scipy eigsh over curvlinops (float32 products)",
                    seconds=seconds, products=count["n"], max_rel_err=None,
                    converged="stopped at the budget")
            rep.note(part, f"speed-up curvlab (fp32) vs scipy+curvlinops: more than "
                           f"{seconds / times['fp32']:.2f}x (eigsh stopped at the budget)")
            raise
        except Exception as e:  # the peer failing on this model is a result, not a crash
            rep.row(part, method="scipy eigsh over curvlinops (float32 products)",
                    seconds=time.perf_counter() - t, products=count["n"], max_rel_err=None,
                    converged=f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return
        bench.sync()
        seconds = time.perf_counter() - t
    e = err(torch.as_tensor(np.sort(vals)[::-1].copy()))
    rep.row(part, method="scipy eigsh over curvlinops (float32 products)", seconds=seconds,
            products=count["n"], max_rel_err=e, converged=k, peak_mib=peak["mib"])
    rep.check(part, f"eigsh top-{k} vs float64", e, 1e-3)
    rep.note(part, f"speed-up curvlab (fp32) vs scipy+curvlinops: {seconds / times['fp32']:.2f}x")


# -- gpt2 -------------------------------------------------------------------------------------

def _gpt2_model(full: bool, device: torch.device) -> tuple[torch.nn.Module, str]:
    """GPT-2 124M (``GPT2Config()`` defaults, random init) through ``transformers`` and
    curvlab's Hugging Face loader when transformers is installed, else curvlab's own GPT family
    in the same shape (learned positions, tied embeddings, biases, 50,257 tokens)."""
    shape = dict(n_layer=12, n_embd=768, n_head=12) if full else dict(n_layer=1, n_embd=32,
                                                                      n_head=2)
    try:
        if not full:  # the CPU smoke run: curvlab's own GPT (no save/load round trip)
            raise ImportError("smoke run")
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        cfg = curvlab.ModelConfig("gpt", 50257, 1024, shape["n_embd"], shape["n_layer"],
                                  shape["n_head"], 4 * shape["n_embd"], bias=True,
                                  tie_embeddings=True)
        return (curvlab.build_model(cfg, seed=0).to(device).eval(),
                f"curvlab gpt family in GPT-2's shape ({e})")
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="gpt2-"))
    GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(folder)
    model, _ = curvlab.load_model(str(folder), device=device, dtype=torch.float32)
    return model.eval(), "transformers GPT2LMHeadModel(GPT2Config()) via curvlab.load_model"


def part_gpt2(bench: Bench) -> None:
    """Top-10 GGN eigenvalues of GPT-2 124M (issue 20): restarted Lanczos (basis 21 on the
    device), fp32 and bf16 products, time, products, peak GPU memory and host peak RSS."""
    import resource

    from curvlab.linalg import default_basis_size, lanczos

    part, rep = "gpt2", bench.report
    k = 10 if bench.sizes.gpt2_full else 3
    model, how = _gpt2_model(bench.sizes.gpt2_full, bench.device)
    n = curvlab.models.num_parameters(model)
    b, t = bench.sizes.gpt2
    ids = torch.randint(0, 50257, (b, t + 1), generator=torch.Generator().manual_seed(0))
    batch = curvlab.Batch(ids[:, :-1], ids[:, 1:]).to(bench.device)
    size = default_basis_size(k)
    rep.note(part, f"{how}: {n:,} parameters, batch {b}x{t} random tokens, top-{k} GGN "
                   f"eigenvalues to 1e-4 (relative residual), basis {size} vectors on the "
                   "device (thick restart), cached linearization")

    class Guarded:
        def __init__(self, op: Any) -> None:
            self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device

        def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
            bench.clock.guard(part)
            return self.op @ x

    found = {}
    for precision in ["fp32", "bf16"]:
        bench.clock.guard(part)
        with bench.peak() as peak:
            t0 = time.perf_counter()
            op = Guarded(curvlab.ggn(model, batch, precision=precision))
            res = lanczos(op, k=k, tol=1e-4, seed=0, basis_size=size, return_vectors=False,
                          max_iter=200)
            bench.sync()
            seconds = time.perf_counter() - t0
        found[precision] = res.eigenvalues
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rep.row(part, case=f"GGN top-{k}, {precision}", seconds=seconds,
                products=res.products, restarts=res.restarts,
                converged=int(res.converged.sum()), lambda_1=float(res.eigenvalues[0]),
                peak_mib=peak["mib"], host_peak_rss_gib=round(rss, 2))
        del op, res
    e = float(((found["bf16"] - found["fp32"]).abs() / found["fp32"].abs()).max())
    rep.check(part, f"bf16 top-{k} vs fp32", e, BOUNDS["bf16"])


# -- gn ---------------------------------------------------------------------------------------

def part_gn(bench: Bench) -> None:
    from curvlab.curvature.model_fn import model_params
    from curvlab.train import TrainConfig
    from curvlab.train import train as run_training
    from curvlab.train.gn import inner_gradient

    part, rep, model = "gn", bench.report, bench.model
    batch = bench.batch(bench.sizes.gn, index=2)
    rep.note(part, f"micro-batch {tuple(batch.inputs.shape)}; inner gradient = one forward "
                   "carrying the tangent inside one VJP (curvlab.train.gn.inner_gradient)")
    theta = model_params(model)
    gen = torch.Generator().manual_seed(1)
    delta = {k: 1e-3 * torch.randn(p.shape, generator=gen).to(p) for k, p in theta.items()}
    zero = {k: torch.zeros_like(p) for k, p in theta.items()}
    takes_precision = "precision" in inspect.signature(inner_gradient).parameters

    def gradient(train: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            model.train(train)
            model.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            model.eval()
            return _flat_grad(model)
        return run

    g_math = bench.timed(gradient(False), part)
    g_sdpa = bench.timed(gradient(True), part)
    rep.row(part, case="gradient (math attention)", ms=1e3 * g_math, per_gradient=1.0)
    rep.row(part, case="gradient (fused SDPA, train mode)", ms=1e3 * g_sdpa,
            per_gradient=g_sdpa / g_math)
    reference = gradient(False)()
    # ∇m(0) = Jᵀ g_z = ∇L: the inner gradient at Δ = 0 is the loss gradient
    at_zero = inner_gradient(model, theta, zero, batch)
    got = torch.cat([at_zero.grad[k].reshape(-1) for k in theta])
    rep.check(part, "inner gradient at delta=0 vs autograd gradient", rel(got, reference), 1e-4)
    for precision in (bench.precisions() if takes_precision else ["fp32"]):
        kw = {"precision": precision} if takes_precision else {}
        try:
            seconds = bench.timed(
                lambda kw=kw: inner_gradient(model, theta, delta, batch, **kw), part)
        except BudgetExceeded:
            raise
        except Exception as e:  # one precision failing: a result; the others still run
            rep.row(part, case="GN inner gradient", precision=precision,
                    error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
            rep.check(part, f"GN inner gradient {precision} runs", math.inf, 0.0)
            continue
        rep.row(part, case="GN inner gradient", precision=precision, ms=1e3 * seconds,
                per_gradient=seconds / g_math, per_sdpa_gradient=seconds / g_sdpa)
    if not takes_precision:
        rep.note(part, "inner_gradient takes no precision: fp32 only")
    model.zero_grad(set_to_none=True)
    bench.clock.guard(part)
    b, t = bench.sizes.gn
    cfg = dict(optimizer="gn", preset=bench.args.preset, seq_len=min(t, bench.cfg.seq_len),
               micro_batch_size=b, inner_steps=bench.sizes.inner_steps, max_steps=1,
               eval_batches=1, eval_every=1, device=str(bench.device), seed=0)
    known = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in cfg.items() if k in known})
    runs = 2 if bench.cuda else 1  # the first one warms up the kernels
    for _ in range(runs):
        bench.clock.guard(part)
        result = run_training(config)
    row = result.history[-1]
    rep.row(part, case=f"full outer GN step ({config.inner_steps} inner steps + line search + "
                       "1 eval batch)", ms=1e3 * result.wall_time,
            per_gradient=result.wall_time / g_math, train_loss=row.get("train_loss"),
            step_size=row.get("ls_step"))
    rep.check(part, "outer GN step train loss is finite",
              0.0 if math.isfinite(float(row.get("train_loss", float("nan")))) else math.inf,
              0.0)


# -- torchrun ---------------------------------------------------------------------------------

def part_torchrun(bench: Bench) -> None:
    import h5py
    import numpy as np

    from curvlab.store.spectrum import read_spectra

    part, rep = "torchrun", bench.report
    b, t = bench.sizes.torchrun
    t = min(t, bench.cfg.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        spec = curvlab.DataSpec(seq_len=t, batch_size=b, seed=0)
        cpu_model = copy.deepcopy(bench.model).cpu()
        curvlab.save_checkpoint(ckpt, cpu_model, step=0,
                                optimizer={"name": "init", "hparams": {"seed": 0}},
                                data=spec.to_dict())
        del cpu_model
        common = ["spectrum", str(ckpt), "--k", "5", "--dtype", "float64", "--batch-size",
                  str(b), "--seq-len", str(t), "--device", str(bench.device)]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                  ""),
               "CURVLAB_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1",
               "CURVLAB_DIST_TIMEOUT": "60"}
        from curvlab.cli import cli

        def eigenvalues(path: Path) -> np.ndarray:
            with h5py.File(path) as f:
                return np.asarray(read_spectra(f)["ggn"]["full"]["eigenvalues"])

        start = time.perf_counter()  # one process: this one, through the CLI's own code
        cli.main(args=common + ["-o", str(Path(tmp) / "p1.h5")], standalone_mode=False)
        one = eigenvalues(Path(tmp) / "p1.h5")
        rep.row(part, processes="1 (in this process)", seconds=time.perf_counter() - start,
                top_eigenvalue=float(one[0]), eigenvalues=len(one))
        left = bench.clock.left(part)
        if left < 5:
            raise BudgetExceeded(part)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node=2", "-m", "curvlab"]
        start = time.perf_counter()
        try:
            p = subprocess.run(launch + common + ["-o", str(Path(tmp) / "p2.h5")],
                               capture_output=True, text=True, env=env, timeout=left, cwd=REPO)
        except subprocess.TimeoutExpired:
            raise BudgetExceeded(part) from None
        if p.returncode != 0:
            raise RuntimeError(f"torchrun: exit {p.returncode}: "
                               f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}")
        ev = eigenvalues(Path(tmp) / "p2.h5")
        rep.row(part, processes="2 (torchrun, gloo; with start-up)",
                seconds=time.perf_counter() - start, top_eigenvalue=float(ev[0]),
                eigenvalues=len(ev))
        diff = float(np.max(np.abs(ev - one) / np.abs(one)))
        rep.note(part, f"`curvlab spectrum --k 5 --dtype float64` on batch {b}x{t}, "
                       f"{bench.device}, gloo; wall time includes process start-up")
        rep.check(part, "2 processes vs 1 process, top-5 eigenvalues (float64)", diff, 1e-9)


# -- main -------------------------------------------------------------------------------------

def meta(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    cuda = bench.cuda
    return {
        "device": str(bench.device),
        "device_name": (torch.cuda.get_device_name(bench.device) if cuda else
                        f"CPU ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)"),
        "curvlab": curvlab.__version__, "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else "-", "python": platform.python_version(),
        "preset": args.preset, "parameters": bench.n, "model": bench.cfg.to_dict(),
        "cpu_count": os.cpu_count(), "repeats": bench.repeats,
        "compile_backend": args.compile_backend, "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="Folder for device_check.json and device_check.md.")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu.")
    ap.add_argument("--preset", default=None, help="Model preset [45m on CUDA, tiny on CPU].")
    ap.add_argument("--budget", type=float, default=None,
                    help="Seconds for all parts together [420 on CUDA, 100 on CPU].")
    ap.add_argument("--parts", default=",".join(PARTS), help="Comma-separated subset of "
                                                             + ", ".join(PARTS) + ".")
    ap.add_argument("--repeats", type=int, default=None, help="Timed repeats per case "
                                                              "[5 on CUDA, 1 on CPU].")
    ap.add_argument("--k", type=int, default=None,
                    help="Eigenvalues in the lanczos part [10 on CUDA, 5 on CPU].")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads [1 on CPU: on a shared machine 2 threads ran small "
                         "products 10-100x slower; unchanged on CUDA].")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compiled cases, or none "
                         "[inductor on CUDA, none on CPU].")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: CUDA is not available here; the CPU smoke run is "
              "--device cpu --preset tiny", file=sys.stderr)
        return 1
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        print(f"error: unknown part(s) {', '.join(bad) or repr(args.parts)}; valid: "
              f"{', '.join(PARTS)}", file=sys.stderr)
        return 1
    args.preset = args.preset or ("45m" if cuda else "tiny")
    args.budget = args.budget or (420.0 if cuda else 100.0)
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "none")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    report = Report(args.out, {}, args.budget)
    # a part that will not run leaves its share to the others
    timed_parts = [p for p in parts if p != "compile" or args.compile_backend != "none"]
    clock = Clock(report, timed_parts or parts, args.budget)
    bench = Bench(args, report, clock)
    report.meta = meta(args, bench)
    report.say(f"{report.meta['device_name']}, torch {torch.__version__}, preset {args.preset} "
               f"({bench.n:,} parameters), budget {args.budget:.0f} s, parts {', '.join(parts)}")
    report.save()
    table = {"verify": part_verify, "products": part_products, "lanczos": part_lanczos,
             "gpt2": part_gpt2, "gn": part_gn, "torchrun": part_torchrun,
             "compile": part_compile}
    for name in parts:
        run_part(bench, name, table[name])
    failed = report.failed_checks()
    report.say(f"wrote {args.out / 'device_check.json'} and {args.out / 'device_check.md'}; "
               f"{len(failed)} failed check(s){': ' + '; '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
