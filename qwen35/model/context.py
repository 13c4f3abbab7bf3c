"""What one forward pass knows besides the weights: positions, padding, and where state lives.

The model holds no request state.  ``ForwardContext`` carries the per-call inputs (RoPE tables, which tokens
are padding) and a cache object that owns the state.  ``SequenceCache`` is the simple contiguous cache of
the model API (a batch of sequences processed in lock-step); the engine supplies its own paged cache with
the same three methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import TextConfig


class StateCache(Protocol):
    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def linear_state(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...
    def set_linear_state(self, layer: int, window: torch.Tensor, state: torch.Tensor) -> None: ...


@dataclass
class SequenceCache:
    """Contiguous per-batch cache: KV for attention layers, conv window + fp32 recurrent state for DeltaNet.

    ``valid`` records which cached positions hold real tokens (False for left padding), so later steps keep
    masking them out.
    """

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None  # [B, length] bool
    length: int = 0  # positions filled so far (including padding)
    next_position: torch.Tensor | None = None  # [B] RoPE position of each row's next token

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def linear_state(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.windows.get(layer), self.states.get(layer)

    def set_linear_state(self, layer: int, window: torch.Tensor, state: torch.Tensor) -> None:
        self.windows[layer], self.states[layer] = window, state

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only / reorder batch rows (e.g. after beam selection or dropping finished rows)."""
        for d in (self.keys, self.values, self.windows, self.states):
            for i in d:
                d[i] = d[i].index_select(0, rows)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, rows)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, rows)


@dataclass
class ForwardContext:
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, T, rotary_dim]
    cache: StateCache | None = None
    token_mask: torch.Tensor | None = None  # [B, T] bool, False = padding; None = no padding
    key_mask: torch.Tensor | None = None  # [B, L_total] bool over past + new keys; None = all valid
    past: int = 0  # keys before this call's tokens

    def attention_mask(self, total: int) -> torch.Tensor | None:
        """Boolean [B, 1, T, total] mask, or None when plain causal attention is exact."""
        if self.key_mask is None and self.past == 0:
            return None
        T = total - self.past
        device = self.rope[0].device
        qpos = torch.arange(self.past, total, device=device)[:, None]
        kpos = torch.arange(total, device=device)[None, :]
        mask = (kpos <= qpos)[None]
        if self.key_mask is not None:
            # a padded query keeps its own key so its row is never all -inf (no NaN to leak through V later)
            mask = (mask & self.key_mask[:, None, :]) | (kpos == qpos)[None]
        elif T == 1:
            return None  # one new token sees every cached key
        return mask[:, None]
