"""Tool environments for RL: the calculator and lookup tools, the rendering of tool results, and multi-turn
rollouts through the engine checked against the chat template and the trainer's dense forward.

Multi-turn rollouts on tiny random models have their tokens *scripted* (a sampler that picks the scripted token
and reports its raw logprob under the model, exactly as the engine's sampler does), so the tool loop, the
inserted tokens, the follow-up requests and the routing of every position are tested on known conversations;
the shipped embedded model, trained on calculator examples, is checked calling the tool greedily on its own."""

from __future__ import annotations

import copy
import random
from fractions import Fraction

import pytest
import torch

from qwen35.chat import Tokenizer
from qwen35.engine import EngineConfig, SamplingParams
from qwen35.engine.sampler import SampleOutput
from qwen35.engine.sampler import _logprobs as raw_logprobs
from qwen35.llm import embedded_model_path
from qwen35.model import Qwen35ForCausalLM
from qwen35.rl.config import RLConfig
from qwen35.rl.rewards import TaskPrompts, exact_match_reward
from qwen35.rl.rollout import RolloutWorker, rollout_params
from qwen35.rl.tools import (
    MAX_RESULT_BITS,
    ChatContext,
    ToolEnv,
    ToolEpisode,
    ToolError,
    calculator,
    default_tool_env,
    evaluate_expression,
    lookup,
    tool_results_text,
)
from qwen35.rl.trainer import RLTrainer
from qwen35.train.data import (
    CAPITALS,
    CITY_POPULATIONS,
    NOT_FOUND,
    _calculator_problem,
    make_example,
    prompt_for,
    render_example,
    render_with_spans,
)
from tests.engine.conftest import tiny_model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    path = embedded_model_path()
    assert path is not None, "this checkout has no embedded model"
    return Tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------
# the calculator


