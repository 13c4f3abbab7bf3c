"""Training-from-scratch initialisation of a Qwen3.5 model (or any part of one: the trunk, the MTP block, the
vision tower).

``Qwen35ForCausalLM.__init__`` leaves PyTorch's defaults in place -- Kaiming-uniform linears, N(0, 1) embeddings
(far too large for a language model), a zero router (every token ties across experts) -- because a loaded
checkpoint overwrites every weight anyway.  A model that is to be trained from nothing needs this first.
"""

from __future__ import annotations

import torch
from torch import nn

from .deltanet import GatedDeltaNet
from .moe import Experts, Router
from .norm import GatedRMSNorm, RMSNorm


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialise every weight under ``module`` as transformers' Qwen3.5 ``_init_weights`` does:

    * linears, convolutions (the DeltaNet's causal conv, the tower's patch embedding), embeddings (tokens, the
      tower's learned positions), routers and experts ~ N(0, std), biases 0;
    * zero-centred RMSNorms 0 (an effective scale of 1), the DeltaNet's gated norm 1, LayerNorms (the tower)
      scale 1 and shift 0;
    * the DeltaNet decay: A_log = log U(0.01, 16), dt_bias = 1.

    Modules are visited in ``module.modules()`` order, so with the same torch seed the same model gets the same
    weights."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Router):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, Experts):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)
        elif isinstance(m, RMSNorm):
            nn.init.zeros_(m.weight)
        elif isinstance(m, GatedRMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, GatedDeltaNet):
            m.A_log.copy_(torch.empty_like(m.A_log).uniform_(0.01, 16).log())
            nn.init.ones_(m.dt_bias)


__all__ = ["init_weights"]
