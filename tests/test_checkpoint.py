"""Checkpoint folders: naming variants, sharding, FP8, and the errors for broken folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from qwen35.checkpoint import CheckpointError, dequantize_block_fp8
from tests.hf_oracle import build_hf, hf_logits, save_hf


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    ref = build_hf(moe=True, multimodal=True, tie=False)
    return ref, save_hf(ref, tmp_path_factory.mktemp("moe"))


def _ids(n=30):
    return torch.randint(0, 160, (1, n), generator=torch.Generator().manual_seed(0))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def test_transformers_writes_per_expert_and_we_write_fused(moe_ckpt, tmp_path):
    ref, path = moe_ckpt
    names = _tensors(path).keys()
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)  # transformers' own layout
    ours = qwen35.load_model(path, dtype="float32")
    ours.save_pretrained(tmp_path / "fused")
    fused = _tensors(tmp_path / "fused")
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in fused
    assert fused["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert any(n.startswith("model.visual.") for n in fused)  # kept aside, written back
    again = qwen35.load_model(tmp_path / "fused", dtype="float32")
    assert torch.equal(again(_ids()).logits, ours(_ids()).logits)


def test_text_only_prefix_and_sharded_index(moe_ckpt, tmp_path):
    ref, path = moe_ckpt
    ours = qwen35.load_model(path, dtype="float32")
    # a text-only config saved in many small shards
    from dataclasses import replace
    ours.config = replace(ours.config, multimodal=False, model_type="qwen3_5_moe_text", vision=None)
    ours.extra_tensors = {}
    ours.save_pretrained(tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    assert all(k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))
               for k in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    again = qwen35.load_model(tmp_path, dtype="float32")
    torch.testing.assert_close(again(_ids()).logits, hf_logits(ref, _ids()), atol=1e-5, rtol=0)


def test_mtp_tensors_of_a_config_without_mtp_layers_stay_aside(moe_ckpt, tmp_path):
    _, path = moe_ckpt
    src = _copy(path, tmp_path / "src")
    t = _tensors(src)
    t["mtp.fc.weight"] = torch.randn(64, 128)
    t["mtp.norm.weight"] = torch.randn(64)
    save_file(t, str(src / "model.safetensors"))
    m = qwen35.load_model(src, dtype="float32")
    assert m.text_config.mtp_num_hidden_layers == 0 and m.mtp is None
    assert set(k for k in m.extra_tensors if k.startswith("mtp.")) == {"mtp.fc.weight", "mtp.norm.weight"}
    m.save_pretrained(tmp_path / "out")
    assert torch.equal(_tensors(tmp_path / "out")["mtp.fc.weight"], t["mtp.fc.weight"])


def test_mtp_block_loads_as_model_mtp_and_saves_back(moe_ckpt, tmp_path):
    """A multimodal MoE folder whose config declares an MTP layer: the block loads through the one loader into
    model.mtp (only vision stays aside), is written back under the official names, and transformers still loads
    the written folder (it ignores mtp.*)."""
    from qwen35.model.mtp import MTPHead

    ref, path = moe_ckpt
    src = _copy(path, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    ours = qwen35.load_model(src, dtype="float32")
    assert ours.mtp is None  # declared, but no weights in the folder
    head = MTPHead(ours.text_config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    t = _tensors(src)
    t.update(head.official_state_dict(per_expert=True))
    save_file(t, str(src / "model.safetensors"))

    m = qwen35.load_model(src, dtype="float32")
    assert m.mtp is not None and m.visual is not None and not m.extra_tensors
    for k, v in head.state_dict().items():
        assert torch.equal(v, m.mtp.state_dict()[k]), k
    m.save_pretrained(tmp_path / "out")
    written = _tensors(tmp_path / "out")
    assert {k for k in written if k.startswith("mtp.")} == set(head.official_state_dict(per_expert=True))
    again = qwen35.load_model(tmp_path / "out", dtype="float32")
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    back = type(ref).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, _ids()), again(_ids()).logits, atol=1e-5, rtol=0)


def _break(path, tmp_path, edit):
    src = _copy(path, tmp_path / "broken")
    t = _tensors(src)
    edit(t)
    save_file(t, str(src / "model.safetensors"))
    return src


def test_missing_tensor_is_named(moe_ckpt, tmp_path):
    src = _break(moe_ckpt[1], tmp_path, lambda t: t.pop("model.language_model.layers.1.linear_attn.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.linear_attn.A_log"):
        qwen35.load_model(src)


def test_missing_expert_is_named(moe_ckpt, tmp_path):
    src = _break(moe_ckpt[1], tmp_path, lambda t: t.pop("model.language_model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.experts.5.up_proj.weight"):
        qwen35.load_model(src)


def test_unexpected_tensor_is_named(moe_ckpt, tmp_path):
    src = _break(moe_ckpt[1], tmp_path, lambda t: t.__setitem__("model.language_model.layers.0.wibble", torch.ones(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor model.language_model.layers.0.wibble"):
        qwen35.load_model(src)


def test_wrong_shape_is_named(moe_ckpt, tmp_path):
    key = "model.language_model.layers.3.self_attn.k_proj.weight"
    src = _break(moe_ckpt[1], tmp_path, lambda t: t.__setitem__(key, torch.ones(3, 64)))
    with pytest.raises(CheckpointError, match=rf"{key} in model.safetensors has shape \[3, 64\], expected \[64, 64\]"):
        qwen35.load_model(src)


def test_truncated_file(moe_ckpt, tmp_path):
    src = _copy(moe_ckpt[1], tmp_path / "trunc")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        qwen35.load_model(src)


def test_pickle_weights_are_refused(tmp_path):
    ref = build_hf(moe=False, multimodal=False)
    src = save_hf(ref, tmp_path / "p")
    (src / "model.safetensors").unlink()
    torch.save({"x": torch.ones(1)}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        qwen35.load_model(src)


def test_index_naming_a_missing_shard(moe_ckpt, tmp_path):
    src = _copy(moe_ckpt[1], tmp_path / "idx")
    names = _tensors(src).keys()
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        qwen35.load_model(src)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype 'int3'"):
        qwen35.load_model.__globals__["resolve_dtype"]("int3")


def _quantize_fp8(w: torch.Tensor, block=128):
    rows, cols = w.shape[-2:]
    pr, pc = (-rows) % block, (-cols) % block
    wp = torch.nn.functional.pad(w, (0, pc, 0, pr))
    tiles = wp.unflatten(-2, (-1, block)).unflatten(-1, (-1, block))  # [..., R/b, b, C/b, b]
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale_inv = amax / 448.0
    q = (tiles / scale_inv[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv.float()


def test_block_fp8_checkpoint_loads_dequantised(tmp_path):
    ref = build_hf(moe=False, multimodal=True, hidden_size=160, intermediate_size=200)
    src = save_hf(ref, tmp_path / "bf")
    t = _tensors(src)
    fp8 = {}
    for k, v in t.items():
        if k.endswith(("q_proj.weight", "o_proj.weight", "in_proj_qkv.weight", "up_proj.weight", "down_proj.weight")):
            q, s = _quantize_fp8(v)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            t[k] = dequantize_block_fp8(q, s, (128, 128), torch.float32)  # what the FP8 file really encodes
        else:
            fp8[k] = v
    save_file(t, str(src / "model.safetensors"))
    want = qwen35.load_model(src, dtype="float32")
    dst = _copy(src, tmp_path / "fp8")
    save_file(fp8, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=[128, 128], modules_to_not_convert=["lm_head"])
    (dst / "config.json").write_text(json.dumps(cfg))
    got = qwen35.load_model(dst, dtype="float32")
    ids = _ids()
    assert torch.equal(got(ids).logits, want(ids).logits)
    # and the dequantised weights are close to the originals (e4m3 has a 3-bit mantissa)
    w0 = ref.model.language_model.layers[0].mlp.up_proj.weight
    w1 = got.model.layers[0].mlp.up_proj.weight
    assert ((w1 - w0).abs() <= w0.abs() * 0.07 + 1e-3).all()


def test_unsupported_quantization_is_refused(tmp_path):
    ref = build_hf(moe=False, multimodal=False)
    src = save_hf(ref, tmp_path / "q")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="gptq", bits=4)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'gptq'"):
        qwen35.load_model(src)
