"""GPT-2 / nanoGPT-style decoder.

Pre-norm blocks with LayerNorm (optional bias), learned absolute positions, a GELU MLP and the
LM head tied to the token embedding. Parameter names and the fused ``c_attn`` projection follow
nanoGPT (``transformer.{wte, wpe, h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj}, ln_f}``, ``lm_head``) so that nanoGPT checkpoints load unchanged and give the same
logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvlab.errors import ConfigError
from curvlab.models.attention import causal_attention, use_fused
from curvlab.models.config import ModelConfig


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional (PyTorch's module cannot drop only the bias)."""

    def __init__(self, dim: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = causal_attention(q, k, v, use_fused(self.attn_impl, self.training))
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPTMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.d_model, cfg.bias, cfg.norm_eps)
        self.attn = GPTAttention(cfg)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.bias, cfg.norm_eps)
        self.mlp = GPTMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-style decoder; ``forward(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=nn.Embedding(cfg.seq_len, cfg.d_model),
                h=nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layers)),
                ln_f=LayerNorm(cfg.d_model, cfg.bias, cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[-1]
        if t > self.config.seq_len:
            raise ConfigError(
                f"sequence length {t} exceeds the model's seq_len {self.config.seq_len}"
            )
        pos = torch.arange(t, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))
