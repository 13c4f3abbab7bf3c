"""Synthetic chat data for the tiny default model.

The default model is trained for about an hour on two CPU cores, so the data has to teach a handful of
behaviours that are easy to verify rather than broad knowledge:

* thinking traces (``<think>`` ... ``</think>`` then an answer) on problems whose answer a script can check:
  2/3-digit addition and subtraction worked digit by digit, counting a letter, sorting, simple word edits;
* the same problems answered directly when thinking is off;
* tool use in the Qwen3.5 XML format (a ``calculator`` and a ``lookup`` tool), including parallel calls and a
  second round of calls that uses the first results;
* multi-turn chats, small talk and short stories, and raw text.

Examples are structured conversations (OpenAI-style messages); turning them into text is the chat template's job
(``qwen35.chat.template.render_chat``), so training text and inference prompts come from the same renderer.

Every trace uses one rigid format per task: a tiny model learns a fixed procedure far more easily than varied
prose, and each step of the trace only needs tokens that are already visible a few positions back.
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
Example = dict[str, Any]

ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"

# --------------------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------------------

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with whole numbers and the operators +, - and *.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "The expression to evaluate, such as 12 * 34."},
            },
            "required": ["expression"],
        },
    },
}

LOOKUP_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up a fact in the reference table: the capital of a country or the population of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "topic": {"type": "string", "enum": ["capital", "population"], "description": "What to look up."},
                "name": {"type": "string", "description": "The country or city."},
            },
            "required": ["topic", "name"],
        },
    },
}

# The lookup table. Populations belong to made-up cities so the model cannot answer them from memory and has to
# use the tool result.
CAPITALS: dict[str, str] = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "India": "New Delhi", "China": "Beijing", "Brazil": "Brasilia",
    "Mexico": "Mexico City", "Poland": "Warsaw", "Sweden": "Stockholm", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Austria": "Vienna", "Cuba": "Havana", "Ghana": "Accra", "Nepal": "Kathmandu",
    "Vietnam": "Hanoi", "Turkey": "Ankara", "Australia": "Canberra", "Argentina": "Buenos Aires",
    "Finland": "Helsinki", "Thailand": "Bangkok", "Hungary": "Budapest", "Morocco": "Rabat",
}

CITY_POPULATIONS: dict[str, int] = {
    "Brindlemoor": 48213, "Quellhaven": 7304, "Ostravale": 125880, "Marrowick": 3391, "Tessaly Ford": 22517,
    "Dunmere": 12077, "Larkspur Bay": 65430, "Vintrel": 910, "Calder Rise": 38166, "Emberfall": 5742,
    "Norwick Hollow": 1468, "Saltmarsh": 27095, "Fennick": 83312, "Glimmerdale": 4029, "Kestrel Point": 15650,
    "Mossbridge": 9981, "Pellam": 57124, "Ravenholt": 2236, "Sunmere": 31877, "Westerly Cove": 6613,
}

# Names the table does not know, so the model also sees a failed lookup and answers "unknown" instead of guessing.
UNKNOWN_NAMES: tuple[str, ...] = (
    "Zorbland", "Quarrytown", "Elderglen", "Mistral Bay", "Tannersby", "Wrenfield", "Oakhurst Vale", "Plimsoll",
)

NOT_FOUND = "not found"

# --------------------------------------------------------------------------------------------------------------
# Vocabulary for the word tasks, stories and raw text (lowercase ASCII letters only, so spelling is unambiguous)
# --------------------------------------------------------------------------------------------------------------

WORDS: tuple[str, ...] = (
    "apple", "banana", "cherry", "planet", "garden", "window", "pencil", "rabbit", "river", "mountain",
    "strawberry", "bottle", "candle", "dragon", "forest", "guitar", "hammer", "island", "jacket", "kitten",
    "lemon", "mirror", "needle", "orange", "pepper", "puzzle", "rocket", "silver", "tomato", "violin",
    "wizard", "yellow", "zebra", "anchor", "basket", "butter", "castle", "dinner", "engine", "feather",
    "giraffe", "honey", "igloo", "jungle", "kettle", "ladder", "marble", "nectar", "oyster", "parrot",
    "quilt", "rainbow", "saddle", "tunnel", "umbrella", "valley", "walrus", "yogurt", "bridge", "cactus",
    "desert", "letter", "summer", "winter", "coffee", "cookie", "pillow", "shadow", "spoon", "table",
    "chair", "cloud", "dream", "ocean", "piano", "robot", "sugar", "tiger", "train", "water",
    "bubble", "carrot", "mango", "lizard", "meadow", "muffin", "noodle", "pirate", "sparrow", "turtle",
    "hello", "little", "happy", "school", "book", "moon", "star", "tree", "house", "paper",
    "banner", "committee", "balloon", "success", "address", "coconut", "pineapple", "elephant", "octopus",
    "penguin", "squirrel", "lantern", "blanket", "compass", "harbor", "village", "cabbage", "teapot",
)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a concise assistant.",
    "You are a small, friendly assistant. Keep answers short.",
)

PLACES: tuple[str, ...] = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands")


# --------------------------------------------------------------------------------------------------------------
# Problems: one user question with its trace, final content and checkable answer
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One question and how the assistant answers it, independent of thinking mode and conversation shape."""

    key: str | None  # canonical identity for the held-out split; None = never held out (small talk, stories)
    question: str
    reasoning: str
    content: str
    answer: str | None
    value: int | None = None  # numeric answer, so a follow-up question can build on it


