"""Rotary position embedding of the full-attention layers: partial, interleaved multimodal RoPE, optional YaRN.

Only the first ``head_dim · partial_rotary_factor`` dims of each q/k head rotate (rotate-half pairing on that
slice); the rest pass through.  Each of the rotary frequency pairs reads one of three position axes
(temporal, height, width), assigned *interleaved*: pair j takes H if j ≡ 1 (mod 3) and j < 3·section[1],
W if j ≡ 2 (mod 3) and j < 3·section[2], T otherwise.  For text all three axes are equal, which is plain RoPE.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RopeConfig, yarn_attention_factor


def rope_inverse_frequencies(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2]; YaRN blends interpolated and original frequencies by a ramp."""
    base = rope.theta
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim)
    inv_freq = 1.0 / pos_freqs
    if rope.rope_type != "yarn":
        return inv_freq
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return rotary_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # high-frequency pairs keep their frequency, low ones are divided by the factor
    return inv_freq / rope.factor * (1 - keep_original) + inv_freq * keep_original


def mrope_axis_of_pair(section: tuple[int, int, int], n_pairs: int) -> torch.Tensor:
    """Which position axis (0 = T, 1 = H, 2 = W) each frequency pair reads."""
    axis = torch.zeros(n_pairs, dtype=torch.long, device="cpu")
    for j in range(n_pairs):
        if j % 3 == 1 and j < 3 * section[1]:
            axis[j] = 1
        elif j % 3 == 2 and j < 3 * section[2]:
            axis[j] = 2
    return axis


class RotaryEmbedding(nn.Module):
    """positions -> (cos, sin) of shape [B, T, rotary_dim], shared by every full-attention layer."""

    def __init__(self, rope: RopeConfig, rotary_dim: int) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.scale = yarn_attention_factor(rope)
        # plain attributes, not buffers: model.to(bfloat16) must not round the frequencies
        self.inv_freq = rope_inverse_frequencies(rope, rotary_dim)
        self.axis = mrope_axis_of_pair(rope.mrope_section, rotary_dim // 2)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] for text, or [3, B, T] (T, H, W axes) for multimodal sequences."""
        if self.inv_freq.device != positions.device:
            self.inv_freq, self.axis = self.inv_freq.to(positions.device), self.axis.to(positions.device)
        if positions.dim() == 2:
            angles = positions[..., None].float() * self.inv_freq
        else:
            per_axis = positions[..., None].float() * self.inv_freq  # [3, B, T, P]
            angles = per_axis.gather(0, self.axis.view(1, 1, 1, -1).expand(1, *per_axis.shape[1:])).squeeze(0)
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, head_dim]; rotates the first rotary_dim dims (rotate-half pairing)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = r // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
