"""M-RoPE position ids of a prompt with images and videos: three position axes (temporal, height, width).

Text tokens take the same position on all three axes, one more per token.  A vision block (the pad tokens of
one image, or of one video frame) starting at position p lays its merged grid out in space:
token (t, row, col) gets T = p + t, H = p + row, W = p + col, and the text after the block resumes at
p + max(merged rows, merged cols) — not p + the number of pad tokens, so positions run slower than tokens.
Each video frame is its own block with t = 0 (Qwen3.5 separates frames by timestamp text).

Decoding continues from the largest position + 1: the token at sequence index i (i >= prompt length) sits at
position i + ``rope_delta`` on all three axes, with ``rope_delta = max position + 1 - prompt length`` (<= 0).
"""

from __future__ import annotations

from collections import deque
from itertools import pairwise

import torch

from .vision import VisionGrid, parse_grids


def _image_blocks(grid_thw: torch.Tensor | None, merge: int) -> deque[VisionGrid]:
    return deque(parse_grids(grid_thw, merge, "image_grid_thw")) if grid_thw is not None else deque()


def _frame_blocks(grid_thw: torch.Tensor | None, merge: int) -> deque[VisionGrid]:
    """A video's grid becomes one single-frame block per temporal patch."""
    if grid_thw is None:
        return deque()
    return deque(VisionGrid(1, g.rows, g.cols) for g in parse_grids(grid_thw, merge, "video_grid_thw")
                 for _ in range(g.frames))


def _sequence_positions(ids: torch.Tensor, images: deque[VisionGrid], frames: deque[VisionGrid],
                        image_token_id: int, video_token_id: int, merge: int) -> torch.Tensor:
    """Positions [3, T] of one unpadded sequence, taking its blocks' grids from the front of the queues."""
    kind = (ids == image_token_id).long() + 2 * (ids == video_token_id).long()
    T = ids.shape[0]
    change = torch.nonzero(kind[1:] != kind[:-1]).flatten().add(1).tolist()
    bounds = [0, *change, T]
    parts: list[torch.Tensor] = []
    p = 0
    for a, b in pairwise(bounds):
        k = int(kind[a])
        if k == 0:
            parts.append(torch.arange(p, p + b - a).expand(3, -1))
            p += b - a
            continue
        # one run of pad tokens: one block, or several back to back (images without separators)
        queue, what = (images, "image") if k == 1 else (frames, "video frame")
        left = b - a
        while left:
            if not queue:
                raise ValueError(f"the {what} pad tokens at index {a} have no grid left in "
                                 f"{'image' if k == 1 else 'video'}_grid_thw")
            g = queue.popleft()
            mr, mc = g.rows // merge, g.cols // merge
            n = g.frames * mr * mc
            if n > left:
                raise ValueError(f"a run of {b - a} {what} pad tokens at index {a} does not match its grid "
                                 f"{(g.frames, g.rows, g.cols)} ({n} tokens after {merge}x{merge} merging)")
            t = torch.arange(g.frames).view(-1, 1, 1).expand(-1, mr, mc)
            r = torch.arange(mr).view(1, -1, 1).expand(g.frames, -1, mc)
            c = torch.arange(mc).view(1, 1, -1).expand(g.frames, mr, -1)
            parts.append(torch.stack([t, r, c]).reshape(3, -1) + p)
            p += max(mr, mc)
            left -= n
    return torch.cat(parts, dim=1)


def _check_used(images: deque, frames: deque) -> None:
    if images or frames:
        raise ValueError(f"image_grid_thw / video_grid_thw describe {len(images)} image(s) and {len(frames)} video "
                         "frame(s) more than the pad tokens of input_ids hold")


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    video_grid_thw: torch.Tensor | None, image_token_id: int, video_token_id: int,
                    spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """One sequence: input_ids [T] -> (positions [3, T] long, rope_delta).

    ``image_grid_thw`` / ``video_grid_thw`` [n, 3] (as the processor gives them, or None) describe the images
    and videos in the order their pad tokens appear; all must be used.  Decode token i (i >= T) sits at
    i + rope_delta on every axis."""
    if input_ids.dim() != 1 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be one non-empty sequence [T], got shape {tuple(input_ids.shape)}")
    images = _image_blocks(image_grid_thw, spatial_merge_size)
    frames = _frame_blocks(video_grid_thw, spatial_merge_size)
    pos = _sequence_positions(input_ids.cpu(), images, frames, image_token_id, video_token_id, spatial_merge_size)
    _check_used(images, frames)
    return pos.to(input_ids.device), int(pos.max()) + 1 - input_ids.shape[0]


def mrope_positions_batch(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                          video_grid_thw: torch.Tensor | None, image_token_id: int, video_token_id: int,
                          spatial_merge_size: int, attention_mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch: input_ids [B, T], optionally left-padded (attention_mask [B, T], 0 = padding) -> (positions
    [3, B, T] long, rope_deltas [B] long).  Grids are taken row after row, in order; padding gets position 0.
    Each row's positions are those it would get alone (transformers' ``get_rope_index``)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"{tuple(input_ids.shape)}")
    B, T = input_ids.shape
    images = _image_blocks(image_grid_thw, spatial_merge_size)
    frames = _frame_blocks(video_grid_thw, spatial_merge_size)
    ids = input_ids.cpu()
    keep = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool)
    positions = torch.zeros(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        n = int(keep[b].sum())
        if n == 0:
            continue
        pos = _sequence_positions(ids[b][keep[b]], images, frames, image_token_id, video_token_id,
                                  spatial_merge_size)
        positions[:, b, keep[b]] = pos
        deltas[b] = int(pos.max()) + 1 - n
    _check_used(images, frames)
    return positions.to(input_ids.device), deltas.to(input_ids.device)