def _answer(value: object) -> str:
    # One fixed short form for every checkable answer; `extract_answer` parses it back.
    return f"The answer is {value}."


def _digits(n: int) -> str:
    return str(n)[::-1]


def addition_trace(a: int, b: int) -> tuple[str, int]:
    """Column addition from the right; every line restates the partial result so the model never has to
    reassemble digits written far back in the trace."""
    da, db = _digits(a), _digits(b)
    lines = [f"{a} + {b}, digit by digit from the right."]
    carry, so_far = 0, ""
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        terms = f"{x} + {y}" if i == 0 else f"{x} + {y} + {carry}"
        so_far = str(s % 10) + so_far
        lines.append(f"{PLACES[i]}: {terms} = {s}, digit {s % 10}, carry {s // 10}. So far: {so_far}")
        carry = s // 10
    if carry:
        so_far = str(carry) + so_far
        lines.append(f"{PLACES[len(so_far) - 1]}: carry {carry}. So far: {so_far}")
    result = int(so_far)
    lines.append(f"So {a} + {b} = {result}.")
    return "\n".join(lines), result


def subtraction_trace(a: int, b: int) -> tuple[str, int]:
    """Column subtraction from the right with explicit borrows (requires a >= b >= 0)."""
    if not 0 <= b <= a:
        raise ValueError(f"subtraction_trace needs a >= b >= 0, got {a} - {b}")
    da, db = _digits(a), _digits(b)
    lines = [f"{a} - {b}, digit by digit from the right."]
    borrow, so_far = 0, ""
    for i in range(len(da)):
        x = int(da[i])
        y = int(db[i]) if i < len(db) else 0
        terms = f"{x} - {y}" if i == 0 else f"{x} - {y} - {borrow}"
        d = x - y - borrow
        if d < 0:
            d += 10
            big = f"{x + 10} - {y}" if i == 0 else f"{x + 10} - {y} - {borrow}"
            so_far = str(d) + so_far
            lines.append(f"{PLACES[i]}: {terms} is below zero, borrow: {big} = {d}, borrow 1. So far: {so_far}")
            borrow = 1
        else:
            so_far = str(d) + so_far
            lines.append(f"{PLACES[i]}: {terms} = {d}, borrow 0. So far: {so_far}")
            borrow = 0
    result = int(so_far)
    if so_far != str(result):
        lines.append(f"Without leading zeros: {result}")
    lines.append(f"So {a} - {b} = {result}.")
    return "\n".join(lines), result


_ADD_QUESTIONS = ("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is {a} plus {b}?",
                  "Calculate {a} + {b}.")
_SUB_QUESTIONS = ("What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "What is {a} minus {b}?",
                  "Calculate {a} - {b}.")


