"""config.json -> typed, validated configuration.

Reads the four model types of the family (``qwen3_5``, ``qwen3_5_moe`` multimodal wrappers with a
``text_config`` and a ``vision_config``; ``qwen3_5_text``, ``qwen3_5_moe_text`` text-only) and every historical
spelling of the RoPE settings.  Whatever is wrong is reported as a :class:`ConfigError` naming the field and the file.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MULTIMODAL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
TEXT_TYPES = {"qwen3_5_text", "qwen3_5_moe_text"}
LAYER_TYPES = ("linear_attention", "full_attention")

# Keys that official and transformers-saved configs carry and that change nothing in the forward pass.
_INERT_TEXT_KEYS = {
    "initializer_range", "use_cache", "attention_dropout", "output_router_logits", "dtype", "torch_dtype",
    "transformers_version", "architectures", "model_type", "attn_output_gate", "output_gate_type",
    "mtp_use_dedicated_embeddings", "full_attention_interval", "_name_or_path", "bos_token_id", "eos_token_id",
    "pad_token_id", "layer_types", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
    "mrope_section", "mrope_interleaved", "tie_word_embeddings", "quantization_config", "decoder_sparse_step",
    "norm_topk_prob", "mlp_only_layers", "moe_router_use_sigmoid", "return_dict", "output_hidden_states",
    "output_attentions", "use_sliding_window", "sliding_window", "max_window_layers", "id2label", "label2id",
    "problem_type", "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder", "keys_to_ignore_at_inference",
}
_INERT_TOP_KEYS = {
    "architectures", "model_type", "transformers_version", "text_config", "vision_config", "image_token_id",
    "video_token_id", "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings", "quantization_config",
    "language_model_only", "dtype", "torch_dtype", "_name_or_path", "use_cache", "return_dict", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range",
}


class ConfigError(ValueError):
    """A config.json that qwen35 cannot use; the message names the field and the file."""


def _err(source: str, fieldname: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: field '{fieldname}' {problem}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the full-attention layers (partial, interleaved multimodal RoPE, optional YaRN)."""

    theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, int, int] = (11, 11, 10)
    mrope_interleaved: bool = True
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "rope_type": self.rope_type,
            "rope_theta": self.theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "mrope_section": list(self.mrope_section),
            "mrope_interleaved": self.mrope_interleaved,
        }
        if self.rope_type == "yarn":
            d.update(factor=self.factor, original_max_position_embeddings=self.original_max_position_embeddings,
                     beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            if self.attention_factor is not None:
                d["attention_factor"] = self.attention_factor
            if not self.truncate:
                d["truncate"] = False
        return d


@dataclass(frozen=True)
class QuantizationConfig:
    quant_method: str
    fmt: str | None = None
    weight_block_size: tuple[int, int] | None = None
    activation_scheme: str | None = None
    modules_to_not_convert: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TextConfig:
    """The decoder: everything the text forward pass needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    rope: RopeConfig
    intermediate_size: int | None = None  # dense SwiGLU width; None for MoE models
    num_experts: int = 0  # 0 = dense model
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.001
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 262_144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mtp_num_hidden_layers: int = 0
    mamba_ssm_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def max_context(self) -> int:
        """Longest usable context: YaRN stretches the original window by its factor."""
        if self.rope.rope_type == "yarn" and self.rope.original_max_position_embeddings:
            return max(self.max_position_embeddings,
                       int(self.rope.original_max_position_embeddings * self.rope.factor))
        return self.max_position_embeddings


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (transformers' ``Qwen3_5VisionConfig``; its defaults are the official tower's)."""

    out_hidden_size: int  # the merger writes into the text embedding stream: equals the text hidden size
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 2304
    initializer_range: float = 0.02
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x temporal x patch x patch (a pixel_values row)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one text token (a spatial_merge_size x spatial_merge_size block)."""
        return self.spatial_merge_size ** 2

    @property
    def position_grid_side(self) -> int:
        """Side of the square grid the learned position embeddings form."""
        return math.isqrt(self.num_position_embeddings)

    def to_dict(self, model_type: str) -> dict[str, Any]:
        """The ``vision_config`` body; ``model_type`` is the wrapper's (``qwen3_5`` or ``qwen3_5_moe``)."""
        return {
            "model_type": f"{model_type}_vision", "depth": self.depth, "hidden_size": self.hidden_size,
            "hidden_act": self.hidden_act, "intermediate_size": self.intermediate_size, "num_heads": self.num_heads,
            "in_channels": self.in_channels, "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size, "temporal_patch_size": self.temporal_patch_size,
            "out_hidden_size": self.out_hidden_size, "num_position_embeddings": self.num_position_embeddings,
            "initializer_range": self.initializer_range,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint's config: the text decoder plus what sits around it."""

    model_type: str
    text: TextConfig
    multimodal: bool
    vision: VisionConfig | None = None  # None: text-only config, or a multimodal one without vision_config
    quantization: QuantizationConfig | None = None
    architectures: tuple[str, ...] = ()
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    source: str = "<dict>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    def to_dict(self) -> dict[str, Any]:
        """A config.json body that transformers and qwen35 both read back to the same model."""
        t = self.text
        text: dict[str, Any] = {
            "model_type": self.model_type if not self.multimodal else MULTIMODAL_TYPES[self.model_type],
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
            "layer_types": list(t.layer_types), "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim,
            "linear_num_key_heads": t.linear_num_key_heads, "linear_num_value_heads": t.linear_num_value_heads,
            "linear_key_head_dim": t.linear_key_head_dim, "linear_value_head_dim": t.linear_value_head_dim,
            "linear_conv_kernel_dim": t.linear_conv_kernel_dim, "rope_parameters": t.rope.to_dict(),
            "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
            "attention_bias": t.attention_bias, "mtp_num_hidden_layers": t.mtp_num_hidden_layers,
            "mamba_ssm_dtype": t.mamba_ssm_dtype, "bos_token_id": t.bos_token_id,
            "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
            "pad_token_id": t.pad_token_id,
        }
        if t.is_moe:
            text.update(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                        moe_intermediate_size=t.moe_intermediate_size,
                        shared_expert_intermediate_size=t.shared_expert_intermediate_size,
                        router_aux_loss_coef=t.router_aux_loss_coef)
        else:
            text["intermediate_size"] = t.intermediate_size
        if not self.multimodal:
            out = dict(text)
            out["architectures"] = list(self.architectures) or [
                "Qwen3_5MoeForCausalLM" if t.is_moe else "Qwen3_5ForCausalLM"]
        else:
            out = {
                "model_type": self.model_type,
                "architectures": list(self.architectures) or [
                    "Qwen3_5MoeForConditionalGeneration" if t.is_moe else "Qwen3_5ForConditionalGeneration"],
                "text_config": text,
                "tie_word_embeddings": t.tie_word_embeddings,
            }
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
                if getattr(self, k) is not None:
                    out[k] = getattr(self, k)
            if self.vision is not None:
                out["vision_config"] = self.vision.to_dict(self.model_type)
        if self.quantization is not None:
            out["quantization_config"] = copy.deepcopy(self.quantization.raw)
        return out


# ----------------------------------------------------------------------------------------------------------------
# parsing


def _get(d: dict, key: str, source: str, kind: type | tuple[type, ...], default: Any = ...,
         prefix: str = "") -> Any:
    name = prefix + key
    if key not in d or d[key] is None:
        if default is ...:
            raise _err(source, name, "is missing")
        return default
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise _err(source, name, f"must be {getattr(kind, '__name__', kind)}, got {v!r}")
    if not isinstance(v, kind):
        raise _err(source, name, f"must be {getattr(kind, '__name__', kind)}, got {type(v).__name__} {v!r}")
    return v


def _positive(v: int, source: str, name: str) -> int:
    if v <= 0:
        raise _err(source, name, f"must be positive, got {v}")
    return v


def _parse_rope(d: dict, source: str, prefix: str, head_dim: int) -> RopeConfig:
    """Fold every spelling of the RoPE settings into one RopeConfig.

    Newer configs use ``rope_parameters``; older ones ``rope_scaling`` plus top-level ``rope_theta`` and
    ``partial_rotary_factor``.  Explicit ``rope_parameters`` keys win over the legacy top-level copies.
    """
    params: dict[str, Any] = {}
    legacy = d.get("rope_scaling")
    if legacy is not None:
        if not isinstance(legacy, dict):
            raise _err(source, prefix + "rope_scaling", f"must be an object, got {legacy!r}")
        params.update(legacy)
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
    for k in ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"):
        if d.get(k) is not None:
            params.setdefault(k, d[k])
    rp = d.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict):
            raise _err(source, prefix + "rope_parameters", f"must be an object, got {rp!r}")
        params.update({k: v for k, v in rp.items() if v is not None})
    p = prefix + "rope_parameters."
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "yarn", "mrope"):
        raise _err(source, p + "rope_type", f"is {rope_type!r}; qwen35 supports 'default' and 'yarn'")
    if rope_type == "mrope":  # old Qwen2-VL spelling of plain M-RoPE
        rope_type = "default"
    theta = _get(params, "rope_theta", source, float, 10_000.0, p)
    prf = _get(params, "partial_rotary_factor", source, float, 0.25, p)
    if not 0 < prf <= 1:
        raise _err(source, p + "partial_rotary_factor", f"must be in (0, 1], got {prf}")
    rot = int(head_dim * prf)
    if rot % 2:
        raise _err(source, p + "partial_rotary_factor", f"gives an odd rotary dim {rot} for head_dim {head_dim}")
    section = params.get("mrope_section", [11, 11, 10])
    if (not isinstance(section, (list, tuple)) or len(section) != 3
            or not all(isinstance(s, int) and s >= 0 for s in section)):
        raise _err(source, p + "mrope_section", f"must be three non-negative integers, got {section!r}")
    interleaved = _get(params, "mrope_interleaved", source, bool, True, p)
    if not interleaved:
        raise _err(source, p + "mrope_interleaved", "is false; Qwen3.5 uses interleaved M-RoPE only")
    kw: dict[str, Any] = {}
    if rope_type == "yarn":
        factor = _get(params, "factor", source, float, ..., p)
        if factor < 1:
            raise _err(source, p + "factor", f"must be >= 1 for YaRN, got {factor}")
        orig = _get(params, "original_max_position_embeddings", source, int,
                    d.get("max_position_embeddings", ...), p)
        kw = dict(factor=factor, original_max_position_embeddings=_positive(orig, source, p + "original_max_position_embeddings"),
                  beta_fast=_get(params, "beta_fast", source, float, 32.0, p),
                  beta_slow=_get(params, "beta_slow", source, float, 1.0, p),
                  attention_factor=_get(params, "attention_factor", source, float, None, p),
                  truncate=_get(params, "truncate", source, bool, True, p))
    return RopeConfig(theta=theta, partial_rotary_factor=prf, mrope_section=tuple(section),
                      mrope_interleaved=interleaved, rope_type=rope_type, **kw)


