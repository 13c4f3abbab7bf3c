"""The native bf16 kernel against a float64 product of the same bf16 weights, and the linear() dispatch."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from qwen35 import kernels
from qwen35.kernels import ops

HAVE_TOOLCHAIN = platform.machine() in ("x86_64", "AMD64") and any(shutil.which(c) for c in ("cc", "gcc", "clang"))
needs_native = pytest.mark.skipif(not HAVE_TOOLCHAIN, reason="native kernels need x86-64 and a C compiler")



def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 16, 17, 47])
@pytest.mark.parametrize("N,K", [(1, 16), (2, 33), (3, 64), (7, 1), (37, 100), (64, 1024), (130, 257)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_bf16_equals_float64_product(native_kernels, M, N, K, x_dtype):
    """Both activation types: float32 rows (widened weights, FMAs) and bf16 rows (on an AVX512-BF16 build, the
    vdpbf16ps path, whose masked last step covers every K)."""
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    w = torch.randn(N, K, generator=g).bfloat16()
    y = native_kernels.linear_bf16(x, w)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    ref = reference(x, w)
    # float32 accumulation of K products: error grows like sqrt(K) * eps * |x||w|
    tol = 1e-6 * (K ** 0.5) * float(x.abs().max()) * float(w.float().abs().max()) * 4 + 1e-6
    assert float((y.double() - ref).abs().max()) <= tol


@needs_native
def test_linear_bf16_batched_leading_dims_and_threads(native_kernels):
    x = torch.randn(2, 3, 96).bfloat16()
    w = torch.randn(50, 96).bfloat16()
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(native_kernels.linear_bf16(x, w))
    finally:
        torch.set_num_threads(old)
    assert outs[0].shape == (2, 3, 50)
    assert torch.equal(outs[0], outs[1]), "splitting rows across threads must not change any result"
    assert torch.allclose(outs[0].double(), reference(x.reshape(6, 96), w).reshape(2, 3, 50), atol=1e-4)


@needs_native
def test_linear_bf16_rejects_bad_arguments(native_kernels):
    with pytest.raises(ValueError, match="bf16 weight"):
        native_kernels.linear_bf16(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="features"):
        native_kernels.linear_bf16(torch.randn(1, 9), torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="contiguous"):
        native_kernels.linear_bf16(torch.randn(1, 8), torch.randn(8, 4).bfloat16().T)


def test_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    kernels.reset()
    try:
        assert kernels.native() is None
        x, w = torch.randn(2, 16).bfloat16(), torch.randn(4, 16).bfloat16()
        # linear() still works, through PyTorch
        assert torch.allclose(ops.linear(x, w).float(), (x.float() @ w.float().T), atol=0.1)
    finally:
        kernels.reset()


# each CPU kind's cut-off between the native product and the next path, from both sides
EDGE_ROWS = sorted({1, 4, 64} | {lim.linear_max_rows + d for lim in ops.LIMITS.values() for d in (-1, 0)} - {-1, 0})


@needs_native
@pytest.mark.parametrize("rows", EDGE_ROWS)
def test_linear_dispatch_matches_float32_on_every_path(native_kernels, cpu_kind, rows):
    """Whatever path a row count takes (native, widened or PyTorch bf16), linear() of bf16 operands equals the
    float32 product of the same bf16 values up to the final rounding to bf16."""
    x = torch.randn(rows, 256).bfloat16()
    w = torch.randn(96, 256).bfloat16()
    b = torch.randn(96).bfloat16()
    y = ops.linear(x, w, b)
    ref = (x.double() @ w.double().T + b.double())
    assert y.dtype == torch.bfloat16
    # one bf16 rounding of the result (8 bits of mantissa) plus float32 accumulation
    assert torch.allclose(y.double(), ref, rtol=2 ** -7, atol=1e-3)


@needs_native
def test_linear_with_gradients_never_takes_the_native_path(native_kernels, cpu_kind):
    w = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    ops.linear(x, w).float().sum().backward()
    assert w.grad is not None and torch.allclose(w.grad.float(), x.float().expand(8, 16), atol=1e-2)


@needs_native
@pytest.mark.parametrize("M", [1, 5, 16])
def test_linear_bf16_takes_and_returns_bf16(native_kernels, M):
    """A bf16 result is the float32 result of the same call rounded to nearest even, as PyTorch rounds.  bf16
    activations are widened exactly: without AVX512-BF16 they give the float32 rows' bits; with it (vdpbf16ps,
    pairs of products summed in another order) the same sum to float32 rounding."""
    x = torch.randn(M, 200).bfloat16()
    w = torch.randn(70, 200).bfloat16()
    y32 = native_kernels.linear_bf16(x, w)
    y16 = native_kernels.linear_bf16(x, w, out_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, y32.to(torch.bfloat16))
    y_float_rows = native_kernels.linear_bf16(x.float(), w)
    if native_kernels.isa == "avx512bf16":
        assert torch.allclose(y32, y_float_rows, rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(y32, y_float_rows)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native_kernels.linear_bf16(x, w, out_dtype=torch.float16)


def _deltanet_case(dtype, seed=0, P=6, Hk=2, Hv=4, dk=16, dv=8, n=3, Kc=4):
    g = torch.Generator().manual_seed(seed)
    C = 2 * Hk * dk + Hv * dv
    return dict(
        qkv=torch.randn(n, C, generator=g).to(dtype), conv=(torch.randn(C, 1, Kc, generator=g) * 0.5).to(dtype),
        windows=torch.randn(P, C, Kc - 1, generator=g).to(dtype), states=torch.randn(P, Hv, dk, dv, generator=g),
        slots=torch.tensor([4, 1, 2])[:n], gate=-torch.rand(n, Hv, generator=g), beta=torch.rand(n, Hv, generator=g),
        Hk=Hk, Hv=Hv, dk=dk, dv=dv, n=n)


def _deltanet_reference(c):
    """PyTorch's path: gather, conv, recurrent rule, scatter."""
    from qwen35.model.gated_delta_rule import gated_delta_rule_recurrent

    n, Hk, Hv, dk, dv = c["n"], c["Hk"], c["Hv"], c["dk"], c["dv"]
    act, window = ops.causal_conv1d_silu_reference(c["qkv"][:, None], c["conv"], c["windows"][c["slots"]])
    q, k, v = act[:, 0].split([Hk * dk, Hk * dk, Hv * dv], dim=-1)
    o, state = gated_delta_rule_recurrent(q.reshape(n, 1, Hk, dk), k.reshape(n, 1, Hk, dk),
                                          v.reshape(n, 1, Hv, dv), c["gate"][:, None], c["beta"][:, None],
                                          c["states"][c["slots"]].clone())
    return o[:, 0], window, state


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deltanet_decode_equals_the_pytorch_path(native_kernels, dtype):
    c = _deltanet_case(dtype)
    o_ref, window_ref, state_ref = _deltanet_reference(c)
    windows, states = c["windows"].clone(), c["states"].clone()
    o = native_kernels.deltanet_decode_(c["qkv"], c["conv"], windows, states, c["slots"], c["Hk"], c["gate"],
                                        c["beta"])
    untouched = [i for i in range(states.shape[0]) if i not in c["slots"].tolist()]
    assert torch.equal(states[untouched], c["states"][untouched]) and torch.equal(windows[untouched],
                                                                                   c["windows"][untouched])
    assert torch.equal(windows[c["slots"]], window_ref.to(dtype))
    # float32: summation order only; bf16: the reference rounds its output to bf16
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(states[c["slots"]], state_ref, atol=1e-5 if dtype == torch.float32 else 1e-3)
    assert torch.allclose(o, o_ref.float(), atol=tol)


