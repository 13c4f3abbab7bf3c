"""Tool environments for RL rollouts: the model calls tools, their results come back into the conversation.

A rollout of a tool task is an *episode* of assistant turns.  When a turn ends at ``<|im_end|>`` holding tool
calls (parsed with the chat layer's own XML parser, :func:`qwen35.chat.parse_tool_calls`, the one the server
uses), every call runs in Python (:class:`ToolEnv`: tool name -> callable), and the text the chat template puts
between that turn and the next assistant turn -- the ``{"role": "tool"}`` messages (one user turn of
``<tool_response>`` blocks) and the next generation prompt -- is appended to the sample as *inserted* tokens.
Generation then continues after them (a follow-up engine request, see :mod:`qwen35.rl.rollout`), up to
``max_rounds`` tool rounds.

The inserted text is cut from the template's own rendering of the whole conversation so far
(:func:`tool_results_text`), so a sample equals what the template gives for that conversation, token for token
whenever the model's own turns are written as the template writes them (tests/rl/test_tools.py checks it).  The
model's turns themselves are never re-rendered: the sample keeps the tokens the model sampled.

Tools here are the ones the data generator (:mod:`qwen35.train.data`) teaches: :func:`calculator` (a safe
arithmetic evaluator, never ``eval``) and :func:`lookup` (the generator's own tables).  A bad call -- unknown
tool, missing or unexpected arguments, an expression the calculator refuses -- gets a result text that says what
is wrong, as an agent harness would answer, and the episode continues.

The calculator is hand-written (an ``ast`` walk, ~60 lines): the libraries that evaluate expressions safely
(simpleeval, asteval, numexpr) either allow far more than the generator's grammar (names, floats, functions,
comparisons) or need numpy, and none bounds the size of integer results, which is the one thing an RL harness
must do (``9 ** 9 ** 9`` must not stall a rollout actor).
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from qwen35.chat.parsers import parse_tool_calls, split_reasoning

ToolFn = Callable[..., str]

# --------------------------------------------------------------------------------------------------------------
# the calculator


class ToolError(ValueError):
    """A tool refused its input; the message is what the model reads as the tool's result."""


MAX_EXPRESSION_CHARS = 256  # longer expressions are refused before parsing
MAX_RESULT_BITS = 4096  # |numerator| and denominator of every intermediate value stay under 2 ** this
MAX_EXPONENT = 4096

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_OPERATOR_TEXT = {ast.Pow: "**", ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<",
                  ast.RShift: ">>", ast.MatMult: "@"}


def _check_size(value: Fraction) -> Fraction:
    if abs(value.numerator).bit_length() > MAX_RESULT_BITS or value.denominator.bit_length() > MAX_RESULT_BITS:
        raise ToolError(f"result too large (more than {MAX_RESULT_BITS} bits)")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ToolError("exponents must be whole numbers")
    e = exponent.numerator
    if abs(e) > MAX_EXPONENT:
        raise ToolError(f"exponent {e} is too large (at most {MAX_EXPONENT})")
    if base == 0 and e < 0:
        raise ToolError("division by zero")
    # the size of the result before computing it: bits(base) * |e| bounds it
    bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
    if bits > 1 and (bits - 1) * abs(e) > MAX_RESULT_BITS:
        raise ToolError(f"result too large (more than {MAX_RESULT_BITS} bits)")
    return Fraction(base ** e)


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int):
            raise ToolError(f"only whole numbers are allowed, got {v!r}")
        return _check_size(Fraction(v))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        fn = _BINARY.get(type(node.op))
        if fn is None:
            raise ToolError(f"operator {_OPERATOR_TEXT.get(type(node.op), type(node.op).__name__)} is not allowed; "
                            "use + - * / // % ** and parentheses")
        if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            raise ToolError("division by zero")
        return _check_size(Fraction(fn(left, right)))  # Fraction // Fraction is an int: keep every value exact
    raise ToolError(f"{type(node).__name__.lower()} is not allowed; use whole numbers, + - * / // % ** and "
                    "parentheses")


