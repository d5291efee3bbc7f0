"""The outer training loop: baselines and Gauss-Newton methods, evaluation, checkpoints, resume.

Data positions are deterministic: outer step ``t`` uses train micro-batches
``t·K .. t·K + K − 1`` of the stream (``K = grad_accum`` for baselines,
``K = inner_steps + line_search_batches`` for GN methods; every block of layerwise GN uses the
same ``inner_steps`` micro-batches), and evaluation uses val micro-batches ``0 .. eval_batches−1``.
A resumed run therefore sees the same batches as an uninterrupted one, and no RNG state needs
saving.

Output folder: ``step_NNNNNN.pt`` every ``checkpoint_every`` steps, ``final.pt`` at the end,
``metrics.jsonl`` (one JSON object per outer step; step 0 is the evaluation of the start).

Cost columns of every metrics row (running totals since step 0, kept across ``--resume``;
numeric ones also in the checkpoint's metrics, ``passes_total`` there as ``passes_<kind>``):

- ``tokens``: positions ``B·T`` of every micro-batch read (inner + line search for GN);
- ``tokens_solve`` / ``tokens_line_search``: non-ignored target tokens of the micro-batches the
  solve (baselines: the gradient accumulation) and the line search read, each micro-batch
  counted once however many candidates score it or blocks reuse it. This follows the
  reference's third-party fork (gmbabreu/full-gauss-newton, ``EasyLM/training_progress.py``,
  ``TrainingProgress.charge``: solve and line-search tokens charged separately, once per
  fetched batch; its token axis is the solve tokens, the line search reported beside it);
- ``passes`` (this step) / ``passes_total``: what ran, by kind (:class:`GNStep` ``passes``
  for the GN methods; a baseline step is ``grad_accum`` ``"gradient"`` passes, forward +
  backward on one micro-batch); ``benchmarks/pass_costs.py`` measures each kind's cost in
  gradients;
- ``step_time``: seconds of this step's update (no evaluation); ``wall_time``: running total of
  update + evaluation seconds (the evaluation of step 0 excluded); ``eval_time``: the running
  total of ``wall_time − Σ step_time``.

Data parallelism (``torchrun``, :mod:`curvlab.distributed`): every micro-batch (training, GN
inner, line search, evaluation) is split by rows across the processes (:meth:`Batch.shard`) and
every loss is a token sum over all ranks divided by the token count of all ranks, so a run on
``W`` processes equals the single-process run to float tolerance. Baselines run the
forward/backward through ``DistributedDataParallel`` (gradients all-reduced once per step); GN
methods all-reduce every inner gradient (:func:`curvlab.train.gn.inner_gradient`). The model, the
optimizer states and every decision are therefore identical on all ranks; only rank 0 writes
(``--out``, the progress bar).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from curvlab import distributed
from curvlab.checkpoint import load_checkpoint, save_checkpoint
from curvlab.curvature.precision import precision_context
from curvlab.data.batches import Batch, BatchStream, DataSpec, bind_tokenizer
from curvlab.data.tokenizer import auto_tokenizer
from curvlab.errors import CheckpointError, ConfigError, CurvlabError
from curvlab.models import ModelConfig, build_model, preset
from curvlab.train.config import TrainConfig, TrainingDivergedError
from curvlab.train.gauss_newton import GaussNewton, ce_sum, mean_loss
from curvlab.train.gn import token_counts
from curvlab.train.optimizers import build_optimizer, hidden_matrices, set_lr
from curvlab.train.schedules import lr_factor

Progress = Callable[[dict[str, Any]], None]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Outcome of :func:`train`.

    history: the metrics rows (also in ``metrics.jsonl``). steps_to_target / tokens_to_target:
    first evaluated outer step (and tokens seen) with ``val_loss <= target_loss``, else None.
    checkpoint: path of ``final.pt`` (None without ``out``). model: the trained model.
    """

    config: TrainConfig
    model: nn.Module
    step: int
    tokens: int
    val_loss: float | None
    steps_to_target: int | None
    tokens_to_target: int | None
    history: tuple[dict[str, Any], ...]
    checkpoint: str | None
    wall_time: float


