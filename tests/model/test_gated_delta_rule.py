"""Both forms of the gated delta rule against a naive token-by-token recurrence written here."""

from __future__ import annotations

import pytest
import torch

from qwen35.model.gated_delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent


def naive(q, k, v, g, beta, state):
    """S_t = exp(g_t) S_{t-1} + k_t β_t (v_t − exp(g_t) S_{t-1}ᵀ k_t)ᵀ,  o_t = S_tᵀ q_t — in float64, one head at a time."""
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    out = torch.zeros(B, T, Hv, dv, dtype=torch.float64)
    S = state.double().clone()
    for b in range(B):
        for h in range(Hv):
            kh = h // (Hv // Hk)
            for t in range(T):
                qt = q[b, t, kh].double()
                kt = k[b, t, kh].double()
                qt = qt / (qt.dot(qt) + 1e-6).sqrt() / dk ** 0.5
                kt = kt / (kt.dot(kt) + 1e-6).sqrt()
                s = S[b, h] * torch.exp(g[b, t, h].double())
                err = v[b, t, h].double() - s.T @ kt
                S[b, h] = s + torch.outer(kt, beta[b, t, h].double() * err)
                out[b, t, h] = S[b, h].T @ qt
    return out, S


def inputs(T, B=2, Hk=2, Hv=4, dk=8, dv=6, seed=0):
    g_ = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g_)  # noqa: E731
    return (r(B, T, Hk, dk), r(B, T, Hk, dk), r(B, T, Hv, dv), -torch.rand(B, T, Hv, generator=g_) * 3,
            torch.rand(B, T, Hv, generator=g_), r(B, Hv, dk, dv))


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 50])
@pytest.mark.parametrize("with_state", [False, True])
def test_both_forms_match_naive_recurrence(T, with_state):
    q, k, v, g, beta, S0 = inputs(T)
    if not with_state:
        S0 = torch.zeros_like(S0)
    want_o, want_S = naive(q, k, v, g, beta, S0)
    for fn in (gated_delta_rule_recurrent, lambda *a: gated_delta_rule_chunked(*a, chunk_size=16)):
        o, S = fn(q, k, v, g, beta, S0 if with_state else None)
        assert S.dtype == torch.float32
        torch.testing.assert_close(o.double(), want_o, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(S.double(), want_S, atol=2e-5, rtol=1e-4)


def test_chunked_state_carries_across_calls():
    q, k, v, g, beta, S0 = inputs(40)
    whole_o, whole_S = gated_delta_rule_chunked(q, k, v, g, beta, S0, chunk_size=16)
    o1, S1 = gated_delta_rule_chunked(q[:, :23], k[:, :23], v[:, :23], g[:, :23], beta[:, :23], S0, chunk_size=16)
    o2, S2 = gated_delta_rule_chunked(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], beta[:, 23:], S1, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], 1), whole_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S2, whole_S, atol=1e-5, rtol=1e-5)


def test_strong_decay_stays_finite():
    """Large |g| (fast forgetting) must not overflow the chunk-local exponentials."""
    q, k, v, g, beta, S0 = inputs(64)
    g = g * 40
    o, S = gated_delta_rule_chunked(q, k, v, g, beta, S0, chunk_size=64)
    want_o, want_S = naive(q, k, v, g, beta, S0)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o.double(), want_o, atol=2e-5, rtol=1e-4)


def test_bad_state_shape_is_named():
    q, k, v, g, beta, S0 = inputs(3)
    with pytest.raises(ValueError, match="state has shape"):
        gated_delta_rule_chunked(q, k, v, g, beta, S0[:, :1])
