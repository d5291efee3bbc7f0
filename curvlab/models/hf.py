"""Hugging Face ``transformers`` causal LMs (optional dependency), exactly as their family
computes them.

:func:`load_hf_folder` loads a local ``save_pretrained`` folder (never the hub) and
:func:`prepare_hf_model` makes a loaded model fit for second-order passes *without replacing
any of its code*:

- attention runs through the family's own ``eager`` implementation (soft-capping, sliding
  windows, ALiBi, sinks and scaling exactly as the family defines them; differentiable to any
  order), not SDPA/flash kernels, which support neither forward-mode AD nor double backward;
- ``use_cache`` is switched off (no key/value cache objects inside ``torch.func`` transforms);
- custom ``autograd.Function``s (Bloom's GeLU) run through their forward, after checking on the
  probe batch that their backward is its derivative (:mod:`curvlab.models.custom_functions`);
- with ``float64=True`` every forward runs under :func:`curvlab.models.float64.float64_computation`
  (the family's own casts to float32 stay float64) and non-persistent buffers (rotary tables,
  sinusoidal positions) are recomputed in float64 by the family's own constructor.

**Fidelity check.** Before anything is analyzed, the prepared model's logits on a fixed probe
batch are compared with the stock model's own forward (for a folder: loaded in float32 with
its default attention); a relative difference ``max|Δz| / max|z|`` above :data:`FIDELITY_RTOL`
is refused with one line, as are float64 forwards in which a dispatch spy still sees an
operation below float64, and models that forward-mode AD cannot differentiate (naming the
module). The outcome is :class:`Fidelity`, attached to the model as ``model.curvlab_fidelity``.

Labels: curvlab never passes ``labels`` to the model; it takes ``logits[:, t]`` as the
prediction of ``targets[:, t] = inputs[:, t + 1]`` (no double shifting).
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlab.errors import CheckpointError, CurvlabError
from curvlab.models import custom_functions
from curvlab.models.float64 import LowPrecisionSpy, float64_computation, recompute_buffers
from curvlab.models.output import extract_logits

ATTENTION = "eager"
FIDELITY_RTOL = 1e-4  # relative logit difference to the stock forward that is refused
PROBE_SHAPE = (2, 16)  # probe batch: 2 sequences of up to 16 tokens (seed 0)
_state = threading.local()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CurvlabError(
            "loading a Hugging Face model needs the optional package 'transformers' "
            "(pip install transformers)"
        ) from None
    return transformers


@dataclass(frozen=True)
class Fidelity:
    """How the prepared model compares with the stock one on the probe batch.

    relative: ``max|z − z_stock| / max|z_stock|``; max_abs: ``max|z − z_stock|``;
    scale: ``max|z_stock|``; reference: what ``z_stock`` came from; low_precision_ops: ATen
    operations below float64 in one float64 forward (0; ``None`` when not float64);
    unrolled: custom autograd Functions run through their forward, with their module.
    """

    family: str
    relative: float
    max_abs: float
    scale: float
    reference: str
    float64: bool
    low_precision_ops: int | None
    unrolled: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return self.relative <= FIDELITY_RTOL and not self.low_precision_ops


def probe_batch(vocab_size: int, max_positions: int) -> torch.Tensor:
    """The fixed probe inputs of the fidelity check (token ids, seed 0)."""
    b, t = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (b, min(t, max_positions)), generator=gen)


def _family(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _vocab(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        vocab = model.get_output_embeddings().weight.shape[0]
    return int(vocab)


def _max_positions(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0)
               or 2048)


@torch.no_grad()
def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return extract_logits(model(inputs.to(dev))).detach().double().cpu()


def _set_eager(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(ATTENTION)
        except (ValueError, ImportError, AttributeError):
            pass
    for sub in model.modules():
        sub_config = getattr(sub, "config", None)
        if sub_config is not None and getattr(sub_config, "_attn_implementation", None) \
                != ATTENTION:
            try:
                sub_config._attn_implementation = ATTENTION
            except (AttributeError, ValueError):
                pass
    config.use_cache = False


def _enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    stack = contextlib.ExitStack()
    stack.enter_context(custom_functions.unrolled(module._curvlab_unrolled))
    if module._curvlab_float64:
        stack.enter_context(float64_computation())
    _state.__dict__.setdefault("stacks", []).append(stack)
    return _explicit_mask(args, kwargs)


def _explicit_mask(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Without a mask or positions, Hugging Face's mask builder tests ``position_ids`` for
    packed sequences with a data-dependent branch, which ``torch.func.linearize`` cannot trace;
    an all-ones mask (no padding: the same causal mask) skips that test."""
    ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return None
    if kwargs.get("attention_mask") is not None or kwargs.get("position_ids") is not None \
            or len(args) > 1:
        return None
    kwargs = dict(kwargs, attention_mask=torch.ones(ids.shape, dtype=torch.long,
                                                    device=ids.device))
    return args, kwargs


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    _state.stacks.pop().close()


