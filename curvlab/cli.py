"""Command-line interface: thin click commands over the Python API.

Every command exits 0 on success. Errors caused by input print one line ``error: ...`` on
stderr and exit 1 (usage errors exit 2); ``curvlab --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import click

import curvlab
from curvlab import distributed
from curvlab.errors import CurvlabError
from curvlab.inputs import _param_checksum, data_provenance, load_analysis_inputs  # noqa: F401


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(curvlab.__version__, prog_name="curvlab")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
def cli(debug: bool) -> None:
    """curvlab: exact Hessian and Gauss-Newton curvature of transformer language models."""


@cli.command()
@click.option("--preset", "preset_name", default="tiny", show_default=True,
              help="Model preset: " + ", ".join(curvlab.models.PRESETS) + ".")
@click.option("--vocab-size", type=int, help="Override the preset's vocabulary size.")
@click.option("--seq-len", type=int, help="Override the preset's sequence length.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialization seed.")
@click.option("--data", "data_source", default="default", show_default=True,
              help="Data source recorded in the checkpoint (default corpus, text file, "
                   ".jsonl, .parquet, folder, .bin, .npy).")
@click.option("--tokenizer", default="auto", show_default=True,
              help="Tokenizer of the model, recorded in the checkpoint: auto (byte), byte, "
                   "or PATH (tokenizer folder or tokenizer.json).")
@click.option("--text-field", default=None, help="jsonl field / Parquet column of the text "
                                                 "[text].")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint file to write.")
def init(preset_name: str, vocab_size: int | None, seq_len: int | None, seed: int,
         data_source: str, tokenizer: str, text_field: str | None, out: str) -> None:
    """Build a freshly initialized model from a preset and save it as a checkpoint."""
    config = curvlab.preset(preset_name, vocab_size=vocab_size, seq_len=seq_len)
    spec = curvlab.DataSpec(source=data_source, seq_len=config.seq_len, seed=seed,
                            tokenizer=tokenizer, text_field=text_field or "text")
    spec = curvlab.data.bind_tokenizer(spec, vocab_size=config.vocab_size)
    curvlab.BatchStream(spec).check_vocab(config.vocab_size)
    model = curvlab.build_model(config, seed=seed)
    path = curvlab.save_checkpoint(
        out, model, step=0, optimizer={"name": "init", "hparams": {"seed": seed}},
        data=spec.to_dict(),
    )
    n = curvlab.models.num_parameters(model)
    click.echo(f"wrote {path} ({config.family} preset {preset_name}, {n:,} parameters)")


def _info_dict(path: str) -> dict[str, Any]:
    model, info = curvlab.load_model(path)
    part = curvlab.curvature.operators.default_partition(model)
    return {
        "path": info.path,
        "format": info.kind,
        "family": info.family,
        "config": info.model_dict(),
        "parameters": curvlab.models.num_parameters(model),
        "blocks": {
            "preset": part.preset,
            "names": part.names,
            "sizes": part.sizes,
            "params": {b.name: list(b.params) for b in part},
        },
        "step": info.step,
        "optimizer": info.optimizer,
        "metrics": info.metrics,
        "data": info.data,
        "curvlab_version": info.curvlab_version,
        "fidelity": _fidelity_dict(model),
    }


def _fidelity_dict(model) -> dict[str, Any] | None:
    fid = getattr(model, "curvlab_fidelity", None)
    if fid is None:
        return None
    return {"relative": fid.relative, "max_abs": fid.max_abs, "reference": fid.reference,
            "float64": fid.float64, "low_precision_ops": fid.low_precision_ops,
            "unrolled": list(fid.unrolled)}


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """Describe a checkpoint: model, parameter blocks, training step, metrics, data."""
    d = _info_dict(checkpoint)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    cfg = d["config"]
    click.echo(f"checkpoint  {d['path']}  ({d['format']} format)")
    if "d_model" in cfg:
        click.echo(f"model       {d['family']}: d_model={cfg['d_model']} "
                   f"layers={cfg['n_layers']} heads={cfg['n_heads']} d_ff={cfg['d_ff']} "
                   f"vocab={cfg['vocab_size']} seq_len={cfg['seq_len']}")
    else:
        click.echo(f"model       {d['family']} (Hugging Face), vocab={cfg.get('vocab_size')}")
    click.echo(f"parameters  {d['parameters']:,}")
    if d["fidelity"]:
        from curvlab.models.hf import FIDELITY_RTOL

        fid = d["fidelity"]
        click.echo(f"fidelity    logits {fid['relative']:.1e} relative to {fid['reference']} "
                   f"on the probe batch (refused above {FIDELITY_RTOL:.0e})")
    opt = d["optimizer"].get("name", "?") if d["optimizer"] else "?"
    click.echo(f"step        {d['step']}  (optimizer: {opt})")
    if d["metrics"]:
        metrics = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in d["metrics"].items())
        click.echo(f"metrics     {metrics}")
    if d["data"]:
        data = "  ".join(f"{k}={v}" for k, v in d["data"].items())
        click.echo(f"data        {data}")
    click.echo(f"blocks ({d['blocks']['preset']} partition):")
    width = max(len(n) for n in d["blocks"]["names"])
    for name, size in zip(d["blocks"]["names"], d["blocks"]["sizes"]):
        params = ", ".join(d["blocks"]["params"][name])
        if len(params) > 60:
            params = params[:57] + "..."
        click.echo(f"  {name:<{width}}  {size:>12,}  {params}")


def _float_list(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"1,0.71,0.5"`` -> ``(1.0, 0.71, 0.5)``; a clear error for anything else."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise curvlab.errors.ConfigError(
            f"{option} takes comma-separated numbers, got {text!r}") from None


@cli.command()
@click.option("--optimizer", required=True,
              help="adamw, muon, soap (baselines) or gn, gn-prox, layerwise-gn, "
                   "layerwise-gn-prox (Gauss-Newton).")
@click.option("--preset", "preset_name", default=None,
              help="Model preset for a fresh model (default tiny); with --init it must match.")
@click.option("--init", "init_path", type=click.Path(dir_okay=False), default=None,
              help="Start from this checkpoint (e.g. a shared AdamW warm-up).")
@click.option("--data", "data_source", default=None,
              help="Data source: 'default', a text file, .jsonl, .parquet, a folder of .txt, "
                   "a token file (.bin, .npy) or a train/val folder.")
@click.option("--tokenizer", default=None,
              help="Tokenizer of text data: auto (the --init checkpoint's, else byte), byte, "
                   "or PATH (a tokenizer folder or tokenizer.json) [auto].")
@click.option("--text-field", default=None,
              help="jsonl field / Parquet column holding the text [text].")
@click.option("--seq-len", type=int, default=None,
              help="Tokens per sequence (default: the --init checkpoint's data, else the "
                   "model's).")
@click.option("--micro-batch-size", type=int, default=None, help="Sequences per micro-batch [8].")
@click.option("--seed", type=int, default=None, help="Data (and fresh-model) seed [0].")
@click.option("--lr", type=float, default=None, help="Baselines: learning rate [1e-3].")
@click.option("--grad-accum", type=int, default=None,
              help="Baselines: micro-batches per step (large batches) [1].")
@click.option("--betas", default=None, help="Adam betas, e.g. 0.9,0.999.")
@click.option("--weight-decay", type=float, default=None,
              help="Decoupled weight decay on matrices [1e-3].")
@click.option("--grad-clip", type=float, default=None, help="Gradient norm clip, 0 = off [1].")
@click.option("--momentum", type=float, default=None, help="Muon (and sgd) momentum [0.95].")
@click.option("--precondition-frequency", type=int, default=None,
              help="SOAP: steps between eigenbasis updates [10].")
@click.option("--inner-optimizer", default=None,
              help="GN: adamw, muon-adamw (Muon on hidden matrices), sgd, or cg (the exact GN "
                   "step: conjugate gradients on GGN products; not with gn-prox) "
                   "[muon-adamw].")
@click.option("--cg-tol", type=float, default=None,
              help="GN with --inner-optimizer cg: relative residual ‖(G+λI)Δ+g‖/‖g‖ to stop "
                   "at, in (0, 1) [1e-6].")
@click.option("--cg-max-iter", type=int, default=None,
              help="GN with --inner-optimizer cg: CG iterations per block at most [100].")
@click.option("--cg-warm-start", type=click.Choice(["point", "direction"]), default=None,
              help="GN with --inner-optimizer cg and a warm start: start CG at the previous "
                   "solution's point, x0 = (1-α)Δ (the reference's rule for the inner "
                   "variables), or at the previous direction, x0 = Δ [point].")
@click.option("--inner-steps", type=int, default=None,
              help="GN: inner steps per outer step, one micro-batch each [16].")
@click.option("--inner-lr", type=float, default=None, help="GN: inner learning rate [0.01].")
@click.option("--warm-start/--no-warm-start", default=None,
              help="GN: start each inner solve from the previous one, keeping the inner "
                   "optimizer's state (cg: see --cg-warm-start) [on].")
@click.option("--line-search", "line_search_grid", default=None,
              help="GN: explicit step sizes tried along the direction, e.g. 1,0.5,0.25 "
                   "[1/sqrt(2)^i, i < --line-search-range].")
@click.option("--line-search-range", type=int, default=None,
              help="GN: number R of step sizes 1/sqrt(2)^i, i < R [5; layerwise 10].")
@click.option("--line-search-batches", type=int, default=None,
              help="GN: fresh micro-batches scoring each step size [--inner-steps].")
@click.option("--no-line-search", is_flag=True,
              help="GN: take the whole step (1), score nothing (the ablation).")
@click.option("--damping", type=float, default=None,
              help="GN: Levenberg-Marquardt damping λ of the inner problem [0].")
@click.option("--schedule", default=None,
              help="cosine (global), constant, constant+inner-cosine (GN) [cosine].")
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps [0].")
@click.option("--ema-decay", type=float, default=None,
              help="Evaluate an EMA of the iterates with this decay; 0 = off [0].")
@click.option("--max-steps", type=int, default=None, help="Outer steps [100].")
@click.option("--target-loss", type=float, default=None,
              help="Stop once the validation loss is at or below this.")
@click.option("--eval-every", type=int, default=None, help="Steps between evaluations [10].")
@click.option("--eval-batches", type=int, default=None,
              help="Validation micro-batches per evaluation [4].")
@click.option("--checkpoint-every", type=int, default=None,
              help="Write step_NNNNNN.pt every this many steps; 0 = only final.pt [0].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: step_NNNNNN.pt, final.pt, metrics.jsonl.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... [cpu].")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Training precision [float32].")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default=None,
              help="Arithmetic of the baselines' forward passes and the GN inner gradients: "
                   "fp32, tf32 (CUDA tensor cores; no-op on CPU), bf16 (autocast); tf32/bf16 "
                   "need --dtype float32 [fp32].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar.")
def train(optimizer, preset_name, init_path, data_source, seq_len, micro_batch_size, seed, lr,
          grad_accum, betas, weight_decay, grad_clip, momentum, precondition_frequency,
          inner_optimizer, inner_steps, inner_lr, warm_start, line_search_grid,
          line_search_range, line_search_batches, no_line_search, damping, schedule,
          warmup_steps, ema_decay, max_steps,
          target_loss, eval_every, eval_batches, checkpoint_every, out, resume, device, dtype,
          progress, tokenizer=None, text_field=None, precision=None, cg_tol=None,
          cg_max_iter=None, cg_warm_start=None) -> None:
    """Train with AdamW, Muon, SOAP or (layerwise) Gauss-Newton, writing checkpoints that the
    analysis commands read."""
    from curvlab.train import TrainConfig
    from curvlab.train import train as run_training

    given = dict(
        optimizer=optimizer, preset=preset_name, init=init_path, data=data_source,
        tokenizer=tokenizer, text_field=text_field,
        seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed, lr=lr,
        grad_accum=grad_accum, betas=_float_list(betas, "--betas"), weight_decay=weight_decay,
        grad_clip=grad_clip, momentum=momentum, precondition_frequency=precondition_frequency,
        inner_optimizer=inner_optimizer, inner_steps=inner_steps, inner_lr=inner_lr,
        warm_start=warm_start, line_search=_float_list(line_search_grid, "--line-search"),
        line_search_range=line_search_range, line_search_batches=line_search_batches,
        use_line_search=False if no_line_search else None, damping=damping, schedule=schedule,
        warmup_steps=warmup_steps, ema_decay=ema_decay, max_steps=max_steps,
        target_loss=target_loss, eval_every=eval_every, eval_batches=eval_batches,
        checkpoint_every=checkpoint_every, out=out, resume=resume, device=device, dtype=dtype,
        precision=precision, cg_tol=cg_tol, cg_max_iter=cg_max_iter,
        cg_warm_start=cg_warm_start,
    )
    config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    # under torchrun every process trains on its rows of each micro-batch; rank 0 writes
    result = run_training(config, progress=progress)
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
    click.echo(f"{config.optimizer}: {result.step} steps, {result.tokens:,} tokens, "
               f"val loss {val}, {result.wall_time:.1f} s{_processes()}")
    if config.target_loss is not None:
        if result.steps_to_target is None:
            click.echo(f"target {config.target_loss} not reached")
        else:
            click.echo(f"target {config.target_loss} reached at step {result.steps_to_target} "
                       f"({result.tokens_to_target:,} tokens)")
    click.echo(f"wrote {result.checkpoint} and {out}/metrics.jsonl")


DTYPES = {"float32": "float32", "float64": "float64"}


def data_options(f):
    """The data options shared by the analysis commands (defaults from the checkpoint)."""
    options = [
        click.option("--data", "data_source", default=None,
                     help="Data source: 'default', a text file, .jsonl, .parquet, a folder of "
                          ".txt, a token file (.bin, .npy) or a train/val folder (default: the "
                          "checkpoint's)."),
        click.option("--tokenizer", default=None,
                     help="Tokenizer of text sources: auto (the model's: a Hugging Face "
                          "folder's own, a checkpoint's recorded one), byte, or PATH (a "
                          "tokenizer folder or tokenizer.json) [auto]."),
        click.option("--text-field", default=None,
                     help="jsonl field / Parquet column holding the text [text]."),
        click.option("--batch-size", type=int, default=None,
                     help="Sequences per batch (default: the checkpoint's, else 8)."),
        click.option("--seq-len", type=int, default=None,
                     help="Tokens per sequence (default: the checkpoint's, else the model's)."),
        click.option("--batches", "num_batches", type=int, default=1, show_default=True,
                     help="Number of batches the curvature is averaged over."),
        click.option("--seed", type=int, default=None, help="Data seed (default: the "
                                                            "checkpoint's, else 0)."),
        click.option("--windows", type=click.Choice(["random", "contiguous"]), default=None,
                     help="Random windows (seeded) or contiguous windows of the token stream."),
        click.option("--split", type=click.Choice(["train", "val", "all"]), default="train",
                     show_default=True,
                     help="Which data split the batches come from (all: the whole source, "
                          "e.g. a held-out file)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def product_options(f):
    """``--precision`` and ``--compile`` of the curvature products (see docs/curvature.md)."""
    f = click.option("--compile", "compile_products", is_flag=True,
                     help="torch.compile the product closures (eager, after a one-line "
                          "warning, where that fails).")(f)
    return click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]),
                        default="fp32", show_default=True,
                        help="Arithmetic of the products: fp32 (IEEE), tf32 (CUDA tensor "
                             "cores; no-op on CPU) or bf16 (autocast); tf32/bf16 need "
                             "float32. Lanczos/CG stay in float32/float64.")(f)


def _check_precision(precision: str, dtype: str) -> None:
    """Refuse ``--precision tf32|bf16`` with ``--dtype float64`` before any work."""
    import torch

    from curvlab.curvature.precision import check_precision

    try:
        check_precision(precision, {"float32": torch.float32, "float64": torch.float64}[dtype])
    except curvlab.errors.ConfigError:
        raise curvlab.errors.ConfigError(
            f"--precision {precision} needs --dtype float32 (TF32 and bfloat16 autocast leave "
            f"float64 untouched), got --dtype {dtype}") from None


@cli.command()
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--blocks", "block_specs", multiple=True,
              help="Blocks to check (preset or globs/slices; default: a few small blocks).")
@data_options
def verify(checkpoint, block_specs, data_source, batch_size, seq_len, num_batches, seed,
           windows, split, tokenizer, text_field) -> None:
    """Check the curvature operators against double backward, finite differences and an
    explicit Jacobian, in float64. Without CHECKPOINT: on tiny LLaMA and GPT models."""
    from curvlab.curvature.blocks import partition
    from curvlab.curvature.verify import small_blocks, verify_operators

    cases = []
    if checkpoint is None:
        spec = curvlab.DataSpec(seq_len=seq_len or 16, batch_size=batch_size or 2,
                                seed=seed or 0, windows=windows or "random")
        for name in ("tiny", "gpt-tiny"):
            cfg = curvlab.preset(name, seq_len=max(spec.seq_len, 16))
            model = curvlab.build_model(cfg, seed=0).eval()
            batches = curvlab.data.analysis_batches(spec, 1, cfg.vocab_size, split)
            cases.append((f"{name} (untrained, {cfg.family})", model, batches[0], None))
    else:
        model, info, spec, batches = load_analysis_inputs(
            checkpoint, data_source, batch_size or 1, seq_len or 16, 1, seed, windows, split,
            dtype="float64", tokenizer=tokenizer, text_field=text_field)
        for note in info.notes:
            click.echo(f"note: {note}")
        stock = None
        if info.kind == "huggingface":
            from curvlab.models.hf import load_stock

            stock = load_stock(checkpoint)
        cases.append((checkpoint, model, batches[0], stock))
    failed = 0
    for label, model, batch, stock in cases:
        blocks = (partition(model, list(block_specs)) if block_specs else small_blocks(model))
        click.echo(f"{label}: blocks {', '.join(blocks.names)} ({blocks.size} coordinates), "
                   f"{batch.num_tokens} tokens, float64")
        for r in verify_operators(model, batch, blocks, seed=seed or 0, stock=stock):
            status = "INFO" if r.informational else ("PASS" if r.passed else "FAIL")
            failed += not (r.passed or r.informational)
            click.echo(f"  {status}  {r.name:<46} rel. error {r.error:9.2e}  "
                       f"(tol {r.tolerance:.0e})")
            if r.informational and not r.passed:
                click.echo("        PyTorch's jacrev-based second derivatives are wrong on this "
                           "model (pytorch/functorch#534); curvlab does not use them")
    if failed:
        raise curvlab.errors.CurvlabError(f"{failed} check(s) failed")
    click.echo("all checks passed")


def _stored_norms(writer, kind: str, names) -> dict[tuple[str, str], float]:
    """``||C_rc||_F²`` of the complete blocks of ``kind`` in an open results file."""
    out = {}
    for r in names:
        for c in names:
            t = writer.find(kind, r, c)
            if t is not None and t.complete:
                out[(r, c)] = t.squared_norm()
    return out


def _processes() -> str:
    """`` (W processes)`` under torchrun, else nothing."""
    w = distributed.world_size()
    return f" ({w} processes)" if w > 1 else ""


def _parse_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@cli.command()
@click.argument("checkpoint", type=click.Path())
@data_options
@click.option("--curvature", "kinds", default="ggn", show_default=True,
              help="Comma-separated curvature kinds: ggn, hessian, efisher, mcfisher.")
@click.option("--blocks", "block_specs", multiple=True,
              help="Block partition: a preset (layer, param, qkv, heads) or [name=]glob / "
                   "[name=]PARAM[a:b] specs, repeatable (default: layer).")
@click.option("--pairs", default="diag", show_default=True,
              help="Block pairs: diag, all (upper triangle; the lower one is its transpose), "
                   "or ROW:COL,... (a bare NAME is its diagonal block).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float64",
              show_default=True, help="Dtype of the products and of the stored blocks.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("-o", "--out", default="curvature.h5", show_default=True,
              type=click.Path(dir_okay=False), help="HDF5 file to write (docs/hdf5.md).")
@click.option("--resume", is_flag=True,
              help="Continue OUT if it exists (finished chunks are kept); it must come from "
                   "the same checkpoint, model, data, blocks and dtype.")
@click.option("--force", is_flag=True,
              help="Run even when the estimated disk, memory or time is over the limits.")
@click.option("--chunk", "chunk_cols", type=click.IntRange(min=1), default=64,
              show_default=True, help="Columns per chunk: products per write and per resume "
                                      "unit; more needs more memory.")
@click.option("--coupling/--no-coupling", default=True, show_default=True,
              help="Also store the coupling map (Frobenius norm of every block pair).")
@product_options
def extract(checkpoint, data_source, batch_size, seq_len, num_batches, seed, windows, split,
            kinds, block_specs, pairs, dtype, device, out, resume, force, chunk_cols,
            coupling, tokenizer, text_field, precision, compile_products) -> None:
    """Extract dense curvature blocks of a model into an HDF5 file, chunk by chunk.

    An interrupted run leaves a valid file; --resume continues it. Sizes, memory and time are
    estimated first and the run is refused over the limits unless --force.
    """
    from pathlib import Path

    from tqdm import tqdm

    from curvlab import store
    from curvlab.curvature.blocks import partition
    from curvlab.curvature.coupling import coupling_map, coupling_products, known_columns
    from curvlab.curvature.extract import (
        check_limits,
        extract_blocks,
        format_bytes,
        plan_extraction,
        resolve_pairs,
        shared_sink,
    )
    from curvlab.curvature.operators import CURVATURES, curvature_operator, default_partition

    _check_precision(precision, dtype)
    device = distributed.local_device(device)  # torchrun + NCCL: this rank's GPU
    names = list(dict.fromkeys(k.strip() for k in kinds.split(",") if k.strip()))
    bad = [k for k in names if k not in CURVATURES]
    if bad or not names:
        raise curvlab.errors.ConfigError(f"unknown curvature {', '.join(bad) or kinds!r}; "
                                         f"valid: {', '.join(CURVATURES)}")
    out = Path(out)
    main = distributed.is_main()  # under torchrun only rank 0 touches the file
    resuming = distributed.broadcast_object(resume and out.exists())
    if not resuming and main:
        store.check_output(out, remedy="resume it (--resume)")  # before any work
    model, info, spec, batches = load_analysis_inputs(
        checkpoint, data_source, batch_size, seq_len, num_batches, seed, windows, split,
        dtype=dtype, device=device, tokenizer=tokenizer, text_field=text_field)
    for note in info.notes:
        click.echo(f"note: {note}")
    if not block_specs:
        blocks = default_partition(model)
    else:
        blocks = partition(model, block_specs[0] if len(block_specs) == 1 else list(block_specs))
    resolve_pairs(blocks, pairs)  # unknown names fail before any product
    ops = {k: curvature_operator(k, model, batches, blocks, device=device, precision=precision,
                                 compile=compile_products,
                                 **({"seed": spec.seed} if k == "mcfisher" else {}))
           for k in names}
    first = ops[names[0]]
    prov = store.make_provenance(checkpoint, info.model_dict(),
                                 data_provenance(spec, batches, split), first.dtype, first.device,
                                 precision=precision)
    writer = store.open_for_resume(out, prov, blocks) if resuming and main else None
    view = shared_sink(writer, blocks, names)  # other ranks: rank 0's targets, no writes
    try:
        plan = plan_extraction(ops, pairs, sink=view, chunk_cols=chunk_cols)
        click.echo(f"{blocks.size:,} coordinates in {len(blocks)} blocks, "
                   f"{first.num_tokens:,} tokens; {plan.describe()}")
        check_limits(plan, force=force, disk_path=out.parent)
        if writer is None and main:
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            writer = store.create_file(out, prov, blocks, param_shapes=shapes)
        for k in names if main else ():
            writer.kind_options(k, {"mc_samples": 1, "seed": spec.seed} if k == "mcfisher"
                                else {})
        with tqdm(total=plan.products, unit="col", desc="blocks", disable=None) as bar:
            result = extract_blocks(ops, pairs, writer if main else view, chunk_cols=chunk_cols,
                                    progress=bar.update)
        todo = distributed.broadcast_object(
            [k for k in names if coupling and not writer.has_coupling(k)] if main else None)
        # norms of the blocks just stored are exact already: no products for their columns
        known = distributed.broadcast_object({k: _stored_norms(writer, k, blocks.names)
                                              for k in todo} if main else None)
        total = sum(coupling_products(blocks.sizes, skip=known_columns(blocks.names, known[k]))
                    for k in todo)
        with tqdm(total=total, unit="col", desc="coupling",
                  disable=None if total else True) as bar:
            for k in todo:
                cmap = coupling_map(ops[k], seed=spec.seed, chunk_cols=chunk_cols,
                                    progress=bar.update, known=known[k])
                if main:
                    writer.write_coupling(k, cmap)
    finally:
        if writer is not None:
            writer.close()
    if not main:
        return
    results = store.read(out)
    click.echo(f"{'kind':<9} {'pairs':>5} {'complete':>8} {'chunks':>13} {'size':>10}  "
               "off-diagonal energy")
    for k in names:
        rows = [s for s in results.status() if s.kind == k]
        size = sum(s.shape[0] * s.shape[1] for s in rows) * first.dtype.itemsize
        energy = (f"{results.coupling(k).off_diagonal_energy():.4f}"
                  if k in results.coupling_kinds else "-")
        click.echo(f"{k:<9} {len(rows):>5} {sum(s.complete for s in rows):>8} "
                   f"{sum(s.chunks_done for s in rows):>6}/{sum(s.chunks for s in rows):<6} "
                   f"{format_bytes(size):>10}  {energy}")
    click.echo(f"wrote {out} ({result.products:,} column products in {result.seconds:.1f} s, "
               f"{result.chunks_skipped:,} chunks already done){_processes()}")


class ProgressReporter:
    """Shows :class:`curvlab.linalg.Progress` reports of ``compute_spectra`` on stderr: a tqdm
    bar per (target, task) on a terminal; otherwise a plain line every ``every`` products (and
    at the first and the last), so a slow run can be told from a hung one in a log."""

    def __init__(self, enabled: bool = True, every: int = 5, stream=None) -> None:
        import time

        self.enabled, self.every = enabled, every
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = time.perf_counter
        self.key: tuple[str, str] | None = None
        self.bar = None
        self.start = self.last_logged = 0.0
        self.logged = 0

    def _describe(self, p) -> str:
        parts = []
        if p.values is not None and len(p.values):
            parts.append(f"λ {p.values[0]:.4e} … {p.values[-1]:.4e}")
            parts.append(f"max rel. residual {float(max(p.residuals)):.1e}")
            parts.append(f"{p.converged}/{len(p.values)} converged")
        if p.restarts:
            parts.append(f"{p.restarts} restarts")
        return ", ".join(parts)

    def __call__(self, target: str, p) -> None:
        if not self.enabled:
            return
        key = (target, p.task)
        if key != self.key:
            self.close()
            self.key, self.start, self.logged = key, self.clock(), 0
        elapsed = self.clock() - self.start
        if self.tty:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=p.total, desc=f"{p.task} {target}", unit="prod",
                                leave=False, file=self.stream)
            self.bar.total = p.total
            self.bar.update(p.done - self.bar.n)
            self.bar.set_postfix_str(self._describe(p), refresh=False)
            return
        final = p.done >= p.total or (p.values is not None and p.converged == len(p.values))
        if p.done - self.logged < self.every and self.logged and not final:
            return
        self.logged = p.done
        rate = elapsed / max(p.done, 1)
        eta = rate * max(p.total - p.done, 0)
        bound = "≤ " if p.task == "lanczos" else ""
        when = (f"done in {_format_seconds(elapsed)}" if final
                else f"ETA {bound}{_format_seconds(eta)}")
        detail = self._describe(p)
        self.stream.write(f"{p.task} {target}: {p.done}/{p.total} products, {rate:.2f} s each, "
                          f"{when}{'; ' + detail if detail else ''}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.key = None


def _format_seconds(s: float) -> str:
    from curvlab.curvature.extract import format_seconds

    return format_seconds(s)


@cli.command()
@click.argument("source", nargs=-1, required=True, type=click.Path())
@click.option("--curvature", "kind", default="ggn", show_default=True,
              type=click.Choice(["ggn", "hessian", "efisher", "mcfisher"]),
              help="Curvature matrix.")
@click.option("--blocks", "preset", default=None,
              help="Block partition (layer, param, qkv, heads); alone: every block's spectrum.")
@click.option("--block", "block_names", multiple=True, help="A block to analyze (repeatable).")
@click.option("--full/--no-full", default=None,
              help="Also the whole operator (default: on unless --block is given).")
@click.option("--blockdiag", is_flag=True,
              help="Also the block-diagonal (layerwise) operator.")
@click.option("--k", "k", type=int, default=20, show_default=True,
              help="Eigenvalues per end (0: none).")
@click.option("--which", type=click.Choice(["top", "bottom", "both"]), default="top",
              show_default=True)
@click.option("--tol", type=float, default=1e-6, show_default=True,
              help="Relative residual tolerance of the Ritz pairs.")
@click.option("--reorth", type=click.Choice(["full", "selective", "none"]), default="full",
              show_default=True, help="Lanczos reorthogonalization.")
@click.option("--max-iter", type=int, default=None,
              help="Most Lanczos steps (products) per target [min(n, max(100, 10k)); "
                   "restarted: max(300, 30k)].")
@click.option("--basis-size", type=int, default=None,
              help="Most Lanczos basis vectors kept (thick restart beyond) [max(2k+1, 20)].")
@click.option("--basis-device", type=click.Choice(["device", "cpu", "disk"]), default="device",
              show_default=True,
              help="Where the Lanczos/SLQ basis lives: the operator's device, host memory, or "
                   "a scratch file beside the output (removed at the end).")
@click.option("--cache", "cache_mode", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Cached linearization of the products (faster, more memory); auto: when the "
                   "memory plan fits with it.")
@click.option("--max-memory", default=None,
              help="Refuse runs whose estimated peak memory exceeds this (e.g. 8G) [what the "
                   "machine has available].")
@click.option("--density", is_flag=True, help="Spectral density by SLQ.")
@click.option("--probes", type=int, default=10, show_default=True)
@click.option("--steps", type=int, default=80, show_default=True)
@click.option("--probe-block", type=int, default=None,
              help="Probes per block product of SLQ and Hutch++ [all SLQ probes; 32].")
@click.option("--trace", is_flag=True, help="Hutch++ trace with a standard error.")
@click.option("--trace-matvecs", type=int, default=102, show_default=True,
              help="Products of the Hutch++ trace (a third of them kept as vectors).")
@click.option("--vectors", is_flag=True, help="Store Ritz vectors.")
@click.option("--progress/--no-progress", "show_progress", default=True, show_default=True,
              help="Progress on stderr: a bar on a terminal, else a log line every few "
                   "products.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="spectra.h5",
              show_default=True, help="HDF5 results file (for an .h5 SOURCE: that file).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw a figure (PNG/PDF by extension).")
@click.option("--seed-lanczos", "lanczos_seed", type=int, default=0, show_default=True,
              help="Seed of the Lanczos / SLQ / Hutch++ random vectors.")
@click.option("--gradient-share", is_flag=True,
              help="Step axis: share of the gradient (and of the step to the next checkpoint) "
                   "in the top-k eigenspace of each target.")
@click.option("--sharpness", is_flag=True,
              help="Step axis: λ_max(P⁻¹H) (AdamW state) or λ_max(H), beside the optimizer's "
                   "stability threshold.")
@click.option("--heterogeneity", is_flag=True,
              help="Step axis: per-block top eigenvalue, trace, SLQ density and pairwise "
                   "Jensen-Shannon distances (implies --density; needs block targets).")
@click.option("--resume", is_flag=True,
              help="Step axis: continue OUT, skipping the finished checkpoints (same "
                   "checkpoints, batches and options needed).")
@product_options
@data_options
def spectrum(source, kind, preset, block_names, full, blockdiag, k, which, tol, reorth,
             max_iter, basis_size, basis_device, cache_mode, max_memory, density, probes, steps,
             probe_block, trace, trace_matvecs, vectors, show_progress, dtype, device, out,
             overwrite, plot_path, lanczos_seed, data_source, batch_size, seq_len, num_batches,
             seed, windows, split, tokenizer, text_field, precision, compile_products,
             gradient_share=False, sharpness=False, heterogeneity=False, resume=False) -> None:
    """Eigenvalues, spectral density and trace of a curvature operator, its blocks, or its
    block-diagonal part. Given a results .h5 with dense blocks: their exact eigenvalues.
    Given a `curvlab train --out` folder or several checkpoints: every checkpoint on the same
    batches into one file with a step axis (docs/hdf5.md).

    Before the first product it prints a memory plan (parameters, cached linearization, basis,
    probes) and refuses, in one line naming an option that fits, a run that would not fit."""
    import warnings
    from pathlib import Path

    from tqdm import tqdm

    from curvlab import memory, store
    from curvlab.curvature.precision import CompileWarning
    from curvlab.linalg import default_basis_size
    from curvlab.spectra import (
        TargetSpectrum,
        check_spectrum_numbers,
        check_target_size,
        compute_spectra,
        exact_eigenvalues,
        target_operator,
    )
    from curvlab.store.spectrum import write_target_spectrum

    check_spectrum_numbers(k=k, which=which, tol=tol, max_iter=max_iter, basis_size=basis_size,
                           density=density, probes=probes, steps=steps, probe_block=probe_block,
                           trace=trace, trace_matvecs=trace_matvecs)
    for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len),
                        ("--batches", num_batches)):
        if value is not None and value < 1:
            raise curvlab.errors.ConfigError(f"{name} must be >= 1, got {value}")
    limit = memory.parse_bytes(max_memory) if max_memory is not None else None
    if k > 0 and basis_size is None:
        basis_size = default_basis_size(k, which)
    main = distributed.is_main()
    device = distributed.local_device(device)  # torchrun + NCCL: this rank's GPU
    _check_precision(precision, dtype)
    from curvlab import trajectory

    if (not trajectory.is_single_source(source) or gradient_share or sharpness or heterogeneity
            or resume):
        if len(source) == 1 and str(source[0]).endswith((".h5", ".hdf5")):
            raise curvlab.errors.ConfigError(
                "--gradient-share, --sharpness, --heterogeneity and --resume analyze "
                "checkpoints, not an .h5 SOURCE")
        return _spectrum_along(
            source, out, plot_path, show_progress and main, main, dict(
                kind=kind, blocks=preset, block_names=block_names, full=full,
                blockdiag=blockdiag, k=k, which=which, tol=tol, reorth=reorth,
                max_iter=max_iter, basis_size=basis_size, basis_device=basis_device,
                cache=cache_mode, max_memory=limit, density=density, probes=probes,
                steps=steps, probe_block=probe_block, trace=trace,
                trace_matvecs=trace_matvecs, vectors=vectors, seed=lanczos_seed,
                gradient_share=gradient_share, sharpness=sharpness,
                heterogeneity=heterogeneity, dtype=dtype, device=device, precision=precision,
                compile=compile_products, resume=resume, overwrite=overwrite,
                data=dict(source=data_source, batch_size=batch_size, seq_len=seq_len,
                          batches=num_batches, seed=seed, windows=windows, split=split,
                          tokenizer=tokenizer, text_field=text_field)))
    source = source[0]
    if str(source).endswith((".h5", ".hdf5")):
        if not main:  # stored blocks: nothing to share, rank 0 does it alone
            return
        res = store.read(source)
        pairs = [(kd, r) for kd in res.kinds for r, c in res.pairs(kd) if r == c]
        if not pairs:
            raise curvlab.errors.CurvlabError(f"{source} holds no complete diagonal blocks")
        spectra = [(kd, name, exact_eigenvalues(res.block(kd, name)))
                   for kd, name in tqdm(pairs, desc="eigvalsh", unit="block", leave=False,
                                        disable=None)]
        rows = []
        with store.schema.open_h5(source, "r+", "write") as f:
            for kd, name, ev in spectra:
                write_target_spectrum(f, kd, TargetSpectrum(name, len(ev), exact=ev))
                rows.append((kd, name, len(ev), float(ev[-1]), float(ev[0])))
        click.echo(f"{'kind':<9} {'block':<24} {'size':>7} {'λ_max':>11} {'λ_min':>11}")
        for kd, name, n, hi, lo in rows:
            click.echo(f"{kd:<9} {name:<24} {n:>7} {hi:>11.4e} {lo:>11.4e}")
        click.echo(f"wrote exact spectra to {source}")
        return
    model, info, spec, batches = load_analysis_inputs(
        source, data_source, batch_size, seq_len, num_batches, seed, windows, split, dtype,
        device, tokenizer=tokenizer, text_field=text_field)
    for note in info.notes:
        click.echo(f"note: {note}")
    out_path = store.check_output(out, overwrite) if main else None
    blocks = curvlab.partition(model, preset) if preset else \
        curvlab.curvature.operators.default_partition(model)
    op = curvlab.curvature.operators.curvature_operator(kind, model, batches, blocks,
                                                        precision=precision,
                                                        compile=compile_products)
    targets = list(block_names)
    if not targets and preset:
        targets = list(blocks.names)
    if full if full is not None else not block_names:
        targets.insert(0, "full")
    if blockdiag:
        targets.append("blockdiag")
    for t in targets:
        if t not in ("full", "blockdiag"):
            blocks[t]  # unknown names fail here, listing the valid ones
        check_target_size(target_operator(op, t), t, k, which)  # before the plan
    scratch = (out_path.parent if out_path is not None else Path(out).parent).absolute()
    settings = memory.SpectrumSettings(
        k=k, which=which, basis_size=basis_size, basis_device=basis_device, max_iter=max_iter,
        vectors=vectors, density=density, probes=probes, steps=steps, probe_block=probe_block,
        reorth=reorth, trace=trace, trace_matvecs=trace_matvecs, batch_size=spec.batch_size,
        batches=len(batches))
    plan = memory.choose(memory.measure(op, scratch_dir=scratch, max_memory=limit), settings,
                         cache={"auto": "auto", "on": True, "off": False}[cache_mode])
    op.engine.set_cache(plan.settings.cached)
    if main:
        click.echo(plan.describe(), err=True)
    reporter = ProgressReporter(enabled=show_progress and main)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = []
        for t in targets:
            results += compute_spectra(op, [t], k=k, which=which, tol=tol, reorth=reorth,
                                       max_iter=max_iter, basis_size=basis_size,
                                       basis_device=None if basis_device == "device"
                                       else basis_device, scratch_dir=scratch,
                                       density=density, probes=probes, steps=steps,
                                       probe_block=probe_block, trace=trace,
                                       trace_matvecs=trace_matvecs, return_vectors=vectors,
                                       seed=lanczos_seed, progress=reporter)
    reporter.close()
    if not main:
        return
    for w in caught:
        if issubclass(w.category, (curvlab.linalg.LinalgWarning, CompileWarning)):
            click.echo(f"warning: {w.message}", err=True)
    prov = store.make_provenance(source, info.model_dict(),
                                 data_provenance(spec, batches, split), dtype, device,
                                 precision=precision)
    with store.create_file(out_path, prov, blocks, overwrite=overwrite) as writer:
        for r in results:
            write_target_spectrum(writer.file, kind, r)
    click.echo(f"{'target':<24} {'size':>9} {'λ_1':>11} {'λ_k':>11} {'conv':>6} "
               f"{'products':>8} {'trace':>11}")
    for r in results:
        ev = r.lanczos.eigenvalues if r.lanczos is not None else None
        tr = r.trace.estimate if r.trace is not None else (
            r.density.trace_estimate if r.density is not None else float("nan"))
        conv = f"{int(r.lanczos.converged.sum())}/{len(ev)}" if ev is not None else "-"
        prods = r.lanczos.products if r.lanczos is not None else 0
        first = f"{float(ev[0]):11.4e}" if ev is not None and len(ev) else f"{'-':>11}"
        last = f"{float(ev[-1]):11.4e}" if ev is not None and len(ev) else f"{'-':>11}"
        click.echo(f"{r.target:<24} {r.size:>9,} {first} {last} {conv:>6} {prods:>8} "
                   f"{tr:>11.4e}")
    click.echo(f"wrote {out_path}{_processes()}")
    if plot_path:
        from curvlab.plot import render_spectra

        for path in render_spectra(out_path, plot_path):
            click.echo(f"wrote {path}")


def _spectrum_along(sources, out, plot_path, show_progress: bool, main: bool,
                    options: dict[str, Any]) -> None:
    """``curvlab spectrum RUN_DIR`` / ``CKPT CKPT ...``: :func:`curvlab.spectra_along` and a
    table of the step axis."""
    import math

    reporter = ProgressReporter(enabled=show_progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traj = curvlab.spectra_along(sources, out, log=lambda m: click.echo(m, err=True),
                                     progress=reporter, **options)
    reporter.close()
    if not main:
        return
    from curvlab.curvature.precision import CompileWarning

    for w in caught:
        if issubclass(w.category, (curvlab.linalg.LinalgWarning, CompileWarning)):
            click.echo(f"warning: {w.message}", err=True)
    cols = [("λ_1 " + t, f"lambda_max/{t}") for t in traj.attrs["options"]["targets"]
            if f"lambda_max/{t}" in traj.series][:2]
    cols += [(name, key) for name, key in (("g share", "gradient_share/full"),
                                           ("Δθ share", "step_share/full"),
                                           ("sharpness", "sharpness"),
                                           ("threshold", "sharpness_threshold"))
             if key in traj.series]
    click.echo(f"{'step':>8} {'optimizer':<14}" + "".join(f" {c[:12]:>12}" for c, _ in cols))
    for i, step in enumerate(traj.steps):
        opt = str(traj.optimizers[i].get("name", "?"))
        vals = [float(traj.series[key][i]) for _, key in cols]
        click.echo(f"{int(step):>8} {opt:<14}" + "".join(
            f" {'-':>12}" if math.isnan(v) else f" {v:12.4e}" for v in vals))
    click.echo(f"wrote {out} ({len(traj.steps)} checkpoints){_processes()}")
    if plot_path:
        from curvlab.plot import render_along

        stem, ext = os.path.splitext(plot_path)
        for path in render_along([out], stem + "_plots", (ext.lstrip(".") or "png",)):
            click.echo(f"wrote {path}")


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--preconditioners",
              default="full,layerwise,diag,adam,kfac,shampoo,soap,muon,identity",
              show_default=True,
              help="Comma-separated: full, layerwise, diag, adam, kfac, shampoo, soap, muon, "
                   "identity.")
@click.option("--damping", "dampings", default="1e-3,1e-2", show_default=True,
              help="Comma-separated dampings λ >= 0 (P + λI; λ is Adam's ε for adam).")
@click.option("--blocks", "block_specs", multiple=True,
              help="Partition defining 'layerwise' (preset or globs/slices; default: layer).")
@click.option("--val-batches", type=int, default=1, show_default=True,
              help="Held-out batches (val split) for the line-searched loss.")
@click.option("--cg-tol", type=float, default=1e-4, show_default=True,
              help="Relative residual of the conjugate-gradient solves.")
@click.option("--cg-max-iter", type=int, default=1000, show_default=True)
@click.option("--dense-max", type=int, default=2048, show_default=True,
              help="Matrices and blocks up to this size are held densely (exact solves, "
                   "diagonals, spectra).")
@click.option("--kfac", "kfac_estimator", type=click.Choice(["mc", "exact"]), default="mc",
              show_default=True,
              help="K-FAC output factor: sampled labels or exact (N·V passes).")
@click.option("--kfac-samples", type=int, default=4, show_default=True)
@click.option("--diag-exact-max", type=int, default=4096, show_default=True,
              help="diag(G) of blocks above --dense-max: exact from the N·V per-token root "
                   "columns when N·V is at most this, else Monte-Carlo.")
@click.option("--diag-samples", type=int, default=64, show_default=True,
              help="Monte-Carlo label draws per token for diag(G) (one pullback per "
                   "sequence and draw).")
@click.option("--spectrum/--no-spectrum", default=True, show_default=True,
              help="Condition numbers of the preconditioned GN matrix.")
@click.option("--per-block", is_flag=True, help="Also print each block's share of the decrease.")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="HDF5 results file (/compare); not written if omitted.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the figures (PNG).")
@product_options
@data_options
def compare(checkpoints, preconditioners, dampings, block_specs, val_batches, cg_tol,
            cg_max_iter, dense_max, kfac_estimator, kfac_samples, diag_exact_max, diag_samples,
            spectrum, per_block, dtype, device, out, overwrite, plot_dir, data_source,
            batch_size, seq_len, num_batches, seed, windows, split, tokenizer,
            text_field, precision, compile_products) -> None:
    """Full vs layerwise Gauss-Newton and the approximate preconditioners (diagonal GN, Adam-like,
    K-FAC, Shampoo, SOAP, Muon, identity) on one or more checkpoints of one run: predicted
    decrease, line-searched validation loss, cosine to full GN, conditioning, off-diagonal
    energy."""
    import os

    import torch

    from curvlab import store
    from curvlab.compare import (
        compare_checkpoints,
        format_evolution,
        format_table,
        write_compare,
    )
    from curvlab.compare.directions import check_names

    try:
        lams = [float(x) for x in _parse_list(dampings)]
    except ValueError:
        raise curvlab.errors.ConfigError(f"--damping: not numbers: {dampings}") from None
    names = check_names(_parse_list(preconditioners))
    if val_batches < 1:
        raise curvlab.errors.ConfigError("--val-batches must be >= 1")
    _check_precision(precision, dtype)
    main = distributed.is_main()  # under torchrun only rank 0 prints and writes
    device = distributed.local_device(device)  # torchrun + NCCL: this rank's GPU
    out_path = store.check_output(out, overwrite) if out and main else None
    # the first checkpoint's data options define the batches of every checkpoint
    model, info, spec, batches = load_analysis_inputs(
        checkpoints[0], data_source, batch_size, seq_len, num_batches, seed, windows, split,
        device=device, tokenizer=tokenizer, text_field=text_field)
    for note in info.notes:
        click.echo(f"note: {note}")
    # held-out batches never overlap the others: after them when drawn from the same split
    held_out = "all" if split == "all" else "val"
    start = num_batches if split in ("val", "all") else 0
    val = curvlab.data.analysis_batches(spec, val_batches, info.vocab_size, held_out, start)
    val = [b.shard() for b in val]  # this rank's rows (all of them on one process)
    blocks = curvlab.partition(model, list(block_specs)) if block_specs else "layer"
    del model

    def load(path):
        return curvlab.load_model(path, device=device)

    runs = compare_checkpoints(
        checkpoints, batches, val, load=load, preconditioners=names, dampings=lams,
        blocks=blocks, cg_tol=cg_tol, cg_max_iter=cg_max_iter, dense_max=dense_max,
        kfac_estimator=kfac_estimator, kfac_samples=kfac_samples,
        diag_exact_max=diag_exact_max, diag_samples=diag_samples, spectrum=spectrum,
        seed=seed or 0, dtype={"float64": torch.float64, "float32": torch.float32}[dtype],
        device=device, precision=precision, compile=compile_products,
        progress=lambda msg: click.echo(f"  {msg}", err=True))
    if not main:
        return
    for run in runs:
        click.echo(f"\ncheckpoint {run.checkpoint} (step {run.step})")
        click.echo(format_table(run.result, per_block=per_block))
    if len(runs) > 1:
        click.echo("\n" + format_evolution(runs))
    if out_path is not None:  # root provenance: the earliest checkpoint; /compare/<k>: each
        prov = store.make_provenance(runs[0].checkpoint, info.model_dict(),
                                     data_provenance(spec, batches, split), dtype, device,
                                     precision=precision)
        with store.create_file(out_path, prov, runs[0].result.partition,
                               overwrite=overwrite) as writer:
            write_compare(writer, runs)
        click.echo(f"wrote {out_path}{_processes()}")
    if plot_dir:
        from curvlab.plot import compare_figures, save

        os.makedirs(plot_dir, exist_ok=True)
        context = f"{info.family}, {runs[-1].result.n:,} coordinates, " \
                  f"{runs[-1].result.tokens:,} tokens"
        for stem, fig in compare_figures(runs, context):
            for path in save(fig, os.path.join(plot_dir, stem)):
                click.echo(f"wrote {path}")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the figures (default: next to FILE, FILE stem + '_plots').")
@click.option("--pdf", is_flag=True, help="Also write PDF files.")
def plot(files, out_dir, pdf) -> None:
    """Render every standard figure a results .h5 file supports (densities, top eigenvalues
    per block, coupling heatmaps, full vs block-diagonal spectra). Step-axis files (curvlab
    spectrum RUN_DIR): each quantity against the step, thresholds dashed; several files (one
    per run) overlaid, the runs' optimizers in the legend."""
    import os

    from curvlab.plot import render_file
    from curvlab.trajectory import is_trajectory

    for file in files:
        if not os.path.isfile(file):
            raise curvlab.errors.CurvlabError(f"results file not found: {file}")
    along = [is_trajectory(f) for f in files]
    if any(along) or len(files) > 1:
        if not all(along):
            bad = next(f for f, a in zip(files, along) if not a)
            raise curvlab.errors.CurvlabError(
                f"{bad} has no step axis: several files are overlaid only when each is a "
                "step-axis file (curvlab spectrum RUN_DIR)")
        from curvlab.plot import render_along

        out_dir = out_dir or os.path.splitext(files[0])[0] + "_plots"
        written = render_along(list(files), out_dir, ("png", "pdf") if pdf else ("png",))
        if not written:
            raise curvlab.errors.CurvlabError(f"{files[0]} holds nothing to plot")
        for path in written:
            click.echo(f"wrote {path}")
        return
    file = files[0]
    out_dir = out_dir or os.path.splitext(file)[0] + "_plots"
    written = render_file(file, out_dir, ("png", "pdf") if pdf else ("png",))
    if not written:
        raise curvlab.errors.CurvlabError(f"{file} holds nothing to plot (no spectra, no "
                                          "coupling maps)")
    for path in written:
        click.echo(f"wrote {path}")