@needs_native
def test_deltanet_kernels_reject_bad_slots_and_shapes(native_kernels):
    c = _deltanet_case(torch.float32)
    with pytest.raises(ValueError, match="out of range"):
        native_kernels.deltanet_decode_(c["qkv"], c["conv"], c["windows"], c["states"], torch.tensor([0, 1, 9]),
                                        c["Hk"], c["gate"], c["beta"])
    with pytest.raises(ValueError, match="inconsistent shapes"):
        native_kernels.deltanet_decode_(c["qkv"][:, :-1], c["conv"], c["windows"], c["states"], c["slots"],
                                        c["Hk"], c["gate"], c["beta"])
    with pytest.raises(ValueError, match="share float32 or bf16"):
        native_kernels.deltanet_decode_(c["qkv"].bfloat16(), c["conv"], c["windows"], c["states"], c["slots"],
                                        c["Hk"], c["gate"], c["beta"])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,C,with_window", [(1, 64, 96, True), (2, 5, 37, True), (3, 2, 100, False),
                                              (2, 70, 64, False), (1, 2, 17, True)])
def test_causal_conv1d_silu_equals_the_reference(native_kernels, dtype, B, T, C, with_window):
    """The prompt-side conv + SiLU: bf16 activations bit for bit (the float32 sum in tap order, rounded, then
    SiLU rounded); float32 ones to the exp's 2 ulp; the new window (copies of inputs, history included when the
    chunk is shorter than it) exactly."""
    g = torch.Generator().manual_seed(B * 100 + T)
    x = torch.randn(B, T, C, generator=g).to(dtype)
    w = (torch.randn(C, 1, 4, generator=g) * 0.5).to(dtype)
    window = torch.randn(B, C, 3, generator=g).to(dtype) if with_window else None
    act_ref, window_ref = ops.causal_conv1d_silu_reference(x, w, window)
    act, new_window = native_kernels.causal_conv1d_silu(x, w, window)
    assert act.shape == (B, T, C) and act.dtype == dtype
    assert torch.equal(new_window, window_ref)
    if dtype == torch.bfloat16:
        assert torch.equal(act, act_ref)
    else:
        assert torch.allclose(act, act_ref, rtol=1e-6, atol=1e-5)  # PyTorch may fuse the tap adds (FMA)


@needs_native
def test_causal_conv1d_silu_dispatch_and_bad_input(native_kernels, cpu_kind):
    x = torch.randn(2, 9, 40).bfloat16()
    w = torch.randn(40, 1, 4).bfloat16()
    window = torch.randn(2, 40, 3)  # a float32 window on a bf16 model: the op converts it, as the reference does
    act, new_window = ops.causal_conv1d_silu(x, w, window)
    act_ref, window_ref = ops.causal_conv1d_silu_reference(x, w, window)
    assert torch.equal(act, act_ref) and torch.equal(new_window, window_ref)
    with pytest.raises(ValueError, match="share float32 or bf16"):
        native_kernels.causal_conv1d_silu(x, w.float(), None)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        native_kernels.causal_conv1d_silu(x, w, torch.randn(2, 40, 2).bfloat16())
