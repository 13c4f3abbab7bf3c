"""4-bit weights: the format (pack / unpack, the stated error bound), the native kernel and the prompt path
against the dequantized product on every instruction-set variant the host runs, the expert banks against a loop
over the dequantized experts, and a quantized model through the engine against its own full forward."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from qwen35.engine.llm_engine import EngineConfig, LLMEngine
from qwen35.engine.params import SamplingParams
from qwen35.kernels import native, ops
from qwen35.model.linear import Linear
from qwen35.quant import Int4Experts, Int4Linear, quantize_int4
from qwen35.quant.int4 import (BLOCK, check_group_size, dequantize_groups, pack_nibbles, padded_features,
                               quantize_groups, unpack_nibbles)
from qwen35.quant.int8 import Int8Linear
from tests.engine.conftest import tiny_model
from tests.engine.test_engine import prompts_of, run_all, solo_greedy
from tests.kernels.test_native import needs_native

GROUPS = [32, 64, 128]


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (3, 5, 2 * BLOCK), generator=g, dtype=torch.int8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, BLOCK)
    assert torch.equal(unpack_nibbles(packed), q)
    # the documented layout: nibble i of little-endian word j of a block is weight 8i + j
    words = packed[0, 0, :32].view(torch.int32) if packed.is_contiguous() else None
    for i in range(8):
        for j in range(8):
            assert (int(words[j]) >> (4 * i)) & 15 == int(q[0, 0, 8 * i + j]) & 15
    with pytest.raises(ValueError, match="whole 64-value blocks"):
        pack_nibbles(torch.zeros(2, 96, dtype=torch.int8))


@pytest.mark.parametrize("group", GROUPS)
def test_exactly_representable_weights_round_trip(group):
    """Weights that are whole multiples of a power-of-two scale, with -8 in every group, come back exactly —
    including a K that is not a whole number of groups (the padding is dropped)."""
    g = torch.Generator().manual_seed(group)
    K = 3 * group + 17
    q = torch.randint(-8, 8, (6, K), generator=g).float()
    q[:, ::group] = -8
    w = q * 2.0 ** -6
    qweight, scales = quantize_groups(w, group)
    assert qweight.shape == (6, padded_features(K, group) // 2)
    assert scales.shape == (6, padded_features(K, group) // group) and scales.dtype == torch.bfloat16
    assert torch.equal(dequantize_groups(qweight, scales, K, group), w)


@pytest.mark.parametrize("group", GROUPS)
def test_quantize_error_bound(group):
    """The bound the module states: |w − ŵ| <= max(|s|/2, distance from w to s·[−8, 7]) per weight, and each
    group's squared error no larger than plain round-to-nearest's."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 4 * group, generator=g) * 0.03
    w[0, 5] = 0.5  # an outlier: the clip search must not make its group worse than round-to-nearest
    qweight, scales = quantize_groups(w, group)
    wd = dequantize_groups(qweight, scales, w.shape[1], group)
    s = scales.float().repeat_interleave(group, dim=1)
    lo, hi = torch.minimum(-8 * s, 7 * s), torch.maximum(-8 * s, 7 * s)
    outside = (lo - w).clamp(min=0) + (w - hi).clamp(min=0)
    assert ((wd - w).abs() <= torch.maximum(s.abs() / 2, outside) + 1e-7).all()
    rtn_q, rtn_s = quantize_groups(w, group, candidates=(1.0,))
    rtn = dequantize_groups(rtn_q, rtn_s, w.shape[1], group)
    err = (wd - w).square().view(40, 4, group).sum(-1)
    err_rtn = (rtn - w).square().view(40, 4, group).sum(-1)
    assert (err <= err_rtn + 1e-12).all()
    # and on Gaussian weights the relative squared error is what the module's table reports (6.8e-3 at 32,
    # 8.1e-3 at 64, 9.3e-3 at 128, with the clip search)
    gw = torch.randn(256, 1024, generator=g)
    gq, gs = quantize_groups(gw, group)
    rel = (dequantize_groups(gq, gs, 1024, group) - gw).square().sum() / gw.square().sum()
    assert rel < {32: 7.2e-3, 64: 8.6e-3, 128: 9.8e-3}[group], float(rel)


