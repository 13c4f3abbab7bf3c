"""``qwen35 rl``: reinforcement learning of a qwen35 model on the project's verifiable tasks (Ray).

:func:`add_rl_arguments` and :func:`run_rl_command` let ``qwen35/cli.py`` mount this as a subcommand; nothing
here imports torch or Ray until the command runs, so ``qwen35 --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Improve a model with reinforcement learning on verifiable tasks (arithmetic with and without thinking, counting,
sorting, word edits, and tool use: calculator / lookup episodes where the tool results come back into the
conversation) from qwen35's own data generator: rollout actors sample groups of answers with qwen35's engine, a trainer actor takes GRPO-style clipped policy-gradient steps with truncated importance sampling
against the engine's logprobs (and, for MoE models, the rollout's routed experts replayed), and new weights are
pushed to the rollout actors in place. Runs on Ray (pip install 'qwen35[rl]'), on this machine by default.
"""

EPILOG = """\
what a run writes into DIR:
  log.jsonl              one line per update: reward (mean, per task), loss, KL, staleness, IS weights, the
                         trainer/rollout logprob mismatch, busy seconds per actor, restarts
  reward_curve.png       reward against the update
  actor_time.png         timeline of each actor's work and its busy share of the wall time
  checkpoint/state.pt    trainer state + prompt-stream position: --resume continues from it
  model/                 the trained checkpoint folder (tokenizer files of the starting model)

tasks (--tasks NAME=WEIGHT,...; NAME:WEIGHT works too):
  default                add2 add3 sub2 sub3 count sort reverse upper remove multi_turn
  tool tasks             calculator lookup multi_tool: the model calls the data generator's tools (a safe
                         calculator, the lookup tables) in the Qwen3.5 XML format; each call runs in the rollout
                         actor, its result is appended as a tool message (not trained on) and generation goes on,
                         up to --max-tool-rounds rounds; the reward reads the final answer

modes:
  async   rollouts and training overlap; samples at most --staleness versions old are trained (default)
  sync    generate a batch, train on it, push the weights, repeat (the baseline)

examples:
  qwen35 rl --preset embedded --updates 20 --out runs/rl
  qwen35 rl --model runs/embedded/model --updates 50 --tasks add2=1,sort=1 --out runs/rl2 --mode sync
  qwen35 rl --preset embedded --updates 40 --out runs/rl --resume
  qwen35 rl --preset embedded --updates 20 --tasks calculator=1,lookup=1,add3=1 --out runs/rl-tools
"""


def _tasks(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=") if "=" in part else part.partition(":")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"--tasks takes name=weight pairs, got {part!r}") from None
    return out


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (see below)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=["embedded"], help="start from the model shipped with qwen35 (default)")
    src.add_argument("--model", metavar="DIR", help="start from this checkpoint folder (with tokenizer.json)")
    p.add_argument("--updates", type=int, default=50, help="policy updates (default 50)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in DIR/checkpoint")
    p.add_argument("--mode", choices=["async", "sync"], default="async", help="see below (default async)")
    p.add_argument("--groups", type=int, default=8, dest="groups_per_update", help="prompts per update (default 8)")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest completion (default 256)")
    p.add_argument("--rollout-actors", type=int, default=1, help="rollout actors (default 1)")
    p.add_argument("--staleness", type=int, default=1,
                   help="k: train on samples from versions >= current - k (default 1)")
    p.add_argument("--stale-policy", choices=["drop", "mask"], default="drop",
                   help="too-old samples: drop the group, or mask the old tokens (default drop)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="KL to the starting model (default 0: none)")
    p.add_argument("--sft-coef", type=float, default=0.0,
                   help="weight of a supervised loss on replayed examples of qwen35's training mix, so that tasks "
                        "already solved do not drift (default 0: none)")
    p.add_argument("--sft-batch", type=int, default=8, help="replayed examples per update (default 8)")
    p.add_argument("--tis-clip", type=float, default=2.0, help="truncated IS cap (default 2)")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip (default 0.2)")
    p.add_argument("--tasks", type=_tasks,
                   help="task weights, e.g. add2=1,sort=2 or calculator=1 (default: every single-answer task; "
                        "see below)")
    p.add_argument("--max-tool-rounds", type=int, default=4,
                   help="tool tasks: tool rounds per episode before it is stopped (default 4)")
    p.add_argument("--think-prob", type=float, default=0.5, help="share of prompts with thinking on (default 0.5)")
    p.add_argument("--speculative", metavar="JSON",
                   help='rollout speculative decoding, e.g. \'{"method": "mtp", "num_speculative_tokens": 2}\'')
    p.add_argument("--no-routing-replay", action="store_true",
                   help="MoE: let the trainer's routers choose instead of replaying the rollout's experts")
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor (default 1)")
    p.add_argument("--trainer-threads", type=int, default=None,
                   help="torch threads of the trainer actor (default: --threads); on 2 cores the trainer is the "
                        "slower side and the rollout engine's small decode batches gain little from a second thread")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N updates (default 10)")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-address", help="a Ray cluster to join (default: start Ray on this machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from qwen35.rl.config import RLConfig

    spec = None
    if args.speculative:
        try:
            spec = json.loads(args.speculative)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative is not JSON ({e})") from None
    cfg = RLConfig(model=args.model or "embedded", updates=args.updates, mode=args.mode,
                   groups_per_update=args.groups_per_update, group_size=args.group_size,
                   max_new_tokens=args.max_new_tokens, rollout_actors=args.rollout_actors, staleness=args.staleness,
                   stale_policy=args.stale_policy, lr=args.lr, min_lr=args.lr, kl_coef=args.kl_coef,
                   sft_coef=args.sft_coef, sft_batch=args.sft_batch,
                   tis_clip=args.tis_clip, clip_eps=args.clip_eps, tasks=args.tasks, think_prob=args.think_prob,
                   max_tool_rounds=args.max_tool_rounds, speculative=spec, routing_replay=not args.no_routing_replay,
                   threads=args.threads, trainer_threads=args.trainer_threads,
                   save_every=args.save_every, save_dtype=args.save_dtype, seed=args.seed,
                   ray_address=args.ray_address, out_dir=args.out, progress=not args.no_progress)
    cfg.validate()
    return cfg


def run_rl_command(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        from qwen35.rl.loop import _ray, run_rl

        _ray()  # a clear message when Ray is missing, before anything loads
        result = run_rl(cfg, resume=args.resume)
    except (ValueError, ImportError, FileExistsError, FileNotFoundError) as e:
        print(f"qwen35 rl: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else {}
    busy = ", ".join(f"{k} {v:.0%}" for k, v in sorted(result.busy_fraction().items()))
    print(f"{len(result.history)} updates in {result.wall_seconds:.1f} s; last reward {last.get('reward', 0):.3f}; "
          f"busy: {busy}; rollout actors restarted: {result.restarts}")
    print(f"model: {result.model_dir}")
    return 0


__all__ = ["DESCRIPTION", "EPILOG", "add_rl_arguments", "run_rl_command", "config_from_args"]