def evaluate_expression(expression: str) -> Fraction:
    """The exact value of an arithmetic expression: whole numbers, ``+ - * / // % **``, unary signs and
    parentheses, with Python's precedence and meaning (``/`` is exact division, ``//`` and ``%`` floor).
    Anything else (names, calls, attributes, floats, strings, other operators) raises :class:`ToolError`, as do
    expressions over :data:`MAX_EXPRESSION_CHARS` characters and values over :data:`MAX_RESULT_BITS` bits."""
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be text, got {type(expression).__name__}")
    text = expression.strip()
    if not text:
        raise ToolError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is too long ({len(text)} characters, at most {MAX_EXPRESSION_CHARS})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"cannot parse {text!r} as an arithmetic expression") from None
    return _eval(tree)


def format_number(value: Fraction) -> str:
    """Whole numbers as digits (``str(int)``, as the data generator writes results); other values as a decimal
    with up to 12 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), ".12g")


def calculator(expression: str) -> str:
    """The ``calculator`` tool of :data:`qwen35.train.data.CALCULATOR_TOOL`: the expression's value as text."""
    if isinstance(expression, int) and not isinstance(expression, bool):  # "<parameter=expression>\n42\n" untyped
        expression = str(expression)
    return format_number(evaluate_expression(expression))


def lookup(topic: str, name: str) -> str:
    """The ``lookup`` tool of :data:`qwen35.train.data.LOOKUP_TOOL`: the data generator's own tables (capitals,
    made-up city populations); a name the table does not know gives ``"not found"``, as in the training data."""
    from qwen35.train.data import CAPITALS, CITY_POPULATIONS, NOT_FOUND

    if not isinstance(topic, str) or not isinstance(name, str):
        raise ToolError("topic and name must be text")
    topic, name = topic.strip(), name.strip()
    if topic == "capital":
        return CAPITALS.get(name, NOT_FOUND)
    if topic == "population":
        return str(CITY_POPULATIONS[name]) if name in CITY_POPULATIONS else NOT_FOUND
    raise ToolError(f"unknown topic {topic!r}; topic must be 'capital' or 'population'")


# --------------------------------------------------------------------------------------------------------------
# the environment


@dataclass(frozen=True)
class ToolOutcome:
    """One executed call: what the model asked for and the text it gets back (``error`` set when refused)."""

    name: str
    arguments: Any  # the decoded arguments (a dict when well-formed)
    result: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments, "result": self.result, "error": self.error}


class ToolEnv:
    """The tools a rollout may call: name -> a Python callable taking the call's arguments as keywords and
    returning the result text.  Pluggable: ``ToolEnv({"calculator": calculator, "weather": my_weather})``.

    A callable refuses bad input by raising (``ToolError``/``ValueError`` or any other exception); the model then
    reads ``"error: <message>"`` as the result, as it would from an agent harness, and the episode goes on."""

    def __init__(self, tools: Mapping[str, ToolFn]) -> None:
        if not isinstance(tools, Mapping) or not tools:
            raise ValueError("a ToolEnv needs a mapping of at least one tool name to a callable")
        for name, fn in tools.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tool names must be non-empty strings, got {name!r}")
            if not callable(fn):
                raise ValueError(f"tool {name!r} is not callable ({type(fn).__name__})")
        self.tools: dict[str, ToolFn] = dict(tools)

    @property
    def names(self) -> list[str]:
        return sorted(self.tools)

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def run(self, name: str, arguments: Any) -> ToolOutcome:
        """Run one call.  ``arguments``: a mapping, or its JSON text (as :class:`qwen35.chat.ToolCall` holds it)."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return self._refuse(name, arguments, f"the arguments of {name} are not valid JSON")
        fn = self.tools.get(name)
        if fn is None:
            return self._refuse(name, arguments, f"unknown tool {name!r}; the tools are {', '.join(self.names)}")
        if not isinstance(arguments, Mapping):
            return self._refuse(name, arguments, f"the arguments of {name} must be an object of named parameters")
        try:
            inspect.signature(fn).bind(**arguments)
        except TypeError as e:
            return self._refuse(name, arguments, f"bad arguments for {name}: {e}")
        except ValueError:  # a callable without a signature (a builtin): let the call itself check
            pass
        try:
            result = fn(**arguments)
        except Exception as e:  # noqa: BLE001 - a tool failure is the model's to read, never a crashed rollout
            return self._refuse(name, arguments, str(e) or type(e).__name__)
        if not isinstance(result, str):
            result = json.dumps(result) if isinstance(result, (dict, list)) else str(result)
        return ToolOutcome(name, dict(arguments), result)

    @staticmethod
    def _refuse(name: str, arguments: Any, message: str) -> ToolOutcome:
        return ToolOutcome(name, arguments, f"error: {message}", message)


def default_tool_env() -> ToolEnv:
    """The data generator's tools: ``calculator`` and ``lookup``."""
    return ToolEnv({"calculator": calculator, "lookup": lookup})