def _rand_int(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def make_add(rng: random.Random, digits: int) -> Problem:
    a = _rand_int(rng, digits)
    # Mostly equal widths; sometimes a shorter second operand so the trace also shows padding with 0.
    b = _rand_int(rng, digits - 1 if digits > 2 and rng.random() < 0.25 else digits)
    if rng.random() < 0.5:
        a, b = b, a
    trace, result = addition_trace(a, b)
    q = rng.choice(_ADD_QUESTIONS).format(a=a, b=b)
    return Problem(f"add:{a}+{b}", q, trace, _answer(result), str(result), result)


def make_sub(rng: random.Random, digits: int) -> Problem:
    a = _rand_int(rng, digits)
    b = _rand_int(rng, digits - 1 if digits > 2 and rng.random() < 0.25 else digits)
    a, b = max(a, b), min(a, b)
    trace, result = subtraction_trace(a, b)
    q = rng.choice(_SUB_QUESTIONS).format(a=a, b=b)
    return Problem(f"sub:{a}-{b}", q, trace, _answer(result), str(result), result)


def make_follow_up(rng: random.Random, previous: int) -> Problem:
    """A second-turn question that only makes sense with the previous answer in view."""
    k = _rand_int(rng, 2)
    if previous >= k and rng.random() < 0.5:
        trace, result = subtraction_trace(previous, k)
        q = rng.choice(("Now subtract {k} from that.", "Take away {k} from that result.")).format(k=k)
        key = f"sub:{previous}-{k}"
    else:
        trace, result = addition_trace(previous, k)
        q = rng.choice(("Now add {k} to that.", "Add {k} to that result.")).format(k=k)
        key = f"add:{previous}+{k}"
    trace = f"The previous answer was {previous}.\n{trace}"
    return Problem(key, q, trace, _answer(result), str(result), result)


def make_count(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    # Usually a letter that occurs; sometimes one that does not, so "0" is a possible answer.
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz"
                                                                      if c not in word])
    q = rng.choice((
        "How many times does the letter {c} appear in {w}?",
        "Count the letter {c} in the word {w}.",
        "How many {c}'s are in {w}?",
    )).format(c=letter, w=word)
    lines = [f"Count the letter {letter} in {word}, one letter at a time."]
    n = 0
    for ch in word:
        if ch == letter:
            n += 1
            lines.append(f"{ch}: yes, {n}")
        else:
            lines.append(f"{ch}: no, {n}")
    lines.append(f"So {letter} appears {n} times.")
    return Problem(f"count:{word}:{letter}", q, "\n".join(lines), _answer(n), str(n), n)


def make_sort(rng: random.Random) -> Problem:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    descending = rng.random() < 0.3
    listed = ", ".join(map(str, nums))
    if descending:
        q = rng.choice(("Sort these numbers from largest to smallest: {l}.", "Sort in descending order: {l}."))
    else:
        q = rng.choice(("Sort these numbers from smallest to largest: {l}.", "Sort in ascending order: {l}.",
                        "Put these numbers in increasing order: {l}."))
    word, pick = ("Largest", max) if descending else ("Smallest", min)
    # Selection sort: each line picks one number and restates what is left, so the trace is checkable line by line.
    lines, left, out = [], list(nums), []
    while len(left) > 1:
        best = pick(left)
        listed_left = ", ".join(map(str, left))
        left.remove(best)
        out.append(best)
        lines.append(f"{word} of {listed_left} is {best}. Left: {', '.join(map(str, left))}")
    out.append(left[0])
    result = ", ".join(map(str, out))
    lines.append(f"Sorted: {result}")
    order = "desc" if descending else "asc"
    return Problem(f"sort:{order}:{listed}", q.format(l=listed), "\n".join(lines), _answer(result), result)


def _spell(word: str) -> str:
    return " ".join(word)


def make_reverse(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    q = rng.choice(("Reverse the word {w}.", "Write {w} backwards.", "What is {w} spelled backwards?")).format(w=word)
    result = word[::-1]
    trace = f"Spell {word}: {_spell(word)}\nBackwards: {_spell(result)}\nJoined: {result}"
    return Problem(f"reverse:{word}", q, trace, _answer(result), result)


def make_upper(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    q = rng.choice(("Write {w} in uppercase.", "Convert the word {w} to capital letters.",
                    "What is {w} in uppercase letters?")).format(w=word)
    result = word.upper()
    trace = f"Spell {word}: {_spell(word)}\nUppercase: {_spell(result)}\nJoined: {result}"
    return Problem(f"upper:{word}", q, trace, _answer(result), result)


def make_remove(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz"
                                                                       if c not in word])
    q = rng.choice(("Remove every {c} from {w}.", "Delete the letter {c} from the word {w}.",
                    "What is {w} without the letter {c}?")).format(c=letter, w=word)
    result = word.replace(letter, "")
    kept = _spell(result) if result else "(nothing)"
    trace = f"Spell {word}: {_spell(word)}\nRemove every {letter}: {kept}\nJoined: {result}"
    return Problem(f"remove:{word}:{letter}", q, trace, _answer(result), result)


# Small talk: fixed pairs so `qwen35 chat` answers a greeting sensibly. Never held out.
_SMALL_TALK: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("Hello!", "Hi!", "Hello there.", "Hey"), "The user greets me. I greet them back and offer help.",
     "Hello! How can I help you today?"),
    (("Who are you?", "What are you?"), "The user asks who I am. I describe myself briefly.",
     "I am a tiny Qwen3.5 model. I can do small sums, count letters, sort numbers, edit words, tell short "
     "stories, and use tools."),
    (("What can you do?", "How can you help me?"), "The user asks what I can do. I list my skills.",
     "I can add and subtract numbers, count letters in a word, sort a list, reverse or change a word, tell a "
     "short story, and call tools such as a calculator or a lookup table."),
    (("Thank you!", "Thanks.", "Thanks a lot!"), "The user thanks me. I reply politely.", "You are welcome!"),
    (("How are you?", "How are you doing?"), "The user asks how I am. I answer briefly and offer help.",
     "I am doing well, thank you. What would you like to do?"),
    (("Goodbye!", "Bye.", "See you later."), "The user says goodbye. I say goodbye too.",
     "Goodbye! Have a nice day."),
    (("Good morning!",), "The user says good morning. I answer in kind.", "Good morning! How can I help you today?"),
    (("Can you help me?",), "The user asks for help. I say yes and ask what they need.",
     "Of course. What do you need help with?"),
)


