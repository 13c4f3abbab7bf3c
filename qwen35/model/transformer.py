"""The decoder stack and the causal-LM head.

    h = embed(ids)
    for each layer:  h += mixer(norm(h));  h += ffn(norm(h))      mixer: Gated DeltaNet (3 of 4) or gated attention
    logits = lm_head(norm(h))                                        ffn: SwiGLU (dense) or sparse MoE

Module names equal the text-only checkpoint names (``model.layers.N.linear_attn.in_proj_qkv.weight`` …), so
checkpoint I/O is a prefix change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig, TextConfig
from .attention import GatedAttention
from .context import ForwardContext, SequenceCache, dense_context
from .deltanet import GatedDeltaNet
from .moe import MLP, SparseMoE
from .linear import Linear
from .norm import RMSNorm
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, layer_idx)
        else:
            self.self_attn = GatedAttention(cfg, layer_idx)
        self.mlp = SparseMoE(cfg) if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        h = h + mixer(self.input_layernorm(h), ctx)
        y = self.mlp(self.post_attention_layernorm(h))
        router_logits = None
        if isinstance(y, tuple):
            y, router_logits = y
        return h + y, router_logits


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.rotary_dim)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T', vocab] (T' = T, or fewer with logits_to_keep)
    hidden_states: torch.Tensor  # [B, T, H] last layer output before the final norm
    router_logits: list[torch.Tensor]  # one [B*T, E] per MoE layer (empty for dense models)


class Qwen35ForCausalLM(nn.Module):
    """A Qwen3.5 / Qwen3.6 text decoder (dense or MoE).

    Calling it: ``model(input_ids)`` -> ``CausalLMOutput`` (``.logits`` [B, T, vocab]).  A left-padded ragged
    batch with ``attention_mask`` gives each row the logits it would get alone; ``cache=SequenceCache()``
    makes the call incremental (prompt first, then tokens one at a time).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config.text
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.extra_tensors: dict[str, torch.Tensor] = {}  # checkpoint tensors kept aside (vision, MTP)

    def save_pretrained(self, folder, max_shard_bytes: int = 4 * 1024 ** 3, tokenizer_from=None) -> None:
        """Write an official-layout checkpoint folder, tokenizer files included when the model was loaded from a
        folder that has them (see qwen35.checkpoint.save_pretrained)."""
        from ..checkpoint import save_pretrained

        save_pretrained(self, folder, max_shard_bytes, tokenizer_from=tokenizer_from)

    @property
    def text_config(self) -> TextConfig:
        return self.config.text

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: SequenceCache | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] or [B, past + T] (1 = token, 0 = left padding);
        position_ids [B, T] or [3, B, T] overrides the positions derived from the mask;
        logits_to_keep > 0 computes logits for the last that many positions only."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids has no tokens")
        vocab = self.config.text.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids hold ids outside [0, {vocab})")
        h = self.model.embed_tokens(input_ids)
        ctx, advance_cache = dense_context(self.model.rotary, h, cache, position_ids, attention_mask)
        h, router_logits = self.run_layers(h, ctx)
        advance_cache()
        hn = self.model.norm(h if logits_to_keep <= 0 else h[:, -logits_to_keep:])
        return CausalLMOutput(self.lm_head(hn), h, router_logits)

    def run_layers(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder stack on embeddings h [B, T, H]; the context decides where state lives."""
        router_logits = []
        for layer in self.model.layers:
            h, r = layer(h, ctx)
            if r is not None:
                router_logits.append(r)
        return h, router_logits
