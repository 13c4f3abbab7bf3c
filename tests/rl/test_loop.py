"""The Ray loop end to end on a tiny random MoE model (one Ray start for the module).

Covers: a 2-update asynchronous run; a weight update reaching the rollout actors and changing their outputs; a
killed rollout actor replaced with the run finishing; exact resume from a checkpoint (synchronous mode, where
the schedule is deterministic).  The staleness bound is tested without Ray in test_staleness.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="the RL loop needs ray (pip install 'qwen35[rl]')")

from qwen35.rl.config import RLConfig  # noqa: E402
from qwen35.rl.loop import RLRun, run_rl  # noqa: E402

# each run starts Ray actors (a process importing torch each): tens of seconds on a loaded 2-core machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random MoE checkpoint (TINY_MODEL) with the embedded model's tokenizer."""
    from qwen35.llm import embedded_model_path
    from qwen35.model import init_weights
    from qwen35.train.presets import TINY_MODEL, build_model

    src = embedded_model_path()
    assert src is not None
    torch.manual_seed(0)
    body = dict(TINY_MODEL, mtp_num_hidden_layers=0)
    model = build_model(body, 2048, {"<|endoftext|>": 2011, "<|im_end|>": 2013})
    init_weights(model, 0.02)
    out = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(out, tokenizer_from=src)
    return out


def _cfg(tiny_dir, out, **kw) -> RLConfig:
    base = dict(model=str(tiny_dir), updates=2, groups_per_update=2, group_size=2, max_new_tokens=6,
                steps_per_call=2, lr=1e-3, min_lr=1e-3, out_dir=str(out), progress=False, save_every=1,
                tasks={"add2": 1.0, "reverse": 1.0})
    base.update(kw)
    return RLConfig(**base)


def _length_reward(example, text: str) -> float:
    # a random model never answers right; a reward that varies inside a group gives the update a gradient
    return float(len(text))


def test_two_updates_async_end_to_end(ray_session, tiny_dir, tmp_path):
    res = run_rl(_cfg(tiny_dir, tmp_path / "run"), reward_fn=_length_reward)
    assert [h["update"] for h in res.history] == [1, 2]
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for rec in lines:
        assert rec["staleness_max"] <= 1
        for key in ("reward", "loss", "is_weight", "mismatch_kl", "staleness_mean", "busy_seconds", "grad_norm"):
            assert key in rec
        assert rec["mismatch_kl"] < 1e-3  # the first update's samples come from the trainer's own weights
    assert (res.model_dir / "config.json").exists() and (res.model_dir / "tokenizer.json").exists()
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 0
    assert (tmp_path / "run" / "actor_time.png").stat().st_size > 0
    assert set(res.busy) == {"trainer", "rollout-0"}
    assert any(h["grad_norm"] > 0 for h in res.history)
    # the trained weights differ from the start (lr 1e-3, two steps)
    from qwen35.checkpoint import load_model
    a, b = load_model(tiny_dir, dtype="float32"), load_model(res.model_dir, dtype="float32")
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_weight_push_reaches_the_actor_and_changes_outputs(ray_session, tiny_dir):
    from qwen35.chat import Tokenizer
    from qwen35.checkpoint import load_model
    from qwen35.rl.loop import RolloutActor

    actor = ray.remote(num_cpus=1)(RolloutActor).remote(
        str(tiny_dir), {"threads": 1, "max_num_seqs": 4, "speculative": None, "routing_replay": True,
                        "group_size": 2, "max_new_tokens": 8, "max_tool_rounds": 4})
    ids = Tokenizer(tiny_dir).encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    ray.get(actor.submit.remote([(0, ids, 5, None)]))  # (group, prompt ids, seed, tool-task chat or None)
    before, _ = ray.get(actor.run.remote(None))
    state = load_model(tiny_dir, dtype="float32").state_dict()
    state = {k: v * 1.5 if v.is_floating_point() and v.dim() >= 2 else v for k, v in state.items()}
    ray.get(actor.set_weights.remote(ray.put(state), 7))
    ray.get(actor.submit.remote([(0, ids, 5, None)]))  # the same group, the same seed
    after, _ = ray.get(actor.run.remote(None))
    ray.kill(actor)
    assert [s.versions[0] for s in before[0]] == [0, 0] and [s.versions[0] for s in after[0]] == [7, 7]
    assert [s.logprobs for s in before[0]] != [s.logprobs for s in after[0]]


def test_a_killed_rollout_actor_is_replaced_and_the_run_finishes(ray_session, tiny_dir, tmp_path):
    killed = []

    def kill_once(run: RLRun, event: str) -> None:
        if event == "rollout" and not killed and any(run.assigned.values()):
            killed.append(True)
            ray.kill(run.rollouts[0])

    res = run_rl(_cfg(tiny_dir, tmp_path / "run", updates=3), callback=kill_once)
    assert killed and res.restarts == 1
    assert [h["update"] for h in res.history] == [1, 2, 3]
    # every trained group appears once: the re-queued ones were generated again, none twice
    trained = [g for h in res.history for g in h["groups_trained"]]
    assert len(trained) == len(set(trained)) == 6


def test_resume_is_exact_in_sync_mode(ray_session, tiny_dir, tmp_path):
    from qwen35.checkpoint import load_model

    straight = run_rl(_cfg(tiny_dir, tmp_path / "a", mode="sync", updates=2))
    run_rl(_cfg(tiny_dir, tmp_path / "b", mode="sync", updates=1))
    resumed = run_rl(_cfg(tiny_dir, tmp_path / "b", mode="sync", updates=2), resume=True)
    assert [h["update"] for h in resumed.history] == [1, 2]
    assert [h["groups_trained"] for h in resumed.history] == [h["groups_trained"] for h in straight.history]
    assert resumed.history[1]["loss"] == straight.history[1]["loss"]
    a = load_model(straight.model_dir, dtype="float32").state_dict()
    b = load_model(resumed.model_dir, dtype="float32").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError, match="resume"):
        RLRun(_cfg(tiny_dir, tmp_path / "b", mode="sync"))
    with pytest.raises(ValueError, match="cannot resume"):
        run_rl(_cfg(tiny_dir, tmp_path / "b", mode="sync", updates=3, lr=5e-4, min_lr=5e-4), resume=True)