def _random_expression(rng: random.Random, depth: int) -> tuple[str, str]:
    """(expression, the same with every number as Fraction(n)): Python evaluates the second exactly."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.choice([rng.randint(0, 9), rng.randint(10, 999), rng.randint(1000, 99999)])
        return str(n), f"Fraction({n})"
    kind = rng.random()
    if kind < 0.1:
        a, fa = _random_expression(rng, depth - 1)
        return f"-({a})", f"-({fa})"
    if kind < 0.2:
        a, fa = _random_expression(rng, depth - 1)
        e = rng.randint(0, 4)
        return f"({a}) ** {e}", f"({fa}) ** Fraction({e})"
    op = rng.choice(["+", "-", "*", "/", "//", "%"])
    (a, fa), (b, fb) = _random_expression(rng, depth - 1), _random_expression(rng, depth - 1)
    return f"({a}) {op} ({b})", f"Fraction(({fa}) {op} ({fb}))"  # Fraction // Fraction is an int: keep exact


def test_calculator_equals_python_arithmetic():
    rng = random.Random(0)
    checked = zero_div = 0
    for _ in range(3000):
        expr, exact = _random_expression(rng, rng.randint(1, 4))
        try:
            want = eval(exact, {"Fraction": Fraction})  # the test's reference: Python's own arithmetic
        except ZeroDivisionError:
            with pytest.raises(ToolError, match="division by zero"):
                evaluate_expression(expr)
            zero_div += 1
            continue
        assert evaluate_expression(expr) == want, expr
        if "/" not in expr.replace("//", ""):  # whole-number arithmetic: Python's ints, digit for digit
            assert calculator(expr) == str(eval(expr)), expr
        checked += 1
    assert checked > 2000 and zero_div > 10
    assert calculator("7 / 2") == "3.5" and calculator("6 / 3") == "2" and calculator("(7 / 2) * 2") == "7"
    assert calculator("-7 // 2") == "-4" and calculator("-7 % 3") == "2" and calculator("2 ** -2") == "0.25"
    assert calculator(" 12 *34 ") == "408" and calculator(42) == "42"
    assert calculator("(" * 120 + "-1" + ")" * 120) == "-1"  # nesting is bounded by the length limit


def test_calculator_answers_every_generator_problem():
    for seed in range(500):
        expr, value = _calculator_problem(random.Random(seed))
        assert calculator(expr) == str(value)


@pytest.mark.parametrize("expr, message", [
    ("__import__('os').system('true')", "call is not allowed"),
    ("(1).__class__", "attribute is not allowed"),
    ("x + 1", "name is not allowed"),
    ("1.5 * 2", "whole numbers"),
    ("'a' * 3", "whole numbers"),
    ("True + 1", "whole numbers"),
    ("[1, 2]", "list is not allowed"),
    ("lambda: 1", "lambda is not allowed"),
    ("1 if 1 else 2", "ifexp is not allowed"),
    ("1 < 2", "compare is not allowed"),
    ("1 << 10", "<< is not allowed"),
    ("3 ^ 1", r"\^ is not allowed"),
    ("1 +", "cannot parse"),
    ("1; 2", "cannot parse"),
    ("", "empty"),
    ("1" * 300, "too long"),
    ("(" * 200 + "1" + ")" * 200, "too long"),
    ("9 ** 9 ** 9", "too large"),
    ("2 ** 5000", "too large"),
    ("10 ** 300 * 10 ** 300 * 10 ** 300 * 10 ** 300 * 10 ** 300", "too large"),
    ("2 ** (1 / 2)", "whole numbers"),
    ("0 ** -1", "division by zero"),
    ("5 % 0", "division by zero"),
])
def test_calculator_refuses_unsafe_input(expr, message):
    with pytest.raises(ToolError, match=message):
        evaluate_expression(expr)
    out = default_tool_env().run("calculator", {"expression": expr})
    assert out.error is not None and out.result.startswith("error: ")


def test_calculator_result_size_is_bounded():
    assert evaluate_expression(f"2 ** {MAX_RESULT_BITS - 1}") == 2 ** (MAX_RESULT_BITS - 1)
    with pytest.raises(ToolError, match="too large"):
        evaluate_expression(f"2 ** {MAX_RESULT_BITS} * 2")


def test_lookup_is_the_generators_table():
    for country, capital in CAPITALS.items():
        assert lookup("capital", country) == capital
    for city, n in CITY_POPULATIONS.items():
        assert lookup(topic="population", name=f" {city} ") == str(n)
    assert lookup("capital", "Zorbland") == NOT_FOUND == lookup("population", "Paris")
    with pytest.raises(ToolError, match="topic must be"):
        lookup("weather", "Paris")


def test_tool_env_turns_bad_calls_into_error_results():
    env = default_tool_env()
    assert env.run("calculator", '{"expression": "12 * 34"}').result == "408"
    assert env.run("lookup", {"topic": "capital", "name": "Peru"}).result == "Lima"
    cases = {
        ("weather", "{}"): "unknown tool 'weather'; the tools are calculator, lookup",
        ("calculator", "{}"): "missing a required argument: 'expression'",
        ("calculator", '{"expression": "1", "x": 2}'): "unexpected keyword argument 'x'",
        ("calculator", "{not json"): "not valid JSON",
        ("calculator", "[1, 2]"): "must be an object",
        ("lookup", '{"topic": "weather", "name": "Oslo"}'): "topic must be 'capital' or 'population'",
    }
    for (name, args), message in cases.items():
        out = env.run(name, args)
        assert out.error is not None and message in out.error and out.result == f"error: {out.error}"
    with pytest.raises(ValueError, match="not callable"):
        ToolEnv({"calculator": 3})
    with pytest.raises(ValueError, match="at least one tool"):
        ToolEnv({})
    custom = ToolEnv({"echo": lambda text: text.upper()})  # pluggable: any name -> callable
    assert custom.run("echo", {"text": "hi"}).result == "HI"


# ---------------------------------------------------------------------------------------------------------------
# rendering: the inserted text is the template's


def _turns(ex, tokenizer):
    """The example's full text, the prompt before its first assistant turn, and each assistant turn as the
    template writes it (from its generation prompt through <|im_end|>), as token ids."""
    full, spans = render_with_spans(ex)
    return full, [tokenizer.encode(full[a:b]) for a, b in spans]


def _engine_text(tokenizer, ids):
    """What the engine reports as a turn's text: the tokens before the stop token, special tokens skipped."""
    return tokenizer.decode(ids[:-1], skip_special_tokens=True)


