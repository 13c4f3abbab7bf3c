"""Synthetic pictures with questions about them, for teaching the embedded model to see.

Every picture is 96x96 pixels (9 vision tokens after 16-pixel patches and 2x2 merging) on a plain grey
background, drawn with Pillow from a :class:`Scene` that records everything in it, so answers are computed from
the generator's own record, never guessed from pixels:

* **shapes**: 1-6 shapes (circle, square, triangle, star) in 8 colours, each in its own cell of a 3x3 grid
  (top left, top, top right, left, centre, right, bottom left, bottom, bottom right), with jittered size and
  place;
* **numbers**: a number 0-99 written in one of the colours;
* **words**: a short word written in one of the colours.

Questions (one task each): how many shapes of a kind, how many shapes in all, the colour of the only shape of a
kind, the shape in a named place, whether a colour/shape pair is present, what number / word is written.
Answers use the text tasks' fixed form ("The answer is X.", :func:`qwen35.train.data.extract_answer` reads
it); with thinking on, a short trace in one rigid format per task first states what the picture shows about the
question, then the conclusion::

    How many circles?        I count the circles: 2.  /  So there are 2 circles.
    What shape is on the left?   I look on the left: a green triangle.  /  So the shape is a triangle.

Why such short traces (measured on this model, see :mod:`qwen35.train.embedded_vision`): traces that list the
picture cell by cell ("Top left: red circle." ...) make the language model find a given cell among the picture
tokens, which its single attention layer did not learn in 400 steps even over a perfectly trained tower.  Here
every fact the trace states is a property of the whole picture, which the tower learns to write into every
picture token (:func:`picture_labels` are its auxiliary targets), so the language model only has to read it.

**Held-out split, disjoint by construction.**  Every example carries keys (as the text tasks do); an example is
held out when any key is:

* ``pair:COLOUR:SHAPE`` for one of :data:`HELD_OUT_PAIRS` (4 of the 32 colour/shape pairs, one per shape and
  colour): a training picture never shows such a shape and a training question never names it;
* ``counts:C,S,T,R`` (how many circles, squares, triangles, stars) whose hash falls in a 15% share: no training
  picture has that combination of counts;
* ``number:N:INK`` / ``word:W:INK`` whose hash falls in a 20% share: that text in that ink never appears in
  training.

So held-out questions are about pictures with colour/shape combinations and count combinations the model never
saw.  Numbers and words come from closed sets (0-99, :data:`PICTURE_WORDS`), so for them only the text/ink
combination is new.

Conversations use the chat template's image part (``{"type": "image"}``), rendered as
``<|vision_start|><|image_pad|><|vision_end|>``; :func:`encode_picture_example` expands the one pad token to
the picture's 9 and :func:`picture_pixels` gives the matching ``pixel_values`` / ``image_grid_thw``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from qwen35.chat.media import ImageProcessorConfig, preprocess_images
from qwen35.train.data import SYSTEM_PROMPTS, render_with_spans

# Pixels a side: 6x6 patches of 16, 3x3 = 9 tokens after 2x2 merging -- one token per cell of the 3x3 grid the
# shapes are placed on, so that what a cell holds is what one token holds.
IMAGE_SIZE = 96

# The processor of the embedded model: every picture is resized to about 96x96 pixels (9 tokens), whatever
# its size, so pictures at inference look like the training pictures.
PROCESSOR = ImageProcessorConfig(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (245, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "black": (25, 25, 25), "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
CELLS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
                          "bottom right")
# How a question names a cell ("What shape is on the left?").
CELL_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right", "left": "on the left",
    "centre": "in the centre", "right": "on the right", "bottom left": "at the bottom left",
    "bottom": "at the bottom", "bottom right": "at the bottom right",
}
# Held out: never drawn, never named in training.  One per shape and per colour, so every shape and every colour
# is still seen in training with the other colours / shapes.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("yellow", "circle"), ("purple", "square"), ("green", "triangle"), ("blue", "star")})
COUNTS_HELD_OUT_FRACTION = 0.15
TEXT_HELD_OUT_FRACTION = 0.2

# Short words (all in qwen35.train.data.WORDS, so the tokenizer knows them) that fit the picture at a readable size.
PICTURE_WORDS: tuple[str, ...] = (
    "apple", "lemon", "mango", "tiger", "zebra", "robot", "piano", "cloud", "ocean", "river", "water", "honey",
    "table", "chair", "spoon", "train", "house", "paper", "book", "moon", "star", "tree", "happy", "hello",
)
MAX_NUMBER = 99

BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (140, 140, 135), (115, 120, 125), (150, 145, 140), (105, 105, 110), (135, 130, 140))

PICTURE_TASKS: tuple[str, ...] = ("pic_count", "pic_count_all", "pic_colour", "pic_shape_at", "pic_exists",
                                  "pic_number", "pic_word")
# Relative weights in training: the shape tasks share the scene listing; reading needs its own practice, numbers
# most (100 of them, read digit by digit) and words least (24, each a whole).
DEFAULT_PICTURE_MIX: dict[str, float] = {
    "pic_count": 1.5, "pic_count_all": 0.7, "pic_colour": 1.0, "pic_shape_at": 1.0, "pic_exists": 1.0,
    "pic_number": 1.3, "pic_word": 0.8,
}


# ----------------------------------------------------------------------------------------------------------------
# scenes and drawing


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cell: str
    x: int  # centre, pixels
    y: int
    size: int  # side of the bounding box, pixels


@dataclass(frozen=True)
class Scene:
    """Everything in one picture.  ``shapes`` are in reading order (cell order); a text picture has none."""

    background: tuple[int, int, int]
    shapes: tuple[Shape, ...] = ()
    text: str | None = None  # a number or a word
    ink: str | None = None
    text_size: int = 0
    text_x: int = 0  # centre of the text, pixels
    text_y: int = 0

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape is None or s.shape == shape) and (colour is None or s.colour == colour)
                   for s in self.shapes)

    def counts_key(self) -> str:
        return "counts:" + ",".join(str(self.count(s)) for s in SHAPES)

    def split_keys(self) -> list[str]:
        """The held-out split's keys of the picture (see the module docstring)."""
        if self.text is not None:
            kind = "number" if self.text.isdigit() else "word"
            return [f"{kind}:{self.text}:{self.ink}"]
        pairs = sorted({f"pair:{s.colour}:{s.shape}" for s in self.shapes})
        return [self.counts_key(), *pairs]


