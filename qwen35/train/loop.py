"""The training loop: synthetic chat data -> a small Qwen3.5 (dense or MoE) with its MTP head.

The package by concept: :mod:`~qwen35.train.config` (what a run depends on), :mod:`~qwen35.train.presets`
(model shapes), :mod:`~qwen35.train.data` and :mod:`~qwen35.train.bpe` (conversations, tokenizer),
:mod:`~qwen35.train.batches` (tensors, micro-batches, their order), :mod:`~qwen35.train.losses`,
:mod:`~qwen35.train.optim` (optimiser, schedule, step: shared with the vision stage and RL), and here the run
itself; weight initialisation is the model's (:func:`qwen35.model.init_weights`).

What one run does (:func:`train`):

1. **Data.** ``generate_split`` makes train and held-out conversations; a byte-level BPE is trained on the train
   renders (or read back from ``out_dir/tokenizer`` when resuming); each conversation is rendered with the shipped
   chat template and encoded with its loss mask (assistant spans only, see ``render_with_spans``).
2. **Batches:** one example per row, right-padded, length-bucketed (why: :mod:`qwen35.train.batches`).
3. **Loss** = next-token CE + ``mtp_loss_weight`` · MTP CE (token t+2) + ``router_aux_loss_coef`` · balance loss
   (main MoE layers, plus the MTP block's scaled by ``mtp_loss_weight``).  CE is averaged over the step's masked
   target tokens across all ``grad_accum`` micro-batches.
4. **Optimiser:** AdamW (no decay on 1-D parameters: norms, A_log, dt_bias), linear warmup then cosine decay to
   ``min_lr``, global gradient-norm clipping.
5. **State:** every ``save_every`` steps ``out_dir/checkpoint/state.pt`` holds the model (its MTP head
   ``model.mtp`` included), optimiser, RNG states, the step (which fixes the data position: the batch
   order is a pure function of seed, epoch and step) and the loss history; resuming from it continues
   bit-identically.
6. **Output:** ``out_dir/model`` (official checkpoint layout with ``mtp.*`` tensors, tokenizer, chat template,
   generation config), ``out_dir/loss_curve.png``, ``out_dir/history.json``.

bf16 autocast is off by default: on CPUs without bf16 matrix units (AVX512-BF16 / AMX) it is slower than
float32 (measured on the project's machine: see the README of :mod:`qwen35.train.embedded`).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen35.model import Qwen35ForCausalLM, init_weights
from qwen35.model.mtp import MTPHead
from qwen35.train.batches import (
    BatchStream,
    Dataset,
    chat_template_source,
    eval_batches,
    prepare_data,
)
from qwen35.train.config import TrainConfig
from qwen35.train.losses import evaluate_loss, forward_losses
from qwen35.train.optim import make_optimizer, optimizer_step
from qwen35.train.presets import build_model

# ----------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path | None
    history: list[dict[str, Any]]  # one record per step: step, loss, mtp_loss, balance, lr, grad_norm, tokens...
    evals: list[dict[str, Any]]  # one record per evaluation: step, loss, accuracy, mtp_loss, mtp_accuracy
    model: Qwen35ForCausalLM
    head: MTPHead | None  # model.mtp
    data: Dataset
    seconds: float = 0.0  # time spent in optimiser steps in this invocation (evaluation and saving excluded)
    tokens: int = 0  # real (non-pad) tokens processed in this invocation

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


STATE_FILE = "state.pt"


class Trainer:
    """One run; :func:`train` is the usual entry point.  Split into steps so tests and tools can drive it."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, data: Dataset | None = None) -> None:
        cfg.validate()
        cfg = copy.deepcopy(cfg)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        state = self._read_state() if resume else None
        if cfg.n_train is None:
            # fixed once, so that a resume with more steps keeps the data set (and so the batch order) it had
            cfg.n_train = state["config"]["n_train"] if state is not None else \
                cfg.steps * cfg.batch_size * cfg.grad_accum
        self.cfg = cfg
        if state is not None:
            self.cfg.check_resume(state["config"])
        elif not resume and (self.out / "checkpoint" / STATE_FILE).exists():
            raise FileExistsError(f"{self.out} holds a training state; resume it (--resume) or choose another "
                                  "out_dir")
        self.data = data if data is not None else prepare_data(cfg, self.out / "tokenizer")
        if data is not None:
            from qwen35.train.bpe import save_tokenizer
            save_tokenizer(self.data.tokenizer, self.out / "tokenizer", chat_template=chat_template_source())

        tok = self.data.tokenizer
        ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")}
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = build_model(cfg.model_body(), tok.get_vocab_size(), ids)
        init_weights(self.model, cfg.init_std)
        if cfg.mtp_loss_weight > 0:
            # made and initialised after the trunk, then attached as model.mtp: the random stream, so the
            # initial weights, stay those of a trunk and a head drawn one after the other
            head = MTPHead(self.model.text_config, cfg.hidden_source)
            init_weights(head, cfg.init_std)
            self.model.mtp = head
        # initialised on the CPU whatever the device, so a run starts from the same weights everywhere
        self.device = torch.device(cfg.device)
        self.model.to(self.device)
        self.model.train()
        self.params = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)
        self.stream = BatchStream(self.data.train, cfg.batch_size, cfg.seed, self.data.pad_id)
        self.eval_set = [b.to(self.device) for b in
                         eval_batches(self.data.held_out, cfg.batch_size, cfg.eval_batches, self.data.pad_id)]
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        if state is not None:
            self._load_state(state)

    @property
    def head(self) -> MTPHead | None:
        """The MTP head being trained: the model's own ``model.mtp`` (None with ``mtp_loss_weight`` 0)."""
        return self.model.mtp

    def parameters(self) -> Iterator[nn.Parameter]:
        # trunk first, then model.mtp; a tied embedding / lm_head is one parameter, listed once
        return self.model.parameters()

    # ---------------------------------------------------------------------------------------- one step

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        batches = [self.stream[self.step * cfg.grad_accum + j].to(self.device) for j in range(cfg.grad_accum)]
        n_main = sum(int(b.loss_mask[:, 1:].sum()) for b in batches)
        n_mtp = sum(int(b.loss_mask[:, 2:].sum()) for b in batches)
        coef = cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None else \
            self.model.text_config.router_aux_loss_coef
        main = mtp = bal = 0.0
        for b in batches:
            r = forward_losses(self.model, self.head, b, cfg.bf16_autocast)
            loss = r.main_sum / max(n_main, 1)
            main += float(loss.detach())
            if r.mtp_sum is not None:
                part = r.mtp_sum / max(n_mtp, 1)
                mtp += float(part.detach())
                loss = loss + cfg.mtp_loss_weight * part
            if r.balance is not None:
                b_loss = r.balance / cfg.grad_accum
                bal += float(b_loss.detach())
                loss = loss + coef * b_loss
            if r.mtp_balance is not None:
                loss = loss + coef * cfg.mtp_loss_weight * r.mtp_balance / cfg.grad_accum
            loss.backward()
        grad_norm, lr = optimizer_step(self.optimizer, self.params, self.step, cfg)
        self.step += 1
        rec = {"step": self.step, "loss": main, "lr": lr, "grad_norm": grad_norm,
               "tokens": sum(b.tokens for b in batches), "target_tokens": n_main}
        if self.head is not None:
            rec["mtp_loss"] = mtp
        if self.model.text_config.is_moe:
            rec["balance"] = bal
        self.history.append(rec)
        return rec

    def evaluate(self) -> dict[str, Any]:
        rec = {"step": self.step, **evaluate_loss(self.model, self.head, self.eval_set, self.cfg.bf16_autocast)}
        self.evals.append(rec)
        return rec

    # ---------------------------------------------------------------------------------------- the loop

    def run(self, stop_at: int | None = None, final: bool = True) -> TrainResult:
        """Train up to ``stop_at`` steps (default cfg.steps); ``final`` writes the model folder and curve."""
        cfg = self.cfg
        end = min(stop_at or cfg.steps, cfg.steps)
        bar = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        train_seconds = 0.0  # optimiser steps only: evaluation and saving are not part of the throughput
        tokens = 0
        last_eval = None
        while self.step < end:
            t0 = time.perf_counter()
            rec = self.train_step()
            rec["seconds"] = time.perf_counter() - t0
            train_seconds += rec["seconds"]
            tokens += rec["tokens"]
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                last_eval = self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save_state()
            if bar is not None:
                post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{tokens / max(train_seconds, 1e-9):.0f}"}
                if "mtp_loss" in rec:
                    post["mtp"] = f"{rec['mtp_loss']:.3f}"
                if last_eval is not None:
                    post["eval"] = f"{last_eval['loss']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evaluate()
        self.save_state()
        model_dir = None
        if final and self.step >= cfg.steps:
            model_dir = self.export(self.out / "model")
            self.write_history()
            plot_losses(self.history, self.evals, self.out / "loss_curve.png")
        return TrainResult(self.out, model_dir, self.history, self.evals, self.model, self.head, self.data,
                           train_seconds, tokens)

    # ---------------------------------------------------------------------------------------- state

    def save_state(self) -> Path:
        folder = self.out / "checkpoint"
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),  # mtp.* included
            "optimizer": self.optimizer.state_dict(),  # the rate is a function of the step: no scheduler state
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "history": self.history,
            "evals": self.evals,
        }
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, folder / STATE_FILE)  # a crash while writing never leaves a half-written state behind
        return folder / STATE_FILE

    def _read_state(self) -> dict[str, Any] | None:
        path = self.out / "checkpoint" / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no training state to resume from")
        return torch.load(path, map_location="cpu", weights_only=True)

    def _load_state(self, state: Mapping[str, Any]) -> None:
        weights = dict(state["model"])
        if state.get("mtp") is not None:  # a state written when the head was a separate module
            weights.update({"mtp." + k: v for k, v in state["mtp"].items()})
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_python_rng_state(state["python_rng"]))
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.evals = list(state["evals"])

    # ---------------------------------------------------------------------------------------- output

    def export(self, folder: Path) -> Path:
        """The trained model as an official-layout checkpoint folder, MTP included, with tokenizer files."""
        from qwen35.train.bpe import save_tokenizer

        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.save_dtype]
        model = self.model
        if dtype != torch.float32 or self.device.type != "cpu":  # a copy: the training model stays as it is
            model = copy.deepcopy(model).to("cpu", dtype)
            from qwen35.checkpoint import KEEP_FP32
            for name, p in model.named_parameters():
                if name.endswith(KEEP_FP32):  # decay rates stay float32, as official checkpoints store A_log
                    p.data = p.data.float()
        model.save_pretrained(folder)  # model.mtp goes out as the official mtp.* tensors
        tok = self.data.tokenizer
        template = chat_template_source()
        save_tokenizer(tok, folder, chat_template=template)
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
        gen = {"bos_token_id": eos[1], "eos_token_id": eos, "pad_token_id": eos[1], "do_sample": False}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        info = {"steps": self.step, "mtp_hidden_source": self.head.hidden_source if self.head else None,
                "final_eval": self.evals[-1] if self.evals else None, "train_config": self.cfg.to_dict()}
        (folder / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return folder

    def write_history(self) -> None:
        (self.out / "history.json").write_text(json.dumps({"train": self.history, "eval": self.evals}) + "\n")


def _as_python_rng_state(s: Any) -> tuple:
    # torch.save keeps tuples, but be lenient with lists (a state that went through JSON)
    version, internal, gauss = s
    return int(version), tuple(int(x) for x in internal), gauss


def plot_losses(history: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Train loss (raw and smoothed), MTP loss, held-out loss against the step; a PNG via matplotlib's Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    if history:
        steps = [h["step"] for h in history]
        for key, label, color in (("loss", "train", "tab:blue"), ("mtp_loss", "train MTP (t+2)", "tab:orange")):
            ys = [h[key] for h in history if key in h]
            if len(ys) != len(steps):
                continue
            ax.plot(steps, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _ema(ys), color=color, label=label)
    if evals:
        es = [e["step"] for e in evals]
        ax.plot(es, [e["loss"] for e in evals], "o-", color="tab:green", label="held-out")
        if all("mtp_loss" in e for e in evals):
            ax.plot(es, [e["mtp_loss"] for e in evals], "s--", color="tab:red", label="held-out MTP")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ema(xs: Sequence[float], beta: float = 0.95) -> list[float]:
    out, m = [], None
    for i, x in enumerate(xs):
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def train(cfg: TrainConfig, resume: bool = False, data: Dataset | None = None) -> TrainResult:
    """Run (or, with ``resume``, continue) a training run; see the module docstring for what it writes."""
    return Trainer(cfg, resume=resume, data=data).run()


__all__ = ["TrainResult", "Trainer", "train", "plot_losses"]
