"""The vision stage of the embedded model: a tiny vision tower of the official architecture, trained with the
shipped text model so that it answers questions about synthetic pictures.

    python -m qwen35.train.embedded --out DIR --vision-from qwen35/assets/default [--vision-steps N]

(or ``python -m qwen35.train.embedded_vision --out DIR --base qwen35/assets/default``) does:

1. **Conversion.**  The text checkpoint (``qwen3_5_moe_text``) becomes the official multimodal layout
   (``qwen3_5_moe``: ``text_config`` + ``vision_config`` + the image / video / vision start / end token ids of
   its own tokenizer), with a freshly initialised tower: :data:`EMBEDDED_TOWER` (3 blocks of width 128, 4 heads,
   16-pixel patches, 2 temporal frames, 2x2 merging into the text width 256, a 6x6 learned position grid).
   Text weights are copied unchanged, so text prompts give the same logits as before (:func:`to_multimodal`).
2. **Tower pretraining** (``tower_pretrain_steps``, tower only, ~0.2 s a step): the tower learns to see from
   the generator's own record of each picture through :class:`TowerProbe`, linear heads that are thrown away
   afterwards (each picture token: what its cell holds; the mean of the tokens: counts, pairs, number, word).
3. **Joint training** of tower + language model (+ MTP head) on two micro-batches per step: synthetic picture
   questions (:mod:`qwen35.train.vision_data`, fresh pictures every step) and replayed text tasks of the text
   recipe (:data:`qwen35.train.embedded.EMBEDDED_MIX`), so the text skills do not fade.  The loss is the text
   recipe's (next-token CE on assistant tokens, MTP CE, MoE balance), the mean of each micro-batch weighted
   ``picture_weight`` / ``1 - picture_weight``, plus the probe's loss (``aux_weight``).  The new tower learns at
   a higher rate than the trained LM.

Why the probe (measured on the 2-core machine, 1 thread): trained only through the language model, the tower
learned nothing usable in 400 joint steps -- the model wrote the trace formats but "empty" for every cell of a
scan, and even one centred shape's colour took ~150 steps to reach 50% -- while the same tower with a linear head
on per-cell labels reads every colour after 25 steps and every shape after ~500.  The bottleneck is credit
assignment through a language model that has never seen picture tokens (with the colour written as text where
the picture goes, it learns to copy it in 25 steps).
4. **Export** to ``DIR/model``: config.json, bf16 model.safetensors (``model.language_model.*``,
   ``model.visual.*``, ``mtp.*``), tokenizer files and chat template of the base model, generation_config,
   ``preprocessor_config.json`` (:data:`qwen35.train.vision_data.PROCESSOR`: pictures resized to about
   96x96, 9 tokens) and training_info.json; ``qwen35.checkpoint.load_model`` and transformers'
   ``Qwen3_5MoeForConditionalGeneration`` load it.
5. **Evaluation** into ``DIR/eval.json``: held-out picture questions (new colour/shape pairs, new count
   combinations, new text/ink combinations), exact match of the answer per task, greedy with thinking on,
   through ``model.forward`` with ``pixel_values``; the text recipe's evaluation
   (:func:`qwen35.train.embedded.evaluate`) on the same folder; and, when transformers is installed, its load
   report and logits agreement on a picture prompt.

The stage writes ``DIR/checkpoint/state.pt`` every ``save_every`` steps and resumes from it (``--resume``):
every batch is a pure function of the recipe and the step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM, init_weights
from qwen35.train.batches import Batch
from qwen35.train.config import RunConfig
from qwen35.train.losses import StepLosses, forward_losses
from qwen35.train.optim import OptimConfig, lr_factor, make_optimizer, optimizer_step

# The tower: the official architecture (ViT blocks with 2-D RoPE, learned positions, 2x2 patch merger) at a size
# that costs little next to the 4-layer LM; 6x6 learned positions = the patch grid of a 96x96 picture.
EMBEDDED_TOWER: dict[str, Any] = {
    "depth": 3,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_heads": 4,
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 36,
    "initializer_range": 0.02,
}

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
DEFAULT_VISION_STEPS = 1300


@dataclass
class VisionRecipe(RunConfig):
    """Everything the vision stage depends on."""

    base: str = "qwen35/assets/default"  # the trained text model folder
    out_dir: str = "runs/embedded-vision"
    steps: int = DEFAULT_VISION_STEPS
    picture_batch: int = 16  # picture questions per step (~120 tokens each)
    text_batch: int = 6  # replayed text examples per step (~250 tokens each)
    picture_weight: float = 0.5  # share of the loss from the picture micro-batch
    lr: float = 6e-4  # the trained language model (and MTP head)
    tower_lr: float = 2e-3  # the new tower
    min_lr_ratio: float = 0.1  # end of the cosine decay, as a share of each peak
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    mtp_loss_weight: float = 0.3  # 0: the MTP head is not trained (it is still exported)
    tower_pretrain_steps: int = 2000  # tower-only steps on the auxiliary labels before joint training
    pretrain_batch: int = 32
    aux_weight: float = 0.5  # the auxiliary label loss during joint training (0: off)
    think_prob: float = 0.7
    seq_len: int = 640  # longest text example replayed
    tower: dict[str, Any] = field(default_factory=lambda: dict(EMBEDDED_TOWER))
    picture_mix: dict[str, float] | None = None  # None: vision_data.DEFAULT_PICTURE_MIX
    text_mix: dict[str, float] | None = None  # None: embedded.EMBEDDED_MIX
    seed: int = 0
    eval_every: int = 100
    eval_pictures: int = 64  # held-out picture questions in the periodic loss evaluation
    eval_text: int = 64  # held-out text examples in it
    save_every: int = 100
    threads: int | None = 1
    device: str = "cpu"
    save_dtype: str = "bfloat16"
    progress: bool = True

    RESUME_SAFE = ("steps", "eval_every", "save_every", "out_dir", "threads", "progress", "device", "save_dtype")


# ----------------------------------------------------------------------------------------------------------------
# conversion


def vision_token_ids(tok) -> dict[str, int]:
    """The config's image / video / vision start / end token ids, from a tokenizer (``tokenizers.Tokenizer`` or
    ``qwen35.chat.Tokenizer``) that has the Qwen3.5 special tokens."""
    ids = {t: tok.token_to_id(t) for t in VISION_TOKENS}
    lacking = [t for t, i in ids.items() if i is None]
    if lacking:
        raise ValueError(f"the tokenizer has no {', '.join(lacking)}: it cannot take pictures")
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def multimodal_body(text_model: Qwen35ForCausalLM, tower: Mapping[str, Any], token_ids: Mapping[str, int]
                    ) -> dict[str, Any]:
    """The config.json body of the multimodal model around a text-only model: ``qwen3_5_moe`` (or ``qwen3_5``)
    with the text model's settings as ``text_config`` and ``tower`` as ``vision_config``."""
    cfg = text_model.config
    text = cfg.to_dict()
    text.pop("architectures", None)
    if cfg.multimodal:
        raise ValueError(f"{cfg.source}: already a multimodal config")
    moe = cfg.text.is_moe
    text["model_type"] = "qwen3_5_moe_text" if moe else "qwen3_5_text"
    vision = dict(tower)
    vision["out_hidden_size"] = cfg.text.hidden_size
    return {
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "tie_word_embeddings": cfg.text.tie_word_embeddings,
        **token_ids,
    }


