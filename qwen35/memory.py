"""Parameter and memory accounting for a Qwen3.5 config: the arithmetic behind ``qwen35 info``.

Everything here is integer arithmetic on a :class:`~qwen35.config.ModelConfig`; no tensor is allocated, so it
answers for the 397B model in microseconds on any machine.

The model is described as a list of :class:`TensorGroup` rows (one row = identical tensors repeated over layers
or experts, shapes as in the checkpoints, Linear weights ``[out, in]``).  Parameter totals, active parameters
and the bytes of every weight format are all sums over that one list, so they cannot disagree with each other.
The layout follows transformers 5.23 (``modeling_qwen3_5.py`` / ``modeling_qwen3_5_moe.py``), which is the
oracle ``tests/test_memory.py`` checks against; MTP follows the vLLM/SGLang loaders (facts §8).

What the memory figures leave out (so treat ``fit`` as an upper bound): activations and temporary buffers of the
forward pass, the CUDA context and allocator slack, sampling buffers, and the extra DeltaNet snapshots that
speculative decoding keeps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .config import ModelConfig

__all__ = [
    "WEIGHT_DTYPES", "KV_DTYPES", "KV_SCALE_BYTES", "TensorGroup", "ParamCounts", "StateBytes", "FitResult",
    "tensor_groups", "param_counts", "vision_params", "weight_bytes", "weight_bytes_by_part",
    "kv_bytes_per_token", "state_bytes_per_sequence", "fit", "default_weight_dtype",
    "report_dict", "format_report",
]

# ----------------------------------------------------------------------------------------------------------------
# formats

# How each weight format stores the tensors it converts.  Only "fp8" describes real official checkpoints
# (Qwen/Qwen3.5-*-FP8, facts §2).  "int8" / "int4" are qwen35's own weight-only formats (per-row int8; int4
# symmetric with one bf16 scale per 32 inputs, qwen35/quant/int4.py), not descriptions of published files.
WEIGHT_DTYPES: dict[str, str] = {
    "bf16": "every tensor 2 B/param (the official release)",
    "fp32": "every tensor 4 B/param",
    "fp8": ("e4m3 1 B/param + one fp32 scale_inv per 128x128 block on the converted Linear weights; "
            "embeddings, lm_head, routers, GDN in_proj_a/b, MTP fc, vision, norms, conv stay bf16"),
    "int8": "1 B/param + one bf16 scale per output row on the same weights as fp8; the rest bf16 [estimate]",
    "int4": ("0.5 B/param + one bf16 scale per group of 32 inputs (0.5625 B/param; qwen35/quant/int4.py) on "
             "the same weights as fp8; the lm_head int8 (1 B/param + a float32 and a bf16 scale per row; a tied "
             "head becomes a copy of its own beside the bf16 embedding); the rest bf16"),
}
KV_DTYPES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1, "fp8": 1}
# The quantized KV formats (the engine's --kv-cache-dtype int8 / fp8, qwen35/engine/kv_quant.py) add one float32
# scale per token per KV head, for K and for V
KV_SCALE_BYTES: dict[str, int] = {"int8": 4, "fp8": 4}
_FLOAT_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

_FP8_BLOCK = 128  # weight_block_size [128, 128] of the official FP8 checkpoints
_FP8_SCALE_BYTES = 4  # weight_scale_inv is float32 (DeepSeek-V3 style block FP8)
_INT4_GROUP = 32  # qwen35/quant/int4.py DEFAULT_GROUP_SIZE: symmetric, one bf16 scale per group
# quantize_int4's lm_head (default "int8"): Int8Linear keeps per row a float32 scale and its bf16 copy
_INT4_HEAD_ROW_BYTES = 4 + 2

# The parts a tensor can belong to.  "embedding" holds the tied matrix when the head is tied.
PARTS = ("embedding", "lm_head", "decoder", "vision", "mtp")


@dataclass(frozen=True)
class TensorGroup:
    """``copies`` identical tensors of ``shape``; ``active_copies`` of them are read for every token."""

    name: str
    shape: tuple[int, ...]
    copies: int
    part: str
    quantized: bool = False  # converted by the fp8/int8/int4 formats (a 2-D Linear weight [out, in])
    active_copies: int | None = None  # None = all copies

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies

    @property
    def active_numel(self) -> int:
        copies = self.copies if self.active_copies is None else self.active_copies
        return math.prod(self.shape) * copies

    def nbytes(self, dtype: str) -> int:
        """Bytes of all copies stored in ``dtype`` (see :data:`WEIGHT_DTYPES`)."""
        n = math.prod(self.shape)
        if dtype == "fp32":
            return 4 * n * self.copies
        if dtype == "bf16" or not self.quantized:
            return 2 * n * self.copies
        out_dim, in_dim = self.shape
        if dtype == "fp8":
            blocks = math.ceil(out_dim / _FP8_BLOCK) * math.ceil(in_dim / _FP8_BLOCK)
            return (n + _FP8_SCALE_BYTES * blocks) * self.copies
        if dtype == "int8":
            return (n + 2 * out_dim) * self.copies
        if dtype == "int4":
            span = max(_INT4_GROUP, 64)  # rows are stored in whole 64-weight blocks and whole groups
            padded = math.ceil(in_dim / span) * span
            return (out_dim * padded // 2 + 2 * out_dim * padded // _INT4_GROUP) * self.copies
        raise ValueError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")


# ----------------------------------------------------------------------------------------------------------------
# the tensor list


def _attention_groups(cfg: ModelConfig, copies: int, part: str, prefix: str) -> list[TensorGroup]:
    t = cfg.text
    h, hd = t.hidden_size, t.head_dim
    q_out = t.num_attention_heads * hd * 2  # query and its output gate share q_proj (facts §0)
    kv_out = t.num_key_value_heads * hd
    o_in = t.num_attention_heads * hd
    g = [
        TensorGroup(f"{prefix}.self_attn.q_proj", (q_out, h), copies, part, quantized=True),
        TensorGroup(f"{prefix}.self_attn.k_proj", (kv_out, h), copies, part, quantized=True),
        TensorGroup(f"{prefix}.self_attn.v_proj", (kv_out, h), copies, part, quantized=True),
        TensorGroup(f"{prefix}.self_attn.o_proj", (h, o_in), copies, part, quantized=True),
        TensorGroup(f"{prefix}.self_attn.q_norm+k_norm", (2, hd), copies, part),
    ]
    if t.attention_bias:
        g.append(TensorGroup(f"{prefix}.self_attn.biases", (q_out + 2 * kv_out + h,), copies, part))
    return g


def _ffn_groups(cfg: ModelConfig, copies: int, part: str, prefix: str) -> list[TensorGroup]:
    t = cfg.text
    h = t.hidden_size
    if not t.is_moe:
        i = t.intermediate_size or 0
        return [
            TensorGroup(f"{prefix}.mlp.gate_proj", (i, h), copies, part, quantized=True),
            TensorGroup(f"{prefix}.mlp.up_proj", (i, h), copies, part, quantized=True),
            TensorGroup(f"{prefix}.mlp.down_proj", (h, i), copies, part, quantized=True),
        ]
    e, k, i, si = t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.shared_expert_intermediate_size
    # Routed experts are listed per expert (as the FP8 checkpoints store them) so the block scales come out
    # right; only the top-k of them are read per token.
    return [
        TensorGroup(f"{prefix}.mlp.gate (router)", (e, h), copies, part),
        TensorGroup(f"{prefix}.mlp.experts.*.gate_proj", (i, h), copies * e, part, True, copies * k),
        TensorGroup(f"{prefix}.mlp.experts.*.up_proj", (i, h), copies * e, part, True, copies * k),
        TensorGroup(f"{prefix}.mlp.experts.*.down_proj", (h, i), copies * e, part, True, copies * k),
        TensorGroup(f"{prefix}.mlp.shared_expert.gate_proj", (si, h), copies, part, quantized=True),
        TensorGroup(f"{prefix}.mlp.shared_expert.up_proj", (si, h), copies, part, quantized=True),
        TensorGroup(f"{prefix}.mlp.shared_expert.down_proj", (h, si), copies, part, quantized=True),
        TensorGroup(f"{prefix}.mlp.shared_expert_gate", (1, h), copies, part),
    ]


def _deltanet_groups(cfg: ModelConfig, copies: int, part: str, prefix: str) -> list[TensorGroup]:
    t = cfg.text
    h, hv = t.hidden_size, t.linear_num_value_heads
    return [
        TensorGroup(f"{prefix}.linear_attn.in_proj_qkv", (t.linear_conv_dim, h), copies, part, quantized=True),
        TensorGroup(f"{prefix}.linear_attn.in_proj_z", (t.linear_value_dim, h), copies, part, quantized=True),
        # in_proj_a/b feed the decay and beta and stay bf16 in the FP8 release (facts §2)
        TensorGroup(f"{prefix}.linear_attn.in_proj_b", (hv, h), copies, part),
        TensorGroup(f"{prefix}.linear_attn.in_proj_a", (hv, h), copies, part),
        TensorGroup(f"{prefix}.linear_attn.conv1d", (t.linear_conv_dim, 1, t.linear_conv_kernel_dim), copies, part),
        TensorGroup(f"{prefix}.linear_attn.A_log+dt_bias", (2, hv), copies, part),
        TensorGroup(f"{prefix}.linear_attn.norm", (t.linear_value_head_dim,), copies, part),
        TensorGroup(f"{prefix}.linear_attn.out_proj", (h, t.linear_value_dim), copies, part, quantized=True),
    ]


def _vision_dims(cfg: ModelConfig) -> dict[str, int] | None:
    """The vision tower's sizes (the config parser fills transformers' Qwen3_5VisionConfig defaults)."""
    v = cfg.vision
    if not cfg.multimodal or v is None:
        return None
    return {
        "depth": v.depth, "hidden": v.hidden_size, "inter": v.intermediate_size, "in_channels": v.in_channels,
        "patch": v.patch_size, "temporal": v.temporal_patch_size, "merge": v.spatial_merge_size,
        "positions": v.num_position_embeddings, "out": v.out_hidden_size,
    }


def _linear_with_bias(name: str, out_dim: int, in_dim: int, copies: int, part: str) -> list[TensorGroup]:
    return [TensorGroup(f"{name}.weight", (out_dim, in_dim), copies, part),
            TensorGroup(f"{name}.bias", (out_dim,), copies, part)]


def _vision_groups(cfg: ModelConfig) -> list[TensorGroup]:
    """The ViT: Conv3d patch embed, learned positions, pre-norm blocks, 2x2 merger (all with biases)."""
    d = _vision_dims(cfg)
    if d is None:
        return []
    hid, n, p = d["hidden"], d["depth"], "visual"
    merged = hid * d["merge"] ** 2  # the merger sees 2x2 neighbouring patches as one vector
    return [
        TensorGroup(f"{p}.patch_embed.proj.weight", (hid, d["in_channels"], d["temporal"], d["patch"], d["patch"]),
                    1, "vision"),
        TensorGroup(f"{p}.patch_embed.proj.bias", (hid,), 1, "vision"),
        TensorGroup(f"{p}.pos_embed", (d["positions"], hid), 1, "vision"),
        TensorGroup(f"{p}.blocks.*.norm1+norm2 (weight, bias)", (4, hid), n, "vision"),
        *_linear_with_bias(f"{p}.blocks.*.attn.qkv", 3 * hid, hid, n, "vision"),
        *_linear_with_bias(f"{p}.blocks.*.attn.proj", hid, hid, n, "vision"),
        *_linear_with_bias(f"{p}.blocks.*.mlp.linear_fc1", d["inter"], hid, n, "vision"),
        *_linear_with_bias(f"{p}.blocks.*.mlp.linear_fc2", hid, d["inter"], n, "vision"),
        TensorGroup(f"{p}.merger.norm (weight, bias)", (2, hid), 1, "vision"),
        *_linear_with_bias(f"{p}.merger.linear_fc1", merged, merged, 1, "vision"),
        *_linear_with_bias(f"{p}.merger.linear_fc2", d["out"], merged, 1, "vision"),
    ]


def tensor_groups(cfg: ModelConfig) -> list[TensorGroup]:
    """Every parameter of the checkpoint: text decoder, head, vision tower and MTP block."""
    t = cfg.text
    h, v = t.hidden_size, t.vocab_size
    n_full, n_lin = len(t.full_attention_layers), len(t.linear_attention_layers)
    groups = [TensorGroup("embed_tokens", (v, h), 1, "embedding")]
    if not t.tie_word_embeddings:
        groups.append(TensorGroup("lm_head", (v, h), 1, "lm_head"))
    groups.append(TensorGroup("norm", (h,), 1, "decoder"))
    groups.append(TensorGroup("layers.*.input+post_attention_layernorm", (2, h), t.num_hidden_layers, "decoder"))
    groups += _attention_groups(cfg, n_full, "decoder", "layers.<full>")
    groups += _deltanet_groups(cfg, n_lin, "decoder", "layers.<linear>")
    groups += _ffn_groups(cfg, t.num_hidden_layers, "decoder", "layers.*")
    groups += _vision_groups(cfg)
    m = t.mtp_num_hidden_layers
    if m > 0:
        # fc stays bf16 in the FP8 release: its 1,560 MTP tensors only add up with fc unconverted (facts §2)
        groups.append(TensorGroup("mtp.fc", (h, 2 * h), 1, "mtp"))
        groups.append(TensorGroup("mtp.pre_fc_norm_embedding+pre_fc_norm_hidden+norm", (3, h), 1, "mtp"))
        groups.append(TensorGroup("mtp.layers.*.input+post_attention_layernorm", (2, h), m, "mtp"))
        groups += _attention_groups(cfg, m, "mtp", "mtp.layers.*")
        groups += _ffn_groups(cfg, m, "mtp", "mtp.layers.*")
    return groups


# ----------------------------------------------------------------------------------------------------------------
# parameter counts


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # input embedding (also the output head when tied)
    lm_head: int  # 0 when tied: the head reuses the embedding matrix
    decoder: int  # layers + final norm
    vision: int
    mtp: int
    routed_experts: int  # part of decoder: all routed expert weights (0 for dense)
    active: int  # text params read per token, incl. the embedding matrix (the "A17B" convention)
    active_excl_embedding: int  # same minus the input embedding (kept when tied: the head still reads it)

    @property
    def text(self) -> int:
        """The language model: embedding + decoder + head (what transformers' *ForCausalLM holds)."""
        return self.embedding + self.lm_head + self.decoder

    @property
    def text_and_vision(self) -> int:
        """The size in the model's name: text + vision, not MTP (facts §6)."""
        return self.text + self.vision

    @property
    def total(self) -> int:
        """Everything in the checkpoint, MTP included."""
        return self.text + self.vision + self.mtp


def param_counts(cfg: ModelConfig) -> ParamCounts:
    groups = tensor_groups(cfg)
    by_part = {p: sum(g.numel for g in groups if g.part == p) for p in PARTS}
    text_groups = [g for g in groups if g.part in ("embedding", "lm_head", "decoder")]
    active = sum(g.active_numel for g in text_groups)
    embedding = by_part["embedding"]
    return ParamCounts(
        embedding=embedding, lm_head=by_part["lm_head"], decoder=by_part["decoder"], vision=by_part["vision"],
        mtp=by_part["mtp"],
        routed_experts=sum(g.numel for g in text_groups if ".experts." in g.name),
        active=active,
        active_excl_embedding=active - (0 if cfg.text.tie_word_embeddings else embedding),
    )


def vision_params(cfg: ModelConfig) -> int:
    return sum(g.numel for g in _vision_groups(cfg))


# ----------------------------------------------------------------------------------------------------------------
# bytes


def _check_weight_dtype(dtype: str) -> str:
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    return dtype


def _check_kv_dtype(dtype: str) -> str:
    if dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    return dtype


def default_weight_dtype(cfg: ModelConfig) -> str:
    """The format a quantized checkpoint's config.json names (fp8, or the int4 that ``qwen35 quantize`` writes:
    quant_method "qwen35-int4", qwen35/quant/saved.py), bf16 otherwise."""
    q = cfg.quantization
    if q is not None and q.quant_method == "fp8":
        return "fp8"
    if q is not None and q.quant_method == "qwen35-int4":  # counted as the default recipe (group 32, int8 head)
        return "int4"
    return "bf16"


def weight_bytes_by_part(cfg: ModelConfig, dtype: str = "bf16") -> dict[str, int]:
    _check_weight_dtype(dtype)
    out = dict.fromkeys(PARTS, 0)
    for g in tensor_groups(cfg):
        out[g.part] += g.nbytes(dtype)
    if dtype == "int4":
        # what quantize_int4 stores for the head: int8 rows (tests/test_memory.py checks these figures against
        # the bytes of a quantized model); tied, the embedding stays bf16 and the head is a separate int8 copy
        v, h = cfg.text.vocab_size, cfg.text.hidden_size
        out["lm_head"] = v * h + _INT4_HEAD_ROW_BYTES * v
    return out


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", *, include_vision: bool = True,
                 include_mtp: bool = False) -> int:
    """Bytes of the weights an inference engine loads.  MTP is off by default (transformers never loads it;
    engines load it only for speculative decoding)."""
    parts = weight_bytes_by_part(cfg, dtype)
    skip = ({"vision"} if not include_vision else set()) | ({"mtp"} if not include_mtp else set())
    return sum(b for p, b in parts.items() if p not in skip)


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "bf16", *, include_mtp: bool = False) -> int:
    """K and V of every full-attention layer (with their per-head scales for int8 / fp8); the DeltaNet layers
    keep no per-token cache."""
    t = cfg.text
    layers = len(t.full_attention_layers) + (t.mtp_num_hidden_layers if include_mtp else 0)
    per_head = t.head_dim * KV_DTYPES[_check_kv_dtype(kv_dtype)] + KV_SCALE_BYTES.get(kv_dtype, 0)
    return layers * 2 * t.num_key_value_heads * per_head