def make_small_talk(rng: random.Random) -> Problem:
    questions, reasoning, reply = rng.choice(_SMALL_TALK)
    return Problem(None, rng.choice(questions), reasoning, reply, reply)


# Story pieces: (subject as asked, name, pronoun). Sentences are assembled from independent slots, so stories
# vary while staying grammatical and short.
_SUBJECTS: tuple[tuple[str, str, str], ...] = (
    ("a fox", "Rusty", "he"), ("a small robot", "Bolt", "it"), ("a brave mouse", "Pip", "she"),
    ("a sleepy cat", "Mochi", "she"), ("a clever crow", "Onyx", "he"), ("a lonely whale", "Blue", "she"),
    ("an old lighthouse keeper", "Tom", "he"), ("a curious girl", "Lila", "she"), ("a young dragon", "Ember", "he"),
    ("a lost puppy", "Biscuit", "he"), ("a tiny snail", "Shelly", "she"), ("a kind baker", "Rosa", "she"),
    ("a little boat", "Skipper", "it"), ("a shy owl", "Hoot", "he"), ("a happy frog", "Lily", "she"),
    ("a busy bee", "Buzz", "he"), ("a gentle giant", "Moss", "he"), ("a wise turtle", "Sage", "she"),
    ("a paper kite", "Flutter", "it"), ("a young farmer", "Ben", "he"), ("a snowman", "Frost", "he"),
    ("a penguin", "Waddle", "she"), ("a squirrel", "Nutmeg", "she"), ("a music box", "Melody", "it"),
)
_HOMES = ("in a quiet forest", "by a wide river", "at the edge of a small village", "on a windy hill",
          "near the sea", "in a busy city", "under an old bridge", "in a cozy garden")
_HABITS = ("liked to watch the clouds", "collected shiny stones", "sang softly to the morning",
           "helped anyone who asked", "dreamed about faraway places", "counted the stars at night",
           "walked the same path to the pond")
_EVENTS = ("a storm blew through the valley", "a stranger asked for directions", "the river began to rise",
           "a small bird fell from its nest", "the lights of the village went out", "a map appeared on the doorstep",
           "the path was blocked by a fallen tree")
_ACTIONS = ("thought hard about what to do", "took a deep breath and stepped forward", "called on an old friend",
            "followed the sound of the wind", "remembered a lesson from long ago")
_ENDINGS = ("everyone was safe and warm again", "the village cheered", "a new friendship began",
            "the sun came out over the hills", "the problem was solved")
_MORALS = ("From that day on, {name} knew that small acts of courage matter.",
           "{Name} smiled, because helping others felt good.",
           "And {name} never forgot that day.",
           "After that, {name} was never lonely again.")


def _story(rng: random.Random, subject: str, name: str, pronoun: str) -> str:
    p = pronoun.capitalize()
    return " ".join((
        f"Once upon a time, there was {subject} named {name} who lived {rng.choice(_HOMES)}.",
        f"Every day, {name} {rng.choice(_HABITS)}.",
        f"One morning, {rng.choice(_EVENTS)}.",
        f"{p} {rng.choice(_ACTIONS)}, and soon {rng.choice(_ENDINGS)}.",
        rng.choice(_MORALS).format(name=name, Name=name),
    ))


def make_story(rng: random.Random) -> Problem:
    subject, name, pronoun = rng.choice(_SUBJECTS)
    q = rng.choice(("Tell me a short story about {s}.", "Write a short story about {s}.",
                    "Can you tell me a story about {s}?")).format(s=subject)
    reasoning = f"The user wants a short story about {subject}. I will name it {name}, give it a problem, " \
                f"and end happily."
    text = _story(rng, subject, name, pronoun)
    return Problem(None, q, reasoning, text, text)