def to_multimodal(text_model: Qwen35ForCausalLM, token_ids: Mapping[str, int],
                  tower: Mapping[str, Any] | None = None, seed: int = 0) -> Qwen35ForCausalLM:
    """A multimodal copy of a text-only model: the same text (and MTP) weights, a new tower initialised with
    ``seed``.  Text prompts give exactly the text model's logits."""
    body = multimodal_body(text_model, EMBEDDED_TOWER if tower is None else tower, token_ids)
    config = config_from_dict(body, source="embedded vision recipe")
    head = text_model.mtp
    kw = {"mtp": head is not None, "vision": True}
    if head is not None:
        kw["mtp_hidden_source"] = head.hidden_source
    model = Qwen35ForCausalLM(config, **kw)
    missing, unexpected = model.load_state_dict(text_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("visual.") for k in missing):
        raise RuntimeError(f"text weights do not fit the multimodal model: missing "
                           f"{[k for k in missing if not k.startswith('visual.')][:5]}, unexpected {unexpected[:5]}")
    torch.manual_seed(seed)
    init_weights(model.visual, config.vision.initializer_range)  # linears, patch embedding, positions, LayerNorms
    model.to(text_model.dtype)
    model.source_path = getattr(text_model, "source_path", None)
    return model


# ----------------------------------------------------------------------------------------------------------------
# batches


@dataclass
class PictureBatch:
    batch: Batch
    pixel_values: torch.Tensor  # [patches, C·T·P·P], the rows' pictures in row order
    image_grid_thw: torch.Tensor  # [rows, 3]

    def to(self, device: torch.device | str) -> PictureBatch:
        return PictureBatch(self.batch.to(device), self.pixel_values.to(device), self.image_grid_thw)


