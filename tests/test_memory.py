"""qwen35.memory and qwen35.presets: the facts-file numbers, hand-computed fits, and transformers as the oracle.

Reference numbers: /work/shared/reference/qwen35-facts.md §6 (parameters) and §7 (KV cache, DeltaNet state).
The facts table rounds to 2-3 decimals, so each check allows one unit of the last printed digit.
"""

from __future__ import annotations

import math
import warnings

import pytest

from qwen35.config import config_from_dict
from qwen35.memory import (
    TensorGroup, fit, kv_bytes_per_token, param_counts, report_dict, state_bytes_per_sequence, weight_bytes,
)
from qwen35.presets import PRESETS, normalize_preset_name, preset_config

B = 1e9
MIB = 2**20

# name: (text total B, +vision B, +MTP B, active excl. embedding B, active incl. embedding B), facts §6.
# None = not given in the table.  Tolerances follow the printed precision.
PARAMS = {
    "397B-A17B": (396.35, 0.456, 6.60, 16.33, 17.35),
    "122B-A10B": (122.11, 0.45, 2.52, 9.01, 9.77),
    "35B-A3B": (34.66, 0.45, 0.85, 2.95, 3.46),
    "27B": (26.90, 0.46, 0.43, None, None),
    "9B": (8.954, None, 0.24, None, None),
    "4B": (4.206, None, 0.12, None, None),
    "2B": (1.882, None, 0.06, None, None),
    "0.8B": (0.752, None, 0.02, None, None),
}

# name: (full-attention layers, KV bytes/token bf16, GDN recurrent MiB, conv MiB), facts §7.
MEMORY = {
    "397B-A17B": (15, 30_720, 180, 3.16),
    "122B-A10B": (12, 24_576, 144, 2.53),
    "35B-A3B": (10, 20_480, 60, 1.41),
    "27B": (16, 65_536, 144, 2.81),
    "9B": (8, 32_768, 48, 1.12),
    "4B": (8, 32_768, 48, 1.12),
    "2B": (6, 12_288, 18, 0.63),
    "0.8B": (6, 12_288, 18, 0.63),
}


def _tol(printed: float) -> float:
    """One unit in the last printed decimal of ``printed``.

    Half a unit would be exact rounding, but the table was rounded in steps (35B-A3B MTP = 0.8446 B is
    printed 0.85), so one unit is the honest bound."""
    decimals = len(repr(printed).split(".")[1]) if "." in repr(printed) else 0
    return 10 ** (-decimals) + 1e-12


# ----------------------------------------------------------------------------------------------------------------
# presets


