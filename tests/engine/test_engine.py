"""Every engine path against the plain full forward of the same prompt (float32, greedy)."""

from __future__ import annotations

import random

import pytest
import torch

from qwen35.engine.llm_engine import EngineConfig, LLMEngine
from qwen35.engine.params import SamplingParams
from qwen35.memory import kv_bytes_per_token, state_bytes_per_sequence

GREEDY = dict(temperature=0.0, ignore_eos=True)


def solo_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: the full forward over the whole sequence at every step (no cache at all)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return done


def prompts_of(lengths, seed=0, vocab=95):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def cache_bytes(model, blocks: int, block_size: int, seqs: int) -> int:
    cfg = model.config
    return seqs * state_bytes_per_sequence(cfg, "fp32").total + blocks * block_size * kv_bytes_per_token(cfg, "fp32")


@pytest.mark.parametrize("chunk", [7, 64])
def test_batch_equals_solo_around_every_boundary(model, chunk, kernels_switch):
    # block size 8, chunk budget 7 or 64: lengths straddle 1, 2, chunk±1, block±1 and several chunks
    lengths = [1, 2, 6, 7, 8, 9, 15, 16, 17, 63, 65, 130]
    prompts = prompts_of(lengths)
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=6, max_num_batched_tokens=chunk, block_size=8))
    ids = [eng.add_request(p, SamplingParams(max_tokens=10, **GREEDY)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == solo_greedy(model, p, 10), f"prompt of {len(p)} tokens"
    assert eng.cache.usage()["blocks_used"] == 0 and eng.cache.usage()["slots_used"] == 0


def test_sequences_join_and_leave_midway(model):
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, block_size=4))
    prompts = prompts_of([5, 30, 3, 12, 40, 1], seed=1)
    max_tokens = [3, 12, 7, 2, 9, 5]
    ids, got, pending = {}, {}, list(zip(prompts, max_tokens))
    step = 0
    while pending or eng.has_unfinished():
        if pending and step % 3 == 0:  # a new request every third step, while others are mid-prefill/decode
            p, n = pending.pop(0)
            ids[eng.add_request(p, SamplingParams(max_tokens=n, **GREEDY))] = (p, n)
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.outputs[0].token_ids
        step += 1
    for rid, (p, n) in ids.items():
        assert got[rid] == solo_greedy(model, p, n)


def test_forced_preemption_recomputes_exactly(model):
    # 14 blocks of 4 tokens for 4 sequences that want up to 60 tokens each: the scheduler must preempt
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                                              cache_memory=cache_bytes(model, 14, 4, 4)))
    prompts = prompts_of([20, 9, 25, 14], seed=2)
    ids = [eng.add_request(p, SamplingParams(max_tokens=18, **GREEDY)) for p in prompts]
    seqs = [s for r in eng.requests.values() for s in r.seqs]
    got = run_all(eng)
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid, p in zip(ids, prompts):
        assert got[rid] == solo_greedy(model, p, 18)
    assert eng.cache.usage() == {"blocks_total": 14, "blocks_used": 0, "slots_total": 4, "slots_used": 0}


def test_garbage_in_pools_never_leaks(model, kernels_switch):
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, block_size=4))
    for pool in (eng.cache.kv.keys, eng.cache.kv.values, eng.cache.slots.windows, eng.cache.slots.states):
        for t in pool.values():
            t.fill_(float("nan"))
    prompts = prompts_of([11, 3, 17], seed=3)
    ids = [eng.add_request(p, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == solo_greedy(model, p, 6)


def test_freed_slot_is_reset(model):
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=1, max_num_batched_tokens=16, block_size=4))
    eng.add_request(prompts_of([9])[0], SamplingParams(max_tokens=3, **GREEDY))
    run_all(eng)
    assert all(float(t.abs().sum()) == 0 for t in eng.cache.slots.states.values())
    assert all(float(t.abs().sum()) == 0 for t in eng.cache.slots.windows.values())