def test_bad_group_sizes_and_shapes_are_refused():
    for bad in (0, 16, 48, 96, -64, 64.0, True):
        with pytest.raises(ValueError, match="power of two >= 32"):
            check_group_size(bad)
    with pytest.raises(ValueError, match="power of two >= 32"):
        quantize_int4(tiny_model(False), group_size=100)
    with pytest.raises(ValueError, match=r"float weights \[..., N, K\]"):
        quantize_groups(torch.zeros(8, dtype=torch.float32))
    with pytest.raises(ValueError, match="lm_head must be one of"):
        quantize_int4(tiny_model(False), lm_head="fp8")
    lin = Int4Linear(Linear(64, 8, bias=False))
    with pytest.raises(ValueError, match="64"):
        lin(torch.randn(2, 32))


@needs_native
@pytest.mark.parametrize("group", GROUPS)
def test_native_kernel_equals_dequantized_product(native_kernels, group):
    """Every ISA variant: few rows (the streaming one-row path and the blocked path) against F.linear on the
    dequantized weight, for odd N and K (partial groups, a partial 64-block tail), float32 and bf16."""
    g = torch.Generator().manual_seed(group)
    for N, K in ((37, 200), (8, 64), (5, 31), (16, 3 * group), (3, 1024)):
        qweight, scales = quantize_groups(torch.randn(N, K, generator=g) * 0.05, group)
        wd = dequantize_groups(qweight, scales, K, group)
        assert torch.equal(native_kernels.dequantize_int4(qweight, scales, K, group), wd)
        assert torch.equal(native_kernels.dequantize_int4(qweight, scales, K, group, torch.bfloat16), wd.bfloat16())
        for M in (1, 2, 5, 9, 47):
            x = torch.randn(M, K, generator=g)
            want = x.double() @ wd.double().T
            got = native_kernels.linear_int4(x, qweight, scales, K, group)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            xb = x.bfloat16()  # bf16 in and out: the rounding of the output is the only difference
            got = native_kernels.linear_int4(xb, qweight, scales, K, group)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), xb.double() @ wd.double().T, rtol=1e-2, atol=1e-2)


def test_activation_rounding_reference():
    """The int8 activation blocks: 32 per block, zero padding, the block's largest magnitude onto ±127, an
    all-zero block to scale 0, and rounding half to even on exact ties."""
    x = torch.zeros(2, 70)
    x[0, :32] = torch.linspace(-1, 2, 32)
    x[0, 32:40] = torch.tensor([0.5, 1.5, 2.5, -0.5, 127.0, -3.5, 0.0, 1.0])  # scale exactly 1: ties
    q, d = ops.quantize_activations_q8_reference(x, 128)
    assert q.shape == (2, 128) and d.shape == (2, 4)
    assert q[0, 31] == 127 and d[0, 0] == torch.tensor(2.0) / 127
    assert q[0, 32:40].tolist() == [0, 2, 2, -0, 127, -4, 0, 1] and d[0, 1] == 1
    assert (q[1] == 0).all() and (d[1] == 0).all() and (q[0, 70:] == 0).all()
    assert ((q - q.round()).abs().max() == 0) and q.abs().max() <= 127