_ADJECTIVES = ("small", "quiet", "bright", "old", "green", "tall", "warm", "busy", "gentle", "cold")
_NOUNS = ("dog", "bird", "child", "teacher", "farmer", "cat", "boat", "train", "tree", "wind")
_VERBS = ("walked", "ran", "looked", "waited", "rested", "sang", "played", "moved")
_SCENES = ("the park", "the river", "the market", "the hill", "the garden", "the station", "the school", "the sea")
_FACTS = ("The sun rises in the east.", "Water freezes when it is very cold.", "Bees make honey.",
          "A week has seven days.", "Plants need light to grow.", "Birds build nests in spring.",
          "Rain falls from the clouds.", "The moon shines at night.")


def make_raw_text(rng: random.Random) -> str:
    """A short paragraph of plain text (no chat framing), for ordinary language modelling."""
    kind = rng.random()
    if kind < 0.4:
        subject, name, pronoun = rng.choice(_SUBJECTS)
        return _story(rng, subject, name, pronoun)
    if kind < 0.7:
        sentences = []
        for _ in range(rng.randint(3, 5)):
            adj, noun = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
            sentences.append(f"The {adj} {noun} {rng.choice(_VERBS)} to {rng.choice(_SCENES)}.")
        return " ".join(sentences)
    return " ".join(rng.sample(_FACTS, rng.randint(2, 4)))


# --------------------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------------------

def _assistant(content: str, reasoning: str | None, tool_calls: list[dict[str, Any]] | None = None) -> Message:
    msg: Message = {"role": "assistant", "content": content}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def _call(function: str, **arguments: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": function, "arguments": dict(arguments)}}


def _maybe_system(rng: random.Random, p: float = 0.25) -> list[Message]:
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < p else []


def _example(task: str, messages: list[Message], tools: list[dict[str, Any]] | None, think: bool,
             answer: str | None, keys: Sequence[str | None]) -> Example:
    return {"task": task, "messages": messages, "tools": tools, "enable_thinking": think, "answer": answer,
            "keys": [k for k in keys if k is not None]}


def _tools(rng: random.Random | None = None, needed: str | None = None) -> list[dict[str, Any]]:
    """Both tools, or (sometimes, when `needed` names one) just that one, so the model reads the tool list
    instead of assuming it. Fresh copies: a shared dict would leak a caller's edits across examples."""
    if rng is not None and needed is not None and rng.random() < 0.3:
        return [copy.deepcopy(CALCULATOR_TOOL if needed == "calculator" else LOOKUP_TOOL)]
    return [copy.deepcopy(CALCULATOR_TOOL), copy.deepcopy(LOOKUP_TOOL)]


def single_turn(task: str, problem: Problem, rng: random.Random, think: bool) -> Example:
    # Now and then the tools are offered although none is needed: the model must learn that a tool list alone is
    # not a reason to call one (small sums are done by hand, see the calculator task for when the tool is used).
    tools = _tools() if rng.random() < 0.1 else None
    messages = _maybe_system(rng) + [{"role": "user", "content": problem.question},
                                     _assistant(problem.content, problem.reasoning if think else None)]
    return _example(task, messages, tools, think, problem.answer, [problem.key])


def _calculator_problem(rng: random.Random) -> tuple[str, int]:
    kind = rng.random()
    if kind < 0.4:
        a, b = rng.randint(10, 999), rng.randint(10, 99)
        return f"{a} * {b}", a * b
    if kind < 0.65:
        a, b, c = (rng.randint(100, 9999) for _ in range(3))
        return f"{a} + {b} + {c}", a + b + c
    if kind < 0.85:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 999)
        return f"{a} * {b} + {c}", a * b + c
    a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
    return f"{a} - {b}", a - b


def make_calculator(rng: random.Random, think: bool) -> Example:
    expr, value = _calculator_problem(rng)
    q = rng.choice(("What is {e}?", "Use the calculator to compute {e}.", "Calculate {e}.",
                    "Please work out {e}.")).format(e=expr)
    messages = _maybe_system(rng) + [
        {"role": "user", "content": q},
        _assistant("", f"This needs the calculator: {expr}." if think else None,
                   [_call("calculator", expression=expr)]),
        {"role": "tool", "content": str(value)},
        _assistant(_answer(value), f"The calculator returned {value}." if think else None),
    ]
    return _example("calculator", messages, _tools(rng, "calculator"), think, str(value), [f"calc:{expr}"])


def _lookup_question(rng: random.Random) -> tuple[str, str, str, str]:
    """(question, topic, name, tool result)."""
    r = rng.random()
    if r < 0.45:
        country = rng.choice(list(CAPITALS))
        q = rng.choice(("What is the capital of {n}?", "Which city is the capital of {n}?",
                        "Look up the capital of {n}.")).format(n=country)
        return q, "capital", country, CAPITALS[country]
    if r < 0.9:
        city = rng.choice(list(CITY_POPULATIONS))
        q = rng.choice(("What is the population of {n}?", "How many people live in {n}?",
                        "Look up the population of {n}.")).format(n=city)
        return q, "population", city, str(CITY_POPULATIONS[city])
    name = rng.choice(UNKNOWN_NAMES)
    if rng.random() < 0.5:
        return f"What is the capital of {name}?", "capital", name, NOT_FOUND
    return f"What is the population of {name}?", "population", name, NOT_FOUND


