"""config.json parsing: every model type, every RoPE spelling, and errors that name the field and file."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from qwen35.config import ConfigError, config_from_dict, load_config
from qwen35.model.rope import rope_inverse_frequencies

TEXT = dict(model_type="qwen3_5_text", vocab_size=100, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, intermediate_size=96, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
            rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                 mrope_section=[11, 11, 10], mrope_interleaved=True))


def test_layer_types_from_interval_and_explicit():
    d = dict(TEXT, full_attention_interval=4)
    c = config_from_dict(d)
    assert c.text.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + (
        "full_attention",)
    d = dict(TEXT, layer_types=["full_attention"] * 8)
    assert config_from_dict(d).text.full_attention_layers == list(range(8))


def test_legacy_rope_forms_fold_into_one():
    d = {k: v for k, v in TEXT.items() if k != "rope_parameters"}
    d.update(rope_theta=1e7, partial_rotary_factor=0.5,
             rope_scaling=dict(type="mrope", mrope_section=[11, 11, 10], mrope_interleaved=True))
    r = config_from_dict(d).text.rope
    assert (r.theta, r.partial_rotary_factor, r.rope_type, r.mrope_section) == (1e7, 0.5, "default", (11, 11, 10))


def test_multimodal_wrapper_ties_by_top_level_flag():
    d = dict(model_type="qwen3_5", tie_word_embeddings=False,
             text_config=dict(TEXT, model_type="qwen3_5_text", tie_word_embeddings=True))
    c = config_from_dict(d)
    assert c.multimodal and not c.tie_word_embeddings


def test_yarn_frequencies_match_transformers():
    from transformers import Qwen3_5TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = dict(rope_type="yarn", rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[11, 11, 10],
              mrope_interleaved=True, factor=4.0, original_max_position_embeddings=262144)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = Qwen3_5TextConfig(head_dim=256, rope_parameters=dict(rp), max_position_embeddings=1048576)
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    c = config_from_dict(dict(TEXT, head_dim=256, rope_parameters=rp, max_position_embeddings=262144))
    torch.testing.assert_close(rope_inverse_frequencies(c.text.rope, c.text.rotary_dim), want)
    from qwen35.config import yarn_attention_factor
    assert yarn_attention_factor(c.text.rope) == pytest.approx(want_scale)
    assert c.text.max_context == 1048576


def test_fp8_quantization_config_is_read():
    q = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128],
             modules_to_not_convert=["lm_head"])
    c = config_from_dict(dict(TEXT, quantization_config=q))
    assert c.quantization.weight_block_size == (128, 128)


@pytest.mark.parametrize("change, field", [
    (dict(hidden_size=None), "hidden_size"),
    (dict(model_type="llama"), "model_type"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(layer_types=["linear_attention"] * 7), "layer_types"),
    (dict(layer_types=["linear_attention"] * 7 + ["sliding"]), "layer_types[7]"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters=dict(rope_type="longrope")), "rope_parameters.rope_type"),
    (dict(rope_parameters=dict(rope_type="yarn")), "rope_parameters.factor"),
    (dict(vocab_size="many"), "vocab_size"),
    (dict(num_experts=8), "num_experts_per_tok"),
    (dict(linear_num_value_heads=3), "linear_num_value_heads"),
])
def test_errors_name_field_and_file(tmp_path, change, field):
    d = dict(TEXT)
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert f"'{field}'" in str(e.value) and "config.json" in str(e.value)


def test_unknown_field_warns_with_its_name():
    with pytest.warns(UserWarning, match="'wibble'"):
        config_from_dict(dict(TEXT, wibble=1), "x/config.json")


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_to_dict_roundtrips():
    for d in (TEXT, dict(model_type="qwen3_5_moe", text_config=dict(
            {k: v for k, v in TEXT.items() if k != "intermediate_size"}, model_type="qwen3_5_moe_text",
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8))):
        c = config_from_dict(d)
        assert config_from_dict(c.to_dict()).text == c.text
