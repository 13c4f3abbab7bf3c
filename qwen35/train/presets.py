"""Model shapes to train: the presets ``qwen35 train --model`` and :class:`qwen35.train.config.TrainConfig`
name, and the model a config body makes.

A preset is a config.json body (text-only, official layout); its ``vocab_size`` is replaced by the trained
tokenizer's size when the model is built.  "embedded" is the shipped default model
(:data:`qwen35.train.embedded.EMBEDDED_MODEL`, where its shape is explained); "tiny" is the smallest model that
still has every mechanism, for tests and smoke runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM

TINY_MODEL: dict[str, Any] = {
    # the smallest model that still has every mechanism: 3 DeltaNet + 1 attention layer, MoE with shared expert
    "model_type": "qwen3_5_moe_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "router_aux_loss_coef": 0.001,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                        "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "mtp_num_hidden_layers": 1,
}


PRESETS = ("tiny", "embedded")


def model_preset(name: str) -> dict[str, Any]:
    """A training preset's config.json body: "tiny" (tests, smoke runs) or "embedded" (the shipped model)."""
    if name == "tiny":
        return json.loads(json.dumps(TINY_MODEL))
    if name == "embedded":
        from qwen35.train.embedded import (
            EMBEDDED_MODEL,  # lazy: embedded imports the trainer, which imports this
        )

        return json.loads(json.dumps(EMBEDDED_MODEL))
    raise ValueError(f"unknown training preset {name!r}; known: {', '.join(PRESETS)}")


def build_model(body: Mapping[str, Any], vocab_size: int, token_ids: Mapping[str, int] | None = None
                ) -> Qwen35ForCausalLM:
    """The model of a config body with the tokenizer's vocabulary size and special ids filled in."""
    d = json.loads(json.dumps(body))
    text = d["text_config"] if "text_config" in d else d
    text["vocab_size"] = vocab_size
    if token_ids is not None:
        # official convention: bos = eos = pad = <|endoftext|> in config.json; <|im_end|> ends a chat turn and
        # is listed in generation_config.json
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            text[key] = token_ids["<|endoftext|>"]
    return Qwen35ForCausalLM(config_from_dict(d, source="training config"))


__all__ = ["TINY_MODEL", "PRESETS", "model_preset", "build_model"]