@pytest.mark.parametrize("task", ["calculator", "lookup", "multi_tool"])
@pytest.mark.parametrize("think", [True, False], ids=["think", "no_think"])
def test_episode_equals_the_templates_full_conversation(tok, task, think):
    for seed in range(4):
        ex = make_example(task, random.Random(seed), think)
        messages, tools, _ = prompt_for(ex, 0)
        prompt = tok.encode(tok.apply_chat_template(messages, tools=tools, enable_thinking=think))
        full, turns = _turns(ex, tok)
        ep = ToolEpisode(default_tool_env(), tok, ChatContext.make(messages, tools, think), prompt, 4096, 4)
        for k, turn in enumerate(turns):
            ep.add_turn(turn, [0.0] * len(turn), [0] * len(turn), _engine_text(tok, turn), "stop")
            nxt = ep.next_prompt()
            if k < len(turns) - 1:
                # the next turn's prompt is what the template renders for the conversation up to that turn
                idx = [i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant"][k + 1]
                want = tok.apply_chat_template(ex["messages"][:idx], tools=tools, enable_thinking=think)
                assert nxt == tok.encode(want), (task, seed, k)
            else:
                assert nxt is None
        assert ep.done and ep.rounds == len(turns) - 1 and ep.stopped_by is None
        # the whole sample is the template's rendering of the whole conversation (less the newline after the
        # last <|im_end|>, which the model never generates)
        assert prompt + ep.ids == tok.encode(full.removesuffix("\n")) == tok.encode(render_example(ex)[:-1])
        # the tool results the env computed are the generator's
        got = [o.result for r in ep.calls for o in r]
        assert got == [m["content"] for m in ex["messages"] if m["role"] == "tool"]
        # inserted tokens: exactly the ones between the turns
        at, mask = 0, []
        for k, turn in enumerate(turns):
            mask += [True] * len(turn)
            at += len(turn)
            if k < len(turns) - 1:
                gap = len(tok.encode(full[render_with_spans(ex)[1][k][1]:render_with_spans(ex)[1][k + 1][0]]))
                mask += [False] * gap
                at += gap
        assert ep.loss_mask == mask and len(ep.ids) == at
        assert exact_match_reward(ex, ep.text) == 1.0


def test_tool_results_text_is_the_templates_delta(tok):
    messages = [{"role": "user", "content": "What is 2 + 3 and 4 * 5?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}},
                    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "4 * 5"}}}]}]
    for think in (True, False):
        text = tool_results_text(tok, messages, None, think, ["5", "20"])
        gen = "<think>\n" if think else "<think>\n\n</think>\n\n"
        assert text == ("\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n20\n"
                        "</tool_response><|im_end|>\n<|im_start|>assistant\n" + gen)
    with pytest.raises(ValueError, match="must end with one"):
        tool_results_text(tok, messages[:1], None, True, ["5"])


def test_episode_ends_on_answers_limits_and_cut_turns(tok):
    ex = make_example("calculator", random.Random(1), True)
    messages, tools, _ = prompt_for(ex, 0)
    chat = ChatContext.make(messages, tools, True)
    _, turns = _turns(ex, tok)
    call = turns[0]

    def episode(**kw):
        return ToolEpisode(default_tool_env(), tok, chat, [1, 2, 3], kw.get("budget", 4096), kw.get("rounds", 4),
                           kw.get("context"))

    ep = episode(rounds=1)
    for _ in range(2):  # the model keeps calling: the second call is past the limit of one round
        ep.add_turn(call, [0.0] * len(call), [0] * len(call), _engine_text(tok, call), "stop")
        nxt = ep.next_prompt()
    assert nxt is None and ep.rounds == 1 and ep.stopped_by == "tool_rounds" and ep.finish_reason == "stop"
    ep = episode()  # a call cut by the length limit is not run
    ep.add_turn(call[:-3], [0.0] * (len(call) - 3), [0] * (len(call) - 3), _engine_text(tok, call[:-2]), "length")
    assert ep.next_prompt() is None and ep.rounds == 0
    ep = episode(budget=len(call) + 5)  # no room for the tool results in the completion budget
    ep.add_turn(call, [0.0] * len(call), [0] * len(call), _engine_text(tok, call), "stop")
    assert ep.next_prompt() is None and ep.stopped_by == "budget" and ep.finish_reason == "length"
    ep = episode(context=len(call) + 10)  # nor in the engine's context
    ep.add_turn(call, [0.0] * len(call), [0] * len(call), _engine_text(tok, call), "stop")
    assert ep.next_prompt() is None and ep.stopped_by == "context"


