"""The hybrid cache: paged KV blocks for the attention layers, fixed state slots for the DeltaNet layers.

This is the only owner of cache memory.  A sequence holds one state slot (conv window + recurrent state of
every DeltaNet layer, fixed size whatever its length) and a block table: the KV blocks that hold its keys and
values, ``block_size`` tokens each, in every attention layer.  Sizes come from a memory budget with the same
arithmetic ``qwen35 info`` prints (``qwen35.memory``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..memory import kv_bytes_per_token, state_bytes_per_sequence

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SSM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheCapacityError(ValueError):
    """A request that can never fit the cache (too long for every block there is)."""


@dataclass(frozen=True)
class CacheLayout:
    num_blocks: int
    block_size: int
    num_slots: int
    block_bytes: int  # KV bytes of one block across all attention layers
    slot_bytes: int  # DeltaNet state bytes of one sequence across all DeltaNet layers

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.num_slots * self.slot_bytes

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size


def plan_cache(config: ModelConfig, cache_memory: int, max_num_seqs: int, block_size: int,
               dtype: torch.dtype) -> CacheLayout:
    """Split ``cache_memory`` bytes: one state slot per concurrent sequence, the rest KV blocks."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    name = _DTYPE_NAMES[dtype]
    block_bytes = kv_bytes_per_token(config, name) * block_size
    slot_bytes = state_bytes_per_sequence(config, name).total
    left = cache_memory - max_num_seqs * slot_bytes
    num_blocks = left // block_bytes if block_bytes else 0
    if num_blocks < 1:
        need = max_num_seqs * slot_bytes + block_bytes
        raise ValueError(f"cache_memory {cache_memory / 2**20:.1f} MiB is too small: {max_num_seqs} sequences need "
                         f"{max_num_seqs * slot_bytes / 2**20:.1f} MiB of DeltaNet state plus at least one KV "
                         f"block ({block_bytes / 2**20:.2f} MiB); give at least {need / 2**20:.1f} MiB or fewer "
                         "max_num_seqs")
    return CacheLayout(int(num_blocks), block_size, max_num_seqs, block_bytes, slot_bytes)


