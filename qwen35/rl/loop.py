"""The RL loop on Ray: rollout actors on qwen35's engine, a trainer actor on qwen35.train, a driver between them.

    driver ── prompts (TaskPrompts) ──> rollout actors (RolloutWorker: engine, logprobs, versions, routing)
       │  <── finished groups ───────────┘        ^
       │  rewards, GRPO advantages,                │ set_weights(state, version): in place, between engine steps
       │  staleness filter                         │ (state dict through the object store; no restart)
       └── train_step(samples) ──> trainer actor (RLTrainer) ── new weights ──┘

**Asynchronous mode** (default): rollout actors always have work (up to ``(k + 1) · groups_per_update`` groups not
yet trained are in flight), the trainer trains whenever a batch is ready, and new weights reach each rollout actor
at its next call (every ``steps_per_call`` engine steps).  A group in flight during an update finishes under the
new weights (a *partial rollout*): each of its tokens carries the version that sampled it and that version's
logprob.  **Staleness**: the update from version v takes a sample only if every token of it is at least version
v - k (``stale_policy="drop"``: otherwise the whole group is dropped and counted) or, with ``"mask"``, masks the
older tokens out of the loss.  Within the bound, the truncated IS weight min(π_trainer/μ, C) re-weights each
token for the version and program it was sampled with.  **Synchronous mode**: generate one batch with the current
weights, train on it, push, repeat -- the baseline the benchmark compares with.

**Fault recovery.**  A rollout actor that dies (killed, crashed) is replaced by a new one with the current
weights, and the groups it held are generated again from their prompts (same index, same seed).  The trainer
checkpoints every ``save_every`` updates (model, optimiser, schedule, version, RNG states, the prompt-stream
position and the groups in flight, the log) and :func:`run_rl` with ``resume=True`` continues from there: in
synchronous mode bit-identically (sampling is seeded per group); asynchronously with the same state, though which
groups land in which update then depends on timing, as in any asynchronous run.

**Tool tasks** (calculator, lookup, multi_tool) are multi-turn episodes run inside the rollout actors
(qwen35.rl.tools, :class:`qwen35.rl.rollout.RolloutWorker`): tool calls run in the actor's :class:`ToolEnv`, their
results are inserted into the sample with loss mask False, and the reward reads the answer after the last round.

Output in ``out_dir``: ``log.jsonl`` (one record per update: reward, per-task reward, loss, KL, staleness, IS
weights, trainer/rollout mismatch, busy time per actor, restarts), ``reward_curve.png``, ``actor_time.png``,
``checkpoint/state.pt``, and ``model/`` (the trained weights with the tokenizer files of the starting model).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen35.rl.config import TOOL_TASKS, RLConfig
from qwen35.rl.rewards import RewardFn, TaskPrompts, exact_match_reward
from qwen35.rl.tools import ToolEnv, default_tool_env

STATE_FILE = "state.pt"


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("qwen35 rl needs Ray: pip install 'qwen35[rl]' (or pip install 'ray>=2.9')") from None
    return ray


def resolve_model(name: str) -> Path:
    """"embedded" -> the model shipped in the package; anything else is a checkpoint folder."""
    if name == "embedded":
        from qwen35.llm import default_model_path

        return default_model_path()
    path = Path(name)
    if not (path / "config.json").exists():
        raise ValueError(f"{name}: not a checkpoint folder (no config.json); give a folder or 'embedded'")
    if not (path / "tokenizer.json").exists():
        raise ValueError(f"{name}: the checkpoint has no tokenizer.json; RL needs the tokenizer to render prompts")
    return path


def group_seed(seed: int, group: int) -> int:
    """The sampling seed of a group (sample i draws from seed + i): the same on every actor and after a resume."""
    return (seed * 10_000_019 + group * 1024) % (2 ** 31)


# ----------------------------------------------------------------------------------------------------------------
# the actors (plain classes; ray.remote wraps them in their own processes)


class RolloutActor:
    def __init__(self, model_dir: str, cfg: dict[str, Any], tool_env=None) -> None:
        import torch

        from qwen35.chat import Tokenizer
        from qwen35.checkpoint import load_model
        from qwen35.engine import EngineConfig
        from qwen35.engine.speculative import SpeculativeConfig
        from qwen35.rl.rollout import RolloutWorker

        torch.set_num_threads(cfg["threads"])
        model = load_model(model_dir, dtype="float32")
        engine = EngineConfig(max_num_seqs=cfg["max_num_seqs"],
                              speculative_config=SpeculativeConfig.parse(cfg["speculative"]))
        self.worker = RolloutWorker(model, Tokenizer(model_dir), engine, record_routing=cfg["routing_replay"],
                                    tool_env=tool_env, max_tool_rounds=cfg["max_tool_rounds"])
        self.n, self.max_tokens = cfg["group_size"], cfg["max_new_tokens"]

    def pid(self) -> int:
        return os.getpid()

    def set_weights(self, state, version: int) -> tuple[float, float]:
        t0 = time.time()
        self.worker.set_weights(state, version)
        return t0, time.time()

    def submit(self, groups: list[tuple[int, list[int], int, Any]]) -> None:
        from qwen35.rl.rollout import rollout_params

        for g, ids, seed, chat in groups:  # chat: a tool task's ChatContext, else None
            self.worker.submit(g, ids, rollout_params(self.n, self.max_tokens, seed), chat)

    def run(self, max_steps: int | None):
        t0 = time.time()
        done = self.worker.run(max_steps)
        return done, (t0, time.time())


class TrainerActor:
    def __init__(self, model_dir: str, cfg: dict[str, Any], vocab_limit: int | None) -> None:
        import torch

        from qwen35.checkpoint import load_model
        from qwen35.rl.trainer import RLTrainer

        self.cfg = RLConfig.from_dict(cfg)
        torch.set_num_threads(self.cfg.trainer_threads or self.cfg.threads)
        self.model_dir = model_dir
        self.trainer = RLTrainer(load_model(model_dir, dtype="float32"), self.cfg, vocab_limit, model_dir)

    def pid(self) -> int:
        return os.getpid()

    def train_step(self, samples, advantages, masks):
        t0 = time.time()
        stats = self.trainer.train_step(samples, advantages, masks)
        stats["interval"] = (t0, time.time())
        return stats, self.trainer.rollout_weights()

    def weights(self):
        return self.trainer.rollout_weights()

    def version(self) -> int:
        return self.trainer.version

    def save(self, path: str, driver: dict[str, Any]) -> tuple[float, float]:
        import torch

        t0 = time.time()
        state = {"trainer": self.trainer.state(), "driver": driver, "config": self.cfg.to_dict()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # never a half-written state
        return t0, time.time()

    def load(self, path: str) -> dict[str, Any]:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
        self.trainer.load_state(state["trainer"])
        return state["driver"]

    def export(self, folder: str, dtype: str) -> str:
        import copy
        import shutil

        import torch

        from qwen35.checkpoint import KEEP_FP32

        out = Path(folder)
        if out.exists():
            shutil.rmtree(out)
        model = self.trainer.model
        if dtype == "bfloat16":
            model = copy.deepcopy(model).to(torch.bfloat16)
            for name, p in model.named_parameters():
                if name.endswith(KEEP_FP32):  # decay rates stay float32, as official checkpoints store A_log
                    p.data = p.data.float()
        model.save_pretrained(out, tokenizer_from=self.model_dir)
        for extra in ("chat_template.jinja", "generation_config.json"):
            src = Path(self.model_dir) / extra
            if src.exists() and not (out / extra).exists():
                shutil.copy(src, out / extra)
        return str(out)


# ----------------------------------------------------------------------------------------------------------------
# staleness


def stale_masks(groups: list[list[Any]], version: int, k: int, policy: str
                ) -> tuple[list[list[Any]], list[list[list[bool]]], int]:
    """Which groups (and tokens) the update from ``version`` may train on, under bound ``k``.

    Returns (kept groups, their per-sample loss masks, how many groups were dropped).  ``drop``: a group with any
    token older than version - k is dropped whole.  ``mask``: such tokens are masked out; a group left with no
    token to learn is dropped."""
    floor = version - k
    kept, masks, dropped = [], [], 0
    for g in groups:
        if policy == "drop":
            if min(s.oldest_version for s in g) < floor:
                dropped += 1
                continue
            kept.append(g)
            masks.append([list(s.loss_mask) for s in g])
        else:
            m = [[bool(keep and v >= floor) for keep, v in zip(s.loss_mask, s.versions)] for s in g]
            if not any(any(x) for x in m):
                dropped += 1
                continue
            kept.append(g)
            masks.append(m)
    return kept, masks, dropped


# ----------------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class RLResult:
    out_dir: Path
    model_dir: Path | None
    history: list[dict[str, Any]]
    wall_seconds: float
    busy: dict[str, float]  # seconds each actor spent working
    restarts: int = 0
    intervals: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)

    def busy_fraction(self) -> dict[str, float]:
        return {k: v / self.wall_seconds for k, v in self.busy.items()} if self.wall_seconds else {}


class RLRun:
    """One run; :func:`run_rl` is the usual entry point.  ``callback(run, event)`` is called after every returned
    rollout call ("rollout") and every update ("update"): tools and tests can inspect the run (or kill an actor)."""

    def __init__(self, cfg: RLConfig, reward_fn: RewardFn | None = None, resume: bool = False,
                 callback: Callable[[RLRun, str], None] | None = None, tool_env: ToolEnv | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.reward_fn = reward_fn or exact_match_reward
        self.tool_env = tool_env if tool_env is not None else default_tool_env()
        for task, w in cfg.task_weights().items():
            missing = [t for t in TOOL_TASKS.get(task, ()) if w > 0 and t not in self.tool_env]
            if missing:
                raise ValueError(f"task {task} calls the tools {', '.join(missing)}, which the tool environment "
                                 f"does not have (it has {', '.join(self.tool_env.names)})")
        self.callback = callback
        self.resume = resume
        self.model_dir = resolve_model(cfg.model)
        self.out = Path(cfg.out_dir)
        self.state_path = self.out / "checkpoint" / STATE_FILE
        if resume and not self.state_path.exists():
            raise FileNotFoundError(f"{self.state_path}: no RL state to resume from")
        if not resume and self.state_path.exists():
            raise FileExistsError(f"{self.out} holds an RL state; resume it (--resume) or choose another out_dir")
        from qwen35.chat import Tokenizer

        self.tokenizer = Tokenizer(self.model_dir)
        self.prompts = TaskPrompts(self.tokenizer, cfg.task_weights(), cfg.seed, cfg.think_prob)
        self.version = 0
        self.next_group = 0
        self.requeue: deque[int] = deque()
        self.history: list[dict[str, Any]] = []
        self.restarts = 0
        self.dropped_groups = 0
        self.busy: dict[str, float] = {}
        self.intervals: dict[str, list[tuple[str, float, float]]] = {}

    # -- actors ---------------------------------------------------------------------------------------------
    def _actor_cfg(self) -> dict[str, Any]:
        c = self.cfg
        return {"threads": c.threads, "max_num_seqs": c.max_num_seqs, "speculative": c.speculative,
                "routing_replay": c.routing_replay, "group_size": c.group_size, "max_new_tokens": c.max_new_tokens,
                "max_tool_rounds": c.max_tool_rounds}

    def _env(self, threads: int | None = None) -> dict[str, Any]:
        t = str(threads or self.cfg.threads)
        return {"env_vars": {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}}

    def _new_rollout_actor(self, i: int):
        ray = self.ray
        cls = ray.remote(num_cpus=1, max_restarts=0, runtime_env=self._env())(RolloutActor)
        actor = cls.options(name=None).remote(str(self.model_dir), self._actor_cfg(), self.tool_env)
        self.rollouts[i] = actor
        self.assigned[i] = set()
        self.actor_version[i] = 0
        self.weight_calls[i] = []
        return actor

    def _note(self, who: str, kind: str, interval: tuple[float, float]) -> None:
        t0, t1 = interval
        self.busy[who] = self.busy.get(who, 0.0) + (t1 - t0)
        self.intervals.setdefault(who, []).append((kind, t0, t1))

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> RLResult:
        ray = self.ray = _ray()
        started_ray = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.cfg.ray_address is None:
                kw["num_cpus"] = max(2, self.cfg.rollout_actors + 1)
            ray.init(address=self.cfg.ray_address, **kw)
            started_ray = True
        try:
            return self._run()
        finally:
            for a in getattr(self, "rollouts", {}).values():
                ray.kill(a)
            if getattr(self, "trainer", None) is not None:
                ray.kill(self.trainer)
            if started_ray:
                ray.shutdown()

    def _run(self) -> RLResult:
        ray, cfg = self.ray, self.cfg
        vocab = len(self.tokenizer)
        tcls = ray.remote(num_cpus=1, max_restarts=0, runtime_env=self._env(cfg.trainer_threads))(TrainerActor)
        self.trainer = tcls.remote(str(self.model_dir), cfg.to_dict(), vocab)
        self.rollouts: dict[int, Any] = {}
        self.assigned: dict[int, set[int]] = {}
        self.actor_version: dict[int, int] = {}
        self.weight_calls: dict[int, list[Any]] = {}
        for i in range(cfg.rollout_actors):
            self._new_rollout_actor(i)
        self.weights_ref = None
        if self.resume:
            driver = ray.get(self.trainer.load.remote(str(self.state_path)))
            self.cfg.check_resume(driver["config"])
            self.version = driver["version"]
            self.next_group = driver["next_group"]
            self.requeue = deque(driver["pending"])
            self.history = list(driver["history"])
            self.restarts = driver["restarts"]
            self.dropped_groups = driver["dropped_groups"]
            if self.version > 0:
                self.weights_ref = self.trainer.weights.remote()
        # the actors load the model in their constructors: wait for them, so the wall time is the loop's own
        ray.get([self.trainer.pid.remote()] + [a.pid.remote() for a in self.rollouts.values()])
        self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "log.jsonl", "a" if self.resume else "w", encoding="utf-8")
        bar = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.updates, initial=self.version, desc=f"rl ({cfg.mode})", unit="update",
                       dynamic_ncols=True)
        self.buffer: list[list[Any]] = []
        self.examples: dict[int, dict[str, Any]] = {}
        runs: dict[Any, int] = {}  # in-flight run() future -> actor index
        train_future = None
        train_groups: list[list[Any]] = []
        t_start = time.time()
        saves = []
        try:
            while self.version < cfg.updates:
                if cfg.mode == "async" or train_future is None:
                    self._dispatch()
                for i, actor in self.rollouts.items():
                    if self.assigned[i] and i not in runs.values():
                        self._push_weights(i)
                        runs[actor.run.remote(cfg.steps_per_call)] = i
                if train_future is None:
                    batch = self._take_batch()
                    if batch is not None:
                        train_groups, samples, advantages, masks, info = batch
                        stats_ref, weights_ref = self.trainer.train_step.options(num_returns=2).remote(
                            samples, advantages, masks)
                        train_future = (stats_ref, weights_ref, info)
                waiting = list(runs) + ([train_future[0]] if train_future is not None else [])
                if not waiting:
                    raise RuntimeError("the RL loop has nothing to wait for (no rollout in flight, no update)")
                ready, _ = ray.wait(waiting, num_returns=1)
                ref = ready[0]
                if train_future is not None and ref == train_future[0]:
                    stats = ray.get(ref)
                    self.weights_ref = train_future[1]
                    rec = self._record(stats, train_future[2], t_start)
                    train_future = None
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if bar is not None:
                        bar.set_postfix({"reward": f"{rec['reward']:.3f}", "stale": rec["staleness_max"]},
                                        refresh=False)
                        bar.update(1)
                    if self.version % cfg.save_every == 0 or self.version == cfg.updates:
                        saves.append(self.trainer.save.remote(str(self.state_path), self._driver_state()))
                    if self.callback is not None:
                        self.callback(self, "update")
                    continue
                i = runs.pop(ref)
                try:
                    groups, interval = ray.get(ref)
                except ray.exceptions.RayActorError:  # died (killed, crashed): replace it, re-queue its work
                    self._replace(i)
                    continue
                self._note(f"rollout-{i}", "generate", interval)
                for t0, t1 in ray.get(self.weight_calls[i]):  # ran before this call: done
                    self._note(f"rollout-{i}", "weights", (t0, t1))
                self.weight_calls[i] = []
                for g in groups:
                    gid = g[0].group
                    self.assigned[i].discard(gid)
                    ex = self.examples[gid]
                    for s in g:
                        s.reward = float(self.reward_fn(ex, s.text))
                        s.info["task"] = ex["task"]
                    self.buffer.append(g)
                if self.callback is not None:
                    self.callback(self, "rollout")
        finally:
            if bar is not None:
                bar.close()
            log.close()
        for t0, t1 in ray.get(saves):
            self._note("trainer", "checkpoint", (t0, t1))
        wall = time.time() - t_start
        model_dir = Path(ray.get(self.trainer.export.remote(str(self.out / "model"), cfg.save_dtype)))
        result = RLResult(self.out, model_dir, self.history, wall, dict(self.busy), self.restarts,
                          {k: list(v) for k, v in self.intervals.items()})
        from qwen35.rl.plots import plot_actor_time, plot_rewards

        plot_rewards(self.history, self.out / "reward_curve.png")
        plot_actor_time(result, self.out / "actor_time.png")
        return result

    # -- pieces of the loop ---------------------------------------------------------------------------------
    def _in_flight(self) -> int:
        return sum(len(a) for a in self.assigned.values()) + len(self.buffer)

    def _dispatch(self) -> None:
        """Give rollout actors groups: asynchronously up to (k + 1) batches not yet trained; synchronously one
        batch, once the previous one is trained and its weights are out."""
        cfg = self.cfg
        G = cfg.groups_per_update
        # sync: the caller dispatches only while no update runs, so this is the next batch (or, after an actor
        # died, the groups it lost)
        cap = G if cfg.mode == "sync" else (cfg.staleness + 1) * G
        todo: dict[int, list[tuple[int, list[int], int, Any]]] = {}
        while self._in_flight() + sum(len(v) for v in todo.values()) < cap:
            gid = self.requeue.popleft() if self.requeue else self._next()
            p = self.prompts[gid]
            self.examples[gid] = p.example
            # the actor with the least work, counting what this call hands out
            i = min(self.rollouts, key=lambda a: len(self.assigned[a]) + len(todo.get(a, [])))
            todo.setdefault(i, []).append((gid, p.ids, group_seed(cfg.seed, gid), p.chat))
        for i, groups in todo.items():
            self.rollouts[i].submit.remote(groups)
            self.assigned[i].update(g for g, *_ in groups)

    def _next(self) -> int:
        g = self.next_group
        self.next_group += 1
        return g

    def _take_batch(self):
        import torch

        from qwen35.rl.losses import group_advantages

        cfg = self.cfg
        G = cfg.groups_per_update
        if cfg.mode == "sync" and (len(self.buffer) < G or any(self.assigned.values())):
            return None
        kept, masks, dropped = stale_masks(self.buffer, self.version, cfg.staleness, cfg.stale_policy)
        self.dropped_groups += dropped
        if dropped:
            gone = {g[0].group for g in self.buffer} - {g[0].group for g in kept}
            for gid in gone:
                self.examples.pop(gid, None)
        self.buffer = kept
        if len(kept) < G:
            return None
        groups, gmasks = kept[:G], masks[:G]
        self.buffer = kept[G:]
        rewards = torch.tensor([[s.reward for s in g] for g in groups])
        adv = group_advantages(rewards, cfg.normalize_std)
        samples = [s for g in groups for s in g]
        advantages = [float(a) for row in adv for a in row]
        flat_masks = [m for gm in gmasks for m in gm]
        staleness = [self.version - s.oldest_version for s in samples]
        per_task: dict[str, list[float]] = {}
        for s in samples:
            per_task.setdefault(s.info["task"], []).append(s.reward)
        info = {"reward": float(rewards.mean()), "reward_by_task": {t: sum(v) / len(v) for t, v in per_task.items()},
                "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
                "dropped_groups": dropped, "partial_samples": sum(s.oldest_version != s.newest_version
                                                                  for s in samples),
                "completion_tokens": sum(len(s.completion_ids) for s in samples),
                "inserted_tokens": sum(len(s.loss_mask) - sum(s.loss_mask) for s in samples),
                "groups": [g[0].group for g in groups]}
        for g in groups:
            self.examples.pop(g[0].group, None)
        return groups, samples, advantages, flat_masks, info

    def _record(self, stats: dict[str, Any], info: dict[str, Any], t_start: float) -> dict[str, Any]:
        self._note("trainer", "train", stats.pop("interval"))
        self.version = int(stats["version"])
        wall = time.time() - t_start
        rec = {"update": self.version, **info, **stats, "wall_seconds": wall, "restarts": self.restarts,
               "dropped_groups_total": self.dropped_groups,
               "busy_seconds": dict(self.busy)}
        rec.pop("groups", None)
        rec["groups_trained"] = info["groups"]
        self.history.append(rec)
        return rec

    def _replace(self, i: int) -> None:
        """A rollout actor died: a new one takes its place with the current weights, its groups start again."""
        lost = sorted(self.assigned[i])
        self.restarts += 1
        self.requeue.extendleft(reversed(lost))
        for gid in lost:
            self.examples.pop(gid, None)
        self._new_rollout_actor(i)
        self._push_weights(i)

    def _push_weights(self, i: int) -> None:
        """Queue the current weights on actor i if it serves an older version (it loads them before its next
        call: actor calls run in order)."""
        if self.weights_ref is not None and self.actor_version[i] < self.version:
            self.weight_calls[i].append(self.rollouts[i].set_weights.remote(self.weights_ref, self.version))
            self.actor_version[i] = self.version

    def _driver_state(self) -> dict[str, Any]:
        pending = sorted(set(self.requeue) | {g for a in self.assigned.values() for g in a}
                         | {g[0].group for g in self.buffer})
        return {"version": self.version, "next_group": self.next_group, "pending": pending,
                "history": self.history, "restarts": self.restarts, "dropped_groups": self.dropped_groups,
                "config": self.cfg.to_dict()}


def run_rl(cfg: RLConfig, reward_fn: RewardFn | None = None, resume: bool = False,
           callback: Callable[[RLRun, str], None] | None = None, tool_env: ToolEnv | None = None) -> RLResult:
    """Run (or, with ``resume``, continue) an RL run; see the module docstring for what it does and writes.
    ``tool_env``: the tools tool tasks call (default :func:`qwen35.rl.tools.default_tool_env`: the data
    generator's calculator and lookup); it travels to each rollout actor, so its callables must pickle."""
    return RLRun(cfg, reward_fn, resume, callback, tool_env).run()


__all__ = ["RLRun", "RLResult", "run_rl", "stale_masks", "group_seed", "resolve_model", "RolloutActor",
           "TrainerActor"]
