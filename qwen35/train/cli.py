"""``qwen35 train``: train a small Qwen3.5 with its MTP head on the synthetic chat data.

:func:`train_main` is a complete command (``train_main(["--preset", "tiny", "--steps", "50", "--out", "runs/t"])``);
:func:`add_train_arguments` and :func:`run_train` let ``qwen35/cli.py`` mount the same arguments as a subcommand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = """\
Train a small Qwen3.5 model (dense or MoE, Gated DeltaNet + gated attention) and its MTP head from scratch on the
project's synthetic chat data: arithmetic and word tasks with thinking traces, tool calls in the Qwen3.5 XML
format, multi-turn chats, stories. A byte-level BPE tokenizer is trained first. The result is an official-layout
checkpoint folder (DIR/model: config.json, model.safetensors with mtp.* tensors, tokenizer, chat template) that
qwen35 and transformers both load.
"""

EPILOG = """\
what a run writes into DIR:
  tokenizer/               the trained BPE (reused when resuming)
  checkpoint/state.pt      model, MTP head, optimizer, scheduler, RNG states, step: --resume continues from it
                           bit-identically (written every --save-every steps and at the end)
  model/                   the final checkpoint folder
  loss_curve.png           train / MTP / held-out loss against the step
  history.json             per-step and per-evaluation records

presets:
  tiny       64-wide, 4 layers, 4 experts: runs in seconds, for smoke tests
  embedded   the default model shipped with qwen35 (256-wide, 4 layers, 8 experts + shared, ~7 M parameters);
             its data mix and hyper-parameters come with it (qwen35.train.embedded). With --eval the held-out
             evaluation (exact match per task, tool calls, MTP acceptance) runs after training.

examples:
  qwen35 train --preset tiny --steps 100 --out runs/tiny
  qwen35 train --preset embedded --steps 1500 --threads 2 --out runs/embedded --eval
  qwen35 train --out runs/embedded --preset embedded --steps 1500 --resume
"""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (see below)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "embedded"],
                   help="model and recipe preset (default: tiny)")
    p.add_argument("--config", metavar="FILE",
                   help="a config.json body for the model instead of the preset's (vocab_size is replaced by the "
                        "tokenizer's)")
    p.add_argument("--steps", type=int, help="optimizer steps (preset default otherwise)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in DIR/checkpoint")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, help="longest example kept, in tokens")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="linear warmup steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max global gradient norm (0 = off)")
    p.add_argument("--mtp-weight", type=float, dest="mtp_loss_weight",
                   help="weight of the MTP (token after next) loss; 0 trains no MTP head")
    p.add_argument("--hidden-source", choices=["pre_norm", "post_norm"],
                   help="which hidden state of the model the MTP head reads")
    p.add_argument("--eval-every", type=int, help="held-out loss every N steps")
    p.add_argument("--eval-batches", type=int, help="held-out micro-batches per evaluation")
    p.add_argument("--save-every", type=int, help="resumable state every N steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-train", type=int, help="train examples (default: steps x batch, no repeats)")
    p.add_argument("--n-held-out", type=int, help="held-out examples (evaluation loss)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    p.add_argument("--bf16", action="store_true", dest="bf16_autocast",
                   help="bf16 autocast (slower on CPUs without bf16 matrix units)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--device", help="where to train: cpu (default), cuda, cuda:N")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], help="dtype of the final checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the final model on held-out tasks (exact match, tool calls, MTP acceptance)")


_OVERRIDES = ("steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr", "warmup_steps", "weight_decay",
              "grad_clip", "mtp_loss_weight", "hidden_source", "eval_every", "eval_batches", "save_every", "seed",
              "n_train", "n_held_out", "vocab_size", "threads", "save_dtype", "device")


def config_from_args(args: argparse.Namespace):
    """The TrainConfig an argument set describes: the preset's recipe, then the flags given."""
    from qwen35.train.config import TrainConfig

    if args.preset == "embedded":
        from qwen35.train.embedded import DEFAULT_STEPS, recipe_config

        # warmup, eval and save intervals of the recipe scale with the step count
        cfg = recipe_config(args.out, args.steps or DEFAULT_STEPS)
    else:
        cfg = TrainConfig(model="tiny", out_dir=args.out)
    if args.config:
        cfg.model = json.loads(Path(args.config).read_text(encoding="utf-8"))
    for name in _OVERRIDES:
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.bf16_autocast:
        cfg.bf16_autocast = True
    if args.no_progress:
        cfg.progress = False
    cfg.validate()
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from qwen35.train.loop import train

    try:
        cfg = config_from_args(args)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"qwen35 train: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, resume=args.resume)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # a wrong --resume, a changed config
        print(f"qwen35 train: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    last = result.evals[-1] if result.evals else {}
    print(f"trained {len(result.history)} steps, {result.tokens_per_second:.0f} tokens/s; held-out loss "
          f"{last.get('loss', float('nan')):.4f}" + (f", MTP {last['mtp_loss']:.4f}" if "mtp_loss" in last else ""))
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
    if args.eval and result.model_dir is not None:
        from qwen35.train.embedded import evaluate

        report = evaluate(result.model_dir)
        (Path(cfg.out_dir) / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0


def build_parser(prog: str = "qwen35 train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    """``qwen35 train ...`` as a function: returns the exit status (0 ok, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    return run_train(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())


__all__ = ["train_main", "add_train_arguments", "run_train", "config_from_args", "build_parser", "DESCRIPTION",
           "EPILOG"]
