"""Cost of Gauss-Newton training steps against gradient steps.

    python benchmarks/bench_train.py [--preset tiny] [--micro-batch-size 8] [--seq-len 64]
                                     [--inner-steps 4] [--repeats 7] [--device cpu]

Rows (each timed on the same micro-batch, float32, medians over ``--repeats`` runs taken
round-robin after one warm-up, so that load from other processes hits all rows alike):

- ``gradient``: forward + backward, as the baselines run it (fused attention);
- ``gradient (math attn)``: the same with the math attention kernel GN has to use;
- ``GN inner gradient``: ``Jᵀ(g_z + H_z JΔ)`` (a JVP inside a VJP, :func:`inner_gradient`);
- ``GN-prox inner gradient``: ``Jᵀ g_z(z + JΔ)``;
- ``AdamW update`` / ``Muon+AdamW update``: the optimizer step alone (clip + update); an inner
  step of GN is an inner gradient plus one such update, a baseline step a gradient plus one;
- ``full GN outer step`` / ``layerwise GN outer step``: ``--inner-steps`` inner steps (per block
  for layerwise) plus the 5-point line search.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import curvlab
from curvlab.curvature.model_fn import model_params
from curvlab.models import lm_loss
from curvlab.train import TrainConfig, build_optimizer, hidden_matrices, inner_gradient
from curvlab.train.loop import _GaussNewton


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = args.device
    model = curvlab.build_model(curvlab.preset(args.preset), seed=0).to(dev).train()
    spec = curvlab.DataSpec(seq_len=args.seq_len, batch_size=args.micro_batch_size)
    stream = curvlab.BatchStream(spec)
    batch = stream.batch(0).to(dev)
    hidden = hidden_matrices(model)
    params = dict(model.named_parameters())
    adamw = build_optimizer("adamw", params, hidden, lr=1e-4)

    def gradient(math: bool = False):
        def run():
            adamw.zero_grad(set_to_none=True)
            if math:
                with curvlab.math_attention():
                    lm_loss(model(batch.inputs), batch.targets).backward()
            else:
                lm_loss(model(batch.inputs), batch.targets).backward()
        return run

    theta = {k: v.clone() for k, v in model_params(model).items()}
    delta = {k: 1e-3 * torch.randn_like(v) for k, v in theta.items()}

    def inner(mode: str):
        return lambda: inner_gradient(model, theta, delta, batch, mode=mode)

    def update(name: str):
        point = {k: v.clone() for k, v in theta.items()}
        for p in point.values():
            p.grad = torch.randn_like(p)
        opt = build_optimizer(name, point, hidden, lr=1e-6)

        def run():
            torch.nn.utils.clip_grad_norm_(list(point.values()), 1.0)
            opt.step()
        return run

    def outer_step(optimizer: str):
        cfg = TrainConfig(optimizer=optimizer, inner_steps=args.inner_steps, inner_lr=1e-4,
                          micro_batch_size=args.micro_batch_size)
        gn = _GaussNewton(model, cfg, lambda i: stream.batch(i).to(dev))
        return lambda: gn.step(gn.gn.steps)  # the next outer step each call

    cases = {
        "gradient": gradient(),
        "gradient (math attn)": gradient(math=True),
        "GN inner gradient": inner("gn"),
        "GN-prox inner gradient": inner("prox"),
        "AdamW update": update("adamw"),
        "Muon+AdamW update": update("muon-adamw"),
        "full GN outer step": outer_step("gn"),
        "layerwise GN outer step": outer_step("layerwise-gn"),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for run in cases.values():
        run()
    for _ in range(args.repeats):
        for name, run in cases.items():
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = curvlab.models.num_parameters(model)
    blocks = len(curvlab.layer_partition(model))
    print(f"preset {args.preset} ({n:,} parameters, {blocks} layerwise blocks), micro-batch "
          f"{args.micro_batch_size}x{args.seq_len}, {args.inner_steps} inner steps, {dev}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    ref = {"GN inner gradient": "gradient", "GN-prox inner gradient": "gradient",
           "layerwise GN outer step": "full GN outer step"}
    print(f"{'case':<28}{'median ms':>12}{'min ms':>10}  ratio")
    for name, t in med.items():
        ratio = ""
        if name in ref:
            ratio = (f"{t / med[ref[name]]:.2f}x {ref[name]}"
                     + (f", {t / med['gradient (math attn)']:.2f}x math-attn gradient"
                        if "inner" in name else ""))
        print(f"{name:<28}{1e3 * t:>12.1f}{1e3 * min(times[name]):>10.1f}  {ratio}")


if __name__ == "__main__":
    main()