class _Baseline:
    """AdamW / Muon / SOAP: ``grad_accum`` micro-batches per step, clipped gradient."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, batch: Callable[[int], Batch]):
        self.model, self.cfg, self.batch = model, cfg, batch
        self.params = [p for _, p in model.named_parameters()]
        self.opt = build_optimizer(
            cfg.optimizer, dict(model.named_parameters()), hidden_matrices(model), lr=cfg.lr,
            betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            ns_steps=cfg.ns_steps, shampoo_beta=cfg.shampoo_beta,
            precondition_frequency=cfg.precondition_frequency,
            max_precond_dim=cfg.max_precond_dim)
        self.batches_per_step = cfg.grad_accum
        # under torchrun the forward/backward runs through DDP (gradients all-reduced at the
        # last micro-batch of a step); the optimizer steps the unwrapped model's parameters
        self.net: nn.Module = model
        if distributed.active():
            device = next(model.parameters()).device
            with warnings.catch_warnings():
                # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers (absent
                # from older releases); the buffers (rotary tables) are constants, never synced
                warnings.simplefilter("ignore", FutureWarning)
                self.net = DistributedDataParallel(
                    model, device_ids=[device] if device.type == "cuda" else None,
                    broadcast_buffers=False)

    def step(self, t: int) -> dict[str, Any]:
        cfg, K = self.cfg, self.cfg.grad_accum
        lr = cfg.lr * lr_factor(cfg.schedule, t, cfg.max_steps, warmup=cfg.warmup_steps,
                                final=cfg.final_lr_frac)
        set_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        batches = [self.batch(t * K + k) for k in range(K)]  # this rank's rows
        counts = token_counts(batches)  # tokens of the whole micro-batches (all ranks)
        if not all(counts):
            raise CurvlabError("a micro-batch has no target tokens that are not ignored")
        # DDP averages the ranks' gradients: W·(this rank's token sum)/N averages to the
        # gradient of the micro-batch's mean cross-entropy (W = 1: the plain mean)
        world = distributed.world_size()
        sums = []
        for k, (b, n) in enumerate(zip(batches, counts)):
            sync = k == K - 1 or self.net is self.model
            with nullcontext() if sync else self.net.no_sync():
                with precision_context(cfg.precision, self.params[0].device):
                    logits = self.net(b.inputs)  # bf16: autocast; the loss in the params' dtype
                ce = ce_sum(logits.to(self.params[0].dtype), b.targets)
                (ce / n * world / K).backward()
            sums.append(float(ce.detach()))
        totals = distributed.sum_scalars(*sums)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=False)
        self.opt.step()
        return {"train_loss": sum(s / n for s, n in zip(totals, counts)) / K, "lr": lr,
                "tokens_solve": sum(counts), "tokens_line_search": 0,
                "passes": {"gradient": K}}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])


class _GaussNewton:
    """GN / GN-prox-linear, full or layerwise: :class:`curvlab.optim.GaussNewton` stepped on
    micro-batches ``t·K .. t·K + K − 1`` (the inner solve's first, then the line search's)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, batch: Callable[[int], Batch]):
        self.cfg, self.batch = cfg, batch
        self.gn = GaussNewton.from_config(model, cfg)
        self.batches_per_step = cfg.inner_steps + cfg.ls_batches

    def step(self, t: int) -> dict[str, Any]:
        n, first = self.cfg.inner_steps, t * self.batches_per_step
        if self.gn.steps != t:
            raise CheckpointError(f"GN state is at outer step {self.gn.steps}, the run at {t}")
        inner = [self.batch(first + k) for k in range(n)]
        scored = [self.batch(first + n + j) for j in range(self.cfg.ls_batches)]
        r = self.gn.step(inner, scored)
        # tokens as the reference's fork counts them (module docstring): every micro-batch once
        counts = token_counts(inner + scored)
        return {"train_loss": r.loss, "lr": r.lr, "ls_step": r.step_size,
                "ls_losses": list(r.line_search_losses), "inner_decrease": r.predicted_decrease,
                "tokens_solve": sum(counts[:n]), "tokens_line_search": sum(counts[n:]),
                "passes": dict(r.passes), "cg_iterations": r.cg_iterations,
                "cg_residual": r.cg_residual}

    def state_dict(self) -> dict[str, Any]:
        return self.gn.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gn.load_state_dict(state)


