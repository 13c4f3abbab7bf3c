"""Sampler and SamplingParams: filters and penalties against distributions computed by hand,
seeded reproducibility across batch compositions, raw logprobs, and parameter validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qwen35.engine.params import SamplingParams
from qwen35.engine.sampler import Sampler

sampler = Sampler()


def run(logits, params, generated=None, generators=None, **kw):
    b = logits.shape[0]
    return sampler(
        logits,
        params,
        generated if generated is not None else [[] for _ in range(b)],
        generators if generators is not None else [None] * b,
        **kw,
    )


def logits_for(probs: list[float], shift: float = 3.0) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (a constant shift changes nothing)."""
    return torch.tensor([[math.log(p) + shift if p > 0 else float("-inf") for p in probs]])


def dist(logits, params, generated=None, **kw):
    b = logits.shape[0]
    return sampler.distribution(logits, params, generated or [[] for _ in range(b)], **kw)


def chi_square_ok(counts: torch.Tensor, expected_probs: list[float], draws: int) -> None:
    """Pearson chi-square against ``expected_probs``; tokens of probability 0 must never appear."""
    stat, df = 0.0, -1
    for c, p in zip(counts.tolist(), expected_probs):
        if p == 0:
            assert c == 0
            continue
        e = p * draws
        stat += (c - e) ** 2 / e
        df += 1
    # Wilson-Hilferty approximation of the chi-square quantile at p = 1e-4 (z = 3.719); the seeds
    # are fixed so the test is deterministic, the bound only says "no real mismatch".
    bound = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3
    assert stat < bound, (stat, bound, counts.tolist(), expected_probs)


# ---------------------------------------------------------------------------------------------
# greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(6, 50).to(dtype)
    gens = [torch.Generator().manual_seed(i) if i % 2 else None for i in range(6)]
    out = run(logits, [SamplingParams(temperature=0)] * 6, generators=gens)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_greedy_ignores_top_k_top_p_min_p_and_consumes_no_randomness():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    p = SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.3)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    assert run(logits, [p] * 3, generators=[g] * 3).token_ids == logits.argmax(-1).tolist()
    assert torch.equal(g.get_state(), state)


def test_logits_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    before = logits.clone()
    run(logits, [SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, top_k=5)] * 2,
        generated=[[1, 2], [3]], min_tokens_mask_ids=[{0}, {4}], vocab_limit=25)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------
# penalties


def test_penalties_against_hand_computed_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    generated = [[0, 1, 1, 3, 3, 3]]  # counts: token 0 once, 1 twice, 3 three times
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # token 0:  2.0 / 2 - 1 * 0.25 - 0.5 = 0.25
    # token 1: -1.0 * 2 - 2 * 0.25 - 0.5 = -3.0
    # token 3:  3.0 / 2 - 3 * 0.25 - 0.5 = 0.25
    # tokens 2, 4, 5 unseen: unchanged
    expected = torch.tensor([0.25, -3.0, 0.5, 0.25, -2.0, 1.0])
    torch.testing.assert_close(dist(logits, [p], generated)[0], expected.softmax(-1))


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        # repetition only: positive divided, negative multiplied, count irrelevant
        (dict(repetition_penalty=2.0), [1.0, -2.0, 0.5, 1.5, -2.0, 1.0]),
        (dict(repetition_penalty=0.5), [4.0, -0.5, 0.5, 6.0, -2.0, 1.0]),
        # presence only: once per seen token
        (dict(presence_penalty=1.5), [0.5, -2.5, 0.5, 1.5, -2.0, 1.0]),
        (dict(presence_penalty=-1.0), [3.0, 0.0, 0.5, 4.0, -2.0, 1.0]),
        # frequency only: count times penalty
        (dict(frequency_penalty=1.0), [1.0, -3.0, 0.5, 0.0, -2.0, 1.0]),
        (dict(frequency_penalty=-0.5), [2.5, 0.0, 0.5, 4.5, -2.0, 1.0]),
    ],
)
def test_each_penalty_alone(kwargs, expected):
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    got = dist(logits, [SamplingParams(**kwargs)], [[0, 1, 1, 3, 3, 3]])[0]
    torch.testing.assert_close(got, torch.tensor(expected).softmax(-1))