# ---------------------------------------------------------------------------------------------------------------
# rollouts through the engine


def _tiny(moe: bool, seed: int = 0) -> Qwen35ForCausalLM:
    """tests/engine's tiny random model with the embedded tokenizer's vocabulary (2048 ids, eos 2011)."""
    return tiny_model(moe, seed, vocab_size=2048, eos_token_id=2011)


class ScriptedSampler:
    """The engine's sampler, but each sequence takes the next token of its script (keyed by request id and
    sample index); the logprob reported is the token's raw logprob under the model, as the engine reports any
    token's.  A test double: it makes a random model hold a known tool conversation."""

    def __init__(self, engine, scripts: dict[tuple[str, int], list[int]]) -> None:
        self.engine, self.scripts, self.real = engine, scripts, engine.sampler

    def __call__(self, logits, params, generated, generators, vocab_limit=None, **kw):
        self.real(logits, params, generated, generators, vocab_limit=vocab_limit, **kw)  # keeps RNG use as usual
        sched = self.engine.scheduler
        seqs = {id(s.output_ids): s for s in list(sched.running) + list(sched.waiting)}
        chosen = []
        for out in generated:
            s = seqs[id(out)]
            chosen.append(self.scripts[(s.request_id, s.index)][len(out)])
        lps, top = raw_logprobs(logits[:, :vocab_limit] if vocab_limit else logits, params, chosen)
        return SampleOutput(chosen, lps, top)


def _scripted_group(tok, task="calculator", think=True, seed=0):
    """A tool example and three scripts for a group of three samples: the right conversation; a wrong final
    answer; a call of an unknown tool (the error comes back as its result) followed by the right answer."""
    ex = make_example(task, random.Random(seed), think)
    messages, tools, _ = prompt_for(ex, 0)
    prompt = tok.encode(tok.apply_chat_template(messages, tools=tools, enable_thinking=think))
    _, turns = _turns(ex, tok)
    assert len(turns) == 2
    wrong = tok.encode(tok.decode(turns[1]).replace(f"The answer is {ex['answer']}.", "The answer is 7."))
    unknown = tok.encode(tok.decode(turns[0]).replace("<function=calculator>", "<function=abacus>"))
    scripts = {("group-0", 0): turns[0], ("group-0/sample-0/turn-1", 0): turns[1],
               ("group-0", 1): turns[0], ("group-0/sample-1/turn-1", 0): wrong,
               ("group-0", 2): unknown, ("group-0/sample-2/turn-1", 0): turns[1]}
    return ex, messages, tools, prompt, turns, scripts


def _worker(model, tok, scripts, record=True):
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64)  # the ~400-token prompts prefill in chunks
    worker = RolloutWorker(copy.deepcopy(model), tok, cfg, record_routing=record, tool_env=default_tool_env())
    worker.engine.sampler = ScriptedSampler(worker.engine, scripts)
    return worker


def _trainer(model, tok):
    cfg = RLConfig(lr=0.0, min_lr=0.0, updates=2, group_size=3)
    return RLTrainer(copy.deepcopy(model), cfg, vocab_limit=len(tok))


