"""The training loop: synthetic chat data -> a small Qwen3.5 (dense or MoE) with its MTP head.

What one run does (:func:`train`):

1. **Data.** ``generate_split`` makes train and held-out conversations; a byte-level BPE is trained on the train
   renders (or read back from ``out_dir/tokenizer`` when resuming); each conversation is rendered with the shipped
   chat template and encoded with its loss mask (assistant spans only, see ``render_with_spans``).
2. **Batches: one example per row, right-padded, length-bucketed.**  Every row starts at position 0 with an empty
   DeltaNet state, exactly as a prompt does at inference, so nothing learned depends on what happened to precede
   an example in a packed row (the model cannot reset its recurrent state inside a row).  Right padding needs no
   attention mask: attention and the delta rule are causal, so padding after a row's last token never reaches
   it; pads are excluded from every loss (loss mask, balance-loss mask).  To keep padding small, each epoch shuffles
   the examples, sorts windows of 32 micro-batches by length, cuts them into micro-batches and shuffles those;
   a micro-batch is padded to its own longest row, not to ``seq_len`` (examples longer than ``seq_len`` are
   dropped and counted).
3. **Loss** = next-token CE + ``mtp_loss_weight`` · MTP CE (token t+2) + ``router_aux_loss_coef`` · balance loss
   (main MoE layers, plus the MTP block's scaled by ``mtp_loss_weight``).  CE is averaged over the step's masked
   target tokens across all ``grad_accum`` micro-batches.
4. **Optimiser:** AdamW (no decay on 1-D parameters: norms, A_log, dt_bias), linear warmup then cosine decay to
   ``min_lr``, global gradient-norm clipping.
5. **State:** every ``save_every`` steps ``out_dir/checkpoint/state.pt`` holds the model (its MTP head
   ``model.mtp`` included), optimiser, scheduler, RNG states, the step (which fixes the data position: the batch
   order is a pure function of seed, epoch and step) and the loss history; resuming from it continues
   bit-identically.
6. **Output:** ``out_dir/model`` (official checkpoint layout with ``mtp.*`` tensors, tokenizer, chat template,
   generation config), ``out_dir/loss_curve.png``, ``out_dir/history.json``.

bf16 autocast is off by default: on CPUs without bf16 matrix units (AVX512-BF16 / AMX) it is slower than
float32 (measured on the project's machine: see the README of :mod:`qwen35.train.embedded`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM
from qwen35.model.mtp import DEFAULT_HIDDEN_SOURCE, MTPHead
from qwen35.model.norm import GatedRMSNorm, RMSNorm
from qwen35.train.losses import load_balancing_loss, mtp_inputs, selected_loss

# ----------------------------------------------------------------------------------------------------------------
# model presets for training (vocab_size is replaced by the trained tokenizer's size)

TINY_MODEL: dict[str, Any] = {
    # the smallest model that still has every mechanism: 3 DeltaNet + 1 attention layer, MoE with shared expert
    "model_type": "qwen3_5_moe_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "router_aux_loss_coef": 0.001,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                        "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "mtp_num_hidden_layers": 1,
}


def model_preset(name: str) -> dict[str, Any]:
    """A training preset's config.json body: "tiny" (tests, smoke runs) or "embedded" (the shipped model)."""
    if name == "tiny":
        return json.loads(json.dumps(TINY_MODEL))
    if name == "embedded":
        from qwen35.train.embedded import EMBEDDED_MODEL  # lazy: embedded imports this module

        return json.loads(json.dumps(EMBEDDED_MODEL))
    raise ValueError(f"unknown training preset {name!r}; known: tiny, embedded")


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Everything a run depends on. Fields marked (resume-safe) may change between a save and a resume."""

    model: str | dict[str, Any] = "tiny"  # a preset name (tiny, embedded) or a config.json body
    steps: int = 200  # optimiser steps (resume-safe: the cosine schedule stretches)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    seq_len: int = 640  # longest example kept, in tokens; batches are padded to their own longest row
    lr: float = 3e-3
    min_lr: float = 3e-4  # end of the cosine decay
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    mtp_loss_weight: float = 0.3  # 0 trains no MTP head
    router_aux_loss_coef: float | None = None  # None = the model config's (0.001 in official configs)
    hidden_source: str = DEFAULT_HIDDEN_SOURCE  # which main-model hidden state the MTP head reads
    eval_every: int = 100  # held-out loss every N steps, and at the end (resume-safe)
    eval_batches: int = 8  # held-out micro-batches per evaluation
    save_every: int = 200  # resumable state every N steps, and at the end (resume-safe)
    seed: int = 0
    bf16_autocast: bool = False
    out_dir: str = "runs/train"  # (resume-safe)
    n_train: int | None = None  # train examples; None = steps x batch (no repeats), fixed at the first start
    n_held_out: int = 256
    vocab_size: int = 2048  # BPE vocabulary (an upper bound: a small corpus may support fewer merges)
    tokenizer_examples: int = 4000  # train examples the BPE is learned from
    data_mix: dict[str, float] | None = None  # task weights (None = qwen35.train.data.DEFAULT_MIX)
    think_prob: float = 0.5  # share of chat examples with thinking on
    init_std: float = 0.02
    threads: int | None = None  # torch.set_num_threads (resume-safe); None = leave as is
    device: str = "cpu"  # where the model trains: "cpu", "cuda", "cuda:1", ... (resume-safe)
    save_dtype: str = "float32"  # dtype of the final checkpoint folder: float32 or bfloat16
    progress: bool = True  # tqdm bar (resume-safe)

    # fields that may differ between the run that saved a state and the one that resumes it
    RESUME_SAFE = ("steps", "eval_every", "save_every", "out_dir", "threads", "progress", "eval_batches",
                   "save_dtype", "device")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def model_body(self) -> dict[str, Any]:
        return model_preset(self.model) if isinstance(self.model, str) else json.loads(json.dumps(self.model))

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "n_held_out"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 3:
            raise ValueError("seq_len must be at least 3 (the MTP loss needs tokens t, t+1, t+2)")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"save_dtype must be float32 or bfloat16, got {self.save_dtype!r}")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a torch device ({e})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this PyTorch build sees no CUDA GPU")


# ----------------------------------------------------------------------------------------------------------------
# model construction and initialisation


def build_model(body: Mapping[str, Any], vocab_size: int, token_ids: Mapping[str, int] | None = None
                ) -> Qwen35ForCausalLM:
    """The model of a config body with the tokenizer's vocabulary size and special ids filled in."""
    d = json.loads(json.dumps(body))
    text = d["text_config"] if "text_config" in d else d
    text["vocab_size"] = vocab_size
    if token_ids is not None:
        # official convention: bos = eos = pad = <|endoftext|> in config.json; <|im_end|> ends a chat turn and
        # is listed in generation_config.json
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            text[key] = token_ids["<|endoftext|>"]
    return Qwen35ForCausalLM(config_from_dict(d, source="training config"))


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Training-from-scratch initialisation as transformers' Qwen3.5 ``_init_weights``:

    linears, convolutions, embeddings, routers and experts ~ N(0, std); zero-centred RMSNorms 0 (scale 1);
    the DeltaNet gated norm 1; A_log = log U(0.01, 16); dt_bias = 1.

    ``Qwen35ForCausalLM.__init__`` leaves PyTorch's defaults on linears (Kaiming-uniform), embeddings
    (N(0, 1): far too large) and the conv, and the router at zero (every token ties across experts), so this
    is needed before training.
    """
    from qwen35.model.deltanet import GatedDeltaNet
    from qwen35.model.moe import Experts, Router

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Router):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, Experts):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)
        elif isinstance(m, RMSNorm):
            nn.init.zeros_(m.weight)
        elif isinstance(m, GatedRMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, GatedDeltaNet):
            m.A_log.copy_(torch.empty_like(m.A_log).uniform_(0.01, 16).log())
            nn.init.ones_(m.dt_bias)


# ----------------------------------------------------------------------------------------------------------------
# data


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
        tok = train_tokenizer(corpus, cfg.vocab_size, tokenizer_dir, chat_template=_template_source())
    train = encode_examples(tok, train_ex, cfg.seq_len)
    held = encode_examples(tok, held_ex, cfg.seq_len)
    if train.dropped:
        warnings.warn(f"{train.dropped} of {n_train} train examples are longer than seq_len={cfg.seq_len} "
                      "tokens and were left out", stacklevel=2)
    if not len(train):
        raise ValueError("no train example fits seq_len")
    return Dataset(tok, train, held, [held_ex[i] for i in held.source])


def _template_source() -> str:
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


# ----------------------------------------------------------------------------------------------------------------
# losses of one micro-batch


@dataclass
class StepLosses:
    main_sum: torch.Tensor
    main_n: int
    mtp_sum: torch.Tensor | None
    mtp_n: int
    balance: torch.Tensor | None  # main MoE layers (transformers' definition)
    mtp_balance: torch.Tensor | None
    mtp_correct: int = 0  # MTP top-1 hits on masked targets (for eval)
    main_correct: int = 0


def forward_losses(model: Qwen35ForCausalLM, head: MTPHead | None, batch: Batch, autocast: bool,
                   count_correct: bool = False) -> StepLosses:
    """Losses of one micro-batch.  The vocabulary projection runs only where a target is learned (the model is
    asked for one position of logits; the rest come from its hidden states), which is the same loss as full
    logits at a fraction of the cost: chat data has a loss mask on about a third of the tokens.

    ``head`` is the MTP head trained with the model: ``model.mtp`` in a run, or one beside a frozen trunk."""
    cfg = model.text_config
    T = batch.ids.shape[1]
    with torch.autocast(batch.ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(batch.ids, logits_to_keep=1)
        keep = batch.loss_mask[:, 1:]  # position t predicts token t+1
        main_sum, main_n, logits = selected_loss(out.hidden_states[:, :-1], keep, batch.ids[:, 1:],
                                                 model.compute_logits)
        res = StepLosses(main_sum, main_n, None, 0, None, None)
        if count_correct:
            res.main_correct = int((logits.argmax(-1) == batch.ids[:, 1:][keep]).sum())
        if cfg.is_moe and out.router_logits:
            res.balance = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                              batch.valid)
        if head is not None and T >= 3:
            hidden, nxt = mtp_inputs(out.hidden_states, batch.ids)
            keep2 = batch.loss_mask[:, 2:]  # MTP position t predicts token t+2
            logits2, _, router = head.draft_with_router(model, hidden, nxt, logits_at=keep2)
            targets2 = batch.ids[:, 2:][keep2]
            res.mtp_n = int(keep2.sum())
            res.mtp_sum = F.cross_entropy(logits2.float(), targets2, reduction="sum") if res.mtp_n else \
                logits2.sum() * 0.0
            if router is not None:
                res.mtp_balance = load_balancing_loss([router], cfg.num_experts, cfg.num_experts_per_tok,
                                                      batch.valid[:, : T - 2])
            if count_correct:
                res.mtp_correct = int((logits2.argmax(-1) == targets2).sum())
    return res


@torch.no_grad()
def evaluate_loss(model: Qwen35ForCausalLM, head: MTPHead | None, batches: Sequence[Batch],
                  autocast: bool = False) -> dict[str, float]:
    """Held-out masked CE of both heads (nats per target token) and top-1 accuracies."""
    was_training = model.training
    model.eval()
    main = mtp = 0.0
    n_main = n_mtp = c_main = c_mtp = 0
    for b in batches:
        r = forward_losses(model, head, b, autocast, count_correct=True)
        main += float(r.main_sum)
        n_main += r.main_n
        c_main += r.main_correct
        if r.mtp_sum is not None:
            mtp += float(r.mtp_sum)
            n_mtp += r.mtp_n
            c_mtp += r.mtp_correct
    model.train(was_training)
    out = {"loss": main / max(n_main, 1), "accuracy": c_main / max(n_main, 1)}
    if n_mtp:
        out.update(mtp_loss=mtp / n_mtp, mtp_accuracy=c_mtp / n_mtp)
    return out


# ----------------------------------------------------------------------------------------------------------------
# optimiser and schedule


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    # weight decay only on matrices (and the 3-D expert / conv weights): decaying norms, A_log or dt_bias
    # would pull them towards values that mean something else (zero-centred norms, decay rates)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimiser step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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
            self._check_resume_config(state["config"])
        elif not resume and (self.out / "checkpoint" / STATE_FILE).exists():
            raise FileExistsError(f"{self.out} holds a training state; resume it (--resume) or choose another "
                                  "out_dir")
        self.data = data if data is not None else prepare_data(cfg, self.out / "tokenizer")
        if data is not None:
            from qwen35.train.bpe import save_tokenizer
            save_tokenizer(self.data.tokenizer, self.out / "tokenizer", chat_template=_template_source())

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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.cfg))
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        rec = {"step": self.step, "loss": main, "lr": lr, "grad_norm": float(grad_norm),
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
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
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

    def _check_resume_config(self, saved: Mapping[str, Any]) -> None:
        now = self.cfg.to_dict()
        changed = [k for k in now if k not in TrainConfig.RESUME_SAFE and saved.get(k) != now[k]]
        if changed:
            raise ValueError(f"cannot resume: the saved run used different {', '.join(sorted(changed))} "
                             f"(saved {', '.join(f'{k}={saved.get(k)!r}' for k in sorted(changed))})")

    def _load_state(self, state: Mapping[str, Any]) -> None:
        weights = dict(state["model"])
        if state.get("mtp") is not None:  # a state written when the head was a separate module
            weights.update({"mtp." + k: v for k, v in state["mtp"].items()})
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
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
        template = _template_source()
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


__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "model_preset", "build_model", "init_weights",
           "prepare_data", "Dataset", "TokenizedSet", "Batch", "BatchStream", "epoch_plan", "collate",
           "eval_batches", "evaluate_loss", "forward_losses", "lr_factor", "make_optimizer", "plot_losses",
           "TINY_MODEL"]