def test_every_preset_is_listed():
    assert list(PRESETS) == ["0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B", "397B-A17B"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parses_cleanly_with_official_settings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a key the loader does not know would warn
        cfg = preset_config(name)
    t = cfg.text
    assert cfg.multimodal and cfg.model_type == ("qwen3_5_moe" if "-A" in name else "qwen3_5")
    assert t.rope.theta == 1e7 and t.rope.mrope_section == (11, 11, 10) and t.rope.partial_rotary_factor == 0.25
    assert t.max_position_embeddings == 262_144 and t.mtp_num_hidden_layers == 1
    assert t.mamba_ssm_dtype == "float32" and t.vocab_size == 248_320 and t.head_dim == 256
    assert t.tie_word_embeddings == (name in ("0.8B", "2B", "4B"))
    assert cfg.vision.out_hidden_size == t.hidden_size
    body = PRESETS[name]
    assert body["tie_word_embeddings"] == body["text_config"]["tie_word_embeddings"]


@pytest.mark.parametrize("spelling,expected", [
    ("397B-A17B", "397B-A17B"), ("397b-a17b", "397B-A17B"), ("qwen3.5-0.8b", "0.8B"),
    ("Qwen/Qwen3.5-35B-A3B", "35B-A3B"), ("QWEN3.6-27B", "27B"), (" 9b ", "9B"),
])
def test_preset_names_are_forgiving(spelling, expected):
    assert normalize_preset_name(spelling) == expected
    assert preset_config(spelling).text.hidden_size == PRESETS[expected]["text_config"]["hidden_size"]


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        preset_config("7B")
    assert "'7B'" in str(e.value)
    for name in PRESETS:
        assert name in str(e.value)


@pytest.mark.parametrize("name", ["0.8B", "27B", "397B-A17B"])
def test_transformers_reads_the_preset_bodies_identically(name):
    transformers = pytest.importorskip("transformers")
    body = PRESETS[name]
    cls = transformers.Qwen3_5MoeConfig if body["model_type"] == "qwen3_5_moe" else transformers.Qwen3_5Config
    hf = cls(**body)
    t = preset_config(name).text
    assert hf.text_config.hidden_size == t.hidden_size
    assert list(hf.text_config.layer_types) == list(t.layer_types)
    assert hf.text_config.num_key_value_heads == t.num_key_value_heads
    assert hf.tie_word_embeddings == t.tie_word_embeddings
    assert hf.vision_config.depth == body["vision_config"]["depth"]
    assert hf.vision_config.out_hidden_size == t.hidden_size


# ----------------------------------------------------------------------------------------------------------------
# the facts-file numbers


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_facts_table(name):
    text, vision, mtp, active_excl, active_incl = PARAMS[name]
    pc = param_counts(preset_config(name))
    assert pc.text / B == pytest.approx(text, abs=_tol(text))
    if vision is not None:
        assert pc.vision / B == pytest.approx(vision, abs=_tol(vision))
    assert pc.mtp / B == pytest.approx(mtp, abs=_tol(mtp))
    if active_excl is not None:
        assert pc.active_excl_embedding / B == pytest.approx(active_excl, abs=_tol(active_excl))
        assert pc.active / B == pytest.approx(active_incl, abs=_tol(active_incl))
    else:  # dense: every text parameter is read for every token
        assert pc.active == pc.text


def test_397b_headline_numbers():
    pc = param_counts(preset_config("397B-A17B"))
    assert round(pc.text_and_vision / B) == 397  # the name counts text + vision ...
    assert pc.text_and_vision / B == pytest.approx(396.8, abs=0.05)
    assert pc.total / B == pytest.approx(403.4, abs=0.05)  # ... not the MTP block
    assert round(pc.active / B) == 17
    assert pc.routed_experts / B == pytest.approx(386.5, abs=0.05)  # "97.5% of 397B"
    # per-layer figures of facts §6: MoE active 140.5M per layer = 10 routed + shared + router (+ gate)
    h, i = 4096, 1024
    assert (10 * 3 * h * i + 3 * h * i + 512 * h + h) / 1e6 == pytest.approx(140.5, abs=0.05)


def test_tied_models_count_the_shared_matrix_once():
    pc = param_counts(preset_config("0.8B"))
    assert pc.lm_head == 0 and pc.embedding == 248_320 * 1024
    assert pc.active_excl_embedding == pc.active  # the head still reads the tied matrix
    untied = param_counts(preset_config("9B"))
    assert untied.lm_head == untied.embedding == 248_320 * 4096
    assert untied.active_excl_embedding == untied.active - untied.embedding


@pytest.mark.parametrize("name", list(MEMORY))
def test_kv_and_state_match_facts_table(name):
    n_full, kv, recurrent_mib, conv_mib = MEMORY[name]
    cfg = preset_config(name)
    assert len(cfg.text.full_attention_layers) == n_full
    assert kv_bytes_per_token(cfg) == kv
    scales = n_full * 2 * cfg.text.num_key_value_heads * 4  # one float32 scale per token per KV head, K and V
    assert kv_bytes_per_token(cfg, "fp8") == kv_bytes_per_token(cfg, "int8") == kv // 2 + scales
    assert kv_bytes_per_token(cfg, include_mtp=True) == kv + kv // n_full  # one more full-attention layer
    st = state_bytes_per_sequence(cfg)
    assert st.recurrent == recurrent_mib * MIB
    assert st.conv / MIB == pytest.approx(conv_mib, abs=0.005)


def test_397b_kv_and_state_exact():
    cfg = preset_config("397B-A17B")
    assert kv_bytes_per_token(cfg) == 15 * 2 * 2 * 256 * 2 == 30_720
    assert kv_bytes_per_token(cfg) * 262_144 / B == pytest.approx(8.053, abs=0.0005)
    st = state_bytes_per_sequence(cfg)
    assert st.recurrent == 45 * 64 * 128 * 128 * 4
    assert st.conv == 45 * 12_288 * 3 * 2


def test_ssm_dtype_comes_from_the_config():
    body = dict(PRESETS["397B-A17B"], text_config=dict(PRESETS["397B-A17B"]["text_config"],
                                                       mamba_ssm_dtype="bfloat16"))
    st = state_bytes_per_sequence(config_from_dict(body))
    assert st.recurrent == 90 * MIB


# ----------------------------------------------------------------------------------------------------------------
# weight bytes


def test_weight_formats_on_one_hand_computed_tensor():
    g = TensorGroup("w", (300, 256), copies=2, part="decoder", quantized=True)
    assert g.nbytes("bf16") == 2 * 76_800 * 2
    assert g.nbytes("fp32") == 4 * 76_800 * 2
    assert g.nbytes("fp8") == (76_800 + 3 * 2 * 4) * 2  # 3 x 2 blocks of 128x128, fp32 scale_inv each
    assert g.nbytes("int8") == (76_800 + 300 * 2) * 2  # one bf16 scale per output row
    assert g.nbytes("int4") == (38_400 + 300 * 8 * 2) * 2  # one bf16 scale per group of 32 inputs
    odd = TensorGroup("w", (10, 100), copies=1, part="decoder", quantized=True)
    assert odd.nbytes("int4") == 10 * 128 // 2 + 10 * 4 * 2  # rows stored in whole 64-blocks (qwen35/quant/int4.py)
    kept = TensorGroup("norm", (300,), copies=1, part="decoder")
    assert kept.nbytes("fp8") == kept.nbytes("int4") == 600


@pytest.mark.parametrize("name", ["0.8B", "35B-A3B", "397B-A17B"])
def test_weight_bytes_are_consistent_with_counts(name):
    cfg = preset_config(name)
    pc = param_counts(cfg)
    assert weight_bytes(cfg, "bf16") == 2 * pc.text_and_vision
    assert weight_bytes(cfg, "fp32") == 4 * pc.text_and_vision
    assert weight_bytes(cfg, "bf16", include_mtp=True) == 2 * pc.total
    assert weight_bytes(cfg, "bf16", include_vision=False) == 2 * pc.text
    fp8, int4 = weight_bytes(cfg, "fp8"), weight_bytes(cfg, "int4")
    assert pc.text_and_vision < fp8 < 2 * pc.text_and_vision
    # the int4 recipe stores an int8 lm_head, which on a tied model (0.8B) is a copy beside the bf16 embedding:
    # without the heads, int4 is below fp8 everywhere; with them it is too once the head is not tied
    v, h = cfg.text.vocab_size, cfg.text.hidden_size
    fp8_head = 0 if cfg.text.tie_word_embeddings else 2 * v * h
    assert int4 - (v * h + 6 * v) < fp8 - fp8_head
    assert int4 < fp8 or cfg.text.tie_word_embeddings


def test_397b_fp8_keeps_only_small_modules_in_bf16():
    cfg = preset_config("397B-A17B")
    pc = param_counts(cfg)
    fp8 = weight_bytes(cfg, "fp8")
    # kept bf16: embedding + lm_head + vision + routers + shared gates + GDN a/b + norms, conv, A_log, dt_bias
    h = 4096
    kept = (2 * pc.embedding + pc.vision + 60 * (512 * h + h) + 45 * (2 * 64 * h + 12_288 * 4 + 2 * 64 + 128)
            + 60 * 2 * h + h + 15 * 2 * 256)
    quantized = pc.text_and_vision - kept
    # every converted matrix here has both sides divisible by 128, so scales are exactly numel / 128^2 * 4 B
    assert fp8 == 2 * kept + quantized + quantized // (128 * 128) * 4


# ----------------------------------------------------------------------------------------------------------------
# fit


def test_fit_hand_computed_case():
    cfg = preset_config("0.8B")
    w = 2 * (752_393_024 + 100_592_896)  # bf16 text + vision (text count = facts' 0.752 B, checked above)
    assert weight_bytes(cfg) == w
    state = 18 * 16 * 128 * 128 * 4 + 18 * (2 * 2048 + 2048) * 3 * 2  # = 19,537,920 = 1590 tokens of KV
    kv = 6 * 2 * 2 * 256 * 2  # 12,288
    memory = w + 10 * (state + 4096 * kv) + 1  # ten sequences of 4096 tokens, one byte to spare
    r = fit(cfg, memory, "bf16", "bf16", context=4096)
    assert (r.weight_bytes, r.kv_bytes_per_token, r.state_bytes_per_sequence) == (w, kv, state)
    assert r.free_bytes == 10 * (state + 4096 * kv) + 1
    assert r.max_sequences == 10
    # one sequence gets everything: (9 * state + 40960 * kv + 1) // kv = 9 * 1590 + 40960
    assert r.max_context == r.memory_max_context == 9 * 1590 + 40_960 == 55_270
    assert r.fits and "10 concurrent sequences of 4,096 tokens" in r.message


def test_fit_caps_at_the_model_window_and_defaults_to_it():
    cfg = preset_config("0.8B")
    r = fit(cfg, 10**12)
    assert r.context == 262_144
    assert r.max_context == 262_144 < r.memory_max_context
    state, kv = 19_537_920, 12_288
    assert r.max_sequences == (10**12 - weight_bytes(cfg)) // (state + 262_144 * kv)


def test_fit_reports_when_nothing_fits():
    cfg = preset_config("0.8B")
    w = weight_bytes(cfg)
    over = fit(cfg, w - 1)
    assert not over.fits and over.max_context == 0 and over.max_sequences == 0
    assert over.free_bytes == -1 and "does not fit" in over.message
    exact = fit(cfg, w)  # zero left over
    assert not exact.fits and "does not fit" in exact.message
    state_only = fit(cfg, w + 19_537_920)  # the state fits but not one token of KV
    assert not state_only.fits and state_only.max_context == 0
    one_short = fit(cfg, w + 19_537_920 + 12_288 * 100, context=200)
    assert one_short.fits and one_short.max_context == 100 and one_short.max_sequences == 0
    assert "not one of 200 tokens" in one_short.message


def test_fit_uses_weight_and_kv_dtypes():
    cfg = preset_config("397B-A17B")
    r = fit(cfg, 640 * 10**9, "fp8", "fp8", context=131_072)
    assert r.weight_bytes == weight_bytes(cfg, "fp8")
    assert r.kv_bytes_per_token == 15 * 2 * 2 * (256 + 4)  # 1 B per value + a float32 scale per token per head
    assert r.max_sequences == (640 * 10**9 - r.weight_bytes) // (r.state_bytes_per_sequence + 131_072 * 15_600)
    fp32 = fit(cfg, 10**13, "fp32")  # an fp32 model keeps its conv window in fp32 too
    assert fp32.state_bytes_per_sequence == 45 * 64 * 128 * 128 * 4 + 45 * 12_288 * 3 * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(context=0), "positive"), (dict(context=262_145), "maximum"),
    (dict(weight_dtype="q4"), "weight dtype"), (dict(kv_dtype="int2"), "KV cache dtype"),
])
def test_fit_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(preset_config("0.8B"), 10**10, **kwargs)


