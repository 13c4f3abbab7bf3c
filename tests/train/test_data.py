"""Tests for the synthetic chat data: determinism, coverage, correct answers (recomputed here independently),
well-formed tool calls, a held-out split that never leaks into train, and rendering through the chat template."""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from typing import Any

import pytest

from qwen35.train import data as D

N = 3000


@pytest.fixture(scope="module")
def examples() -> list[dict[str, Any]]:
    return D.generate_examples(N, seed=1234)


def _final(ex: dict[str, Any]) -> dict[str, Any]:
    return ex["messages"][-1]


def _user_questions(ex: dict[str, Any]) -> list[str]:
    return [m["content"] for m in ex["messages"] if m["role"] == "user"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _eval_expression(expr: str) -> int:
    """Evaluate an integer expression with + - * only (an independent check of the calculator results)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise AssertionError(f"unexpected expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


# ----------------------------------------------------------------------------------------------------------------
# Determinism and coverage


def test_same_seed_same_data() -> None:
    assert D.generate_examples(300, seed=7) == D.generate_examples(300, seed=7)
    assert D.generate_examples(300, seed=7) != D.generate_examples(300, seed=8)


def test_prefix_stable() -> None:
    # Asking for more examples extends the list rather than reshuffling it.
    assert D.generate_examples(50, seed=3) == D.generate_examples(120, seed=3)[:50]


def test_every_task_and_both_thinking_modes(examples: list[dict[str, Any]]) -> None:
    seen = Counter((ex["task"], ex["enable_thinking"]) for ex in examples)
    for task in D.TASKS:
        if task == "text":
            assert seen[("text", False)] > 0
            continue
        assert seen[(task, True)] > 0, task
        assert seen[(task, False)] > 0, task


def test_mix_selects_tasks() -> None:
    exs = D.generate_examples(200, seed=0, mix={"add2": 1.0, "lookup": 2.0})
    assert {ex["task"] for ex in exs} == {"add2", "lookup"}
    with pytest.raises(ValueError):
        D.generate_examples(10, seed=0, mix={"nonsense": 1.0})
    with pytest.raises(ValueError):
        D.generate_examples(10, seed=0, mix={"add2": 0.0})


def test_example_shape(examples: list[dict[str, Any]]) -> None:
    for ex in examples:
        assert set(ex) >= {"task", "messages", "tools", "enable_thinking", "answer", "keys"}
        if ex["task"] == "text":
            assert ex["messages"] == [] and ex["text"].strip() and not re.search(r"<\|", ex["text"])
            continue
        msgs = ex["messages"]
        roles = [m["role"] for m in msgs]
        assert set(roles) <= {"system", "user", "assistant", "tool"}
        assert "system" not in roles[1:], "a system message may only come first"
        assert roles[-1] == "assistant" and "tool_calls" not in msgs[-1]
        assert all(isinstance(m["content"], str) for m in msgs)
        last_user = max(i for i, r in enumerate(roles) if r == "user")
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if ex["enable_thinking"] and i > last_user:
                assert m.get("reasoning_content", "").strip(), "thinking-on turns must carry a trace"
            if not ex["enable_thinking"]:
                assert "reasoning_content" not in m, "thinking-off turns answer directly"
            for text in (m["content"], m.get("reasoning_content", "")):
                assert "<think>" not in text and "</think>" not in text and "<tool_call>" not in text


# ----------------------------------------------------------------------------------------------------------------
# Answers, recomputed from the problem


def _expected_from_key(key: str) -> str:
    kind, _, rest = key.partition(":")
    if kind == "add":
        a, b = map(int, rest.split("+"))
        return str(a + b)
    if kind == "sub":
        a, b = map(int, rest.split("-"))
        return str(a - b)
    if kind == "count":
        word, letter = rest.split(":")
        return str(word.count(letter))
    if kind == "sort":
        order, listed = rest.split(":")
        nums = [int(x) for x in listed.split(", ")]
        return ", ".join(map(str, sorted(nums, reverse=order == "desc")))
    if kind == "reverse":
        return rest[::-1]
    if kind == "upper":
        return rest.upper()
    if kind == "remove":
        word, letter = rest.split(":")
        return "".join(c for c in word if c != letter)
    if kind == "calc":
        return str(_eval_expression(rest))
    raise AssertionError(f"no independent check for {key!r}")


def _check_arithmetic_trace(trace: str, answer: str) -> None:
    # Every equation written in the trace must be true, and the final statement must give the answer.
    for m in re.finditer(r"(\d+) \+ (\d+)(?: \+ (\d+))? = (\d+)", trace):
        a, b, c, s = m.groups()
        assert int(a) + int(b) + int(c or 0) == int(s), m.group(0)
    for m in re.finditer(r"(\d+) - (\d+)(?: - (\d+))? = (\d+)", trace):
        a, b, c, s = m.groups()
        assert int(a) - int(b) - int(c or 0) == int(s), m.group(0)
    so_far = re.findall(r"So far: (\d+)", trace)
    assert so_far and int(so_far[-1]) == int(answer)
    assert trace.splitlines()[-1].endswith(f" = {answer}.")


def test_single_turn_answers(examples: list[dict[str, Any]]) -> None:
    checked = Counter()
    for ex in examples:
        if ex["task"] not in ("add2", "add3", "sub2", "sub3", "count", "sort", "reverse", "upper", "remove"):
            continue
        (key,) = ex["keys"]
        expected = _expected_from_key(key)
        assert ex["answer"] == expected, (key, ex["answer"])
        final = _final(ex)
        assert final["content"] == f"The answer is {expected}."
        assert D.check_answer(ex, final["content"])
        question = _user_questions(ex)[-1]
        if ex["task"].startswith(("add", "sub")):
            # Operand sizes follow the task name, and the question states exactly these operands.
            a, b = map(int, re.split(r"[+-]", key.split(":")[1]))
            digits = int(ex["task"][-1])
            assert max(len(str(a)), len(str(b))) == digits and min(len(str(a)), len(str(b))) >= 2
            assert sorted(_ints(question)) == sorted([a, b])
            if ex["task"].startswith("sub"):
                assert a >= b
            if ex["enable_thinking"]:
                _check_arithmetic_trace(final["reasoning_content"], expected)
        elif ex["task"] == "sort":
            _, order, listed = key.split(":")
            assert listed in question
            assert (order == "desc") == ("largest to smallest" in question or "descending" in question)
        else:
            for part in key.split(":")[1:]:
                assert re.search(rf"\b{part}\b", question), (part, question)
        checked[ex["task"]] += 1
    assert len(checked) == 9


def test_count_trace_tallies_letters(examples: list[dict[str, Any]]) -> None:
    for ex in examples:
        if ex["task"] != "count" or not ex["enable_thinking"]:
            continue
        _, word, letter = ex["keys"][0].split(":")
        lines = _final(ex)["reasoning_content"].splitlines()[1:-1]
        assert "".join(line[0] for line in lines) == word
        assert [int(line.rsplit(" ", 1)[1]) for line in lines] == [word[: i + 1].count(letter)
                                                                    for i in range(len(word))]


def test_traces_exhaustive_two_digit() -> None:
    for a in range(10, 100):
        for b in range(10, 100):
            trace, r = D.addition_trace(a, b)
            assert r == a + b
            if a >= b:
                trace, r = D.subtraction_trace(a, b)
                assert r == a - b
                _check_arithmetic_trace(trace, str(r))
    with pytest.raises(ValueError):
        D.subtraction_trace(3, 5)


def test_multi_turn_answers(examples: list[dict[str, Any]]) -> None:
    n_follow_up = 0
    for ex in examples:
        if ex["task"] != "multi_turn":
            continue
        assert len(_user_questions(ex)) >= 2
        assert ex["answer"] == _expected_from_key(ex["keys"][-1])
        assert _final(ex)["content"] == f"The answer is {ex['answer']}."
        if "that" in _user_questions(ex)[-1]:
            # A follow-up builds on the previous visible answer.
            n_follow_up += 1
            previous = D.extract_answer(ex["messages"][-3]["content"])
            assert ex["keys"][-1].split(":")[1].startswith(f"{previous}")
    assert n_follow_up > 0


# ----------------------------------------------------------------------------------------------------------------
# Tool use


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def _check_call(call: dict[str, Any], tools: list[dict[str, Any]]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call["type"] == "function"
    fn = call["function"]
    assert fn["name"] in schemas, fn["name"]
    schema, args = schemas[fn["name"]], fn["arguments"]
    assert isinstance(args, dict)
    assert set(schema["required"]) <= set(args), "missing required parameters"
    assert set(args) <= set(schema["properties"]), "unknown parameters"
    for name, value in args.items():
        prop = schema["properties"][name]
        assert isinstance(value, _JSON_TYPES[prop["type"]])
        if "enum" in prop:
            assert value in prop["enum"]
        assert value == value.strip() and "\n" not in value and "<" not in value


def test_tool_calls_well_formed(examples: list[dict[str, Any]]) -> None:
    n_calls = 0
    for ex in examples:
        msgs = ex["messages"]
        has_calls = any("tool_calls" in m for m in msgs)
        assert has_calls == (ex["task"] in ("calculator", "lookup", "multi_tool"))
        if not has_calls:
            assert not any(m["role"] == "tool" for m in msgs)
            continue
        assert ex["tools"], "a conversation with tool calls must declare its tools"
        i = 0
        while i < len(msgs):
            m = msgs[i]
            if m["role"] == "assistant" and "tool_calls" in m:
                calls = m["tool_calls"]
                assert calls and m["content"] == ""
                for call in calls:
                    _check_call(call, ex["tools"])
                    n_calls += 1
                # Exactly one tool message per call, in order, then the assistant again.
                results = msgs[i + 1: i + 1 + len(calls)]
                assert [r["role"] for r in results] == ["tool"] * len(calls)
                assert msgs[i + 1 + len(calls)]["role"] == "assistant"
                for call, result in zip(calls, results):
                    _check_tool_result(call["function"], result["content"])
                i += 1 + len(calls)
            else:
                assert m["role"] != "tool", "tool message without a preceding call"
                i += 1
    assert n_calls > 0


def _check_tool_result(fn: dict[str, Any], result: str) -> None:
    args = fn["arguments"]
    if fn["name"] == "calculator":
        assert result == str(_eval_expression(args["expression"]))
    elif args["topic"] == "capital":
        assert result == D.CAPITALS.get(args["name"], D.NOT_FOUND)
    else:
        assert result == str(D.CITY_POPULATIONS[args["name"]]) if args["name"] in D.CITY_POPULATIONS \
            else result == D.NOT_FOUND


def test_tool_answers_use_tool_results(examples: list[dict[str, Any]]) -> None:
    for ex in examples:
        if ex["task"] not in ("calculator", "lookup", "multi_tool"):
            continue
        last_result = ex["messages"][-2]
        assert last_result["role"] == "tool"
        expected = "unknown" if last_result["content"] == D.NOT_FOUND else last_result["content"]
        assert ex["answer"] == expected
        assert D.check_answer(ex, _final(ex)["content"])
        if ex["task"] == "multi_tool":
            # The calculator is fed the two looked-up populations.
            pops = [m["content"] for m in ex["messages"] if m["role"] == "tool"][:2]
            calc = ex["messages"][-3]["tool_calls"][0]["function"]["arguments"]["expression"]
            assert _ints(calc) == [int(p) for p in pops]
            assert ex["answer"] == str(_eval_expression(calc))


# ----------------------------------------------------------------------------------------------------------------
# Held-out split


def test_split_disjoint(examples: list[dict[str, Any]]) -> None:
    train, held = D.split(examples, held_out_fraction=0.1)
    assert len(train) + len(held) == len(examples) and held and train
    train_keys = {k for ex in train for k in ex["keys"]}
    held_keys = {k for ex in held for k in ex["keys"] if D.is_held_out_key(k, 0.1)}
    assert held_keys and not train_keys & held_keys
    assert all(not D.is_held_out_key(k, 0.1) for k in train_keys)
    # Every held-out example is held out for one of its own problems, and only checkable tasks are held out.
    assert all(any(D.is_held_out_key(k, 0.1) for k in ex["keys"]) for ex in held)
    assert {ex["task"] for ex in held} <= set(D.VERIFIABLE_TASKS)


def test_split_disjoint_across_seeds() -> None:
    # The bucket is a function of the problem alone, so train data from any seed avoids another seed's held-out.
    train, _ = D.split(D.generate_examples(2000, seed=1))
    _, held = D.split(D.generate_examples(2000, seed=2))
    train_problems = {k for ex in train for k in ex["keys"]}
    held_problems = {k for ex in held for k in ex["keys"] if D.is_held_out_key(k, 0.1)}
    assert held_problems and not train_problems & held_problems


def test_generate_split() -> None:
    train, held = D.generate_split(500, 100, seed=3)
    assert len(train) == 500 and len(held) == 100
    assert not any(D.is_held_out(ex) for ex in train)
    assert all(D.is_held_out(ex) for ex in held)
    assert len({(tuple(ex["keys"]), ex["enable_thinking"]) for ex in held}) == 100
    assert D.generate_split(500, 100, seed=3) == (train, held)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and answer parsing


def test_prompt_for(examples: list[dict[str, Any]]) -> None:
    for ex in examples:
        if ex["task"] == "text":
            with pytest.raises(ValueError):
                D.prompt_for(ex)
            continue
        msgs, tools, think = D.prompt_for(ex)
        assert msgs == ex["messages"][: len(msgs)] and ex["messages"][len(msgs)]["role"] == "assistant"
        assert len(msgs) == len(ex["messages"]) - 1
        assert msgs[-1]["role"] in ("user", "tool") and tools == ex["tools"] and think == ex["enable_thinking"]
        if ex["task"] == "calculator":
            first, _, _ = D.prompt_for(ex, 0)
            assert first[-1]["role"] == "user" and ex["messages"][len(first)]["tool_calls"]


def test_extract_answer() -> None:
    assert D.extract_answer("The answer is 579.") == "579"
    assert D.extract_answer("Let me see.\nThe answer is 3, 7, 19.") == "3, 7, 19"
    assert D.extract_answer("The answer is Mexico City.") == "Mexico City"
    assert D.extract_answer("The answer is 12") == "12"
    assert D.extract_answer("I think it is 12.") is None


# ----------------------------------------------------------------------------------------------------------------
# Rendering (needs the chat template: qwen35.chat.template.render_chat)


def test_render_examples() -> None:
    from qwen35.chat.template import render_chat

    exs = D.generate_examples(400, seed=11)
    for ex in exs:
        text, spans = D.render_with_spans(ex)
        assert text == D.render_example(ex)
        assert spans and all(0 <= a < b <= len(text) for a, b in spans)
        if ex["task"] == "text":
            assert text == ex["text"] + "<|endoftext|>"
            continue
        final = _final(ex)
        # The final assistant turn is in the text and closed by <|im_end|>.
        assert text.rstrip("\n").endswith(final["content"] + "<|im_end|>")
        last = text[spans[-1][0]: spans[-1][1]]
        assert last.endswith(final["content"] + "<|im_end|>")
        # The evaluation prompt is exactly what precedes the last trained span.
        msgs, tools, think = D.prompt_for(ex)
        prompt = render_chat(msgs, tools=tools, enable_thinking=think, add_generation_prompt=True)
        assert text[: spans[-1][0]] == prompt
        for a, b in spans:
            span = text[a:b]
            assert span.endswith("<|im_end|>") and span.count("<|im_end|>") == 1
            assert "<think>" not in span, "the <think> opener belongs to the prompt, not the target"
            assert ("</think>" in span) == think
        n_generated = sum(1 for i, m in enumerate(ex["messages"])
                          if m["role"] == "assistant" and i > max(j for j, u in enumerate(ex["messages"])
                                                                   if u["role"] == "user"))
        assert len(spans) == n_generated
        if ex["tools"]:
            assert "<tools>" in text
        for m in ex["messages"]:
            for call in m.get("tool_calls", []):
                assert f"<function={call['function']['name']}>" in text
