"""The RL trainer's supervised replay (sft_coef): its batches and its share of an update, against the plain
supervised step of qwen35.train on the same batch."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen35.engine import EngineConfig
from qwen35.rl import trainer as rl_trainer
from qwen35.rl.config import RLConfig
from qwen35.rl.rollout import RolloutWorker, rollout_params
from qwen35.rl.trainer import RLTrainer, optim_config, sft_stream
from qwen35.train.losses import forward_losses
from qwen35.train.optim import make_optimizer, optimizer_step


@pytest.fixture
def embedded(monkeypatch):
    from qwen35.chat import Tokenizer
    from qwen35.checkpoint import load_model
    from qwen35.llm import embedded_model_path

    monkeypatch.setattr(rl_trainer, "SFT_POOL", 48)  # a small pool keeps the test fast; the logic is the same
    path = embedded_model_path()
    assert path is not None, "this checkout has no embedded model"
    return str(path), load_model(path, dtype="float32"), Tokenizer(path)


def _samples(model, tok):
    from qwen35.rl.rewards import TaskPrompts

    prompts = TaskPrompts(tok, {"add2": 1.0}, seed=0, think_prob=0.0)
    worker = RolloutWorker(copy.deepcopy(model).eval(), tok, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
    groups = worker.generate([(i, prompts[i].ids) for i in range(2)], rollout_params(2, 12, seed=0))
    return [s for g in groups for s in g]


def test_replay_batches_do_not_depend_on_the_run_length(embedded):
    """Batch k is a function of (seed, k): a resume that raises ``updates`` replays the same examples."""
    path, _, _ = embedded
    short, long = (sft_stream(RLConfig(sft_coef=0.1, updates=u, sft_batch=4), path) for u in (3, 200))
    for k in (0, 5, 13):  # 13: past the first pass over the 48-example pool
        a, b = short[k], long[k]
        assert torch.equal(a.ids, b.ids) and torch.equal(a.loss_mask, b.loss_mask)
        assert a.ids.shape[0] == 4 and a.loss_mask.any()
    with pytest.raises(ValueError, match="model folder"):
        sft_stream(RLConfig(sft_coef=0.1), None)
    with pytest.raises(ValueError, match="sft_coef"):
        RLConfig(sft_coef=-1.0).validate()


def test_replay_loss_is_the_supervised_step_when_advantages_are_zero(embedded):
    """With every advantage 0 the policy gradient is 0, so an update with sft_coef c is exactly qwen35.train's
    optimiser step on c times the LM loss of replay batch 0 — and with sft_coef 0 nothing moves."""
    path, model, tok = embedded
    samples = _samples(model, tok)
    zeros = [0.0] * len(samples)
    cfg = dict(lr=1e-3, min_lr=1e-3, updates=2, group_size=2, micro_batch=4)

    still = RLTrainer(copy.deepcopy(model), RLConfig(**cfg), tokenizer_dir=path)
    before = {k: v.clone() for k, v in still.model.state_dict().items()}
    still.train_step(samples, zeros)
    assert all(torch.equal(before[k], v) for k, v in still.model.state_dict().items())

    rl = RLTrainer(copy.deepcopy(model), RLConfig(sft_coef=0.5, sft_batch=4, **cfg), tokenizer_dir=path)
    stats = rl.train_step(samples, zeros)

    want = copy.deepcopy(model).float().train()
    for name, p in want.named_parameters():
        p.requires_grad_(not name.startswith("mtp."))
    params = [p for p in want.parameters() if p.requires_grad]
    optim = optim_config(rl.cfg)
    opt = make_optimizer(params, optim)
    sft = forward_losses(want, None, rl.sft[0])
    loss = sft.main_sum / sft.main_n
    (0.5 * loss).backward()
    optimizer_step(opt, params, 0, optim)
    assert stats["sft_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    got, ref = rl.model.state_dict(), want.state_dict()
    moved = 0
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(ref[k], before[k]))
    assert moved > 0
