"""Speculative decoding against plain decoding: greedy output token-identical (drafts all right, partly right, all
wrong; batched, solo, chunked, preempted, n > 1, stop conditions), the rejection rule's output distribution equal to
the target's (chi-square), n-gram drafting itself, and the config's errors."""

from __future__ import annotations

import math

import pytest
import torch

import qwen35
from qwen35.engine import EngineConfig, LLMEngine, SamplingParams
from qwen35.engine.speculative import Drafter, SpeculativeConfig, ngram_draft

from .test_engine import cache_bytes, prompts_of, run_all, solo_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)


class OracleDrafter(Drafter):
    """Drafts from the known greedy continuation, corrupted by a fixed pattern: every kind of verify outcome
    (all accepted, a rejection at each position, nothing accepted) occurs within a few steps."""

    def __init__(self, config: SpeculativeConfig, truth: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(config)
        self.truth = truth
        self.calls = 0
        self.vary = True  # False: the drafts of a sequence depend on nothing but its own progress

    def propose(self, seqs, max_model_len):
        for seq in seqs:
            self.calls += 1
            p = seq.params
            room = min(self.config.num_speculative_tokens, p.max_tokens - len(seq.output_ids) - 1)
            if room <= 0:
                continue
            done = len(seq.output_ids)
            future = self.truth[tuple(seq.prompt_ids)][done:done + room]
            wrong_at = (done + self.calls) % (room + 2) if self.vary else done % (room + 2)  # room + 1: all right
            seq.draft_ids = [t if i != wrong_at else (t + 1) % 95 for i, t in enumerate(future)]


def _engine(model, k=3, **kw) -> LLMEngine:
    config = EngineConfig(speculative_config=SpeculativeConfig(num_speculative_tokens=k, warmup=10 ** 6), **kw)
    return LLMEngine(model, None, config)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_is_token_identical_across_rejections(model, k):
    prompts = prompts_of([1, 5, 9, 17, 33], seed=3)
    truth = {tuple(p): solo_greedy(model, p, 14) for p in prompts}
    eng = _engine(model, k, max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    eng.drafter = OracleDrafter(eng.drafter.config, truth)
    ids = [eng.add_request(p, SamplingParams(max_tokens=14, **GREEDY)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == truth[tuple(p)], f"prompt of {len(p)} tokens"
    stats = eng.drafter.stats
    assert 0 < stats.accepted < stats.proposed  # both outcomes happened
    assert eng.cache.usage()["blocks_used"] == 0 and eng.cache.usage()["slots_used"] == 0


def test_greedy_is_token_identical_under_preemption(model):
    prompts = prompts_of([20, 9, 25, 14], seed=2)
    truth = {tuple(p): solo_greedy(model, p, 18) for p in prompts}
    eng = _engine(model, 3, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                  cache_memory=cache_bytes(model, 14, 4, 4))
    eng.drafter = OracleDrafter(eng.drafter.config, truth)
    ids = [eng.add_request(p, SamplingParams(max_tokens=18, **GREEDY)) for p in prompts]
    seqs = [s for r in eng.requests.values() for s in r.seqs]
    got = run_all(eng)
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid, p in zip(ids, prompts):
        assert got[rid] == truth[tuple(p)]
    assert eng.cache.usage()["blocks_used"] == 0


def test_ngram_drafting_is_token_identical_and_accepts_repeats(model):
    # prompts that repeat themselves give the n-gram drafter something to find
    base = prompts_of([6, 11], seed=5)
    prompts = [b * 4 for b in base] + prompts_of([7], seed=6)
    plain = LLMEngine(model, None, EngineConfig(max_num_seqs=4, block_size=8))
    spec = _engine(model, 3, max_num_seqs=4, block_size=8)
    params = SamplingParams(max_tokens=24, **GREEDY)
    want = run_all_ids(plain, prompts, params)
    got = run_all_ids(spec, prompts, params)
    assert got == want
    assert spec.drafter.stats.proposed > 0


def run_all_ids(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    done = run_all(engine)
    return [done[i] for i in ids]


def test_stop_token_and_max_tokens_inside_accepted_drafts(model):
    prompt = prompts_of([9], seed=7)[0]
    truth = solo_greedy(model, prompt, 12)
    stop = truth[4]  # a token that the drafts will carry past
    eng = _engine(model, 3, max_num_seqs=2, block_size=4)
    eng.drafter = OracleDrafter(eng.drafter.config, {tuple(prompt): truth})
    rid = eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,)))
    rid2 = eng.add_request(list(prompt), SamplingParams(max_tokens=5, **GREEDY))
    got = run_all(eng)
    first = truth.index(stop)
    assert got[rid] == truth[:first + 1] and got[rid2] == truth[:5]


def test_logprobs_and_n_greater_than_one(model):
    prompt = prompts_of([10], seed=8)[0]
    truth = solo_greedy(model, prompt, 10)
    eng = _engine(model, 2, max_num_seqs=4, block_size=4)
    eng.drafter = OracleDrafter(eng.drafter.config, {tuple(prompt): truth})
    plain = LLMEngine(model, None, EngineConfig(max_num_seqs=4, block_size=4))
    params = SamplingParams(n=2, max_tokens=10, logprobs=2, **GREEDY)
    outs = []
    for e in (eng, plain):
        rid = e.add_request(prompt, params)
        last = None
        while e.has_unfinished():
            for o in e.step():
                if o.request_id == rid:
                    last = o
        outs.append(last)
    for a, b in zip(outs[0].outputs, outs[1].outputs):
        assert a.token_ids == b.token_ids == truth
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
        assert [[t for t, _ in row] for row in a.top_logprobs] == [[t for t, _ in row] for row in b.top_logprobs]


def test_rejection_rule_keeps_the_target_distribution(model):
    # The verify rule alone, on fixed logits: draft token d accepted with p(d), else a draw from p without d.
    eng = _engine(model, 1)
    torch.manual_seed(0)
    logits = torch.randn(1, 96) * 2
    params = SamplingParams(temperature=0.8, top_k=6, max_tokens=5)
    target = eng.sampler.distribution(logits, [params], [[]])[0]
    support = target.nonzero().flatten().tolist()
    draft = support[2]  # neither the likeliest nor absent

    class Seq:  # what _sample_verified reads of a sequence
        def __init__(self):
            self.params, self.output_ids, self.generator = params, [], torch.Generator().manual_seed(1)
            self.seq_id, self.index = -1, 0

    seq = Seq()
    eng._seq_owner = {}
    draws = 20000
    counts = torch.zeros(96)
    for _ in range(draws):
        tok, _, _ = eng._sample_verified(seq, logits, draft)
        counts[tok] += 1
    assert set(counts.nonzero().flatten().tolist()) <= set(support)
    expected = target[support] * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001
    assert chi2 < 20.5, (chi2, counts[support].tolist(), expected.tolist())
    assert math.isclose(float(counts[draft]) / draws, float(target[draft]), abs_tol=0.02)


def test_sampled_speculation_is_seeded_and_batch_independent(model):
    prompt = prompts_of([12], seed=9)[0]
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=4, ignore_eos=True)
    runs = []
    for others in (0, 3):
        eng = _engine(model, 2, max_num_seqs=4, block_size=4)
        eng.drafter = OracleDrafter(eng.drafter.config, {tuple(prompt): solo_greedy(model, prompt, 16)})
        eng.drafter.truth.update({tuple(p): [0] * 16 for p in prompts_of([5] * others, seed=10)})
        eng.drafter.vary = False  # the same drafts whatever shares the batch, so the same random draws
        rid = eng.add_request(prompt, params)
        for p in prompts_of([5] * others, seed=10):
            eng.add_request(p, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True))
        runs.append(run_all(eng)[rid])
    assert runs[0] == runs[1] and len(runs[0]) == 16


