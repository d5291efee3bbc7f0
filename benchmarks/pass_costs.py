"""Cost of each pass kind the trainer counts, in gradients (``passes`` in the metrics rows).

    python benchmarks/pass_costs.py [--preset tiny] [--micro-batch-size 8] [--seq-len 64]
                                    [--repeats 9] [--device cpu] [--out pass_costs.json]

One process, one micro-batch, float32, every kind timed round-robin after one warm-up (medians
over ``--repeats`` rounds, so that load from other processes hits all kinds alike), each
divided by the plain gradient's median:

- ``gradient``: forward + backward of the mean token cross-entropy, as a baseline step runs it
  per micro-batch (the fused attention kernel);
- ``loss``: the forward-only loss at given parameters (:func:`curvlab.train.mean_loss` with a
  parameter dict), what the GN line search runs per candidate and micro-batch;
- ``inner_gradient``: one linearized-model gradient ``Jᵀ(g_z + H_z JΔ)``
  (:func:`curvlab.train.inner_gradient`), what a first-order GN inner step runs per block;
- ``ggn_product``: one GGN product on one micro-batch without a cached linearization (a
  forward pass carrying the tangent inside one VJP: :func:`curvlab.ggn` with ``cache=False``),
  what a CG iteration of the trainer runs per micro-batch (``inner_optimizer="cg"``, whose
  operator is uncached by default);
- ``linearization``: the cached linearization of the logits on one micro-batch
  (``torch.func.linearize`` + stored VJP + logit-space curvature: preparing a
  :func:`curvlab.ggn` operator with ``cache=True``), counted where a solve caches;
- ``ggn_product_cached``: one product of that cached operator (the ``ggn_product`` of a
  solve whose ``passes`` count linearizations).

A step's gradient-equivalents are ``Σ_kind passes[kind] × ratio[kind]``, with
``ggn_product_cached`` for the products where linearizations were counted
(:func:`gradient_equivalents`; analyses/batch_size_study.py uses it). Optimizer updates
(Muon's Newton-Schulz, AdamW) are not counted: they are per step, not per micro-batch
(``benchmarks/bench_train.py`` times them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import curvlab
from curvlab.curvature.model_fn import model_params
from curvlab.models import lm_loss
from curvlab.train import inner_gradient, mean_loss

KINDS = ("gradient", "loss", "inner_gradient", "ggn_product", "linearization",
         "ggn_product_cached")


def measure(preset: str = "tiny", micro_batch_size: int = 8, seq_len: int = 64,
            repeats: int = 9, device: str = "cpu", seed: int = 0) -> dict:
    """Median seconds of each pass kind on one micro-batch and its ratio to ``gradient``;
    a JSON-ready dict (``ratios``, ``median_s``, ``machine``)."""
    torch.manual_seed(seed)
    model = curvlab.build_model(curvlab.preset(preset), seed=seed).to(device).train()
    spec = curvlab.DataSpec(seq_len=seq_len, batch_size=micro_batch_size, seed=seed)
    batch = curvlab.BatchStream(spec).batch(0).to(device)
    theta = {k: v.detach().clone() for k, v in model_params(model).items()}
    delta = {k: 1e-3 * torch.randn_like(v) for k, v in theta.items()}
    trial = {k: theta[k] + delta[k] for k in theta}

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        lm_loss(model(batch.inputs), batch.targets).backward()

    def loss() -> None:
        mean_loss(model, trial, [batch])

    def inner() -> None:
        inner_gradient(model, theta, delta, batch, mode="gn")

    def operator():
        op = curvlab.ggn(model, batch, cache=True)
        op.engine.prepare()
        return op

    cached, fresh = operator(), curvlab.ggn(model, batch, cache=False)

    def product() -> None:
        fresh @ delta

    def cached_product() -> None:
        cached @ delta

    cases = {"gradient": gradient, "loss": loss, "inner_gradient": inner,
             "ggn_product": product, "linearization": operator,
             "ggn_product_cached": cached_product}
    times: dict[str, list[float]] = {k: [] for k in cases}
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for run in cases.values():
        run()
    for _ in range(repeats):
        for name, run in cases.items():
            sync()
            t = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ratios": {k: med[k] / med["gradient"] for k in KINDS},
        "median_s": med,
        "machine": (f"preset {preset} ({curvlab.models.num_parameters(model):,} parameters), "
                    f"micro-batch {micro_batch_size}x{seq_len}, {device}, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
                    f"{platform.machine()}, {os.cpu_count()} CPUs, {repeats} rounds"),
    }


def gradient_equivalents(passes: dict[str, int], ratios: dict[str, float]) -> float:
    """``Σ passes[kind] × ratios[kind]``; products after a cached linearization (``passes``
    counts linearizations) at the cached product's ratio."""
    total = 0.0
    for kind, count in passes.items():
        if kind == "ggn_product" and passes.get("linearization"):
            kind = "ggn_product_cached"
        total += count * ratios[kind]
    return total


def table(result: dict) -> str:
    lines = [result["machine"], f"{'pass':<20}{'median ms':>11}  gradients",
             *(f"{k:<20}{1e3 * result['median_s'][k]:>11.2f}  {result['ratios'][k]:.2f}"
               for k in KINDS)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the result as JSON")
    args = ap.parse_args()
    r = measure(args.preset, args.micro_batch_size, args.seq_len, args.repeats, args.device)
    print(table(r))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