def _max_learned_diff(trainer, samples, versions=None):
    """Largest |trainer - engine| logprob over the tokens the model sampled (loss mask True), optionally only
    those of the given versions."""
    worst, n = 0.0, 0
    for got, s in zip(trainer.logprobs(samples), samples):
        for g, lp, m, v in zip(got, s.logprobs, s.loss_mask, s.versions):
            if m and (versions is None or v in versions):
                worst, n = max(worst, abs(g - lp)), n + 1
    assert n > 0
    return worst


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_multi_turn_rollout_matches_the_template_and_the_trainer(tok, moe):
    model = _tiny(moe)
    ex, messages, tools, prompt, turns, scripts = _scripted_group(tok)
    worker = _worker(model, tok, scripts)
    chat = ChatContext.make(messages, tools, True)
    worker.submit(0, prompt, rollout_params(3, 256, seed=5), chat)
    (samples,) = worker.run()
    right, wrong, unknown = samples
    call_turn = next(i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant")
    inserted = tok.encode(tool_results_text(tok, ex["messages"][:call_turn + 1], tools, True,
                                            [ex["messages"][call_turn + 1]["content"]]))
    # the sample is the conversation the template renders, and exactly what the trainer's forward reads
    assert right.prompt_ids == prompt
    assert right.completion_ids == turns[0] + inserted + turns[1]
    assert prompt + right.completion_ids == tok.encode(render_example(ex)[:-1])
    assert right.loss_mask == [True] * len(turns[0]) + [False] * len(inserted) + [True] * len(turns[1])
    assert all(lp == 0.0 for lp, m in zip(right.logprobs, right.loss_mask) if not m)
    assert all(lp < 0.0 for lp, m in zip(right.logprobs, right.loss_mask) if m)
    assert right.versions == [0] * len(right.completion_ids)
    assert right.info["tool_rounds"] == 1 and right.info["tool_calls"][0][0]["result"] == ex["answer"]
    assert right.finish_reason == "stop" and len(right.info["turns"]) == 2
    # rewards read the answer after the last tool round
    assert exact_match_reward(ex, right.text) == 1.0
    assert exact_match_reward(ex, wrong.text) == 0.0
    # an unknown tool: the error is the tool result, the episode goes on, and its answer still counts
    call = unknown.info["tool_calls"][0][0]
    assert call["name"] == "abacus" and "unknown tool 'abacus'" in call["result"]
    assert tok.encode(f"<tool_response>\n{call['result']}\n</tool_response>")[1] in unknown.completion_ids
    assert exact_match_reward(ex, unknown.text) == 1.0
    # routing covers every input position: prompt, model tokens and inserted tokens
    for s in samples:
        n_in = len(s.prompt_ids) + len(s.completion_ids) - 1
        assert (s.routing is not None) == moe and (not moe or s.routing.shape[1] == n_in)
    # at learning rate 0 the trainer's logprob of every sampled token is the engine's, in both turns
    assert _max_learned_diff(_trainer(model, tok), samples) < 2e-4
    assert worker.pending_groups == [] and not worker.engine.has_unfinished()


def test_partial_tool_episode_under_new_weights_keeps_one_routing_per_position(tok):
    """A weight update lands between the tool call and the answer: the answer's turn is prefilled again under
    the new weights with the routing recorded for the earlier positions forced, so at lr 0 the new weights'
    trainer reproduces the answer's logprobs (routing replayed), and the earlier turn keeps its version."""
    model = _tiny(True)
    _, messages, tools, prompt, turns, scripts = _scripted_group(tok)
    worker = _worker(model, tok, scripts)
    worker.submit(0, prompt, rollout_params(3, 256, seed=5), ChatContext.make(messages, tools, True))
    for _ in range(500):
        assert worker.run(max_steps=1) == []
        if any("/turn-1" in rid for rid in worker.engine.requests):
            break
    new = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    worker.set_weights(new, version=1)
    (samples,) = worker.run()
    s = samples[0]
    n0, n_ins = len(turns[0]), len(s.completion_ids) - len(turns[0]) - len(turns[1])
    assert s.versions == [0] * (n0 + n_ins) + [1] * len(turns[1])  # inserted tokens: the version that called
    trained = copy.deepcopy(model)
    trained.load_state_dict(new)
    assert _max_learned_diff(_trainer(trained, tok), samples, versions={1}) < 2e-4
    assert _max_learned_diff(_trainer(model, tok), samples, versions={0}) < 2e-4


def test_routing_forcer_takes_the_given_experts_and_only_those(tok):
    model = _tiny(True)
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=8)
    worker = RolloutWorker(copy.deepcopy(model), None, cfg)
    prompt = list(range(100, 130))
    params = SamplingParams(n=1, max_tokens=6, temperature=0.0, logprobs=0)
    (plain,), = worker.generate([(0, prompt)], params)
    k = model.text_config.num_experts_per_tok
    forced = torch.tensor([6, 7], dtype=torch.int16).expand(len(worker.forcer.routers), 20, k).contiguous()
    assert not (plain.routing[:, :20] == forced).all()  # the model's own choice is not that
    worker.submit(1, prompt, params)
    worker.forcer.forced[worker.engine.requests["group-1"].seqs[0].seq_id] = forced
    (s,), = worker.run()
    assert torch.equal(s.routing[:, :20], forced)  # forced positions, across prefill chunks of 8
    assert s.completion_ids != plain.completion_ids or s.logprobs != plain.logprobs
    assert worker.forcer.forced == {}  # forgotten with its sequence
    # every other position routed as usual: the trainer replaying the recorded routing reproduces the engine
    assert _max_learned_diff(_trainer(model, tok), [s]) < 2e-4