def test_yarn_extends_the_window():
    body = dict(PRESETS["27B"])
    body["text_config"] = dict(body["text_config"], rope_parameters=dict(
        body["text_config"]["rope_parameters"], rope_type="yarn", factor=4.0,
        original_max_position_embeddings=262_144))
    r = fit(config_from_dict(body), 10**13, context=1_010_000)
    assert r.model_max_context == 1_048_576 and r.max_sequences > 0


def test_report_dict_is_json_ready():
    import json

    r = report_dict(preset_config("35B-A3B"), memory_bytes=80 * 10**9)
    assert json.loads(json.dumps(r)) == r
    assert r["params"]["active_per_token"] == param_counts(preset_config("35B-A3B")).active
    assert r["fit"]["fits"] is True


# ----------------------------------------------------------------------------------------------------------------
# transformers as the oracle: sum p.numel() of real modules built from small configs


def _small_body(moe: bool, tie: bool) -> dict:
    text = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=24, linear_conv_kernel_dim=4, mtp_num_hidden_layers=1,
        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                             mrope_section=[2, 1, 1], mrope_interleaved=True),
    )
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                    shared_expert_intermediate_size=40)
    else:
        text["intermediate_size"] = 96
    vision = dict(depth=2, hidden_size=32, intermediate_size=80, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=64, patch_size=8, temporal_patch_size=2, spatial_merge_size=2,
                  in_channels=3)
    return {"model_type": "qwen3_5_moe" if moe else "qwen3_5", "text_config": text, "vision_config": vision,
            "tie_word_embeddings": tie}


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied matrix once


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_counts_match_transformers_modules(moe, tie):
    transformers = pytest.importorskip("transformers")
    import torch

    body = _small_body(moe, tie)
    cfg = config_from_dict(body)
    pc = param_counts(cfg)
    torch.manual_seed(0)
    conf_cls = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    hf_conf = conf_cls(**body)
    full = (transformers.Qwen3_5MoeForConditionalGeneration if moe
            else transformers.Qwen3_5ForConditionalGeneration)(hf_conf)
    lm = (transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM)(hf_conf.text_config)

    assert _numel(full) == pc.text_and_vision
    assert _numel(full.model.visual) == pc.vision
    assert _numel(full.model.language_model) == pc.embedding + pc.decoder
    assert _numel(full.lm_head) == pc.lm_head + (pc.embedding if tie else 0)
    assert full.config.tie_word_embeddings == tie
    if not tie:  # the text-only class ties by text_config's own flag, so compare it untied only
        assert _numel(lm) == pc.text

    # MTP (not built by transformers): one full-attention decoder layer + fc [H, 2H] + 3 norms [H]
    layers = full.model.language_model.layers
    full_layer = next(l for l, kind in zip(layers, cfg.text.layer_types) if kind == "full_attention")
    h = cfg.text.hidden_size
    assert pc.mtp == _numel(full_layer) + 2 * h * h + 3 * h

    # active per token: everything except the experts not routed to (top-k of E in every layer)
    experts = sum(_numel(l.mlp.experts) for l in layers) if moe else 0
    t = cfg.text
    active_experts = experts * t.num_experts_per_tok // t.num_experts if moe else 0
    assert pc.active == _numel(full.model.language_model) + pc.lm_head - experts + active_experts
    assert pc.routed_experts == experts
    assert math.isclose(pc.active_excl_embedding, pc.active - (0 if tie else pc.embedding))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_int4_bytes_are_what_quantize_int4_stores(moe, tie):
    """The int4 figure against a real model converted by the recipe (bf16 throughout, tower and MTP included):
    4-bit layers and expert banks with their bf16 scales, the int8 lm_head (its own copy when tied)."""
    import torch

    from qwen35.memory import weight_bytes_by_part
    from qwen35.model import Qwen35ForCausalLM
    from qwen35.quant import quantize_int4

    cfg = config_from_dict(_small_body(moe, tie))
    with torch.device("meta"):
        model = Qwen35ForCausalLM(cfg, mtp=True, vision=True)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    quantize_int4(model)
    seen, stored = set(), 0
    for t in model.state_dict().values():  # persistent tensors, a shared one once
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            stored += t.numel() * t.element_size()
    assert weight_bytes(cfg, "int4", include_mtp=True) == stored
    v, h = cfg.text.vocab_size, cfg.text.hidden_size
    assert weight_bytes_by_part(cfg, "int4")["lm_head"] == v * h + 6 * v  # int8 + float32 and bf16 row scales


def test_an_int4_folder_defaults_to_the_int4_figures():
    from qwen35.memory import default_weight_dtype

    q = {"quant_method": "qwen35-int4", "bits": 4, "group_size": 32, "lm_head": "int8"}
    body = dict(_small_body(False, False), quantization_config=q)
    assert report_dict(config_from_dict(body))["weight_dtype"] == "int4"
    body["quantization_config"] = {"quant_method": "compressed-tensors"}
    assert default_weight_dtype(config_from_dict(body)) == "bf16"
