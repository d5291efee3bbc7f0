"""Data-parallel scaling: 1 process vs ``torchrun`` with N processes (gloo on CPU).

    python benchmarks/bench_distributed.py [--processes 2] [--preset tiny] [--batch-size 16]
                                           [--seq-len 64] [--repeats 5] [--device cpu]

Runs the same work on one process (in this process) and on ``--processes`` processes (this script
relaunched under ``torchrun``), each process with one thread, and prints a table: median seconds
per case, the speedup over one process and the parallel efficiency (speedup / N). Cases:

- ``ggn_matmat``: ``G V`` for 8 columns on a fixed batch (cached linearization, one
  all-reduce of ``[n, 8]``);
- ``ggn_fresh``: one ``G v`` on a new operator (the forward pass carrying tangents is redone);
- ``lanczos``: top-5 eigenvalues of the GGN (30 Lanczos products, replicated vectors);
- ``all_reduce``: one all-reduce of ``n`` float32 numbers (the communication of one product);
- ``train_adamw`` / ``train_gn``: one outer step of ``curvlab.train`` (AdamW with 4
  micro-batches through DDP; GN with 4 inner steps), from the second step on.

Every process computes on its ``B/N`` rows of each batch; the results are checked to equal the
single-process ones (the largest relative difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import curvlab
from curvlab import distributed
from curvlab.linalg import lanczos

CASES = ["ggn_matmat", "ggn_fresh", "lanczos", "all_reduce", "train_adamw", "train_gn"]


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and the value to compare)
    times = []
    for _ in range(repeats):
        distributed.barrier()
        start = time.perf_counter()
        fn()
        distributed.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(args) -> dict:
    torch.manual_seed(0)
    cfg = curvlab.preset(args.preset, seq_len=args.seq_len)
    model = curvlab.build_model(cfg, seed=0).to(args.device).eval()
    stream = curvlab.BatchStream(curvlab.DataSpec(seq_len=args.seq_len,
                                                  batch_size=args.batch_size))
    batch = stream.batch(0).shard().to(args.device)
    op = curvlab.ggn(model, batch, "layer")
    n = op.shape[0]
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(n, 8, generator=gen).to(args.device)
    results = {}
    results["ggn_matmat"] = timed(lambda: op.matmat(V), args.repeats)
    results["ggn_fresh"] = timed(
        lambda: curvlab.ggn(model, batch, "layer", cache=False) @ V[:, 0], args.repeats)
    results["lanczos"] = timed(
        lambda: lanczos(op, k=5, max_iter=30, tol=0.0, seed=0).eigenvalues, args.repeats)
    buf = torch.randn(n, generator=gen).to(args.device)
    results["all_reduce"] = timed(lambda: distributed.all_reduce_sum(buf) if
                                  distributed.active() else buf.clone(), args.repeats)
    for name, extra in (("train_adamw", dict(optimizer="adamw", grad_accum=4)),
                        ("train_gn", dict(optimizer="gn", inner_steps=4))):
        with tempfile.TemporaryDirectory() as local:
            tmp = distributed.broadcast_object(local)  # rank 0's folder: the same --out

            def step(max_steps, out=tmp, extra=extra):
                r = curvlab.train.train(curvlab.train.TrainConfig(
                    preset=args.preset, seq_len=args.seq_len, micro_batch_size=args.batch_size,
                    max_steps=max_steps, eval_every=1000, eval_batches=1, device=args.device,
                    out=out, resume=True, **extra))
                return r.history[-1]["train_loss"]

            step(1)  # the first step (and its checkpoint) is not timed
            times = []
            for s in range(2, 2 + args.repeats):
                distributed.barrier()
                start = time.perf_counter()
                loss = step(s)
                times.append(time.perf_counter() - start)
            results[name] = (statistics.median(times), loss)
    return {k: (t, v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else v)
            for k, (t, v) in results.items()} | {"n": n}


def rel_diff(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", curvlab.linalg.LinalgWarning)  # tol=0: fixed step count
    if distributed.launched():  # the N-process half
        distributed.init()
        res = measure(args)
        if distributed.is_main():
            Path(args.result).write_text(json.dumps(res))
        distributed.shutdown()
        return
    one = measure(args)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "n.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.processes}", __file__, *sys.argv[1:],
               "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env)
        many = json.loads(result.read_text())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, preset {args.preset}, n = {one['n']:,}, batch "
          f"{args.batch_size}x{args.seq_len}, 1 thread per process, {args.device}")
    print(f"| case | 1 process (s) | {args.processes} processes (s) | speedup | efficiency | "
          "max rel. diff |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        (t1, v1), (tn, vn) = one[case], many[case]
        if case == "all_reduce":  # nothing to compare with on one process
            print(f"| all_reduce of n floats | - | {tn:.4f} | - | - | - |")
            continue
        print(f"| {case} | {t1:.4f} | {tn:.4f} | {t1 / tn:.2f}x | "
              f"{t1 / tn / args.processes:.0%} | {rel_diff(vn, v1):.1e} |")


if __name__ == "__main__":
    main()
