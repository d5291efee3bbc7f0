"""Speed and memory of curvature products vs a gradient and vs curvlinops.

    python benchmarks/bench_operators.py [--preset small] [--batch-size 8] [--seq-len 128]
                                         [--device cpu] [--repeats 5]

Times are medians over ``--repeats`` after one warm-up, all measured side by side in one process
(float32, math attention everywhere so that the kernels are the same). Peak memory is measured
per case in a fresh subprocess (CPU: peak RSS growth over the loaded model and batch; CUDA:
``torch.cuda.max_memory_allocated`` growth).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import curvlab
from curvlab.curvature.model_fn import FlatLogits
from curvlab.curvature.operators import ggn, hessian
from curvlab.models import lm_loss

CASES = ["gradient", "ggn_fixed", "ggn_fresh", "hessian", "ggn_x32_batched", "ggn_x32_single",
         "curvlinops_ggn", "curvlinops_hessian"]


def setup(args):
    torch.manual_seed(0)
    cfg = curvlab.preset(args.preset, seq_len=args.seq_len)
    model = curvlab.build_model(cfg, seed=0).to(args.device).eval()
    stream = curvlab.BatchStream(curvlab.DataSpec(seq_len=args.seq_len,
                                                  batch_size=args.batch_size))
    batches = [b.to(args.device) for b in stream.batches(2)]
    n = curvlab.models.num_parameters(model)
    v = torch.randn(n, device=args.device)
    V = torch.randn(n, 32, device=args.device)
    return model, batches, v, V


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_case(name, model, batches, v, V, device):
    """A callable running the case once (after any one-off setup, which is not timed)."""
    batch = batches[0]
    if name == "gradient":
        def run():
            model.zero_grad(set_to_none=True)
            lm_loss(model(batch.inputs), batch.targets).backward()
        return run
    if name == "ggn_fixed":
        op = ggn(model, batch, cache=True)
        op @ v  # builds the cached linearization (setup, not timed)
        return lambda: op @ v
    if name == "ggn_fresh":
        return lambda: ggn(model, batch, cache=False) @ v
    if name == "hessian":
        op = hessian(model, batch)
        return lambda: op @ v
    if name == "ggn_x32_batched":
        op = ggn(model, batch, cache=True)
        op @ v
        return lambda: op.matmat(V, chunk_size=32)
    if name == "ggn_x32_single":
        op = ggn(model, batch, cache=True)
        op @ v
        return lambda: [op @ V[:, i] for i in range(V.shape[1])]
    if name.startswith("curvlinops"):
        import curvlinops


        cls = curvlinops.GGNLinearOperator if name == "curvlinops_ggn" else \
            curvlinops.HessianLinearOperator
        op = cls(FlatLogits(model), nn.CrossEntropyLoss(), list(model.parameters()),
                 [(batch.inputs, batch.targets.reshape(-1))], check_deterministic=False)
        return lambda: op @ v
    raise ValueError(name)


def time_case(run, device, repeats):
    run()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_case(args):
    model, batches, v, V = setup(args)
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = make_case(args.case, model, batches, v, V, device)
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    if args.case:
        return memory_case(args)
    torch.set_num_threads(torch.get_num_threads())
    model, batches, v, V = setup(args)
    rows = {}
    for name in CASES:
        try:
            rows[name] = {"time": time_case(make_case(name, model, batches, v, V, args.device),
                                            args.device, args.repeats)}
        except Exception as e:  # a peer failing on this model is a result, not a crash
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"}
        if not args.no_memory and "time" in rows[name]:
            out = subprocess.run([sys.executable, __file__, "--case", name, "--preset",
                                  args.preset, "--batch-size", str(args.batch_size), "--seq-len",
                                  str(args.seq_len), "--device", args.device],
                                 capture_output=True, text=True)
            try:
                rows[name]["peak"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
            except (IndexError, json.JSONDecodeError):
                rows[name]["peak"] = None
    g = rows["gradient"]["time"]
    threads = torch.get_num_threads()
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"{platform.processor() or platform.machine()}, {threads} threads")
    print(f"# curvlab {curvlab.__version__}, torch {torch.__version__}, {device}")
    print(f"# preset {args.preset} ({curvlab.models.num_parameters(model):,} parameters), "
          f"batch {args.batch_size}x{args.seq_len} tokens, float32, median of {args.repeats}")
    print("| case | time (ms) | / gradient | peak memory (MiB) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | fails: {r['error']} | | |")
            continue
        peak = "" if r.get("peak") is None else f"{r['peak'] / 2**20:.0f}"
        print(f"| {name} | {1e3 * r['time']:.1f} | {r['time'] / g:.2f} | {peak} |")
    if "time" in rows.get("curvlinops_ggn", {}):
        print(f"\nggn_fixed / curvlinops_ggn = "
              f"{rows['ggn_fixed']['time'] / rows['curvlinops_ggn']['time']:.2f}")
    print(f"ggn_x32_batched / ggn_x32_single = "
          f"{rows['ggn_x32_batched']['time'] / rows['ggn_x32_single']['time']:.2f}")


if __name__ == "__main__":
    main()
