"""Prompts and rewards: the project's own verifiable tasks (qwen35.train.data) as an RL environment.

A reward function takes the example a prompt came from and the completion's text and returns a float:
``reward_fn(example, text) -> float``.  :func:`exact_match_reward` is the default: 1 when the final content
(after ``</think>`` when thinking is on) gives the example's answer in the fixed "The answer is X." form
(:func:`qwen35.train.data.check_answer`), else 0.  Any Python function of the same shape can replace it
(``run_rl(cfg, reward_fn=...)``).

Prompts: :class:`TaskPrompts` maps an index to one training problem, deterministically (the same index gives
the same prompt in every process and after a resume), skipping held-out problems so that the held-out
evaluation stays honest.

Tool tasks (calculator, lookup, multi_tool) are multi-turn: their prompt is the conversation before the *first*
assistant turn (the tool schemas in its system block), :attr:`Prompt.chat` carries that conversation, and the
rollout worker runs the episode (qwen35.rl.tools: tool calls parsed, run in Python, their results appended,
generation continued).  The reward reads the last assistant turn, the answer after the last tool round:
``Sample.text`` of a tool episode is that turn's text, so :func:`exact_match_reward` applies unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwen35.chat.parsers import split_reasoning
from qwen35.rl.config import TOOL_TASKS
from qwen35.rl.tools import ChatContext
from qwen35.train.data import check_answer, is_held_out, make_example, prompt_for

RewardFn = Callable[[dict[str, Any], str], float]


def exact_match_reward(example: dict[str, Any], text: str) -> float:
    """1.0 when the completion's final content answers the example (check_answer), else 0.0."""
    _, content = split_reasoning(text, thinking=bool(example.get("enable_thinking", True)))
    return 1.0 if check_answer(example, content) else 0.0


@dataclass
class Prompt:
    index: int
    example: dict[str, Any]
    ids: list[int]
    chat: ChatContext | None = None  # tool tasks: the conversation the prompt renders (a multi-turn episode)

    @property
    def task(self) -> str:
        return self.example["task"]


class TaskPrompts:
    """Prompt i of a run: a training (not held-out) problem of a task drawn by the weights, thinking on with
    probability ``think_prob``, rendered with the model's chat template.  A pure function of (seed, i)."""

    def __init__(self, tokenizer, tasks: Mapping[str, float], seed: int = 0, think_prob: float = 0.5,
                 max_prompt_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.names = [t for t, w in tasks.items() if w > 0]
        self.weights = [tasks[t] for t in self.names]
        if not self.names:
            raise ValueError("no task with a positive weight")
        self.seed, self.think_prob, self.max_prompt_tokens = seed, think_prob, max_prompt_tokens

    def __getitem__(self, index: int) -> Prompt:
        rng = random.Random(self.seed * 1_000_003 + index)
        for _ in range(1000):
            task = rng.choices(self.names, weights=self.weights)[0]
            ex = make_example(task, rng, rng.random() < self.think_prob)
            if is_held_out(ex):
                continue
            tool_task = task in TOOL_TASKS
            # a tool task starts before its first assistant turn (the tool call); the others before the answer
            messages, tools, think = prompt_for(ex, 0 if tool_task else -1)
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, tools=tools,
                                                                           enable_thinking=think))
            if self.max_prompt_tokens is None or len(ids) <= self.max_prompt_tokens:
                return Prompt(index, ex, ids, ChatContext.make(messages, tools, think) if tool_task else None)
        raise RuntimeError(f"prompt {index}: no training problem found in 1000 draws")


def evaluate_tasks(model_dir, tasks: Sequence[str], per_task: int = 50, thinking: bool = True,
                   max_new_tokens: int = 384, batch_size: int = 32, tool_env=None) -> dict[str, float]:
    """Held-out exact match per task, greedy, with thinking on or off (qwen35.train.embedded.evaluate asks
    with thinking on only; this asks each held-out problem in the mode given).

    Tool tasks are evaluated as RL runs them: the whole episode from the first assistant turn, the model's own
    calls executed by ``tool_env`` (default: the data generator's calculator and lookup) and the final answer
    checked; ``max_new_tokens`` bounds the episode's completion."""
    from qwen35.chat import Tokenizer
    from qwen35.checkpoint import load_model
    from qwen35.train.embedded import _held_out, greedy_generate

    model = load_model(model_dir, dtype="float32").eval()
    tok = Tokenizer(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.endoftext_id
    prompts, jobs, episodes = [], [], []
    for task in tasks:
        for ex in _held_out(task, per_task):
            ex = dict(ex, enable_thinking=thinking)
            messages, tools, _ = prompt_for(ex, 0 if task in TOOL_TASKS else -1)
            ids = tok.encode(tok.apply_chat_template(messages, tools=tools, enable_thinking=thinking))
            if task in TOOL_TASKS:
                episodes.append((task, ex, ids, ChatContext.make(messages, tools, thinking)))
            else:
                prompts.append(ids)
                jobs.append((task, ex))
    hits: dict[str, list[float]] = {}
    if prompts:
        outs = greedy_generate(model, prompts, sorted(tok.stop_token_ids), pad, max_new_tokens, batch_size)
        for (task, ex), ids in zip(jobs, outs):
            text = tok.decode([i for i in ids if i not in tok.stop_token_ids])
            hits.setdefault(task, []).append(exact_match_reward(ex, text))
    if episodes:
        from qwen35.engine import EngineConfig, SamplingParams
        from qwen35.rl.rollout import RolloutWorker
        from qwen35.rl.tools import default_tool_env

        worker = RolloutWorker(model, tok, EngineConfig(max_num_seqs=batch_size), record_routing=False,
                               tool_env=tool_env if tool_env is not None else default_tool_env())
        greedy = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=0)
        for g, (_, _, ids, chat) in enumerate(episodes):
            worker.submit(g, ids, greedy, chat)
        for (s,) in worker.run():
            task, ex, _, _ = episodes[s.group]
            hits.setdefault(task, []).append(exact_match_reward(ex, s.text))
    return {t: sum(v) / len(v) for t in tasks for v in [hits.get(t, [])] if v}


__all__ = ["RewardFn", "exact_match_reward", "Prompt", "TaskPrompts", "evaluate_tasks"]