def _mismatch(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields where two model configs differ (``seq_len`` only matters for learned positions)."""
    skip = {"seq_len"} if a.family == b.family == "llama" else set()
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}={da[k]!r} vs {db[k]!r}" for k in da if k not in skip and da[k] != db[k]]


def _load_exact(path: str | Path, device: str, dtype: torch.dtype
                ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A checkpoint's model in ``dtype`` (stored values copied without rounding through
    float32) plus the raw payload."""
    model, info = load_checkpoint(path, device=device, dtype=dtype)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return model, info, raw


def _initial_model(cfg: TrainConfig, dtype: torch.dtype, device: str
                   ) -> tuple[nn.Module, dict[str, Any], tuple[str, str | None]]:
    """The starting model, the data spec stored with it, and what ``tokenizer="auto"`` means
    for it (:func:`curvlab.data.auto_tokenizer`)."""
    if cfg.init is None:
        model = build_model(preset(cfg.preset or "tiny"), seed=cfg.seed)
        return model.to(device=device, dtype=dtype), {}, auto_tokenizer(None)
    model, info, _ = _load_exact(cfg.init, device, dtype)
    if cfg.preset is not None:
        diff = _mismatch(preset(cfg.preset), model.config)
        if diff:
            raise ConfigError(f"--init {cfg.init} holds another model than --preset "
                              f"{cfg.preset} ({'; '.join(diff[:4])})")
    return model, info.data, auto_tokenizer(info.kind, cfg.init, info.data)


def _on_every_rank(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raises on any rank, every rank raises (none is left
    waiting in a collective). One collective under ``torchrun``, none otherwise."""
    if not distributed.active():
        return fn()
    try:
        result, error = fn(), None
    except Exception as e:  # re-raised below, after telling the other ranks
        result, error = None, e
    failed = distributed.sum_scalars(float(error is not None))[0]
    if error is not None:
        raise error
    if failed:
        raise CurvlabError(f"{int(failed)} other process(es) failed (their error is in their "
                           "output; rank 0's is shown)")
    return result


def _on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (file reads and writes); its result, or its error, on every
    rank."""
    if not distributed.active():
        return fn()
    result = error = None
    if distributed.is_main():
        try:
            result = fn()
        except Exception as e:  # re-raised below, after telling the other ranks
            error = e
    shared = error if isinstance(error, CurvlabError) else (
        None if error is None else f"{type(error).__name__}: {error}")
    result, shared = distributed.broadcast_object((result, shared))
    if error is not None:
        raise error
    if isinstance(shared, CurvlabError):
        raise shared
    if shared is not None:
        raise CurvlabError(f"rank 0 failed: {shared}")
    return result


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("step_*.pt")) + ([out / "final.pt"] if (out / "final.pt").exists()
                                           else [])


def _latest(found: list[Path]) -> Path:
    """The checkpoint with the highest step (``final.pt`` wins a tie)."""
    steps = [p for p in found if p.name.startswith("step_")]
    best = steps[-1] if steps else None
    final = next((p for p in found if p.name == "final.pt"), None)
    if final is not None:
        final_step = int(torch.load(final, map_location="cpu", weights_only=True)["step"])
        if best is None or final_step >= int(best.stem[5:]):
            best = final
    return best


def _resume_point(out: Path, resume: bool) -> str | None:
    """The checkpoint to resume from (None: start afresh); refuses to overwrite a run, and
    ``resume`` where ``out`` holds no run at all (a mistyped folder would start afresh)."""
    found = _checkpoints(out)
    if found and not resume:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue "
                          "or choose another --out")
    if resume and not found:
        if not (out / "metrics.jsonl").is_file():
            raise ConfigError(f"--resume: {out} holds no run to resume (no step_*.pt, final.pt "
                              "or metrics.jsonl); drop --resume to start one")
        warnings.warn(f"--resume: {out} holds no checkpoint yet (the run stopped before its "
                      "first); starting it again from step 0", stacklevel=2)
    return str(_latest(found)) if found else None


def _resumed_history(metrics_path: Path, step: int) -> list[dict[str, Any]]:
    """The metrics rows up to ``step``; rows written after the checkpoint are dropped from the
    file."""
    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    history = [r for r in rows if r["step"] <= step]
    _write_jsonl(metrics_path, history)
    return history


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _cpu(obj: Any) -> Any:
    """Tensors inside nested dicts/lists moved to the CPU (checkpoints load anywhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _no_costs() -> dict[str, Any]:
    return {"tokens_solve": 0, "tokens_line_search": 0, "passes": {}, "eval_time": 0.0}


def _cost_fields(costs: dict[str, Any] | None, step_time: float | None) -> dict[str, Any]:
    """The cumulative cost columns of a metrics row (per-step ``tokens_solve`` /
    ``tokens_line_search`` / ``passes`` of the method are replaced by the running totals,
    the step's own passes stay under ``passes``)."""
    known = costs is not None
    return {"tokens_solve": costs["tokens_solve"] if known else None,
            "tokens_line_search": costs["tokens_line_search"] if known else None,
            "passes_total": dict(costs["passes"]) if known else None,
            "step_time": None if step_time is None else round(step_time, 4),
            "eval_time": round(costs["eval_time"], 4) if known else None}


def _finite(row: dict[str, Any]) -> bool:
    return all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")
               if row.get(k) is not None)


