"""Quantized checkpoints on disk: quantize while loading, save, load again — each equal to the in-memory
recipe — the official FP8 layout of what is written, ``qwen35 quantize`` end to end, and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from qwen35.checkpoint import KEEP_FP32, CheckpointError, dequantize_block_fp8
from qwen35.cli import main
from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM
from qwen35.quant import Int4Experts, Int4Linear, Int8Experts, Int8Linear, quantize_int4, quantize_int8
from qwen35.quant.fp8 import FP8_DTYPE, Fp8Experts, Fp8Linear, quantize_fp8
from qwen35.quant.saved import Int4Format, get_format
from tests.engine.conftest import BASE, tiny_model

IDS = torch.randint(0, 90, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def float_folder(request, tmp_path_factory):
    m = tiny_model(request.param).requires_grad_(False)
    path = tmp_path_factory.mktemp("float")
    m.save_pretrained(path)
    return m, path


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


RECIPES = {"fp8": quantize_fp8, "int8": quantize_int8, "int4": quantize_int4}
TYPES = {"fp8": (Fp8Linear, Fp8Experts), "int8": (Int8Linear, Int8Experts), "int4": (Int4Linear, Int4Experts)}


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_quantize_on_load_save_load_equal_the_in_memory_model(float_folder, tmp_path, fmt):
    float_model, folder = float_folder
    recipe = RECIPES[fmt]
    in_memory = recipe(copy.deepcopy(float_model)).requires_grad_(False)
    want = _logits(in_memory)

    on_load = qwen35.load_model(folder, quantization=fmt)  # quantized tensor by tensor while reading
    assert on_load.quantization == fmt
    assert torch.equal(_logits(on_load), want)
    for (n, a), (_, b) in zip(sorted(in_memory.state_dict().items()), sorted(on_load.state_dict().items())):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), n

    on_load.save_pretrained(tmp_path / "q")
    again = qwen35.load_model(tmp_path / "q")  # a quantized folder loads in its format by default
    assert again.quantization == fmt
    assert torch.equal(_logits(again), want)
    for t in TYPES[fmt] + (Int8Linear,):  # int4's lm_head is int8
        assert sum(isinstance(m, t) for m in again.modules()) == sum(isinstance(m, t) for m in in_memory.modules())
    assert sum(isinstance(m, TYPES[fmt]) for m in again.modules()) > 0
    # and the in-memory model saves to the same tensors
    in_memory.save_pretrained(tmp_path / "mem")
    a, b = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(tmp_path / "mem" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_fp8_folder_is_in_the_official_layout(float_folder, tmp_path):
    float_model, folder = float_folder
    moe = float_model.config.text.num_experts > 0
    qwen35.load_model(folder, quantization="fp8").save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == \
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert "lm_head" in cfg["modules_to_not_convert"]
    assert "model.layers.0.linear_attn.in_proj_a" in cfg["modules_to_not_convert"]
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    q = t["model.layers.0.linear_attn.in_proj_qkv.weight"]
    s = t["model.layers.0.linear_attn.in_proj_qkv.weight_scale_inv"]
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (-(-q.shape[0] // 128), 1)
    # what the file encodes, read by the loader's own dequantization, is the float weight within e4m3 rounding
    w = float_model.model.layers[0].linear_attn.in_proj_qkv.weight
    deq = dequantize_block_fp8(q, s, (128, 128), torch.float32)
    assert ((deq - w).abs() <= w.abs() / 16 + s.max() * 2 ** -10).all()
    assert t["model.layers.0.linear_attn.in_proj_a.weight"].dtype == torch.float32
    if moe:  # per expert, as the official FP8 checkpoints store them
        assert "model.layers.0.mlp.experts.gate_up_proj" not in t
        g = t["model.layers.0.mlp.experts.3.gate_proj.weight"]
        assert g.dtype == FP8_DTYPE and "model.layers.0.mlp.experts.3.down_proj.weight_scale_inv" in t
        assert t["model.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.float32
        assert "model.layers.0.mlp.shared_expert_gate" in cfg["modules_to_not_convert"]


def test_int8_folder_uses_compressed_tensors_naming(float_folder, tmp_path):
    _, folder = float_folder
    qwen35.load_model(folder, quantization="int8").save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "int-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    w, s = t["model.layers.3.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight_scale"]
    assert w.dtype == torch.int8 and s.shape == (w.shape[0], 1)


def test_widening_a_quantized_folder_gives_its_dequantized_weights(float_folder, tmp_path):
    _, folder = float_folder
    q = qwen35.load_model(folder, quantization="fp8")
    q.save_pretrained(tmp_path / "q")
    wide = qwen35.load_model(tmp_path / "q", quantization=None)
    assert getattr(wide, "quantization", None) is None
    assert torch.equal(wide.model.layers[3].self_attn.o_proj.weight, q.model.layers[3].self_attn.o_proj.dequantized())
    # and an fp8 folder re-quantized to int8 at load equals int8 of those dequantized weights
    i8 = qwen35.load_model(tmp_path / "q", quantization="int8")
    assert torch.equal(_logits(i8), _logits(quantize_int8(wide)))


def test_quantize_cli_end_to_end(float_folder, tmp_path, capsys):
    float_model, folder = float_folder
    (folder / "tokenizer_config.json").write_text("{}")  # copied along
    out = tmp_path / "cli-fp8"
    assert main(["quantize", str(folder), str(out), "--quantization", "fp8", "--max-shard-size", "64KiB"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer_config.json").exists()
    loaded = qwen35.load_model(out)
    assert loaded.quantization == "fp8"
    assert torch.equal(_logits(loaded), _logits(quantize_fp8(copy.deepcopy(float_model)).requires_grad_(False)))


def test_quantize_cli_refuses_bad_input(float_folder, tmp_path, capsys):
    _, folder = float_folder
    assert main(["quantize", str(folder), str(tmp_path / "x"), "--quantization", "int3"]) != 0
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--quantization", "fp8"]) != 0
    assert "IN must be a checkpoint folder" in capsys.readouterr().err
    assert main(["quantize", str(folder), str(folder), "--quantization", "fp8"]) != 0
    assert "OUT must be a new folder" in capsys.readouterr().err
    assert main(["quantize", "--help"]) == 0
    assert "weight_scale_inv" in capsys.readouterr().out


def test_unknown_format_is_refused(float_folder):
    _, folder = float_folder
    with pytest.raises(CheckpointError, match="quantization 'int3' is not one of fp8, int4, int8"):
        qwen35.load_model(folder, quantization="int3")
    with pytest.raises(ValueError, match="quantization 'int3'"):
        get_format("int3")
    with pytest.raises(ValueError, match="quantization must be None, 'int8', 'int4' or 'fp8'"):
        qwen35.LLM(str(folder), quantization="int3", skip_tokenizer_init=True)


def _quantized_folder(float_folder, tmp_path, fmt):
    _, folder = float_folder
    out = tmp_path / fmt
    qwen35.load_model(folder, quantization=fmt).save_pretrained(out)
    return out


def _edit(folder, edit):
    t = load_file(str(folder / "model.safetensors"))
    edit(t)
    save_file(t, str(folder / "model.safetensors"))


def test_missing_and_misshapen_scales_are_named(float_folder, tmp_path):
    folder = _quantized_folder(float_folder, tmp_path, "int8")
    _edit(folder, lambda t: t.pop("model.layers.1.linear_attn.out_proj.weight_scale"))
    with pytest.raises(CheckpointError, match=r"layers.1.linear_attn.out_proj.weight is torch.int8 but has no"):
        qwen35.load_model(folder)
    folder = _quantized_folder(float_folder, tmp_path / "b", "int8")
    _edit(folder, lambda t: t.__setitem__("model.layers.1.linear_attn.out_proj.weight_scale", torch.ones(3, 1)))
    with pytest.raises(CheckpointError, match=r"out_proj.weight in model.safetensors: weight_scale must hold one"):
        qwen35.load_model(folder)
    folder = _quantized_folder(float_folder, tmp_path / "c", "fp8")
    key = "model.layers.3.self_attn.k_proj.weight_scale_inv"
    _edit(folder, lambda t: t.__setitem__(key, torch.ones(2, 3)))
    with pytest.raises(CheckpointError, match=r"k_proj.weight in model.safetensors: weight_scale_inv has shape "
                                              r"\[2, 3\].*expected float \[1, 1\]"):
        qwen35.load_model(folder)


def test_a_module_half_quantized_is_refused(tmp_path):
    folder = tmp_path / "fp8"
    quantize_fp8(tiny_model(True).requires_grad_(False)).save_pretrained(folder)

    def unquantize_one(t):
        k = "model.layers.2.mlp.experts.1.up_proj.weight"
        t[k] = dequantize_block_fp8(t[k], t.pop(k + "_scale_inv"), (128, 128), torch.float32)

    _edit(folder, unquantize_one)
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.experts: some of its tensors are quantized"):
        qwen35.load_model(folder)


def test_unknown_compressed_tensors_scheme_is_refused(float_folder, tmp_path):
    folder = _quantized_folder(float_folder, tmp_path, "int8")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'compressed-tensors'.* is not supported"):
        qwen35.load_model(folder)


def test_llm_honours_quantization(float_folder, tmp_path):
    _, folder = float_folder
    llm = qwen35.LLM(str(folder), quantization="fp8", skip_tokenizer_init=True)
    assert llm.model.quantization == "fp8"
    llm.model.save_pretrained(tmp_path / "q")
    again = qwen35.LLM(str(tmp_path / "q"), skip_tokenizer_init=True)  # stays FP8 by default
    assert again.model.quantization == "fp8"
    assert getattr(qwen35.LLM(str(tmp_path / "q"), dtype="float32", skip_tokenizer_init=True).model,
                   "quantization", None) is None  # an explicit dtype widens
    out = again.generate([list(IDS[0, :8].tolist())], qwen35.SamplingParams(max_tokens=6, temperature=0,
                                                                             ignore_eos=True))
    want = llm.generate([list(IDS[0, :8].tolist())], qwen35.SamplingParams(max_tokens=6, temperature=0,
                                                                            ignore_eos=True))
    assert out[0].outputs[0].token_ids == want[0].outputs[0].token_ids


# ---- int4: its settings on disk, the CLI, the loader's checks ---------------------------------------------------

def _tied_moe_with_mtp() -> Qwen35ForCausalLM:
    """A bf16 MoE model with tied embeddings and an MTP block (its own expert bank), the cases the default tiny
    models do not cover."""
    d = dict(BASE, model_type="qwen3_5_moe_text", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=32, tie_word_embeddings=True, mtp_num_hidden_layers=1)
    torch.manual_seed(1)
    m = Qwen35ForCausalLM(config_from_dict(d), mtp=True)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    m.to(torch.bfloat16)
    for name, p in m.named_parameters():
        if name.endswith(KEEP_FP32):  # as load_model keeps them
            p.data = p.data.float()
    return m.eval().requires_grad_(False)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k


@pytest.mark.parametrize("lm_head", ["int8", "int4", None])
def test_int4_group_size_and_lm_head_round_trip(tmp_path, lm_head):
    float_model = _tied_moe_with_mtp()
    float_model.save_pretrained(tmp_path / "bf16")
    in_memory = quantize_int4(copy.deepcopy(float_model), 64, lm_head=lm_head)
    want = _logits(in_memory)

    on_load = qwen35.load_model(tmp_path / "bf16", quantization=Int4Format(group_size=64, lm_head=lm_head))
    assert torch.equal(_logits(on_load), want)
    _assert_same_state(in_memory, on_load)
    assert any(isinstance(m, Int4Experts) for n, m in on_load.named_modules() if n.startswith("mtp."))

    on_load.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qwen35-int4" and cfg["group_size"] == 64 and cfg["lm_head"] == lm_head
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.weight" not in t  # tied: the head is re-derived from the embedding
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["mtp.layers.0.mlp.experts.5.down_proj.weight"].dtype == torch.uint8

    again = qwen35.load_model(tmp_path / "q")
    head = {"int8": Int8Linear, "int4": Int4Linear, None: torch.nn.Linear}[lm_head]
    assert isinstance(again.lm_head, head)  # (Int8Linear and Int4Linear are not nn.Linear)
    if lm_head is None:
        assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(_logits(again), want)
    _assert_same_state(in_memory, again)
    # a folder already int4 stays as written when int4 is asked for by name (not re-quantized with the defaults)
    kept = qwen35.load_model(tmp_path / "q", quantization="int4")
    assert {m.group_size for m in kept.modules() if isinstance(m, (Int4Linear, Int4Experts))} == {64}
    assert torch.equal(_logits(kept), want)


def test_int4_folder_layout_and_widening(float_folder, tmp_path):
    float_model, folder = float_folder
    q = qwen35.load_model(folder, quantization="int4")
    q.save_pretrained(tmp_path / "q")
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    w = t["model.layers.3.self_attn.o_proj.weight"]
    assert w.dtype == torch.uint8 and w.shape == (64, 64)  # [N, K/2]: o_proj takes 4 heads x 32 = 128 inputs
    assert t["model.layers.3.self_attn.o_proj.weight_scale"].dtype == torch.bfloat16
    assert t["model.layers.3.self_attn.o_proj.weight_shape"].tolist() == [64, 128]
    assert t["lm_head.weight"].dtype == torch.int8 and t["lm_head.weight_scale"].shape == (96, 1)
    assert "lm_head.weight_shape" not in t
    assert t["model.layers.0.linear_attn.in_proj_a.weight"].dtype == torch.float32  # kept

    wide = qwen35.load_model(tmp_path / "q", quantization=None)
    assert getattr(wide, "quantization", None) is None
    assert torch.equal(wide.model.layers[3].self_attn.o_proj.weight, q.model.layers[3].self_attn.o_proj.dequantized())
    assert torch.equal(wide.lm_head.weight, q.lm_head.dequantized())
    if float_model.config.text.num_experts:
        # down_proj takes 32 inputs, stored padded to a 64-weight block: weight_shape gives K back
        assert torch.equal(wide.model.layers[0].mlp.experts.down_proj,
                           q.model.layers[0].mlp.experts.dequantized("down_proj"))
    else:
        assert torch.equal(wide.model.layers[0].mlp.down_proj.weight, q.model.layers[0].mlp.down_proj.dequantized())


def test_quantize_cli_int4_end_to_end(float_folder, tmp_path, capsys):
    float_model, folder = float_folder
    out = tmp_path / "cli-int4"
    assert main(["quantize", str(folder), str(out), "--quantization", "int4", "--max-shard-size", "64KiB"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").exists()
    loaded = qwen35.load_model(out)
    assert loaded.quantization == "int4" and isinstance(loaded.lm_head, Int8Linear)
    assert torch.equal(_logits(loaded), _logits(quantize_int4(copy.deepcopy(float_model)).requires_grad_(False)))

    out = tmp_path / "cli-int4-g64"
    assert main(["quantize", str(folder), str(out), "--quantization", "int4", "--group-size", "64",
                 "--lm-head", "int4"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["group_size"] == 64 and cfg["lm_head"] == "int4"
    want = quantize_int4(copy.deepcopy(float_model), 64, lm_head="int4").requires_grad_(False)
    assert torch.equal(_logits(qwen35.load_model(out)), _logits(want))

    capsys.readouterr()
    assert main(["quantize", str(folder), str(tmp_path / "x"), "--quantization", "int4", "--group-size", "48"]) != 0
    assert "power of two" in capsys.readouterr().err
    assert main(["quantize", str(folder), str(tmp_path / "y"), "--quantization", "fp8", "--lm-head", "int4"]) != 0
    assert "apply to --quantization int4, not fp8" in capsys.readouterr().err
    assert main(["quantize", "--help"]) == 0
    assert "weight_shape" in capsys.readouterr().out


def test_int4_folder_errors_are_named(float_folder, tmp_path):
    folder = _quantized_folder(float_folder, tmp_path, "int4")
    key = "model.layers.1.linear_attn.out_proj.weight"
    _edit(folder, lambda t: t.pop(key + "_shape"))
    with pytest.raises(CheckpointError, match=r"out_proj.weight in model.safetensors: 4-bit weight without its "
                                              r"weight_shape"):
        qwen35.load_model(folder)
    folder = _quantized_folder(float_folder, tmp_path / "b", "int4")
    _edit(folder, lambda t: t.__setitem__(key + "_shape", torch.tensor([64, 16])))
    with pytest.raises(CheckpointError, match=r"weight_shape is \[64, 16\], expected \[64, 32\] from config.json"):
        qwen35.load_model(folder)
    folder = _quantized_folder(float_folder, tmp_path / "c", "int4")
    _edit(folder, lambda t: t.__setitem__(key + "_scale", torch.ones(64, 3)))
    with pytest.raises(CheckpointError, match=r"its scales must be bfloat16 \[64, 2\].*got torch.float32 \[64, 3\]"):
        qwen35.load_model(folder)
    for change, message in ((dict(group_size=48), "int4 group_size: .*power of two"),
                            (dict(packing="gptq"), "has {'packing': 'gptq'}"),
                            (dict(lm_head="fp8"), "lm_head must be one of"),
                            (dict(lm_head=...), "lacks 'lm_head'")):
        folder = _quantized_folder(float_folder, tmp_path / str(len(message)), "int4")
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in change.items():
            if v is ...:
                del cfg["quantization_config"][k]
            else:
                cfg["quantization_config"][k] = v
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=message):
            qwen35.load_model(folder)


def test_llm_int4_quantizes_while_loading(float_folder, monkeypatch):
    float_model, folder = float_folder
    want = _logits(quantize_int4(copy.deepcopy(float_model)).requires_grad_(False))

    def refuse(*args, **kwargs):
        raise AssertionError("quantized in memory after a float load")

    # the at-load path builds its modules from packed tensors (Int4Linear.packed / Int4Experts.empty)
    monkeypatch.setattr(Int4Linear, "__init__", refuse)
    monkeypatch.setattr(Int4Experts, "__init__", refuse)
    llm = qwen35.LLM(str(folder), quantization="int4", skip_tokenizer_init=True)
    assert llm.model.quantization == "int4"
    assert torch.equal(_logits(llm.model), want)


def test_llm_int4_of_a_gguf_quantizes_the_float_model(tmp_path):
    from qwen35.quant.gguf import load_gguf, save_gguf
    from tests.quant.test_gguf import write_tiny_qwen_tokenizer

    tok = write_tiny_qwen_tokenizer(tmp_path / "tok")
    path = save_gguf(tiny_model().to(torch.bfloat16), tok, tmp_path / "m.gguf", "bf16")
    llm = qwen35.LLM(path, quantization="int4")
    assert llm.model.quantization == "int4" and isinstance(llm.model.lm_head, Int8Linear)
    assert torch.equal(_logits(llm.model), _logits(quantize_int4(load_gguf(path)).requires_grad_(False)))
