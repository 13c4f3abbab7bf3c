"""Training data as tensors: encoded examples, their micro-batches, and the order a run visits them in.

**One example per row, right-padded, length-bucketed.**  Every row starts at position 0 with an empty DeltaNet
state, exactly as a prompt does at inference, so nothing learned depends on what happened to precede an example
in a packed row (the model cannot reset its recurrent state inside a row).  Right padding needs no attention
mask: attention and the delta rule are causal, so padding after a row's last token never reaches it; pads are
excluded from every loss (loss mask, balance-loss mask).  To keep padding small, each epoch shuffles the
examples, sorts windows of :data:`BUCKET_WINDOW` micro-batches by length, cuts them into micro-batches and
shuffles those; a micro-batch is padded to its own longest row, not to ``seq_len`` (examples longer than
``seq_len`` are dropped and counted).  The order is a pure function of (seed, epoch), so micro-batch k of a run
is the same in every process and after a resume.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen35.train.config import TrainConfig


@dataclass
class TokenizedSet:
    """Encoded examples: ids and per-token loss masks, one 1-D tensor per example."""

    ids: list[torch.Tensor]
    masks: list[torch.Tensor]
    tasks: list[str]
    source: list[int]  # index of each kept example in the list it was encoded from
    dropped: int = 0  # examples longer than seq_len, left out

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] long, right-padded
    loss_mask: torch.Tensor  # [B, T] bool: target tokens to learn
    valid: torch.Tensor  # [B, T] bool: real tokens (not padding)

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.ids.to(device), self.loss_mask.to(device), self.valid.to(device))


def encode_examples(tok, examples: Sequence[dict[str, Any]], seq_len: int) -> TokenizedSet:
    from qwen35.train.bpe import encode_with_mask
    from qwen35.train.data import render_with_spans

    out = TokenizedSet([], [], [], [])
    for i, ex in enumerate(examples):
        text, spans = render_with_spans(ex)
        ids, mask = encode_with_mask(tok, text, spans)
        if len(ids) > seq_len:
            out.dropped += 1
            continue
        out.ids.append(torch.tensor(ids, dtype=torch.long))
        out.masks.append(torch.tensor(mask, dtype=torch.bool))
        out.tasks.append(ex["task"])
        out.source.append(i)
    return out


@dataclass
class Dataset:
    tokenizer: Any  # tokenizers.Tokenizer
    train: TokenizedSet
    held_out: TokenizedSet
    held_out_examples: list[dict[str, Any]]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_to_id("<|endoftext|>")


def prepare_data(cfg: TrainConfig, tokenizer_dir: str | os.PathLike | None = None) -> Dataset:
    """Generate, (train or load the tokenizer,) render and encode. A function of cfg alone, so a resumed run
    rebuilds exactly the data the interrupted one used."""
    from tokenizers import Tokenizer

    from qwen35.train.bpe import train_tokenizer
    from qwen35.train.data import generate_split, render_example

    n_train = cfg.n_train if cfg.n_train is not None else cfg.steps * cfg.batch_size * cfg.grad_accum
    train_ex, held_ex = generate_split(n_train, cfg.n_held_out, cfg.seed, cfg.data_mix, think_prob=cfg.think_prob)
    tok_file = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir is not None else None
    if tok_file is not None and tok_file.exists():
        tok = Tokenizer.from_file(str(tok_file))
    else:
        corpus = [render_example(ex) for ex in train_ex[: cfg.tokenizer_examples]]
        tok = train_tokenizer(corpus, cfg.vocab_size, tokenizer_dir, chat_template=chat_template_source())
    train = encode_examples(tok, train_ex, cfg.seq_len)
    held = encode_examples(tok, held_ex, cfg.seq_len)
    if train.dropped:
        warnings.warn(f"{train.dropped} of {n_train} train examples are longer than seq_len={cfg.seq_len} "
                      "tokens and were left out", stacklevel=2)
    if not len(train):
        raise ValueError("no train example fits seq_len")
    return Dataset(tok, train, held, [held_ex[i] for i in held.source])


def chat_template_source() -> str:
    """The chat template every trained tokenizer and model folder carries: the project's default one."""
    from qwen35.chat.template import default_template_source

    return default_template_source()


BUCKET_WINDOW = 32  # micro-batches whose examples are sorted by length together


def epoch_plan(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches (lists of example indices) of one epoch; a pure function of its arguments."""
    rng = random.Random(f"qwen35-train:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    window = batch_size * BUCKET_WINDOW
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class BatchStream:
    """Micro-batch k of the run (k = step · grad_accum + j): epochs follow each other, each with its own order."""

    def __init__(self, data: TokenizedSet, batch_size: int, seed: int, pad_id: int) -> None:
        self.data, self.batch_size, self.seed, self.pad_id = data, batch_size, seed, pad_id
        self.lengths = data.lengths()
        self._plans: dict[int, list[list[int]]] = {}

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: epoch_plan(self.lengths, self.batch_size, self.seed, epoch)}
        return self._plans[epoch]

    def indices(self, k: int) -> list[int]:
        per_epoch = len(self._plan(0))
        return self._plan(k // per_epoch)[k % per_epoch]

    def __getitem__(self, k: int) -> Batch:
        return collate(self.data, self.indices(k), self.pad_id)


def collate(data: TokenizedSet, idx: Sequence[int], pad_id: int) -> Batch:
    T = max(len(data.ids[i]) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    valid = torch.zeros(len(idx), T, dtype=torch.bool)
    for r, i in enumerate(idx):
        n = len(data.ids[i])
        ids[r, :n] = data.ids[i]
        mask[r, :n] = data.masks[i]
        valid[r, :n] = True
    return Batch(ids, mask, valid)


def eval_batches(data: TokenizedSet, batch_size: int, n_batches: int, pad_id: int) -> list[Batch]:
    """A fixed held-out sample: every k-th example (so all tasks appear), sorted by length to limit padding."""
    n = min(len(data), batch_size * n_batches)
    stride = max(1, len(data) // max(n, 1))
    idx = sorted(list(range(0, len(data), stride))[:n], key=lambda i: len(data.ids[i]))
    return [collate(data, idx[b:b + batch_size], pad_id) for b in range(0, len(idx), batch_size)]


__all__ = ["TokenizedSet", "Batch", "encode_examples", "Dataset", "prepare_data", "chat_template_source",
           "BUCKET_WINDOW", "epoch_plan", "BatchStream", "collate", "eval_batches"]