def make_lookup(rng: random.Random, think: bool) -> Example:
    q, topic, name, result = _lookup_question(rng)
    found = result != NOT_FOUND
    answer = result if found else "unknown"
    final_reasoning = (f"The lookup returned {result}." if found
                       else f"The lookup found nothing for {name}, so I do not know.")
    messages = _maybe_system(rng) + [
        {"role": "user", "content": q},
        _assistant("", f"I need the {topic} of {name}. I will look it up." if think else None,
                   [_call("lookup", topic=topic, name=name)]),
        {"role": "tool", "content": result},
        _assistant(_answer(answer), final_reasoning if think else None),
    ]
    return _example("lookup", messages, _tools(rng, "lookup"), think, answer, [f"lookup:{topic}:{name}"])


def make_multi_tool(rng: random.Random, think: bool) -> Example:
    """Two parallel lookups, then a calculator call on their results: a two-round tool loop."""
    a, b = rng.sample(list(CITY_POPULATIONS), 2)
    pa, pb = CITY_POPULATIONS[a], CITY_POPULATIONS[b]
    if rng.random() < 0.5:
        q = rng.choice(("What is the total population of {a} and {b}?",
                        "How many people live in {a} and {b} together?")).format(a=a, b=b)
        expr, value, plan = f"{pa} + {pb}", pa + pb, "add them"
    else:
        if pa < pb:
            a, b, pa, pb = b, a, pb, pa
        q = rng.choice(("How many more people live in {a} than in {b}?",
                        "What is the population of {a} minus the population of {b}?")).format(a=a, b=b)
        expr, value, plan = f"{pa} - {pb}", pa - pb, "subtract them"
    messages = _maybe_system(rng) + [
        {"role": "user", "content": q},
        _assistant("", f"I need the populations of {a} and {b}, then I will {plan}." if think else None,
                   [_call("lookup", topic="population", name=a), _call("lookup", topic="population", name=b)]),
        {"role": "tool", "content": str(pa)},
        {"role": "tool", "content": str(pb)},
        _assistant("", f"{a} has {pa} people and {b} has {pb}. Now I compute {expr}." if think else None,
                   [_call("calculator", expression=expr)]),
        {"role": "tool", "content": str(value)},
        _assistant(_answer(value), f"The calculator returned {value}." if think else None),
    ]
    keys = [f"lookup:population:{a}", f"lookup:population:{b}", f"calc:{expr}"]
    return _example("multi_tool", messages, _tools(), think, str(value), keys)


def make_multi_turn(rng: random.Random, think: bool) -> Example:
    """One or two earlier exchanges, then the question that is trained and evaluated.

    Earlier assistant turns keep their reasoning_content; the template drops it for turns before the last user
    query (as Qwen3.5 does), so the model learns to work from the visible earlier answers only."""
    messages: list[Message] = _maybe_system(rng)
    keys: list[str | None] = []
    first_maker = rng.choice(_SIMPLE_MAKERS)
    first = first_maker(rng)
    exchanges = [first]
    if first.value is not None and first_maker in _ARITHMETIC_MAKERS and rng.random() < 0.6:
        exchanges.append(make_follow_up(rng, first.value))
    else:
        if rng.random() < 0.3:
            exchanges.append(rng.choice(_SIMPLE_MAKERS)(rng))
        # The last question is always checkable, so every multi-turn example can be evaluated.
        exchanges.append(rng.choice(_CHECKABLE_MAKERS)(rng))
    for p in exchanges:
        messages.append({"role": "user", "content": p.question})
        messages.append(_assistant(p.content, p.reasoning if think else None))
        keys.append(p.key)
    return _example("multi_turn", messages, None, think, exchanges[-1].answer, keys)


def _add2(rng: random.Random) -> Problem:
    return make_add(rng, 2)


def _add3(rng: random.Random) -> Problem:
    return make_add(rng, 3)


def _sub2(rng: random.Random) -> Problem:
    return make_sub(rng, 2)


def _sub3(rng: random.Random) -> Problem:
    return make_sub(rng, 3)


_ARITHMETIC_MAKERS: tuple[Callable[[random.Random], Problem], ...] = (_add2, _add3, _sub2, _sub3)
_CHECKABLE_MAKERS: tuple[Callable[[random.Random], Problem], ...] = _ARITHMETIC_MAKERS + (
    make_count, make_sort, make_reverse, make_upper, make_remove)
