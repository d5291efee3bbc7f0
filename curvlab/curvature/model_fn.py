"""The model as a pure function of (a subset of) its parameters, for ``torch.func``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from curvlab.models.output import extract_logits

LogitsFn = Callable[[nn.Module, Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def default_logits_fn(
    model: nn.Module, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """``model(inputs, **kwargs)`` evaluated at ``params`` (tied weights follow their first
    name; parameters missing from ``params`` keep the module's values)."""
    return extract_logits(functional_call(model, dict(params), (inputs,), kwargs or None,
                                          tie_weights=True))


def model_params(
    model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Detached unique parameters in ``named_parameters()`` order, optionally cast / moved."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if dtype is not None or device is not None:
            t = t.to(device=device, dtype=dtype)
        out[name] = t
    return out


class FlatLogits(nn.Module):
    """``model`` with logits flattened to ``[tokens, vocab]``: the shape peer libraries
    (curvlinops, BackPACK) expect for a cross-entropy over tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = extract_logits(self.model(inputs))
        return out.reshape(-1, out.shape[-1])
