"""The decoder stack, the causal-LM head and the MTP block.

    h = embed(ids)
    for each layer:  h += mixer(norm(h));  h += ffn(norm(h))      mixer: Gated DeltaNet (3 of 4) or gated attention
    logits = lm_head(norm(h))                                        ffn: SwiGLU (dense) or sparse MoE
    mtp (optional): drafts the token after next from h and the next token's embedding (see mtp.py)

Every caller runs the model through one contract: ``rope(positions, dtype)`` for the rotary tables of a context,
``hidden_states(ids, ctx)`` for the stack under that context, ``compute_logits(h)`` for the head, and
``mtp_hidden_states`` / ``compute_mtp_logits`` for the MTP block; ``forward`` is the dense API built on them.

Module names equal the text-only checkpoint names (``model.layers.N.linear_attn.in_proj_qkv.weight`` …,
``mtp.fc.weight`` …), so checkpoint I/O is a prefix change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig, TextConfig
from .context import ForwardContext, SequenceCache, dense_context
from .decoder import DecoderLayer
from .linear import Linear
from .mtp import DEFAULT_HIDDEN_SOURCE, MTPHead
from .norm import RMSNorm
from .rope import RotaryEmbedding


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
    """A Qwen3.5 / Qwen3.6 text decoder (dense or MoE), with its MTP block as ``self.mtp`` when it has one.

    Calling it: ``model(input_ids)`` -> ``CausalLMOutput`` (``.logits`` [B, T, vocab]).  A left-padded ragged
    batch with ``attention_mask`` gives each row the logits it would get alone; ``cache=SequenceCache()``
    makes the call incremental (prompt first, then tokens one at a time).

    ``mtp=True`` builds the MTP block (``load_model`` does when the config has MTP layers and the checkpoint
    their weights); it reads ``mtp_hidden_source`` hidden states (see qwen35.model.mtp).
    """

    mtp: MTPHead | None

    def __init__(self, config: ModelConfig, mtp: bool = False,
                 mtp_hidden_source: str = DEFAULT_HIDDEN_SOURCE) -> None:
        super().__init__()
        self.config = config
        cfg = config.text
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # registered even when absent, so a head attached later (training) still takes its place after lm_head
        self.register_module("mtp", MTPHead(cfg, mtp_hidden_source) if mtp else None)
        self.extra_tensors: dict[str, torch.Tensor] = {}  # checkpoint tensors kept aside (vision)

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

    # ------------------------------------------------------------------------------------------------------
    # the contract: what the dense API, the engine and training all run

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (text) or [3, B, T] (T, H, W axes) -> (cos, sin) [B, T, rotary_dim] in ``dtype``, on
        the positions' device: the ``rope`` of a context for :meth:`hidden_states` (dtype: :attr:`dtype`)."""
        return self.model.rotary(positions, dtype)

    def hidden_states(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [B, T] -> the last decoder layer's output [B, T, H], before the final norm.  The context
        decides where state lives and holds the RoPE of the tokens' positions."""
        return self.hidden_states_and_router(input_ids, ctx)[0]

    def hidden_states_and_router(self, input_ids: torch.Tensor, ctx: ForwardContext
                                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`hidden_states` plus one router-logits tensor [B*T, E] per MoE layer (empty for dense models),
        for the load-balancing loss."""
        return self.run_layers(self.model.embed_tokens(input_ids), ctx)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., H] from :meth:`hidden_states` -> logits [..., vocab]: final norm, then lm_head."""
        return self.lm_head(self.model.norm(h))

    def mtp_hidden_states(self, next_ids: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
                          step: int = 0, from_mtp: bool = False) -> torch.Tensor:
        """One MTP draft step under ``ctx`` -> the MTP block output [B, T, H] before ``mtp.norm``.

        ``hidden`` [B, T, H]: :meth:`hidden_states` at positions p (or, ``from_mtp=True``, this method's output of
        the previous draft step, fed back unchanged); ``next_ids`` [B, T]: the token at p + 1.  ``ctx.rope`` is
        ``rope(p)`` — the positions of the hidden states, not of the next tokens — and the block's attention
        calls ``ctx.attend`` with layer index ``mtp.kv_layers[step % len(mtp.kv_layers)]`` (after the main
        layers').  The norm the hidden source asks for (final norm or ``mtp.norm``) is applied inside.
        Logits of the token at p + 2: :meth:`compute_mtp_logits` on the result."""
        return self.mtp_hidden_states_and_router(next_ids, hidden, ctx, step, from_mtp)[0]

    def mtp_hidden_states_and_router(self, next_ids: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
                                     step: int = 0, from_mtp: bool = False
                                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`mtp_hidden_states` plus the block's router logits [B*T, E] (None for a dense FFN)."""
        return self._require_mtp().draft_hidden_and_router(next_ids, hidden, ctx, self.model.embed_tokens,
                                                           self.model.norm, step, from_mtp)

    def compute_mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """MTP block output [..., H] from :meth:`mtp_hidden_states` -> logits [..., vocab]: ``mtp.norm``, then the
        shared lm_head."""
        return self._require_mtp().compute_logits(h, self.lm_head)

    def _require_mtp(self) -> MTPHead:
        if self.mtp is None:
            raise RuntimeError("this model has no MTP block (its checkpoint holds no mtp.* weights, or its config "
                               "has mtp_num_hidden_layers = 0)")
        return self.mtp

    # ------------------------------------------------------------------------------------------------------
    # the dense API

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
        # RoPE in the embedding's dtype: the dtype the layers' activations start in
        ctx, advance_cache = dense_context(self.rope, input_ids, cache, position_ids, attention_mask, self.dtype)
        h, router_logits = self.hidden_states_and_router(input_ids, ctx)
        advance_cache()
        logits = self.compute_logits(h if logits_to_keep <= 0 else h[:, -logits_to_keep:])
        return CausalLMOutput(logits, h, router_logits)

    def run_layers(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder stack on embeddings h [B, T, H]; the context decides where state lives."""
        router_logits = []
        for layer in self.model.layers:
            h, r = layer(h, ctx)
            if r is not None:
                router_logits.append(r)
        return h, router_logits
