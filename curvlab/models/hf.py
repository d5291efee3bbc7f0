"""Hugging Face ``transformers`` causal LMs (optional dependency) made safe for curvature.

:func:`load_hf_folder` loads a local ``save_pretrained`` folder (never the hub) and
:func:`prepare_hf_model` makes any loaded Hugging Face model fit for second-order passes:

- attention runs through ``curvlab_math``, an eager attention registered with
  ``transformers.AttentionInterface``: ``softmax(q kᵀ · scaling + mask) v`` in the input dtype,
  differentiable to any order (SDPA / flash kernels support neither forward-mode AD nor double
  backward; ``transformers``' own eager attention keeps the Llama softmax in float32);
- ``use_cache`` is switched off (no key/value cache objects inside ``torch.func`` transforms);
- with ``float64=True``, RMSNorm modules (which cast to float32 internally) and default rotary
  embeddings (whose tables are computed in float32) are given float64-preserving forwards, so
  that the whole computation runs in float64. Anything else that still downcasts is listed in
  the returned notes.

Labels: curvlab never passes ``labels`` to the model; it takes ``logits[:, t]`` as the
prediction of ``targets[:, t] = inputs[:, t + 1]`` (no double shifting).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlab.errors import CheckpointError, CurvlabError

ATTENTION_NAME = "curvlab_math"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CurvlabError(
            "loading a Hugging Face model needs the optional package 'transformers' "
            "(pip install transformers)"
        ) from None
    return transformers


def _math_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(scores.dtype)
    else:
        t, s = query.shape[-2], key.shape[-2]
        causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _register_attention() -> None:
    transformers = _transformers()
    transformers.AttentionInterface.register(ATTENTION_NAME, _math_attention)


def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    x = hidden_states
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    freqs = position_ids[..., None].to(self.inv_freq.dtype) * self.inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = getattr(self, "attention_scaling", 1.0)
    return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def prepare_hf_model(model: nn.Module, float64: bool = False) -> list[str]:
    """Make a Hugging Face model fit for second-order passes (see module docstring).

    Returns notes on operations that still run below float64 when ``float64`` is asked for.
    """
    _register_attention()
    config = getattr(model, "config", None)
    if config is not None:
        config._attn_implementation = ATTENTION_NAME
        for sub in model.modules():
            if getattr(sub, "config", None) is not None:
                sub.config._attn_implementation = ATTENTION_NAME
        config.use_cache = False
    notes = []
    if float64:
        for name, module in model.named_modules():
            cls = type(module).__name__
            if cls.endswith("RMSNorm") and hasattr(module, "weight"):
                module.forward = types.MethodType(_rms_forward, module)
            elif hasattr(module, "inv_freq") and "Rotary" in cls:
                if getattr(module, "rope_type", "default") == "default":
                    module.forward = types.MethodType(_rotary_forward, module)
                else:
                    notes.append(f"{name} ({cls}, rope_type={module.rope_type}): rotary tables "
                                 "stay float32 (relative accuracy ~1e-7)")
    return notes


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf_folder(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """Load a local ``save_pretrained`` folder as a causal LM in eval mode.

    Returns ``(model, meta, notes)``: ``meta`` has ``model_type``, ``vocab_size``,
    ``seq_len`` (max positions) and the config as a dict; ``notes`` see :func:`prepare_hf_model`.
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
    _register_attention()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, attn_implementation=ATTENTION_NAME,
            dtype=dtype or torch.float32,
        )
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the model ({msg[:200]})") from None
    notes = prepare_hf_model(model, float64=dtype == torch.float64)
    model.eval().to(device)
    vocab = int(getattr(config, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    seq_len = int(getattr(config, "max_position_embeddings", 0)
                  or getattr(config, "n_positions", 0) or 2048)
    meta = {"model_type": config.model_type, "vocab_size": vocab, "seq_len": seq_len,
            "config": config.to_dict()}
    return model, meta, notes