def test_abort_frees_at_once(model):
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=8, block_size=4))
    rid = eng.add_request(prompts_of([30])[0], SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    assert eng.cache.usage()["blocks_used"] > 0
    assert eng.abort(rid)
    assert eng.cache.usage()["blocks_used"] == 0 and eng.cache.usage()["slots_used"] == 0
    assert not eng.has_unfinished() and not eng.abort(rid)


def test_seeded_sampling_is_batch_independent(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    p = prompts_of([10], seed=4)[0]
    alone = LLMEngine(model, None, EngineConfig(max_num_seqs=4, block_size=4))
    rid = alone.add_request(p, params)
    want = run_all(alone)[rid]
    busy = LLMEngine(model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=9, block_size=4))
    others = [busy.add_request(q, SamplingParams(temperature=0.8, seed=i, max_tokens=8, ignore_eos=True))
              for i, q in enumerate(prompts_of([3, 25, 7], seed=5))]
    rid = busy.add_request(p, params)
    assert run_all(busy)[rid] == want and others


def test_n_samples_and_stop_token(model):
    eng = LLMEngine(model, None, EngineConfig(block_size=4))
    p = prompts_of([6], seed=6)[0]
    ref = solo_greedy(model, p, 8)
    stop_at = ref[4]
    rid = eng.add_request(p, SamplingParams(n=2, max_tokens=8, temperature=0.0, stop_token_ids=[stop_at]))
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            out = o
    assert out.request_id == rid and len(out.outputs) == 2
    k = ref.index(stop_at)
    for o in out.outputs:
        assert o.token_ids == ref[:k + 1] and o.finish_reason == "stop" and o.stop_reason == stop_at


@pytest.mark.parametrize("prompt, error", [
    ([], "empty"), ([1, 2, 999], "outside the vocabulary"), ("text", "needs a tokenizer"),
])
def test_bad_requests(model, prompt, error):
    eng = LLMEngine(model, None, EngineConfig())
    with pytest.raises(ValueError, match=error):
        eng.add_request(prompt)


def test_prompt_longer_than_context_or_cache(model):
    eng = LLMEngine(model, None, EngineConfig(max_model_len=32))
    with pytest.raises(ValueError, match="the prompt has 40 tokens but the context holds 32"):
        eng.add_request(list(range(40)))
    small = LLMEngine(model, None, EngineConfig(max_num_seqs=1, block_size=4, cache_memory=cache_bytes(model, 5, 4, 1)))
    with pytest.raises(ValueError, match="context holds 20"):
        small.add_request(list(range(25)))


def test_cache_accounting_matches_qwen35_info(model):
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=3, block_size=8, cache_memory=cache_bytes(model, 10, 8, 3)))
    assert eng.cache.layout.num_blocks == 10
    assert eng.cache.nbytes() == eng.cache.layout.total_bytes == cache_bytes(model, 10, 8, 3)


@pytest.mark.slow
def test_soak_200_requests_with_preemption(model):
    rng = random.Random(7)
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=8, max_num_batched_tokens=24, block_size=4,
                                              cache_memory=cache_bytes(model, 40, 4, 8)))
    want, got, pending = {}, {}, []
    for i in range(200):
        p = prompts_of([rng.randint(1, 40)], seed=100 + i)[0]
        pending.append((p, rng.randint(1, 8)))
    seqs = []
    while pending or eng.has_unfinished():
        for _ in range(rng.randint(0, 6)):
            if pending:
                p, n = pending.pop()
                rid = eng.add_request(p, SamplingParams(max_tokens=n, **GREEDY))
                want[rid] = (p, n)
                seqs += eng.requests[rid].seqs
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.outputs[0].token_ids
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid, (p, n) in want.items():
        assert got[rid] == solo_greedy(model, p, n), rid
    u = eng.cache.usage()
    assert u["blocks_used"] == 0 and u["slots_used"] == 0 and eng.cache.kv.num_free == 40