def test_penalties_are_per_row_and_change_greedy_choice():
    logits = torch.tensor([[1.0, 3.0, 2.5, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0, repetition_penalty=2.0),  # 3.0 -> 1.5: token 2 wins
        SamplingParams(temperature=0),  # no penalty: token 1 despite the history
        SamplingParams(temperature=0, frequency_penalty=0.3),  # 3.0 - 2*0.3 = 2.4 < 2.5
    ]
    generated = [[1], [1, 1], [1, 1]]
    assert run(logits, params, generated).token_ids == [2, 1, 2]
    # Another row's history does not leak: row 0 has seen nothing here.
    assert run(logits, params, [[], [1, 1], [1]]).token_ids == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# temperature, top-k, top-p, min-p against hand-computed distributions

P = [0.05, 0.4, 0.1, 0.25, 0.2]  # sorted: 0.4 (id 1), 0.25 (id 3), 0.2 (id 4), 0.1 (id 2), 0.05 (id 0)


def renorm(p: list[float]) -> list[float]:
    s = sum(p)
    return [x / s for x in p]


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(), P),
        (dict(top_k=0), P),
        (dict(top_k=-1), P),
        (dict(top_k=10), P),  # larger than the vocabulary
        (dict(top_k=1), [0, 1, 0, 0, 0]),
        (dict(top_k=2), renorm([0, 0.4, 0, 0.25, 0])),
        (dict(top_k=4), renorm([0, 0.4, 0.1, 0.25, 0.2])),
        # top-p keeps the smallest head whose mass reaches p
        (dict(top_p=0.3), [0, 1, 0, 0, 0]),
        (dict(top_p=0.6), renorm([0, 0.4, 0, 0.25, 0])),  # 0.4 < 0.6, 0.65 >= 0.6
        (dict(top_p=0.7), renorm([0, 0.4, 0, 0.25, 0.2])),  # 0.65 < 0.7, 0.85 >= 0.7
        (dict(top_p=0.9), renorm([0, 0.4, 0.1, 0.25, 0.2])),
        # min-p keeps p >= min_p * max p
        (dict(min_p=0.3), renorm([0, 0.4, 0, 0.25, 0.2])),  # threshold 0.12
        (dict(min_p=0.55), renorm([0, 0.4, 0, 0.25, 0])),  # threshold 0.22
        (dict(min_p=1.0), [0, 1, 0, 0, 0]),
        # combined: top-k 4 -> {.4,.25,.2,.1}/.95; top-p 0.8 -> mass before .2 is .65/.95=.684 < .8,
        # before .1 is .85/.95=.895 >= .8 -> {.4,.25,.2}; min-p 0.55 -> threshold .22 -> {.4,.25}
        (dict(top_k=4, top_p=0.8, min_p=0.55), renorm([0, 0.4, 0, 0.25, 0])),
    ],
)
def test_filters_against_hand_computed_distribution(kwargs, expected):
    got = dist(logits_for(P), [SamplingParams(**kwargs)])[0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_against_hand_computed_distribution(temperature):
    expected = renorm([p ** (1 / temperature) for p in P])  # softmax(log p / T)
    got = dist(logits_for(P), [SamplingParams(temperature=temperature)])[0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_temperature_applies_before_top_p():
    # T = 0.5 sharpens P to p^2/sum: [.0025, .16, .01, .0625, .04]/.275 = [.009, .582, .036, .227, .145];
    # top_p 0.75: mass before id 3 is .582 < .75, before id 4 is .809 >= .75 -> {1, 3}.
    # At T = 1 the same top_p keeps {1, 3, 4} (mass before id 4 is .65).
    got = dist(logits_for(P), [SamplingParams(temperature=0.5, top_p=0.75)])[0]
    torch.testing.assert_close(got, torch.tensor(renorm([0, 0.16, 0, 0.0625, 0])))


def test_mixed_batch_rows_are_independent():
    logits = logits_for(P).repeat(4, 1)
    params = [SamplingParams(top_k=2), SamplingParams(temperature=0), SamplingParams(min_p=0.3),
              SamplingParams(top_p=0.6, temperature=1.0)]
    got = dist(logits, params)
    expected = torch.tensor([renorm([0, 0.4, 0, 0.25, 0]), [0, 1, 0, 0, 0],
                             renorm([0, 0.4, 0, 0.25, 0.2]), renorm([0, 0.4, 0, 0.25, 0])])
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# sampling frequencies


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(), P),
        (dict(top_k=2), renorm([0, 0.4, 0, 0.25, 0])),
        (dict(top_p=0.7), renorm([0, 0.4, 0, 0.25, 0.2])),
        # T = 2: sqrt(P), max sqrt(.4) = .632; min-p .6 -> threshold .379 keeps .632, .5, .447
        (dict(min_p=0.6, temperature=2.0), renorm([0, 0.4 ** 0.5, 0, 0.25 ** 0.5, 0.2 ** 0.5])),
    ],
)
@pytest.mark.parametrize("seeded", [False, True])
def test_sampling_frequencies_match_distribution(kwargs, expected, seeded):
    draws = 20000
    logits = logits_for(P).repeat(draws, 1)
    params = [SamplingParams(**kwargs)] * draws
    if seeded:
        # One generator shared by every row: consecutive draws from it, row by row.
        g = torch.Generator().manual_seed(123)
        out = run(logits, params, generators=[g] * draws)
    else:
        torch.manual_seed(123)
        out = run(logits, params)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=len(P))
    chi_square_ok(counts, expected, draws)