# --------------------------------------------------------------------------------------------------------------
# the conversation


@dataclass(frozen=True)
class ChatContext:
    """What a tool task's prompt was rendered from: the messages before the first assistant turn, the tool
    schemas offered (also used to type the parsed arguments) and the thinking mode."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None
    enable_thinking: bool

    @classmethod
    def make(cls, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
             enable_thinking: bool) -> ChatContext:
        return cls(tuple(dict(m) for m in messages), tuple(dict(t) for t in tools) if tools else None,
                   bool(enable_thinking))


IM_END = "<|im_end|>"


def tool_results_text(tokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                      enable_thinking: bool, results: Sequence[str]) -> str:
    """The text the chat template puts after the last message's ``<|im_end|>`` (``messages`` ends with the
    assistant turn that made the calls) up to and including the next generation prompt: the tool results as
    ``{"role": "tool"}`` messages, then ``<|im_start|>assistant\\n<think>\\n`` (or the closed empty think block
    with thinking off).  Cut from the template's rendering of the whole conversation, so that it is exactly what
    the template writes there."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("tool results follow an assistant turn; the conversation must end with one")
    tools = list(tools) if tools else None
    before = tokenizer.apply_chat_template(list(messages), tools=tools, enable_thinking=enable_thinking,
                                           add_generation_prompt=False)
    after = tokenizer.apply_chat_template(list(messages) + [{"role": "tool", "content": r} for r in results],
                                          tools=tools, enable_thinking=enable_thinking, add_generation_prompt=True)
    cut = before.rfind(IM_END)
    if cut < 0:
        raise ValueError(f"the chat template does not close the assistant turn with {IM_END}")
    cut += len(IM_END)
    if after[:cut] != before[:cut]:
        raise ValueError("the chat template renders the conversation differently once tool results follow it, so "
                         "tool results cannot be appended to the tokens already generated")
    return after[cut:]


