"""Official model shapes, written out as the config.json bodies the checkpoints ship.

Every value comes from /work/shared/reference/qwen35-facts.md (§1): the text decoder of each size (§1.2 table),
the vision tower of each size (§1.2 "Vision towers of the small models"), and the shared settings every
checkpoint carries (RoPE θ 1e7 with interleaved M-RoPE keys, 262,144 positions, one MTP layer, fp32 SSM state).
The bodies use the multimodal wrapper form (``qwen3_5`` / ``qwen3_5_moe`` with ``text_config`` and
``vision_config``) because that is what the official repositories publish; ``preset_config`` parses them with
the same :func:`qwen35.config.config_from_dict` a real checkpoint goes through, so a preset can never hold a
value the loader would reject.

Caveats carried over from the facts file: the 2B vision tower is *inferred* to match the 4B one (output width
2048), and the 2B / 4B / 9B tie flags are inferred from published parameter totals.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from .config import ModelConfig, config_from_dict

__all__ = ["PRESETS", "QWEN36_SIZES", "normalize_preset_name", "preset_config", "preset_display_name", "preset_names"]

# Shared by every size (facts §1.1 / §1.2 / §1.3).
_VOCAB = 248_320
_EOS = 248_044  # <|endoftext|>; text_config carries it for both bos and eos in the Qwen3.6-27B dump
_ROPE = {
    "mrope_interleaved": True,
    "mrope_section": [11, 11, 10],
    "partial_rotary_factor": 0.25,
    "rope_theta": 10_000_000,
    "rope_type": "default",
}
_SPECIAL_IDS = {
    "image_token_id": 248_056,
    "video_token_id": 248_057,
    "vision_start_token_id": 248_053,
    "vision_end_token_id": 248_054,
}

# Vision towers (facts §0 / §1.1 / §1.2).  Only depth, width, heads, MLP width and the output width differ.
_VISION_SMALL_0_8B = dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072)
_VISION_MEDIUM = dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096)  # 4B, and 2B [inferred]
_VISION_LARGE = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304)  # 9B and up


def _layer_types(n_layers: int, interval: int = 4) -> list[str]:
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]


def _vision(tower: dict[str, int], out_hidden_size: int) -> dict[str, Any]:
    return {
        **tower,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
        "out_hidden_size": out_hidden_size,
        "deepstack_visual_indexes": [],
        "initializer_range": 0.02,
    }


def _body(*, hidden: int, layers: int, heads: int, kv_heads: int, v_heads: int, tie: bool,
          vision: dict[str, int], intermediate: int | None = None,
          moe: tuple[int, int, int, int] | None = None) -> dict[str, Any]:
    """One config.json body.  ``moe`` = (experts, top-k, expert width, shared-expert width)."""
    text: dict[str, Any] = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "vocab_size": _VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "layer_types": _layer_types(layers),
        "full_attention_interval": 4,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 256,
        "attention_bias": False,
        "attn_output_gate": True,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": v_heads,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "rope_parameters": dict(_ROPE),
        "partial_rotary_factor": 0.25,
        "max_position_embeddings": 262_144,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "mamba_ssm_dtype": "float32",
        "tie_word_embeddings": tie,
        "bos_token_id": _EOS,
        "eos_token_id": _EOS,
        "dtype": "bfloat16",
    }
    if moe:
        experts, top_k, expert_width, shared_width = moe
        text.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_width,
                    shared_expert_intermediate_size=shared_width, router_aux_loss_coef=0.001)
    else:
        assert intermediate is not None
        text["intermediate_size"] = intermediate
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "text_config": text,
        "vision_config": _vision(vision, out_hidden_size=hidden),
        # transformers ties by this top-level flag only (facts §1.1), so it must agree with text_config's
        "tie_word_embeddings": tie,
        "language_model_only": False,
        **_SPECIAL_IDS,
        "dtype": "bfloat16",
    }


PRESETS: dict[str, dict[str, Any]] = {
    "0.8B": _body(hidden=1024, layers=24, heads=8, kv_heads=2, v_heads=16, intermediate=3584, tie=True,
                  vision=_VISION_SMALL_0_8B),
    "2B": _body(hidden=2048, layers=24, heads=8, kv_heads=2, v_heads=16, intermediate=6144, tie=True,
                vision=_VISION_MEDIUM),
    "4B": _body(hidden=2560, layers=32, heads=16, kv_heads=4, v_heads=32, intermediate=9216, tie=True,
                vision=_VISION_MEDIUM),
    "9B": _body(hidden=4096, layers=32, heads=16, kv_heads=4, v_heads=32, intermediate=12288, tie=False,
                vision=_VISION_LARGE),
    "27B": _body(hidden=5120, layers=64, heads=24, kv_heads=4, v_heads=48, intermediate=17408, tie=False,
                 vision=_VISION_LARGE),
    "35B-A3B": _body(hidden=2048, layers=40, heads=16, kv_heads=2, v_heads=32, moe=(256, 8, 512, 512), tie=False,
                     vision=_VISION_LARGE),
    "122B-A10B": _body(hidden=3072, layers=48, heads=32, kv_heads=2, v_heads=64, moe=(256, 8, 1024, 1024),
                       tie=False, vision=_VISION_LARGE),
    "397B-A17B": _body(hidden=4096, layers=60, heads=32, kv_heads=2, v_heads=64, moe=(512, 10, 1024, 1024),
                       tie=False, vision=_VISION_LARGE),
}


def preset_names() -> list[str]:
    return list(PRESETS)


# Qwen3.6 shares Qwen3.5's architecture, classes and config keys (facts §1.3); these sizes were released.
QWEN36_SIZES = ("27B", "35B-A3B")


def _split_family(name: str) -> tuple[str, str]:
    """("Qwen3.5" | "Qwen3.6", the rest upper-cased) of a preset name; no family prefix means Qwen3.5."""
    key = name.strip().upper().rsplit("/", 1)[-1]  # a hub-style owner prefix is accepted
    match = re.match(r"^QWEN3[._]?([56])[-_ ]?", key)
    family = "Qwen3.6" if match and match.group(1) == "6" else "Qwen3.5"
    return family, (key[match.end():] if match else key).replace("_", "-")


def normalize_preset_name(name: str) -> str:
    """Map "397b-a17b", "Qwen3.5-397B-A17B", "qwen/qwen3.6-27b" etc. to a PRESETS key.

    Raises ValueError listing the valid names when nothing matches, and for a Qwen3.6 size that was not released.
    """
    family, key = _split_family(name)
    for preset in PRESETS:
        if preset.upper() == key:
            if family == "Qwen3.6" and preset not in QWEN36_SIZES:
                raise ValueError(f"there is no Qwen3.6-{preset}: Qwen3.6 was released as "
                                 f"{' and '.join(QWEN36_SIZES)} (the Qwen3.5 sizes are {', '.join(PRESETS)})")
            return preset
    raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)} (Qwen3.5), and "
                     f"{', '.join(QWEN36_SIZES)} as Qwen3.6-...")


def preset_display_name(name: str) -> str:
    """"Qwen3.6-35B-A3B" for a Qwen3.6 name, "Qwen3.5-35B-A3B" otherwise (the shapes are the same)."""
    return f"{_split_family(name)[0]}-{normalize_preset_name(name)}"


def preset_config(name: str) -> ModelConfig:
    """The parsed :class:`ModelConfig` of an official size (see :data:`PRESETS` for the accepted names)."""
    key = normalize_preset_name(name)
    return config_from_dict(copy.deepcopy(PRESETS[key]), source=f"preset {key}")
