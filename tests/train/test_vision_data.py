"""Synthetic picture questions and the embedded model's vision stage: the data is deterministic, the held-out
split is disjoint by construction, answers are those of the drawn picture, the text model's conversion to the
multimodal layout keeps its text logits, and a 2-step run writes a folder that loads (here and in transformers)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen35.train import vision_data as V

ASSETS = Path(__file__).resolve().parents[2] / "qwen35" / "assets" / "default"
N_TRAIN = 1500


@pytest.fixture(scope="module")
def train_examples():
    return [V.picture_example(i, 0, False) for i in range(N_TRAIN)]


@pytest.fixture(scope="module")
def held_examples():
    return [V.picture_example(i, 0, True) for i in range(400)]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ASSETS / "tokenizer.json"))


# ----------------------------------------------------------------------------------------------------------------
# determinism and coverage


def test_same_seed_same_pictures():
    a = [V.picture_example(i, 3, False) for i in range(40)]
    assert a == [V.picture_example(i, 3, False) for i in range(40)]
    assert a != [V.picture_example(i, 4, False) for i in range(40)]
    assert V.draw(a[0]["scene"]).tobytes() == V.draw(a[0]["scene"]).tobytes()


def test_every_task_and_both_thinking_modes(train_examples):
    seen = Counter((ex["task"], ex["enable_thinking"]) for ex in train_examples)
    for task in V.PICTURE_TASKS:
        assert seen[(task, True)] > 0 and seen[(task, False)] > 0, task


def test_pictures_are_9_tokens_at_96_pixels():
    ex = V.picture_example(0, 0, False)
    pixels, grid = V.picture_pixels([ex["scene"], ex["scene"]])
    assert grid.tolist() == [[1, 6, 6], [1, 6, 6]] and pixels.shape == (72, 3 * 2 * 16 * 16)
    from qwen35.chat.media import count_vision_tokens, image_grid_thw
    assert count_vision_tokens(grid[0]) == 9
    # a photo of any size is brought down to about 96x96 pixels, so it costs at most 9 tokens too
    for h, w in ((480, 640), (1080, 1920), (64, 64), (300, 200)):
        assert count_vision_tokens(image_grid_thw(h, w, V.PROCESSOR)) <= 9


# ----------------------------------------------------------------------------------------------------------------
# the held-out split


def _pairs(ex):
    return {(s.colour, s.shape) for s in ex["scene"].shapes}


def test_held_out_split_is_disjoint_by_construction(train_examples, held_examples):
    held_pairs = set(V.HELD_OUT_PAIRS)
    for ex in train_examples:
        assert not V.is_held_out_picture(ex)
        assert not _pairs(ex) & held_pairs, ex["keys"]  # never drawn
        question = V.question_of(ex)
        assert not any(f"{c} {s}" in question for c, s in held_pairs), question  # never named
    for ex in held_examples:
        assert V.is_held_out_picture(ex) and V.held_out_reason(ex) != "train"
    # no count combination, colour/shape pair or text/ink combination is on both sides
    shape_train = [ex for ex in train_examples if ex["scene"].shapes]
    shape_held = [ex for ex in held_examples if ex["scene"].shapes]
    train_counts = {ex["scene"].counts_key() for ex in shape_train}
    held_counts = {ex["scene"].counts_key() for ex in shape_held if V.held_out_reason(ex) == "new_counts"}
    assert held_counts and not train_counts & held_counts
    assert {p for ex in shape_held for p in _pairs(ex)} & held_pairs == held_pairs
    train_text = {ex["keys"][0] for ex in train_examples if ex["scene"].text is not None}
    held_text = {ex["keys"][0] for ex in held_examples if ex["scene"].text is not None}
    assert held_text and not train_text & held_text
    reasons = Counter(V.held_out_reason(ex) for ex in held_examples)
    assert reasons["new_pair"] and reasons["new_counts"] and reasons["new_text_ink"]


def test_every_colour_and_shape_is_still_trained(train_examples):
    pairs = {p for ex in train_examples for p in _pairs(ex)}
    assert {c for c, _ in pairs} == set(V.COLOURS) and {s for _, s in pairs} == set(V.SHAPES)
    assert len(pairs) == len(V.COLOURS) * len(V.SHAPES) - len(V.HELD_OUT_PAIRS)


def test_held_out_evaluation_set_is_distinct():
    exs = V.held_out_pictures("pic_count", 30)
    assert len(exs) == 30 and all(V.is_held_out_picture(ex) and ex["enable_thinking"] for ex in exs)
    assert len({(ex["scene"], V.question_of(ex)) for ex in exs}) == 30


# ----------------------------------------------------------------------------------------------------------------
# answers are the picture's


def _expected(ex) -> str:
    """The answer recomputed from the scene record, independently of the generator's question code."""
    scene, q = ex["scene"], V.question_of(ex).lower()
    task = ex["task"]
    if task in ("pic_number", "pic_word"):
        return scene.text
    if task == "pic_count_all":
        return str(len(scene.shapes))
    if task == "pic_count":
        shape = next(s for s in V.SHAPES if V.PLURALS[s] in q)
        return str(sum(s.shape == shape for s in scene.shapes))
    if task == "pic_colour":
        shape = next(s for s in V.SHAPES if s in q)
        (only,) = [s for s in scene.shapes if s.shape == shape]
        return only.colour
    if task == "pic_shape_at":
        cell = next(c for c, phrase in sorted(V.CELL_PHRASES.items(), key=lambda kv: -len(kv[1])) if phrase in q)
        (there,) = [s for s in scene.shapes if s.cell == cell]
        return there.shape
    if task == "pic_exists":
        colour = next(c for c in V.COLOURS if f"{c} " in q)
        shape = next(s for s in V.SHAPES if f"{colour} {s}" in q)
        return "yes" if any(s.colour == colour and s.shape == shape for s in scene.shapes) else "no"
    raise AssertionError(task)