@dataclass
class ToolEpisode:
    """One sample of a tool task in flight: the completion so far (model tokens and inserted tool-result tokens,
    with their logprobs, versions and loss mask) and the conversation it stands for.

    The rollout worker feeds it each finished model turn (:meth:`add_turn`) and asks :meth:`next_prompt` for the
    prompt of the next turn, which is None when the episode is over."""

    env: ToolEnv
    tokenizer: Any
    chat: ChatContext
    prompt_ids: list[int]
    max_tokens: int  # completion budget, model and inserted tokens together
    max_rounds: int  # tool rounds before the episode is stopped
    max_model_len: int | None = None  # the engine's context: a next prompt must leave room for one token
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    calls: list[list[ToolOutcome]] = field(default_factory=list)  # per tool round
    finish_reason: str | None = None
    stopped_by: str | None = None  # why the episode ended early: "tool_rounds", "budget", "context", "template"
    error: str | None = None  # the chat template's refusal, when stopped_by is "template"
    routing: Any = None  # [layers, positions, k] of every input position so far (MoE; set by the worker)
    done: bool = False

    def __post_init__(self) -> None:
        self.messages: list[dict[str, Any]] = [dict(m) for m in self.chat.messages]
        self._stop_id = self.tokenizer.im_end_id
        self._last_turn: tuple[list[int], str, str | None] | None = None

    @property
    def rounds(self) -> int:
        return len(self.calls)

    @property
    def text(self) -> str:
        """The last assistant turn's text: the answer the reward reads."""
        return self.turn_texts[-1] if self.turn_texts else ""

    def add_turn(self, ids: Sequence[int], logprobs: Sequence[float], versions: Sequence[int], text: str,
                 finish_reason: str | None) -> None:
        if self.done:
            raise RuntimeError("the episode is over; no turn can be added")
        if not (len(ids) == len(logprobs) == len(versions)):
            raise RuntimeError(f"a turn of {len(ids)} tokens came with {len(logprobs)} logprobs and "
                               f"{len(versions)} versions")
        self.ids += list(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.versions += list(versions)
        self.loss_mask += [True] * len(ids)
        self.turn_texts.append(text)
        self.finish_reason = finish_reason
        self._last_turn = (list(ids), text, finish_reason)

    def next_prompt(self) -> list[int] | None:
        """After a turn: if it ended at ``<|im_end|>`` with tool calls and rounds remain, run the calls, append
        the tool results (loss mask False, logprob 0, the version of the turn that asked for them) and return
        prompt + completion so far for the next turn; otherwise end the episode and return None."""
        if self._last_turn is None or self.done:
            raise RuntimeError("next_prompt follows add_turn, once per turn")
        ids, text, finish_reason = self._last_turn
        self._last_turn = None
        thinking = self.chat.enable_thinking
        reasoning, content = split_reasoning(text, thinking=thinking)
        tools = list(self.chat.tools) if self.chat.tools else None
        content, calls = _parse_calls(content, tools)
        ended_turn = finish_reason == "stop" and bool(ids) and ids[-1] == self._stop_id
        if not calls or not ended_turn:
            return self._end()
        if self.rounds >= self.max_rounds:
            return self._end("tool_rounds")
        outcomes = [self.env.run(c.name, c.arguments) for c in calls]
        assistant: dict[str, Any] = {"role": "assistant", "content": content,
                                     "tool_calls": [{"type": "function",
                                                     "function": {"name": c.name,
                                                                  "arguments": _arguments_for_template(o)}}
                                                    for c, o in zip(calls, outcomes)]}
        if thinking:
            assistant["reasoning_content"] = reasoning
        messages = self.messages + [assistant]
        try:
            text = tool_results_text(self.tokenizer, messages, tools, thinking, [o.result for o in outcomes])
        except ValueError as e:  # the template refused the conversation: end the episode, say why, never crash
            self.error = str(e)
            return self._end("template")
        inserted = self.tokenizer.encode(text)
        nxt = self.prompt_ids + self.ids + inserted
        if len(self.ids) + len(inserted) >= self.max_tokens:
            return self._end("budget")
        if self.max_model_len is not None and len(nxt) + 1 > self.max_model_len:
            return self._end("context")
        self.messages = messages + [{"role": "tool", "content": o.result} for o in outcomes]
        self.calls.append(outcomes)
        version = self.versions[-1] if self.versions else 0
        self.ids += inserted
        self.logprobs += [0.0] * len(inserted)
        self.versions += [version] * len(inserted)
        self.loss_mask += [False] * len(inserted)
        return nxt

    @property
    def remaining_tokens(self) -> int:
        return self.max_tokens - len(self.ids)

    def _end(self, stopped_by: str | None = None) -> None:
        self.done = True
        self.stopped_by = stopped_by
        if stopped_by in ("budget", "context"):
            self.finish_reason = "length"

    def info(self) -> dict[str, Any]:
        """What the sample records about the episode (Sample.info)."""
        return {"tool_rounds": self.rounds, "tool_calls": [[o.to_dict() for o in r] for r in self.calls],
                "turns": list(self.turn_texts), "stopped_by": self.stopped_by, "error": self.error}


def _parse_calls(content: str, tools: list[dict[str, Any]] | None) -> tuple[str, list[Any]]:
    """The turn's calls as the server reads them (typed by the offered schemas).  The server's parser takes a
    ``<tool_call>`` block naming a function that was not offered as plain content; here such a block is still
    a call, so that the model reads "unknown tool" back instead of having it taken for its answer."""
    rest, calls = parse_tool_calls(content, tools)
    if not calls and tools is not None and "<tool_call>" in content:
        rest, calls = parse_tool_calls(content, None)
    return rest, calls


def _arguments_for_template(outcome: ToolOutcome) -> Any:
    # the template renders a mapping of arguments; a call whose arguments were not an object is shown as given
    return outcome.arguments if isinstance(outcome.arguments, Mapping) else {"arguments": outcome.arguments}


__all__ = ["ToolEnv", "ToolError", "ToolOutcome", "ToolEpisode", "ChatContext", "calculator", "lookup",
           "evaluate_expression", "format_number", "default_tool_env", "tool_results_text",
           "MAX_EXPRESSION_CHARS", "MAX_RESULT_BITS"]
