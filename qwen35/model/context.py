"""What one forward pass knows besides the weights: positions, padding, and where state lives.

The model holds no request state.  Each layer computes its projections over every token of the call, then
hands the sequence-mixing step to the context:

* ``attend(layer, q, k, v)`` — store this call's keys/values and attend over everything cached;
* ``linear_mix(layer, mixer, qkv, g, beta)`` — run the DeltaNet conv + delta rule (``mixer.mix``) from each
  sequence's saved (conv window, recurrent state) and save the new ones; a context whose states live in a pool
  may instead let ``mixer.mix_step_`` update one decode token in place.

``DenseContext`` serves the model API: a [B, T] batch in lock-step, optionally left-padded, with a contiguous
``SequenceCache``.  The engine provides a paged context with the same two methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


class LinearMixer(Protocol):
    """The stateful half of a DeltaNet layer (qwen35.model.deltanet.GatedDeltaNet implements it)."""

    def mix(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, window: torch.Tensor | None,
            state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [b, t, C], g/beta [b, t, Hv], window/state or None (zeros) -> (o [b, t, Hv, dv], window, state)."""
        ...

    def mix_step_(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, windows: torch.Tensor,
                  states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token for n sequences whose windows/states are rows ``slots`` of pools, updated in place:
        qkv [n, C], g/beta [n, Hv] -> o [n, Hv, dv]."""
        ...


class ForwardContext(ABC):
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, T, rotary_dim]
    token_mask: torch.Tensor | None = None  # [B, T] bool, False = padding

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, d], k/v [B, T, Hkv, d] (RoPE applied) -> o [B, T, H, d]."""

    @abstractmethod
    def linear_mix(self, layer: int, mixer: LinearMixer, qkv: torch.Tensor, g: torch.Tensor,
                   beta: torch.Tensor) -> torch.Tensor:
        """qkv [B, T, C] before the conv, g/beta [B, T, Hv] -> o [B, T, Hv, dv]; saves the new state."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, Hkv, L, d]; grouped-query attention with scale d^-1/2."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


@dataclass
class SequenceCache:
    """Contiguous per-batch cache: KV for attention layers, conv window + fp32 recurrent state for DeltaNet.

    ``valid`` records which cached positions hold real tokens (False for left padding), so later steps keep
    masking them out.
    """

    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, Hkv, L, d]
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None  # [B, length] bool
    length: int = 0  # positions filled so far (including padding)
    next_position: torch.Tensor | None = None  # [B] RoPE position of each row's next token


@dataclass
class DenseContext(ForwardContext):
    rope: tuple[torch.Tensor, torch.Tensor]
    cache: SequenceCache | None = None
    token_mask: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None  # [B, past + T] bool over all keys; None = all valid
    past: int = 0  # cached positions before this call's tokens

    def attention_mask(self, total: int) -> torch.Tensor | None:
        """Boolean [B, 1, T, total] mask, or None when plain causal attention is exact."""
        if self.key_mask is None and (self.past == 0 or total - self.past == 1):
            return None
        device = self.rope[0].device
        qpos = torch.arange(self.past, total, device=device)[:, None]
        kpos = torch.arange(total, device=device)[None, :]
        mask = kpos <= qpos
        if self.key_mask is not None:
            # a padded query keeps its own key so its row is never all -inf (no NaN to leak through V later)
            mask = (mask[None] & self.key_mask[:, None, :]) | (kpos == qpos)[None]
        return mask[:, None] if mask.dim() == 3 else mask

    def attend(self, layer, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        c = self.cache
        if c is not None:
            if layer in c.keys:
                k = torch.cat([c.keys[layer], k], dim=2)
                v = torch.cat([c.values[layer], v], dim=2)
            c.keys[layer], c.values[layer] = k, v
        o = sdpa(q, k, v, self.attention_mask(k.shape[2]), causal=q.shape[2] > 1)
        return o.transpose(1, 2)

    def linear_mix(self, layer, mixer, qkv, g, beta):
        c = self.cache
        window, state = (c.windows.get(layer), c.states.get(layer)) if c is not None else (None, None)
        o, window, state = mixer.mix(qkv, g, beta, window, state)
        if c is not None:
            c.windows[layer], c.states[layer] = window, state
        return o


RopeFn = Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


def dense_context(rope: RopeFn, x: torch.Tensor, cache: SequenceCache | None = None,
                  position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None):
    """The DenseContext of a [B, T] call (the main model's or the MTP head's), and a function that advances
    the cache's bookkeeping once the layers ran.

    ``x`` is any [B, T, ...] tensor of the call (token ids or activations): it gives the batch, the length and
    the device; the RoPE tables are made in ``dtype`` (default ``x.dtype``), the dtype of the activations.

    Positions follow the mask: a left-padded row's first real token is at position 0 (or the cache's next
    position), so each row of a padded batch sees exactly what it would see alone."""
    B, T = x.shape[:2]
    past = cache.length if cache is not None else 0
    token_mask = None
    if attention_mask is not None:
        if attention_mask.shape[0] != B or attention_mask.shape[-1] not in (T, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected [{B}, {T}] or "
                             f"[{B}, {past + T}]")
        token_mask = attention_mask[:, -T:].bool()
        if bool(token_mask.all()):
            token_mask = None
    key_mask = None
    if cache is not None and (cache.valid is not None or token_mask is not None):
        old = cache.valid if cache.valid is not None else torch.ones(B, past, dtype=torch.bool, device=x.device)
        new = token_mask if token_mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        key_mask = torch.cat([old.to(new.device), new], dim=1)
    elif token_mask is not None:
        key_mask = token_mask
    if position_ids is None:
        start = cache.next_position if cache is not None and cache.next_position is not None else \
            torch.zeros(B, dtype=torch.long, device=x.device)
        if token_mask is None:
            position_ids = start[:, None] + torch.arange(T, device=x.device)
        else:
            position_ids = start[:, None] + (token_mask.long().cumsum(1) - 1).clamp(min=0)
    last_position = position_ids[..., -1] if position_ids.dim() == 2 else position_ids[0, :, -1]
    rope_tables = rope(position_ids, x.dtype if dtype is None else dtype)
    ctx = DenseContext(rope=rope_tables, cache=cache, token_mask=token_mask, key_mask=key_mask, past=past)

    def finish() -> None:
        if cache is not None:
            cache.length = past + T
            cache.valid = key_mask
            cache.next_position = last_position + 1

    return ctx, finish
