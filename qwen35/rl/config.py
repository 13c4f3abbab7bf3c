"""What an RL run depends on (:class:`RLConfig`), validated when the run starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen35.train.config import RunConfig

# Tasks with a verifiable single answer and no tool (see qwen35.train.data): the default RL mix.
RL_TASKS: dict[str, float] = {
    "add2": 1.0, "add3": 1.0, "sub2": 1.0, "sub3": 1.0, "count": 1.0, "sort": 1.0, "reverse": 1.0, "upper": 1.0,
    "remove": 1.0, "multi_turn": 0.5,
}
# Tool tasks (multi-turn episodes, qwen35.rl.tools) and the tools each one calls; asked for by name (--tasks).
TOOL_TASKS: dict[str, tuple[str, ...]] = {
    "calculator": ("calculator",), "lookup": ("lookup",), "multi_tool": ("lookup", "calculator"),
}


@dataclass
class RLConfig(RunConfig):
    """One RL run.  Fields marked (resume-safe) may change between a checkpoint and its resume."""

    model: str = "embedded"  # a checkpoint folder, or "embedded" (the model shipped in the package)
    updates: int = 50  # policy updates (optimiser steps) (resume-safe)
    groups_per_update: int = 8  # prompts per update
    group_size: int = 4  # samples per prompt (GRPO group)
    max_new_tokens: int = 256
    mode: str = "async"  # "async": rollouts and training overlap; "sync": generate, then train, alternating
    rollout_actors: int = 1
    steps_per_call: int = 8  # engine steps per rollout-actor call: how often a weight update can reach it
    staleness: int = 1  # k: a sample may train the update after version v - k at the latest
    stale_policy: str = "drop"  # "drop" samples with any token older than k versions, or "mask" those tokens
    lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    clip_eps: float = 0.2  # PPO clip
    tis_clip: float = 2.0  # truncated importance sampling cap (rollout vs trainer)
    kl_coef: float = 0.0  # KL to the starting weights (0: no reference model)
    # a supervised LM loss on replayed examples of qwen35's own training mix (the embedded recipe's data
    # generator, the model folder's tokenizer), weight sft_coef, sft_batch examples per optimiser step: keeps
    # tasks the policy already solves (zero advantage, so no policy gradient) from drifting (0: none)
    sft_coef: float = 0.0
    sft_batch: int = 8
    normalize_std: bool = True  # GRPO advantage / group std
    ppo_epochs: int = 1  # optimiser steps per batch (each one update and one version)
    micro_batch: int = 8  # samples per forward in the trainer
    routing_replay: bool = True  # R3 for MoE models: the trainer's routers take the rollout's experts
    max_tool_rounds: int = 4  # tool tasks: tool rounds per episode before it is stopped (resume-safe)
    tasks: dict[str, float] | None = None  # task weights (None: RL_TASKS)
    think_prob: float = 0.5  # share of prompts with thinking on
    seed: int = 0
    speculative: dict[str, Any] | None = None  # rollout engine speculative_config, e.g. {"method": "mtp", ...}
    max_num_seqs: int = 16  # rollout engine batch
    threads: int = 1  # torch threads per actor (resume-safe)
    trainer_threads: int | None = None  # the trainer actor's, when not ``threads`` (resume-safe)
    out_dir: str = "runs/rl"  # (resume-safe)
    save_every: int = 10  # checkpoint every N updates and at the end (resume-safe)
    save_dtype: str = "float32"  # dtype of the final model folder: float32 or bfloat16 (resume-safe)
    ray_address: str | None = None  # None: a local Ray; else a cluster address (resume-safe)
    progress: bool = True  # tqdm bar (resume-safe)

    RESUME_SAFE = ("updates", "threads", "trainer_threads", "out_dir", "save_every", "save_dtype", "ray_address",
                   "progress", "rollout_actors", "steps_per_call", "max_tool_rounds")

    def task_weights(self) -> dict[str, float]:
        return dict(RL_TASKS if self.tasks is None else self.tasks)

    def validate(self) -> None:
        for name in ("updates", "groups_per_update", "group_size", "max_new_tokens", "rollout_actors",
                     "steps_per_call", "ppo_epochs", "micro_batch", "max_num_seqs", "threads", "save_every",
                     "max_tool_rounds", "sft_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.trainer_threads is not None and (not isinstance(self.trainer_threads, int) or self.trainer_threads < 1):
            raise ValueError(f"trainer_threads must be a positive integer or None, got {self.trainer_threads!r}")
        if self.mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {self.mode!r}")
        if self.stale_policy not in ("drop", "mask"):
            raise ValueError(f"stale_policy must be 'drop' or 'mask', got {self.stale_policy!r}")
        if not isinstance(self.staleness, int) or self.staleness < 0:
            raise ValueError(f"staleness must be an integer >= 0, got {self.staleness!r}")
        if self.normalize_std and self.group_size < 2:
            raise ValueError("group_size must be at least 2 for GRPO advantages (a group of one has no baseline)")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.clip_eps <= 0 or self.tis_clip <= 0:
            raise ValueError(f"clip_eps and tis_clip must be positive, got {self.clip_eps}, {self.tis_clip}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.sft_coef < 0:
            raise ValueError(f"sft_coef must be >= 0, got {self.sft_coef}")
        if not 0.0 <= self.think_prob <= 1.0:
            raise ValueError(f"think_prob must be in [0, 1], got {self.think_prob}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"save_dtype must be float32 or bfloat16, got {self.save_dtype!r}")
        from qwen35.train.data import TASKS

        weights = self.task_weights()
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
        from qwen35.train.data import VERIFIABLE_TASKS

        unverifiable = sorted(t for t, w in weights.items() if w > 0 and t not in VERIFIABLE_TASKS)
        if unverifiable:
            raise ValueError(f"tasks {unverifiable} have no checkable answer, so they give no reward")
        if not any(w > 0 for w in weights.values()):
            raise ValueError("tasks has no task with a positive weight")


__all__ = ["RLConfig", "RL_TASKS", "TOOL_TASKS"]
