"""Model configurations and presets.

A :class:`ModelConfig` fully determines a model's architecture; together with a state dict it
is what a checkpoint stores. Two families exist:

- ``llama``: RMSNorm, rotary position embeddings, SwiGLU MLP, untied LM head, no biases
  (the architecture of arXiv 2510.09378).
- ``gpt``: GPT-2 / nanoGPT: LayerNorm (optional bias), learned positions, GELU MLP, head tied
  to the token embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from curvlab.errors import ConfigError

FAMILIES = ("llama", "gpt")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    ``d_ff`` is the hidden width of the MLP (for SwiGLU: of each of the gate and up
    projections). ``bias`` only applies to the ``gpt`` family; ``rope_theta`` only to ``llama``.
    """

    family: str = "llama"
    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 176
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(
                f"unknown model family {self.family!r}; expected one of {', '.join(FAMILIES)}"
            )
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.family == "llama" and (self.d_model // self.n_heads) % 2:
            raise ConfigError("model config: rotary embeddings need an even head dimension")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return strict_from_dict(cls, d, "model config")

    def replace(self, **changes: Any) -> ModelConfig:
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)


def strict_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """``cls(**d)`` for a dataclass, refusing fields it does not have (``what: unknown
    field(s) ...``)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # LLaMA-style (the paper's architecture)
    "tiny": ModelConfig("llama", 256, 64, 64, 2, 4, 176),
    "small": ModelConfig("llama", 256, 256, 256, 4, 8, 688),
    "45m": ModelConfig("llama", 32000, 1024, 512, 4, 8, 2048),
    "150m": ModelConfig("llama", 32000, 1024, 768, 12, 16, 3072),
    # GPT-2 / nanoGPT-style
    "gpt-tiny": ModelConfig("gpt", 256, 64, 64, 2, 4, 256, bias=True, tie_embeddings=True),
    "gpt-small": ModelConfig("gpt", 256, 256, 256, 4, 8, 1024, bias=True, tie_embeddings=True),
    "gpt2": ModelConfig("gpt", 50304, 1024, 768, 12, 12, 3072, bias=True, tie_embeddings=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The configuration of preset ``name`` with optional overrides (e.g. ``vocab_size=``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
