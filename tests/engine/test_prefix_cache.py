"""Prefix caching: a request resumed from a cached prefix gives exactly the output it gives computed from scratch
(greedy, float32, token for token) -- for cached lengths around block boundaries and below one block, from the end
of a finished generation, from the grid inside a long prompt, with concurrent requests sharing a prefix, after
eviction, under preemption, with n > 1, with speculative decoding -- and every block comes back; the bookkeeping
(blocks.py) on its own, without torch; a multi-turn chat with the embedded model reuses the whole history."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qwen35.engine import EngineConfig, LLMEngine, SamplingParams
from qwen35.engine.blocks import BlockManager, extend_hashes, root_hash
from qwen35.engine.speculative import Drafter, SpeculativeConfig

from .test_engine import cache_bytes, prompts_of, solo_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)
BOUNDARY_LENGTHS = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17]


def engine(model, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    return LLMEngine(model, None, EngineConfig(**kw))


def finish(eng: LLMEngine) -> dict:
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return done


def run(eng: LLMEngine, prompt, max_tokens: int, **kw):
    rid = eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw}))
    return finish(eng)[rid]


def assert_nothing_leaks(eng: LLMEngine) -> None:
    """Sequences hold nothing; once the cache lets go of its snapshots every reference count is zero again."""
    u = eng.cache.usage()
    assert u["blocks_used"] == 0 and u["slots_used"] == 0 and not eng.cache.block_tables
    b = eng.cache.blocks
    b.clear()
    assert b.num_free == b.num_blocks and b.num_cached == 0 and b.num_snapshots == 0
    assert all(b.refs(i) == (0, 0) for i in range(b.num_blocks))


# ---------------------------------------------------------------------------------------------------------------
# hits give what misses give


@pytest.mark.parametrize("block_size", [4, 8])
def test_hit_equals_miss_around_block_boundaries(model, block_size):
    base = prompts_of([17], seed=11)[0]
    eng = engine(model, block_size=block_size, max_num_batched_tokens=64)
    cold = engine(model, block_size=block_size, max_num_batched_tokens=64, enable_prefix_caching=False)
    for c in BOUNDARY_LENGTHS:
        eng.cache.blocks.clear()
        first = run(eng, base[:c], 1)  # leaves the state at the end of its prompt: c tokens
        assert first.num_cached_tokens == 0
        prompt = base[:c] + prompts_of([6], seed=100 + c)[0]
        hit = run(eng, prompt, 8)
        assert hit.num_cached_tokens == c, f"cached prefix of {c}"
        miss = run(cold, prompt, 8)
        assert miss.num_cached_tokens == 0
        assert hit.outputs[0].token_ids == miss.outputs[0].token_ids == solo_greedy(model, prompt, 8), c
    assert cold.cache.prefix_usage()["prefix_cache_hits"] == 0
    assert_nothing_leaks(eng)


def test_resume_is_bitwise_the_same_as_that_chunking(model):
    # restoring a snapshot is exact: a hit at 12 then a chunk of 6 gives the very logprobs of a miss whose prompt
    # is chunked at 12 (other chunkings may differ in the last bits; greedy tokens agree, tested above)
    p = prompts_of([18], seed=33)[0]
    eng = engine(model)
    run(eng, p[:12], 1)
    hit = run(eng, p, 8, logprobs=0)
    split = run(engine(model, max_num_batched_tokens=12, enable_prefix_caching=False), p, 8, logprobs=0)
    assert hit.num_cached_tokens == 12 and split.num_cached_tokens == 0
    assert hit.outputs[0].token_ids == split.outputs[0].token_ids
    assert hit.outputs[0].logprobs == split.outputs[0].logprobs


def test_a_finished_generation_is_resumed(model):
    # the next turn of a conversation continues the text of the last one: prompt + answer + new tokens
    eng = engine(model)
    p = prompts_of([10], seed=12)[0]
    first = run(eng, p, 6)
    prompt = p + first.outputs[0].token_ids + prompts_of([5], seed=13)[0]
    second = run(eng, prompt, 8)
    assert second.num_cached_tokens == len(p) + 6 - 1  # all but the last generated token, which never ran
    assert second.outputs[0].token_ids == solo_greedy(model, prompt, 8)
    assert_nothing_leaks(eng)


def test_snapshots_on_the_grid_of_a_long_prompt(model):
    eng = engine(model, max_num_batched_tokens=64)
    eng.cache.snapshot_interval = 8
    long = prompts_of([30], seed=14)[0]
    chunks = []
    schedule = eng.scheduler.schedule

    def recording():
        batch = schedule()
        chunks.extend(n for _, n in batch.prefills)
        return batch

    eng.scheduler.schedule = recording
    run(eng, long, 2)
    # one chunk of 30: the grid points 8, 16, 24 inside it split only the DeltaNet mix, whose states the cache kept
    assert chunks == [30]
    assert eng.cache.prefix_usage()["prefix_cache_snapshots_taken"] >= 4  # 8, 16, 24 and the end of the answer
    eng.scheduler.schedule = schedule
    # diverges at 27: the deepest grid point before it is 24
    prompt = long[:27] + [(t + 1) % 95 for t in long[27:]]
    out = run(eng, prompt, 8)
    assert out.num_cached_tokens == 24
    assert out.outputs[0].token_ids == solo_greedy(model, prompt, 8)
    # the same prompt again: served up to its deepest snapshot short of its end (one token must run)
    again = run(eng, prompt, 8)
    assert again.num_cached_tokens == 24 and again.outputs[0].token_ids == out.outputs[0].token_ids
    assert_nothing_leaks(eng)


def test_a_state_kept_inside_a_chunk_resumes_like_that_chunking(model):
    # a message start inside a prompt chunk: the state kept there resumes exactly like a chunk that ended there
    p = prompts_of([18], seed=35)[0]
    eng = engine(model)
    eng.cache.snapshot_interval = 0
    rid = eng.add_request(p[:14], SamplingParams(max_tokens=1, **GREEDY))
    eng.scheduler.waiting[0].snapshot_marks = [11]  # what message_marks gives a chat prompt
    assert finish(eng)[rid].num_cached_tokens == 0
    # only the kept state at 11 matches a prompt that diverges at 12
    diverged = p[:12] + [(t + 1) % 95 for t in p[12:]]
    hit = run(eng, diverged, 8, logprobs=0)
    split = run(engine(model, max_num_batched_tokens=11, enable_prefix_caching=False), diverged, 8, logprobs=0)
    assert hit.num_cached_tokens == 11 and split.num_cached_tokens == 0
    assert hit.outputs[0].token_ids == split.outputs[0].token_ids
    # the same DeltaNet arithmetic; the K/V rows before 11 came from a 14-row projection (MoE expert batches of
    # another size round differently in the last bits), hence close rather than equal
    assert hit.outputs[0].logprobs == pytest.approx(split.outputs[0].logprobs, abs=1e-5)
    assert_nothing_leaks(eng)


def test_concurrent_requests_sharing_a_prefix(model):
    eng = engine(model, max_num_seqs=3, max_num_batched_tokens=16)
    eng.cache.snapshot_interval = 8
    shared = prompts_of([21], seed=15)[0]
    prompts = [shared + s for s in prompts_of([5, 1, 9, 3, 5, 12], seed=16)]
    prompts.append(list(prompts[0]))  # the very same prompt twice
    ids = [eng.add_request(p, SamplingParams(max_tokens=7, **GREEDY)) for p in prompts]
    done = finish(eng)
    for rid, p in zip(ids, prompts):
        assert done[rid].outputs[0].token_ids == solo_greedy(model, p, 7), len(p)
    cached = [done[r].num_cached_tokens for r in ids]
    assert cached[0] == 0 and max(cached) >= 16  # the later ones resumed from the first one's grid
    assert_nothing_leaks(eng)


def test_eviction_in_a_small_cache(model):
    # 30 blocks for 2 sequences; a snapshot takes 5 blocks of state + its KV: the cache keeps only a few
    eng = engine(model, max_num_seqs=2, max_num_batched_tokens=16,
                 cache_memory=cache_bytes(model, 30, 4, 2))
    eng.cache.snapshot_interval = 8
    stems = prompts_of([9, 14, 6], seed=17)
    for i in range(12):
        stem = stems[(i // 2) % 3]  # pairs of requests share a stem; by its next turn it was evicted
        prompt = stem + prompts_of([1 + i % 5], seed=200 + i)[0]
        out = run(eng, prompt, 5)
        assert out.outputs[0].token_ids == solo_greedy(model, prompt, 5), i
    s = eng.cache.prefix_usage()
    assert s["prefix_cache_evictions"] > 0 and s["prefix_cache_hit_requests"] > 0
    assert_nothing_leaks(eng)


def test_preemption_after_a_hit_recomputes_exactly(model):
    # 14 blocks for 4 sequences (as in test_engine's preemption test), prompts sharing a prefix
    eng = engine(model, max_num_seqs=4, max_num_batched_tokens=32, cache_memory=cache_bytes(model, 14, 4, 4))
    eng.cache.snapshot_interval = 8
    shared = prompts_of([10], seed=18)[0]
    run(eng, shared, 1)
    prompts = [shared + s for s in prompts_of([10, 2, 14, 5], seed=19)]
    ids = [eng.add_request(p, SamplingParams(max_tokens=18, **GREEDY)) for p in prompts]
    seqs = [s for r in eng.requests.values() for s in r.seqs]
    done = finish(eng)
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid, p in zip(ids, prompts):
        assert done[rid].outputs[0].token_ids == solo_greedy(model, p, 18)
    assert eng.cache.prefix_usage()["prefix_cache_hit_requests"] > 0
    assert_nothing_leaks(eng)


def test_a_preempted_sequence_resumes_from_the_cache(model):
    # preemption drops a sequence's blocks and slot; recomputed, it starts again from the deepest snapshot of its
    # tokens (here its own prompt end) -- the runner continues from the restored state, not from a zeroed slot
    from qwen35.engine.scheduler import ScheduledBatch

    eng = engine(model, max_num_batched_tokens=8)
    p = prompts_of([6], seed=30)[0]
    run(eng, p, 1)
    prompt = p + prompts_of([13], seed=31)[0]
    rid = eng.add_request(prompt, SamplingParams(max_tokens=10, **GREEDY))
    seq = eng.requests[rid].seqs[0]
    resumed = []
    resume = eng.cache.resume
    eng.cache.resume = lambda s, snap: resumed.append((s.num_preemptions, snap.length)) or resume(s, snap)
    eng.step()  # admitted after the 6 cached tokens: one chunk of 8
    assert seq.num_computed == 14 and resumed == [(0, 6)]
    eng.scheduler._preempt(seq, ScheduledBatch())  # mid-prompt
    while len(seq.output_ids) < 4:
        eng.step()
    eng.scheduler._preempt(seq, ScheduledBatch())  # while decoding
    out = finish(eng)[rid]
    assert [n for n, _ in resumed] == [0, 1, 2] and resumed[2][1] == len(prompt)  # its own prompt end
    assert out.num_cached_tokens == 6 and seq.num_preemptions == 2
    assert out.outputs[0].token_ids == solo_greedy(model, prompt, 10)
    assert_nothing_leaks(eng)


def test_resume_copies_the_tail_rows_of_shadow_tensors(model):
    # per-position tensors others keep in the KV layout (an MTP drafter's KV) follow a resumed sequence's copy
    import torch

    eng = engine(model)
    like = next(iter(eng.cache.kv.keys.values()))
    shadow = torch.arange(like.shape[0], dtype=like.dtype)[:, None, None].expand_as(like).contiguous()
    eng.cache.shadow_kv.append(shadow)
    p = prompts_of([6], seed=32)[0]  # one full block of 4 and a tail of 2
    run(eng, p, 1)
    snap = eng.cache.blocks.lookup(p + [1], eng.cache.hashes(_seq(p + [1])), 6)
    rid = eng.add_request(p + [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))
    seq = eng.requests[rid].seqs[0]
    eng.step()
    tail = eng.cache.block_tables[seq.seq_id][1]
    src = snap.blocks[1]
    assert tail != src and shadow[tail * 4:tail * 4 + 2, 0, 0].tolist() == [src * 4, src * 4 + 1]
    finish(eng)


def _seq(ids):
    from qwen35.engine.sequence import Sequence
    return Sequence("probe", ids, SamplingParams())


def test_n_greater_than_one(model):
    eng = engine(model)
    cold = engine(model, enable_prefix_caching=False)
    p = prompts_of([11], seed=20)[0]
    rid = eng.add_request(p, SamplingParams(n=3, max_tokens=6, **GREEDY))
    out = finish(eng)[rid]
    assert [o.token_ids for o in out.outputs] == [solo_greedy(model, p, 6)] * 3
    longer = p + prompts_of([4], seed=21)[0]
    rid = eng.add_request(longer, SamplingParams(n=2, max_tokens=6, **GREEDY))
    out = finish(eng)[rid]
    assert out.num_cached_tokens == len(p)
    assert [o.token_ids for o in out.outputs] == [solo_greedy(model, longer, 6)] * 2
    # seeded sampling: the same tokens from a cached prefix as from scratch
    sampled = SamplingParams(n=2, max_tokens=8, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)
    got = []
    for e in (eng, cold):
        rid = e.add_request(longer + [3], sampled)
        got.append(finish(e)[rid])
    assert got[0].num_cached_tokens > 0 and got[1].num_cached_tokens == 0
    assert [o.token_ids for o in got[0].outputs] == [o.token_ids for o in got[1].outputs]
    assert_nothing_leaks(eng)


def test_disabled_means_no_lookups_and_no_snapshots(model):
    eng = engine(model, enable_prefix_caching=False)
    p = prompts_of([12], seed=22)[0]
    run(eng, p, 3)
    out = run(eng, p + [1, 2, 3], 3)
    assert out.num_cached_tokens == 0 and not eng.cache.prefix_caching
    assert eng.cache.blocks.num_snapshots == 0 and eng.cache.prefix_usage()["prefix_cache_lookups"] == 0
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="yes")


def test_stats_count_tokens_and_requests(model):
    eng = engine(model)
    p = prompts_of([9], seed=23)[0]
    run(eng, p, 1)
    run(eng, p + [4, 5], 2)
    s = eng.cache.prefix_usage()
    assert s["prefix_cache_lookups"] == 2 and s["prefix_cache_queries"] == 9 + 11
    assert s["prefix_cache_hits"] == 9 and s["prefix_cache_hit_requests"] == 1
    assert s["prefix_cache_snapshots"] >= 2 and s["blocks_cached"] > 0
    from qwen35.engine import AsyncLLM
    a = AsyncLLM(eng)
    try:
        stats = a.stats()
    finally:
        a.shutdown()
    assert stats["prefix_cache_hits"] == 9 and stats["blocks_used"] == 0


# ---------------------------------------------------------------------------------------------------------------
# speculative decoding on top


class TruthDrafter(Drafter):
    """Drafts the known greedy continuation: every verify accepts all its drafts."""

    def __init__(self, config: SpeculativeConfig, truth: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(config)
        self.truth = truth

    def propose(self, seqs, max_model_len):
        for seq in seqs:
            done = len(seq.output_ids)
            room = min(self.config.num_speculative_tokens, seq.params.max_tokens - done - 1)
            if room > 0:
                seq.draft_ids = list(self.truth[tuple(seq.prompt_ids)][done:done + room])


def test_speculative_decoding_with_prefix_caching_is_token_identical(model):
    cfg = SpeculativeConfig(num_speculative_tokens=3, warmup=10 ** 6)
    eng = engine(model, max_num_seqs=4, max_num_batched_tokens=32, speculative_config=cfg)
    p = prompts_of([9], seed=24)[0]
    full = solo_greedy(model, p, 16)
    # stop at a token that 1 + 3 tokens per verify put inside a verify, not at its end (out[0] comes from the
    # prompt, then verifies give out[1:5], out[5:9], ...): the finish snapshot must come from the state the cache
    # kept during the step, not from the slot, which is past the drafts
    stop_at = next(i for i in range(5, 16) if full[i] not in full[:i] and (i - 1) % 4 != 3)
    eng.drafter = TruthDrafter(cfg, {tuple(p): full})
    kept = []  # finish snapshots taken from a state the cache kept during a verify step
    snapshot = eng.cache.snapshot

    def spy(seq, length, step=None):
        kept.append(step is not None and (seq.seq_id, step) in eng.cache._step_states)
        return snapshot(seq, length, step)

    eng.cache.snapshot = spy
    first = run(eng, p, 16, stop_token_ids=[full[stop_at]])
    assert first.outputs[0].token_ids == full[:stop_at + 1]
    assert any(kept)
    cont = p + first.outputs[0].token_ids + prompts_of([3], seed=25)[0]
    prompts = [cont, p + full[:3]]
    truth = {tuple(q): solo_greedy(model, q, 12) for q in prompts}
    eng.drafter = TruthDrafter(cfg, truth)
    ids = [eng.add_request(q, SamplingParams(max_tokens=12, **GREEDY)) for q in prompts]
    done = finish(eng)
    assert done[ids[0]].num_cached_tokens == len(p) + stop_at  # the finish snapshot, taken mid-verify
    for rid, q in zip(ids, prompts):
        assert done[rid].outputs[0].token_ids == truth[tuple(q)]
    assert eng.drafter.stats.accepted > 0
    assert_nothing_leaks(eng)


# ---------------------------------------------------------------------------------------------------------------
# the bookkeeping alone


def _fill(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[bytes]:
    bm.open(seq_id)
    assert bm.grow(seq_id, len(tokens))
    return extend_hashes([root_hash("m", "fp32", bm.block_size)], tokens, bm.block_size)


def test_block_manager_shares_pins_and_evicts():
    bm = BlockManager(num_blocks=12, block_size=4, snapshot_blocks=2)
    a = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 in the third
    ha = _fill(bm, 1, a)
    assert bm.num_used == 3 and bm.num_available == 9
    snap = bm.capture(1, a, ha, 10)
    assert snap is not None and snap.length == 10 and len(snap.blocks) == 3 and len(snap.state_blocks) == 2
    assert bm.capture(1, a, ha, 10) is None  # already cached: refreshed, not doubled
    assert bm.num_used == 3 and bm.num_cached == 2 and bm.num_available == 9
    short = bm.capture(1, a, ha, 3)  # a prefix shorter than one block
    assert short is not None and short.blocks == [bm.tables[1][0]]
    bm.release(1)
    assert bm.num_used == 0 and bm.num_cached == 3 + 2 + 2  # everything the two snapshots pin
    # a prompt extending a: its longest cached prefix, leaving one token to compute
    b = a + [7, 8, 9]
    hb = extend_hashes([root_hash("m", "fp32", 4)], b, 4)
    assert bm.lookup(b, hb, len(b) - 1) is snap
    assert bm.lookup(a, ha, len(a) - 1) is short  # the same prompt: 10 is too deep, 3 fits
    assert bm.lookup([100, 101, 5], extend_hashes([root_hash("m", "fp32", 4)], [100, 101, 5], 4), 2) is None
    bm.open(2)
    assert bm.can_attach(snap, len(b))
    src, dst = bm.attach(2, snap)
    assert src == snap.blocks[2] and dst not in snap.blocks and bm.tables[2] == snap.blocks[:2] + [dst]
    assert bm.refs(snap.blocks[0]) == (3, 1)  # two snapshots (the first block) and a sequence
    assert bm.grow(2, len(b) + 4)
    # the pool runs short: the least recently used snapshot goes first
    bm.open(3)
    assert bm.grow(3, 4 * 4)
    assert bm.stats.evictions >= 1 and short not in bm.snapshots()
    bm.release(2)
    bm.release(3)
    bm.clear()
    assert bm.num_free == 12 and all(bm.refs(i) == (0, 0) for i in range(12))


def test_block_manager_refuses_what_it_cannot_free():
    bm = BlockManager(num_blocks=4, block_size=2, snapshot_blocks=1)
    t = [1, 2, 3, 4, 5]
    h = _fill(bm, 1, t)  # 3 blocks live
    assert bm.capture(1, t, h, 5) is not None  # the last free block holds the state
    bm.open(2)
    assert not bm.grow(2, 4)  # 2 blocks wanted, only the snapshot's 1 could be freed: nothing evicted
    assert bm.num_snapshots == 1 and bm.stats.evictions == 0
    assert bm.grow(2, 2) and bm.num_snapshots == 0 and bm.stats.evictions == 1


def test_blocks_module_needs_no_torch():
    path = Path(__file__).parents[2] / "qwen35" / "engine" / "blocks.py"
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torch'] = None\n"  # any import of torch fails
        f"spec = importlib.util.spec_from_file_location('blocks', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['blocks'] = m; spec.loader.exec_module(m)\n"
        "bm = m.BlockManager(8, 4, 1); bm.open(1); assert bm.grow(1, 6)\n"
        "h = m.extend_hashes([m.root_hash('x')], list(range(6)), 4)\n"
        "assert bm.capture(1, list(range(6)), h, 6) is not None\n"
        "assert bm.lookup(list(range(9)), m.extend_hashes([m.root_hash('x')], list(range(9)), 4), 8).length == 6\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------------------------------------------------------
# multi-turn chat with the embedded model


@pytest.mark.slow
def test_multi_turn_chat_reuses_the_history():
    import qwen35
    from qwen35.chat.completion import build_chat_prompt, chat_result

    # float32: greedy choices of a trained model must not hinge on bf16 rounding of a different chunking
    warm, cold = qwen35.LLM(dtype="float32"), qwen35.LLM(dtype="float32", enable_prefix_caching=False)
    assert warm.engine.cache.prefix_caching and not cold.engine.cache.prefix_caching
    params = SamplingParams(max_tokens=160, temperature=0.0)
    system = {"role": "system", "content": "You are a careful calculator. Think step by step, then answer briefly."}
    questions = ["What is 47 + 38?", "And 120 + 35?", "What is 9 + 16?", "And 301 + 99?"]
    im_start = warm.tokenizer.token_to_id("<|im_start|>")

    def turn(llm, messages):
        p = build_chat_prompt(llm.tokenizer, messages, enable_thinking=True)
        assert p.text == llm.tokenizer.apply_chat_template(messages, enable_thinking=True, add_generation_prompt=True)
        out = llm.generate([p.text], p.sampling_params(params))[0]
        return p, out, chat_result(p, out)

    history: dict[str, list] = {"warm": [system], "cold": [system]}
    previous, prev_ids = None, []
    for q in questions:
        results = {}
        for name, llm in (("warm", warm), ("cold", cold)):
            history[name].append({"role": "user", "content": q})
            p, out, result = turn(llm, history[name])
            history[name].append(result.message)
            results[name] = (p, out, result)
        (p, out, result), (_, cold_out, cold_result) = results["warm"], results["cold"]
        assert result.reasoning  # thinking on: there was reasoning, which the next turn's template drops
        assert out.outputs[0].token_ids == cold_out.outputs[0].token_ids and result.message == cold_result.message
        assert cold_out.num_cached_tokens == 0
        ids = out.prompt_token_ids
        if previous is not None:
            # the history renders byte-identically up to where the last turn's assistant message started...
            before = previous.text[:previous.text.rindex("<|im_start|>")]
            assert p.text.startswith(before)
            # ... and all of that is served from the cache: the previous prompt but its generation prompt
            last_start = max(i for i, t in enumerate(prev_ids) if t == im_start)
            assert out.num_cached_tokens == last_start
            assert out.num_cached_tokens >= len(prev_ids) - 5
        else:
            assert out.num_cached_tokens == 0
        previous, prev_ids = p, ids
    # a new conversation with the same system prompt resumes from the end of it
    fresh = [system, {"role": "user", "content": "What is 5 + 5?"}]
    p, out, _ = turn(warm, fresh)
    system_end = [i for i, t in enumerate(out.prompt_token_ids) if t == im_start][1]
    assert out.num_cached_tokens == system_end
    assert out.outputs[0].token_ids == cold.generate([p.text], p.sampling_params(params))[0].outputs[0].token_ids
    u = warm.engine.cache.usage()
    assert u["blocks_used"] == 0 and u["slots_used"] == 0


# ---------------------------------------------------------------------------------------------------------------
# switches and counters outside the engine


def test_metrics_show_the_prefix_cache(model):
    pytest.importorskip("prometheus_client")
    from qwen35.engine import AsyncLLM
    from qwen35.serve.metrics import ServerMetrics

    eng = engine(model)
    p = prompts_of([9], seed=26)[0]
    run(eng, p, 1)
    run(eng, p + [1, 2], 1)
    a = AsyncLLM(eng)
    try:
        text = ServerMetrics(a).render()[0].decode()
    finally:
        a.shutdown()
    for line in ("qwen35_prefix_cache_queries_total 20.0", "qwen35_prefix_cache_hits_total 9.0",
                 "qwen35_prefix_cache_hit_requests_total 1.0", "qwen35_prefix_cache_evictions_total 0.0",
                 "qwen35_kv_cache_blocks_used 0.0"):
        assert line in text, line
    assert "qwen35_prefix_cache_snapshots " in text and "qwen35_kv_cache_blocks_cached " in text


def test_cli_switch_reaches_the_engine(monkeypatch):
    import qwen35.llm
    import qwen35.serve as serve_pkg
    from qwen35.cli import main

    seen = {}

    class FakeLLM:
        def __init__(self, model=None, **kw):
            seen.update(kw)
            raise ValueError("stop here")

    monkeypatch.setattr(qwen35.llm, "LLM", FakeLLM)
    assert main(["generate", "hi", "--no-prefix-caching"]) == 2
    assert seen["enable_prefix_caching"] is False
    assert main(["generate", "hi"]) == 2
    assert seen["enable_prefix_caching"] is True
    monkeypatch.setattr(serve_pkg, "serve", lambda model, **kw: seen.update(kw, served=True))
    assert main(["serve", "--no-prefix-caching"]) == 0
    assert seen["served"] and seen["enable_prefix_caching"] is False