def test_ngram_index_equals_the_scan():
    # the incremental index proposes exactly what the right-to-left scan does, at every length of a growing list
    import random

    from qwen35.engine.speculative import NgramIndex

    rng = random.Random(0)
    for trial in range(30):
        vocab = rng.choice([2, 3, 5, 12])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 120))]
        max_n, min_n = rng.choice([(1, 1), (2, 1), (3, 1), (4, 2), (5, 3)])
        index = NgramIndex(max_n, min_n)
        for length in range(1, len(tokens) + 1):
            k = rng.randrange(1, 5)
            assert index.draft(tokens[:length], k) == ngram_draft(tokens[:length], k, max_n, min_n), (trial, length)


def test_ngram_draft():
    assert ngram_draft([1, 2, 3, 9, 1, 2], 2, 3, 1) == [3, 9]
    assert ngram_draft([5, 6, 7, 5, 6, 8, 5, 6], 3, 2, 1) == [8, 5, 6]  # the latest occurrence wins
    assert ngram_draft([1, 2, 3], 2, 3, 1) == []
    assert ngram_draft([4, 4, 4], 2, 1, 1) == [4]
    assert ngram_draft([7], 2, 3, 1) == []


def test_low_acceptance_turns_drafting_off(model):
    prompt = prompts_of([8], seed=11)[0]
    config = SpeculativeConfig(num_speculative_tokens=2, warmup=4, min_acceptance=0.9)
    eng = LLMEngine(model, None, EngineConfig(speculative_config=config, block_size=4))

    class Wrong(Drafter):
        def propose(self, seqs, max_model_len):
            for seq in seqs:
                if not seq.spec_off:
                    seq.draft_ids = [(seq.all_ids[-1] + 1) % 95, 3]

    eng.drafter = Wrong(config)
    rid = eng.add_request(prompt, SamplingParams(max_tokens=12, **GREEDY))
    assert run_all(eng)[rid] == solo_greedy(model, prompt, 12)
    assert eng.drafter.stats.disabled_sequences == 1 and eng.drafter.stats.proposed <= 8