class KVBlockPool:
    """KV of every attention layer in ``num_blocks`` blocks of ``block_size`` token rows.

    Stored flat per layer ([num_blocks · block_size, kv_heads, head_dim]) so that a token's row is
    ``block · block_size + offset`` and writes / gathers are single index operations.
    """

    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: str = "cpu") -> None:
        t = config.text
        self.block_size = layout.block_size
        self.num_blocks = layout.num_blocks
        rows = layout.num_blocks * layout.block_size
        self.keys = {i: torch.zeros(rows, t.num_key_value_heads, t.head_dim, dtype=dtype, device=device)
                     for i in t.full_attention_layers}
        self.values = {i: torch.zeros_like(k) for i, k in self.keys.items()}
        self._free = list(range(layout.num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class StateSlotPool:
    """Conv windows and recurrent states of every DeltaNet layer for ``num_slots`` sequences."""

    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: str = "cpu") -> None:
        t = config.text
        ssm = _SSM_DTYPES[t.mamba_ssm_dtype]
        n = layout.num_slots
        self.windows = {i: torch.zeros(n, t.linear_conv_dim, t.linear_conv_kernel_dim - 1, dtype=dtype,
                                       device=device) for i in t.linear_attention_layers}
        self.states = {i: torch.zeros(n, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim,
                                      dtype=ssm, device=device) for i in t.linear_attention_layers}
        self.num_slots = n
        self._free = list(range(n - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free DeltaNet state slot")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        # zeroed on release: whatever runs in this slot next starts from the empty state
        for w in self.windows.values():
            w[slot].zero_()
        for s in self.states.values():
            s[slot].zero_()
        self._free.append(slot)


class HybridCache:
    """Allocation of blocks and slots to sequences (by id). Holds the tensors; knows nothing of scheduling."""

    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: str = "cpu") -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.kv = KVBlockPool(config, layout, dtype, device)
        self.slots = StateSlotPool(config, layout, dtype, device)
        self.block_tables: dict[int, list[int]] = {}
        self.slot_of: dict[int, int] = {}
        # DeltaNet state after each verified token of a speculative step, (seq id, token index) -> {layer:
        # (window, state)}: what a sequence is rewound to when a draft token is rejected.  Lives for one step.
        self._step_states: dict[tuple[int, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def from_budget(cls, config: ModelConfig, cache_memory: int, max_num_seqs: int, block_size: int,
                    dtype: torch.dtype, device: str = "cpu") -> "HybridCache":
        return cls(config, plan_cache(config, cache_memory, max_num_seqs, block_size, dtype), dtype, device)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def check_fits(self, tokens: int) -> None:
        """Raise if a sequence of ``tokens`` could never be held, even with the whole cache to itself."""
        if self.blocks_for(tokens) > self.layout.num_blocks:
            raise CacheCapacityError(f"a sequence of {tokens} tokens needs {self.blocks_for(tokens)} KV blocks but "
                                     f"the cache has {self.layout.num_blocks} ({self.layout.max_tokens} tokens); "
                                     "raise cache_memory or shorten the prompt / max_tokens")

    # -- allocation -------------------------------------------------------------------------------------------
    def has_slot(self, seq_id: int) -> bool:
        return seq_id in self.slot_of

    def can_admit(self, tokens: int) -> bool:
        return self.slots.num_free > 0 and self.kv.num_free >= self.blocks_for(tokens)

    def admit(self, seq_id: int) -> int:
        slot = self.slots.take()
        self.slot_of[seq_id] = slot
        self.block_tables[seq_id] = []
        return slot

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Make room for ``tokens`` positions in total; False (nothing taken) if the pool is short."""
        table = self.block_tables[seq_id]
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > self.kv.num_free:
            return False
        table.extend(self.kv.take(need))
        return True

    def release(self, seq_id: int) -> None:
        """Free a sequence's blocks and slot at once (finish, abort or preemption)."""
        if seq_id in self.block_tables:
            self.kv.give_back(self.block_tables.pop(seq_id))
        if seq_id in self.slot_of:
            self.slots.give_back(self.slot_of.pop(seq_id))

    # -- speculative steps ------------------------------------------------------------------------------------
    def save_step(self, layer: int, step: int, seq_ids: list[int]) -> None:
        """Keep the DeltaNet state of ``layer`` of these sequences as it is after token ``step`` of this step."""
        windows, states = self.slots.windows[layer], self.slots.states[layer]
        for seq_id in seq_ids:
            slot = self.slot_of[seq_id]
            self._step_states.setdefault((seq_id, step), {})[layer] = (windows[slot].clone(), states[slot].clone())

    def rewind(self, seq_id: int, step: int) -> None:
        """Put a sequence's DeltaNet state back to what it was after token ``step`` of this step (its KV rows past
        that token are simply overwritten later: attention reads only up to a sequence's length)."""
        slot = self.slot_of[seq_id]
        for layer, (window, state) in self._step_states[(seq_id, step)].items():
            self.slots.windows[layer][slot].copy_(window)
            self.slots.states[layer][slot].copy_(state)

    def end_step(self) -> None:
        self._step_states.clear()

    # -- addressing -------------------------------------------------------------------------------------------
    def token_rows(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat KV rows of positions [start, end) of a sequence."""
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, end)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    # -- accounting -------------------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        return {"blocks_total": self.layout.num_blocks, "blocks_used": self.layout.num_blocks - self.kv.num_free,
                "slots_total": self.slots.num_slots, "slots_used": self.slots.num_slots - self.slots.num_free}

    def nbytes(self) -> int:
        """Bytes actually allocated; equals ``layout.total_bytes`` (tested)."""
        tensors = [*self.kv.keys.values(), *self.kv.values.values(), *self.slots.windows.values(),
                   *self.slots.states.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