@needs_native
@pytest.mark.parametrize("group", GROUPS)
def test_native_q8_kernel_equals_its_reference(native_kernels, group):
    """Every ISA variant: the int8-activation product against ops.linear_int4_q8_reference (the same activation
    rounding, exact integer block sums, float64 outside) — equal up to float32 summation order — for odd N and K,
    one to nine rows (partial blocks of activation rows), float32 and bf16; and its distance to the float product:
    the activation rounding costs ~0.5% relative (Frobenius) on Gaussian data."""
    g = torch.Generator().manual_seed(100 + group)
    err = ref = 0.0
    for N, K in ((37, 200), (8, 64), (5, 31), (16, 3 * group), (3, 1024), (9, 2048)):
        qweight, scales = quantize_groups(torch.randn(N, K, generator=g) * 0.05, group)
        wd = dequantize_groups(qweight, scales, K, group)
        for M in (1, 2, 3, 4, 5, 9):
            x = torch.randn(M, K, generator=g)
            x[0, : min(K, 32)] = 0  # an all-zero activation block
            want = ops.linear_int4_q8_reference(x.double(), qweight, scales, K, group)
            got = native_kernels.linear_int4_q8(x, qweight, scales, K, group)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            exact = x.double() @ wd.double().T
            err, ref = err + float((got.double() - exact).square().sum()), ref + float(exact.square().sum())
            xb = x.bfloat16()
            got = native_kernels.linear_int4_q8(xb, qweight, scales, K, group)
            assert got.dtype == torch.bfloat16
            want = ops.linear_int4_q8_reference(xb.double(), qweight, scales, K, group)
            torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
            got = native_kernels.linear_int4_q8(xb, qweight, scales, K, group, torch.float32)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (err / ref) ** 0.5 < 8e-3, (err / ref) ** 0.5  # measured 0.49-0.60% (groups 64 / 32)
    assert (native_kernels.linear_int4_q8(torch.zeros(2, K), qweight, scales, K, group) == 0).all()


@needs_native
def test_native_kernel_rejects_bad_layouts(native_kernels):
    qweight, scales = quantize_groups(torch.randn(4, 128), 64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="power of two"):
        native_kernels.linear_int4(x, qweight, scales, 128, 48)
    with pytest.raises(ValueError, match="uint8"):
        native_kernels.linear_int4(x, qweight.to(torch.int16), scales, 128, 64)
    with pytest.raises(ValueError, match="bf16 scales"):
        native_kernels.linear_int4(x, qweight, scales.float(), 128, 64)
    with pytest.raises(ValueError, match="bf16 scales"):
        native_kernels.linear_int4(x, qweight, scales[:3], 128, 64)
    with pytest.raises(ValueError, match="features"):
        native_kernels.linear_int4(torch.randn(2, 64), qweight, scales, 128, 64)
    for product in (native_kernels.linear_int4, native_kernels.linear_int4_q8):
        with pytest.raises(ValueError, match="power of two"):
            product(x, qweight, scales, 128, 48)
        with pytest.raises(ValueError, match="bf16 scales"):
            product(x, qweight, scales[:3], 128, 64)
        with pytest.raises(ValueError, match="features"):
            product(torch.randn(2, 64), qweight, scales, 128, 64)
        with pytest.raises(ValueError, match="writes float32 or bfloat16"):
            product(x, qweight, scales, 128, 64, torch.float16)


@pytest.mark.parametrize("rows", [1, 3, 47, 48, 80])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q8", [True, False])
def test_dispatch_equals_reference(cpu_kind, rows, x_dtype, q8, monkeypatch):
    """ops.linear_int4 on either CPU kind: with int8 activations (the default) every row count goes to the
    int8-activation product; without, few rows to the float32 kernel and prompt-sized ones to dequantize + GEMM
    (banded) — each against its reference."""
    monkeypatch.setitem(ops.LIMITS, cpu_kind, dataclasses.replace(ops.LIMITS[cpu_kind], q8_activations=q8))
    g = torch.Generator().manual_seed(rows)
    qweight, scales = quantize_groups(torch.randn(70, 192, generator=g) * 0.05, 64)
    x = torch.randn(rows, 192, generator=g).to(x_dtype)
    rounded = q8 and native() is not None
    want = (ops.linear_int4_q8_reference if rounded else ops.linear_int4_reference)(x, qweight, scales, 192, 64)
    with torch.inference_mode():
        got = ops.linear_int4(x, qweight, scales, 192, 64)
    assert got.dtype == x_dtype
    tol = 1e-5 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_native
