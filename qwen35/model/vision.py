"""The vision tower: pixels of images and video frames -> one text-width embedding per 2x2 block of patches.

    x = patch_embed(pixel_values) + interpolated pos_embed          one row per 16x16 (x2 frames) patch
    for each block:  x += attn(norm1(x));  x += mlp(norm2(x))        attention within each image / frame,
                                                                     2-D axial RoPE, tanh-GELU MLP
    tokens = merger(x)                                               LayerNorm, 4 patches -> 1 vector, MLP

Input is what transformers' image processor produces: ``pixel_values`` [N, C·T·P·P] (one flattened
(channel, frame, row, col) patch per row) and ``grid_thw`` [n, 3] (frames, patch rows, patch columns of each
image or video).  Patches arrive in 2x2 merge-block-major order (block row, block column, row in block, column in
block), which is what lets the merger read 4 consecutive rows as one block, and what the learned positions and
the rotary angles follow here.

Module names equal the checkpoint names under ``model.visual.`` (``patch_embed.proj``, ``pos_embed``,
``blocks.N.attn.qkv`` …, ``merger.linear_fc2``), so checkpoint I/O is a prefix change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.kernels.ops import linear

from ..config import VisionConfig
from .linear import Linear

LAYER_NORM_EPS = 1e-6  # fixed in the reference tower, not a config field


@dataclass(frozen=True)
class VisionGrid:
    """One image or video as patches: ``frames`` temporal patches of ``rows`` x ``cols`` spatial patches."""

    frames: int
    rows: int
    cols: int

    @property
    def patches(self) -> int:
        return self.frames * self.rows * self.cols


def parse_grids(grid_thw: torch.Tensor | list, merge: int, what: str = "grid_thw") -> list[VisionGrid]:
    """grid_thw [n, 3] -> grids, checked: positive sizes whose rows and columns split into merge blocks."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)
    grids = []
    for i, g in enumerate(rows):
        if not isinstance(g, (list, tuple)) or len(g) != 3 or not all(isinstance(v, int) for v in g):
            raise ValueError(f"{what}[{i}] must be three integers (frames, rows, cols), got {g!r}")
        t, h, w = g
        if t <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"{what}[{i}] = {g} must be positive")
        if h % merge or w % merge:
            raise ValueError(f"{what}[{i}] = {g}: rows and cols must be multiples of spatial_merge_size {merge}")
        grids.append(VisionGrid(t, h, w))
    return grids