def _install(model: nn.Module, float64: bool, unrolled: frozenset) -> None:
    """Forward hooks on the top module: every forward (curvlab's, ``torch.func``'s, the
    user's) runs in float64 (when asked) with the validated custom Functions unrolled."""
    model._curvlab_float64 = float64
    model._curvlab_unrolled = unrolled
    if getattr(model, "_curvlab_hooks", None) is None:
        model._curvlab_hooks = (model.register_forward_pre_hook(_enter, with_kwargs=True),
                                model.register_forward_hook(_exit, always_call=True))


def prepare_hf_model(
    model: nn.Module, float64: bool = False, *, reference_logits: torch.Tensor | None = None,
    reference: str = "the model's own forward before preparation",
) -> list[str]:
    """Make a Hugging Face model fit for second-order passes and check it (module docstring).

    ``reference_logits``: the stock model's logits on :func:`probe_batch` (computed here from
    ``model`` itself, before any change, when not given). ``float64=True`` needs float64
    parameters. Raises :class:`curvlab.errors.CheckpointError` (one line) when the prepared
    model is not the stock one. Returns notes for the user (custom Functions unrolled).
    Calling it again on a prepared model re-checks it.
    """
    family = _family(model)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if float64 and dtypes != {torch.float64}:
        raise CurvlabError(f"{family}: float64 preparation needs float64 parameters "
                           f"(found {', '.join(sorted(map(str, dtypes)))}); load it with "
                           "dtype=torch.float64")
    probe = probe_batch(_vocab(model), _max_positions(model))
    was_training = model.training
    model.eval()
    if reference_logits is None:
        reference_logits = _logits(model, probe)
    _set_eager(model)
    if float64:
        config = model.config
        recompute_buffers(model, lambda: type(model)(config))
    unrolled, notes = _check_custom_functions(model, probe, family, float64)
    _install(model, float64, unrolled)
    spy = LowPrecisionSpy() if float64 else None
    with spy or contextlib.nullcontext():
        logits = _logits(model, probe)
    _check_forward_mode(model, probe, family)
    diff = float((logits - reference_logits).abs().max())
    scale = float(reference_logits.abs().max())
    fidelity = Fidelity(family, diff / max(scale, 1e-30), diff, scale, reference, float64,
                        sum(spy.ops.values()) if spy else None, tuple(notes))
    model.curvlab_fidelity = fidelity
    model.train(was_training)
    if spy is not None and spy.ops:
        raise CheckpointError(f"{family}: float64 was asked for but {spy.summary()} in the "
                              "prepared forward; refused")
    if fidelity.relative > FIDELITY_RTOL:
        raise CheckpointError(
            f"{family}: the prepared model's logits differ from {reference} by "
            f"{fidelity.relative:.1e} relative (max |Δ| {diff:.1e} at max |logit| {scale:.2g}, "
            f"tolerance {FIDELITY_RTOL:.0e}); refused")
    return [f"{n}: differentiated through its forward" for n in notes]