def test_answers_match_the_scene(train_examples, held_examples):
    from qwen35.train.data import check_answer

    for ex in train_examples[:600] + held_examples:
        assert ex["answer"] == _expected(ex), (ex["task"], V.question_of(ex), ex["scene"])
        assert check_answer(ex, ex["messages"][-1]["content"])
        assert [V.CELLS.index(s.cell) for s in ex["scene"].shapes] == \
            sorted(V.CELLS.index(s.cell) for s in ex["scene"].shapes)  # shapes are recorded in reading order
        if ex["enable_thinking"]:  # the trace states the fact, then concludes with the answer
            first, last = ex["messages"][-1]["reasoning_content"].splitlines()
            fact = {"yes": "there is one", "no": "there is none"}.get(ex["answer"], ex["answer"])
            assert fact in first.replace(" ", "") or fact in first, (first, ex["answer"])
            assert last.startswith("So ") and ex["answer"] in last


def test_labels_describe_the_scene(train_examples):
    for ex in train_examples[:300]:
        scene, labels = ex["scene"], V.picture_labels(ex["scene"])
        assert {g for g, _, _ in V.LABEL_GROUPS} == set(labels)
        for name, classes, n in V.LABEL_GROUPS:
            assert len(labels[name]) == n and all(0 <= x < classes for x in labels[name]), name
        assert sum(labels["shape_count"]) == labels["total"][0] == len(scene.shapes)
        assert sum(labels["pair"]) == len({(s.colour, s.shape) for s in scene.shapes})
        assert sum(c < len(V.COLOURS) for c in labels["cell_colour"]) == len(scene.shapes)
        if ex["task"] == "pic_number":
            assert str(10 * labels["tens"][0] + labels["units"][0] if labels["tens"][0] < 10
                       else labels["units"][0]) == ex["answer"]
        if ex["task"] == "pic_word":
            assert V.PICTURE_WORDS[labels["word"][0]] == ex["answer"]


