"""Autograd through the chunked gated delta rule matches autograd through a naive token-by-token recurrence.

Training backpropagates through ``gated_delta_rule_chunked`` (triangular solve, chunk-local cumulative decays,
the state carried across chunks), so its gradients w.r.t. q, k, v, g, β and the initial state are checked
against the plain recurrence written here, on tiny sizes that cross chunk boundaries.

Precision: the chunked function may compute in float32 whatever the input dtype (it keeps its state in float32),
in which case float64 inputs still get gradients with float32 rounding.  The float32 test compares against the float64
reference with a tolerance set by that rounding (relative error of a few 1e-6 per op, accumulated over a few
hundred ops: 2e-4 of the gradient's scale).  The float64 test demands 1e-9 and runs once the function keeps
float64 inputs in float64 (skipped, with the reason, when it does not).
"""

from __future__ import annotations

import pytest
import torch

from qwen35.model.gated_delta_rule import gated_delta_rule_chunked


def naive_gated_delta_rule(q, k, v, g, beta, state):
    """S_t = e^{g_t} S_{t-1} + k_t (β_t (v_t − e^{g_t} S_{t-1}ᵀ k_t))ᵀ,  o_t = S_tᵀ q_t, one token at a time,
    with q, k L2-normalised (eps 1e-6) and q scaled by d_k^-1/2; out of place so autograd sees every step."""
    B, T, Hk, dk = q.shape
    Hv = v.shape[2]
    group = Hv // Hk
    q = q / (q * q).sum(-1, keepdim=True).add(1e-6).sqrt() * dk ** -0.5
    k = k / (k * k).sum(-1, keepdim=True).add(1e-6).sqrt()
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)  # value head h reads key head h // group
    S = state
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        S = S + k[:, t, :, :, None] * (beta[:, t, :, None] * err)[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, dim=1), S


def make_inputs(T: int, dtype: torch.dtype, B: int = 2, Hk: int = 2, Hv: int = 4, dk: int = 5, dv: int = 3,
                seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    xs = [r(B, T, Hk, dk), r(B, T, Hk, dk), r(B, T, Hv, dv),
          -torch.rand(B, T, Hv, generator=gen, dtype=torch.float64) * 2,  # log-decays in (-2, 0]
          torch.rand(B, T, Hv, generator=gen, dtype=torch.float64),  # β in (0, 1)
          r(B, Hv, dk, dv) * 0.5]
    return [x.to(dtype).requires_grad_(True) for x in xs]


NAMES = ("q", "k", "v", "g", "beta", "state")


def gradients(fn, inputs, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of a fixed random projection of (output, final state) — every output element matters."""
    o, S = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    loss = (o * wo).sum() + (S * ws).sum()
    return list(torch.autograd.grad(loss, inputs)), o.detach(), S.detach()


# T crosses chunk boundaries: shorter than a chunk, exactly one, one plus a token, several with padding
CASES = [(3, 4), (4, 4), (5, 4), (11, 4), (16, 8)]


def _compare(dtype: torch.dtype, T: int, C: int, rtol: float) -> None:
    ref_in = make_inputs(T, torch.float64)
    test_in = make_inputs(T, dtype)
    want, o_ref, s_ref = gradients(naive_gated_delta_rule, ref_in)
    got, o, s = gradients(lambda *x: gated_delta_rule_chunked(*x, chunk_size=C), test_in)
    # forward first: a wrong forward makes every gradient comparison meaningless
    assert (o.double() - o_ref).abs().max() <= rtol * o_ref.abs().max()
    assert (s.double() - s_ref).abs().max() <= rtol * s_ref.abs().max()
    for name, a, b in zip(NAMES, got, want):
        err = (a.double() - b).abs().max().item()
        scale = b.abs().max().item()
        assert err <= rtol * scale, f"d/d{name}: max error {err:.3g} vs scale {scale:.3g} (T={T}, C={C})"


@pytest.mark.parametrize("T,C", CASES)
def test_chunked_gradients_float32(T: int, C: int) -> None:
    _compare(torch.float32, T, C, rtol=2e-4)


@pytest.mark.parametrize("T,C", CASES)
def test_chunked_gradients_float64(T: int, C: int) -> None:
    _compare(torch.float64, T, C, rtol=1e-9)


def test_gradients_do_not_depend_on_chunking() -> None:
    """T=5 in chunks of 4 (one full chunk, one padded with 3 zeros) and in one chunk of 8 (3 zeros of padding):
    the padding carries no gradient and the chunk boundary changes nothing."""
    x1 = make_inputs(5, torch.float32)
    x2 = make_inputs(5, torch.float32)
    a, _, _ = gradients(lambda *x: gated_delta_rule_chunked(*x, chunk_size=4), x1)
    b, _, _ = gradients(lambda *x: gated_delta_rule_chunked(*x, chunk_size=8), x2)
    for name, ga, gb in zip(NAMES, a, b):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5), name
