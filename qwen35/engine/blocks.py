"""Who holds which KV block, and the prefix cache's index: plain Python, no tensors.

The hybrid cache (``cache.py``) owns the tensors; this module owns the bookkeeping, so the decisions -- can a
sequence be admitted, grow, share a cached prefix, what to evict -- are made (and unit-tested) without torch.

**Blocks.**  Each block has a reference count, and separately the count of references held by sequences.  A block
referenced only by the prefix cache is *cached*: a sequence that needs room gets it, the cache giving up its least
recently used snapshots (in two segments, see ``BlockManager.__init__``), so for admission and growth cached blocks
count as free (``num_available``).  Full blocks are known by the chained hash of their tokens (parent hash + the
block's tokens, rooted in the model / dtype / block size), and a snapshot shares the block already registered for
a hash instead of pinning a second copy.

**Snapshots.**  A hybrid model can only resume a prefix if it has, besides the KV of every position before it, the
DeltaNet state (conv window + recurrent state of every DeltaNet layer) right after it.  A :class:`Snapshot` is that
pair for one token prefix: it pins the prefix's KV blocks (its full blocks and, for a prefix that ends inside a
block, that partial block, whose first rows hold the tail) and ``snapshot_blocks`` blocks of the same pool that store
the state bytes (``cache.py`` writes them).  Pinning is what keeps a snapshot usable: none of its blocks can be
reused while it lives, so a snapshot never refers to evicted KV, and evicting it drops its KV with it.  There is no
separate LRU of unreferenced hashed blocks: without a state at or after its end, a KV block alone cannot resume
anything on this model, so a block nobody pins goes straight back to the free list.

Snapshots are keyed by (hash of the full blocks before the prefix's end, the tokens after them), so a prompt finds
the deepest one it extends with one dict lookup per full block of the prompt, and prefixes shorter than a block are
found like any other.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def root_hash(*identity: object) -> bytes:
    """The parent hash of every sequence's first block.  Mixing in the model, dtype and block size means a key can
    only ever match KV computed by the same weights in the same layout (should keys be persisted or shared)."""
    return hashlib.blake2b("|".join(map(str, identity)).encode(), digest_size=16).digest()


def extend_hashes(hashes: list[bytes], tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Grow ``hashes`` in place to cover every full block of ``tokens`` and return it.

    ``hashes[0]`` is the root; ``hashes[i]`` is the chain hash of the first ``i`` full blocks.  Tokens only ever
    get appended to a sequence (preemption keeps them), so hashes once computed stay valid."""
    full = len(tokens) // block_size
    while len(hashes) <= full:
        i = len(hashes) - 1
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        hashes.append(hashlib.blake2b(hashes[i] + block, digest_size=16).digest())
    return hashes


@dataclass(eq=False)
class Snapshot:
    """The state of the model after one token prefix: its KV blocks and the blocks holding its DeltaNet state."""

    parent: bytes  # chain hash of the full blocks before the tail
    tail: tuple[int, ...]  # the prefix's tokens after its last full block (fewer than a block)
    length: int  # tokens the prefix has
    blocks: list[int]  # KV of positions [0, length): the full blocks, then the partial tail block if any
    state_blocks: list[int]  # where the DeltaNet state bytes are stored

    @property
    def key(self) -> tuple[bytes, tuple[int, ...]]:
        return self.parent, self.tail


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # admissions that looked for a cached prefix
    queries: int = 0  # tokens those admissions had to compute before the cache (prompt, or all tokens on resume)
    hits: int = 0  # of them, tokens served from the cache
    hit_lookups: int = 0  # admissions that found a cached prefix
    snapshots_taken: int = 0
    evictions: int = 0  # snapshots dropped to make room