def train(config: TrainConfig, progress: bool | Progress = False) -> TrainResult:
    """Train a model as ``config`` says; see :class:`TrainConfig` and the module docstring.

    ``progress``: True shows a tqdm bar on stderr; a callable receives every metrics row
    (after the row is written and any checkpoint of that step saved).
    Raises :class:`~curvlab.errors.CurvlabError` subclasses for bad input,
    :class:`TrainingDivergedError` when the loss or the parameters become NaN/Inf (no
    checkpoint of the diverged state is written).

    Under ``torchrun`` (joins the process group if the caller has not, see
    :func:`curvlab.distributed.init`) every process must be given the same ``config``
    (checked; ``device`` may differ); each one computes on its rows of every micro-batch, the
    result equals a single-process run, only rank 0 writes ``out`` and shows the bar, and a
    progress callable is called on every rank.
    """
    cfg = config
    distributed.init()
    if distributed.active():
        distributed.check_same("training configuration",
                               {k: v for k, v in cfg.to_dict().items() if k != "device"})
        distributed.shard_rows(cfg.micro_batch_size)  # a micro-batch too small to split
    main = distributed.is_main()
    dtype = DTYPES[cfg.dtype]
    device = distributed.local_device(cfg.device)

    def setup() -> tuple[nn.Module, DataSpec, BatchStream, list[Batch]]:
        model, init_data, auto = _initial_model(cfg, dtype, device)
        mcfg: ModelConfig = model.config
        seq_len = cfg.seq_len or min(mcfg.seq_len, init_data.get("seq_len", mcfg.seq_len))
        if seq_len > mcfg.seq_len and mcfg.family == "gpt":
            raise ConfigError(f"--seq-len {seq_len} exceeds the model's {mcfg.seq_len} positions")
        spec = DataSpec(source=cfg.data, seq_len=seq_len, batch_size=cfg.micro_batch_size,
                        seed=cfg.seed, windows=cfg.windows, tokenizer=cfg.tokenizer,
                        text_field=cfg.text_field)
        spec = bind_tokenizer(spec, auto, mcfg.vocab_size)  # checked, hashed, recorded
        stream = BatchStream(spec)
        stream.check_vocab(mcfg.vocab_size)
        val_stream = BatchStream(spec, corpus=stream.corpus, split="val")
        val = [val_stream.batch(i).shard().to(device) for i in range(cfg.eval_batches)]
        return model, spec, stream, val

    # every rank reads the model and the data itself (a shared filesystem is assumed)
    model, spec, stream, val = _on_every_rank(setup)
    model.train()
    seq_len = spec.seq_len

    def batch(i: int) -> Batch:
        return stream.batch(i).shard().to(device)  # this rank's rows of micro-batch i

    method = (_GaussNewton if cfg.is_gn else _Baseline)(model, cfg, batch)
    tokens_per_step = method.batches_per_step * cfg.micro_batch_size * seq_len
    ema = ({k: p.detach().clone() for k, p in model.named_parameters()} if cfg.ema_decay > 0
           else None)
    step, tokens, wall, history = 0, 0, 0.0, []
    # cumulative cost (module docstring); None after resuming a checkpoint written without it
    costs: dict[str, Any] | None = _no_costs()
    out = Path(cfg.out) if cfg.out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None else None

    def snapshot(path: Path, row: dict[str, Any]) -> Path:
        def write() -> Path:
            state = {"step": step, "tokens": tokens, "wall_time": wall,
                     "method": method.state_dict(), "ema": ema, "costs": costs}
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            numbers.update({f"passes_{k}": v for k, v in (row.get("passes_total") or {}).items()})
            return save_checkpoint(
                path, model, step=step, optimizer={"name": cfg.optimizer, "hparams": cfg.hparams()},
                data=spec.to_dict(), metrics=numbers,
                extra={"train_config": cfg.to_dict(), "trainer": _cpu(state)})

        # rank 0 writes; the others wait until the checkpoint is complete (a barrier that
        # also passes on a write error)
        return _on_main(write)

    if out is not None:
        latest = _on_main(lambda: _resume_point(out, cfg.resume))
        if latest is not None:
            def load() -> dict[str, Any]:
                loaded, _, raw = _load_exact(latest, device, dtype)
                stored = raw.get("extra", {}).get("train_config")
                if stored is None or "trainer" not in raw["extra"]:
                    raise CheckpointError(f"{latest}: no trainer state to resume from")
                changed = cfg.changes_for_resume(stored)
                if changed:
                    raise ConfigError(f"cannot resume {latest} with changed options: "
                                      f"{', '.join(changed)}")
                was = raw.get("data", {})  # the same tokenizer files, not just the same option
                if "tokenizer" in was and (was.get("tokenizer"), was.get("tokenizer_sha256")) \
                        != (spec.tokenizer, spec.tokenizer_sha256):
                    raise ConfigError(
                        f"cannot resume {latest}: its tokenizer was {was.get('tokenizer')} "
                        f"(sha256 {str(was.get('tokenizer_sha256'))[:12]}), now "
                        f"{spec.tokenizer} (sha256 {str(spec.tokenizer_sha256)[:12]})")
                with torch.no_grad():
                    for (_, p), (_, q) in zip(model.named_parameters(),
                                              loaded.named_parameters()):
                        p.copy_(q)
                return raw["extra"]["trainer"]

            state = _on_every_rank(load)  # every rank reads the checkpoint rank 0 wrote
            method.load_state_dict(state["method"])
            if ema is not None:
                for k, v in ema.items():
                    v.copy_(state["ema"][k])
            step, tokens, wall = int(state["step"]), int(state["tokens"]), float(
                state["wall_time"])
            costs = state.get("costs")
            if costs is None:
                warnings.warn(f"--resume: {latest} was written without cost counts; the rows "
                              "after it report tokens_solve, tokens_line_search, passes_total "
                              "and eval_time as null", stacklevel=2)
            # drop rows written after the checkpoint
            history = _on_main(lambda: _resumed_history(metrics_path, step))
        if main:
            out.mkdir(parents=True, exist_ok=True)

    def evaluate() -> float:
        return mean_loss(model, ema, val)

    def record(row: dict[str, Any]) -> None:
        history.append(row)
        if metrics_path is not None and main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    if not history:
        if metrics_path is not None and main:
            _write_jsonl(metrics_path, [])  # a run that never reached a checkpoint restarts
        record({"step": 0, "tokens": 0, "train_loss": None, "val_loss": evaluate(),
                "wall_time": 0.0, **_cost_fields(costs, None)})
    bar = None
    if progress is True and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.optimizer, file=sys.stderr,
                   dynamic_ncols=True)

    def reached(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        if cfg.target_loss is None:
            return None
        return next((r for r in rows if r.get("val_loss") is not None
                     and r["val_loss"] <= cfg.target_loss), None)

    try:
        while step < cfg.max_steps and reached(history) is None:
            start = time.perf_counter()
            row = method.step(step)
            step_time = time.perf_counter() - start
            # parameters are the same on every rank and the losses are global: every rank
            # raises together
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingDivergedError(
                    f"parameters became NaN or Inf at step {step + 1} ({cfg.optimizer}, train "
                    f"loss {row['train_loss']:.4g}); no checkpoint of this state was written")
            if ema is not None:
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        ema[k].lerp_(p, 1 - cfg.ema_decay)
            step += 1
            tokens += tokens_per_step
            last = step == cfg.max_steps
            val_loss = evaluate() if step % cfg.eval_every == 0 or last else None
            now = time.perf_counter()
            wall += now - start
            if costs is not None:
                costs["tokens_solve"] += row["tokens_solve"]
                costs["tokens_line_search"] += row["tokens_line_search"]
                for k, v in row["passes"].items():
                    costs["passes"][k] = costs["passes"].get(k, 0) + int(v)
                costs["eval_time"] += now - start - step_time
            row = {"step": step, "tokens": tokens, **row, "val_loss": val_loss,
                   "wall_time": round(wall, 4), **_cost_fields(costs, step_time)}
            if not _finite(row):
                raise TrainingDivergedError(
                    f"loss is NaN or Inf at step {step} ({cfg.optimizer}: train loss "
                    f"{row['train_loss']}, val loss {row['val_loss']}); no checkpoint of this "
                    "state was written")
            record(row)
            if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                snapshot(out / f"step_{step:06d}.pt", row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{row['train_loss']:.4f}",
                                val=f"{val_loss:.4f}" if val_loss is not None else "-")
            if callable(progress):
                progress(row)
    finally:
        if bar is not None:
            bar.close()
    final = None
    if out is not None:
        final = str(snapshot(out / "final.pt", history[-1]))
    hit = reached(history)
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    return TrainResult(cfg, model, step, tokens, vals[-1] if vals else None,
                       hit["step"] if hit else None, hit["tokens"] if hit else None,
                       tuple(history), final, wall)
