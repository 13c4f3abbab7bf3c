"""Synchronous vs asynchronous RL on the same number of policy updates (qwen35.rl on Ray).

For each mode (one after the other, so they never share the cores) the same RLConfig runs with only ``mode``
changed: ``sync`` generates a batch, trains on it and pushes the weights before the next batch starts;
``async`` keeps the rollout actor generating while the trainer trains (staleness bound k).  Reported:

* wall time of each mode and the ratio sync / async (the issue's target: >= 1.4x on 2 cores);
* the busy share of each actor (trainer, rollout-i) of the wall time: what the overlap buys;
* the reward curves of both runs in one PNG (and each run's own reward_curve.png / actor_time.png);
* held-out exact match per task, thinking on and off, of the starting model and of each mode's result
  (qwen35.rl.rewards.evaluate_tasks: greedy, problems held out from RL training by the data generator's split).

  python benchmarks/bench_rl.py --out runs/bench_rl [--model DIR] [--updates 20] [--groups 8] [--group-size 4]
                                [--max-new-tokens 256] [--per-task 50] [--modes sync:2,sync,async]

A mode is ``sync`` or ``async``, optionally with the torch threads of each of its actors after a colon
(default ``--threads``) and the trainer's after a second one: ``sync:2`` is the harder baseline on 2 cores, where
the phase that runs has both cores (sync's phases never overlap, so its actors never compete), while ``async:1``
splits them and ``async:1:2`` gives the trainer two threads beside the rollout's one.

A tiny setting to check the script (minutes, not a measurement):
  python benchmarks/bench_rl.py --out /tmp/bench_rl --updates 2 --groups 2 --group-size 2 --max-new-tokens 16 \\
      --per-task 2 --tasks add2=1,reverse=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _tasks(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        out[name.strip()] = float(w) if w else 1.0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for both runs and the report")
    p.add_argument("--model", default="embedded", help="starting checkpoint folder (default: the embedded model)")
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--groups", type=int, default=8, help="prompts per update")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--steps-per-call", type=int, default=8)
    p.add_argument("--tasks", type=_tasks, default=None, help="task weights, e.g. add2=1,sort=1 (default: all)")
    p.add_argument("--per-task", type=int, default=50, help="held-out problems per task and mode (0: no eval)")
    p.add_argument("--modes", default="sync,async", help="runs in order, e.g. sync:2,sync,async (mode[:threads])")
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    args = p.parse_args(argv)

    import torch

    from qwen35.rl.config import RLConfig
    from qwen35.rl.loop import resolve_model, run_rl
    from qwen35.rl.plots import _plt
    from qwen35.rl.rewards import evaluate_tasks

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_model = resolve_model(args.model)
    report: dict = {"args": vars(args), "modes": {}}
    base = RLConfig(model=str(start_model), updates=args.updates, groups_per_update=args.groups,
                    group_size=args.group_size, max_new_tokens=args.max_new_tokens, lr=args.lr, min_lr=args.lr,
                    staleness=args.staleness, steps_per_call=args.steps_per_call, tasks=args.tasks,
                    threads=args.threads, save_every=max(args.updates, 1), progress=True)
    tasks = [t for t, w in base.task_weights().items() if w > 0]

    def evaluate(model_dir) -> dict:
        if args.per_task <= 0:
            return {}
        return {mode: evaluate_tasks(model_dir, tasks, args.per_task, thinking=(mode == "on"))
                for mode in ("on", "off")}

    report["before"] = evaluate(start_model)
    for spec in args.modes.split(","):
        mode, _, rest = spec.strip().partition(":")
        threads, _, trainer_threads = rest.partition(":")
        threads = int(threads) if threads else args.threads
        trainer_threads = int(trainer_threads) if trainer_threads else None
        cfg = RLConfig.from_dict({**base.to_dict(), "mode": mode, "threads": threads,
                                  "trainer_threads": trainer_threads, "out_dir": str(out / spec.replace(":", "-t"))})
        t0 = time.perf_counter()
        res = run_rl(cfg)
        report["modes"][spec] = {"mode": mode, "threads": threads, "trainer_threads": trainer_threads or threads,
                                 "wall_seconds": res.wall_seconds,
                                 "driver_seconds": time.perf_counter() - t0,
                                 "busy_fraction": res.busy_fraction(), "restarts": res.restarts,
                                 "rewards": [h["reward"] for h in res.history],
                                 "staleness_max": max((h["staleness_max"] for h in res.history), default=0),
                                 "after": evaluate(res.model_dir)}
    runs = report["modes"]
    report["sync_over_async_wall"] = {f"{s} / {a}": runs[s]["wall_seconds"] / runs[a]["wall_seconds"]
                                      for s in runs if runs[s]["mode"] == "sync"
                                      for a in runs if runs[a]["mode"] == "async"}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for mode, r in report["modes"].items():
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], "-o", markersize=3,
                label=f"{mode} ({r['wall_seconds']:.0f} s)")
    ax.set_xlabel("update")
    ax.set_ylabel("mean reward of the update's batch")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_sync_vs_async.png", dpi=110)
    plt.close(fig)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.items() if k != "args"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