def picture_batch(examples: Sequence[Mapping[str, Any]], tok, image_token_id: int, merge: int,
                  pad_id: int) -> PictureBatch:
    """Right-padded ids, loss masks and pixels of picture examples (one picture each)."""
    from qwen35.chat.media import count_vision_tokens
    from qwen35.train.batches import TokenizedSet, collate
    from qwen35.train.vision_data import encode_picture_example, picture_pixels

    pixels, grid = picture_pixels([ex["scene"] for ex in examples])
    data = TokenizedSet([], [], [], [])
    for i, ex in enumerate(examples):
        ids, mask = encode_picture_example(tok, ex, image_token_id, count_vision_tokens(grid[i], merge))
        data.ids.append(torch.tensor(ids, dtype=torch.long))
        data.masks.append(torch.tensor(mask, dtype=torch.bool))
        data.tasks.append(ex["task"])
        data.source.append(i)
    return PictureBatch(collate(data, range(len(examples)), pad_id), pixels, grid)


class TowerProbe(nn.Module):
    """Linear heads, for training only (never exported), that read from the tower's output what the questions
    ask about a picture (:func:`qwen35.train.vision_data.picture_labels`):

    * **local**: each picture token, what its own cell holds (colour, shape or empty): with 96x96 pictures the
      3x3 grid of merged tokens is the 3x3 grid of cells;
    * **global**: the mean of a picture's tokens, everything at once (every cell, the counts, which
      colour/shape pairs are there, the written number, word and ink) -- what the language model gets from
      spreading its attention over the picture.

    Their loss teaches the tower to write those facts in a form a linear map reads.  Without it the tower
    learns only through the language model, which is far slower (see the module docstring)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        from qwen35.train.vision_data import CELLS, COLOURS, LABEL_GROUPS, SHAPES

        self.groups = LABEL_GROUPS
        self.cells, self.local_classes = len(CELLS), (len(COLOURS) + 1, len(SHAPES) + 1)
        self.local = nn.Linear(width, sum(self.local_classes))
        self.glob = nn.Linear(width, sum(classes * n for _, classes, n in LABEL_GROUPS))
        for lin in (self.local, self.glob):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def _logits(self, tokens: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.shape[0] != images * self.cells:
            raise ValueError(f"the probe needs {self.cells} tokens per picture (one per cell), got "
                             f"{tokens.shape[0]} for {images} pictures")
        x = tokens.float()
        return self.local(x), self.glob(x.view(images, self.cells, -1).mean(1))

    def _parts(self, tokens: torch.Tensor, labels: Mapping[str, torch.Tensor]):
        """(name, logits [rows, classes], targets [rows]) of every head."""
        images = next(iter(labels.values())).shape[0]
        local, glob = self._logits(tokens, images)
        c, _ = self.local_classes
        dev = tokens.device
        yield "local_colour", local[:, :c], labels["cell_colour"].to(dev).reshape(-1)
        yield "local_shape", local[:, c:], labels["cell_shape"].to(dev).reshape(-1)
        at = 0
        for name, classes, n in self.groups:
            yield name, glob[:, at:at + classes * n].reshape(-1, classes), labels[name].to(dev).reshape(-1)
            at += classes * n

    def losses(self, tokens: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """tokens [pictures * 9, width] (the tower's output), labels name -> [pictures, n] -> the mean
        cross-entropy of each head."""
        return {name: F.cross_entropy(logits, target) for name, logits, target in self._parts(tokens, labels)}

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {name: float((logits.argmax(-1) == target).float().mean())
                for name, logits, target in self._parts(tokens, labels)}


def label_tensors(scenes: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The auxiliary labels of pictures: name -> [images, n] long."""
    from qwen35.train.vision_data import picture_labels

    rows = [picture_labels(s) for s in scenes]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.long) for name in rows[0]}


PICTURE_WINDOW = 16  # steps whose picture questions are bucketed by length together


def picture_length(tok, ex: Mapping[str, Any]) -> int:
    """Tokens of a picture example before its image pad is expanded (the expansion adds the same to all)."""
    from qwen35.train.data import render_example

    return len(tok.encode(render_example(dict(ex))).ids)


# ----------------------------------------------------------------------------------------------------------------
# the stage

STATE_FILE = "state.pt"


