"""Rollouts through the engine: logprobs, versions and routing, checked against the trainer's dense forward.

At learning rate 0 the trainer's recomputed logprob of every sampled token must equal the engine's (the only
difference is the program: paged, chunked engine kernels vs one dense forward), for a dense model, for a MoE
model with routing replay, under speculative decoding, and for the shipped embedded model."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen35.engine import EngineConfig
from qwen35.engine.speculative import SpeculativeConfig
from qwen35.rl.config import RLConfig
from qwen35.rl.rollout import RolloutWorker, RoutingRecorder, replay_routing, rollout_params
from qwen35.rl.trainer import RLTrainer
from tests.engine.conftest import tiny_model

PROMPTS = [[1, 5, 9, 13, 2, 7], [3, 3, 8, 1, 4, 4, 8, 1, 4, 4, 8, 1], [60, 61, 62]]


def _rollout(model, n=3, max_tokens=12, speculative=None, seed=7, record=True):
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, speculative_config=speculative)
    worker = RolloutWorker(copy.deepcopy(model), None, cfg, record_routing=record)
    groups = worker.generate(list(enumerate(PROMPTS)), rollout_params(n, max_tokens, seed))
    return worker, [s for g in groups for s in g]


def _trainer(model, **kw):
    cfg = RLConfig(lr=0.0, min_lr=0.0, updates=2, group_size=3, **kw)
    return RLTrainer(copy.deepcopy(model), cfg)


def _max_diff(trainer, samples):
    got = trainer.logprobs(samples)
    return max(max(abs(a - b) for a, b in zip(g, s.logprobs)) for g, s in zip(got, samples))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_trainer_logprobs_equal_the_engines(moe):
    model = tiny_model(moe)
    _, samples = _rollout(model)
    assert len(samples) == 9 and all(s.versions == [0] * len(s.completion_ids) for s in samples)
    assert all(len(s.logprobs) == len(s.completion_ids) > 0 for s in samples)
    assert (samples[0].routing is not None) == moe
    assert _max_diff(_trainer(model, routing_replay=True), samples) < 2e-4


def test_recorded_routing_is_the_dense_forwards():
    model = tiny_model(True)
    _, samples = _rollout(model)
    rec = RoutingRecorder(model).attach()
    agree = total = 0
    for s in samples:
        full = torch.tensor([s.prompt_ids + s.completion_ids[:-1]])
        with torch.no_grad():
            model(full)
        own = rec.take()  # [layers, positions, k]
        assert own.shape == s.routing.shape
        agree += int((own.sort(-1).values == s.routing.sort(-1).values).all(-1).sum())
        total += own.shape[0] * own.shape[1]
    rec.detach()
    assert agree / total > 0.99  # a near-tie may flip under a different summation order, nothing more


def test_replay_makes_the_router_take_the_given_experts():
    model = tiny_model(True)
    ids = torch.tensor([[1, 2, 3, 4]])
    k = model.text_config.num_experts_per_tok
    forced = torch.tensor([[0, 1]] * 4).expand(4, 4, k).contiguous()  # every layer, every token: experts 0, 1
    rec = RoutingRecorder(model).attach()
    with torch.no_grad(), replay_routing(model, forced):
        replayed = model(ids).logits
    got = rec.take()
    rec.detach()
    assert torch.equal(got.long(), forced)
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.allclose(replayed, plain)  # the replayed experts were not the model's own choice
    with pytest.raises(ValueError, match="layers"):
        with replay_routing(model, forced[:2]):
            pass


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_speculative_rollouts_keep_target_logprobs(moe):
    model = tiny_model(moe)
    spec = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3})
    worker, samples = _rollout(model, max_tokens=16, speculative=spec)
    assert worker.engine.drafter is not None
    assert _max_diff(_trainer(model, routing_replay=True), samples) < 2e-4


def test_weight_update_in_flight_tags_versions_and_changes_outputs():
    model = tiny_model(True)
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64)
    worker = RolloutWorker(copy.deepcopy(model), None, cfg)
    params = rollout_params(1, 10, seed=3)
    worker.submit(0, PROMPTS[0], params)
    assert worker.run(max_steps=4) == []  # the prompt step samples token 1, then 3 decodes: not done yet
    new = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
           for k, v in model.state_dict().items()}
    worker.set_weights(new, version=1)
    (s,), = worker.run()
    assert s.versions == [0] * 4 + [1] * 6  # tokens sampled after the update carry the new version
    # a fresh group under the new weights differs from the old model's greedy-equal seed
    old_worker = RolloutWorker(copy.deepcopy(model), None, cfg)
    a = old_worker.generate([(1, PROMPTS[1])], params)[0][0]
    b = worker.generate([(1, PROMPTS[1])], params)[0][0]
    assert a.versions[0] == 0 and b.versions[0] == 1
    assert a.completion_ids != b.completion_ids or a.logprobs != b.logprobs
    with pytest.raises(ValueError, match="do not fit"):
        worker.set_weights({"nope": torch.zeros(1)}, 2)


def test_rollouts_refuse_a_reshaped_distribution():
    with pytest.raises(ValueError, match="temperature 1"):
        rollout_params(2, 8, 0, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        rollout_params(2, 8, 0, top_p=0.9)


def test_embedded_model_logprobs_with_replay():
    from qwen35.chat import Tokenizer
    from qwen35.checkpoint import load_model
    from qwen35.llm import embedded_model_path
    from qwen35.rl.rewards import TaskPrompts

    path = embedded_model_path()
    assert path is not None, "this checkout has no embedded model"
    model = load_model(path, dtype="float32").eval()
    tok = Tokenizer(path)
    prompts = TaskPrompts(tok, {"add2": 1.0, "reverse": 1.0}, seed=0, think_prob=0.5)
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256)
    worker = RolloutWorker(model, tok, cfg)
    groups = worker.generate([(i, prompts[i].ids) for i in range(2)], rollout_params(2, 24, seed=0))
    samples = [s for g in groups for s in g]
    trainer = RLTrainer(load_model(path, dtype="float32"), RLConfig(lr=0.0, min_lr=0.0, updates=1, group_size=2),
                        vocab_limit=len(tok))
    assert trainer.replay
    assert _max_diff(trainer, samples) < 2e-4
