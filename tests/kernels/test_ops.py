"""Every op of the dispatch module (qwen35.kernels.ops) against its PyTorch reference, under both bf16 plans
(``QWEN35_CPU_BF16=emulated|native``) and every native instruction-set variant this host runs; plus the switches
themselves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen35 import kernels
from qwen35.kernels import ops

from .test_native import _deltanet_case, needs_native

DTYPES = [torch.float32, torch.bfloat16]


def assert_close_for(dtype, got, want, *, f32=(1e-5, 1e-5), bf16=(2e-2, 2e-2)):
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = f32 if dtype == torch.float32 else bf16
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


@needs_native
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 47, 48, 80])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_bf16_weights_equals_reference_for_any_activation_dtype(native_kernels, cpu_kind, x_dtype, rows,
                                                                         bias):
    """float32 activations on bf16 weights (int8 paths, MoE experts, the MTP head, training) used to reach
    F.linear with two dtypes on AVX512-BF16 CPUs; every path now computes in float32 and returns x's dtype."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).to(x_dtype)
    w = torch.randn(24, 64, generator=g).bfloat16()
    b = torch.randn(24, generator=g).bfloat16() if bias else None
    with torch.inference_mode():
        got = ops.linear(x, w, b)
    want = (x.double() @ w.double().T + (0 if b is None else b.double()))
    assert got.dtype == x_dtype
    tol = 1e-4 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), ops.linear_reference(x, w, b).float(), rtol=tol, atol=tol)


def test_linear_reference_mixed_dtypes_compute_in_the_wider_one():
    x = torch.randn(5, 32)
    w = torch.randn(8, 32).bfloat16()
    assert torch.equal(ops.linear_reference(x, w), x @ w.float().T)
    assert ops.linear_reference(x.half(), w).dtype == torch.float16


@needs_native
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 47, 60])
def test_linears_equal_one_linear_each(native_kernels, cpu_kind, x_dtype, rows):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 48, generator=g).to(x_dtype)
    ws = [torch.randn(n, 48, generator=g).bfloat16() for n in (16, 5, 1)]
    with torch.inference_mode():
        got = ops.linears(x, ws)
    for y, want in zip(got, ops.linears_reference(x, ws)):
        assert_close_for(x_dtype, y, want, f32=(1e-5, 1e-4))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_equals_reference(native_kernels, cpu_kind, dtype, offset):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 128, generator=g) * 4).to(dtype)
    w = (torch.randn(128, generator=g) * 0.3).to(dtype)
    with torch.inference_mode():
        got = ops.rms_norm(x, w, 1e-6, offset)
    assert_close_for(dtype, got, ops.rms_norm_reference(x, w, 1e-6, offset))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm_equals_reference(native_kernels, cpu_kind, dtype):
    g = torch.Generator().manual_seed(2)
    o = torch.randn(2, 4, 32, generator=g).to(dtype)
    z = torch.randn(2, 4, 32, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(32, generator=g)).to(dtype)
    with torch.inference_mode():
        got = ops.gated_rms_norm(o, z, w, 1e-6)
    assert_close_for(dtype, got, ops.gated_rms_norm_reference(o, z, w, 1e-6))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 50])
