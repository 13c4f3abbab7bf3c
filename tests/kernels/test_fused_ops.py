"""The one-pass norms (qwen35/kernels/fused_ops.c), the multi-weight product and the grouped MoE experts against
the PyTorch compositions they replace, in float32 and bf16: the modules run both ways, native and with the
kernels off."""

from __future__ import annotations

import pytest
import torch

from qwen35 import kernels
from qwen35.kernels import ops
from qwen35.model.linear import Linear, project
from qwen35.model.moe import MLP
from qwen35.model.norm import GatedRMSNorm, RMSNorm

from .test_native import needs_native


def both_ways(monkeypatch, fn):
    """fn() with the native kernels, then with them switched off."""
    with torch.inference_mode():
        fast = fn()
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        kernels.reset()
        try:
            slow = fn()
        finally:
            monkeypatch.delenv(kernels.ENV_SWITCH)
            kernels.reset()
    return fast, slow


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:  # the sum of squares is taken in another order: at most one bf16 rounding step apart
        diff = (a.float() - b.float()).abs()
        assert float((diff > 0).float().mean()) < 0.02, "more than a few values differ"
        assert float((diff / b.float().abs().clamp_min(1e-3)).max()) <= 2 ** -7


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 64), (300, 64), (3, 2, 4, 16)])
def test_rms_norm(native_kernels, monkeypatch, dtype, shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    norm.weight.data.normal_(0, 0.5)
    x = torch.randn(shape, dtype=dtype) * 3
    fast, slow = both_ways(monkeypatch, lambda: norm(x))
    close(fast, slow, dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_reads_strided_gates(native_kernels, monkeypatch, dtype):
    torch.manual_seed(1)
    norm = GatedRMSNorm(32, eps=1e-6).to(dtype)
    norm.weight.data.normal_(1, 0.3)
    o = torch.randn(1, 7, 4, 32, dtype=dtype)
    fused = torch.randn(1, 7, 4 * 32 + 40, dtype=dtype)  # z is a column slice of a wider projection output
    z = fused[..., 8:8 + 128].view(1, 7, 4, 32)
    fast, slow = both_ways(monkeypatch, lambda: norm(o, z))
    close(fast, slow, dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16, 60])
def test_mlp_fused_projection_and_swiglu(native_kernels, monkeypatch, dtype, rows):
    torch.manual_seed(3)
    mlp = MLP(64, 96).to(dtype)
    for p in mlp.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(1, rows, 64, dtype=dtype)
    fast, slow = both_ways(monkeypatch, lambda: mlp(x))
    if dtype == torch.float32:
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    else:  # bf16 weights widened: the float32 sums differ in order only, then round the same way
        torch.testing.assert_close(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 9, 47])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_project_streams_several_weights_in_one_call(native_kernels, cpu_kind, rows, x_dtype):
    """Below the plan's linear_max_rows one native call streams every weight (bf16 rows on an AVX512-BF16 build:
    vdpbf16ps); above it each product runs on its own (float32 activations on bf16 weights: the case that used to
    fail on AVX512-BF16 machines)."""
    torch.manual_seed(4)
    layers = [Linear(40, n, bias=False).bfloat16() for n in (24, 7, 1, 16)]
    x = torch.randn(rows, 40).to(x_dtype)
    with torch.inference_mode():
        outs = project(x, layers)
        one_by_one = [native_kernels.linear_bf16(x, m.weight, out_dtype=x_dtype) for m in layers]
    fused = rows < ops.limits().linear_max_rows
    if fused:
        base = outs[0].untyped_storage().data_ptr()
        assert all(o.untyped_storage().data_ptr() == base for o in outs), "one call, one output tensor"
    for o, ref in zip(outs, one_by_one):
        assert o.dtype == x_dtype
        if fused:
            assert torch.equal(o, ref)
        elif x_dtype == torch.float32:
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        else:  # PyTorch's bf16 product against the kernel's: one bf16 rounding apart
            torch.testing.assert_close(o.float(), ref.float(), rtol=2 ** -7, atol=1e-2)


@needs_native
def test_project_falls_back_for_other_layers(native_kernels):
    quantized_like = torch.nn.Linear(40, 8, bias=True).bfloat16()  # bias: not the fused path
    plain = Linear(40, 8, bias=False).bfloat16()
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    with torch.inference_mode():
        a, b = project(x, [plain, quantized_like])
        torch.testing.assert_close(b, quantized_like(x))
        torch.testing.assert_close(a, plain(x))


@needs_native
def test_fused_ops_reject_mismatched_arguments(native_kernels):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        native_kernels.rms_norm(x, torch.zeros(7), 1e-6, 1.0)
    with pytest.raises(ValueError, match="float32 or bf16"):
        native_kernels.rms_norm(x.double(), torch.zeros(8), 1e-6, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        native_kernels.gated_rms_norm(x, torch.randn(2, 9), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="1..8 weights"):
        native_kernels.linear_bf16_many(x, [])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_moe_experts_in_one_call_equal_the_expert_loop(native_kernels, monkeypatch, dtype, tokens):
    from qwen35.kernels.ops import moe_experts_reference
    from qwen35.model.moe import Experts, Routing

    torch.manual_seed(5)
    E, H, I, k = 6, 48, 40, 3
    experts = Experts(E, H, I)
    experts.gate_up_proj.data = (experts.gate_up_proj.data * 5).bfloat16()
    experts.down_proj.data = (experts.down_proj.data * 5).bfloat16()
    x = torch.randn(tokens, H).to(dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])  # tokens share experts
    w = torch.rand(tokens, k).softmax(-1).to(dtype)
    routing = Routing(torch.zeros(tokens, E, dtype=dtype), w, ids)
    with torch.inference_mode():
        fast = experts(x, routing)
    if dtype == torch.float32:  # float32 activations: the loop needs float32 weights (the same values)
        with torch.inference_mode():
            slow = moe_experts_reference(x, ids, w, experts.gate_up_proj.float(), experts.down_proj.float())
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    else:  # identical roundings; the float32 sums inside a product may differ in order
        fast2, slow = both_ways(monkeypatch, lambda: experts(x, routing))
        assert torch.equal(fast, fast2) and slow.dtype == torch.bfloat16
        torch.testing.assert_close(fast.float(), slow.float(), rtol=2e-2, atol=2e-3)


@needs_native
def test_moe_experts_rejects_bad_expert_ids(native_kernels):
    gate_up = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    down = torch.zeros(4, 16, 4, dtype=torch.bfloat16)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="outside 0..3"):
        native_kernels.moe_experts(x, torch.tensor([[0, 4], [1, 2]]), torch.ones(2, 2), gate_up, down)
    with pytest.raises(ValueError, match="do not match"):
        native_kernels.moe_experts(x, torch.tensor([[0, 1]]), torch.ones(1, 2), gate_up, down)
    with pytest.raises(ValueError, match="bf16 gate_up"):
        native_kernels.moe_experts(x, torch.tensor([[0], [1]]), torch.ones(2, 1), gate_up.float(), down)


@needs_native
def test_prompt_sized_inputs_stay_on_pytorch(native_kernels, monkeypatch):
    """The one-pass ops are for decode-sized inputs; a prompt chunk uses PyTorch's vectorised kernels."""
    calls = []
    monkeypatch.setattr(type(native_kernels), "rms_norm", lambda self, *a, **k: calls.append(a) or a[0])
    norm = RMSNorm(64)
    with torch.inference_mode():
        norm(torch.randn(1, 8, 64))
        assert len(calls) == 1
        norm(torch.randn(1, ops.limits().norm_max_elements // 64 + 1, 64))
    assert len(calls) == 1
