"""Tiny random Hugging Face causal LMs of every family curvlab supports, built from their
config classes (nothing downloaded) and saved with ``save_pretrained`` as users save them.

Every config is small enough for a dense float64 GGN (a few thousand parameters), has at least
two layers, grouped-query attention where the family has it, and the family's value-changing
features switched to settings the probe batch reaches: sliding windows shorter than the
sequence, soft-capping thresholds near the logits' size, ALiBi, parallel residuals.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 48
SEQ = 12  # longer than every sliding window below
WINDOW = 4

_ROTARY = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
               bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)

# family -> (config class, model class, config keyword arguments)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_ROTARY)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_ROTARY, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(_ROTARY, use_sliding_window=True, sliding_window=WINDOW,
                   max_window_layers=1, layer_types=["sliding_attention", "full_attention"])),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_ROTARY, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_ROTARY, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_ROTARY, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0, query_pre_attn_scalar=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(_ROTARY, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                         layer_types=["sliding_attention", "full_attention"])),
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(_ROTARY, partial_rotary_factor=0.5, num_key_value_heads=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_ROTARY, pad_token_id=2)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 dict(_ROTARY, partial_rotary_factor=0.5, use_qkv_bias=True)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_ROTARY)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_ROTARY)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(_ROTARY, embedding_multiplier=2.0, residual_multiplier=0.5,
                     attention_multiplier=0.3, logits_scaling=2.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_ROTARY, logit_scale=0.5)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                  bos_token_id=0, eos_token_id=1)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                      rotary_pct=0.5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                  rotary_dim=4, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=16, ffn_dim=24, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                 bos_token_id=0, eos_token_id=1, pad_token_id=2)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, num_kv_heads=1, new_decoder_architecture=False,
                    multi_query=True, parallel_attn=True, bias=False, alibi=False,
                    max_position_embeddings=32, bos_token_id=0, eos_token_id=1)),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM",
                     dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, multi_query=False, parallel_attn=False,
                          bias=True, alibi=True, max_position_embeddings=32, bos_token_id=0,
                          eos_token_id=1)),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2, bos_token_id=0,
                   eos_token_id=1, pad_token_id=2)),
}


def build(family: str, seed: int = 0):
    """A randomly initialized model of ``family`` with O(1) logits (float32, as saved)."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # O(1) logits; norm weights and biases away from their init
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save(family: str, folder: Path, seed: int = 0) -> Path:
    build(family, seed).save_pretrained(folder)
    return folder


def available(family: str) -> bool:
    import transformers

    config_cls, model_cls, _ = FAMILIES[family]
    return hasattr(transformers, config_cls) and hasattr(transformers, model_cls)
