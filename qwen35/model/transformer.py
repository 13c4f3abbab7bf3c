"""The decoder stack, the causal-LM head, the MTP block and the vision tower's place in front of them.

    v = visual(pixels)                                               (optional) one row per image / video token
    h = embed(ids), with v written over the image / video pad tokens
    for each layer:  h += mixer(norm(h));  h += ffn(norm(h))      mixer: Gated DeltaNet (3 of 4) or gated attention
    logits = lm_head(norm(h))                                        ffn: SwiGLU (dense) or sparse MoE
    mtp (optional): drafts the token after next from h and the next token's embedding (see mtp.py)

Every caller runs the model through one contract: ``rope(positions, dtype)`` for the rotary tables of a context,
``hidden_states(ids, ctx)`` for the stack under that context, ``compute_logits(h)`` for the head, and
``mtp_hidden_states`` / ``compute_mtp_logits`` for the MTP block; ``forward`` is the dense API built on them.
Images and videos enter through ``encode_vision`` and ``embed`` (the result goes to ``hidden_states`` as
``inputs_embeds``), with M-RoPE positions from qwen35.model.mrope.

Module names equal the text-only checkpoint names (``model.layers.N.linear_attn.in_proj_qkv.weight`` …,
``mtp.fc.weight`` …; the tower's ``visual.*`` are ``model.visual.*`` on disk), so checkpoint I/O is a prefix
change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig, TextConfig
from .context import ForwardContext, SequenceCache, dense_context
from .decoder import DecoderLayer
from .linear import Linear
from .mrope import mrope_positions_batch
from .mtp import DEFAULT_HIDDEN_SOURCE, MTPHead
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .vision import VisionTower


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

    ``vision=True`` builds the vision tower as ``self.visual`` (``load_model`` does when the config has a
    ``vision_config`` and the checkpoint ``model.visual.*`` weights); ``model(ids, pixel_values=...,
    image_grid_thw=...)`` then takes images as transformers' Qwen3.5 does.
    """

    mtp: MTPHead | None
    visual: VisionTower | None

    def __init__(self, config: ModelConfig, mtp: bool = False,
                 mtp_hidden_source: str = DEFAULT_HIDDEN_SOURCE, vision: bool = False) -> None:
        super().__init__()
        self.config = config
        cfg = config.text
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # registered even when absent, so a head attached later (training) still takes its place after lm_head
        self.register_module("mtp", MTPHead(cfg, mtp_hidden_source) if mtp else None)
        if vision and config.vision is None:
            raise ValueError(f"{config.source}: vision=True needs a vision_config, and this config has none")
        self.register_module("visual", VisionTower(config.vision) if vision else None)
        self.extra_tensors: dict[str, torch.Tensor] = {}  # checkpoint tensors kept aside (MTP without MTP layers)

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

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Images or videos as the processor gives them (``pixel_values`` [patches, C·T·P·P], ``grid_thw``
        [n, 3]) -> their token embeddings [tokens, H] in the model's dtype, one row per pad token, image after
        image: the ``vision_embeds`` of :meth:`embed`."""
        visual = self._require_visual()
        return visual(pixel_values.to(visual.dtype), grid_thw).to(self.dtype)

    def embed(self, input_ids: torch.Tensor, vision_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [..., H] of input_ids [...], with the rows of ``vision_embeds`` [n, H] written, in
        order, over the n image / video pad tokens (row-major over a batch): pass the images and videos encoded
        in the order their pad tokens appear.  Without ``vision_embeds`` pad tokens keep their own embedding."""
        h = self.model.embed_tokens(input_ids)
        if vision_embeds is None:
            return h
        pads = self._pad_mask(input_ids)
        n = int(pads.sum())
        if vision_embeds.dim() != 2 or vision_embeds.shape != (n, h.shape[-1]):
            raise ValueError(f"input_ids hold {n} image/video pad tokens (ids {self.config.image_token_id}, "
                             f"{self.config.video_token_id}) but vision_embeds has shape "
                             f"{tuple(vision_embeds.shape)}; expected [{n}, {h.shape[-1]}]")
        return h.masked_scatter(pads[..., None], vision_embeds.to(h.dtype))

    def hidden_states(self, input_ids: torch.Tensor | None, ctx: ForwardContext,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> the last decoder layer's output [B, T, H], before the final norm.  The context
        decides where state lives and holds the RoPE of the tokens' positions.  ``inputs_embeds`` [B, T, H]
        (from :meth:`embed`, with images in them) replaces the embedding of input_ids."""
        return self.hidden_states_and_router(input_ids, ctx, inputs_embeds)[0]

    def hidden_states_and_router(self, input_ids: torch.Tensor | None, ctx: ForwardContext,
                                 inputs_embeds: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`hidden_states` plus one router-logits tensor [B*T, E] per MoE layer (empty for dense models),
        for the load-balancing loss."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.model.embed_tokens(input_ids)
        return self.run_layers(inputs_embeds, ctx)

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

    def _require_visual(self) -> VisionTower:
        if self.visual is None:
            why = ("its config has no vision_config" if self.config.vision is None
                   else "its checkpoint holds no model.visual.* weights")
            raise ValueError(f"this model has no vision tower ({why}), so it cannot take images or videos")
        return self.visual

    def _pad_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where the image / video pad tokens are (bool, input_ids' shape)."""
        ids = [i for i in (self.config.image_token_id, self.config.video_token_id) if i is not None]
        if not ids:
            raise ValueError(f"{self.config.source}: the config names no image_token_id / video_token_id")
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

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
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] or [B, past + T] (1 = token, 0 = left padding);
        position_ids [B, T] or [3, B, T] overrides the positions derived from the mask;
        logits_to_keep > 0 computes logits for the last that many positions only.

        Images and videos (transformers' names and shapes, as its processor gives them): ``pixel_values`` /
        ``pixel_values_videos`` [patches, C·T·P·P] with ``image_grid_thw`` / ``video_grid_thw`` [n, 3], in the
        order their pad tokens appear (row after row of the batch).  With grids given, positions are M-RoPE
        (qwen35.model.mrope), continuing from the cache's next position; a cache continues after the largest
        position, as transformers' rope_deltas do."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids has no tokens")
        vocab = self.config.text.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids hold ids outside [0, {vocab})")
        vision_embeds = self._vision_embeds(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                            video_grid_thw)
        multimodal_positions = position_ids is None and (image_grid_thw is not None or video_grid_thw is not None)
        if multimodal_positions:
            position_ids = self._mrope_positions(input_ids, image_grid_thw, video_grid_thw, attention_mask, cache)
        # RoPE in the embedding's dtype: the dtype the layers' activations start in
        ctx, advance_cache = dense_context(self.rope, input_ids, cache, position_ids, attention_mask, self.dtype)
        h, router_logits = self.hidden_states_and_router(input_ids, ctx, self.embed(input_ids, vision_embeds))
        advance_cache()
        if multimodal_positions and cache is not None:
            # the next token follows the largest position of any axis, not the temporal axis' last one
            cache.next_position = position_ids.amax(dim=(0, 2)) + 1
        logits = self.compute_logits(h if logits_to_keep <= 0 else h[:, -logits_to_keep:])
        return CausalLMOutput(logits, h, router_logits)

    def _vision_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                       image_grid_thw: torch.Tensor | None, pixel_values_videos: torch.Tensor | None,
                       video_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
        """The rows :meth:`embed` writes over the pad tokens: image rows at image pads, video rows at video pads,
        both kinds interleaved in the order of the tokens."""
        given = [(pixel_values, image_grid_thw, "pixel_values", "image_grid_thw", self.config.image_token_id),
                 (pixel_values_videos, video_grid_thw, "pixel_values_videos", "video_grid_thw",
                  self.config.video_token_id)]
        if all(pixels is None for pixels, *_ in given):
            return None
        self._require_visual()
        pads = self._pad_mask(input_ids)
        out = None
        for pixels, grid, name, grid_name, token in given:
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{name} needs {grid_name} (the processor returns both)")
            rows = self.encode_vision(pixels, grid)
            at = (input_ids == token)[pads]  # which of the pad tokens, in order, are this kind's
            if int(at.sum()) != rows.shape[0]:
                raise ValueError(f"input_ids hold {int(at.sum())} pad tokens of id {token} but {name} with "
                                 f"{grid_name} gives {rows.shape[0]} embeddings")
            if out is None:
                out = rows.new_zeros(int(pads.sum()), rows.shape[1])
            out[at] = rows
        if out is not None and out.shape[0] != int(pads.sum()):
            raise ValueError("input_ids hold image and video pad tokens, but only one kind of pixels was given")
        return out

    def _mrope_positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                         video_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None,
                         cache: SequenceCache | None) -> torch.Tensor:
        """[3, B, T] M-RoPE positions of this call's tokens, after what the cache holds."""
        vision = self.config.vision
        if vision is None or self.config.image_token_id is None or self.config.video_token_id is None:
            raise ValueError(f"{self.config.source}: image/video grids need a multimodal config (vision_config, "
                             "image_token_id, video_token_id)")
        T = input_ids.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        positions, _ = mrope_positions_batch(input_ids, image_grid_thw, video_grid_thw, self.config.image_token_id,
                                             self.config.video_token_id, vision.spatial_merge_size, mask)
        if cache is not None and cache.next_position is not None:
            start = cache.next_position.to(positions.device)[None, :, None]
            positions = positions + start
        return positions

    def run_layers(self, h: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder stack on embeddings h [B, T, H]; the context decides where state lives."""
        router_logits = []
        for layer in self.model.layers:
            h, r = layer(h, ctx)
            if r is not None:
                router_logits.append(r)
        return h, router_logits
