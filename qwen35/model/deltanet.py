"""The Gated DeltaNet layer: projections, short causal convolution, gates, the delta rule, gated norm.

    [q|k|v] = SiLU(causal depthwise conv1d(in_proj_qkv x))      (kernel 4, no bias)
    z = in_proj_z x,   β = sigmoid(in_proj_b x),   g = −exp(A_log) · softplus(in_proj_a x + dt_bias)   (fp32)
    o = gated delta rule(q, k, v, g, β)                            (q, k L2-normalised inside)
    y = out_proj( w ⊙ RMSNorm(o) ⊙ SiLU(z) )                       (per value head)

The layer keeps no state: the conv window (last K−1 pre-activation inputs) and the fp32 recurrent state
come from and go back to the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.kernels.ops import causal_conv1d_silu, deltanet_decode_

from ..config import TextConfig
from .context import ForwardContext
from .gated_delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent
from .linear import Linear, project
from .norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_k, self.n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = cfg.linear_key_dim, cfg.linear_value_dim
        conv_dim = cfg.linear_conv_dim
        h = cfg.hidden_size
        self.in_proj_qkv = Linear(h, conv_dim, bias=False)
        self.in_proj_z = Linear(h, self.value_dim, bias=False)
        self.in_proj_b = Linear(h, self.n_v, bias=False)
        self.in_proj_a = Linear(h, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.linear_conv_kernel_dim, groups=conv_dim, bias=False,
                                padding=cfg.linear_conv_kernel_dim - 1)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_v).uniform_(0.01, 16)))
        self.dt_bias = nn.Parameter(torch.ones(self.n_v))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, h, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        valid = ctx.token_mask  # [B, T] or None; padded steps must neither write nor decay the state
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        qkv, z, b, a = project(x, [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a])
        beta, g = self.gates(b, a)
        if valid is not None:
            beta, g = beta * valid[..., None], g * valid[..., None]
        o = ctx.linear_mix(self.layer_idx, self, qkv, g, beta)
        z = z.reshape(B, T, self.n_v, self.dv)
        return self.out_proj(self.norm(o, z).reshape(B, T, self.value_dim))

    def gates(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """β = sigmoid(b) and g = −exp(A_log) · softplus(a + dt_bias), both float32 [..., Hv]."""
        beta = torch.sigmoid(b).float()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return beta, g

    def mix(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, window: torch.Tensor | None,
            state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stateful part for sequences that share a batch: conv from ``window``, delta rule from ``state``."""
        b, t, _ = qkv.shape
        act, window = causal_conv1d_silu(qkv, self.conv1d.weight, window)
        q, k, v = act.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(b, t, self.n_k, self.dk)
        k = k.reshape(b, t, self.n_k, self.dk)
        v = v.reshape(b, t, self.n_v, self.dv)
        rule = gated_delta_rule_recurrent if t == 1 else gated_delta_rule_chunked
        o, state = rule(q, k, v, g, beta, state)
        return o, window, state

    def mix_step_(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, windows: torch.Tensor,
                  states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One decode token for n sequences whose conv windows and recurrent states are rows ``slots`` of the
        pools ``windows`` [P, C, K-1] and ``states`` [P, Hv, dk, dv], updated in place.  qkv [n, C],
        g/beta [n, Hv] -> o [n, Hv, dv].  The same arithmetic as :meth:`mix` with t = 1."""
        return deltanet_decode_(qkv, self.conv1d.weight, windows, states, slots, self.n_k, g, beta)