def test_moe_experts_equal_reference(native_kernels, cpu_kind, dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    E, H, I, k = 5, 32, 24, 2
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * 0.2).bfloat16()
    down = (torch.randn(E, H, I, generator=g) * 0.2).bfloat16()
    x = torch.randn(tokens, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    wts = torch.rand(tokens, k, generator=g).softmax(-1).to(dtype)
    with torch.inference_mode():
        got = ops.moe_experts(x, ids, wts, gate_up, down)
        want = ops.moe_experts_reference(x, ids, wts, gate_up.float(), down.float())
    assert_close_for(dtype, got, want.to(dtype), f32=(1e-5, 1e-5), bf16=(3e-2, 3e-3))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_deltanet_decode_equals_reference(native_kernels, cpu_kind, dtype):
    c = _deltanet_case(dtype, seed=3)
    args = (c["qkv"], c["conv"])
    pools = [(c["windows"].clone(), c["states"].clone()) for _ in range(2)]
    with torch.inference_mode():
        got = ops.deltanet_decode_(*args, *pools[0], c["slots"], c["Hk"], c["gate"], c["beta"])
        want = ops.deltanet_decode_reference_(*args, *pools[1], c["slots"], c["Hk"], c["gate"], c["beta"])
    assert_close_for(dtype, got, want, bf16=(1e-2, 1e-2))
    assert torch.equal(pools[0][0], pools[1][0])  # the conv windows hold the same raw inputs
    torch.testing.assert_close(pools[0][1], pools[1][1], rtol=1e-4, atol=1e-3 if dtype == torch.bfloat16 else 1e-5)


# ---- the switches ---------------------------------------------------------------------------------------------

def test_cpu_kind_switch(monkeypatch):
    for value, want in (("native", "native"), ("EMULATED", "emulated"),
                        ("auto", "native" if ops.host_has_native_bf16() else "emulated")):
        monkeypatch.setenv(ops.CPU_BF16_SWITCH, value)
        kernels.reset()
        assert ops.cpu_kind() == want
        assert ops.limits() is ops.LIMITS[want]
    monkeypatch.setenv(ops.CPU_BF16_SWITCH, "amx")
    kernels.reset()
    with pytest.raises(ValueError, match="QWEN35_CPU_BF16='amx'.*auto, native.*emulated"):
        ops.cpu_kind()
    monkeypatch.delenv(ops.CPU_BF16_SWITCH)
    kernels.reset()


@needs_native
def test_each_plan_sends_few_row_products_to_the_kernel_and_the_rest_to_pytorch(monkeypatch, cpu_kind):
    """Both plans send products of fewer than linear_max_rows rows to the native kernel (the emulated plan for
    every few-row product, the native-bf16 plan for decode-sized ones, where vdpbf16ps outstreams oneDNN) and
    larger ones elsewhere."""
    calls = []
    k = kernels.native()
    assert k is not None, "an x86-64 machine with a C compiler must build the native kernels"
    monkeypatch.setattr(type(k), "linear_bf16", lambda self, x, *a, **kw: calls.append(x.shape[0]) or
                        torch.zeros(x.shape[0], 4, dtype=x.dtype))
    cut = ops.limits().linear_max_rows
    with torch.inference_mode():
        for rows in (1, cut - 1, cut, cut + 5):
            ops.linear(torch.randn(rows, 8), torch.randn(4, 8).bfloat16())
    assert calls == [r for r in (1, cut - 1) if r > 0]


def test_isa_switch_names_bad_and_unrunnable_variants(monkeypatch):
    monkeypatch.setenv(kernels.ISA_SWITCH, "avx9000")
    kernels.reset()
    with pytest.raises(ValueError, match="QWEN35_NATIVE_ISA='avx9000'.*native, avx512bf16, avx512, avx2, scalar"):
        kernels.native()
    missing = [isa for isa in kernels.ISA_VARIANTS if isa not in kernels.runnable_isas()]
    if missing and kernels.runnable_isas():
        monkeypatch.setenv(kernels.ISA_SWITCH, missing[0])
        kernels.reset()
        with pytest.raises(ValueError, match="cannot run"):
            kernels.native()
    monkeypatch.delenv(kernels.ISA_SWITCH)
    kernels.reset()


def test_model_files_read_as_math():
    """CPU-kernel choice lives in qwen35/kernels/ops.py only."""
    import pathlib
    import re

    import qwen35.model

    root = pathlib.Path(qwen35.model.__file__).parent
    hits = [f"{p.name}:{i}" for p in root.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"native|cpu_has_native_bf16|NATIVE_MAX_ROWS|cpu_kind|limits\(", line)]
    assert not hits, hits


