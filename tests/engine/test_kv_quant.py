"""The quantized KV cache (kv_cache_dtype int8 / fp8): the round trip's error bound, the native decode attention
against its PyTorch reference on the dequantized cache (every instruction set the host runs), the engine against
float KV (greedy tokens and logits), every engine path against the plain int8 run of the same prompt, and the
memory accounting against the allocated tensors."""

from __future__ import annotations

import pytest
import torch

from qwen35.engine.kv_quant import KV_CACHE_DTYPES, LayerKV, check_kv_cache_dtype
from qwen35.engine.llm_engine import EngineConfig, LLMEngine
from qwen35.engine.params import SamplingParams
from qwen35.kernels import ops
from qwen35.memory import KV_DTYPES, kv_bytes_per_token, state_bytes_per_sequence

from .test_engine import prompts_of, run_all

GREEDY = {"temperature": 0.0, "ignore_eos": True}
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


# ---- quantize / dequantize ------------------------------------------------------------------------------------

def _rows_of_every_magnitude(dtype=torch.float32) -> torch.Tensor:
    """[tokens, heads, d] rows from 1e-6 to 1e3 in magnitude, one all-zero row, one with a lone outlier."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 40, generator=g) * torch.logspace(-6, 3, 64)[:, None, None]
    x[3, 1] = 0.0
    x[5, 2, 7] = 500.0
    return x.to(dtype)


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_int8_round_trip_error_is_at_most_half_a_step_per_token_head(src):
    x = _rows_of_every_magnitude(src)
    q, scale = ops.quantize_kv(x, torch.int8)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    xf = x.float()
    amax = xf.abs().amax(-1)
    torch.testing.assert_close(scale, amax / 127, rtol=0, atol=0)
    err = (ops.dequantize_kv(q, scale) - xf).abs()
    # |x - q·s| <= s / 2 per value (float32 rounding of x / s and q · s on top: 1e-6 relative)
    assert bool((err <= scale[..., None] * (0.5 + 1e-5)).all())
    assert int(q.abs().amax(-1).min()) == 0 and int(q.abs().amax()) == 127  # the zero row, the full range
    assert bool((q.abs().amax(-1)[amax > 0] == 127).all())  # every non-zero row spans the range
    assert float(ops.dequantize_kv(q, scale)[3, 1].abs().sum()) == 0.0  # zeros stay exact


def test_fp8_round_trip_error_is_e4m3_rounding_per_token_head():
    x = _rows_of_every_magnitude()
    q, scale = ops.quantize_kv(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(scale, x.abs().amax(-1) / 448, rtol=0, atol=0)
    y = x / torch.where(scale > 0, scale, 1)[..., None]  # the value e4m3 rounds
    err = (ops.dequantize_kv(q, scale) - x).abs()
    # half an e4m3 step: 2^-4 relative for normals (|y| >= 2^-6), 2^-10 absolute (in units of scale) below
    bound = torch.maximum(y.abs() * 2.0 ** -4, torch.full_like(y, 2.0 ** -10)) * scale[..., None]
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all())
    assert not bool(torch.isnan(q.float()).any())


def test_a_bad_storage_dtype_is_refused():
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        ops.quantize_kv(torch.zeros(2, 4), torch.int16)


# ---- decode attention over a quantized paged cache ------------------------------------------------------------

def _quant_case(kind: str, lengths, block_size=4, H=8, Hkv=2, d=40, seed=0):
    from tests.kernels.test_ops import _paged_case

    q, keys, values, tables, lens = _paged_case(torch.float32, lengths, block_size, H, Hkv, d, seed)
    keys[::7] *= 30  # rows of very different magnitudes: the per-row scales matter
    kq, ks = ops.quantize_kv(keys, STORAGE[kind])
    vq, vs = ops.quantize_kv(values, STORAGE[kind])
    return q, kq, vq, ks, vs, tables, lens


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,block_size,heads,d", [
    ([1], 4, (8, 2), 40), ([5, 1, 17, 64], 4, (8, 2), 40), ([33, 70], 16, (4, 4), 64), ([300], 16, (16, 1), 37),
    ([129, 2], 8, (6, 2), 256),
])
def test_native_quant_decode_attention_equals_the_reference(native_kernels, kind, q_dtype, lengths, block_size,
                                                            heads, d):
    H, Hkv = heads
    q, kq, vq, ks, vs, tables, lens = _quant_case(kind, lengths, block_size, H, Hkv, d)
    q = q.to(q_dtype)
    scale = d ** -0.5
    with torch.inference_mode():
        got = native_kernels.paged_decode_attention_quant(q, kq, vq, ks, vs, tables, lens, block_size, scale)
        via_ops = ops.paged_decode_attention(q, kq, vq, tables, lens, block_size, scale, key_scales=ks,
                                             value_scales=vs)
    want = ops.paged_decode_attention_quant_reference(q, kq, vq, ks, vs, tables, lens, block_size, scale)
    # the reference is the float reference on the dequantized pools
    plain = ops.paged_decode_attention_reference(q.float(), ops.dequantize_kv(kq, ks), ops.dequantize_kv(vq, vs),
                                                 tables, lens, block_size, scale).to(q_dtype)
    torch.testing.assert_close(want, plain, rtol=1e-6, atol=1e-6)
    tol = (1e-5, 1e-5) if q_dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])
    assert torch.equal(via_ops, got)


def test_native_fp8_widens_every_e4m3_code_exactly(native_kernels):
    # one key per sequence: the output is that sequence's value row, every e4m3 code but the two NaNs among them
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # 254: not a VL multiple
    n, d = 3, codes.numel()
    values = torch.stack([codes.roll(i) for i in range(n)])[:, None].contiguous().view(torch.float8_e4m3fn)
    keys = torch.zeros_like(values)
    ones = torch.ones(n, 1)
    q = torch.randn(n, 2, d)
    tables, lens = torch.arange(n)[:, None], torch.ones(n, dtype=torch.long)
    with torch.inference_mode():
        got = native_kernels.paged_decode_attention_quant(q, keys, values, ones, ones * 0.5, tables, lens, 1, 0.1)
    want = values.float()[:, 0] * 0.5
    assert torch.equal(got, want[:, None].expand(n, 2, d))


def test_native_quant_decode_attention_rejects_bad_pools(native_kernels):
    q, kq, vq, ks, vs, tables, lens = _quant_case("int8", [9, 3])
    with pytest.raises(ValueError, match="one dtype"):
        native_kernels.paged_decode_attention_quant(q, kq, vq.view(torch.uint8), ks, vs, tables, lens, 4, 0.2)
    with pytest.raises(ValueError, match="scales must be contiguous float32"):
        native_kernels.paged_decode_attention_quant(q, kq, vq, ks.bfloat16(), vs, tables, lens, 4, 0.2)
    with pytest.raises(ValueError, match="outside the pool"):
        native_kernels.paged_decode_attention_quant(q, kq, vq, ks, vs, tables + 100, lens, 4, 0.2)
    with pytest.raises(ValueError, match="lengths must be"):
        native_kernels.paged_decode_attention_quant(q, kq, vq, ks, vs, tables, lens * 100, 4, 0.2)
    with pytest.raises(ValueError, match="both key_scales and value_scales"):
        ops.paged_decode_attention(q, kq, vq, tables, lens, 4, 0.2, key_scales=ks)


# ---- the engine -----------------------------------------------------------------------------------------------

def _engine(model, kv: str, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    return LLMEngine(model, None, EngineConfig(kv_cache_dtype=kv, **kw))


def _plain(model, kv: str, prompt: list[int], n: int) -> list[int]:
    """The plain run: one request alone, its prompt in one chunk, no prefix cache."""
    eng = _engine(model, kv, max_num_seqs=1, max_num_batched_tokens=1024, enable_prefix_caching=False)
    rid = eng.add_request(prompt, SamplingParams(max_tokens=n, **GREEDY))
    return run_all(eng)[rid]


def _logits_run(model, kv: str, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits row of every step of one request."""
    eng = _engine(model, kv, max_num_seqs=1, max_num_batched_tokens=1024, enable_prefix_caching=False)
    rows = []
    run = eng.runner.run

    def keep(batch):
        out = run(batch)
        if out[1] is not None:
            rows.append(out[1][0].clone())
        return out

    eng.runner.run = keep
    rid = eng.add_request(prompt, SamplingParams(max_tokens=n, **GREEDY))
    return run_all(eng)[rid], torch.stack(rows)