def _parse_text(d: dict, source: str, prefix: str, tie: bool | None) -> TextConfig:
    g = lambda key, kind, default=...: _get(d, key, source, kind, default, prefix)  # noqa: E731
    moe = "num_experts" in d and d.get("num_experts")
    hidden = _positive(g("hidden_size", int), source, prefix + "hidden_size")
    n_layers = _positive(g("num_hidden_layers", int), source, prefix + "num_hidden_layers")
    heads = _positive(g("num_attention_heads", int), source, prefix + "num_attention_heads")
    kv_heads = _positive(g("num_key_value_heads", int, heads), source, prefix + "num_key_value_heads")
    if heads % kv_heads:
        raise _err(source, prefix + "num_key_value_heads",
                   f"({kv_heads}) must divide num_attention_heads ({heads})")
    head_dim = _positive(g("head_dim", int, hidden // heads), source, prefix + "head_dim")

    layer_types = d.get("layer_types")
    if layer_types is None:
        interval = _positive(g("full_attention_interval", int, 4), source, prefix + "full_attention_interval")
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise _err(source, prefix + "layer_types",
                   f"must list one type per layer ({n_layers}), got {layer_types!r}")
    for i, t in enumerate(layer_types):
        if t not in LAYER_TYPES:
            raise _err(source, f"{prefix}layer_types[{i}]", f"is {t!r}; expected one of {LAYER_TYPES}")

    lk = _positive(g("linear_num_key_heads", int, 16), source, prefix + "linear_num_key_heads")
    lv = _positive(g("linear_num_value_heads", int, 32), source, prefix + "linear_num_value_heads")
    if lv % lk:
        raise _err(source, prefix + "linear_num_value_heads",
                   f"({lv}) must be a multiple of linear_num_key_heads ({lk})")
    act = g("hidden_act", str, "silu")
    if act not in ("silu", "swish"):
        raise _err(source, prefix + "hidden_act", f"is {act!r}; Qwen3.5 uses 'silu'")
    ssm_dtype = g("mamba_ssm_dtype", str, "float32")
    if ssm_dtype not in ("float32", "bfloat16", "float16"):
        raise _err(source, prefix + "mamba_ssm_dtype", f"is {ssm_dtype!r}; expected float32, bfloat16 or float16")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    if tie is None:
        tie = g("tie_word_embeddings", bool, False)
    kw: dict[str, Any] = {}
    if moe:
        kw = dict(
            num_experts=_positive(g("num_experts", int), source, prefix + "num_experts"),
            num_experts_per_tok=_positive(g("num_experts_per_tok", int), source, prefix + "num_experts_per_tok"),
            moe_intermediate_size=_positive(g("moe_intermediate_size", int), source, prefix + "moe_intermediate_size"),
            shared_expert_intermediate_size=g("shared_expert_intermediate_size", int),
            router_aux_loss_coef=g("router_aux_loss_coef", float, 0.001),
        )
        if kw["num_experts_per_tok"] > kw["num_experts"]:
            raise _err(source, prefix + "num_experts_per_tok",
                       f"({kw['num_experts_per_tok']}) exceeds num_experts ({kw['num_experts']})")
    else:
        kw = dict(intermediate_size=_positive(g("intermediate_size", int), source, prefix + "intermediate_size"))
    for key in d:
        if key not in _INERT_TEXT_KEYS and key not in TextConfig.__dataclass_fields__ and key not in (
                "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "router_aux_loss_coef"):
            warnings.warn(f"{source}: field '{prefix}{key}' is not used by qwen35 and was ignored", stacklevel=3)
    return TextConfig(
        vocab_size=_positive(g("vocab_size", int), source, prefix + "vocab_size"),
        hidden_size=hidden, num_hidden_layers=n_layers, layer_types=tuple(layer_types),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        linear_num_key_heads=lk, linear_num_value_heads=lv,
        linear_key_head_dim=_positive(g("linear_key_head_dim", int, 128), source, prefix + "linear_key_head_dim"),
        linear_value_head_dim=_positive(g("linear_value_head_dim", int, 128), source, prefix + "linear_value_head_dim"),
        linear_conv_kernel_dim=_positive(g("linear_conv_kernel_dim", int, 4), source, prefix + "linear_conv_kernel_dim"),
        rope=_parse_rope(d, source, prefix, head_dim),
        rms_norm_eps=g("rms_norm_eps", float, 1e-6), hidden_act=act,
        max_position_embeddings=_positive(g("max_position_embeddings", int, 262_144), source,
                                          prefix + "max_position_embeddings"),
        tie_word_embeddings=tie, attention_bias=g("attention_bias", bool, False),
        mtp_num_hidden_layers=g("mtp_num_hidden_layers", int, 0), mamba_ssm_dtype=ssm_dtype,
        bos_token_id=g("bos_token_id", int, None), eos_token_id=eos, pad_token_id=g("pad_token_id", int, None),
        **kw,
    )


# Keys of a vision_config that change nothing in the tower: bookkeeping, and Qwen3-VL's deepstack list, which
# Qwen3.5 leaves empty and transformers' Qwen3.5 tower does not read.
_INERT_VISION_KEYS = _INERT_TEXT_KEYS | {"deepstack_visual_indexes", "num_attention_heads", "num_hidden_layers"}
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


def _parse_vision(v: Any, source: str, text_hidden: int) -> VisionConfig:
    prefix = "vision_config."
    if not isinstance(v, dict):
        raise _err(source, "vision_config", f"must be an object, got {v!r}")
    defaults = VisionConfig(out_hidden_size=text_hidden)

    def size(key: str) -> int:
        # transformers types patch sizes as int or [int, int]; the tower's kernels are square
        val = v.get(key)
        if val is None:
            return getattr(defaults, key)
        if isinstance(val, (list, tuple)) and val and all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in val):
            if len(set(val)) != 1:
                raise _err(source, prefix + key, f"must be one size (square patches), got {val!r}")
            val = val[0]
        if isinstance(val, float) and val.is_integer():
            val = int(val)
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise _err(source, prefix + key, f"must be a positive integer, got {val!r}")
        return val

    kw: dict[str, Any] = {key: size(key) for key in (
        "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
        "spatial_merge_size", "temporal_patch_size", "num_position_embeddings")}
    # transformers' attribute_map spells depth and num_heads these ways too
    for alias, key in (("num_hidden_layers", "depth"), ("num_attention_heads", "num_heads")):
        if key not in v and v.get(alias) is not None:
            kw[key] = size(alias)
    kw["out_hidden_size"] = size("out_hidden_size") if v.get("out_hidden_size") is not None else text_hidden
    if kw["out_hidden_size"] != text_hidden:
        raise _err(source, prefix + "out_hidden_size", f"is {kw['out_hidden_size']} but text_config.hidden_size is "
                   f"{text_hidden}; the merger's output replaces token embeddings, so the two must be equal")
    act = _get(v, "hidden_act", source, str, defaults.hidden_act, prefix)
    if act not in VISION_ACTIVATIONS:
        raise _err(source, prefix + "hidden_act", f"is {act!r}; expected one of {VISION_ACTIVATIONS}")
    if kw["hidden_size"] % kw["num_heads"]:
        raise _err(source, prefix + "num_heads", f"({kw['num_heads']}) must divide hidden_size ({kw['hidden_size']})")
    if (kw["hidden_size"] // kw["num_heads"]) % 4:
        raise _err(source, prefix + "num_heads", f"gives head_dim {kw['hidden_size'] // kw['num_heads']}; the 2-D "
                   "rotary embedding splits each head into height and width halves of rotate-half pairs, so "
                   "head_dim must be a multiple of 4")
    n_pos = kw["num_position_embeddings"]
    if math.isqrt(n_pos) ** 2 != n_pos:
        raise _err(source, prefix + "num_position_embeddings",
                   f"is {n_pos}; the learned positions form a square grid, so it must be a square number")
    rp = v.get("rope_parameters")
    theta = defaults.rope_theta
    if rp is not None:
        if not isinstance(rp, dict):
            raise _err(source, prefix + "rope_parameters", f"must be an object, got {rp!r}")
        kind = rp.get("rope_type", "axial")
        if kind != "axial":
            raise _err(source, prefix + "rope_parameters.rope_type", f"is {kind!r}; the tower uses 'axial' RoPE")
        theta = _get(rp, "rope_theta", source, float, theta, prefix + "rope_parameters.")
        if theta <= 0:
            raise _err(source, prefix + "rope_parameters.rope_theta", f"must be positive, got {theta}")
    for key in v:
        if key not in _INERT_VISION_KEYS and key not in VisionConfig.__dataclass_fields__:
            warnings.warn(f"{source}: field '{prefix}{key}' is not used by qwen35 and was ignored", stacklevel=3)
    return VisionConfig(hidden_act=act, rope_theta=theta,
                        initializer_range=_get(v, "initializer_range", source, float, defaults.initializer_range,
                                               prefix),
                        **kw)


def _parse_quant(q: Any, source: str) -> QuantizationConfig:
    if not isinstance(q, dict):
        raise _err(source, "quantization_config", f"must be an object, got {q!r}")
    method = q.get("quant_method")
    if not isinstance(method, str):
        raise _err(source, "quantization_config.quant_method", "is missing")
    block = q.get("weight_block_size")
    return QuantizationConfig(
        quant_method=method, fmt=q.get("fmt"), weight_block_size=tuple(block) if block else None,
        activation_scheme=q.get("activation_scheme"),
        modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()), raw=copy.deepcopy(q))


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> ModelConfig:
    """Validate a config.json body. ``source`` names the file in error messages."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: must hold a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type is None:
        raise _err(source, "model_type", "is missing")
    if model_type not in MULTIMODAL_TYPES and model_type not in TEXT_TYPES:
        raise _err(source, "model_type", f"is {model_type!r}; qwen35 reads "
                   f"{sorted(set(MULTIMODAL_TYPES) | TEXT_TYPES)}")
    quant = _parse_quant(d["quantization_config"], source) if d.get("quantization_config") is not None else None
    arch = tuple(d.get("architectures") or ())
    if model_type in MULTIMODAL_TYPES:
        text_d = d.get("text_config")
        if not isinstance(text_d, dict):
            raise _err(source, "text_config", "is missing (a multimodal config must hold the decoder's settings)")
        inner = text_d.get("model_type", MULTIMODAL_TYPES[model_type])
        if inner != MULTIMODAL_TYPES[model_type]:
            raise _err(source, "text_config.model_type",
                       f"is {inner!r} but model_type {model_type!r} needs {MULTIMODAL_TYPES[model_type]!r}")
        # transformers ties by the top-level flag only; text_config's copy is ignored by the multimodal class
        tie = _get(d, "tie_word_embeddings", source, bool, False)
        text = _parse_text(text_d, source, "text_config.", tie)
        if text.is_moe != (model_type == "qwen3_5_moe"):
            raise _err(source, "text_config.num_experts",
                       f"{'is set' if text.is_moe else 'is missing'} but model_type is {model_type!r}")
        vision = d.get("vision_config")
        vision = _parse_vision(vision, source, text.hidden_size) if vision is not None else None
        for key in d:
            if key not in _INERT_TOP_KEYS:
                warnings.warn(f"{source}: field '{key}' is not used by qwen35 and was ignored", stacklevel=2)
        return ModelConfig(
            model_type=model_type, text=text, multimodal=True, vision=vision, quantization=quant,
            architectures=arch, image_token_id=d.get("image_token_id"), video_token_id=d.get("video_token_id"),
            vision_start_token_id=d.get("vision_start_token_id"), vision_end_token_id=d.get("vision_end_token_id"),
            source=source, raw=copy.deepcopy(d))
    text = _parse_text(d, source, "", None)
    if text.is_moe != (model_type == "qwen3_5_moe_text"):
        raise _err(source, "num_experts", f"{'is set' if text.is_moe else 'is missing'} but model_type is {model_type!r}")
    return ModelConfig(model_type=model_type, text=text, multimodal=False, quantization=quant, architectures=arch,
                       source=source, raw=copy.deepcopy(d))


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p}: no config.json here (is this a checkpoint folder?)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    return config_from_dict(d, str(p))


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The magnitude correction YaRN folds into cos/sin (1 for plain RoPE)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    return 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
