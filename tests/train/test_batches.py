"""Micro-batches: one epoch visits every example once, length-bucketed so little is padding, in an order that is
a pure function of (seed, epoch); rows are right-padded with masks that leave the padding out."""

from __future__ import annotations

import random

import torch

from qwen35.train.batches import BatchStream, TokenizedSet, collate, epoch_plan


def test_epoch_plan_covers_every_example_once_and_buckets() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    plan = epoch_plan(lengths, 8, seed=1, epoch=0)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(1000))
    assert plan == epoch_plan(lengths, 8, seed=1, epoch=0)
    assert plan != epoch_plan(lengths, 8, seed=1, epoch=1)
    # length bucketing: padding is a small share of a padded batch's tokens
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    assert sum(lengths) / padded > 0.9


def test_collate_right_pads() -> None:
    ts = TokenizedSet([torch.tensor([5, 6, 7]), torch.tensor([8])],
                        [torch.tensor([False, True, True]), torch.tensor([True])], ["a", "b"], [0, 1])
    b = collate(ts, [0, 1], pad_id=0)
    assert b.ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b.loss_mask.tolist() == [[False, True, True], [True, False, False]]
    assert b.valid.tolist() == [[True, True, True], [True, False, False]]
    assert b.tokens == 4


def test_batch_stream_runs_epoch_after_epoch() -> None:
    ids = [torch.arange(n + 1) for n in range(10)]
    ts = TokenizedSet(ids, [torch.ones(len(x), dtype=torch.bool) for x in ids], ["t"] * 10, list(range(10)))
    stream = BatchStream(ts, 2, seed=4, pad_id=0)
    first = [stream.indices(k) for k in range(5)]
    second = [stream.indices(k) for k in range(5, 10)]
    assert first == epoch_plan(ts.lengths(), 2, 4, 0) and second == epoch_plan(ts.lengths(), 2, 4, 1)
    b = stream[3]
    assert b.ids.shape == (2, max(len(ids[i]) for i in first[3]))