def _paged_case(dtype, lengths, block_size=4, H=8, Hkv=2, d=40, seed=0):
    """A pool with more blocks than needed, handed out in shuffled order (tables are not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    blocks = torch.randperm(sum(need) + 3, generator=g).tolist()
    width = max(need)
    tables, at = [], 0
    for k in need:
        t = blocks[at:at + k]
        at += k
        tables.append(t + [t[0]] * (width - k))
    rows = (sum(need) + 3) * block_size
    keys = torch.randn(rows, Hkv, d, generator=g).to(dtype)
    values = torch.randn(rows, Hkv, d, generator=g).to(dtype)
    q = torch.randn(len(lengths), H, d, generator=g).to(dtype)
    return q, keys, values, torch.tensor(tables), torch.tensor(lengths)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,block_size", [([1], 4), ([5, 1, 17, 64], 4), ([33, 70], 16), ([300], 128)])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (16, 1)])
def test_paged_decode_attention_equals_gather_and_sdpa(native_kernels, cpu_kind, dtype, lengths, block_size, heads):
    H, Hkv = heads
    q, keys, values, tables, lens = _paged_case(dtype, lengths, block_size, H, Hkv)
    scale = q.shape[-1] ** -0.5
    with torch.inference_mode():
        got = ops.paged_decode_attention(q, keys, values, tables, lens, block_size, scale)
        want = ops.paged_decode_attention_reference(q.float(), keys.float(), values.float(), tables, lens,
                                                    block_size, scale).to(dtype)
    assert_close_for(dtype, got, want, f32=(1e-5, 1e-5), bf16=(1e-2, 1e-2))
    # each sequence alone gives its own row of the batch
    for i in range(len(lengths)):
        with torch.inference_mode():
            solo = ops.paged_decode_attention(q[i:i + 1], keys, values, tables[i:i + 1], lens[i:i + 1],
                                              block_size, scale)
        assert torch.equal(solo[0], got[i])


@needs_native
def test_paged_decode_attention_reads_strided_queries_and_rejects_bad_tables(native_kernels):
    q, keys, values, tables, lens = _paged_case(torch.float32, [9, 3])
    wide = torch.randn(2, 8, 80)
    wide[..., :40] = q  # q as a column slice of a wider tensor
    with torch.inference_mode():
        a = native_kernels.paged_decode_attention(wide[..., :40], keys, values, tables, lens, 4, 0.2)
        b = native_kernels.paged_decode_attention(q, keys, values, tables, lens, 4, 0.2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="outside the pool"):
        native_kernels.paged_decode_attention(q, keys, values, tables + 100, lens, 4, 0.2)
    with pytest.raises(ValueError, match="lengths must be"):
        native_kernels.paged_decode_attention(q, keys, values, tables, lens * 100, 4, 0.2)
    with pytest.raises(ValueError, match="do not match"):
        native_kernels.paged_decode_attention(q, keys, values, tables[:1], lens, 4, 0.2)
    with pytest.raises(ValueError, match="one dtype"):
        native_kernels.paged_decode_attention(q, keys, values.bfloat16(), tables, lens, 4, 0.2)


def test_cli_and_llm_name_a_bad_switch_before_loading(monkeypatch, capsys):
    from qwen35 import LLM
    from qwen35.cli import main

    monkeypatch.setenv(ops.CPU_BF16_SWITCH, "fast")
    kernels.reset()
    assert main(["generate", "hello", "--max-tokens", "1"]) == 2
    assert "QWEN35_CPU_BF16='fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="QWEN35_CPU_BF16"):
        LLM(None)
    monkeypatch.delenv(ops.CPU_BF16_SWITCH)
    kernels.reset()


@needs_native
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 9, 47, 60])
@pytest.mark.parametrize("q8", [True, False])
def test_linear_int8_equals_the_dequantized_product(native_kernels, cpu_kind, x_dtype, rows, q8, monkeypatch):
    """ops.linear_int8 on every ISA variant and CPU kind: with int8 activations (the default) against
    linear_int8_q8_reference at every row count, without against the dequantized float product; K = 200 leaves
    a partial 32-block."""
    from qwen35.quant.int8 import quantize_rows

    monkeypatch.setitem(ops.LIMITS, cpu_kind, dataclasses.replace(ops.LIMITS[cpu_kind], q8_activations=q8))
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize_rows(torch.randn(37, 200, generator=g) * 0.05)
    x = torch.randn(rows, 200, generator=g).to(x_dtype)
    x[0, :32] = 0  # an all-zero activation block
    with torch.inference_mode():
        got = ops.linear_int8(x, q, scale, scale.bfloat16())
    want = (ops.linear_int8_q8_reference if q8 else ops.linear_int8_reference)(x, q, scale)
    assert_close_for(x_dtype, got, want, f32=(1e-5, 1e-5), bf16=(1e-2, 1e-2))
    # one row alone (the streaming path) and inside a batch (the blocked path) agree to float32 rounding
    with torch.inference_mode():
        solo = torch.cat([native_kernels.linear_int8(x[i:i + 1], q, scale) for i in range(rows)])
        batch = native_kernels.linear_int8(x, q, scale)
    assert_close_for(x_dtype, solo, batch, f32=(1e-5, 1e-5), bf16=(1e-2, 1e-2))


@needs_native
def test_linear_int8_several_weights_in_one_call_equal_one_call_each(native_kernels):
    """Every ISA variant: linear_int8_q8_many gives each output the bits of its own one-weight call."""
    from qwen35.quant.int8 import quantize_rows

    g = torch.Generator().manual_seed(11)
    weights = [quantize_rows(torch.randn(n, 200, generator=g) * 0.05) for n in (37, 8, 64)]
    for M in (1, 5, 50):
        for dtype in DTYPES:
            x = torch.randn(M, 200, generator=g).to(dtype)
            y = native_kernels.linear_int8_q8_many(x, weights)
            want = torch.cat([native_kernels.linear_int8_q8(x, q, s) for q, s in weights], dim=-1)
            assert y.shape == (M, 109) and torch.equal(y, want)
            assert all(torch.equal(a, b) for a, b in zip(ops.linear_int8_many(x, weights), want.split([37, 8, 64], -1)))
    with pytest.raises(ValueError, match="int8 weights"):
        native_kernels.linear_int8_q8_many(x, [(weights[0][0].short(), weights[0][1])])


@needs_native
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_kv_write_quant_gives_the_bytes_of_the_reference(native_kernels, dtype):
    """Every ISA variant: the native quantize-on-write stores the bytes and scales ops.quantize_kv gives, on
    rows of every magnitude (e4m3 subnormals, all-zero rows, -0, one huge value), float32 and bf16 input — and,
    with a row whose scale is exactly 1, on every e4m3 value, the midpoints between neighbours (ties to even)
    and points just beside them."""
    g = torch.Generator().manual_seed(3)
    R, H, D = 80, 2, 256
    x = torch.randn(40, H, D, generator=g) * torch.logspace(-12, 3, 40)[:, None, None]
    x[3] = 0
    x[4, 0, :5] = -0.0
    x[5, 1, 7] = 1e30
    if dtype == torch.float8_e4m3fn:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        grid = codes[codes.isfinite() & (codes >= 0)].sort().values  # 0 .. 448
        mids = (grid[1:] + grid[:-1]) / 2
        probe = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
        probe = torch.cat([probe, -probe])
        rows_needed = -(-probe.numel() // (D - 1))
        extra = torch.zeros(rows_needed, H, D)
        extra[..., 0] = 448.0  # the row maximum: scale exactly 1, so the stored value is the probe itself
        flat = extra[:, 0, 1:].reshape(-1)
        flat[:probe.numel()] = probe
        extra[:, 0, 1:] = flat.view(rows_needed, D - 1)
        x = torch.cat([x, extra])
    rows = torch.randperm(R, generator=g)[:x.shape[0]]
    for xd in DTYPES:
        xs = x.to(xd)
        got_pool, got_scales = torch.zeros(R, H, D, dtype=dtype), torch.full((R, H), -1.0)
        want_pool, want_scales = got_pool.clone(), got_scales.clone()
        ops.kv_write_quant(got_pool, got_scales, rows, xs)
        ops.kv_write_quant_reference(want_pool, want_scales, rows, xs)
        assert torch.equal(got_pool.view(torch.uint8), want_pool.view(torch.uint8))
        assert torch.equal(got_scales, want_scales)
    with pytest.raises(ValueError, match="outside"):
        native_kernels.kv_write_quant(got_pool, got_scales, torch.tensor([R]), x[:1])
    with pytest.raises(ValueError, match="int8 / float8_e4m3fn pool"):
        native_kernels.kv_write_quant(got_pool.float(), got_scales, rows[:1], x[:1])


@needs_native
def test_linear_int8_rejects_bad_weights(native_kernels):
    x = torch.randn(2, 16)
    for product in (native_kernels.linear_int8, native_kernels.linear_int8_q8):
        with pytest.raises(ValueError, match="int8 weights"):
            product(x, torch.zeros(4, 16, dtype=torch.int16), torch.ones(4))
        with pytest.raises(ValueError, match="float32 scales"):
            product(x, torch.zeros(4, 16, dtype=torch.int8), torch.ones(3))
        with pytest.raises(ValueError, match=r"\[N, 16\]"):
            product(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))


@needs_native
@pytest.mark.parametrize("lengths", [[2000], [1500, 37], [300, 300, 300]])
def test_paged_decode_attention_split_between_threads_merges_exactly(native_kernels, lengths):
    """With more threads than sequences a sequence's keys are split between threads (flash-decoding); the
    merged result equals the reference and the one-thread result to float32 rounding."""
    q, keys, values, tables, lens = _paged_case(torch.float32, lengths, block_size=16, H=8, Hkv=2, d=64)
    old = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 4):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs[threads] = native_kernels.paged_decode_attention(q, keys, values, tables, lens, 16, 0.125)
    finally:
        torch.set_num_threads(old)
    want = ops.paged_decode_attention_reference(q, keys, values, tables, lens, 16, 0.125)
    for got in outs.values():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