def test_drawn_picture_holds_the_recorded_shapes():
    rng = random.Random(5)
    for _ in range(60):
        scene = V.random_shapes_scene(rng)
        pixels = np.asarray(V.draw(scene))
        for s in scene.shapes:  # the centre of every shape has its colour, and it lies in its cell
            assert tuple(pixels[s.y, s.x]) == V.COLOURS[s.colour], s
            row, col = divmod(V.CELLS.index(s.cell), 3)
            assert int(s.x // V.CELL_SIZE) == col and int(s.y // V.CELL_SIZE) == row
        painted = (pixels != np.array(scene.background)).any(-1).sum()
        assert painted >= 150 * len(scene.shapes)
        text = V.random_text_scene(rng, "47")
        ink = (np.asarray(V.draw(text)) == np.array(V.COLOURS[text.ink])).all(-1).sum()
        assert ink > 60


def test_encoding_expands_the_image_pad(tok):
    ex = V.picture_example(7, 0, False)
    image_id = tok.token_to_id("<|image_pad|>")
    ids, mask = V.encode_picture_example(tok, ex, image_id, 9)
    pads = [i for i, t in enumerate(ids) if t == image_id]
    assert len(pads) == 9 and pads == list(range(pads[0], pads[0] + 9)) and not any(mask[i] for i in pads)
    assert ids[pads[0] - 1] == tok.token_to_id("<|vision_start|>") and ids[pads[-1] + 1] == tok.token_to_id(
        "<|vision_end|>")
    learned = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned.endswith(ex["messages"][-1]["content"] + "<|im_end|>")


# ----------------------------------------------------------------------------------------------------------------
# the vision stage

TINY_TOWER = {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 16,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 36}


def test_conversion_keeps_the_text_logits(tok):
    from qwen35.checkpoint import load_model
    from qwen35.train.embedded_vision import to_multimodal, vision_token_ids

    text = load_model(ASSETS, dtype="float32")
    model = to_multimodal(text, vision_token_ids(tok), TINY_TOWER)
    cfg = model.config
    assert cfg.multimodal and cfg.model_type == "qwen3_5_moe" and cfg.vision.out_hidden_size == 256
    assert cfg.image_token_id == tok.token_to_id("<|image_pad|>") == 2023
    assert cfg.vision_start_token_id == tok.token_to_id("<|vision_start|>")
    prompts = ["<|im_start|>user\nWhat is 47 + 38?<|im_end|>\n<|im_start|>assistant\n<think>\n",
               "Once upon a time, there was a fox named Rusty who lived near the sea."]
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt).ids])
            assert torch.equal(text(ids).logits, model(ids).logits)
            # through the multimodal path (M-RoPE positions of a prompt without pictures): the same too
            grid = torch.zeros(0, 3, dtype=torch.long)
            assert torch.equal(text(ids).logits, model(ids, image_grid_thw=grid).logits)
    assert model.mtp is not None and text.mtp is not None
    for (n1, p1), (n2, p2) in zip(text.mtp.named_parameters(), model.mtp.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def _tiny_text_model(folder: Path) -> Path:
    from qwen35.model.mtp import MTPHead
    from qwen35.model import init_weights
    from qwen35.train.presets import TINY_MODEL, build_model

    torch.manual_seed(0)
    model = build_model(TINY_MODEL, 2048, {"<|endoftext|>": 2011, "<|im_end|>": 2013})
    init_weights(model)
    model.mtp = MTPHead(model.text_config)
    init_weights(model.mtp)
    model.save_pretrained(folder, tokenizer_from=ASSETS)
    return folder


def _recipe(base: Path, out: Path, steps: int = 2, **kw):
    from qwen35.train.embedded_vision import VisionRecipe

    return VisionRecipe(base=str(base), out_dir=str(out), steps=steps, picture_batch=2, text_batch=2,
                        tower=dict(TINY_TOWER), eval_every=1, eval_pictures=2, eval_text=2, save_every=1,
                        warmup_steps=1, threads=None, progress=False, seq_len=400, tower_pretrain_steps=2,
                        pretrain_batch=2,
                        text_mix={"add2": 1.0, "chat": 1.0}, **kw)


def test_two_step_run_writes_a_loadable_folder(tmp_path):
    from qwen35.checkpoint import load_model
    from qwen35.train.embedded_vision import VisionStage, evaluate_pictures

    base = _tiny_text_model(tmp_path / "base")
    stage = VisionStage(_recipe(base, tmp_path / "run"))
    folder = stage.run()
    assert stage.step == 2 and len(stage.history) == 2 and all(h["picture_loss"] > 0 for h in stage.history)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "preprocessor_config.json", "training_info.json"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_moe" and cfg["image_token_id"] == 2023 and "vision_config" in cfg
    assert json.loads((folder / "training_info.json").read_text())["steps"] == 2
    from qwen35.chat.media import ImageProcessorConfig
    assert ImageProcessorConfig.from_folder(folder) == V.PROCESSOR

    model = load_model(folder, dtype="float32")
    assert model.visual is not None and model.mtp is not None and not model.extra_tensors
    trained = {k: v.float() for k, v in stage.model.state_dict().items()}
    for k, v in model.state_dict().items():  # bf16 copies of the trained weights
        assert torch.allclose(v, trained[k].to(torch.bfloat16).float()), k
    report = evaluate_pictures(folder, per_task=1, tasks=["pic_count", "pic_word"], max_new_tokens=3, model=model)
    assert report["problems"] == {"pic_count": 1, "pic_word": 1}


def test_transformers_loads_the_folder(tmp_path):
    pytest.importorskip("transformers")
    from qwen35.train.embedded_vision import VisionStage, transformers_check

    base = _tiny_text_model(tmp_path / "base")
    folder = VisionStage(_recipe(base, tmp_path / "run", steps=1)).run()
    shutil.rmtree(tmp_path / "run" / "checkpoint")
    got = transformers_check(folder)
    assert got["missing_keys"] == [] and got["unexpected_keys"] == [] and got["mismatched_keys"] == []
    assert got["max_abs_logit_diff"] <= 2e-2 * max(got["logit_scale"], 1.0)


def test_resume_continues_the_same_run(tmp_path):
    from qwen35.train.embedded_vision import VisionStage

    base = _tiny_text_model(tmp_path / "base")
    whole = VisionStage(_recipe(base, tmp_path / "a"))
    whole.run()
    part = VisionStage(_recipe(base, tmp_path / "b"))
    part.pretrain_tower()
    part.evaluate_loss()
    part.train_step()
    part.save_state()
    resumed = VisionStage(_recipe(base, tmp_path / "b"), resume=True)
    assert resumed.step == 1
    resumed.run()
    for (k, v), (_, w) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(v, w, atol=1e-6), k
    with pytest.raises(FileExistsError):
        VisionStage(_recipe(base, tmp_path / "a"))