# ---------------------------------------------------------------------------------------------
# seeds


def _seeded_sequence(position: int, batch: int, seed: int, steps: int = 12) -> list[int]:
    """Tokens of the request of interest (seed, top-k 50, temperature 0.9, a repetition penalty),
    placed at ``position`` in a batch whose other rows are greedy, unseeded and other seeds."""
    vocab = 200
    target = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=seed)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.7, seed=99),
        SamplingParams(temperature=1.0, top_k=5),
    ]
    gens: list[torch.Generator | None] = []
    params: list[SamplingParams] = []
    j = 0
    for i in range(batch):
        if i == position:
            params.append(target)
            gens.append(torch.Generator().manual_seed(seed))
        else:
            params.append(others[j % len(others)])
            gens.append(torch.Generator().manual_seed(99) if params[-1].seed is not None else None)
            j += 1
    generated: list[list[int]] = [[] for _ in range(batch)]
    data = torch.Generator().manual_seed(5)
    for _ in range(steps):
        step_logits = torch.randn(vocab, generator=data) * 2
        logits = torch.randn(batch, vocab) * 2  # other rows: whatever, from the global RNG
        logits[position] = step_logits
        out = run(logits, params, generated, gens)
        for row, t in zip(generated, out.token_ids):
            row.append(t)
        torch.rand(17)  # the global RNG moving between steps must not matter
    return generated[position]


def test_seeded_row_same_alone_and_in_any_batch():
    torch.manual_seed(0)
    alone = _seeded_sequence(position=0, batch=1, seed=1234)
    torch.manual_seed(1)
    in_five = _seeded_sequence(position=2, batch=5, seed=1234)
    torch.manual_seed(2)
    last_of_five = _seeded_sequence(position=4, batch=5, seed=1234)
    assert alone == in_five == last_of_five
    assert _seeded_sequence(position=0, batch=1, seed=4321) != alone  # the seed does matter


def test_unseeded_rows_follow_global_rng():
    logits = torch.zeros(8, 100)
    params = [SamplingParams()] * 8
    torch.manual_seed(11)
    a = run(logits, params).token_ids
    torch.manual_seed(11)
    b = run(logits, params).token_ids
    torch.manual_seed(12)
    c = run(logits, params).token_ids
    assert a == b and a != c


# ---------------------------------------------------------------------------------------------
# vocab_limit and min-tokens blocking


def test_padding_ids_never_sampled():
    torch.manual_seed(3)
    limit, padded = 50, 64
    logits = torch.randn(400, padded)
    logits[:, limit:] = 50.0  # padding rows of the embedding matrix can produce anything
    params = [SamplingParams(temperature=0)] * 100 + [SamplingParams(temperature=2.0)] * 300
    out = run(logits, params, vocab_limit=limit)
    assert max(out.token_ids) < limit
    assert out.token_ids[:100] == logits[:100, :limit].argmax(-1).tolist()
    assert dist(logits[:2], params[:2], vocab_limit=limit).shape == (2, limit)


def test_min_tokens_mask_blocks_ids():
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.0]] * 300)
    eos = {0}
    greedy = run(logits[:1], [SamplingParams(temperature=0)], min_tokens_mask_ids=[eos])
    assert greedy.token_ids == [2]
    torch.manual_seed(4)
    sampled = run(logits, [SamplingParams(temperature=3.0)] * 300, min_tokens_mask_ids=[eos] * 300)
    assert 0 not in sampled.token_ids
    assert set(sampled.token_ids) == {1, 2, 3}
    # A row with no blocked ids is unaffected.
    mixed = run(logits[:2], [SamplingParams(temperature=0)] * 2, min_tokens_mask_ids=[eos, set()])
    assert mixed.token_ids == [2, 0]