def test_tool_groups_need_an_env_and_a_tokenizer(tok):
    model = _tiny(False)
    chat = ChatContext.make([{"role": "user", "content": "hi"}], None, True)
    worker = RolloutWorker(copy.deepcopy(model), tok, EngineConfig(max_num_seqs=2))
    with pytest.raises(ValueError, match="no tool environment"):
        worker.submit(0, [1, 2, 3], rollout_params(1, 4, 0), chat)
    worker = RolloutWorker(copy.deepcopy(model), None, EngineConfig(max_num_seqs=2), tool_env=default_tool_env())
    with pytest.raises(ValueError, match="has none"):
        worker.submit(0, [1, 2, 3], rollout_params(1, 4, 0), chat)
    with pytest.raises(ValueError, match="max_tool_rounds"):
        RolloutWorker(copy.deepcopy(model), tok, EngineConfig(max_num_seqs=2), max_tool_rounds=0)


# ---------------------------------------------------------------------------------------------------------------
# tasks, config and the embedded model


def test_task_prompts_offer_tool_tasks(tok):
    prompts = TaskPrompts(tok, {"calculator": 1.0, "lookup": 1.0, "multi_tool": 1.0, "add2": 1.0}, seed=3)
    seen = set()
    for i in range(40):
        p = prompts[i]
        seen.add(p.task)
        if p.task == "add2":
            assert p.chat is None
            continue
        messages, tools, think = prompt_for(p.example, 0)  # before the first (tool-calling) assistant turn
        assert p.chat == ChatContext.make(messages, tools, think) and p.chat.tools
        assert p.ids == tok.encode(tok.apply_chat_template(messages, tools=tools, enable_thinking=think))
        assert messages[-1]["role"] == "user"
    assert seen == {"calculator", "lookup", "multi_tool", "add2"}


def test_config_takes_tool_tasks_and_still_refuses_unverifiable_ones():
    for task in ("calculator", "lookup", "multi_tool"):
        RLConfig(tasks={task: 1.0}).validate()
    with pytest.raises(ValueError, match="no checkable answer"):
        RLConfig(tasks={"story": 1.0, "calculator": 1.0}).validate()
    with pytest.raises(ValueError, match="max_tool_rounds"):
        RLConfig(tasks={"calculator": 1.0}, max_tool_rounds=0).validate()
    from qwen35.rl.loop import RLRun

    with pytest.raises(ValueError, match="calls the tools lookup, which the tool environment does not have"):
        RLRun(RLConfig(tasks={"multi_tool": 1.0}), tool_env=ToolEnv({"calculator": calculator}))