_SIMPLE_MAKERS: tuple[Callable[[random.Random], Problem], ...] = _CHECKABLE_MAKERS + (make_small_talk,)

# Task name -> problem maker, for the tasks that are one question and one answer.
_SINGLE_TURN: dict[str, Callable[[random.Random], Problem]] = {
    "add2": _add2, "add3": _add3, "sub2": _sub2, "sub3": _sub3,
    "count": make_count, "sort": make_sort, "reverse": make_reverse, "upper": make_upper, "remove": make_remove,
    "story": make_story, "chat": make_small_talk,
}
_CONVERSATIONS: dict[str, Callable[[random.Random, bool], Example]] = {
    "calculator": make_calculator, "lookup": make_lookup, "multi_tool": make_multi_tool,
    "multi_turn": make_multi_turn,
}

# Relative weights. Arithmetic gets the most because its traces are the longest procedure to learn; raw text
# and stories keep the model fluent; tool tasks carry the long tool system prompt, so they are costly per example.
DEFAULT_MIX: dict[str, float] = {
    "add2": 1.0, "add3": 1.5, "sub2": 1.0, "sub3": 1.5,
    "count": 1.0, "sort": 1.0, "reverse": 0.7, "upper": 0.5, "remove": 0.7,
    "calculator": 1.0, "lookup": 1.0, "multi_tool": 0.6, "multi_turn": 0.8,
    "story": 0.8, "chat": 0.4, "text": 0.6,
}
TASKS: tuple[str, ...] = tuple(DEFAULT_MIX)
# Tasks whose answer a script can check (everything except stories, small talk and raw text).
VERIFIABLE_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t not in ("story", "chat", "text"))


def make_example(task: str, rng: random.Random, think: bool) -> Example:
    """One example of `task`; `think` picks thinking on (trace in reasoning_content) or off."""
    if task == "text":
        text = make_raw_text(rng)
        ex = _example("text", [], None, False, None, [])
        ex["text"] = text
        return ex
    if task in _SINGLE_TURN:
        return single_turn(task, _SINGLE_TURN[task](rng), rng, think)
    if task in _CONVERSATIONS:
        return _CONVERSATIONS[task](rng, think)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def generate_examples(n: int, seed: int, mix: Mapping[str, float] | None = None, *,
                      think_prob: float = 0.5) -> list[Example]:
    """`n` examples, the same for the same arguments.

    mix: task name -> relative weight (default DEFAULT_MIX; tasks left out are not generated).
    think_prob: share of chat examples with thinking on.
    """
    weights = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in mix: {sorted(unknown)}; known: {', '.join(TASKS)}")
    names = [t for t in TASKS if weights.get(t, 0) > 0]  # TASKS order, so dict order of `mix` does not matter
    if not names:
        raise ValueError("mix has no task with a positive weight")
    w = [weights[t] for t in names]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = rng.choices(names, weights=w)[0]
        out.append(make_example(task, rng, rng.random() < think_prob))
    return out


# --------------------------------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------------------------------