def test_q8_products_are_batch_invariant(native_kernels):
    """Every ISA variant: a row's int8-activation product (int4 and int8 weights) has the same bits alone, in a
    batch of any size and at any place in it — what lets a decode step reproduce the full forward exactly."""
    from qwen35.quant.int8 import quantize_rows

    g = torch.Generator().manual_seed(9)
    for K in (200, 1024):
        qweight, scales = quantize_groups(torch.randn(45, K, generator=g) * 0.05, 32)
        q8w, s8 = quantize_rows(torch.randn(45, K, generator=g) * 0.05)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(67, K, generator=g).to(dtype)
            for product in (lambda a: native_kernels.linear_int4_q8(a, qweight, scales, K, 32),
                            lambda a: native_kernels.linear_int8_q8(a, q8w, s8)):
                whole = product(x)
                solo = torch.cat([product(x[i:i + 1]) for i in range(x.shape[0])])
                assert torch.equal(whole, solo)
                assert torch.equal(product(x[5:12]), whole[5:12]) and torch.equal(product(x[1:3]), whole[1:3])


@needs_native
def test_several_weights_in_one_call_equal_one_call_each(native_kernels):
    """Every ISA variant: linear_int4_q8_many (the q/k/v or gate/up projections of a layer in one call, the
    activations rounded once) gives each output the bits of its own one-weight call."""
    g = torch.Generator().manual_seed(4)
    weights = [quantize_groups(torch.randn(n, 200, generator=g) * 0.05, 32) for n in (37, 8, 64)]
    for M in (1, 5, 50):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, 200, generator=g).to(dtype)
            y = native_kernels.linear_int4_q8_many(x, weights, 200, 32)
            assert y.shape == (M, 37 + 8 + 64) and y.dtype == dtype
            want = torch.cat([native_kernels.linear_int4_q8(x, q, s, 200, 32) for q, s in weights], dim=-1)
            assert torch.equal(y, want)
    with pytest.raises(ValueError, match="1..8 weights"):
        native_kernels.linear_int4_q8_many(x, weights * 3, 200, 32)
    with pytest.raises(ValueError, match="features"):
        native_kernels.linear_int4_q8_many(x, weights, 192, 32)


@pytest.mark.parametrize("q8", [True, False])
def test_project_groups_quantized_layers_and_keeps_the_order(q8, monkeypatch):
    """qwen35.model.linear.project on a mix of Int4Linear and bf16 Linear layers (a DeltaNet layer's inputs
    once quantized): the outputs are each layer's own, in the order given, whether the int4 ones share a call
    (int8 activations) or not."""
    from qwen35.model.linear import project

    for kind, lim in list(ops.LIMITS.items()):
        monkeypatch.setitem(ops.LIMITS, kind, dataclasses.replace(lim, q8_activations=q8))
    torch.manual_seed(5)
    layers = [Int4Linear(Linear(64, 96, bias=False)), Linear(64, 4, bias=False), Int4Linear(Linear(64, 32, bias=False)),
              Linear(64, 4, bias=False)]
    x = torch.randn(3, 64)
    with torch.inference_mode():
        got = project(x, layers)
        want = [m(x) for m in layers]
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_prompt_path_in_bands_equals_one_product(monkeypatch, float_products):
    g = torch.Generator().manual_seed(3)
    qweight, scales = quantize_groups(torch.randn(50, 128, generator=g), 32)
    x = torch.randn(60, 128, generator=g)
    want = ops.linear_int4_reference(x, qweight, scales, 128, 32)
    monkeypatch.setattr(ops, "INT4_BAND_ELEMENTS", 128 * 7)  # 7 rows per band, a partial last band
    torch.testing.assert_close(ops.linear_int4(x, qweight, scales, 128, 32), want, rtol=1e-5, atol=1e-5)