def test_embedded_model_calls_the_calculator_and_answers(tok):
    """The shipped model (MoE, trained on calculator examples) through the env, greedy: it calls the tool, reads
    the result, answers right; its logprobs in both turns are the trainer's (routing replay)."""
    from qwen35.checkpoint import load_model

    path = embedded_model_path()
    model = load_model(path, dtype="float32").eval()
    worker = RolloutWorker(model, tok, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256),
                           tool_env=default_tool_env())
    prompts = TaskPrompts(tok, {"calculator": 1.0}, seed=0, think_prob=0.5)
    greedy = SamplingParams(n=1, max_tokens=96, temperature=0.0, logprobs=0)
    picked = [prompts[i] for i in range(8)]
    picked = [next(p for p in picked if p.chat.enable_thinking), next(p for p in picked if not p.chat.enable_thinking)]
    for g, p in enumerate(picked):
        worker.submit(g, p.ids, greedy, p.chat)
    samples = [g[0] for g in sorted(worker.run(), key=lambda g: g[0].group)]
    for p, s in zip(picked, samples):
        assert s.info["tool_rounds"] == 1, s.info
        (call,) = s.info["tool_calls"][0]
        assert call["name"] == "calculator" and call["error"] is None
        assert exact_match_reward(p.example, s.text) == 1.0, s.info["turns"]
        assert sum(not m for m in s.loss_mask) > 0
    trainer = RLTrainer(load_model(path, dtype="float32"), RLConfig(lr=0.0, min_lr=0.0, updates=1, group_size=2),
                        vocab_limit=len(tok))
    assert trainer.replay
    assert _max_learned_diff(trainer, samples) < 2e-4


def test_cli_takes_tool_tasks():
    import argparse

    from qwen35.rl.cli import _tasks, add_rl_arguments, config_from_args

    assert _tasks("calculator:1,lookup=2") == {"calculator": 1.0, "lookup": 2.0}
    p = argparse.ArgumentParser()
    add_rl_arguments(p)
    cfg = config_from_args(p.parse_args(["--out", "x", "--tasks", "calculator=1", "--max-tool-rounds", "2"]))
    assert cfg.tasks == {"calculator": 1.0} and cfg.max_tool_rounds == 2
    assert "calculator" in p.format_help()


# ---------------------------------------------------------------------------------------------------------------
# the Ray loop with a tool task


@pytest.mark.slow
def test_ray_run_on_calculator_tasks(tmp_path):
    ray = pytest.importorskip("ray", reason="the RL loop needs ray (pip install 'qwen35[rl]')")
    from qwen35.rl.loop import run_rl

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        cfg = RLConfig(model="embedded", updates=1, groups_per_update=2, group_size=2, max_new_tokens=96,
                       steps_per_call=16, lr=1e-6, min_lr=1e-6, out_dir=str(tmp_path / "run"), progress=False,
                       tasks={"calculator": 1.0}, mode="sync")
        result = run_rl(cfg)
    finally:
        if started:
            ray.shutdown()
    (rec,) = result.history
    assert rec["inserted_tokens"] > 0  # tool results came back into the samples
    assert rec["reward_by_task"]["calculator"] > 0  # the shipped model answers some calculator problems
    # the first update trains the weights that sampled: the trainer's logprobs of the sampled tokens (inserted
    # ones masked out) are the engine's
    assert rec["logp_abs_diff_max"] < 1e-3
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_held_out_evaluation_runs_tool_episodes():
    """evaluate_tasks asks tool tasks from the first assistant turn and runs the model's own calls: the shipped
    model, greedy, answers held-out calculator problems (lookup it often gets wrong: it copies the wrong
    name)."""
    from qwen35.rl.rewards import evaluate_tasks

    scores = evaluate_tasks(embedded_model_path(), ["calculator", "lookup", "add2"], per_task=3, thinking=False,
                            max_new_tokens=96)
    assert set(scores) == {"calculator", "lookup", "add2"}
    assert scores["calculator"] == 1.0