DISTRIBUTED_COMMANDS = ("extract", "spectrum", "compare", "train")


def _command(args: list[str]) -> str | None:
    return next((a for a in args if not a.startswith("-")), None)


def _join_process_group(args: list[str]) -> None:
    """Under ``torchrun``: check the command runs distributed, join the process group, check
    every rank got the same command line, and silence the output of ranks other than 0."""
    command = _command(args)
    if command is not None and command not in DISTRIBUTED_COMMANDS and command in cli.commands:
        raise curvlab.errors.ConfigError(
            f"curvlab {command} does not run under torchrun (only "
            f"{', '.join(DISTRIBUTED_COMMANDS)} do); run it as a single process")
    distributed.init()
    distributed.check_same("command line", {"argv": args})
    if not distributed.is_main():
        sys.stdout = sys.stderr = open(os.devnull, "w")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """curvlab's own warnings (compile fallback, cache) as one line ``warning: ...``."""
    if category.__module__.startswith("curvlab."):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> None:
    """Console entry point with one-line errors (tracebacks only with ``--debug``).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process joins the process group first; errors
    name their rank (``error (rank 1): ...``) and only rank 0 prints anything else.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    warnings.formatwarning = _format_warning
    err = sys.stderr  # kept: ranks other than 0 silence sys.stderr but still report errors
    where = f" (rank {os.environ.get('RANK', '?')})" if distributed.launched() else ""

    def fail(message: str, code: int) -> None:
        print(f"error{where}: {message}", file=err, flush=True)
        distributed.shutdown(wait=False)  # another rank may be gone: no barrier
        sys.exit(code)

    try:
        if distributed.launched():
            _join_process_group(args)
        rv = cli.main(args=args, prog_name="curvlab", standalone_mode=False)
    except click.ClickException as e:
        if not where:
            e.show()
            sys.exit(e.exit_code)
        fail(e.format_message(), e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        fail("interrupted", 130)
    except CurvlabError as e:
        if debug:
            raise
        fail(str(e), 1)
    except Exception as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        fail(f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)", 1)
    distributed.shutdown()
    sys.exit(rv if isinstance(rv, int) else 0)