def is_held_out_key(key: str, fraction: float) -> bool:
    """Whether a problem belongs to the held-out set. A pure function of the problem, so every seed and every
    call agrees: a train set generated with any seed never contains a held-out problem."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def is_held_out(ex: Example, fraction: float = 0.1) -> bool:
    # Any held-out sub-problem makes the whole conversation held out, so held-out problems never appear in train,
    # not even as history in a multi-turn chat.
    return any(is_held_out_key(k, fraction) for k in ex["keys"])


def split(examples: Sequence[Example], held_out_fraction: float = 0.1) -> tuple[list[Example], list[Example]]:
    """(train, held_out). Small talk, stories and raw text have no key and always go to train."""
    train, held = [], []
    for ex in examples:
        (held if is_held_out(ex, held_out_fraction) else train).append(ex)
    return train, held


def generate_split(n_train: int, n_held_out: int, seed: int, mix: Mapping[str, float] | None = None, *,
                   held_out_fraction: float = 0.1, think_prob: float = 0.5) -> tuple[list[Example], list[Example]]:
    """Exactly `n_train` train and `n_held_out` held-out examples (held-out ones deduplicated by problem and
    thinking mode, so an eval does not count the same question twice)."""
    train: list[Example] = []
    held: list[Example] = []
    seen: set[tuple[tuple[str, ...], bool]] = set()
    batch = max(256, n_train + n_held_out)
    round_ = 0
    while len(train) < n_train or len(held) < n_held_out:
        # Derive each batch's seed from the caller's seed so the result stays a function of the arguments.
        exs = generate_examples(batch, seed * 1_000_003 + round_, mix, think_prob=think_prob)
        tr, ho = split(exs, held_out_fraction)
        train.extend(tr[: n_train - len(train)])
        for ex in ho:
            ident = (tuple(ex["keys"]), ex["enable_thinking"])
            if len(held) < n_held_out and ident not in seen:
                seen.add(ident)
                held.append(ex)
        round_ += 1
        if round_ > 1000:
            raise RuntimeError("could not fill the held-out set; raise held_out_fraction or lower n_held_out")
    return train, held


# --------------------------------------------------------------------------------------------------------------
# Rendering and evaluation
# --------------------------------------------------------------------------------------------------------------

def _render(messages: list[Message], tools: list[dict[str, Any]] | None, enable_thinking: bool,
            add_generation_prompt: bool) -> str:
    from qwen35.chat.template import render_chat  # lazy: the chat package must not be needed to generate data
    return render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                       add_generation_prompt=add_generation_prompt)


def render_example(ex: Example) -> str:
    """The full training text. Chats end with the last assistant turn closed by <|im_end|> (plus the template's
    newline); raw text ends with <|endoftext|> so packed documents stay separated."""
    if ex["task"] == "text":
        return ex["text"] + ENDOFTEXT
    return _render(ex["messages"], ex["tools"], ex["enable_thinking"], add_generation_prompt=False)


def _assistant_indices(ex: Example) -> list[int]:
    return [i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant"]


def _last_query_index(messages: Sequence[Message]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


def render_with_spans(ex: Example) -> tuple[str, list[tuple[int, int]]]:
    """Training text plus the character spans the model should be trained to produce.

    A span covers one assistant turn of the final exchange (every turn after the last user query, so tool-call
    turns too), from the end of its generation prompt through <|im_end|>. The generation prompt includes
    `<think>\\n` (thinking on) or the empty `<think>\\n\\n</think>\\n\\n` (thinking off); leaving it out of the loss
    matters: otherwise thinking-off examples teach the model to close <think> at once even when thinking is on.
    Turns before the last user query are context only (their reasoning is not even rendered).

    Raises ValueError if a turn's generation prompt is not a prefix of the full text, i.e. training text and
    inference prompts would disagree.
    """
    full = render_example(ex)
    if ex["task"] == "text":
        return full, [(0, len(full))]
    msgs, tools, think = ex["messages"], ex["tools"], ex["enable_thinking"]
    last_query = _last_query_index(msgs)
    spans = []
    for i in _assistant_indices(ex):
        if i < last_query:
            continue
        prompt = _render(msgs[:i], tools, think, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise ValueError(f"generation prompt for message {i} is not a prefix of the rendered conversation "
                             f"(task {ex['task']}); the chat template disagrees with itself")
        end = full.find(IM_END, len(prompt))
        if end < 0:
            raise ValueError(f"assistant message {i} is not closed by {IM_END}")
        spans.append((len(prompt), end + len(IM_END)))
    return full, spans


def prompt_for(ex: Example, turn: int = -1) -> tuple[list[Message], list[dict[str, Any]] | None, bool]:
    """(messages, tools, enable_thinking) to prompt the model with: the conversation before an assistant turn
    (default the last one, whose content holds the answer). `turn` indexes the assistant messages, so
    `prompt_for(ex, 0)` on a tool task asks for the first tool call."""
    if ex["task"] == "text":
        raise ValueError("raw text examples have no prompt")
    idx = _assistant_indices(ex)[turn]
    return [dict(m) for m in ex["messages"][:idx]], ex["tools"], ex["enable_thinking"]


_ANSWER_RE = re.compile(r"The answer is (.+?)\.?\s*$")


def extract_answer(content: str) -> str | None:
    """The value in the fixed "The answer is X." form (from the last such sentence), or None."""
    pos = content.rfind("The answer is ")
    if pos < 0:
        return None
    m = _ANSWER_RE.match(content[pos:].splitlines()[0])
    return m.group(1).strip() if m else None


def check_answer(ex: Example, content: str) -> bool:
    """Whether a model's final content (text after </think>) gives the example's expected answer."""
    if ex["answer"] is None:
        return False
    if ex["task"] in ("story", "chat"):
        return content.strip() == ex["answer"]
    return extract_answer(content) == ex["answer"]


__all__ = [
    "CALCULATOR_TOOL", "LOOKUP_TOOL", "CAPITALS", "CITY_POPULATIONS", "DEFAULT_MIX", "TASKS", "VERIFIABLE_TASKS",
    "Example", "Message", "Problem", "addition_trace", "subtraction_trace", "make_example", "generate_examples",
    "is_held_out", "is_held_out_key", "split", "generate_split", "render_example", "render_with_spans",
    "prompt_for", "extract_answer", "check_answer",
]