@pytest.mark.parametrize("config, message", [
    ({"method": "eagle"}, "method must be one of ngram, mtp"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in"),
    ({"num_tokens": 2}, "unknown field"),
    ("{not json", "not valid JSON"),
    ([1], "must be an object"),
])
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(config)


def test_llm_takes_the_config_and_stays_greedy_identical():
    plain = qwen35.LLM()
    spec = qwen35.LLM(speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    prompts = [plain.tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}])
               for a, b in ((47, 38), (12, 99), (5, 5))]
    params = SamplingParams(temperature=0, max_tokens=120)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert spec.engine.drafter.stats.accepted > 0


# ---------------------------------------------------------------------------------------------------------------
# MTP drafting


def _tiny_mtp_model(moe: bool):
    from qwen35.config import config_from_dict
    from qwen35.model import Qwen35ForCausalLM

    from .conftest import BASE

    d = dict(BASE, model_type="qwen3_5_moe_text" if moe else "qwen3_5_text", mtp_num_hidden_layers=1)
    if moe:
        d.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    else:
        d.update(intermediate_size=96)
    torch.manual_seed(1)
    m = Qwen35ForCausalLM(config_from_dict(d), mtp=True)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        m.lm_head.weight.mul_(6)
    return m.eval()


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_mtp_greedy_is_token_identical_with_preemption(moe):
    model = _tiny_mtp_model(moe)
    prompts = prompts_of([20, 9, 25, 14, 1], seed=2)
    eng = LLMEngine(model, None, EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=32, block_size=4, cache_memory=cache_bytes(model, 16, 4, 4),
        speculative_config=SpeculativeConfig(method="mtp", num_speculative_tokens=2, warmup=10 ** 6)))
    ids = [eng.add_request(p, SamplingParams(max_tokens=16, **GREEDY)) for p in prompts]
    seqs = [s for r in eng.requests.values() for s in r.seqs]
    got = run_all(eng)
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid, p in zip(ids, prompts):
        assert got[rid] == solo_greedy(model, p, 16)
    assert eng.drafter.stats.proposed > 0


def test_mtp_needs_an_mtp_block(model):
    with pytest.raises(ValueError, match="needs a checkpoint with an MTP block"):
        LLMEngine(model, None, EngineConfig(speculative_config=SpeculativeConfig(method="mtp")))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_on_the_embedded_model(k):
    plain = qwen35.LLM()
    spec = qwen35.LLM(speculative_config={"method": "mtp", "num_speculative_tokens": k})
    prompts = [plain.tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}])
               for a, b in ((47, 38), (12, 99), (5, 5))]
    params = SamplingParams(temperature=0, max_tokens=120)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want  # batched
    assert spec.generate(prompts[0], params)[0].outputs[0].token_ids == want[0]  # solo
    first = spec.engine.drafter.stats.acceptance_by_position()[0]
    assert first > 0.9  # the trained head agrees with the model (92% top-1 on held-out text at training)