def test_experts_equal_loop_over_dequantized_experts(float_products):
    from qwen35.model.moe import Experts, Routing

    torch.manual_seed(0)
    experts = Experts(6, 64, 40)  # intermediate 40: the down projection has a partial group
    q = Int4Experts(experts, group_size=32)
    gate_up, down = q.dequantized("gate_up_proj"), q.dequantized("down_proj")
    assert gate_up.shape == experts.gate_up_proj.shape and down.shape == experts.down_proj.shape
    for n in (1, 5, 60):
        x = torch.randn(n, 64)
        ids = torch.stack([torch.randperm(6)[:2] for _ in range(n)])
        wts = torch.rand(n, 2).softmax(-1)
        with torch.no_grad():
            got = q(x, Routing(None, wts, ids))
        want = torch.zeros(n, 64)
        for t in range(n):
            for j in range(2):
                e = int(ids[t, j])
                gate, up = (x[t] @ gate_up[e].T).chunk(2)
                want[t] += wts[t, j] * ((torch.nn.functional.silu(gate) * up) @ down[e].T)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def dequantized_twin(model, **kw):
    """A float model whose weights are exactly the dequantized 4-bit (and int8 head) weights."""
    q = quantize_int4(copy.deepcopy(model), **kw)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, (Int4Linear, Int8Linear)):
                t = twin.get_submodule(name)
                if name == "lm_head" and t.weight is twin.model.embed_tokens.weight:
                    t.weight = torch.nn.Parameter(t.weight.detach().clone())  # untie: the head alone changes
                t.weight.copy_(mod.dequantized())
            elif isinstance(mod, Int4Experts):
                e = twin.get_submodule(name)
                e.gate_up_proj.copy_(mod.dequantized("gate_up_proj"))
                e.down_proj.copy_(mod.dequantized("down_proj"))
    return q, twin


@pytest.mark.parametrize("lm_head", ["int8", "int4", None])
def test_quantized_model_equals_its_dequantized_twin(lm_head, float_products):
    for moe in (False, True):
        q, twin = dequantized_twin(tiny_model(moe), group_size=32, lm_head=lm_head)
        ids = torch.tensor([prompts_of([40], seed=1)[0]])
        with torch.no_grad():
            torch.testing.assert_close(q(ids).logits, twin(ids).logits, rtol=1e-4, atol=1e-4)
        assert any(isinstance(m, Int4Linear) for m in q.modules())
        assert moe == any(isinstance(m, Int4Experts) for m in q.modules())
        kept = [n for n, m in q.named_modules() if n.endswith(("in_proj_a", "in_proj_b", "mlp.gate",
                                                                "shared_expert_gate"))]
        assert kept and not any(isinstance(q.get_submodule(n), (Int4Linear, Int8Linear)) for n in kept)
        head = {"int8": Int8Linear, "int4": Int4Linear, None: Linear}[lm_head]
        assert type(q.lm_head) is head


@pytest.mark.parametrize("q8", [True, False])
def test_engine_on_int4_model_equals_full_forward(q8, monkeypatch):
    """Batched, chunked decoding of an int4 MoE model gives the greedy tokens of its own full forward, with int8
    activations (the default: every row rounded alone, so the same bits either way) and with float32 products."""
    for kind, lim in list(ops.LIMITS.items()):
        monkeypatch.setitem(ops.LIMITS, kind, dataclasses.replace(lim, q8_activations=q8))
    q = quantize_int4(tiny_model(True), group_size=32)
    eng = LLMEngine(q, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, block_size=4))
    prompts = prompts_of([3, 21, 9], seed=2)
    ids = [eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == solo_greedy(q, p, 8)


def test_bf16_int4_decode_tracks_float_model(cpu_kind):
    """A bf16 decode step through the int4 kernel is as close to the float32 truth (the dequantized twin) as the
    same model run in plain bf16: the kernel adds no error beyond bf16 rounding."""
    from qwen35.model import SequenceCache

    q, twin = dequantized_twin(tiny_model(False), group_size=32)
    ids = torch.tensor([prompts_of([12], seed=3)[0]])

    def last_step(m):
        with torch.no_grad():
            c = SequenceCache()
            m(ids[:, :-1], cache=c)
            return m(ids[:, -1:], cache=c).logits.float()

    want = twin(ids).logits[:, -1:].detach()
    err_int4 = (last_step(q.to(torch.bfloat16)) - want).abs().max()
    err_bf16 = (last_step(copy.deepcopy(twin).to(torch.bfloat16)) - want).abs().max()
    assert err_int4 <= 1.5 * err_bf16 + 0.01 * want.abs().max(), (err_int4, err_bf16)


def test_llm_int4_on_the_embedded_model_answers():
    from qwen35 import LLM

    llm = LLM(quantization="int4")
    assert llm.model.quantization == "int4"
    assert any(isinstance(m, Int4Experts) for m in llm.model.modules())
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=6, temperature=0))
    assert out[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="int4"):
        LLM(quantization="int3")
