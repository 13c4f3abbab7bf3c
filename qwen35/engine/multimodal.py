"""Images and videos in the engine: where their tokens sit in a prompt, their M-RoPE positions, their embeddings.

A request brings its pictures preprocessed (``VisionInput``: transformers' ``pixel_values`` / ``image_grid_thw`` and
``pixel_values_videos`` / ``video_grid_thw``) and a prompt whose pad tokens are already expanded, one per vision
token.  At admission the engine turns that into a ``PromptVision`` owned by the sequence:

* ``items``: one per image or video, in the order their pad tokens appear, each with the prompt positions of its pad
  tokens (an image is one run of pads; a video one run per temporal patch, with timestamp text between runs);
* ``positions`` [3, prompt length]: the prompt's M-RoPE positions (qwen35.model.mrope); a token at sequence index
  ``i`` past the prompt sits at ``i + rope_delta`` on all three axes;
* ``cache_ids``: the prompt's token ids with every pad replaced by an id derived from its picture's content hash
  (outside any vocabulary), which is what the prefix cache hashes -- two prompts that differ only in their pictures
  must not share blocks, and the same picture sent again must hit.

The tower runs once per item, the first time a prompt chunk reaches one of its tokens; the rows are kept on the
sequence until the prompt has passed the item, so a chunk boundary inside a picture changes nothing (each chunk takes
its rows of the one encoding).  A sequence that is preempted, or resumed from the prefix cache inside a picture,
encodes it again.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

import torch

from ..model.mrope import mrope_positions

# cache ids of pads: above every vocabulary (Qwen's is 248,320) and within int64 (the block hashes pack int64)
_CACHE_ID_BASE = 1 << 56


@dataclass(frozen=True)
class VisionInput:
    """The preprocessed images and videos of one prompt (transformers' names and shapes, as its processor and
    qwen35.chat.media give them), in the order their pad tokens appear in the prompt."""

    pixel_values: torch.Tensor | None = None  # [patches, C·T·P·P], all images
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None  # [patches, C·T·P·P], all videos
    video_grid_thw: torch.Tensor | None = None  # [videos, 3]

    @property
    def empty(self) -> bool:
        return self.pixel_values is None and self.pixel_values_videos is None


@dataclass
class VisionItem:
    kind: str  # "image" or "video"
    pixel_values: torch.Tensor  # this item's patches
    grid_thw: torch.Tensor  # [1, 3]
    pad_positions: list[int]  # prompt positions of its pad tokens, ascending
    content_hash: bytes


@dataclass
class PromptVision:
    items: list[VisionItem]
    positions: torch.Tensor  # [3, prompt length] long
    rope_delta: int
    cache_ids: list[int]  # the prompt's ids with pads replaced by content ids (what the prefix cache hashes)
    embeds: dict[int, torch.Tensor] = field(default_factory=dict)  # item index -> rows [pads, H], while needed

    @property
    def pad_positions(self) -> list[int]:
        return [p for item in self.items for p in item.pad_positions]

    def position_rows(self, start: int, end: int, prompt_length: int) -> torch.Tensor:
        """[3, end - start] positions of sequence indices [start, end)."""
        inside = min(end, prompt_length)
        parts = []
        if start < inside:
            parts.append(self.positions[:, start:inside])
        if end > max(start, prompt_length):
            after = torch.arange(max(start, prompt_length), end, dtype=torch.long) + self.rope_delta
            parts.append(after.expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def rows_for(self, start: int, end: int, encode) -> tuple[list[int], torch.Tensor | None]:
        """The vision rows of prompt positions [start, end): (their offsets from ``start``, rows [n, H]), encoding
        the items they belong to with ``encode(pixel_values, grid_thw)`` when not encoded yet."""
        offsets, rows = [], []
        for k, item in enumerate(self.items):
            pads = item.pad_positions
            a, b = bisect.bisect_left(pads, start), bisect.bisect_left(pads, end)
            if a == b:
                continue
            if k not in self.embeds:
                self.embeds[k] = encode(item.pixel_values, item.grid_thw)
            offsets.extend(p - start for p in pads[a:b])
            rows.append(self.embeds[k][a:b])
        if not rows:
            return [], None
        return offsets, torch.cat(rows) if len(rows) > 1 else rows[0]

    def release_passed(self, computed: int) -> None:
        """Drop the rows of items the prompt has gone past (``computed`` tokens are in the cache)."""
        for k in [k for k in self.embeds if self.items[k].pad_positions[-1] < computed]:
            del self.embeds[k]


def _split(pixels: torch.Tensor | None, grids: torch.Tensor | None, kind: str, pixels_name: str,
           grid_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if pixels is None and grids is None:
        return []
    if pixels is None or grids is None:
        raise ValueError(f"{pixels_name} and {grid_name} go together: give both or neither")
    if not isinstance(grids, torch.Tensor) or grids.dim() != 2 or grids.shape[1] != 3:
        raise ValueError(f"{grid_name} must be a [{kind}s, 3] tensor of (t, h, w) patch counts")
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 2:
        raise ValueError(f"{pixels_name} must be a [patches, channels·t·p·p] tensor")
    counts = [int(t) * int(h) * int(w) for t, h, w in grids.tolist()]
    if sum(counts) != pixels.shape[0]:
        raise ValueError(f"{grid_name} describes {sum(counts)} patches but {pixels_name} holds {pixels.shape[0]}")
    out, at = [], 0
    for g, n in zip(grids, counts):
        out.append((pixels[at:at + n], g[None].long()))
        at += n
    return out


def _content_hash(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(grid.flatten().tolist())).encode())
    h.update(str(pixels.dtype).encode())
    h.update(pixels.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


def prompt_vision(model, ids: list[int], vision: VisionInput) -> PromptVision:
    """Check a request's pictures against its prompt and lay them out (see the module docstring).  ``ValueError``
    naming what does not fit: a model without a vision tower, pad counts that differ from the grids."""
    cfg = model.config
    if getattr(model, "visual", None) is None:
        why = "its config has no vision_config" if cfg.vision is None else "its checkpoint holds no model.visual.* weights"
        raise ValueError(f"this model cannot take images or videos: it has no vision tower ({why})")
    merge = cfg.vision.spatial_merge_size
    image_id, video_id = cfg.image_token_id, cfg.video_token_id
    if image_id is None or video_id is None:
        raise ValueError(f"{cfg.source}: the config names no image_token_id / video_token_id")
    images = _split(vision.pixel_values, vision.image_grid_thw, "image", "pixel_values", "image_grid_thw")
    videos = _split(vision.pixel_values_videos, vision.video_grid_thw, "video", "pixel_values_videos",
                    "video_grid_thw")
    pads = {image_id: [i for i, t in enumerate(ids) if t == image_id],
            video_id: [i for i, t in enumerate(ids) if t == video_id]}
    items: list[VisionItem] = []
    for kind, token, group in (("image", image_id, images), ("video", video_id, videos)):
        free = pads[token]
        at = 0
        for pixels, grid in group:
            t, h, w = (int(x) for x in grid[0])
            if h % merge or w % merge:
                raise ValueError(f"a {kind} grid of {h} x {w} patches is not a multiple of the merge size {merge}")
            n = t * h * w // (merge * merge)
            if at + n > len(free):
                raise ValueError(f"the prompt has {len(free)} {kind} pad tokens but the {kind}s' grids need "
                                 f"{sum(int(g[0].prod()) // merge ** 2 for _, g in group)}: expand each {kind}'s "
                                 "placeholder to its token count (qwen35.chat.media.expand_placeholders)")
            items.append(VisionItem(kind, pixels, grid, free[at:at + n], _content_hash(pixels, grid)))
            at += n
        if at != len(free):
            raise ValueError(f"the prompt has {len(free)} {kind} pad tokens but the {kind}s given fill {at}")
    items.sort(key=lambda item: item.pad_positions[0])
    positions, delta = mrope_positions(torch.tensor(ids, dtype=torch.long), vision.image_grid_thw,
                                       vision.video_grid_thw, image_id, video_id, merge)
    cache_ids = list(ids)
    for item in items:
        content_id = _CACHE_ID_BASE + int.from_bytes(item.content_hash[:6], "little")
        for p in item.pad_positions:
            cache_ids[p] = content_id
    return PromptVision(items, positions.long(), int(delta), cache_ids)
