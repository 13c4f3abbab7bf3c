"""The gated delta rule, in its two forms.

Per value head, with state S ∈ R^{d_k × d_v}, decay α_t = exp(g_t) and write strength β_t:

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,        o_t = S_tᵀ q_t

``gated_delta_rule_recurrent`` applies this one token at a time (decode).  ``gated_delta_rule_chunked``
processes C tokens per step with the WY/UT representation, so a prompt costs a few batched matmuls per
chunk instead of one state update per token.  Both take and return the state, always in float32.

Shapes: q, k [B, T, Hk, d_k]; v [B, T, Hv, d_v]; g, beta [B, T, Hv]; state [B, Hv, d_k, d_v].
Each group of Hv / Hk consecutive value heads shares one query/key head.  q and k are L2-normalised
here (Qwen3.5 normalises inside the kernel) and q is scaled by d_k^-1/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
             state: torch.Tensor | None):
    """fp32, [B, H, T, d] layout, normalised q/k, and a zero state if none was given."""
    B, T, Hk, dk = k.shape
    Hv, dv = v.shape[-2:]
    if Hv % Hk:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    q = l2_normalize(q.float()) * dk ** -0.5
    k = l2_normalize(k.float())
    q, k, v = (x.transpose(1, 2) for x in (q, k, v.float()))
    g, beta = g.float().transpose(1, 2), beta.float().transpose(1, 2)
    if state is None:
        state = torch.zeros(B, Hv, dk, dv, dtype=torch.float32, device=v.device)
    elif state.shape != (B, Hv, dk, dv):
        raise ValueError(f"state has shape {tuple(state.shape)}, expected {(B, Hv, dk, dv)}")
    return q, k, v, g, beta, state.float()


def gated_delta_rule_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One state update per token. Returns (o [B, T, Hv, d_v] in v's dtype, final state fp32)."""
    out_dtype = v.dtype
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, state)
    B, Hv, T, dv = v.shape
    group = Hv // k.shape[1]
    if group > 1:  # view each value head's key head without copying per step
        q = q.repeat_interleave(group, dim=1)
        k = k.repeat_interleave(group, dim=1)
    outs = []
    for t in range(T):
        kt, qt = k[:, :, t], q[:, :, t]  # [B, Hv, dk]
        S = S * g[:, :, t].exp()[..., None, None]
        # the delta: what the (decayed) memory already predicts for k_t is replaced by β-weighted v_t
        pred = torch.einsum("bhkv,bhk->bhv", S, kt)
        delta = (v[:, :, t] - pred) * beta[:, :, t, None]
        S = S + kt[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, qt))
    o = torch.stack(outs, dim=2)  # [B, Hv, T, dv]
    return o.transpose(1, 2).to(out_dtype), S


def gated_delta_rule_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C tokens per step (WY/UT form). Returns (o [B, T, Hv, d_v] in v's dtype, final state fp32).

    Within a chunk, with Γ the chunk-local cumulative log-decay:
        A_ij = β_i (k_i·k_j) e^{Γ_i − Γ_j}  (i > j),   (I + A) [W | U] = [β e^Γ K | β V]
        V' = U − W S;   O = (Q e^Γ) S + (Q Kᵀ ⊙ e^{Γ_i − Γ_j})_{i≥j} V';   S ← e^{Γ_C} S + (K e^{Γ_C − Γ})ᵀ V'
    Zero padding to a multiple of C (β = 0, g = 0) leaves the state untouched.
    """
    out_dtype = v.dtype
    B, T = v.shape[:2]
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, state)
    Hk, dk = k.shape[1], k.shape[-1]
    Hv, dv = v.shape[1], v.shape[-1]
    group = Hv // Hk
    C = chunk_size
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    # [B, H, N, C, d]; value-head tensors get a group axis so key-head tensors broadcast without copies
    q = q.reshape(B, Hk, 1, N, C, dk)
    k = k.reshape(B, Hk, 1, N, C, dk)
    v = v.reshape(B, Hk, group, N, C, dv)
    g = g.reshape(B, Hk, group, N, C)
    beta = beta.reshape(B, Hk, group, N, C)

    gamma = g.cumsum(-1)  # Γ
    causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    # e^{Γ_i − Γ_j} on and below the diagonal; the upper triangle is masked before exp so it cannot overflow
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kk = k @ k.transpose(-1, -2)  # shared by the value heads of a group
    qk = q @ k.transpose(-1, -2)
    A = (beta[..., None] * kk * decay).tril(-1)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    rhs = torch.cat([(beta * gamma.exp())[..., None] * k, beta[..., None] * v], dim=-1)
    WU = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :dk], WU[..., dk:]
    attn = qk * decay  # intra-chunk, causal incl. diagonal
    q_decayed = q * gamma.exp()[..., None]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]
    chunk_decay = gamma[..., -1].exp()[..., None, None]

    S = S.reshape(B, Hk, group, dk, dv)
    out = torch.empty(B, Hk, group, N, C, dv, dtype=torch.float32, device=v.device)
    for n in range(N):
        v_new = U[:, :, :, n] - W[:, :, :, n] @ S
        out[:, :, :, n] = q_decayed[:, :, :, n] @ S + attn[:, :, :, n] @ v_new
        S = S * chunk_decay[:, :, :, n] + k_to_end[:, :, :, n].transpose(-1, -2) @ v_new
    out = out.reshape(B, Hv, N * C, dv)[:, :, :T]
    return out.transpose(1, 2).to(out_dtype), S.reshape(B, Hv, dk, dv)
