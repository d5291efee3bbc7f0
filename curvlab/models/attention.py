"""Causal self-attention kernels and the choice between them.

Two implementations compute the same function ``softmax(q kᵀ / sqrt(d) + causal mask) v``:

- ``math``: written out with matmul/softmax. Supports forward-mode AD (``torch.func.jvp``),
  forward-over-reverse and double backward. Every second-order path uses it.
- ``sdpa``: PyTorch's fused ``scaled_dot_product_attention``. Faster, but its fused kernels
  (flash, memory-efficient, cuDNN, CPU flash) support neither forward-mode AD nor double
  backward.

``"auto"`` (the default of every curvlab model) picks ``sdpa`` only on first-order paths: no
``torch.func`` transform is active, no forward-AD dual level is open, no :func:`math_attention`
context is entered, and either gradients are off or the module is in training mode (eval mode,
the mode of every analysis, always uses ``math`` when gradients are on, so plain-autograd double
backward on a loaded checkpoint is correct).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

ATTENTION_IMPLS = ("auto", "math", "sdpa")
_state = threading.local()


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Force the differentiable-to-any-order math attention inside this context."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def second_order_active() -> bool:
    """True when the current forward pass may be differentiated beyond first order."""
    if getattr(_state, "depth", 0) > 0:
        return True
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return forward_ad._current_level >= 0


def use_fused(impl: str, training: bool) -> bool:
    if impl == "math":
        return False
    if impl == "sdpa":
        return True
    if second_order_active():
        return False
    return training or not torch.is_grad_enabled()


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool
) -> torch.Tensor:
    """Causal attention on ``[batch, heads, seq, head_dim]`` tensors."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
