"""Turns a scheduled batch into one model forward over the paged cache.

All tokens of the step are packed into one row ([1, N]): decode tokens first, then each prompt chunk.  The
projections and feed-forward blocks (nearly all of the FLOPs) run once over all N tokens; only the sequence
mixing splits by sequence, in ``PagedContext``:

* attention writes each token's K/V into its block row; decode tokens attend together over their block tables
  (read in place where the native kernel runs), each prompt chunk over its gathered rows;
* DeltaNet steps every decode token together (their slot states gathered into one [B, ...] batch, one
  recurrent step, scattered back) and runs each prompt chunk with the chunked rule from its slot's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.context import ForwardContext, LinearMixer, sdpa
from .cache import HybridCache
from .kv_quant import LayerKV
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class Segment:
    seq: Sequence
    start: int  # offset in the packed row
    length: int  # tokens this step
    past: int  # tokens already in the cache for this sequence
    keep_at: tuple[int, ...] = ()  # offsets inside a prompt chunk where the cache keeps the DeltaNet state


class PagedContext(ForwardContext):
    """The engine's sequence mixing over the paged cache.

    The first ``num_decodes`` segments are decode segments: one new token, or with speculative decoding that token
    plus its draft tokens (a *verify* segment).  Every token of a decode segment goes through exactly the arithmetic
    of a plain decode step -- attention as one query row over the block table with its own length, the DeltaNet
    step on the state pool -- so a verified token equals the token plain decoding would compute.  Draft tokens of
    one sequence depend on each other, so the DeltaNet steps run in waves (the j-th token of every decode segment
    together), and the cache keeps the state after each wave so that rejected drafts can be rewound.
    """

    def __init__(self, cache: HybridCache, segments: list[Segment], num_decodes: int,
                 rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.cache = cache
        self.segments = segments
        self.num_decodes = num_decodes
        self.rope = rope
        self.token_mask = None
        ids = [s.seq.seq_id for s in segments]
        decodes = segments[:num_decodes]
        dev = rope[0].device  # every index tensor lives where the cache and the model do
        self.num_decode_rows = sum(s.length for s in decodes)  # decode segments fill the front of the row
        # rows this step writes, and the rows each prompt chunk reads (its whole history incl. this step)
        self.write_rows = torch.cat([cache.token_rows(i, s.past, s.past + s.length)
                                     for i, s in zip(ids, segments)]).to(dev)
        self.read_rows = [cache.token_rows(i, 0, s.past + s.length).to(dev)
                          for i, s in zip(ids[num_decodes:], segments[num_decodes:])]
        self.slots = torch.tensor([cache.slot_of[i] for i in ids], dtype=torch.long, device=dev)
        # each decode token attends over its sequence's blocks in place: block tables padded with a valid id
        self.decode_tables = self.decode_lengths = None
        if num_decodes:
            tables = [cache.block_tables[i] for i in ids[:num_decodes]]
            width = max(len(t) for t in tables)
            rows, lengths = [], []
            for seg, t in zip(decodes, tables):
                rows += [t + t[:1] * (width - len(t))] * seg.length
                lengths += range(seg.past + 1, seg.past + seg.length + 1)
            self.decode_tables = torch.tensor(rows, dtype=torch.long, device=dev)
            self.decode_lengths = torch.tensor(lengths, dtype=torch.long, device=dev)
        # DeltaNet waves: wave j holds the j-th token of every decode segment that has one
        self.waves: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
        longest = max((s.length for s in decodes), default=0)
        for j in range(longest):
            members = [k for k, s in enumerate(decodes) if s.length > j]
            self.waves.append((torch.tensor([decodes[k].start + j for k in members], dtype=torch.long, device=dev),
                               self.slots[members], [decodes[k].seq.seq_id for k in members
                                                     if decodes[k].length > 1]))

    def kv_tensors(self, layer: int) -> LayerKV:
        """The key and value rows of an attention layer (the MTP drafter keeps its layer's rows itself)."""
        return self.cache.layer_kv(layer)

    def attend(self, layer, q, k, v):
        # a quantized cache quantizes on write and every read below sees the stored (quantized) rows, this
        # step's own tokens included: whichever path wrote a token, attention reads the same values
        kv = self.kv_tensors(layer)
        kv.write(self.write_rows, k[0], v[0])
        nd = self.num_decode_rows
        scale = q.shape[-1] ** -0.5
        if nd and self.num_decodes == len(self.segments):  # a decode-only step: no prompt chunk to stitch in
            return kv.decode_attention(q[0], self.decode_tables, self.decode_lengths, self.cache.block_size,
                                       scale)[None]
        out = torch.empty_like(q)
        if nd:
            out[0, :nd] = kv.decode_attention(q[0, :nd], self.decode_tables, self.decode_lengths,
                                              self.cache.block_size, scale)
        for seg, rows in zip(self.segments[self.num_decodes:], self.read_rows):
            qs = q[:, seg.start:seg.start + seg.length].transpose(1, 2)  # [1, H, t, d]
            ks, vs = kv.gather(rows, q.dtype)
            ks, vs = ks.transpose(0, 1)[None], vs.transpose(0, 1)[None]  # [1, Hkv, L, d]
            mask = None
            if seg.length > 1 and seg.past > 0:  # causal, aligned to the end of the cached history
                L = seg.past + seg.length
                mask = torch.ones(seg.length, L, dtype=torch.bool, device=q.device).tril(seg.past)
            o = sdpa(qs, ks, vs, mask, causal=seg.length > 1)
            out[:, seg.start:seg.start + seg.length] = o.transpose(1, 2)
        return out

    def linear_mix(self, layer, mixer: LinearMixer, qkv, g, beta):
        slots = self.cache.slots
        windows, states = slots.windows[layer], slots.states[layer]
        parts = []
        nd = self.num_decode_rows
        if nd:  # every decode token through the in-place step on the pools, one wave at a time
            if len(self.waves) == 1:
                parts.append(mixer.mix_step_(qkv[0, :nd], g[0, :nd], beta[0, :nd], windows, states,
                                             self.slots[:self.num_decodes])[None])
            else:
                o = None
                for step, (rows, wave_slots, verifying) in enumerate(self.waves):
                    ow = mixer.mix_step_(qkv[0, rows], g[0, rows], beta[0, rows], windows, states, wave_slots)
                    if o is None:
                        o = ow.new_empty((nd, *ow.shape[1:]))
                    o[rows] = ow
                    if step < len(self.waves) - 1:
                        self.cache.save_step(layer, step, verifying)
                parts.append(o[None])
        for seg, slot in zip(self.segments[self.num_decodes:], self.slots[self.num_decodes:].tolist()):
            fresh = seg.past == 0  # a new sequence starts from zero state, never from what the slot held
            w, s = (None, None) if fresh else (windows[slot:slot + 1], states[slot:slot + 1])
            # the chunk in pieces at the points the prefix cache wants a state of: only this mix splits there
            bounds = (0, *seg.keep_at, seg.length)
            for a, b in zip(bounds, bounds[1:]):
                sl = slice(seg.start + a, seg.start + b)
                o, w, s = mixer.mix(qkv[:, sl], g[:, sl], beta[:, sl], w, s)
                if b < seg.length:
                    self.cache.keep_state(layer, seg.seq.seq_id, seg.past + b, w[0], s[0])
                parts.append(o)
            windows[slot] = w[0].to(windows.dtype)
            states[slot] = s[0].to(states.dtype)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class ModelRunner:
    """Runs the model on a scheduled batch; returns the logits of every sequence that samples this step."""

    def __init__(self, model, cache: HybridCache) -> None:
        self.model = model
        self.cache = cache
        self.last_hidden: torch.Tensor | None = None  # the last forward's hidden states [N, H] and segments
        self.last_segments: list[Segment] = []

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None, list[int]]:
        """One forward.  Returns the sequences that sample this step, their logits (one row each, or 1 + drafts
        rows for a sequence verifying draft tokens, in order) and how many rows each has."""
        segments: list[Segment] = []
        tokens: list[int] = []
        positions: list[int] = []
        work = [(s, 1 + len(s.draft_ids)) for s in batch.decodes] + batch.prefills
        for k, (seq, n) in enumerate(work):
            start = seq.num_computed
            ids = seq.all_ids[start:start + n] if not seq.draft_ids or n == 1 else \
                seq.all_ids[start:start + 1] + seq.draft_ids
            keep = () if k < len(batch.decodes) else tuple(p - start for p in seq.snapshot_points
                                                          if start < p < start + n)
            segments.append(Segment(seq, len(tokens), n, start, keep))
            tokens.extend(ids)
            positions.extend(range(start, start + n))
        m = self.model
        input_ids = torch.tensor([tokens], dtype=torch.long, device=m.device)
        embeds = None
        if any(seg.seq.vision is not None for seg in segments):
            # M-RoPE: three position rows (equal for text); picture rows written over their pad tokens' embeddings
            pos = torch.cat([position_rows(seg) for seg in segments], dim=1)[:, None].to(m.device)
            embeds = self._with_pictures(input_ids, segments, len(batch.decodes))
        else:
            pos = torch.tensor([positions], dtype=torch.long, device=m.device)
        ctx = PagedContext(self.cache, segments, len(batch.decodes), m.rope(pos, m.dtype))
        h = m.hidden_states(input_ids, ctx, inputs_embeds=embeds)
        self.last_hidden, self.last_segments = h[0], segments  # what a drafter reads (MTP)
        sampling: list[Sequence] = []
        rows: list[int] = []
        counts: list[int] = []
        for k, seg in enumerate(segments):
            if k < len(batch.decodes) and seg.length > 1:  # verify: every position predicts a token
                seg.seq.num_computed += seg.length  # the engine rewinds what it does not accept
                sampling.append(seg.seq)
                rows.extend(range(seg.start, seg.start + seg.length))
                counts.append(seg.length)
                continue
            seg.seq.num_computed += seg.length
            if seg.seq.remaining == 0:  # the whole sequence is in the cache: time to sample the next token
                sampling.append(seg.seq)
                rows.append(seg.start + seg.length - 1)
                counts.append(1)
        for seg in segments[len(batch.decodes):]:
            if seg.seq.vision is not None:
                seg.seq.vision.release_passed(seg.seq.num_computed)
        if not sampling:
            return [], None, []
        return sampling, m.compute_logits(h[0, rows]).float(), counts

    def _with_pictures(self, input_ids: torch.Tensor, segments: list[Segment], num_decodes: int) -> torch.Tensor:
        """The step's token embeddings [1, N, H] with every prompt chunk's picture rows in place (the tower runs
        on a picture the first time a chunk reaches it; see engine.multimodal)."""
        m = self.model
        embeds = m.embed(input_ids)
        for seg in segments[num_decodes:]:
            vision = seg.seq.vision
            if vision is None or seg.past >= len(seg.seq.prompt_ids):
                continue
            offsets, rows = vision.rows_for(seg.past, seg.past + seg.length, m.encode_vision)
            if rows is not None:
                at = torch.tensor(offsets, dtype=torch.long, device=embeds.device) + seg.start
                embeds[0, at] = rows.to(embeds.dtype)
        return embeds


def position_rows(seg: Segment) -> torch.Tensor:
    """[3, length] M-RoPE positions of a segment's tokens (text tokens: the same position on every axis)."""
    start, end = seg.past, seg.past + seg.length
    if seg.seq.vision is None:
        return torch.arange(start, end, dtype=torch.long).expand(3, -1)
    return seg.seq.vision.position_rows(start, end, len(seg.seq.prompt_ids))