def merge_block_order(rows: int, cols: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of one frame, in the merge-block-major order the patches arrive in."""
    r = torch.arange(rows).view(rows // merge, merge, 1, 1).expand(-1, -1, cols // merge, merge)
    c = torch.arange(cols).view(1, 1, cols // merge, merge).expand(rows // merge, merge, -1, -1)
    return r.transpose(1, 2).flatten(), c.transpose(1, 2).flatten()


def _axis_taps(n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling with align_corners=True of a ``side``-long axis to ``n`` points: the two source
    indices of each point [n, 2] and their weights [n, 2] (the ends map onto the ends)."""
    src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
    low = src.floor()
    frac = src - low
    taps = (low.long()[:, None] + torch.arange(2)).clamp(max=side - 1)
    return taps, torch.stack([1 - frac, frac], dim=1)


def position_taps(grids: list[VisionGrid], side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each patch reads the ``side`` x ``side`` learned position grid: indices [N, 4] into the flattened
    table and bilinear weights [N, 4] (float32), in patch order, every frame of a video alike."""
    indices, weights = [], []
    for g in grids:
        r, c = merge_block_order(g.rows, g.cols, merge)
        r_taps, r_w = _axis_taps(g.rows, side)
        c_taps, c_w = _axis_taps(g.cols, side)
        idx = (r_taps[r][:, :, None] * side + c_taps[c][:, None, :]).flatten(1)
        wts = (r_w[r][:, :, None] * c_w[c][:, None, :]).flatten(1)
        indices.append(idx.repeat(g.frames, 1))
        weights.append(wts.repeat(g.frames, 1))
    return torch.cat(indices), torch.cat(weights)


class VisionRotaryEmbedding:
    """2-D axial RoPE over whole heads: the first half of each head's frequency pairs turns with the patch row,
    the second half with its column (rotate-half pairing), in float32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        quarter = head_dim // 2
        # a plain CPU attribute, not a buffer: model.to(bfloat16) must not round the frequencies, and a model
        # built on the meta device (checkpoint loading) must still have them
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device="cpu") / quarter))

    def __call__(self, grids: list[VisionGrid], merge: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin) [N, head_dim] float32, in patch order."""
        rows, cols = [], []
        for g in grids:
            r, c = merge_block_order(g.rows, g.cols, merge)
            rows.append(r.repeat(g.frames))
            cols.append(c.repeat(g.frames))
        inv = self.inv_freq
        angles = torch.cat([torch.cat(rows)[:, None].float() * inv, torch.cat(cols)[:, None].float() * inv], dim=1)
        angles = torch.cat([angles, angles], dim=1).to(device)
        return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim]; the rotation in float32, the result in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride and its input: one product per patch, run as a linear layer over
    the flattened patch (the same sum; the weight keeps the checkpoint's 5-D shape)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return linear(pixel_values.to(w.dtype), w.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """x [N, hidden]; ``segments``: (first patch, frames, patches per frame) of each image / video.
        Every frame attends to itself only, bidirectionally."""
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)
        q, k = rotate(q, *rope), rotate(k, *rope)
        out = torch.empty_like(q)
        for start, frames, length in segments:
            end = start + frames * length
            # the frames of one video have equal length, so they go to SDPA as one batch
            qs, ks, vs = (t[start:end].view(frames, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)
            out[start:end] = o.transpose(1, 2).reshape(frames * length, self.num_heads, -1)
        return self.proj(out.view(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                segments: list[tuple[int, int, int]]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each merge block's patches (consecutive rows) as one vector through an MLP with
    exact GELU, out at the text width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        merged = cfg.hidden_size * cfg.merge_unit
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = Linear(merged, merged, bias=True)
        self.linear_fc2 = Linear(merged, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.linear_fc1.in_features)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """``model.visual``: ``tower(pixel_values, grid_thw)`` -> [N / merge_unit, out_hidden_size], the rows of each
    image / video one after the other, each in its merge-block order (the order of its pad tokens)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.rotary = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.weight.dtype

    def tokens_per_grid(self, grid_thw: torch.Tensor) -> list[int]:
        """How many text tokens (pad tokens in the prompt) each image / video of ``grid_thw`` becomes."""
        return [g.patches // self.config.merge_unit for g in parse_grids(grid_thw, self.config.spatial_merge_size)]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        merge = cfg.spatial_merge_size
        grids = parse_grids(grid_thw, merge)
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [patches, {cfg.patch_dim}] (channels x temporal_patch_size x "
                             f"patch_size^2 per row), got shape {tuple(pixel_values.shape)}")
        total = sum(g.patches for g in grids)
        if pixel_values.shape[0] != total:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {total}")
        x = self.patch_embed(pixel_values)
        x = x + self._positions(grids).to(x.dtype)
        rope = self.rotary(grids, merge, x.device)
        segments, start = [], 0
        for g in grids:
            segments.append((start, g.frames, g.rows * g.cols))
            start += g.patches
        for block in self.blocks:
            x = block(x, rope, segments)
        return self.merger(x)

    def _positions(self, grids: list[VisionGrid]) -> torch.Tensor:
        """The learned position grid resampled bilinearly to each image's grid [N, hidden], float32."""
        idx, wts = position_taps(grids, self.config.position_grid_side, self.config.spatial_merge_size)
        table = self.pos_embed.weight
        idx, wts = idx.to(table.device), wts.to(table.device)
        out = table[idx[:, 0]] * wts[:, :1]
        for tap in range(1, idx.shape[1]):
            out = out + table[idx[:, tap]] * wts[:, tap:tap + 1]
        return out