@dataclass(frozen=True)
class StateBytes:
    recurrent: int  # the delta-rule state S [HV, Kdim, Vdim] per GDN layer, in mamba_ssm_dtype
    conv: int  # the last kernel-1 pre-conv inputs per channel per GDN layer, in the activation dtype

    @property
    def total(self) -> int:
        return self.recurrent + self.conv


def state_bytes_per_sequence(cfg: ModelConfig, activation_dtype: str = "bf16") -> StateBytes:
    """Fixed-size DeltaNet state of one sequence, whatever its length."""
    t = cfg.text
    n_lin = len(t.linear_attention_layers)
    ssm = _FLOAT_BYTES[t.mamba_ssm_dtype]
    recurrent = n_lin * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim * ssm
    conv = n_lin * t.linear_conv_dim * (t.linear_conv_kernel_dim - 1) * _FLOAT_BYTES[activation_dtype]
    return StateBytes(recurrent=recurrent, conv=conv)


def _activation_dtype(weight_dtype: str) -> str:
    # quantised weights are dequantised into bf16 activations; only an fp32 model runs in fp32
    return "fp32" if weight_dtype == "fp32" else "bf16"


# ----------------------------------------------------------------------------------------------------------------
# fitting into a memory budget


def _check_context(cfg: ModelConfig, context: int | None) -> int:
    """``context`` or the model's maximum; a context the model cannot address is an error."""
    model_max = cfg.text.max_context
    if context is None:
        return model_max
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")
    if context > model_max:
        raise ValueError(f"context {context:,} exceeds the model's maximum of {model_max:,} tokens "
                         "(a YaRN rope_parameters entry in config.json extends it)")
    return context


