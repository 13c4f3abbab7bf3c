"""Block-FP8 weights: the quantizer against the official layout, the native product against dequantize-then-
F.linear on every instruction set this host runs, the quantized model against its dequantized twin, and official-
layout FP8 checkpoints loaded without widening (logits, weight bytes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import qwen35
from qwen35.checkpoint import dequantize_block_fp8
from qwen35.engine.llm_engine import EngineConfig, LLMEngine
from qwen35.engine.params import SamplingParams
from qwen35.kernels import ops
from qwen35.model.linear import Linear
from qwen35.quant.fp8 import FP8_DTYPE, Fp8Experts, Fp8Linear, quantize_block_fp8, quantize_fp8
from tests.engine.conftest import tiny_model
from tests.engine.test_engine import prompts_of, run_all, solo_greedy

BLOCK = (128, 128)


def _weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    # magnitudes over six decades across columns, so blocks differ in scale and small values hit e4m3 subnormals
    return torch.randn(N, K, generator=g) * torch.logspace(-6, 0, K)


def test_quantizer_writes_the_official_layout_and_bounds_the_error():
    w = _weight(300, 200)
    q, s = quantize_block_fp8(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 2)  # ceil(300/128), ceil(200/128)
    # the scale of a block is its largest magnitude over 448, so that value lands on 448 exactly
    assert torch.allclose(s[0, 0], w[:128, :128].abs().max() / 448.0)
    assert q.float().abs().max() == 448.0
    deq = dequantize_block_fp8(q, s, BLOCK, torch.float32)  # the loader's own dequantization
    assert torch.equal(deq, ops.dequantize_fp8_blocks(q, s, BLOCK))
    s_full = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    # e4m3: 3 mantissa bits (relative 2^-4 at worst, round to nearest), absolute 2^-10 scale below 2^-6 scale
    assert ((deq - w).abs() <= torch.maximum(w.abs() / 16, s_full * 2 ** -10) * 1.0001).all()
    assert not torch.isnan(deq).any()


def test_dequantize_whole_and_partial_blocks_agree():
    w = _weight(256, 384, seed=1)
    q, s = quantize_block_fp8(w)
    whole = ops.dequantize_fp8_blocks(q, s, BLOCK)  # the broadcast path
    assert torch.equal(whole[:200, :300], ops.dequantize_fp8_blocks(q[:200, :300].contiguous(), s[:2, :3], BLOCK))


@pytest.mark.parametrize("M,N,K", [(1, 300, 200), (1, 5, 7), (3, 257, 130), (17, 64, 64), (40, 129, 384)])
def test_native_fp8_product_equals_dequantize_then_linear(native_kernels, M, N, K):
    w = _weight(N, K, seed=M)
    q, s = quantize_block_fp8(w)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7))
    want = F.linear(x.double(), ops.dequantize_fp8_blocks(q, s, BLOCK).double())
    got = native_kernels.linear_fp8(x, q, s, BLOCK)
    # the same dequantized values, float32 sums in another order
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    xb = x.bfloat16()
    got_b = native_kernels.linear_fp8(xb, q, s, BLOCK)
    assert got_b.dtype == torch.bfloat16
    want_b = F.linear(xb.double(), ops.dequantize_fp8_blocks(q, s, BLOCK).double())
    # bf16 output: one rounding (2^-9 relative) of the float32 sum
    torch.testing.assert_close(got_b.double(), want_b, rtol=2 ** -8, atol=1e-5 * want_b.abs().max().item())


def test_native_kernel_dequantizes_every_byte_exactly(native_kernels):
    b = torch.arange(256, dtype=torch.uint8)
    b = b[(b & 0x7F) != 0x7F]  # every e4m3fn byte but the two NaNs: normals, subnormals, ±0
    w = b.view(FP8_DTYPE).reshape(1, -1).contiguous()
    s = torch.tensor([[0.375, 3.0]])  # two column blocks with their own scales
    eye = torch.eye(w.shape[1])
    got = native_kernels.linear_fp8(eye, w, s, BLOCK)[:, 0]
    assert torch.equal(got, ops.dequantize_fp8_blocks(w, s, BLOCK)[0])


def test_native_fp8_rejects_bad_arguments(native_kernels):
    q, s = quantize_block_fp8(torch.randn(64, 64))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="float32 scales"):
        native_kernels.linear_fp8(x, q, s[:, :0], BLOCK)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        native_kernels.linear_fp8(x, q.float(), s, BLOCK)
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        native_kernels.linear_fp8(torch.randn(2, 63), q, s, BLOCK)


@pytest.mark.parametrize("rows", [1, 5, 47, 48, 300])
def test_linear_fp8_dispatch_equals_reference(cpu_kind, rows, monkeypatch):
    monkeypatch.setattr(ops, "FP8_BAND_ROWS", 256)  # so the many-row path takes the weight in several bands
    w = _weight(600, 256, seed=3)
    q, s = quantize_block_fp8(w)
    bias = torch.randn(600)
    x = torch.randn(rows, 256)
    want = ops.linear_fp8_reference(x, q, s, BLOCK, bias)
    torch.testing.assert_close(ops.linear_fp8(x, q, s, BLOCK, bias), want, rtol=1e-5, atol=1e-5)
    got = ops.linear_fp8(x.bfloat16(), q, s, BLOCK, bias.bfloat16())
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs() <= 0.02 * want.abs().max()).all()


def test_fp8_modules_keep_their_storage_under_a_dtype_cast():
    torch.manual_seed(0)
    m = torch.nn.Sequential(Fp8Linear.from_linear(Linear(96, 80, bias=True)))
    before = m[0].weight.clone()
    m.to(torch.bfloat16)
    assert m[0].weight.dtype == FP8_DTYPE and torch.equal(m[0].weight.view(torch.uint8), before.view(torch.uint8))
    assert m[0].weight_scale_inv.dtype == torch.float32
    assert m[0].bias.dtype == torch.bfloat16  # a bias is an activation-side parameter


def dequantized_twin(model):
    """A float model whose weights are exactly the dequantized FP8 weights."""
    q = quantize_fp8(copy.deepcopy(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, Fp8Linear):
                twin.get_submodule(name).weight.copy_(mod.dequantized())
            elif isinstance(mod, Fp8Experts):
                gate_up, down = mod.dequantized()
                twin.get_submodule(name).gate_up_proj.copy_(gate_up)
                twin.get_submodule(name).down_proj.copy_(down)
    return q, twin


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantized_model_equals_its_dequantized_twin(moe):
    q, twin = dequantized_twin(tiny_model(moe))
    names = {n for n, m in q.named_modules() if isinstance(m, (Fp8Linear, Fp8Experts))}
    assert "model.layers.0.linear_attn.in_proj_qkv" in names and "model.layers.3.self_attn.o_proj" in names
    assert not any(n.endswith(("in_proj_a", "in_proj_b", "shared_expert_gate")) or n == "lm_head" for n in names)
    assert moe == ("model.layers.0.mlp.experts" in names)
    ids = torch.tensor([prompts_of([40], seed=1)[0]])
    with torch.no_grad():
        for m in (q, twin):
            m.requires_grad_(False)
        # prompt (banded path) and one decode row (native kernel) alike: float32 noise through the layers
        torch.testing.assert_close(q(ids).logits, twin(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(q(ids[:, :1]).logits, twin(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)


def test_engine_on_fp8_model_equals_full_forward():
    q = quantize_fp8(tiny_model(True)).requires_grad_(False)
    eng = LLMEngine(q, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, block_size=4))
    prompts = prompts_of([3, 21, 9], seed=2)
    ids = [eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == solo_greedy(q, p, 8)


# ---- official-layout FP8 checkpoints ------------------------------------------------------------------------

def _official_fp8_folder(tmp_path, moe: bool):
    """A random checkpoint (transformers' own writer, official names, experts per expert for MoE) turned into
    the official FP8 layout tensor by tensor with the writer-independent quantizer of tests/test_checkpoint.py."""
    from tests.hf_oracle import build_hf, save_hf
    from tests.test_checkpoint import _quantize_fp8
    from safetensors.torch import load_file, save_file

    ref = build_hf(moe=moe, multimodal=True, hidden_size=160, intermediate_size=200)
    src = save_hf(ref, tmp_path / "bf")
    t = load_file(str(src / "model.safetensors"))
    keep = ("in_proj_a.weight", "in_proj_b.weight", "mlp.gate.weight", "shared_expert_gate.weight")
    fp8, not_converted = {}, set()
    for k, v in t.items():
        if v.dim() == 2 and k.endswith(".weight") and k.startswith("model.language_model.layers.") \
                and "norm" not in k and not k.endswith(keep):
            fp8[k], fp8[k[: -len("weight")] + "weight_scale_inv"] = _quantize_fp8(v)
        else:
            fp8[k] = v
            if k.endswith(keep):
                not_converted.add(k[: -len(".weight")])
    out = tmp_path / "fp8"
    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(fp8, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=[128, 128],
                                      modules_to_not_convert=sorted(not_converted | {"lm_head"}))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _file_bytes(folder):
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("model.visual."):
                continue  # the tower loads in the model's dtype, as in a bf16 folder
            t = f.get_slice(k)
            n = 1
            for d in t.get_shape():
                n *= d
            total += n * {"F8_E4M3": 1, "F32": 4, "BF16": 2}[t.get_dtype()]
    return total


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_official_fp8_checkpoint_stays_fp8_and_matches_dequantized(tmp_path, moe):
    folder = _official_fp8_folder(tmp_path, moe)
    kept = qwen35.load_model(folder, dtype="auto")  # FP8 stays FP8 by default
    assert kept.quantization == "fp8"
    fp8_layers = [m for m in kept.modules() if isinstance(m, (Fp8Linear, Fp8Experts))]
    assert fp8_layers and moe == any(isinstance(m, Fp8Experts) for m in fp8_layers)
    assert not isinstance(kept.model.layers[0].linear_attn.in_proj_a, Fp8Linear)
    widened = qwen35.load_model(folder, dtype="bfloat16")  # an explicit dtype widens, as before
    assert getattr(widened, "quantization", None) is None
    assert not any(isinstance(m, (Fp8Linear, Fp8Experts)) for m in widened.modules())
    ids = torch.randint(0, 160, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = kept(ids).logits.float()
        b = widened(ids).logits.float()
        # widened keeps the dequantized weights in bf16 (one more rounding) and runs bf16 GEMMs; the FP8 model
        # multiplies the exact dequantized values in float32: they differ by bf16 noise only
        assert (a - b).abs().max() <= 0.03 * b.abs().max()
        f32 = qwen35.load_model(folder, dtype="float32", quantization="fp8")  # kept, float32 activations
        w32 = qwen35.load_model(folder, dtype="float32")
        torch.testing.assert_close(f32(ids).logits, w32(ids).logits, rtol=1e-4, atol=1e-4)
    # memory: the loaded text weights are the checkpoint's bytes, FP8 bytes and float32 scales included
    weights = sum(t.numel() * t.element_size() for n, t in list(kept.named_parameters()) + list(kept.named_buffers())
                  if not n.startswith("visual.") and "rotary" not in n)
    assert weights == _file_bytes(folder)


def test_fp8_checkpoint_errors_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _official_fp8_folder(tmp_path, moe=False)
    key = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight_scale_inv"
    t = load_file(str(folder / "model.safetensors"))
    bad = dict(t)
    bad[key] = torch.ones(5, 5)
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(qwen35.CheckpointError, match=r"in_proj_qkv.*weight_scale_inv has shape \[5, 5\].*128x128"):
        qwen35.load_model(folder)
    bad = dict(t)
    bad.pop(key)
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(qwen35.CheckpointError, match=r"in_proj_qkv.weight is torch.float8_e4m3fn but has no"):
        qwen35.load_model(folder)
    save_file(t, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 128]  # the scales say 128x128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qwen35.CheckpointError, match=r"expected float \[.*\] for a .* weight in 64x128 blocks"):
        qwen35.load_model(folder)
    cfg["quantization_config"]["fmt"] = "e5m2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qwen35.CheckpointError, match="fmt 'e5m2' is not supported"):
        qwen35.load_model(folder)
