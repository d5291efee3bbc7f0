"""Logits from whatever a model's forward returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from curvlab.errors import CurvlabError


def extract_logits(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, a tuple/list starting with one, or ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CurvlabError(
        f"cannot find logits in the model output of type {type(output).__name__}; "
        "pass logits_fn=... to say how to get them"
    )