class VisionStage:
    """One vision-stage run; :func:`run_vision_recipe` is the usual entry point."""

    def __init__(self, recipe: VisionRecipe, resume: bool = False) -> None:
        from tokenizers import Tokenizer

        from qwen35.checkpoint import load_model
        from qwen35.train.batches import BatchStream, encode_examples, eval_batches
        from qwen35.train.data import generate_split
        from qwen35.train.embedded import EMBEDDED_MIX

        self.recipe = recipe = copy.deepcopy(recipe)
        self.out = Path(recipe.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        state = self._read_state() if resume else None
        if state is None and (self.out / "checkpoint" / STATE_FILE).exists():
            raise FileExistsError(f"{self.out} holds a training state; resume it (--resume) or choose another out")
        if state is not None:
            recipe.check_resume(state["recipe"])

        self.base = Path(recipe.base)
        self.tok = Tokenizer.from_file(str(self.base / "tokenizer.json"))
        self.pad_id = self.tok.token_to_id("<|endoftext|>")
        self.token_ids = vision_token_ids(self.tok)
        text_model = load_model(self.base, dtype="float32")
        self.model = to_multimodal(text_model, self.token_ids, recipe.tower, recipe.seed)
        del text_model
        self.device = torch.device(recipe.device)
        self.model.to(self.device).train()
        self.merge = self.model.config.vision.spatial_merge_size

        # text replay: fresh train-split examples of the text recipe's tasks (the split is by problem hash)
        text_mix = recipe.text_mix if recipe.text_mix is not None else dict(EMBEDDED_MIX)
        train_ex, held_ex = generate_split(recipe.steps * recipe.text_batch, max(recipe.eval_text, 1),
                                           1000 + recipe.seed, text_mix, think_prob=recipe.think_prob)
        self.text = encode_examples(self.tok, train_ex, recipe.seq_len)
        self.text_stream = BatchStream(self.text, recipe.text_batch, recipe.seed, self.pad_id)
        held_text = encode_examples(self.tok, held_ex, recipe.seq_len)
        self.eval_text = [b.to(self.device) for b in eval_batches(held_text, recipe.text_batch,
                                                                  max(1, recipe.eval_text // recipe.text_batch),
                                                                  self.pad_id)]
        from qwen35.train.vision_data import picture_example

        held_pics = [picture_example(i, recipe.seed, True, recipe.picture_mix, recipe.think_prob)
                     for i in range(recipe.eval_pictures)]
        self.eval_pictures = [self._pictures(held_pics[i:i + recipe.picture_batch]).to(self.device)
                              for i in range(0, len(held_pics), recipe.picture_batch)]

        torch.manual_seed(recipe.seed + 1)
        self.probe = TowerProbe(self.model.config.vision.out_hidden_size).to(self.device)
        self.pretrained = recipe.tower_pretrain_steps <= 0
        self.pretrain_log: list[dict[str, Any]] = []
        tower = [p for n, p in self.model.named_parameters() if n.startswith("visual.")]
        tower += list(self.probe.parameters()) if recipe.aux_weight > 0 else []
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("visual.")]
        self.params = tower + rest
        self.schedule = OptimConfig(steps=recipe.steps, lr=recipe.lr, min_lr=recipe.lr * recipe.min_lr_ratio,
                                    warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
                                    betas=recipe.betas, grad_clip=recipe.grad_clip)
        self.optimizer = make_optimizer([(tower, recipe.tower_lr), (rest, recipe.lr)], self.schedule)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self._window: tuple[int, list[list[dict[str, Any]]]] | None = None
        self._last_examples: list[dict[str, Any]] = []
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.probe.load_state_dict(state["probe"])
            self.pretrained, self.pretrain_log = bool(state["pretrained"]), list(state["pretrain_log"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.history, self.evals = list(state["history"]), list(state["evals"])

    # ------------------------------------------------------------------------------------------------ data

    def _pictures(self, examples: Sequence[Mapping[str, Any]]) -> PictureBatch:
        return picture_batch(examples, self.tok, self.token_ids["image_token_id"], self.merge, self.pad_id)

    def picture_examples(self, step: int) -> list[dict[str, Any]]:
        """The picture questions of a step: fresh train-split examples, length-bucketed as the text batches are
        (each window of :data:`PICTURE_WINDOW` steps draws its examples, sorts them by length, cuts them into
        the steps' micro-batches and shuffles those), so a batch is padded little."""
        from qwen35.train.vision_data import picture_example

        r = self.recipe
        window, at = divmod(step, PICTURE_WINDOW)
        if self._window is None or self._window[0] != window:
            n = PICTURE_WINDOW * r.picture_batch
            exs = [picture_example(window * n + j, r.seed, False, r.picture_mix, r.think_prob) for j in range(n)]
            lengths = [picture_length(self.tok, ex) for ex in exs]
            order = sorted(range(n), key=lambda i: lengths[i])
            batches = [[exs[i] for i in order[b:b + r.picture_batch]] for b in range(0, n, r.picture_batch)]
            random.Random(f"qwen35-picture-batches:{r.seed}:{window}").shuffle(batches)
            self._window = (window, batches)
        return self._window[1][at]

    # ------------------------------------------------------------------------------------------------ steps

    def _combined(self, parts: Sequence[tuple[StepLosses, float]]) -> tuple[torch.Tensor, dict[str, float]]:
        r = self.recipe
        coef = self.model.text_config.router_aux_loss_coef
        loss = torch.zeros((), device=self.device)
        rec: dict[str, float] = {}
        for name, (res, w) in zip(("picture", "text"), parts):
            main = res.main_sum / max(res.main_n, 1)
            loss = loss + w * main
            rec[f"{name}_loss"] = float(main.detach())
            if res.mtp_sum is not None and r.mtp_loss_weight > 0:
                mtp = res.mtp_sum / max(res.mtp_n, 1)
                loss = loss + w * r.mtp_loss_weight * mtp
                rec[f"{name}_mtp_loss"] = float(mtp.detach())
            if res.balance is not None:
                loss = loss + w * coef * res.balance
            if res.mtp_balance is not None:
                loss = loss + w * coef * r.mtp_loss_weight * res.mtp_balance
        return loss, rec

    def train_step(self) -> dict[str, Any]:
        r = self.recipe
        t0 = time.perf_counter()
        self._last_examples = self.picture_examples(self.step)
        pics = self._pictures(self._last_examples).to(self.device)
        text = self.text_stream[self.step].to(self.device)
        head = self.model.mtp if r.mtp_loss_weight > 0 else None
        seen: list[torch.Tensor] = []  # the tower's output inside the forward, for the auxiliary loss
        hook = self.model.visual.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            pic_losses = forward_losses(self.model, head, pics.batch, pixel_values=pics.pixel_values,
                                        image_grid_thw=pics.image_grid_thw)
        finally:
            hook.remove()
        text_losses = forward_losses(self.model, head, text)
        loss, rec = self._combined([(pic_losses, r.picture_weight), (text_losses, 1 - r.picture_weight)])
        if r.aux_weight > 0:
            scenes = [ex["scene"] for ex in self._last_examples]
            aux = self.probe.losses(seen[0], label_tensors(scenes))
            aux_loss = sum(aux.values()) / len(aux)
            loss = loss + r.picture_weight * r.aux_weight * aux_loss
            rec["aux_loss"] = float(aux_loss.detach())
        loss.backward()
        factor = lr_factor(self.step, self.schedule)
        grad_norm, _ = optimizer_step(self.optimizer, self.params, self.step, self.schedule)
        self.step += 1
        rec.update(step=self.step, loss=float(loss.detach()), lr_factor=factor, grad_norm=grad_norm,
                   tokens=pics.batch.tokens + text.tokens, seconds=time.perf_counter() - t0)
        self.history.append(rec)
        return rec

    def pretrain_tower(self, log=None) -> None:
        """Tower-only steps on the auxiliary labels (:class:`TowerProbe`) of fresh train-split pictures, with
        its own AdamW and a cosine schedule; the language model is not run."""
        from qwen35.train.vision_data import picture_example, picture_pixels

        r = self.recipe
        params = list(self.model.visual.parameters()) + list(self.probe.parameters())
        sched = OptimConfig(steps=r.tower_pretrain_steps, lr=r.tower_lr, min_lr=r.tower_lr * r.min_lr_ratio,
                            warmup_steps=min(r.warmup_steps, r.tower_pretrain_steps), weight_decay=0.0,
                            betas=r.betas, grad_clip=r.grad_clip)
        opt = make_optimizer(params, sched)
        tower = self.model.visual
        for step in range(r.tower_pretrain_steps):
            t0 = time.perf_counter()
            scenes = [picture_example(step * r.pretrain_batch + j, r.seed + 7919, False, r.picture_mix)["scene"]
                      for j in range(r.pretrain_batch)]
            pixels, grid = picture_pixels(scenes)
            tokens = tower(pixels.to(self.device), grid)
            labels = label_tensors(scenes)
            parts = self.probe.losses(tokens, labels)
            loss = sum(parts.values()) / len(parts)
            loss.backward()
            optimizer_step(opt, params, step, sched)
            if (step + 1) % 100 == 0 or step + 1 == r.tower_pretrain_steps:
                rec = {"pretrain_step": step + 1, "loss": float(loss.detach()), "seconds": time.perf_counter() - t0,
                       "accuracy": self.probe.accuracy(tokens, labels)}
                self.pretrain_log.append(rec)
                if log is not None:
                    log(rec)
        self.pretrained = True

    @torch.no_grad()
    def evaluate_loss(self) -> dict[str, Any]:
        """Held-out masked CE and next-token accuracy on picture questions and on text examples."""
        self.model.eval()
        out: dict[str, Any] = {"step": self.step}
        for name, batches in (("picture", self.eval_pictures), ("text", self.eval_text)):
            total = correct = n = 0
            for b in batches:
                if isinstance(b, PictureBatch):
                    res = forward_losses(self.model, None, b.batch, count_correct=True, pixel_values=b.pixel_values,
                                         image_grid_thw=b.image_grid_thw)
                else:
                    res = forward_losses(self.model, None, b, count_correct=True)
                total += float(res.main_sum)
                n += res.main_n
                correct += res.main_correct
            out[f"{name}_loss"] = total / max(n, 1)
            out[f"{name}_accuracy"] = correct / max(n, 1)
        self.model.train()
        self.evals.append(out)
        return out

    def run(self, log=None) -> Path:
        """Train to ``recipe.steps``, then export ``out/model``; ``log(record)`` is called after each step."""
        r = self.recipe
        bar = None
        if r.progress:
            from tqdm import tqdm
            bar = tqdm(total=r.steps, initial=self.step, desc="vision", unit="step", dynamic_ncols=True)
        if not self.pretrained:
            self.pretrain_tower(log)
            self.save_state()
        if self.step == 0 and r.eval_every:
            self.evaluate_loss()  # the starting point: the text model's held-out text loss, the pretrained tower
        while self.step < r.steps:
            rec = self.train_step()
            if r.eval_every and self.step % r.eval_every == 0:
                rec["eval"] = self.evaluate_loss()
            if r.save_every and self.step % r.save_every == 0 and self.step < r.steps:
                self.save_state()
            if log is not None:
                log(rec)
            if bar is not None:
                bar.set_postfix({"pic": f"{rec['picture_loss']:.3f}", "text": f"{rec['text_loss']:.3f}",
                                 "aux": f"{rec.get('aux_loss', 0):.3f}"}, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evaluate_loss()
        self.save_state()
        (self.out / "history.json").write_text(json.dumps({"pretrain": self.pretrain_log, "train": self.history,
                                                           "eval": self.evals}) + "\n")
        return self.export(self.out / "model")

    # ------------------------------------------------------------------------------------------------ state

    def save_state(self) -> Path:
        folder = self.out / "checkpoint"
        folder.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "recipe": self.recipe.to_dict(), "model": self.model.state_dict(),
                 "probe": self.probe.state_dict(), "pretrained": self.pretrained, "pretrain_log": self.pretrain_log,
                 "optimizer": self.optimizer.state_dict(), "history": self.history, "evals": self.evals,
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, folder / STATE_FILE)
        return folder / STATE_FILE

    def _read_state(self) -> dict[str, Any]:
        path = self.out / "checkpoint" / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no training state to resume from")
        return torch.load(path, map_location="cpu", weights_only=True)

    # ------------------------------------------------------------------------------------------------ output

    def export(self, folder: Path) -> Path:
        return export_model(self.model, folder, self.base, self.recipe.save_dtype, {
            "steps": self.step, "base_model": str(self.base),
            "final_eval": self.evals[-1] if self.evals else None,
            "tower_pretrain": self.pretrain_log[-1] if self.pretrain_log else None,
            "vision_recipe": self.recipe.to_dict()})


def export_model(model: Qwen35ForCausalLM, folder: str | Path, base: str | Path, dtype: str = "bfloat16",
                 info: Mapping[str, Any] | None = None) -> Path:
    """A complete checkpoint folder: weights and config (official multimodal layout), the base model's
    tokenizer files, chat template and generation config, the picture processor's config, training_info.json."""
    from qwen35.checkpoint import KEEP_FP32
    from qwen35.train.vision_data import PROCESSOR

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = copy.deepcopy(model).to("cpu", target)
    for name, p in out.named_parameters():
        if name.endswith(KEEP_FP32):  # decay rates stay float32, as official checkpoints store A_log
            p.data = p.data.float()
    out.save_pretrained(folder, tokenizer_from=base)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR.to_dict(), indent=2) + "\n")
    body = {"mtp_hidden_source": model.mtp.hidden_source if model.mtp is not None else None, **(info or {})}
    (folder / "training_info.json").write_text(json.dumps(body, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def picture_prompt(tok, ex: Mapping[str, Any], grid: torch.Tensor, merge: int, enable_thinking: bool = True
                   ) -> list[int]:
    """Token ids of a picture example's prompt, its image pad expanded for ``grid``."""
    from qwen35.chat.media import expand_placeholders
    from qwen35.train.vision_data import prompt_messages

    text = tok.apply_chat_template(prompt_messages(ex), enable_thinking=enable_thinking)
    return tok.encode(expand_placeholders(text, image_grid_thw=grid, merge_size=merge))


def evaluate_pictures(model_dir: str | Path, per_task: int = 50, tasks: Sequence[str] | None = None,
                      max_new_tokens: int = 160, batch_size: int = 32, device: str = "cpu",
                      model: Qwen35ForCausalLM | None = None) -> dict[str, Any]:
    """Held-out picture questions: exact match of the answer per task (greedy, thinking on), split by why the
    picture is held out and how often the whole thinking trace is the expected one.

    Returns ``{"exact_match": {task: rate}, "exact_match_mean", "exact_match_all", "by_reason": {...},
    "trace_exact": {task: rate}, "problems": {task: n}, "samples": {task: text}, "seconds"}``."""
    from qwen35.chat import Tokenizer, split_reasoning
    from qwen35.checkpoint import load_model
    from qwen35.train.data import check_answer
    from qwen35.train.embedded import greedy_generate
    from qwen35.train.vision_data import (
        PICTURE_TASKS,
        held_out_pictures,
        held_out_reason,
        picture_pixels,
    )

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if model is None:
        model = load_model(model_dir, dtype="float32").eval().to(device)
    tok = Tokenizer(model_dir)
    merge = model.config.vision.spatial_merge_size
    stop = sorted(tok.stop_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.endoftext_id
    jobs, prompts, images = [], [], []
    for task in (tasks or PICTURE_TASKS):
        for ex in held_out_pictures(task, per_task):
            pixels, grid = picture_pixels([ex["scene"]])
            jobs.append((task, ex))
            prompts.append(picture_prompt(tok, ex, grid, merge))
            images.append((pixels, grid))
    outputs = greedy_generate(model, prompts, stop, pad, max_new_tokens, batch_size, images=images)
    hits: dict[str, list[bool]] = {}
    traces: dict[str, list[bool]] = {}
    reasons: dict[str, list[bool]] = {}
    samples: dict[str, str] = {}
    for (task, ex), ids in zip(jobs, outputs):
        text = tok.decode([i for i in ids if i not in tok.stop_token_ids])
        reasoning, content = split_reasoning(text, thinking=True)
        ok = check_answer(ex, content)
        hits.setdefault(task, []).append(ok)
        want = ex["messages"][-1].get("reasoning_content", "")
        traces.setdefault(task, []).append((reasoning or "").strip() == want.strip())
        reasons.setdefault(held_out_reason(ex), []).append(ok)
        samples.setdefault(task, text[-300:])
    rate = {t: sum(v) / len(v) for t, v in hits.items()}
    every = [x for v in hits.values() for x in v]
    return {"exact_match": rate, "exact_match_mean": sum(rate.values()) / max(len(rate), 1),
            "exact_match_all": sum(every) / max(len(every), 1),
            "by_reason": {k: {"exact_match": sum(v) / len(v), "n": len(v)} for k, v in sorted(reasons.items())},
            "trace_exact": {t: sum(v) / len(v) for t, v in traces.items()},
            "problems": {t: len(v) for t, v in hits.items()}, "samples": samples,
            "seconds": time.perf_counter() - t0}


def transformers_check(model_dir: str | Path) -> dict[str, Any]:
    """Whether transformers' ``Qwen3_5MoeForConditionalGeneration`` loads the folder with every text and vision
    weight (missing / unexpected keys, ``mtp.*`` aside: transformers has no MTP), and how far its logits on a
    picture prompt are from ours (float32).  ``{"available": False}`` without transformers."""
    try:
        import transformers
    except ImportError:
        return {"available": False}
    from qwen35.chat import Tokenizer
    from qwen35.checkpoint import load_model
    from qwen35.train.vision_data import picture_example, picture_pixels

    model_dir = Path(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, output_loading_info=True)
    hf.eval()
    ours = load_model(model_dir, dtype="float32").eval()
    tok = Tokenizer(model_dir)
    ex = picture_example(0, 0, True)
    pixels, grid = picture_pixels([ex["scene"]])
    ids = torch.tensor([picture_prompt(tok, ex, grid, ours.config.vision.spatial_merge_size)])
    cfg = ours.config
    mm = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()  # the processor's token types
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm).logits
        got = ours(ids, pixel_values=pixels, image_grid_thw=grid).logits
    missing = [k for k in info["missing_keys"] if not k.startswith("mtp.")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    return {"available": True, "version": transformers.__version__, "missing_keys": missing,
            "unexpected_keys": unexpected, "mismatched_keys": [str(k) for k in info.get("mismatched_keys", [])],
            "max_abs_logit_diff": float((ref - got).abs().max()), "logit_scale": float(ref.abs().max()),
            "same_argmax": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def evaluate_all(model_dir: str | Path, per_task: int = 50, text_per_task: int = 50, device: str = "cpu",
                 check_transformers: bool = True) -> dict[str, Any]:
    """Picture questions, the text recipe's evaluation, the transformers check, the folder size."""
    from qwen35.train.embedded import evaluate

    report: dict[str, Any] = {"pictures": evaluate_pictures(model_dir, per_task, device=device)}
    if text_per_task > 0:
        report["text"] = evaluate(model_dir, per_task=text_per_task, device=device)
    if check_transformers:
        report["transformers"] = transformers_check(model_dir)
    report["folder_bytes"] = folder_bytes(model_dir)
    return report


# ----------------------------------------------------------------------------------------------------------------
# entry points


def run_vision_recipe(recipe: VisionRecipe, resume: bool = False, evaluate_after: bool = True,
                      per_task: int = 50, text_per_task: int = 50, log_file: str | Path | None = None
                      ) -> dict[str, Any]:
    """Convert, train, export and (optionally) evaluate; returns the report written to ``out_dir/eval.json``."""
    t0 = time.perf_counter()
    stage = VisionStage(recipe, resume=resume)
    log = None
    if log_file is not None:
        handle = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed below

        def log(rec: Mapping[str, Any]) -> None:
            handle.write(json.dumps(rec) + "\n")
            handle.flush()
    try:
        model_dir = stage.run(log)
    finally:
        if log_file is not None:
            handle.close()
    hist = stage.history
    report: dict[str, Any] = {"steps": stage.step, "wall_seconds": time.perf_counter() - t0,
                              "train_seconds": sum(h["seconds"] for h in hist),
                              "final_eval_loss": stage.evals[-1] if stage.evals else None}
    out = Path(recipe.out_dir)
    if evaluate_after:
        del stage
        report.update(evaluate_all(model_dir, per_task, text_per_task, recipe.device))
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vision-steps", type=int, default=DEFAULT_VISION_STEPS,
                   help=f"optimiser steps of the vision stage (default {DEFAULT_VISION_STEPS})")
    p.add_argument("--picture-batch", type=int, default=VisionRecipe.picture_batch)
    p.add_argument("--text-batch", type=int, default=VisionRecipe.text_batch)
    p.add_argument("--log", metavar="FILE", help="one JSON line per step (default DIR/train_log.jsonl)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen35.train.embedded_vision",
                                description="Give the embedded model a vision tower and train it on pictures.")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder; the checkpoint goes to DIR/model")
    p.add_argument("--base", default=VisionRecipe.base, help="the trained text model folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue the run saved in DIR/checkpoint")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--eval-only", action="store_true", help="only evaluate DIR/model")
    p.add_argument("--per-task", type=int, default=50, help="held-out problems per picture and text task")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args, args.base)


def run_from_args(args: argparse.Namespace, base: str) -> int:
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        report = evaluate_all(out / "model", args.per_task, args.per_task, args.device)
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    else:
        recipe = VisionRecipe(base=str(base), out_dir=str(out), steps=args.vision_steps, threads=args.threads,
                              device=args.device, picture_batch=args.picture_batch, text_batch=args.text_batch)
        out.mkdir(parents=True, exist_ok=True)
        report = run_vision_recipe(recipe, resume=args.resume, evaluate_after=not args.no_eval,
                                   per_task=args.per_task, text_per_task=args.per_task,
                                   log_file=args.log or out / "train_log.jsonl")

    def brief(d: Any) -> Any:
        return {k: brief(v) for k, v in d.items() if k != "samples"} if isinstance(d, dict) else d

    print(json.dumps(brief(report), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["EMBEDDED_TOWER", "DEFAULT_VISION_STEPS", "VisionRecipe", "VisionStage", "PictureBatch",
           "vision_token_ids", "multimodal_body", "to_multimodal", "picture_batch",
           "export_model", "picture_prompt", "evaluate_pictures", "transformers_check", "evaluate_all",
           "run_vision_recipe", "main"]