@dataclass(frozen=True)
class FitResult:
    memory_bytes: int
    weight_dtype: str
    kv_dtype: str
    weight_bytes: int
    free_bytes: int  # memory - weights; <= 0 means the weights alone do not fit
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    model_max_context: int
    max_context: int  # longest single sequence that fits, capped at model_max_context; 0 = none fits
    memory_max_context: int  # the same without the cap (what memory alone would allow)
    context: int  # the context length the concurrency figure is for
    max_sequences: int  # sequences of `context` tokens that fit side by side
    fits: bool
    message: str


def fit(cfg: ModelConfig, memory_bytes: int, weight_dtype: str = "bf16", kv_dtype: str = "bf16", *,
        context: int | None = None, include_vision: bool = True, include_mtp: bool = False) -> FitResult:
    """How much context fits in ``memory_bytes`` next to the weights.

    A sequence costs its fixed DeltaNet state plus ``kv_bytes_per_token`` for every token.  Activations, the
    runtime's own memory and fragmentation are not counted: the answer is an upper bound.
    """
    _check_weight_dtype(weight_dtype)
    _check_kv_dtype(kv_dtype)
    model_max = cfg.text.max_context
    context = _check_context(cfg, context)
    w = weight_bytes(cfg, weight_dtype, include_vision=include_vision, include_mtp=include_mtp)
    kv = kv_bytes_per_token(cfg, kv_dtype, include_mtp=include_mtp)
    state = state_bytes_per_sequence(cfg, _activation_dtype(weight_dtype)).total
    free = memory_bytes - w
    mem_ctx = max(0, (free - state) // kv) if free > 0 else 0
    max_ctx = min(mem_ctx, model_max)
    n_seq = max(0, free // (state + kv * context)) if free > 0 else 0
    if free <= 0:
        msg = (f"does not fit: the {weight_dtype} weights alone ({_gb(w)}) exceed the "
               f"{_gb(memory_bytes)} budget by {_gb(-free)}")
    elif max_ctx == 0:
        msg = (f"does not fit: {_gb(free)} left after the weights is less than one sequence's state "
               f"({_mib(state)}) plus one token")
    elif n_seq == 0:
        msg = (f"fits one sequence of up to {max_ctx:,} tokens, but not one of {context:,} tokens")
    else:
        capped = " (the model's maximum)" if mem_ctx > model_max else ""
        msg = (f"fits: one sequence up to {max_ctx:,} tokens{capped}; "
               f"{n_seq:,} concurrent sequence{'s' if n_seq != 1 else ''} of {context:,} tokens")
    return FitResult(memory_bytes=memory_bytes, weight_dtype=weight_dtype, kv_dtype=kv_dtype, weight_bytes=w,
                     free_bytes=free, kv_bytes_per_token=kv, state_bytes_per_sequence=state,
                     model_max_context=model_max, max_context=max_ctx, memory_max_context=mem_ctx,
                     context=context, max_sequences=n_seq, fits=n_seq > 0 or max_ctx > 0, message=msg)


# ----------------------------------------------------------------------------------------------------------------
# reports


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _bn(n: int) -> str:
    return f"{n / 1e9:,.3f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def report_dict(cfg: ModelConfig, *, name: str | None = None, weight_dtype: str | None = None,
                kv_dtype: str = "bf16", memory_bytes: int | None = None,
                context: int | None = None) -> dict[str, Any]:
    """Everything ``qwen35 info`` knows about a config, as plain JSON-ready values (counts and bytes as ints)."""
    t = cfg.text
    wd = _check_weight_dtype(weight_dtype or default_weight_dtype(cfg))
    ctx = _check_context(cfg, context)
    pc = param_counts(cfg)
    state = state_bytes_per_sequence(cfg, _activation_dtype(wd))
    kv = kv_bytes_per_token(cfg, kv_dtype)
    report: dict[str, Any] = {
        "model": {
            "name": name or cfg.source,
            "model_type": cfg.model_type,
            "multimodal": cfg.multimodal,
            "moe": t.is_moe,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_hidden_layers,
            "full_attention_layers": len(t.full_attention_layers),
            "linear_attention_layers": len(t.linear_attention_layers),
            "num_experts": t.num_experts,
            "num_experts_per_tok": t.num_experts_per_tok,
            "vocab_size": t.vocab_size,
            "tie_word_embeddings": t.tie_word_embeddings,
            "max_context": t.max_context,
            "mtp_num_hidden_layers": t.mtp_num_hidden_layers,
            "quantization": cfg.quantization.quant_method if cfg.quantization else None,
        },
        "params": {
            "embedding": pc.embedding,
            "lm_head": pc.lm_head,
            "decoder": pc.decoder,
            "routed_experts": pc.routed_experts,
            "text": pc.text,
            "vision": pc.vision,
            "text_and_vision": pc.text_and_vision,
            "mtp": pc.mtp,
            "total": pc.total,
            "active_per_token": pc.active,
            "active_per_token_excl_embedding": pc.active_excl_embedding,
        },
        "weight_bytes": {
            d: {"loaded": weight_bytes(cfg, d), "with_mtp": weight_bytes(cfg, d, include_mtp=True),
                "by_part": weight_bytes_by_part(cfg, d)}
            for d in WEIGHT_DTYPES
        },
        "weight_dtype": wd,
        "kv_cache": {
            "dtype": kv_dtype,
            "bytes_per_token": kv,
            "bytes_per_token_with_mtp": kv_bytes_per_token(cfg, kv_dtype, include_mtp=True),
            "context": ctx,
            "bytes_at_context": kv * ctx,
        },
        "deltanet_state": {
            "ssm_dtype": t.mamba_ssm_dtype,
            "recurrent_bytes_per_sequence": state.recurrent,
            "conv_bytes_per_sequence": state.conv,
            "bytes_per_sequence": state.total,
        },
        # The engine's prefix cache keeps one DeltaNet state snapshot per cached prefix, inside the KV block pool
        # (qwen35/engine/cache.py): each costs what the KV of `snapshot_kv_tokens` tokens costs, and one is taken
        # about every that many tokens of a long prompt, so snapshots at most double a cached prompt's memory.
        "prefix_cache": {
            "snapshot_bytes": state.total,
            "snapshot_kv_tokens": -(-state.total // kv) if kv else 0,
        },
    }
    if memory_bytes is not None:
        report["fit"] = asdict(fit(cfg, memory_bytes, wd, kv_dtype, context=context))
    return report


def format_report(cfg: ModelConfig, *, name: str | None = None, weight_dtype: str | None = None,
                  kv_dtype: str = "bf16", memory_bytes: int | None = None, context: int | None = None) -> str:
    """A human-readable version of :func:`report_dict`."""
    r = report_dict(cfg, name=name, weight_dtype=weight_dtype, kv_dtype=kv_dtype, memory_bytes=memory_bytes,
                    context=context)
    m, p, kvr, st = r["model"], r["params"], r["kv_cache"], r["deltanet_state"]
    lines: list[str] = []
    add = lines.append

    def row(label: str, value: str, note: str = "") -> None:
        add(f"  {label:<40} {value:>14}{'  ' + note if note else ''}")

    arch = f"MoE, {m['num_experts']} experts, top-{m['num_experts_per_tok']}" if m["moe"] else "dense"
    add(f"{m['name']}  ({m['model_type']}, {arch})")
    add(f"  {m['num_hidden_layers']} layers = {m['full_attention_layers']} full attention + "
        f"{m['linear_attention_layers']} Gated DeltaNet; hidden {m['hidden_size']}; vocab {m['vocab_size']:,}; "
        f"max context {m['max_context']:,}")
    add(f"  {'tied' if m['tie_word_embeddings'] else 'untied'} embeddings; "
        f"{m['mtp_num_hidden_layers']} MTP layer(s)"
        + (f"; quantization: {m['quantization']}" if m["quantization"] else ""))

    add("")
    add("Parameters")
    row("text (embedding + decoder + lm_head)", _bn(p["text"]), f"{p['text']:,}")
    row("  embedding", _bn(p["embedding"]), f"{p['embedding']:,}")
    row("  lm_head", _bn(p["lm_head"]), "0 (tied: reuses the embedding)" if m["tie_word_embeddings"]
        else f"{p['lm_head']:,}")
    row("  decoder layers + final norm", _bn(p["decoder"]), f"{p['decoder']:,}")
    if m["moe"]:
        row("    of which routed experts", _bn(p["routed_experts"]), f"{p['routed_experts']:,}")
    row("vision tower", _bn(p["vision"]), f"{p['vision']:,}")
    row("text + vision (the size in the name)", _bn(p["text_and_vision"]), f"{p['text_and_vision']:,}")
    row("MTP block (speculative decoding)", _bn(p["mtp"]), f"{p['mtp']:,}")
    row("everything in the checkpoint", _bn(p["total"]), f"{p['total']:,}")
    row("active per token, incl. embedding", _bn(p["active_per_token"]), f"{p['active_per_token']:,}")
    row("active per token, excl. embedding", _bn(p["active_per_token_excl_embedding"]),
        f"{p['active_per_token_excl_embedding']:,}")

    add("")
    add("Weights (text + vision, as loaded for inference; MTP adds to it when used)")
    for d, desc in WEIGHT_DTYPES.items():
        wb = r["weight_bytes"][d]
        mark = " <- used below" if d == r["weight_dtype"] else ""
        row(f"{d}", _gb(wb["loaded"]), f"with MTP {_gb(wb['with_mtp'])}{mark}")
    add("  fp8 = block-128 FP8 as in the official -FP8 checkpoints; int8 is an estimate;")
    add("  int4 = what qwen35's --quantization int4 stores (group 32, lm_head int8)")

    add("")
    add(f"KV cache ({kvr['dtype']}; full-attention layers only, DeltaNet layers keep none)")
    if kvr["dtype"] in KV_SCALE_BYTES:
        add(f"  1 B per value + a {KV_SCALE_BYTES[kvr['dtype']]} B float32 scale per token per KV head (K and V)")
    row("per token", f"{kvr['bytes_per_token']:,} B", f"{kvr['bytes_per_token_with_mtp']:,} B with the MTP layer")
    row(f"at {kvr['context']:,} tokens", _gb(kvr["bytes_at_context"]))
    add("DeltaNet state per sequence (fixed, whatever the length)")
    row(f"recurrent ({st['ssm_dtype']})", _mib(st["recurrent_bytes_per_sequence"]))
    row("conv", _mib(st["conv_bytes_per_sequence"]))
    row("total", _mib(st["bytes_per_sequence"]))
    pc = r["prefix_cache"]
    add("Prefix cache snapshots (one DeltaNet state per cached prefix, kept in the KV pool; LRU-evicted)")
    row("per snapshot", _mib(pc["snapshot_bytes"]), f"= the KV of {pc['snapshot_kv_tokens']:,} tokens")
    add(f"  taken at prompt ends, finished generations, chat message starts and every ~{pc['snapshot_kv_tokens']:,} "
        "tokens of a long prompt")

    if "fit" in r:
        f = r["fit"]
        add("")
        add(f"Fit in {_gb(f['memory_bytes'])} ({f['weight_dtype']} weights, {f['kv_dtype']} KV; "
            "activations and runtime overhead not counted)")
        row("weights", _gb(f["weight_bytes"]))
        row("left for KV cache and state", _gb(f["free_bytes"]))
        if f["max_context"] > 0:
            capped = f["memory_max_context"] > f["model_max_context"]
            row("longest single sequence", f"{f['max_context']:,} tok",
                f"memory alone would allow {f['memory_max_context']:,}" if capped else "")
            row(f"sequences of {f['context']:,} tokens at once", f"{f['max_sequences']:,}")
        add(f"  => {f['message']}")
    return "\n".join(lines)