def _check_custom_functions(model: nn.Module, probe: torch.Tensor, family: str,
                            float64: bool) -> tuple[frozenset, list[str]]:
    _install(model, float64, frozenset())
    with custom_functions.recording(model) as calls:
        _logits(model, probe)
    seen: dict[type, custom_functions.Call] = {}
    for call in calls:
        seen.setdefault(call.cls, call)
    notes = []
    for cls, call in seen.items():
        try:
            err = custom_functions.validate(call, 1e-8 if float64 else 1e-4)
        except custom_functions.CustomFunctionError as e:
            raise CheckpointError(f"{family}: module {call.module} calls a custom "
                                  f"autograd.Function that curvlab cannot differentiate: {e}"
                                  ) from None
        notes.append(f"{call.module} runs {cls.__qualname__} (custom autograd.Function; its "
                     f"backward equals the derivative of its forward to {err:.0e})")
    return frozenset(seen), notes


def _check_forward_mode(model: nn.Module, probe: torch.Tensor, family: str) -> None:
    """One forward-mode product through every parameter; refuses naming the failing module."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                for n, p in params.items()}
    dev = next(iter(params.values())).device

    def f(p):
        return extract_logits(torch.func.functional_call(model, p, (probe.to(dev),),
                                                         tie_weights=True))

    modules = {id(m): n or "<model>" for n, m in model.named_modules()}
    stack: list[str] = []  # modules entered and not left: the innermost one failed

    def push(module, args):
        stack.append(modules[id(module)])

    def pop(module, args, output):
        stack.pop()

    handles = [m.register_forward_pre_hook(push) for m in model.modules()]
    handles += [m.register_forward_hook(pop) for m in model.modules()]
    try:
        torch.func.jvp(f, (params,), (tangents,))
    except Exception as e:  # any failure inside the family code
        where = stack[-1] if stack else "<model>"
        cls = type(model.get_submodule("" if where == "<model>" else where)).__name__
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"{family}: forward-mode AD fails in module {where} ({cls}): "
                              f"{msg}; refused") from None
    finally:
        for h in handles:
            h.remove()


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _from_pretrained(transformers, path: Path, **kwargs) -> nn.Module:
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                                 **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the model ({msg[:200]})") from None


def load_stock(path: str | Path) -> nn.Module:
    """The folder's model exactly as ``transformers`` loads it by default (float32, its default
    attention, nothing of curvlab's), in eval mode: the oracle of the fidelity check."""
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return _from_pretrained(transformers, Path(path), dtype=torch.float32).eval()


def stock_description(stock: nn.Module) -> str:
    return (f"the stock {_family(stock)} model (float32, "
            f"{stock.config._attn_implementation} attention)")


def load_hf_folder(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """Load a local ``save_pretrained`` folder as a causal LM in eval mode, prepared and
    checked against the stock model (float32, its default attention) by
    :func:`prepare_hf_model`.

    Returns ``(model, meta, notes)``: ``meta`` has ``model_type``, ``vocab_size``,
    ``seq_len`` (max positions), the config as a dict and the fidelity check's numbers.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model folder (no config.json)")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable Hugging Face config ({msg})") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    dtype = dtype or torch.float32
    stock = load_stock(path)
    reference = stock_description(stock)
    ref_logits = _logits(stock, probe_batch(_vocab(stock), _max_positions(stock)))
    if dtype == torch.float32:
        model = stock
    else:
        del stock
        gc.collect()
        model = _from_pretrained(transformers, path, dtype=dtype, attn_implementation=ATTENTION)
    notes = prepare_hf_model(model, float64=dtype == torch.float64,
                             reference_logits=ref_logits, reference=reference)
    model.eval().to(device)
    vocab = _vocab(model)
    seq_len = _max_positions(model)
    fid = model.curvlab_fidelity
    meta = {"model_type": config.model_type, "vocab_size": vocab, "seq_len": seq_len,
            "config": config.to_dict(),
            "fidelity": {"relative": fid.relative, "max_abs": fid.max_abs,
                         "low_precision_ops": fid.low_precision_ops}}
    return model, meta, notes
