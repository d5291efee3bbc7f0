"""Transformer language models: LLaMA-style and GPT-style decoders, presets, loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from curvlab.models.attention import ATTENTION_IMPLS, math_attention, second_order_active
from curvlab.models.config import FAMILIES, PRESETS, ModelConfig, preset
from curvlab.models.gpt import GPT
from curvlab.models.llama import Llama

__all__ = [
    "ATTENTION_IMPLS",
    "FAMILIES",
    "GPT",
    "Llama",
    "ModelConfig",
    "PRESETS",
    "build_model",
    "lm_loss",
    "math_attention",
    "num_parameters",
    "preset",
    "second_order_active",
    "set_attention",
]


def build_model(config: ModelConfig, seed: int = 0) -> nn.Module:
    """A freshly initialized model (deterministic for a given seed on CPU).

    Weights ~ N(0, 0.02²); output projections of residual branches ~ N(0, (0.02/sqrt(2L))²)
    as in GPT-2; norm weights 1, biases 0.
    """
    model = (Llama if config.family == "llama" else GPT)(config)
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight",
                                                 "c_proj.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def set_attention(model: nn.Module, impl: str) -> nn.Module:
    """Set the attention implementation (``auto``, ``math`` or ``sdpa``) of every layer."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected {ATTENTION_IMPLS}")
    for module in model.modules():
        if hasattr(module, "attn_impl"):
            module.attn_impl = impl
    return model


def num_parameters(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy over all targets that are not ``ignore_index``."""
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )
