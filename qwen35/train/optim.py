"""The optimiser, schedule and step that every trainer in qwen35 shares: pretraining (:mod:`qwen35.train.loop`),
the embedded model's vision stage and MTP fit, and RL (:mod:`qwen35.rl.trainer`).

* **AdamW** with weight decay on matrices only (and the 3-D expert / conv weights): decaying norms, ``A_log`` or
  ``dt_bias`` would pull them towards values that mean something else (zero-centred norms, decay rates).  Parts
  of a model may learn at different peak rates (a new vision tower beside a trained language model): pass
  ``(parameters, peak lr)`` pairs.
* **Schedule:** linear warmup, then cosine decay from each group's peak to ``min_lr / lr`` of it.  The rate of
  step s is a pure function of s, so a resumed run needs only its step count, not a scheduler's state.
* **Step:** the rates of step s, global gradient-norm clipping, the AdamW update, gradients cleared.

Anything with the attribute names of :class:`OptimConfig` configures them (:class:`qwen35.train.TrainConfig`
has them all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class OptimSettings(Protocol):
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and schedule settings, for trainers that are not configured by a TrainConfig."""

    steps: int  # optimiser steps the schedule spans
    lr: float  # peak rate (of the groups given without their own)
    min_lr: float = 0.0  # end of the cosine decay; each group ends at the same share min_lr / lr of its peak
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)


ParamParts = Sequence[nn.Parameter] | Sequence[tuple[Sequence[nn.Parameter], float]]


def make_optimizer(params: ParamParts, cfg: OptimSettings) -> torch.optim.AdamW:
    """AdamW over ``params`` (a list of parameters, learning at ``cfg.lr``, or ``(parameters, peak lr)`` pairs):
    two groups per part, decayed matrices and undecayed 1-D parameters, each remembering its peak rate."""
    params = list(params)
    parts = params if params and isinstance(params[0], tuple) else [(params, cfg.lr)]
    groups = []
    for part, peak in parts:
        part = list(part)
        groups.append({"params": [p for p in part if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                       "peak_lr": peak, "lr": peak})
        groups.append({"params": [p for p in part if p.dim() < 2], "weight_decay": 0.0, "peak_lr": peak,
                       "lr": peak})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def lr_factor(step: int, cfg: OptimSettings) -> float:
    """Multiplier of the peak rate at optimiser step ``step`` (0-based): linear warmup, then cosine to
    ``min_lr / lr``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], step: int,
                   cfg: OptimSettings) -> tuple[float, float]:
    """Optimiser step ``step`` (0-based) on the gradients accumulated in ``params``: every group at its peak
    times :func:`lr_factor`, gradients clipped to ``cfg.grad_clip`` (0: not clipped), the update, gradients
    cleared.  Returns (the gradient norm before clipping, the first group's rate)."""
    factor = lr_factor(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), optimizer.param_groups[0]["lr"]


__all__ = ["OptimConfig", "OptimSettings", "make_optimizer", "lr_factor", "optimizer_step"]
