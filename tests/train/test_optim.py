"""The shared optimiser path (qwen35.train.optim): the schedule's shape, per-part peak rates, and a step that is
exactly AdamW + clipping at the scheduled rate (compared against torch's own LambdaLR scheduler)."""

from __future__ import annotations

import math

import pytest
import torch

from qwen35.train.config import TrainConfig
from qwen35.train.optim import OptimConfig, lr_factor, make_optimizer, optimizer_step


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine decays monotonically
    assert lr_factor(100, cfg) == pytest.approx(0.1)  # ends at min_lr
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)  # half way down at the middle of the decay


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def _grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3.0  # large enough that clipping acts


def test_step_equals_adamw_with_torch_scheduler_and_clipping() -> None:
    cfg = OptimConfig(steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=3, weight_decay=0.1, grad_clip=1.0)
    ours, ref = _params(0), _params(0)
    opt = make_optimizer(ours, cfg)
    ref_opt = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}],
                                lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: lr_factor(s, cfg))
    for step in range(cfg.steps):
        _grads(ours, step)
        _grads(ref, step)
        want_norm = float(torch.nn.utils.clip_grad_norm_(ref, 1.0))
        want_lr = ref_opt.param_groups[0]["lr"]
        ref_opt.step()
        ref_opt.zero_grad()
        sched.step()
        norm, lr = optimizer_step(opt, ours, step, cfg)
        assert norm == pytest.approx(want_norm, rel=1e-6) and lr == pytest.approx(want_lr, rel=1e-12)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert all(p.grad is None for p in ours)


def test_parts_learn_at_their_own_peak_and_decay_only_matrices() -> None:
    cfg = OptimConfig(steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=0, weight_decay=0.2, grad_clip=0.0)
    new, old = _params(1), _params(2)
    opt = make_optimizer([(new, 5e-3), (old, 1e-3)], cfg)
    decays = [(g["peak_lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert decays == [(5e-3, 0.2, 1), (5e-3, 0.0, 1), (1e-3, 0.2, 1), (1e-3, 0.0, 1)]
    _grads(new + old, 0)
    optimizer_step(opt, new + old, 5, cfg)
    f = lr_factor(5, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-3 * f, 5e-3 * f, 1e-3 * f, 1e-3 * f])
    assert f == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_train_config_is_an_optimiser_config() -> None:
    cfg = TrainConfig(steps=20, lr=2e-3, min_lr=2e-4, warmup_steps=5)
    same = OptimConfig(steps=20, lr=2e-3, min_lr=2e-4, warmup_steps=5, weight_decay=cfg.weight_decay,
                       betas=cfg.betas, grad_clip=cfg.grad_clip)
    assert [lr_factor(s, cfg) for s in range(25)] == [lr_factor(s, same) for s in range(25)]
