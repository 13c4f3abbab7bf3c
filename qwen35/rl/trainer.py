"""The RL trainer: recomputes the policy's logprobs of rollout samples and takes clipped, IS-corrected
policy-gradient steps (qwen35.rl.losses) with qwen35.train's optimiser and schedule.

A batch is samples of several groups.  Each sample becomes one right-padded row: input = prompt + completion
minus its last token, target = the next token; the loss is taken at the completion's positions that its loss mask
keeps.  Right padding needs no attention mask (attention and the delta rule are causal), exactly as in
qwen35.train.  With routing replay (MoE, R3) every input position's routers take the experts the rollout engine
chose there (``Sample.routing``); padding positions take experts 0..k-1 (they reach no real token).

With ``sft_coef`` > 0 each optimiser step also takes a supervised LM loss on a batch of replayed examples of
the model's training mix (PPO-ptx in InstructGPT's terms): problems the policy already solves give groups of
equal rewards, hence zero advantage and no gradient, and without an anchor they drift as other tasks train.

The MTP block (``model.mtp``) is frozen: RL trains the main model only.  Its drafts then drift from the main
model's choices, which lowers speculative acceptance but never changes what is sampled.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from qwen35.rl.config import RLConfig
from qwen35.rl.losses import policy_loss, token_logprobs
from qwen35.rl.rollout import Sample, moe_routers, replay_routing
from qwen35.train.batches import BatchStream, prepare_data
from qwen35.train.losses import forward_losses
from qwen35.train.optim import OptimConfig, make_optimizer, optimizer_step


def optim_config(cfg: RLConfig) -> OptimConfig:
    """qwen35.train's optimiser and schedule settings of an RL run: one optimiser step per PPO epoch of each
    update."""
    return OptimConfig(steps=cfg.updates * cfg.ppo_epochs, lr=cfg.lr, min_lr=cfg.min_lr,
                       warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                       grad_clip=cfg.grad_clip)


SFT_POOL = 4096  # replayed examples generated per run (batches cycle through them, reshuffled each pass)


def sft_stream(cfg: RLConfig, tokenizer_dir: str | None) -> BatchStream:
    """The supervised replay batches of a run: examples of the embedded recipe's training mix (with thinking as
    often as the recipe), encoded with the model folder's tokenizer, ``sft_batch`` per optimiser step; batch k
    is a function of (seed, k), so a resumed run replays what the interrupted one would have."""
    if tokenizer_dir is None:
        raise ValueError("sft_coef > 0 needs the model folder (its tokenizer encodes the replayed examples)")
    from qwen35.train.embedded import recipe_config

    # a fixed pool, not one sized by ``updates`` (which a resume may raise): the same examples either way
    tcfg = recipe_config(".", steps=1, threads=None, batch_size=cfg.sft_batch, n_train=SFT_POOL, n_held_out=1,
                         seed=cfg.seed + 7919)
    data = prepare_data(tcfg, tokenizer_dir)
    return BatchStream(data.train, cfg.sft_batch, tcfg.seed, data.pad_id)


class RLTrainer:
    """Owns the policy being trained, its optimiser and its version (the number of updates done)."""

    def __init__(self, model, cfg: RLConfig, vocab_limit: int | None = None,
                 tokenizer_dir: str | None = None) -> None:
        self.cfg = cfg
        self.model = model.float().train()
        self.vocab_limit = vocab_limit
        for name, p in self.model.named_parameters():
            p.requires_grad_(not name.startswith("mtp."))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = optim_config(cfg)
        self.optimizer = make_optimizer(self.params, self.optim)
        self.optim_steps = 0  # optimiser steps taken: they fix the learning rate
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = copy.deepcopy(self.model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.sft = sft_stream(cfg, tokenizer_dir) if cfg.sft_coef > 0 else None
        self.replay = cfg.routing_replay and bool(moe_routers(self.model))
        self.version = 0
        self.busy_seconds = 0.0

    # -- batches --------------------------------------------------------------------------------------------
    def _rows(self, samples: Sequence[Sample], masks: Sequence[Sequence[bool]] | None = None):
        """(input_ids [B, T], targets [B, T], keep [B, T], routing [layers, B·T, k] or None) of samples."""
        lengths = [len(s.prompt_ids) + len(s.completion_ids) - 1 for s in samples]
        B, T = len(samples), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        targets = torch.zeros(B, T, dtype=torch.long)
        keep = torch.zeros(B, T, dtype=torch.bool)
        routing = None
        if self.replay:
            k = self.model.text_config.num_experts_per_tok
            layers = len(moe_routers(self.model))
            routing = torch.arange(k, dtype=torch.long).expand(layers, B, T, k).clone()
        for r, (s, n) in enumerate(zip(samples, lengths)):
            full = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
            ids[r, :n] = full[:-1]
            targets[r, :n] = full[1:]
            P = len(s.prompt_ids)
            m = masks[r] if masks is not None else s.loss_mask
            keep[r, P - 1:n] = torch.tensor(list(m), dtype=torch.bool)
            if routing is not None:
                if s.routing is None or s.routing.shape[1] != n:
                    raise ValueError(f"sample {s.group}/{s.index} has no routing for its {n} positions; the rollout "
                                     "must record routing when the trainer replays it")
                routing[:, r, :n] = s.routing.long()
        if routing is not None:
            routing = routing.reshape(routing.shape[0], B * T, -1)
        return ids, targets, keep, routing

    def _logprobs(self, model, samples: Sequence[Sample], masks=None) -> torch.Tensor:
        ids, targets, keep, routing = self._rows(samples, masks)
        dev = next(model.parameters()).device
        with replay_routing(model, routing.to(dev) if routing is not None else None):
            return token_logprobs(model, ids.to(dev), targets.to(dev), keep.to(dev), self.vocab_limit)

    @torch.no_grad()
    def logprobs(self, samples: Sequence[Sample]) -> list[list[float]]:
        """The current policy's logprob of every completion token of each sample (no gradient)."""
        out = []
        for s in samples:
            lp = self._logprobs(self.model, [s], [[True] * len(s.completion_ids)])
            out.append(lp.tolist())
        return out

    # -- one update -----------------------------------------------------------------------------------------
    def train_step(self, samples: Sequence[Sample], advantages: Sequence[float],
                   masks: Sequence[Sequence[bool]] | None = None) -> dict[str, Any]:
        """One update: ``ppo_epochs`` optimiser steps on the samples (each its advantage; ``masks`` overrides
        their loss masks, e.g. to drop too-old tokens); the version advances by one."""
        t0 = time.perf_counter()
        cfg = self.cfg
        masks = [list(m) for m in masks] if masks is not None else [list(s.loss_mask) for s in samples]
        chunks = [list(range(i, min(i + cfg.micro_batch, len(samples)))) for i in range(0, len(samples),
                                                                                     cfg.micro_batch)]
        total = sum(sum(m) for m in masks)
        if total == 0:
            raise ValueError("no token to train: every completion token is masked out")

        def flat(idx, values):
            return torch.cat([torch.full((sum(masks[i]),), float(values[i])) for i in idx])

        def behaviour(idx):
            return torch.cat([torch.tensor([lp for lp, m in zip(samples[i].logprobs, masks[i]) if m])
                              for i in idx])

        prox = ref = None
        if cfg.ppo_epochs > 1:
            with torch.no_grad():
                prox = [self._logprobs(self.model, [samples[i] for i in c], [masks[i] for i in c]) for c in chunks]
        if self.reference is not None:
            with torch.no_grad():
                ref = [self._logprobs(self.reference, [samples[i] for i in c], [masks[i] for i in c])
                       for c in chunks]
        stats: dict[str, Any] = {}
        for epoch in range(cfg.ppo_epochs):
            agg: dict[str, float] = {}
            loss_total = 0.0
            for j, c in enumerate(chunks):
                lp = self._logprobs(self.model, [samples[i] for i in c], [masks[i] for i in c])
                res = policy_loss(lp, behaviour(c), flat(c, advantages), torch.ones_like(lp, dtype=torch.bool),
                                  proximal_logp=prox[j] if prox is not None else None, clip_eps=cfg.clip_eps,
                                  tis_clip=cfg.tis_clip, ref_logp=ref[j] if ref is not None else None,
                                  kl_coef=cfg.kl_coef)
                (res.loss_sum / total).backward()
                loss_total += float(res.loss_sum.detach()) / total
                n = res.tokens
                for key, v in res.stats.items():
                    if key.endswith("_max"):
                        agg[key] = max(agg.get(key, -math.inf), v)
                    elif key != "tokens":
                        agg[key] = agg.get(key, 0.0) + v * n
            for key in list(agg):
                if not key.endswith("_max"):
                    agg[key] /= total
            if self.sft is not None:  # the replayed supervised batch of this optimiser step
                sft = forward_losses(self.model, None, self.sft[self.optim_steps])
                (cfg.sft_coef * sft.main_sum / max(sft.main_n, 1)).backward()
                agg["sft_loss"] = float(sft.main_sum.detach()) / max(sft.main_n, 1)
            grad_norm, lr = optimizer_step(self.optimizer, self.params, self.optim_steps, self.optim)
            self.optim_steps += 1
            stats = {**agg, "loss": loss_total, "grad_norm": grad_norm, "lr": lr, "tokens": total}
        self.version += 1
        stats["version"] = self.version
        self.busy_seconds += time.perf_counter() - t0
        stats["train_seconds"] = time.perf_counter() - t0
        return stats

    # -- weights and state ----------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout_weights(self) -> dict[str, torch.Tensor]:
        """The trained weights (MTP block left out: it does not change), as CPU tensors for the object store."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                if not k.startswith("mtp.")}

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "optim_steps": self.optim_steps, "version": self.version,
                "reference": self.reference.state_dict() if self.reference is not None else None,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optim_steps = int(state["optim_steps"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])
        self.version = int(state["version"])
        torch.set_rng_state(state["torch_rng"])
        version, internal, gauss = state["python_rng"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))


__all__ = ["RLTrainer"]