CELL_SIZE = IMAGE_SIZE / 3


def random_shapes_scene(rng: random.Random, n: int | None = None) -> Scene:
    """1-6 shapes (or ``n``) in distinct cells, any colour and shape."""
    n = rng.randint(1, 6) if n is None else n
    cells = sorted(rng.sample(range(len(CELLS)), n))
    shapes = []
    for c in cells:
        size = rng.randint(18, 26)
        slack = int(CELL_SIZE - size) // 2
        row, col = divmod(c, 3)
        x = int(CELL_SIZE * (col + 0.5)) + rng.randint(-slack, slack)
        y = int(CELL_SIZE * (row + 0.5)) + rng.randint(-slack, slack)
        shapes.append(Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), CELLS[c], x, y, size))
    return Scene(rng.choice(BACKGROUNDS), tuple(shapes))


def random_text_scene(rng: random.Random, text: str) -> Scene:
    size = rng.randint(28, 38) if text.isdigit() else rng.randint(19, 23)
    return Scene(rng.choice(BACKGROUNDS), (), text, rng.choice(list(COLOURS)), size,
                 IMAGE_SIZE // 2 + rng.randint(-8, 8), IMAGE_SIZE // 2 + rng.randint(-14, 14))


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    import math

    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
    return pts


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw(scene: Scene) -> Image.Image:
    """The picture of a scene (RGB, IMAGE_SIZE square); a pure function of the scene."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        rgb, h = COLOURS[s.colour], s.size / 2
        box = (s.x - h, s.y - h, s.x + h, s.y + h)
        if s.shape == "circle":
            d.ellipse(box, fill=rgb)
        elif s.shape == "square":
            d.rectangle((s.x - h * 0.85, s.y - h * 0.85, s.x + h * 0.85, s.y + h * 0.85), fill=rgb)
        elif s.shape == "triangle":
            d.polygon([(s.x, s.y - h), (s.x + h, s.y + h * 0.8), (s.x - h, s.y + h * 0.8)], fill=rgb)
        elif s.shape == "star":
            d.polygon(_star(s.x, s.y + h * 0.08, h * 1.1), fill=rgb)
        else:  # pragma: no cover - scenes are made here
            raise ValueError(f"unknown shape {s.shape!r}")
    if scene.text is not None:
        d.text((scene.text_x, scene.text_y), scene.text, fill=COLOURS[scene.ink], font=_font(scene.text_size),
               anchor="mm")
    return img


def picture_pixels(scenes: Sequence[Scene]) -> tuple[Any, Any]:
    """``(pixel_values [patches, 1536], image_grid_thw [n, 3])`` of the scenes' pictures, as the embedded
    model's processor (:data:`PROCESSOR`) gives them."""
    return preprocess_images([draw(s) for s in scenes], PROCESSOR)


# ----------------------------------------------------------------------------------------------------------------
# questions


def _answer(value: object) -> str:
    return f"The answer is {value}."


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _plural(n: int, shape: str) -> str:
    return f"is 1 {shape}" if n == 1 else f"are {n} {PLURALS[shape]}"


def _count(rng: random.Random, scene: Scene) -> tuple[str, list[str], str, list[str]]:
    present = sorted({s.shape for s in scene.shapes})
    shape = rng.choice(present) if rng.random() < 0.75 else rng.choice(SHAPES)
    p = PLURALS[shape]
    q = rng.choice(("How many {p}?", "How many {p} are there?", "How many {p} can you see?",
                    "Count the {p}.")).format(p=p)
    n = scene.count(shape)
    return q, [f"I count the {p}: {n}.", f"So there {_plural(n, shape)}."], str(n), []


def _count_all(rng: random.Random, scene: Scene) -> tuple[str, list[str], str, list[str]]:
    q = rng.choice(("How many shapes are there?", "How many shapes can you see?", "Count the shapes.",
                    "How many shapes are in the picture?"))
    n = len(scene.shapes)
    return q, [f"I count the shapes: {n}.", f"So there {'is 1 shape' if n == 1 else f'are {n} shapes'}."], str(n), []


def _colour(rng: random.Random, scene: Scene) -> tuple[str, list[str], str, list[str]] | None:
    single = [s for s in SHAPES if scene.count(s) == 1]
    if not single:
        return None
    shape = rng.choice(single)
    s = next(s for s in scene.shapes if s.shape == shape)
    q = rng.choice(("What colour is the {s}?", "What color is the {s}?", "Which colour is the {s}?",
                    "What is the colour of the {s}?")).format(s=shape)
    return q, [f"I look at the {shape}: it is {s.colour}.", f"So the {shape} is {s.colour}."], s.colour, []


def _shape_at(rng: random.Random, scene: Scene) -> tuple[str, list[str], str, list[str]]:
    s = rng.choice(scene.shapes)
    at = CELL_PHRASES[s.cell]
    q = rng.choice(("What shape is {at}?", "Which shape is {at}?", "What is the shape {at}?")).format(at=at)
    return q, [f"I look {at}: {_a(s.colour)} {s.shape}.", f"So the shape is a {s.shape}."], s.shape, []


def _exists(rng: random.Random, scene: Scene) -> tuple[str, list[str], str, list[str]]:
    if rng.random() < 0.5:
        s = rng.choice(scene.shapes)
        colour, shape = s.colour, s.shape
    else:  # a pair that is not in the picture, mostly a near miss (right colour or right shape)
        r = rng.random()
        base = rng.choice(scene.shapes)
        colour = base.colour if r < 0.4 else rng.choice(list(COLOURS))
        shape = base.shape if 0.4 <= r < 0.8 else rng.choice(SHAPES)
        if scene.count(shape, colour):
            colour, shape = base.colour, base.shape  # it is there after all: a "yes"
    q = rng.choice(("Is there a {c} {s}?", "Do you see a {c} {s}?", "Is there a {c} {s} in the picture?")).format(
        c=colour, s=shape)
    yes = "yes" if scene.count(shape, colour) else "no"
    found = "there is one" if yes == "yes" else "there is none"
    return q, [f"I look for {_a(colour)} {shape}: {found}.", f"So {yes}."], yes, [f"pair:{colour}:{shape}"]


_SHAPE_QUESTIONS = {"pic_count": _count, "pic_count_all": _count_all, "pic_colour": _colour,
                    "pic_shape_at": _shape_at, "pic_exists": _exists}


def _number(rng: random.Random, scene: Scene) -> tuple[str, list[str], str, list[str]]:
    q = rng.choice(("What number is written?", "What number is this?", "Read the number.",
                    "What number do you see?"))
    digits = " ".join(scene.text)
    what = "digit" if len(scene.text) == 1 else "digits"
    lines = [f"I see the {what} {digits}, written in {scene.ink}.", f"So the number is {scene.text}."]
    return q, lines, scene.text, []


def _word(rng: random.Random, scene: Scene) -> tuple[str, list[str], str, list[str]]:
    q = rng.choice(("What word is written?", "What does the picture say?", "Read the word.",
                    "What word do you see?"))
    lines = [f"I see the letters {' '.join(scene.text)}, written in {scene.ink}.", f"So the word is {scene.text}."]
    return q, lines, scene.text, []


def make_picture_example(task: str, rng: random.Random, think: bool) -> dict[str, Any]:
    """One picture question of ``task`` (see :data:`PICTURE_TASKS`): a chat example as qwen35.train.data
    makes them (``task``, ``messages``, ``tools``, ``enable_thinking``, ``answer``, ``keys``) plus its
    ``scene``."""
    if task in _SHAPE_QUESTIONS:
        while True:
            scene = random_shapes_scene(rng)
            made = _SHAPE_QUESTIONS[task](rng, scene)
            if made is not None:
                break
    elif task == "pic_number":
        scene = random_text_scene(rng, str(rng.randint(0, MAX_NUMBER)))
        made = _number(rng, scene)
    elif task == "pic_word":
        scene = random_text_scene(rng, rng.choice(PICTURE_WORDS))
        made = _word(rng, scene)
    else:
        raise ValueError(f"unknown picture task {task!r}; known: {', '.join(PICTURE_TASKS)}")
    question, lines, answer, question_keys = made
    image, text = {"type": "image"}, {"type": "text", "text": question}
    content = [image, text] if rng.random() < 0.85 else [text, image]
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": content})
    assistant: dict[str, Any] = {"role": "assistant", "content": _answer(answer)}
    if think:
        assistant["reasoning_content"] = "\n".join(lines)
    messages.append(assistant)
    keys = scene.split_keys()
    keys += [k for k in question_keys if k not in keys]
    return {"task": task, "messages": messages, "tools": None, "enable_thinking": think, "answer": answer,
            "keys": keys, "scene": scene}


# ----------------------------------------------------------------------------------------------------------------
# what the tower is taught to see


# Auxiliary targets of the tower: (name, number of classes, how many) -- "pair" is 32 yes/no targets.
LABEL_GROUPS: tuple[tuple[str, int, int], ...] = (
    ("cell_colour", len(COLOURS) + 1, len(CELLS)),  # per cell: a colour or empty
    ("cell_shape", len(SHAPES) + 1, len(CELLS)),  # per cell: a shape or empty
    ("shape_count", 7, len(SHAPES)),  # how many of each shape, 0-6
    ("total", 7, 1),
    ("pair", 2, len(COLOURS) * len(SHAPES)),  # is a shape of this colour there
    ("kind", 3, 1),  # shapes, number, word
    ("tens", 11, 1),  # a number's tens digit (10: none)
    ("units", 11, 1),  # a number's units digit (10: not a number)
    ("word", len(PICTURE_WORDS) + 1, 1),
    ("ink", len(COLOURS) + 1, 1),  # the colour of written text
)


def picture_labels(scene: Scene) -> dict[str, list[int]]:
    """Everything the questions ask about a picture, as class indices per :data:`LABEL_GROUPS`: what the
    tower's auxiliary head is trained to read from every picture token (training only; not exported)."""
    colours, none_c, none_s = list(COLOURS), len(COLOURS), len(SHAPES)
    at = {s.cell: s for s in scene.shapes}
    out = {
        "cell_colour": [colours.index(at[c].colour) if c in at else none_c for c in CELLS],
        "cell_shape": [SHAPES.index(at[c].shape) if c in at else none_s for c in CELLS],
        "shape_count": [scene.count(s) for s in SHAPES],
        "total": [len(scene.shapes)],
        "pair": [int(scene.count(s, c) > 0) for c in colours for s in SHAPES],
    }
    text = scene.text or ""
    number = text.isdigit()
    out["kind"] = [0 if not text else 1 if number else 2]
    out["tens"] = [int(text[-2]) if number and len(text) == 2 else 10]
    out["units"] = [int(text[-1]) if number else 10]
    out["word"] = [PICTURE_WORDS.index(text) if text and not number else len(PICTURE_WORDS)]
    out["ink"] = [colours.index(scene.ink) if scene.ink else none_c]
    return out


# ----------------------------------------------------------------------------------------------------------------
# the held-out split


def _hash_share(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def is_held_out_picture_key(key: str) -> bool:
    """Whether one key puts its example in the held-out set (a pure function of the key)."""
    kind, _, rest = key.partition(":")
    if kind == "pair":
        colour, shape = rest.split(":")
        return (colour, shape) in HELD_OUT_PAIRS
    if kind == "counts":
        return _hash_share(key) < COUNTS_HELD_OUT_FRACTION
    if kind in ("number", "word"):
        return _hash_share(key) < TEXT_HELD_OUT_FRACTION
    raise ValueError(f"not a picture key: {key!r}")


def is_held_out_picture(ex: Mapping[str, Any]) -> bool:
    return any(is_held_out_picture_key(k) for k in ex["keys"])


def held_out_reason(ex: Mapping[str, Any]) -> str:
    """Why an example is held out: "new_pair" (a held-out colour/shape pair), "new_counts" (only its count
    combination is new), "new_text_ink", or "train" when it is not held out."""
    held = [k for k in ex["keys"] if is_held_out_picture_key(k)]
    if not held:
        return "train"
    if any(k.startswith("pair:") for k in held):
        return "new_pair"
    return "new_counts" if held[0].startswith("counts:") else "new_text_ink"


def _tasks_and_weights(mix: Mapping[str, float] | None) -> tuple[list[str], list[float]]:
    weights = dict(DEFAULT_PICTURE_MIX if mix is None else mix)
    unknown = set(weights) - set(PICTURE_TASKS)
    if unknown:
        raise ValueError(f"unknown picture tasks in mix: {sorted(unknown)}; known: {', '.join(PICTURE_TASKS)}")
    names = [t for t in PICTURE_TASKS if weights.get(t, 0) > 0]
    if not names:
        raise ValueError("mix has no picture task with a positive weight")
    return names, [weights[t] for t in names]


def picture_example(index: int, seed: int, held_out: bool, mix: Mapping[str, float] | None = None,
                    think_prob: float = 0.7) -> dict[str, Any]:
    """Example ``index`` of the train (or held-out) stream of ``seed``: a pure function of its arguments, so a
    run can draw fresh pictures every step without storing them.  Examples of the other split are skipped."""
    names, weights = _tasks_and_weights(mix)
    rng = random.Random(f"qwen35-pictures:{seed}:{int(held_out)}:{index}")
    while True:
        task = rng.choices(names, weights=weights)[0]
        ex = make_picture_example(task, rng, rng.random() < think_prob)
        if is_held_out_picture(ex) == held_out:
            return ex


def held_out_pictures(task: str, n: int, seed: int = 12345, think: bool = True) -> list[dict[str, Any]]:
    """``n`` held-out examples of one task, distinct by question and picture keys, thinking on (or off)."""
    out, seen = [], set()
    rng = random.Random(f"qwen35-pictures-eval:{seed}:{task}")
    for _ in range(200 * n):
        ex = make_picture_example(task, rng, think)
        ident = (ex["scene"], question_of(ex))
        if is_held_out_picture(ex) and ident not in seen:
            seen.add(ident)
            out.append(ex)
            if len(out) == n:
                break
    return out


# ----------------------------------------------------------------------------------------------------------------
# encoding


def encode_picture_example(tok, ex: Mapping[str, Any], image_token_id: int, tokens_per_image: int
                           ) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of a picture example rendered by the chat template: the template's one
    ``<|image_pad|>`` becomes ``tokens_per_image`` pads (never learned), the assistant turn is learned."""
    from qwen35.train.bpe import encode_with_mask

    text, spans = render_with_spans(dict(ex))
    ids, mask = encode_with_mask(tok, text, spans)
    out_ids: list[int] = []
    out_mask: list[bool] = []
    for i, m in zip(ids, mask):
        if i == image_token_id:
            out_ids.extend([i] * tokens_per_image)
            out_mask.extend([False] * tokens_per_image)
        else:
            out_ids.append(i)
            out_mask.append(m)
    return out_ids, out_mask


def question_of(ex: Mapping[str, Any]) -> str:
    """The text of the example's question."""
    return next(p["text"] for p in ex["messages"][-2]["content"] if p["type"] == "text")


def prompt_messages(ex: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation before the answer (what the model is prompted with)."""
    return [dict(m) for m in ex["messages"][:-1]]


__all__ = [
    "IMAGE_SIZE", "PROCESSOR", "COLOURS", "SHAPES", "CELLS", "HELD_OUT_PAIRS", "PICTURE_WORDS", "PICTURE_TASKS",
    "DEFAULT_PICTURE_MIX", "Shape", "Scene", "random_shapes_scene", "random_text_scene", "draw", "picture_pixels",
    "make_picture_example", "picture_labels", "LABEL_GROUPS", "is_held_out_picture_key", "is_held_out_picture", "held_out_reason", "picture_example",
    "held_out_pictures", "encode_picture_example", "question_of", "prompt_messages",
]