# ---------------------------------------------------------------------------------------------
# logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype):
    torch.manual_seed(6)
    limit = 90
    logits = (torch.randn(4, 96) * 3).to(dtype)
    params = [
        SamplingParams(logprobs=5, temperature=0.6, top_k=10, repetition_penalty=1.5),
        SamplingParams(logprobs=0, temperature=0),
        SamplingParams(),  # no logprobs
        SamplingParams(logprobs=20, top_p=0.5, presence_penalty=2.0),
    ]
    generated = [[1, 2, 3], [], [4], [5, 5]]
    out = run(logits, params, generated, vocab_limit=limit)
    # Raw model distribution over the real vocabulary, whatever the sampling settings.
    expected = torch.log_softmax(logits.float()[:, :limit], dim=-1)
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(expected[i, out.token_ids[i]].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert len(top) == p.logprobs
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        want = sorted(expected[i].tolist(), reverse=True)[: p.logprobs]
        assert values == pytest.approx(want, abs=1e-5)
        for t, v in top:
            assert t < limit and v == pytest.approx(expected[i, t].item(), abs=1e-5)
    assert out.top_logprobs[1] == []


def test_logprob_of_greedy_choice_is_the_top_one():
    torch.manual_seed(7)
    logits = torch.randn(1, 30)
    out = run(logits, [SamplingParams(temperature=0, logprobs=3)])
    assert out.top_logprobs[0][0][0] == out.token_ids[0]
    assert out.logprobs[0] == pytest.approx(out.top_logprobs[0][0][1])


# ---------------------------------------------------------------------------------------------
# argument checks


def test_batch_length_mismatch_raises():
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="params"):
        sampler(logits, [SamplingParams()], [[], []], [None, None])
    with pytest.raises(ValueError, match="generators"):
        sampler(logits, [SamplingParams()] * 2, [[], []], [None])
    with pytest.raises(ValueError, match="min_tokens_mask_ids"):
        sampler(logits, [SamplingParams()] * 2, [[], []], [None, None], min_tokens_mask_ids=[set()])


# ---------------------------------------------------------------------------------------------
# SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (1, 16, 0, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.logprobs) == (None, (), (), None)
    assert (p.ignore_eos, p.skip_special_tokens, p.include_stop_str_in_output) == (False, True, False)
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0.0).greedy


def test_normalisation_and_boundaries():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[2, 0]).stop_token_ids == (2, 0)
    # Every edge of every allowed range is accepted.
    SamplingParams(max_tokens=None, min_tokens=100, top_k=-1, top_p=1.0, min_p=1.0, repetition_penalty=1e-3,
                   presence_penalty=-2, frequency_penalty=2, logprobs=20, seed=0, temperature=0)
    SamplingParams(max_tokens=1, min_tokens=1, top_k=1, top_p=1e-6, min_p=0, presence_penalty=2,
                   frequency_penalty=-2.0, logprobs=0, seed=-5, n=3)


def test_frozen_and_replace_revalidates():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert dataclasses.replace(p, temperature=0).greedy
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(p, temperature=-1)


INVALID = [
    ("n", 0), ("n", -1), ("n", 1.5), ("n", True), ("n", "2"),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
    ("min_tokens", -1), ("min_tokens", 0.5),
    ("temperature", -1), ("temperature", -0.01), ("temperature", "hot"), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", None), ("temperature", True),
    ("top_k", -2), ("top_k", 1.5), ("top_k", "5"),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", "all"),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", "x"),
    ("presence_penalty", 2.1), ("presence_penalty", -2.5), ("presence_penalty", [1]),
    ("frequency_penalty", 3), ("frequency_penalty", -2.01),
    ("seed", 1.5), ("seed", "42"), ("seed", True),
    ("stop", ""), ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5), ("stop", b"x"),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 7), ("stop_token_ids", "12"),
    ("stop_token_ids", [True]),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("include_stop_str_in_output", None),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0), ("logprobs", True),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_parameter_raises_naming_it(name, value):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{name: value})
    assert name in str(e.value)


def test_range_is_in_message():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\]"):
        SamplingParams(logprobs=21)


def test_min_tokens_not_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=5, max_tokens=None)
