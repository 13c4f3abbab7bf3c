"""Random-weight checkpoints written by transformers itself: the oracle for model parity tests.

Weights get a non-trivial random perturbation (norm offsets, gates, router) so that no component hides behind
its initial value (zero-centred norms start at w = 0, the gated norm at 1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

ROPE = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25, mrope_section=[2, 1, 1],
            mrope_interleaved=True)


def text_kwargs(**over):
    kw = dict(vocab_size=160, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
              linear_value_head_dim=8, rope_parameters=dict(ROPE), max_position_embeddings=4096)
    kw.update(over)
    return kw


def build_hf(moe: bool, multimodal: bool, tie: bool = False, seed: int = 0, **over):
    """A transformers Qwen3.5 model with random weights (eval mode, float32)."""
    import transformers as tf

    torch.manual_seed(seed)
    if moe:
        kw = text_kwargs(**{**dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48), **over})
    else:
        kw = text_kwargs(**{"intermediate_size": 96, **over})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if multimodal:
            vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=kw["hidden_size"])
            cls_cfg = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
            cfg = cls_cfg(text_config=kw, vision_config=vision, tie_word_embeddings=tie)
            model = (tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration)(cfg)
        else:
            cfg = (tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig)(tie_word_embeddings=tie, **kw)
            model = (tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.02))
    return model.eval()


def save_hf(model, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
