"""Gated full attention: GQA softmax attention with per-head q/k RMSNorm, partial M-RoPE and an output gate.

q_proj produces, per head, [query | gate] side by side (2 · head_dim rows per head); the attention output is
multiplied by sigmoid(gate) before o_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .context import ForwardContext
from .linear import Linear, project
from .norm import RMSNorm
from .rope import apply_rotary


class GatedAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(h, self.n_heads * self.head_dim * 2, bias=bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        qg, k, v = project(x, [self.q_proj, self.k_proj, self.v_proj])
        q, gate = qg.view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(k.view(B, T, self.n_kv, self.head_dim))
        v = v.view(B, T, self.n_kv, self.head_dim)
        cos, sin = ctx.rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = ctx.attend(self.layer_idx, q, k, v).reshape(B, T, -1)
        return self.o_proj(o * torch.sigmoid(gate.reshape(B, T, -1)))
