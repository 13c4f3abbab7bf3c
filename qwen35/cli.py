"""The ``qwen35`` command line.

Each subcommand lives in a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and sets
``func`` to ``_run_<name>(args) -> int``.  To add a subcommand (generate, chat, serve, train, ...), write that
pair and append the adder to :data:`SUBCOMMANDS`; :func:`main` needs no change.  Heavy imports (torch, the model)
belong inside the ``_run_*`` function so that ``qwen35 info`` and ``--help`` stay instant.

Errors a user can cause (a wrong path, an unknown preset, an unreadable config) end as one line on stderr and exit
status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import ConfigError

EXIT_USAGE = 2


class CommandError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""

# ----------------------------------------------------------------------------------------------------------------
# info

_INFO_DESCRIPTION = """\
Show the size of a Qwen3.5 / Qwen3.6 model and what it needs in memory, computed from its config.json alone
(no weights are read, nothing is allocated). Give a checkpoint folder, or --preset for an official size.
"""

_INFO_EPILOG = """\
what the numbers mean:
  text                 embedding + decoder layers + final norm + lm_head: what a text-only *ForCausalLM holds.
                       When the head is tied (0.8B, 2B, 4B) the embedding matrix is counted once.
  vision tower         the ViT encoder and its 2x2 patch merger.
  text + vision        the size in the model's name (e.g. 397B), MTP not included.
  MTP block            the multi-token-prediction layer used only for speculative decoding.
  active per token     text parameters read for one token: for MoE the top-k routed experts + shared expert +
                       router of every layer plus all attention/DeltaNet weights; for dense models everything.
                       "incl. embedding" counts the whole embedding matrix (the convention behind "A17B");
                       "excl. embedding" drops it (for tied models it stays, since the head reads it).
  weights              bytes of text + vision in each format. bf16 is the official release; fp8 follows the
                       official -FP8 checkpoints (1 B/param + an fp32 scale per 128x128 block, embeddings,
                       lm_head, routers, DeltaNet a/b projections, vision and norms kept bf16); int8 / int4 are
                       estimates for weight-only schemes (per-row scales / group-128 scale+zero).
  KV cache per token   K and V of the full-attention layers only (1 in 4 layers); DeltaNet layers keep no KV.
  DeltaNet state       a fixed-size state per sequence (recurrent state in the config's mamba_ssm_dtype,
                       usually fp32, plus the short-convolution window), independent of the length.
  fit (--memory)       weights are subtracted from the budget; the rest holds each sequence's DeltaNet state
                       plus its KV cache. "longest single sequence" is capped at the model's maximum context;
                       "sequences at once" is for --context tokens each (default: the maximum). Activations,
                       CUDA context and allocator slack are NOT counted, so leave headroom.

examples:
  qwen35 info --preset 397B-A17B --memory 640 --dtype fp8
  qwen35 info ~/models/Qwen3.5-27B --json
  qwen35 info --preset qwen3.5-9b --memory 24 --context 32768
"""


def _add_info(sub: argparse._SubParsersAction) -> None:
    from .memory import KV_DTYPES, WEIGHT_DTYPES

    p = sub.add_parser(
        "info", help="parameter counts, weight sizes, KV cache and state memory of a model",
        description=_INFO_DESCRIPTION, epilog=_INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", metavar="PATH",
                   help="checkpoint folder holding config.json (or the config.json file itself)")
    p.add_argument("--preset", metavar="NAME",
                   help="an official size instead of PATH: 0.8B, 2B, 4B, 9B, 27B, 35B-A3B, 122B-A10B, 397B-A17B "
                        "(case-insensitive; 'qwen3.5-27b' also works)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (counts and sizes in plain units)")
    p.add_argument("--memory", type=float, metavar="GB",
                   help="memory budget in GB (10^9 bytes) for the fit: longest context and sequences at once")
    p.add_argument("--dtype", choices=list(WEIGHT_DTYPES), default=None,
                   help="weight format used for the fit (default: fp8 for an FP8 checkpoint, else bf16)")
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="bf16",
                   help="KV cache element type (default: bf16)")
    p.add_argument("--context", type=int, metavar="N",
                   help="tokens per sequence for the KV figure and the fit (default: the model's maximum)")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from .config import load_config
    from .memory import format_report, report_dict
    from .presets import normalize_preset_name, preset_config

    if args.path and args.preset:
        raise CommandError("give either PATH or --preset, not both")
    if args.preset:
        try:
            key = normalize_preset_name(args.preset)
        except ValueError as e:
            raise CommandError(str(e)) from None
        cfg, name = preset_config(key), f"Qwen3.5-{key} (preset)"
    elif args.path:
        cfg, name = load_config(args.path), args.path  # ConfigError names the file and the field
    else:
        raise CommandError("give a checkpoint folder PATH or --preset NAME (see qwen35 info --help)")
    if args.memory is not None and not (math.isfinite(args.memory) and args.memory > 0):
        raise CommandError(f"--memory must be a positive number of GB, got {args.memory:g}")
    memory = int(args.memory * 1e9) if args.memory is not None else None
    kw = dict(name=name, weight_dtype=args.dtype, kv_dtype=args.kv_dtype, memory_bytes=memory,
              context=args.context)
    try:
        text = json.dumps(report_dict(cfg, **kw), indent=2) if args.json else format_report(cfg, **kw)
    except ValueError as e:  # a --context the model cannot address, a malformed vision_config
        raise CommandError(str(e)) from None
    print(text)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the parser and the entry point

# Adders of every subcommand, in the order `qwen35 --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen35", description="Qwen3.5 / Qwen3.6 models in PyTorch: inspect, run, serve, train.")
    parser.add_argument("--version", action="version", version=f"qwen35 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _fail(command: str, message: str) -> int:
    print(f"qwen35 {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2); report, do not exit
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except (CommandError, ConfigError, OSError) as e:  # OSError: a folder or file that cannot be read
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _fail(args.command, message)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