# Quantized KV against float KV on the tiny random models (float32, logits up to ~15 in magnitude), 3 prompts x 32
# greedy tokens.  int8: every token equal, every logit within 0.15 (measured, 1 thread: max 0.063 dense, 0.082
# MoE).  fp8 (3 mantissa bits, 16x coarser than int8): rows within 0.5 (measured: typically 0.05-0.28), but a
# MoE row can jump when a token's router picks another expert (measured once: 3.2), so 95% of the rows; tokens
# equal for at least the first 16 (measured: 5 of 6 runs equal for all 32, one departs at token 16).
INT8_LOGIT_ATOL, FP8_LOGIT_ATOL, FP8_ROWS_WITHIN, FP8_TOKENS_EQUAL = 0.15, 0.5, 0.95, 16
_FLOAT_RUNS: dict = {}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_kv_decode_is_close_to_float_kv(model, kind, kernels_switch):
    for p in prompts_of([3, 17, 40], seed=11):
        key = (id(model), tuple(p), kernels_switch)  # the float-KV run, once per model, prompt and kernels
        if key not in _FLOAT_RUNS:
            _FLOAT_RUNS[key] = _logits_run(model, "auto", p, 32)
        ref_tokens, ref_logits = _FLOAT_RUNS[key]
        tokens, logits = _logits_run(model, kind, p, 32)
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        # logits compared while both runs saw the same tokens (the first differing token's row included)
        k = min(agree + 1, len(tokens))
        row_err = (logits[:k] - ref_logits[:k]).abs().amax(dim=-1)
        if kind == "int8":
            assert tokens == ref_tokens, f"prompt of {len(p)} tokens"
            assert float(row_err.max()) <= INT8_LOGIT_ATOL, f"int8: logits off by {float(row_err.max())}"
        else:
            assert agree >= FP8_TOKENS_EQUAL, f"fp8: tokens depart at {agree} for a prompt of {len(p)} tokens"
            within = float((row_err <= FP8_LOGIT_ATOL).float().mean())
            assert within >= FP8_ROWS_WITHIN, f"fp8: {within:.0%} of the rows within {FP8_LOGIT_ATOL}"


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_batched_and_chunked_equal_the_plain_quantized_run(model, kind, chunk, kernels_switch):
    lengths = [1, 2, 7, 8, 9, 17, 63, 65]
    prompts = prompts_of(lengths, seed=12)
    eng = _engine(model, kind, max_num_seqs=5, max_num_batched_tokens=chunk, block_size=8)
    ids = [eng.add_request(p, SamplingParams(max_tokens=10, **GREEDY)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == _plain(model, kind, p, 10), f"prompt of {len(p)} tokens"
    assert eng.cache.usage()["blocks_used"] == 0


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_prefix_cache_hit_equals_the_plain_quantized_run(model, kind):
    eng = _engine(model, kind, max_num_seqs=2, max_num_batched_tokens=16)
    eng.cache.snapshot_interval = 8  # snapshots inside the prompt, not only at its end
    base = prompts_of([29], seed=13)[0]
    first = eng.add_request(base, SamplingParams(max_tokens=6, **GREEDY))
    assert run_all(eng)[first] == _plain(model, kind, base, 6)
    longer = base + prompts_of([11], seed=14)[0]
    rid = eng.add_request(longer, SamplingParams(max_tokens=8, **GREEDY))
    got = run_all(eng)[rid]
    assert eng.cache.prefix_usage()["prefix_cache_hits"] > 0
    assert got == _plain(model, kind, longer, 8)
    again = eng.add_request(base, SamplingParams(max_tokens=6, **GREEDY))  # the whole prompt cached
    assert run_all(eng)[again] == _plain(model, kind, base, 6)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_preemption_recomputes_the_plain_quantized_run(model, kind):
    cfg = model.config
    per_block = 4 * kv_bytes_per_token(cfg, kind)
    memory = 4 * state_bytes_per_sequence(cfg, "fp32").total + 14 * per_block
    eng = _engine(model, kind, max_num_seqs=4, max_num_batched_tokens=32, cache_memory=memory)
    assert eng.cache.layout.num_blocks == 14
    prompts = prompts_of([20, 9, 25, 14], seed=2)
    ids = [eng.add_request(p, SamplingParams(max_tokens=18, **GREEDY)) for p in prompts]
    seqs = [s for r in eng.requests.values() for s in r.seqs]
    got = run_all(eng)
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid, p in zip(ids, prompts):
        assert got[rid] == _plain(model, kind, p, 18)


def test_garbage_in_quantized_pools_never_leaks(model, kernels_switch):
    eng = _engine(model, "int8", max_num_seqs=2, max_num_batched_tokens=16)
    for layer in eng.cache.kv.layers.values():
        layer.keys.random_(-128, 128)
        layer.values.random_(-128, 128)
        layer.key_scales.fill_(float("nan"))
        layer.value_scales.fill_(float("nan"))
    prompts = prompts_of([11, 3, 17], seed=3)
    ids = [eng.add_request(p, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == _plain(model, "int8", p, 6)


def test_speculative_decoding_with_quantized_kv_is_token_identical():
    from qwen35.engine.speculative import SpeculativeConfig

    from .test_speculative import _tiny_mtp_model

    model = _tiny_mtp_model(False)
    prompts = prompts_of([20, 9, 25, 1], seed=2)
    for method in ("mtp", "ngram"):
        spec = SpeculativeConfig(method=method, num_speculative_tokens=2, warmup=10 ** 6)
        eng = _engine(model, "int8", max_num_seqs=4, max_num_batched_tokens=32, speculative_config=spec)
        ids = [eng.add_request(p, SamplingParams(max_tokens=14, **GREEDY)) for p in prompts]
        got = run_all(eng)
        for rid, p in zip(ids, prompts):
            assert got[rid] == _plain(model, "int8", p, 14), f"{method}, prompt of {len(p)} tokens"
        if method == "mtp":
            # the MTP layer's own KV is quantized like the cache's and addressed by the same block tables
            kv = next(iter(eng.drafter.kv.values()))
            assert kv.keys.dtype == torch.int8 and kv.key_scales.shape == kv.keys.shape[:2]
            assert eng.drafter.stats.proposed > 0


@pytest.mark.slow
def test_pictures_with_quantized_kv_chunked_and_cached_equal_the_plain_run(tmp_path):
    import qwen35
    from qwen35.engine import VisionInput
    from tests.hf_oracle import save_hf
    from tests.model.test_vision import Prompt, _oracle

    model = qwen35.load_model(save_hf(_oracle(False), tmp_path), dtype="float32")
    p = Prompt(4)
    ids, v = p.ids[0].tolist(), VisionInput(**p.vision)

    def run(eng, prompt):
        rid = eng.add_request(prompt, SamplingParams(max_tokens=8, **GREEDY), vision=v)
        done = {}
        while eng.has_unfinished():
            done.update({o.request_id: o for o in eng.step() if o.finished})
        return done[rid]

    def plain(prompt):
        return run(_engine(model, "int8", enable_prefix_caching=False, max_num_batched_tokens=1024),
                   prompt).outputs[0].token_ids

    chunked = _engine(model, "int8", enable_prefix_caching=False, max_num_batched_tokens=5)  # cuts in pictures
    assert run(chunked, ids).outputs[0].token_ids == plain(ids)
    eng = _engine(model, "int8", max_num_batched_tokens=16)
    assert run(eng, ids).outputs[0].token_ids == plain(ids)
    longer = ids + [7, 8, 9, 10, 11]  # the next turn: the same picture, more text after it
    hit = run(eng, longer)
    assert hit.num_cached_tokens == len(ids)  # resumed past the picture, from quantized KV and its scales
    assert hit.outputs[0].token_ids == plain(longer)


def test_embedded_model_int8_kv_gives_the_float_kv_tokens():
    import qwen35

    plain = qwen35.LLM(max_num_seqs=4)
    quant = qwen35.LLM(max_num_seqs=4, kv_cache_dtype="int8")
    assert quant.engine.cache.kv_cache_dtype == "int8"
    prompts = [plain.tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}])
               for a, b in ((47, 38), (12, 99), (5, 5))]
    params = SamplingParams(temperature=0, max_tokens=64)  # 64 greedy tokens each (or to the end of the answer)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in quant.generate(prompts, params)] == want


# ---- memory accounting and configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_cache_bytes_match_qwen35_info_and_the_tensors(model, kind):
    cfg, t = model.config, model.config.text
    per_token = kv_bytes_per_token(cfg, kind)
    # one byte per value plus a float32 scale per token per KV head, for K and V of every attention layer
    assert per_token == len(t.full_attention_layers) * 2 * t.num_key_value_heads * (t.head_dim + 4)
    assert KV_DTYPES[kind] == 1 and per_token < kv_bytes_per_token(cfg, "bf16")
    memory = 3 * state_bytes_per_sequence(cfg, "fp32").total + 10 * 8 * per_token
    eng = _engine(model, kind, max_num_seqs=3, block_size=8, cache_memory=memory)
    cache = eng.cache
    assert cache.layout.num_blocks == 10
    assert cache.nbytes() == cache.layout.total_bytes == memory
    rows = 10 * 8
    for layer in cache.kv.layers.values():
        assert layer.keys.dtype == layer.values.dtype == STORAGE[kind]
        assert layer.key_scales.dtype == layer.value_scales.dtype == torch.float32
        assert layer.keys.shape == (rows, t.num_key_value_heads, t.head_dim)
        assert layer.key_scales.shape == (rows, t.num_key_value_heads)
    kv_tensor_bytes = sum(x.numel() * x.element_size() for layer in cache.kv.layers.values() for x in layer.tensors())
    assert kv_tensor_bytes == rows * per_token


def test_qwen35_preset_kv_halves_with_scales_counted():
    from qwen35.presets import preset_config

    cfg = preset_config("0.8B")
    t = cfg.text
    bf16, int8 = kv_bytes_per_token(cfg, "bf16"), kv_bytes_per_token(cfg, "int8")
    assert int8 * 2 * t.head_dim == bf16 * (t.head_dim + 4)  # (d + 4) / 2d of bf16: 50.8% at head_dim 256
    assert kv_bytes_per_token(cfg, "fp8") == int8


def test_bad_kv_cache_dtypes_are_refused_by_name(model):
    assert list(KV_CACHE_DTYPES) == ["auto", "int8", "fp8"]
    assert check_kv_cache_dtype("int8") == "int8"
    for bad in ("int4", "bf16", None, 8):
        with pytest.raises(ValueError, match="choose one of auto, int8, fp8"):
            EngineConfig(kv_cache_dtype=bad)
    import qwen35

    with pytest.raises(ValueError, match="kv_cache_dtype 'q8' is not a KV cache format"):
        qwen35.LLM(kv_cache_dtype="q8")


def test_layer_kv_of_the_model_dtype_has_no_scales():
    kv = LayerKV.allocate(8, 2, 4, torch.bfloat16)
    assert not kv.quantized and len(kv.tensors()) == 2 and kv.nbytes() == 2 * 8 * 2 * 4 * 2
    rows = torch.tensor([1, 5])
    k = torch.randn(2, 2, 4).bfloat16()
    kv.write(rows, k, k)
    assert torch.equal(kv.gather(rows, torch.bfloat16)[0], k)


# ---- the command line -----------------------------------------------------------------------------------------

def test_cli_kv_cache_dtype_reaches_the_engine_and_info(capsys, monkeypatch):
    import json

    from qwen35 import cli
    from qwen35.presets import preset_config

    seen = {}
    real = cli._load_llm

    def spy(args):
        llm = real(args)
        seen["kv"] = llm.engine.cache.kv_cache_dtype
        return llm

    monkeypatch.setattr(cli, "_load_llm", spy)
    assert cli.main(["generate", "Hello", "--max-tokens", "3", "--kv-cache-dtype", "int8"]) == 0
    assert seen["kv"] == "int8"
    capsys.readouterr()
    for cmd in ("generate", "chat", "serve"):  # every command that builds an engine takes the flag
        ns = cli.build_parser().parse_args([cmd, "--kv-cache-dtype", "fp8"] + (["x"] if cmd == "generate" else []))
        assert ns.kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "x", "--kv-cache-dtype", "int4"])
    assert "choose from auto, int8, fp8" in capsys.readouterr().err.replace("'", "")
    assert cli.main(["info", "--preset", "0.8B", "--kv-cache-dtype", "int8", "--json", "--context", "4096"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv_cache"]
    cfg = preset_config("0.8B")
    assert kv["dtype"] == "int8" and kv["bytes_per_token"] == kv_bytes_per_token(cfg, "int8")
    assert kv["bytes_at_context"] == 4096 * kv_bytes_per_token(cfg, "int8")
    assert cli.main(["info", "--preset", "0.8B", "--kv-cache-dtype", "fp8", "--memory", "4"]) == 0
    out = capsys.readouterr().out
    assert "KV cache (fp8;" in out and "float32 scale per token per KV head" in out and "fp8 KV" in out


def test_serve_passes_kv_cache_dtype_to_the_engine(monkeypatch):
    import qwen35.llm
    import qwen35.serve
    from qwen35 import cli
    from qwen35.serve import server

    seen = {}
    monkeypatch.setattr(qwen35.serve, "serve", lambda model, **kw: seen.update(kw))
    assert cli.main(["serve", "--kv-cache-dtype", "int8"]) == 0
    assert seen["kv_cache_dtype"] == "int8"

    class FakeLLM:
        def __init__(self, *args, **kw):
            seen["llm"] = kw
            raise ValueError("stop here")

    monkeypatch.setattr(qwen35.llm, "LLM", FakeLLM)
    with pytest.raises(ValueError, match="stop here"):
        server.serve(kv_cache_dtype="fp8")
    assert seen["llm"]["kv_cache_dtype"] == "fp8"
