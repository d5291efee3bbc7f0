"""Top-k GGN eigenvalues: curvlab's Lanczos vs scipy's eigsh over a curvlinops operator.

    python benchmarks/bench_lanczos.py [--preset tiny] [--batch-size 8] [--seq-len 64] [--k 10]

Both run in this process on the same model and batch (float32 products). Accuracy target: 1e-4
relative on the top-k eigenvalues, checked against a tight-tolerance curvlab run (1e-10).
Reported: time, operator products, peak RSS growth (CPU) or peak allocated memory (CUDA).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch
from torch import nn

import curvlab
from curvlab.curvature.model_fn import FlatLogits
from curvlab.linalg import lanczos


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = curvlab.preset(args.preset, seq_len=args.seq_len)
    model = curvlab.build_model(cfg, seed=0).to(args.device).eval()
    batch = curvlab.BatchStream(curvlab.DataSpec(seq_len=args.seq_len,
                                                 batch_size=args.batch_size)).batch(0)
    batch = batch.to(args.device)
    rows = []

    op = curvlab.ggn(model, batch)
    ref = lanczos(op, k=args.k, tol=1e-10, seed=1).eigenvalues.numpy()

    t0, m0 = time.perf_counter(), peak_rss()
    op = curvlab.ggn(model, batch)
    res = lanczos(op, k=args.k, tol=1e-5, seed=0, return_vectors=False)
    rows.append(("curvlab lanczos (cached GGN)", time.perf_counter() - t0, res.products,
                 peak_rss() - m0, res.eigenvalues.numpy()))

    import curvlinops
    from scipy.sparse.linalg import eigsh


    counter = {"n": 0}
    peer = curvlinops.GGNLinearOperator(FlatLogits(model), nn.CrossEntropyLoss(),
                                        list(model.parameters()),
                                        [(batch.inputs, batch.targets.reshape(-1))],
                                        check_deterministic=False)
    from scipy.sparse.linalg import LinearOperator

    def mv(x):
        counter["n"] += 1
        return np.asarray(peer @ torch.as_tensor(x, dtype=torch.float32,
                                                 device=args.device)).astype(np.float64)

    sp = LinearOperator(peer.shape, matvec=mv, dtype=np.float64)
    t0, m0 = time.perf_counter(), peak_rss()
    vals = eigsh(sp, k=args.k, which="LA", tol=1e-5, return_eigenvectors=False)
    rows.append(("scipy eigsh over curvlinops", time.perf_counter() - t0, counter["n"],
                 peak_rss() - m0, np.sort(vals)[::-1]))

    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"# curvlab {curvlab.__version__}, torch {torch.__version__}, {where}")
    print(f"# preset {args.preset} ({curvlab.models.num_parameters(model):,} parameters), "
          f"batch {args.batch_size}x{args.seq_len}, top-{args.k} GGN eigenvalues")
    print("| method | time (s) | products | peak memory growth (MiB) | max rel. error |")
    print("|---|---|---|---|---|")
    for name, sec, prods, mem, ev in rows:
        err = float(np.max(np.abs(ev - ref) / np.abs(ref)))
        print(f"| {name} | {sec:.2f} | {prods} | {mem / 2**20:.0f} | {err:.1e} |")
    print(f"\nspeed-up curvlab vs scipy+curvlinops: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
