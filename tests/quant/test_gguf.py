"""GGUF in and out: our block maths against ggml's reference, file round trips, llama.cpp's converter layout,
the tokenizer a GGUF carries, and the refusals.

The oracle for the tensor maths is the ``gguf`` package's numpy port of ggml-quants.c (bit-exact with it).  The
converter layout is pinned below: names, types and shapes that llama.cpp's ``convert_hf_to_gguf.py`` (vendored in
llama-cpp-python 0.3.36) wrote for transformers checkpoints of exactly the ``tiny_model`` shapes (run once with the
real Qwen3.5 tokenizer, hence vocab 248320 there, 96 here), so CI needs no llama.cpp.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import gguf  # the writer and the test oracle (pip install gguf)
import numpy as np
import pytest
import torch

import qwen35
from qwen35.chat.gguf_vocab import write_tokenizer_files
from qwen35.chat.qwen_vocab import set_qwen35_pipeline
from qwen35.chat.tokenizer import Tokenizer, TokenizerError
from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM
from qwen35.quant import gguf as G
from tests.engine.conftest import BASE, tiny_model

T = gguf.GGMLQuantizationType

# ----------------------------------------------------------------------------------------------------------------
# what llama.cpp's converter writes for the tiny shapes (--outtype q8_0; --outtype bf16 differs only in BF16 where
# Q8_0 stands): tensor -> (type, torch-order shape)

CONVERTER_GLOBAL = {"token_embd.weight": ("Q8_0", (96, 64)), "output.weight": ("Q8_0", (96, 64)),
                    "output_norm.weight": ("F32", (64,))}
CONVERTER_LINEAR_ATTENTION = {  # blk.0 - blk.2
    "attn_norm.weight": ("F32", (64,)), "post_attention_norm.weight": ("F32", (64,)),
    "attn_qkv.weight": ("Q8_0", (96, 64)), "attn_gate.weight": ("Q8_0", (32, 64)),
    "ssm_alpha.weight": ("Q8_0", (4, 64)), "ssm_beta.weight": ("Q8_0", (4, 64)),
    "ssm_a": ("F32", (4,)), "ssm_dt.bias": ("F32", (4,)), "ssm_conv1d.weight": ("F32", (96, 4)),
    "ssm_norm.weight": ("F32", (8,)), "ssm_out.weight": ("Q8_0", (64, 32))}
CONVERTER_FULL_ATTENTION = {  # blk.3
    "attn_norm.weight": ("F32", (64,)), "post_attention_norm.weight": ("F32", (64,)),
    "attn_q.weight": ("Q8_0", (256, 64)), "attn_k.weight": ("Q8_0", (64, 64)), "attn_v.weight": ("Q8_0", (64, 64)),
    "attn_output.weight": ("Q8_0", (64, 128)), "attn_q_norm.weight": ("F32", (32,)),
    "attn_k_norm.weight": ("F32", (32,))}
CONVERTER_DENSE_FFN = {"ffn_gate.weight": ("Q8_0", (96, 64)), "ffn_up.weight": ("Q8_0", (96, 64)),
                       "ffn_down.weight": ("Q8_0", (64, 96))}
CONVERTER_MOE_FFN = {
    "ffn_gate_inp.weight": ("F32", (8, 64)), "ffn_gate_exps.weight": ("Q8_0", (8, 32, 64)),
    "ffn_up_exps.weight": ("Q8_0", (8, 32, 64)), "ffn_down_exps.weight": ("Q8_0", (8, 64, 32)),
    "ffn_gate_shexp.weight": ("Q8_0", (32, 64)), "ffn_up_shexp.weight": ("Q8_0", (32, 64)),
    "ffn_down_shexp.weight": ("Q8_0", (64, 32)), "ffn_gate_inp_shexp.weight": ("F32", (1, 64))}
# metadata keys of the converter's file, "ARCH." standing for qwen35. / qwen35moe.
CONVERTER_KEYS_COMMON = {
    "general.architecture", "general.file_type", "general.name", "general.quantization_version",
    "general.size_label", "general.type", "ARCH.attention.head_count", "ARCH.attention.head_count_kv",
    "ARCH.attention.key_length", "ARCH.attention.layer_norm_rms_epsilon", "ARCH.attention.recurrent_layers",
    "ARCH.attention.value_length", "ARCH.block_count", "ARCH.context_length", "ARCH.embedding_length",
    "ARCH.full_attention_interval", "ARCH.rope.dimension_count", "ARCH.rope.dimension_sections",
    "ARCH.rope.freq_base", "ARCH.ssm.conv_kernel", "ARCH.ssm.group_count", "ARCH.ssm.inner_size",
    "ARCH.ssm.state_size", "ARCH.ssm.time_step_rank", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.merges", "tokenizer.ggml.model",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.pre", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens"}
CONVERTER_KEYS_DENSE = {"ARCH.feed_forward_length"}
CONVERTER_KEYS_MOE = {"ARCH.expert_count", "ARCH.expert_used_count", "ARCH.expert_feed_forward_length",
                      "ARCH.expert_shared_feed_forward_length"}
# values the converter wrote for these shapes (besides the tokenizer's)
CONVERTER_VALUES = {"ARCH.block_count": 4, "ARCH.context_length": 4096, "ARCH.embedding_length": 64,
                    "ARCH.attention.head_count": 4, "ARCH.attention.head_count_kv": 2,
                    "ARCH.attention.key_length": 32, "ARCH.attention.value_length": 32,
                    "ARCH.attention.recurrent_layers": [True, True, True, False],
                    "ARCH.full_attention_interval": 4, "ARCH.rope.dimension_count": 8,
                    "ARCH.rope.dimension_sections": [11, 11, 10, 0], "ARCH.rope.freq_base": 10000.0,
                    "ARCH.ssm.conv_kernel": 4, "ARCH.ssm.group_count": 2, "ARCH.ssm.inner_size": 32,
                    "ARCH.ssm.state_size": 16, "ARCH.ssm.time_step_rank": 4, "general.quantization_version": 2,
                    "general.type": "model"}
CONVERTER_VALUES_DENSE = {"ARCH.feed_forward_length": 96}
CONVERTER_VALUES_MOE = {"ARCH.expert_count": 8, "ARCH.expert_used_count": 2, "ARCH.expert_feed_forward_length": 32,
                        "ARCH.expert_shared_feed_forward_length": 32}


def converter_tensors(moe: bool, main_type: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    layer_types = ["linear_attention"] * 3 + ["full_attention"]
    out = dict(CONVERTER_GLOBAL)
    for i, kind in enumerate(layer_types):
        block = {**(CONVERTER_LINEAR_ATTENTION if kind == "linear_attention" else CONVERTER_FULL_ATTENTION),
                 **(CONVERTER_MOE_FFN if moe else CONVERTER_DENSE_FFN)}
        out.update({f"blk.{i}.{name}": v for name, v in block.items()})
    return {name: (main_type if t == "Q8_0" else t, shape) for name, (t, shape) in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# a tiny Qwen3.5-style tokenizer that fits tiny_model's 96 rows


TINY_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?:'HWT") + ["Ġ", "Ċ"]
TINY_MERGES = [("h", "e"), ("l", "l"), ("Ġ", "w"), ("o", "r"), ("he", "ll")]
# the added tokens follow the vocabulary (ids 52-58) and rows 59-95 of the embedding are padding, as in Qwen3.5
TINY_ADDED = {52: ("<|endoftext|>", True), 53: ("<|im_start|>", True), 54: ("<|im_end|>", True),
              55: ("<think>", False), 56: ("</think>", False), 57: ("<tool_call>", False), 58: ("</tool_call>", False)}
TINY_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXTS = ["hello world", "<|im_start|>user\nhello, world!<|im_end|>\n<|im_start|>assistant\n",
         "<think>\nwhat: 2024?\n</think>\n\nok.", "<tool_call>\nHi there\n</tool_call><|endoftext|>"]


def write_tiny_qwen_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab = {ch: i for i, ch in enumerate(TINY_CHARS)}
    for left, right in TINY_MERGES:
        vocab[left + right] = len(vocab)
    tok = set_qwen35_pipeline(HFTokenizer(BPE(vocab=vocab, merges=TINY_MERGES, ignore_merges=False)))
    body = json.loads(tok.to_str())
    body["added_tokens"] = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": special} for i, (text, special) in TINY_ADDED.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(body))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False,
         "chat_template": TINY_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tiny_qwen_tokenizer(tmp_path_factory.mktemp("tiny-qwen-tokenizer"))


IDS = torch.tensor([[1, 5, 9, 53, 20, 40, 3, 77, 12, 54, 50, 7]])


def logits(model: Qwen35ForCausalLM, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# ----------------------------------------------------------------------------------------------------------------
# the block maths


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random stored bytes of ``n_blocks`` blocks, with finite f16 scales (any bit pattern for the rest)."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)

    def halves(n):
        return (rng.normal(0, 0.05, size=n) * rng.choice([1, 1e-3, 30], size=n)).astype(np.float16).view(np.uint8)

    if qtype in (T.Q8_0, T.Q4_0):
        raw[:, :2] = halves(n_blocks).reshape(-1, 2)
    elif qtype == T.Q4_K:
        raw[:, 0:2] = halves(n_blocks).reshape(-1, 2)
        raw[:, 2:4] = halves(n_blocks).reshape(-1, 2)
    elif qtype == T.Q6_K:
        raw[:, 208:210] = halves(n_blocks).reshape(-1, 2)
    elif qtype == T.F16:
        raw = rng.normal(0, 3, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    elif qtype == T.BF16:
        raw = (rng.normal(0, 3, size=n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = raw.view(np.uint8).reshape(n_blocks, 2)
    elif qtype == T.F32:
        raw = rng.normal(0, 3, size=n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    return raw


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_dequantize_equals_ggml_reference_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    per_block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 3 * 40, rng).reshape(3, 40 * size)  # 3 rows of 40 blocks
    ours = G.dequantize(torch.from_numpy(raw.copy()), int(qtype)).float().numpy()
    ref = raw.view(np.float32) if qtype == T.F32 else gguf.quants.dequantize(raw, qtype)
    assert ours.shape == ref.shape == (3, 40 * per_block)
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


def awkward_values(rng: np.random.Generator) -> np.ndarray:
    """Rows of 32-blocks: all zeros, ties of magnitude, exact halves, wide and tiny ranges."""
    x = (rng.normal(size=(6, 256)) * rng.exponential(size=(6, 1))).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = rng.choice([-2.0, 2.0, 1.0, 0.0], size=32)  # equal largest magnitudes of both signs
    x[2, :32] = np.arange(32, dtype=np.float32) / 2 - 8  # halves: rounding ties
    x[3] *= 1e-4
    x[4, :32] = 1e-30
    return x


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0], ids=lambda t: t.name)
def test_quantize_equals_ggml_reference_bit_for_bit(qtype):
    x = awkward_values(np.random.default_rng(int(qtype)))
    ours = G.quantize(torch.from_numpy(x), int(qtype)).numpy()
    ref = gguf.quants.quantize(x, qtype)
    assert np.array_equal(ours, ref.view(np.uint8).reshape(ours.shape))


def test_block_rounding_bounds():
    # Q8_0: |x - q d| <= d / 2 with d = max|x| / 127, plus 127 |d - f16(d)| for the stored scale;
    # Q4_0: |x - (q - 8) d| <= |d| = max|x| / 8 (the clamp at 15 costs a whole step at the far extreme)
    x = torch.randn(64, 256) * torch.rand(64, 1) * 10
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d8 = amax / 127
    err8 = (G.dequantize(G.quantize(x, G.Q8_0), G.Q8_0) - x).reshape(-1, 32).abs()
    assert (err8 <= d8 / 2 + 127 * (d8 - d8.half().float()).abs() + 1e-7).all()
    err4 = (G.dequantize(G.quantize(x, G.Q4_0), G.Q4_0) - x).reshape(-1, 32).abs()
    assert (err4 <= amax / 8 * (1 + 1e-3) + 1e-7).all()


@pytest.mark.parametrize("n", [4, 16, 48, 64])
def test_a_log_inverse_gives_the_same_decay(n):
    a_log = torch.log(torch.empty(n).uniform_(0.01, 16))
    a_log = torch.cat([a_log[: n // 2], a_log[n // 2:].bfloat16().float()])  # bf16 checkpoints' values too
    a = -torch.exp(a_log)
    back = G._a_log_from_a(a)
    assert torch.equal(torch.exp(back), torch.exp(a_log))


# ----------------------------------------------------------------------------------------------------------------
# the container reader


def test_reader_agrees_with_the_gguf_package(tmp_path, tok_dir):
    path = G.save_gguf(tiny_model(moe=True), tok_dir, tmp_path / "m.gguf", "q8_0")
    ref = gguf.GGUFReader(path)
    with G.GGUFFile(path) as ours:
        fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert ours.metadata == fields
        assert list(ours.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = ours.tensors[t.name]
            assert info.ggml_type == int(t.tensor_type) and info.shape == tuple(int(s) for s in reversed(t.shape))
            assert info.offset == t.data_offset
            assert np.array_equal(ours.raw(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp's layout


@pytest.mark.parametrize("file_type", ["bf16", "q8_0"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_names_types_shapes_and_keys_equal_the_converters(tmp_path, tok_dir, moe, file_type):
    path = G.save_gguf(tiny_model(moe), tok_dir, tmp_path / "m.gguf", file_type)
    arch = "qwen35moe" if moe else "qwen35"
    with G.GGUFFile(path) as f:
        got = {n: (info.type_name, info.shape) for n, info in f.tensors.items()}
        assert got == converter_tensors(moe, "BF16" if file_type == "bf16" else "Q8_0")
        keys = CONVERTER_KEYS_COMMON | (CONVERTER_KEYS_MOE if moe else CONVERTER_KEYS_DENSE)
        assert set(f.metadata) == {k.replace("ARCH.", arch + ".") for k in keys}
        values = {**CONVERTER_VALUES, **(CONVERTER_VALUES_MOE if moe else CONVERTER_VALUES_DENSE)}
        for key, value in values.items():
            assert f.metadata[key.replace("ARCH.", arch + ".")] == value, key
        assert f.metadata["general.architecture"] == arch
        assert f.metadata["general.file_type"] == {"bf16": 32, "q8_0": 7}[file_type]
        assert np.float32(f.metadata[f"{arch}.attention.layer_norm_rms_epsilon"]) == np.float32(1e-6)
        assert f.metadata["tokenizer.ggml.eos_token_id"] == 54 and f.metadata["tokenizer.ggml.padding_token_id"] == 52
        assert f.metadata["tokenizer.chat_template"] == TINY_TEMPLATE


def test_q4_0_keeps_the_sensitive_tensors_at_8_bits(tmp_path, tok_dir):
    path = G.save_gguf(tiny_model(moe=True), tok_dir, tmp_path / "m.gguf", "q4_0")
    with G.GGUFFile(path) as f:
        types = {n: info.type_name for n, info in f.tensors.items()}
        assert f.metadata["general.file_type"] == 2
    for name, (t, _) in converter_tensors(True, "Q4_0").items():
        keep = name.endswith(("token_embd.weight", "output.weight", "ssm_alpha.weight", "ssm_beta.weight"))
        assert types[name] == ("Q8_0" if keep and t == "Q4_0" else t), name


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path, tok_dir):
    d = dict(BASE, model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48)  # the shared expert's down_proj rows: 48 values
    model = Qwen35ForCausalLM(config_from_dict(d)).eval()
    path = G.save_gguf(model, tok_dir, tmp_path / "m.gguf", "q8_0")
    with G.GGUFFile(path) as f:
        assert f.tensors["blk.0.ffn_down_shexp.weight"].type_name == "F16"  # as the converter writes it
        assert f.tensors["blk.0.ffn_up_shexp.weight"].type_name == "Q8_0"


# ----------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bf16_round_trip_gives_identical_logits(tmp_path, tok_dir, moe):
    model = tiny_model(moe).to(torch.bfloat16)
    path = G.save_gguf(model, tok_dir, tmp_path / "m.gguf", "bf16")
    back = G.load_gguf(path)
    assert back.dtype == torch.bfloat16
    # the special ids come from the tokenizer (tokenizer_config's <|im_end|> / <|endoftext|>), the rest from the model
    ids = {"eos_token_id": 54, "pad_token_id": 52, "bos_token_id": None}
    assert back.config.text == dataclasses.replace(model.config.text, **ids)
    assert torch.equal(logits(back), logits(model))
    # float32 compute on the same bf16 weights: still identical
    assert torch.equal(logits(G.load_gguf(path, dtype="float32")), logits(copy.deepcopy(model).float()))


def fake_quantized(model: Qwen35ForCausalLM, file_type: str) -> Qwen35ForCausalLM:
    """``model`` with every weight a file of ``file_type`` quantises replaced by its dequantised value (blocks taken
    in the GGUF's column order): the exact twin of the model load_gguf gives."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for pl in G.placements(twin):
            qtype = G.tensor_type_for(pl.gguf_name, pl.shape, file_type)
            if qtype == G.F32:
                continue
            view = pl.view(params[pl.param])
            cols = pl.cols if pl.cols is not None else torch.arange(view.shape[-1])
            q = G.dequantize(G.quantize(view.index_select(-1, cols), qtype), qtype)
            view.index_copy_(-1, cols, q.to(view.dtype))
    return twin


def rounding_bound(original: torch.Tensor, qtype: int) -> torch.Tensor:
    """The largest error a weight may get from ``qtype`` (per weight, blocks along the last dim): Q8_0 half a step
    of max|x| / 127 (+ the f16 rounding of that step, times 127), Q4_0 a whole step of max|x| / 8 (+ 8 times its
    f16 rounding), F16 / BF16 half an
    ulp (2^-11 / 2^-8 relative)."""
    if qtype in (G.F16, G.BF16):
        return original.abs() * (2.0 ** -11 if qtype == G.F16 else 2.0 ** -8) + 1e-30
    blocks = original.reshape(*original.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    if qtype == G.Q8_0:
        step = amax / 127
        bound = step / 2 + 127 * (step - step.half().float()).abs()
    else:
        step = amax / 8
        bound = step + 8 * (step - step.half().float()).abs()
    return (bound * (1 + 1e-5) + 1e-12).expand_as(blocks).reshape(original.shape)


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantized_round_trip_equals_the_dequantized_twin(tmp_path, tok_dir, moe, file_type):
    model = tiny_model(moe)
    path = G.save_gguf(model, tok_dir, tmp_path / "m.gguf", file_type)
    back = G.load_gguf(path, dtype="float32")
    assert torch.equal(logits(back), logits(fake_quantized(model, file_type)))
    # every weight within its format's rounding of the original (logits of these random tiny models are too
    # chaotic to bound usefully: bf16 rounding alone moves them by ~0.08 of their spread; see the 0.8B benchmark)
    orig, loaded = dict(model.named_parameters()), dict(back.named_parameters())
    for pl in G.placements(model):
        qtype = G.tensor_type_for(pl.gguf_name, pl.shape, file_type)
        cols = pl.cols if pl.cols is not None else torch.arange(pl.shape[-1])
        a = pl.view(orig[pl.param].detach()).index_select(-1, cols).float()
        b = pl.view(loaded[pl.param]).index_select(-1, cols).float()
        if qtype == G.F32:
            continue  # stored exactly (norms and A_log may differ in representation, not in effect: see above)
        assert ((a - b).abs() <= rounding_bound(a, qtype)).all(), pl.gguf_name


def test_mtp_block_round_trips(tmp_path, tok_dir):
    cfg = config_from_dict(dict(BASE, model_type="qwen3_5_text", intermediate_size=96, mtp_num_hidden_layers=1))
    torch.manual_seed(3)
    model = Qwen35ForCausalLM(cfg, mtp=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.eval().to(torch.bfloat16)
    path = G.save_gguf(model, tok_dir, tmp_path / "m.gguf", "bf16")
    with G.GGUFFile(path) as f:
        assert f.metadata["qwen35.block_count"] == 5 and f.metadata["qwen35.nextn_predict_layers"] == 1
        assert f.metadata["qwen35.attention.recurrent_layers"] == [True, True, True, False, False]
        assert {"blk.4.nextn.eh_proj.weight", "blk.4.nextn.enorm.weight", "blk.4.nextn.hnorm.weight",
                "blk.4.nextn.shared_head_norm.weight", "blk.4.attn_q.weight", "blk.4.ffn_down.weight"} <= set(f.tensors)
    back = G.load_gguf(path)
    assert back.mtp is not None and back.config.text.mtp_num_hidden_layers == 1
    h = torch.randn(1, 6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        a, _ = model.mtp.draft(model, h, IDS[:, :6])
        b, _ = back.mtp.draft(back, h, IDS[:, :6])
    assert torch.equal(a, b)
    assert torch.equal(logits(back), logits(model))


def test_yarn_settings_round_trip(tmp_path, tok_dir):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "factor": 4.0,
            "original_max_position_embeddings": 1024, "beta_fast": 16.0}
    cfg = config_from_dict(dict(BASE, model_type="qwen3_5_text", intermediate_size=96, rope_parameters=rope))
    model = Qwen35ForCausalLM(cfg).eval().to(torch.bfloat16)
    path = G.save_gguf(model, tok_dir, tmp_path / "m.gguf", "bf16")
    meta = G.read_gguf_metadata(path)
    assert meta["qwen35.rope.scaling.type"] == "yarn" and meta["qwen35.rope.scaling.factor"] == 4.0
    assert meta["qwen35.rope.scaling.original_context_length"] == 1024
    assert G.load_gguf(path).config.text.rope == cfg.text.rope


def test_tied_head_writes_no_output_tensor(tmp_path, tok_dir):
    cfg = config_from_dict(dict(BASE, model_type="qwen3_5_text", intermediate_size=96, tie_word_embeddings=True))
    model = Qwen35ForCausalLM(cfg).eval().to(torch.bfloat16)
    path = G.save_gguf(model, tok_dir, tmp_path / "m.gguf", "bf16")
    assert "output.weight" not in G.GGUFFile(path).tensors
    back = G.load_gguf(path)
    assert back.config.text.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(logits(back), logits(model))


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer a GGUF carries, LLM and the CLI


def test_tokenizer_round_trip(tmp_path, tok_dir):
    path = G.save_gguf(tiny_model(), tok_dir, tmp_path / "m.gguf", "bf16")
    meta = G.read_gguf_metadata(path)
    assert meta["tokenizer.ggml.tokens"][59] == "[PAD59]" and meta["tokenizer.ggml.token_type"][59] == 5  # UNUSED
    assert [meta["tokenizer.ggml.token_type"][i] for i in (52, 54, 55)] == [3, 3, 4]  # CONTROL, CONTROL, USER
    write_tokenizer_files(meta, tmp_path / "tok")
    ours, orig = Tokenizer(tmp_path / "tok"), Tokenizer(tok_dir)
    for text in TEXTS:
        assert ours.encode(text) == orig.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == orig.decode(orig.encode(text), True)
    assert ours.special_token_ids == orig.special_token_ids == frozenset({52, 53, 54})
    assert ours.chat_template == TINY_TEMPLATE
    assert ours.stop_token_ids == {52, 54}  # eos and llama.cpp's end-of-generation tokens


def test_added_tokens_keep_their_ids_across_empty_rows(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen35",
            "tokenizer.ggml.tokens": ["a", "b", "ab", "[PAD3]", "[PAD4]", "<|im_end|>", "<think>"],
            "tokenizer.ggml.token_type": [1, 1, 1, 5, 5, 3, 4], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.eos_token_id": 5}
    tok = HFTokenizer.from_file(str(write_tokenizer_files(meta, tmp_path)))
    assert tok.encode("ab<|im_end|>b<think>").ids == [2, 5, 1, 6]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_tokenizer_refuses_what_is_not_qwen35(tmp_path):
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.token_type": [1]}
    with pytest.raises(TokenizerError, match="'llama'.*byte-level BPE"):
        write_tokenizer_files(meta, tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre is 'llama-bpe'"):
        write_tokenizer_files({**meta, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}, tmp_path)


def test_llm_runs_a_gguf_end_to_end(tmp_path, tok_dir):
    model = tiny_model().to(torch.bfloat16)
    path = G.save_gguf(model, tok_dir, tmp_path / "m.gguf", "bf16")
    folder = tmp_path / "folder"
    model.save_pretrained(folder, tokenizer_from=tok_dir)
    params = qwen35.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    from_gguf = qwen35.LLM(path, dtype="float32")
    from_folder = qwen35.LLM(folder, dtype="float32")
    a = from_gguf.generate(TEXTS[1], params)[0].outputs[0]
    b = from_folder.generate(TEXTS[1], params)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert from_gguf.tokenizer.chat_template == TINY_TEMPLATE


def test_cli_converts_both_ways(tmp_path, tok_dir):
    from qwen35.cli import main

    model = tiny_model(moe=True).to(torch.bfloat16)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, tokenizer_from=tok_dir)
    assert main(["convert", str(folder), str(tmp_path / "m.gguf"), "--type", "bf16"]) == 0
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    back = qwen35.load_model(tmp_path / "back")
    assert torch.equal(logits(back), logits(model))
    assert Tokenizer(tmp_path / "back").encode(TEXTS[1]) == Tokenizer(tok_dir).encode(TEXTS[1])
    assert main(["convert", str(folder), str(tmp_path / "not-a-gguf.bin")]) == 2


# ----------------------------------------------------------------------------------------------------------------
# refusals


def test_refuses_another_architecture(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(G.GGUFError, match="architecture is 'llama', not a Qwen3.5 model.*'qwen35' and 'qwen35moe'"):
        G.load_gguf(tmp_path / "llama.gguf")


def retyped(path: Path, tensor: str, ggml_type: int) -> Path:
    """A copy of a GGUF whose directory entry for ``tensor`` claims another type (the bytes stay)."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = ggml_type.to_bytes(4, "little")
    out = path.with_name(f"retyped-{ggml_type}.gguf")
    out.write_bytes(bytes(data))
    return out


def test_refuses_unsupported_tensor_types_by_name(tmp_path, tok_dir):
    path = G.save_gguf(tiny_model(), tok_dir, tmp_path / "m.gguf", "q8_0")
    with pytest.raises(G.GGUFError, match=r"tensor blk\.0\.ffn_up\.weight is Q5_K; qwen35 dequantises F32, F16, "
                                          r"BF16, Q8_0, Q4_0, Q4_K, Q6_K"):
        G.load_gguf(retyped(path, "blk.0.ffn_up.weight", int(T.Q5_K)))
    with pytest.raises(G.GGUFError, match="is IQ2_XS"):
        G.load_gguf(retyped(path, "token_embd.weight", int(T.IQ2_XS)))
    with pytest.raises(G.GGUFError, match="quantising to Q4_K is not supported"):
        G.quantize(torch.zeros(256), G.Q4_K)


def test_refuses_files_that_are_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(G.GGUFError, match="not a GGUF file"):
        G.load_gguf(tmp_path / "x.gguf")
    with pytest.raises(G.GGUFError, match="no such file"):
        G.load_gguf(tmp_path / "missing.gguf")


def test_refuses_missing_and_misshapen_tensors(tmp_path, tok_dir):
    path = G.save_gguf(tiny_model(), tok_dir, tmp_path / "m.gguf", "bf16")
    data = path.read_bytes()
    broken = tmp_path / "renamed.gguf"  # the same length, so the layout stays valid
    broken.write_bytes(data.replace(b"blk.2.ssm_out.weight", b"blk.2.ssm_xxx.weight"))
    with pytest.raises(G.GGUFError, match=r"missing tensor\(s\) blk\.2\.ssm_out\.weight"):
        G.load_gguf(broken)


def test_save_refuses_a_tokenizer_that_does_not_fit(tmp_path, tok_dir):
    small = config_from_dict(dict(BASE, model_type="qwen3_5_text", intermediate_size=96, vocab_size=56))
    with pytest.raises(G.GGUFError, match="token id 58 does not fit the model's vocabulary of 56 rows"):
        G.save_gguf(Qwen35ForCausalLM(small), tok_dir, tmp_path / "m.gguf")
    with pytest.raises(G.GGUFError, match="file_type must be one of bf16, q8_0, q4_0"):
        G.save_gguf(tiny_model(), tok_dir, tmp_path / "m.gguf", "q4_k_m")


def test_save_refuses_an_int8_quantized_model(tmp_path, tok_dir):
    from qwen35.quant import quantize_int8

    with pytest.raises(G.GGUFError, match=r"no float weight for .*attn_gate\.weight.*export before quantize_int8"):
        G.save_gguf(quantize_int8(tiny_model()), tok_dir, tmp_path / "m.gguf")
