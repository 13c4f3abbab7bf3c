"""The hybrid cache: paged KV blocks for the attention layers, fixed state slots for the DeltaNet layers.

This is the only owner of cache memory.  A sequence holds one state slot (conv window + recurrent state of
every DeltaNet layer, fixed size whatever its length) and a block table: the KV blocks that hold its keys and
values, ``block_size`` tokens each, in every attention layer.  Sizes come from a memory budget with the same
arithmetic ``qwen35 info`` prints (``qwen35.memory``).  Which block holds what is decided in ``blocks.py`` (plain
Python); this module holds the tensors and does the copies.

Prefix caching: a snapshot of the DeltaNet state after a token prefix is stored *in KV blocks* of the same pool
(``CacheLayout.snapshot_blocks`` of them, the state's bytes laid over the blocks' rows in every attention layer),
next to the KV blocks of that prefix, which it pins.  So snapshots and KV share one budget and one LRU: the cache
holds as many snapshots as the memory sequences leave unused, gives them up when sequences need the room, and
the budget (and ``nbytes()``) is exactly what it was without prefix caching.  A sequence resuming from a snapshot
shares its full KV blocks, gets its partial last block copied, and has the state copied into its slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..memory import kv_bytes_per_token, state_bytes_per_sequence
from .blocks import BlockManager, Snapshot, extend_hashes, root_hash
from .kv_quant import LayerKV, check_kv_cache_dtype, memory_name, storage_dtype

if TYPE_CHECKING:
    from .sequence import Sequence

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

    @property
    def snapshot_blocks(self) -> int:
        """KV blocks one prefix-cache snapshot (a sequence's DeltaNet state) occupies."""
        return -(-self.slot_bytes // self.block_bytes) if self.block_bytes else 0

    @property
    def snapshot_interval(self) -> int:
        """Tokens between the snapshots taken inside a long prompt.  As many as a snapshot's blocks hold: so the
        snapshots of a prompt never take more memory than its KV does (a denser grid would mostly fill the cache
        with states; a sparser one recomputes more of a prompt that diverges from a cached one)."""
        return self.snapshot_blocks * self.block_size


def plan_cache(config: ModelConfig, cache_memory: int, max_num_seqs: int, block_size: int,
               dtype: torch.dtype, kv_cache_dtype: str = "auto") -> CacheLayout:
    """Split ``cache_memory`` bytes: one state slot per concurrent sequence, the rest KV blocks (stored as
    ``kv_cache_dtype``: see kv_quant.py)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    name = _DTYPE_NAMES[dtype]
    block_bytes = kv_bytes_per_token(config, memory_name(kv_cache_dtype, dtype)) * block_size
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
    ``block · block_size + offset`` and writes / gathers are single index operations.  A quantized cache
    (``kv_cache_dtype`` int8 / fp8) keeps int8 / float8_e4m3fn pools and their scales ([rows, kv_heads] float32,
    ``key_scales`` / ``value_scales``) on the same rows.
    """

    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: str = "cpu",
                 kv_cache_dtype: str = "auto") -> None:
        t = config.text
        self.block_size = layout.block_size
        self.num_blocks = layout.num_blocks
        rows = layout.num_blocks * layout.block_size
        stored = storage_dtype(kv_cache_dtype, dtype)
        self.layers = {i: LayerKV.allocate(rows, t.num_key_value_heads, t.head_dim, stored, device)
                       for i in t.full_attention_layers}
        self.keys = {i: kv.keys for i, kv in self.layers.items()}
        self.values = {i: kv.values for i, kv in self.layers.items()}
        self.key_scales = {i: kv.key_scales for i, kv in self.layers.items() if kv.quantized}
        self.value_scales = {i: kv.value_scales for i, kv in self.layers.items() if kv.quantized}
        self.blocks = BlockManager(layout.num_blocks, layout.block_size)  # HybridCache puts its own here

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get (free, or held only by the prefix cache, which gives them up)."""
        return self.blocks.num_available


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
    """Allocation of blocks and slots to sequences (by id), and the prefix cache.  Holds the tensors; knows nothing
    of scheduling.  ``prefix_caching``: keep snapshots of finished prefixes and resume new sequences from them.
    ``kv_cache_dtype``: "auto" (keys and values in the model dtype), "int8" or "fp8" (kv_quant.py)."""

    def __init__(self, config: ModelConfig, layout: CacheLayout, dtype: torch.dtype, device: str = "cpu",
                 prefix_caching: bool = False, kv_cache_dtype: str = "auto") -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.kv = KVBlockPool(config, layout, dtype, device, kv_cache_dtype)
        self.slots = StateSlotPool(config, layout, dtype, device)
        self.prefix_caching = bool(prefix_caching) and layout.snapshot_blocks > 0
        self.blocks = BlockManager(layout.num_blocks, layout.block_size,
                                   layout.snapshot_blocks if self.prefix_caching else 0)
        self.kv.blocks = self.blocks
        self.block_tables: dict[int, list[int]] = self.blocks.tables
        self.slot_of: dict[int, int] = {}
        # tokens between snapshots inside a long prompt (0: none but the prompt end); tests set it lower
        self.snapshot_interval = layout.snapshot_interval
        self._root = root_hash("qwen35", config.source, config.model_type, _DTYPE_NAMES[dtype], layout.block_size,
                               *(() if kv_cache_dtype == "auto" else (f"kv-{kv_cache_dtype}",)))
        self._linear_layers = list(config.text.linear_attention_layers)
        # tensors laid out like a K / V pool (row = block * block_size + offset) that others keep per position, e.g.
        # an MTP drafter's own KV: a sequence resumed from a snapshot gets their tail rows copied too
        self.shadow_kv: list[torch.Tensor] = []
        # every attention layer's K and V pool (and their scales) as rows of bytes: where snapshots' states are laid
        self._kv_rows = [t.view(torch.uint8).view(t.shape[0], -1) for t in (
            *self.kv.keys.values(), *self.kv.values.values(), *self.kv.key_scales.values(),
            *self.kv.value_scales.values())]
        # DeltaNet state after each verified token of a speculative step, (seq id, token index) -> {layer:
        # (window, state)}: what a sequence is rewound to when a draft token is rejected.  Lives for one step.
        self._step_states: dict[tuple[int, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        # DeltaNet states a prompt chunk passed on its way, (seq_id, length) -> layer -> (window, state), kept
        # until the scheduler has made snapshots of them
        self._kept_states: dict[tuple[int, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def from_budget(cls, config: ModelConfig, cache_memory: int, max_num_seqs: int, block_size: int,
                    dtype: torch.dtype, device: str = "cpu", prefix_caching: bool = False,
                    kv_cache_dtype: str = "auto") -> "HybridCache":
        return cls(config, plan_cache(config, cache_memory, max_num_seqs, block_size, dtype, kv_cache_dtype), dtype,
                   device, prefix_caching, kv_cache_dtype)

    def layer_kv(self, layer: int) -> LayerKV:
        """The K / V rows (and scales) of an attention layer."""
        return self.kv.layers[layer]

    def new_layer_kv(self) -> LayerKV:
        """Zeroed K / V rows in this cache's format and row layout, for a caller that keeps a layer's KV itself
        (the MTP drafter); add its ``tensors()`` to ``shadow_kv`` so prefix-cache hits copy them too."""
        like = next(iter(self.kv.layers.values()))
        return LayerKV.allocate(like.keys.shape[0], like.keys.shape[1], like.keys.shape[2], like.keys.dtype,
                                str(like.keys.device))

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

    def can_admit(self, tokens: int, hit: Snapshot | None = None) -> bool:
        """A slot and blocks for ``tokens`` positions, for a new sequence (resuming from ``hit`` if given)."""
        if self.slots.num_free == 0:
            return False
        if hit is not None:
            return self.blocks.can_attach(hit, tokens)
        return self.blocks.num_available >= self.blocks_for(tokens)

    def admit(self, seq_id: int) -> int:
        slot = self.slots.take()
        self.slot_of[seq_id] = slot
        self.blocks.open(seq_id)
        return slot

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Make room for ``tokens`` positions in total (the prefix cache gives up snapshots for it); False (nothing
        taken) if the pool is short."""
        return self.blocks.grow(seq_id, tokens)

    def release(self, seq_id: int) -> None:
        """Free a sequence's blocks and slot at once (finish, abort or preemption).  Blocks a snapshot pins stay."""
        self.blocks.release(seq_id)
        if seq_id in self.slot_of:
            self.slots.give_back(self.slot_of.pop(seq_id))

    # -- prefix cache -----------------------------------------------------------------------------------------
    def hashes(self, seq: Sequence) -> list[bytes]:
        """Chain hashes of every full block of the sequence's tokens (kept on the sequence, extended as it grows)."""
        if not seq.block_hashes:
            seq.block_hashes.append(self._root)
        return extend_hashes(seq.block_hashes, seq.cache_ids, self.block_size)

    def lookup(self, seq: Sequence) -> Snapshot | None:
        """The snapshot of the longest cached prefix of the sequence's tokens that leaves one token to compute (its
        logits give the next token)."""
        if not self.prefix_caching or self.blocks.num_snapshots == 0:
            return None
        return self.blocks.lookup(seq.cache_ids, self.hashes(seq), seq.length - 1)

    def has_snapshot(self, seq: Sequence, length: int) -> bool:
        return self.blocks.find(seq.cache_ids, self.hashes(seq), length) is not None

    def resume(self, seq: Sequence, snap: Snapshot) -> None:
        """Start an admitted sequence (empty block table, zeroed slot) at the end of ``snap``'s prefix: its KV shared
        (the partial last block copied), its DeltaNet state copied into the slot.  The caller sets num_computed."""
        copy = self.blocks.attach(seq.seq_id, snap)
        bs = self.block_size
        if copy is not None:
            src, dst = copy
            n = snap.length % bs  # the tail's rows; the rest of the block is written by the sequence itself
            for t in (*self._kv_rows, *self.shadow_kv):
                t[dst * bs:dst * bs + n].copy_(t[src * bs:src * bs + n])
        slot = self.slot_of[seq.seq_id]
        self._read_state_into(snap.state_blocks, [t.view(-1).view(torch.uint8) for layer in self._linear_layers
                                                  for t in (self.slots.windows[layer][slot],
                                                            self.slots.states[layer][slot])])

    def snapshot(self, seq: Sequence, length: int, step: int | None = None) -> bool:
        """Keep the sequence's state after its first ``length`` tokens as a snapshot (its KV blocks pinned).  The
        state is the one a prompt chunk kept at ``length`` on its way (:meth:`keep_state`), or with ``step`` the one
        kept after token ``step`` of this speculative step, or else the slot's (which must then be exactly after
        ``length`` tokens).  False if it was cached already or there is no room."""
        if not self.prefix_caching:
            return False
        snap = self.blocks.capture(seq.seq_id, seq.cache_ids, self.hashes(seq), length)
        if snap is None:
            return False
        saved = self._step_states.get((seq.seq_id, step)) if step is not None else \
            self._kept_states.get((seq.seq_id, length))
        slot = self.slot_of[seq.seq_id]
        parts = []
        for layer in self._linear_layers:
            pair = saved[layer] if saved is not None else (self.slots.windows[layer][slot],
                                                           self.slots.states[layer][slot])
            parts += [t.contiguous().view(-1).view(torch.uint8) for t in pair]
        self._write_state(snap.state_blocks, parts)
        return True

    def _state_regions(self, blocks: list[int]) -> list[torch.Tensor]:
        """Where a snapshot's state bytes live: each K / V pool's rows of ``blocks``, pool by pool, block by block,
        as contiguous byte views (a block's rows are adjacent in every pool; pools may differ in width: a
        quantized cache's scale pools are narrower than its K / V pools)."""
        bs = self.block_size
        runs: list[tuple[int, int]] = []  # runs of consecutive block ids, one view each (fresh blocks usually are)
        for b in blocks:
            if runs and runs[-1][1] == b:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        return [pool[lo * bs:hi * bs].view(-1) for pool in self._kv_rows for lo, hi in runs]

    @staticmethod
    def _stream_copy(srcs: list[torch.Tensor], dsts: list[torch.Tensor]) -> int:
        """Copy the bytes of ``parts`` (``srcs`` when writing, ``dsts`` when reading) between the parts laid end to
        end and a snapshot's regions laid end to end (1-D uint8 views), piece by piece: no staging buffer, and
        region bytes past the parts are left as they are.  (A zeroed staging buffer of the whole state — 19.6 MB
        for the 0.8B shape — and one index_copy_ per pool cost ~30-40 ms per snapshot.)"""
        need = min(sum(t.numel() for t in srcs), sum(t.numel() for t in dsts))
        si = di = s_off = d_off = 0
        while si < len(srcs) and di < len(dsts):
            src, dst = srcs[si], dsts[di]
            n = min(src.numel() - s_off, dst.numel() - d_off)
            dst[d_off:d_off + n].copy_(src[s_off:s_off + n])
            s_off += n
            d_off += n
            if s_off == src.numel():
                si, s_off = si + 1, 0
            if d_off == dst.numel():
                di, d_off = di + 1, 0
        return need

    def _write_state(self, blocks: list[int], parts: list[torch.Tensor]) -> None:
        if self._stream_copy(parts, self._state_regions(blocks)) < sum(p.numel() for p in parts):
            raise RuntimeError("a snapshot's state does not fit its blocks")

    def _read_state_into(self, blocks: list[int], parts: list[torch.Tensor]) -> None:
        if self._stream_copy(self._state_regions(blocks), parts) < sum(p.numel() for p in parts):
            raise RuntimeError("a snapshot's blocks hold less than a state")

    def keep_state(self, layer: int, seq_id: int, length: int, window: torch.Tensor, state: torch.Tensor) -> None:
        """Hold the DeltaNet state of ``layer`` after the first ``length`` tokens of a sequence, passed inside a
        prompt chunk (the runner splits only the DeltaNet mix there, so the chunk is not cut), until a snapshot of
        it is made or :meth:`drop_kept_states` runs."""
        slots = self.slots
        self._kept_states.setdefault((seq_id, length), {})[layer] = (
            window.to(slots.windows[layer].dtype).clone(), state.to(slots.states[layer].dtype).clone())

    def has_kept_state(self, seq_id: int, length: int) -> bool:
        return (seq_id, length) in self._kept_states

    def drop_kept_states(self) -> None:
        self._kept_states.clear()

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
        """Blocks and slots held by sequences (blocks only the prefix cache holds are free for them: see
        ``prefix_usage``)."""
        return {"blocks_total": self.layout.num_blocks, "blocks_used": self.blocks.num_used,
                "slots_total": self.slots.num_slots, "slots_used": self.slots.num_slots - self.slots.num_free}

    def prefix_usage(self) -> dict[str, int]:
        """The prefix cache: what it holds now, and its counters since the start."""
        b, st = self.blocks, self.blocks.stats
        return {"blocks_cached": b.num_cached, "prefix_cache_snapshots": b.num_snapshots,
                "prefix_cache_lookups": st.lookups, "prefix_cache_queries": st.queries,
                "prefix_cache_hits": st.hits, "prefix_cache_hit_requests": st.hit_lookups,
                "prefix_cache_snapshots_taken": st.snapshots_taken, "prefix_cache_evictions": st.evictions}

    def nbytes(self) -> int:
        """Bytes actually allocated; equals ``layout.total_bytes`` (tested)."""
        tensors = [*(t for kv in self.kv.layers.values() for t in kv.tensors()), *self.slots.windows.values(),
                   *self.slots.states.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
