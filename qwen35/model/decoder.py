"""One decoder block: a sequence mixer and a feed-forward block, each pre-normed and residual.

    h += mixer(input_layernorm(h))            mixer: Gated DeltaNet ("linear_attention") or gated attention
    h += ffn(post_attention_layernorm(h))     ffn: SwiGLU (dense) or sparse MoE

The main stack and the MTP block are made of these.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .attention import GatedAttention
from .context import ForwardContext
from .deltanet import GatedDeltaNet
from .moe import MLP, SparseMoE
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    """``cache_index`` is the layer number the mixer gives the context (where its KV or recurrent state lives);
    it defaults to ``layer_idx``.  The MTP block's layers are layers 0.. of their own config but keep their state
    under indices after the main stack's, so one context can hold both."""

    def __init__(self, cfg: TextConfig, layer_idx: int, cache_index: int | None = None) -> None:
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        index = layer_idx if cache_index is None else cache_index
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, index)
        else:
            self.self_attn = GatedAttention(cfg, index)
        self.mlp = SparseMoE(cfg) if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, T, H] -> (h [B, T, H], router logits [B*T, E] or None for a dense FFN)."""
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        h = h + mixer(self.input_layernorm(h), ctx)
        y = self.mlp(self.post_attention_layernorm(h))
        router_logits = None
        if isinstance(y, tuple):
            y, router_logits = y
        return h + y, router_logits


__all__ = ["DecoderLayer"]
