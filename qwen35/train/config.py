"""What a training run depends on: :class:`TrainConfig` (one dataclass, saved with every training state, so a
resume can check that nothing that shapes the run has changed), and :class:`RunConfig`, what every resumable
run's config shares (this one, the vision recipe's, RL's)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch

from qwen35.model.mtp import DEFAULT_HIDDEN_SOURCE
from qwen35.train.presets import model_preset


class RunConfig:
    """The shared part of a resumable run's config dataclass: it is saved with the run's state as a plain dict,
    read back with unknown fields refused, and a resume may change only the fields named in ``RESUME_SAFE``."""

    RESUME_SAFE: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if "betas" in d:
            d["betas"] = list(d["betas"])  # JSON has no tuples
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def check_resume(self, saved: Mapping[str, Any]) -> None:
        """Refuse (ValueError naming them) to resume a run saved with ``saved`` (its :meth:`to_dict`) when a field
        outside ``RESUME_SAFE`` differs."""
        now = self.to_dict()
        changed = sorted(k for k in now if k not in self.RESUME_SAFE and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"cannot resume: the saved run used different {', '.join(changed)} "
                             f"(saved {', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")


@dataclass
class TrainConfig(RunConfig):
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


__all__ = ["RunConfig", "TrainConfig"]