class BlockManager:
    """Free list, reference counts, content hashes of full blocks, sequences' block tables, and the snapshots
    of the prefix cache (evicted least recently used first, in two segments: see ``__init__``)."""

    def __init__(self, num_blocks: int, block_size: int, snapshot_blocks: int = 0) -> None:
        if num_blocks < 0 or block_size < 1 or snapshot_blocks < 0:
            raise ValueError("num_blocks >= 0, block_size >= 1 and snapshot_blocks >= 0 are required")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.snapshot_blocks = snapshot_blocks  # blocks one snapshot's DeltaNet state takes
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids first
        self._refs = [0] * num_blocks
        self._live = [0] * num_blocks  # of the references, those held by sequences
        self._num_live = 0  # blocks with a sequence reference
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self.tables: dict[int, list[int]] = {}  # sequence id -> its blocks, in position order
        # every snapshot by key, and the eviction order in two least-recently-used segments: snapshots never
        # resumed from go first, so the one-off states every request leaves (its prompt end, its finished
        # generation) cannot flush a prefix that requests keep sharing (a system prompt); the resumed segment is
        # capped at half the snapshots, its oldest falling back to the other (a segmented LRU)
        self._snapshots: dict[tuple[bytes, tuple[int, ...]], Snapshot] = {}
        self._unused: OrderedDict[tuple[bytes, tuple[int, ...]], Snapshot] = OrderedDict()
        self._resumed: OrderedDict[tuple[bytes, tuple[int, ...]], Snapshot] = OrderedDict()
        self._by_parent: dict[bytes, dict[tuple[int, ...], Snapshot]] = {}
        self.stats = PrefixCacheStats()

    # -- counts -----------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks nobody references."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks some sequence references."""
        return self._num_live

    @property
    def num_cached(self) -> int:
        """Blocks only the prefix cache references (snapshots' KV and state)."""
        return self.num_blocks - len(self._free) - self._num_live

    @property
    def num_available(self) -> int:
        """Blocks a sequence can get: the free ones, and the cached ones the prefix cache gives up on demand."""
        return self.num_blocks - self._num_live

    @property
    def num_snapshots(self) -> int:
        return len(self._snapshots)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def refs(self, block: int) -> tuple[int, int]:
        """(all references, references by sequences) of a block; for tests and assertions."""
        return self._refs[block], self._live[block]

    # -- references -------------------------------------------------------------------------------------------
    def _ref(self, block: int, live: bool) -> None:
        self._refs[block] += 1
        if live:
            if self._live[block] == 0:
                self._num_live += 1
            self._live[block] += 1

    def _unref(self, block: int, live: bool) -> None:
        if live:
            self._live[block] -= 1
            if self._live[block] == 0:
                self._num_live -= 1
        self._refs[block] -= 1
        if self._refs[block] == 0:
            h = self._hash_of.pop(block, None)
            if h is not None and self._by_hash.get(h) == block:
                del self._by_hash[h]
            self._free.append(block)

    def _take(self, n: int, live: bool, keep: Snapshot | None = None) -> list[int] | None:
        """``n`` fresh blocks, evicting least recently used snapshots (never ``keep``) as needed; None, with nothing
        evicted, when even evicting every other snapshot would not free enough."""
        if n > len(self._free):
            if n > self.num_available - self._num_pinned_by(keep):
                return None
            while n > len(self._free):
                if not self._evict_one(keep):
                    return None
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._ref(b, live)
        return out

    def _num_pinned_by(self, snap: Snapshot | None) -> int:
        """Blocks ``snap`` holds that only the cache references: what keeping it withholds from the free list."""
        if snap is None:
            return 0
        return sum(1 for b in set(snap.blocks) | set(snap.state_blocks) if self._live[b] == 0)

    # -- sequences --------------------------------------------------------------------------------------------
    def open(self, seq_id: int) -> None:
        self.tables[seq_id] = []

    def can_grow(self, seq_id: int, tokens: int) -> bool:
        return self.blocks_for(tokens) - len(self.tables[seq_id]) <= self.num_available

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Blocks for ``tokens`` positions in all; False (nothing taken) if they cannot be had."""
        table = self.tables[seq_id]
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return True
        got = self._take(need, live=True)
        if got is None:
            return False
        table.extend(got)
        return True

    def release(self, seq_id: int) -> None:
        for b in self.tables.pop(seq_id, ()):
            self._unref(b, live=True)

    # -- the prefix cache -------------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int], hashes: list[bytes], limit: int) -> Snapshot | None:
        """The snapshot of the longest prefix of ``tokens`` no longer than ``limit``; ``hashes`` must cover the full
        blocks of ``tokens[:limit]`` (see :func:`extend_hashes`).  Looks only; nothing is counted or refreshed."""
        bs = self.block_size
        limit = min(limit, len(tokens))
        if limit <= 0 or not self._snapshots:
            return None
        for d in range(limit // bs, -1, -1):
            group = self._by_parent.get(hashes[d])
            if not group:
                continue
            start = d * bs
            for r in range(min(bs - 1, limit - start), -1, -1):
                snap = group.get(tuple(tokens[start:start + r]))
                if snap is not None and snap.length > 0:
                    return snap
        return None

    def find(self, tokens: Sequence[int], hashes: list[bytes], length: int) -> Snapshot | None:
        """The snapshot of exactly ``tokens[:length]``, if there is one."""
        d = length // self.block_size
        group = self._by_parent.get(hashes[d])
        return group.get(tuple(tokens[d * self.block_size:length])) if group else None

    def can_attach(self, snap: Snapshot, tokens: int) -> bool:
        """Whether a new sequence resuming from ``snap`` can have blocks for ``tokens`` positions in all."""
        need = self.blocks_for(tokens) - snap.length // self.block_size
        return need <= self.num_available - self._num_pinned_by(snap)

    def attach(self, seq_id: int, snap: Snapshot) -> tuple[int, int] | None:
        """Start ``seq_id``'s (empty) table with ``snap``'s KV: its full blocks shared, its partial tail block (if any)
        to be copied into a fresh block.  Returns (source, destination) of that copy, or None when there is none.
        The snapshot's blocks are not touched until the caller has copied what it needs (``keep``)."""
        table = self.tables[seq_id]
        if table:
            raise RuntimeError("attach needs an empty block table")
        self._promote(snap)
        self.stats.hits += snap.length
        self.stats.hit_lookups += 1
        full = snap.length // self.block_size
        copy = None
        if snap.length % self.block_size:
            got = self._take(1, live=True, keep=snap)
            if got is None:
                raise RuntimeError("no block for the cached tail (can_attach was not checked)")
            copy = (snap.blocks[full], got[0])
        for b in snap.blocks[:full]:
            self._ref(b, live=True)
        table.extend(snap.blocks[:full])
        if copy is not None:
            table.append(copy[1])
        return copy

    def note_lookup(self, tokens: int) -> None:
        """Count an admission that looked for a cached prefix of its ``tokens`` to compute."""
        self.stats.lookups += 1
        self.stats.queries += tokens

    def capture(self, seq_id: int, tokens: Sequence[int], hashes: list[bytes], length: int) -> Snapshot | None:
        """Register a snapshot of ``tokens[:length]`` of a sequence whose blocks hold that prefix's KV.  Returns the
        new snapshot, whose ``state_blocks`` the caller must now fill, or None: already cached (refreshed instead),
        or no room even after evicting older snapshots."""
        bs = self.block_size
        full = length // bs
        table = self.tables[seq_id]
        if length <= 0 or length > len(table) * bs or self.snapshot_blocks == 0:
            return None
        key = (hashes[full], tuple(tokens[full * bs:length]))
        old = self._snapshots.get(key)
        if old is not None:
            self._touch(old)
            return None
        state = self._take(self.snapshot_blocks, live=False)
        if state is None:
            return None
        blocks = []
        for i in range(full):
            # share the block already registered for this content, so identical prefixes are pinned once
            b = self._by_hash.get(hashes[i + 1])
            if b is None:
                b = table[i]
                if b not in self._hash_of:
                    self._hash_of[b] = hashes[i + 1]
                    self._by_hash[hashes[i + 1]] = b
            blocks.append(b)
        if length % bs:
            blocks.append(table[full])  # its first rows hold the tail; the sequence only ever writes past them
        for b in blocks:
            self._ref(b, live=False)
        snap = Snapshot(key[0], key[1], length, blocks, state)
        self._snapshots[key] = snap
        self._unused[key] = snap
        self._by_parent.setdefault(key[0], {})[key[1]] = snap
        self.stats.snapshots_taken += 1
        return snap

    def drop(self, snap: Snapshot) -> None:
        """Forget a snapshot and unpin its blocks."""
        if self._snapshots.pop(snap.key, None) is None:
            return
        self._unused.pop(snap.key, None)
        self._resumed.pop(snap.key, None)
        group = self._by_parent[snap.parent]
        del group[snap.tail]
        if not group:
            del self._by_parent[snap.parent]
        for b in snap.blocks:
            self._unref(b, live=False)
        for b in snap.state_blocks:
            self._unref(b, live=False)

    def _evict_one(self, keep: Snapshot | None = None) -> bool:
        for snap in self.snapshots():
            if snap is not keep:
                self.drop(snap)
                self.stats.evictions += 1
                return True
        return False

    def clear(self) -> None:
        """Drop every snapshot (not counted as evictions)."""
        for snap in list(self._snapshots.values()):
            self.drop(snap)

    def snapshots(self) -> list[Snapshot]:
        """In eviction order: never resumed from (least recently used first), then resumed from (likewise)."""
        return [*self._unused.values(), *self._resumed.values()]

    def _touch(self, snap: Snapshot) -> None:
        (self._resumed if snap.key in self._resumed else self._unused).move_to_end(snap.key)

    def _promote(self, snap: Snapshot) -> None:
        self._unused.pop(snap.key, None)
        self._resumed[snap.key] = snap
        self._resumed.move_to_end(snap.key)
        while len(self._resumed) > max(1, len(self._snapshots) // 2):
            key, old = self._resumed.popitem(last=False)
            self._unused[key] = old  # the most recent of the unused: it still had its turn
