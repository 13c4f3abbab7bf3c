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
import time
from collections.abc import Callable, Sequence

from . import __version__
from .config import ConfigError
from .kernels.ops import check_switches

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
                        "(case-insensitive; 'qwen3.5-27b' also works), or Qwen3.6-27B / Qwen3.6-35B-A3B")
    p.add_argument("--json", action="store_true", help="print the report as JSON (counts and sizes in plain units)")
    p.add_argument("--memory", type=float, metavar="GB",
                   help="memory budget in GB (10^9 bytes) for the fit: longest context and sequences at once")
    p.add_argument("--dtype", choices=list(WEIGHT_DTYPES), default=None,
                   help="weight format used for the fit (default: fp8 for an FP8 checkpoint, else bf16)")
    p.add_argument("--kv-cache-dtype", "--kv-dtype", dest="kv_dtype", choices=list(KV_DTYPES), default="bf16",
                   help="KV cache element type (default: bf16); int8 / fp8 are the engine's --kv-cache-dtype "
                        "formats: 1 B per value plus a float32 scale per token per KV head")
    p.add_argument("--context", type=int, metavar="N",
                   help="tokens per sequence for the KV figure and the fit (default: the model's maximum)")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from .config import load_config
    from .memory import format_report, report_dict
    from .presets import normalize_preset_name, preset_config, preset_display_name

    if args.path and args.preset:
        raise CommandError("give either PATH or --preset, not both")
    if args.preset:
        try:
            key = normalize_preset_name(args.preset)
        except ValueError as e:
            raise CommandError(str(e)) from None
        display = preset_display_name(args.preset)
        same = f"; the shapes of Qwen3.5-{key}" if display.startswith("Qwen3.6") else ""
        cfg, name = preset_config(key), f"{display} (preset{same})"
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
# generate and chat


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="checkpoint folder (config.json, safetensors, tokenizer.json) "
                   "or a llama.cpp .gguf file; "
                   "default: the embedded model (a 5.5M-parameter Qwen3.5-MoE trained by this project)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="weight and activation dtype (auto: bf16 for bf16/FP8 checkpoints, else as stored)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--cache-memory", metavar="SIZE", help="memory for the KV blocks and DeltaNet state slots, "
                   "e.g. 2GiB (default: enough for 16 sequences of 4096 tokens)")
    p.add_argument("--max-model-len", type=int, metavar="N", help="cap on prompt + output tokens")
    p.add_argument("--speculative-config", metavar="JSON", default=None,
                   help='speculative decoding, vLLM\'s JSON: e.g. \'{"method": "mtp", "num_speculative_tokens": 2}\' '
                        "(the checkpoint's MTP block drafts) or method ngram (prompt lookup); drafts are verified in "
                        "one forward, so the output is unchanged (greedy: token for token)")
    p.add_argument("--quantization", choices=["int8", "int4", "fp8"], default=None,
                   help="int8: weight-only int8 with per-row scales (half the weight memory; several times faster "
                        "decoding on CPUs without native bf16); int4: 4-bit weights, one bf16 scale per 32 inputs "
                        "(about a quarter of bf16's weight memory, faster decoding still; lm_head int8); fp8: "
                        "block-FP8 as the official -FP8 checkpoints (e4m3, a scale per 128x128 block; half of bf16). "
                        "Default: as the checkpoint is (an FP8 checkpoint stays FP8 unless --dtype is given)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="recompute every prompt from the start (by default a prompt that begins like an earlier one, "
                        "e.g. the next turn of a chat, resumes from the cached KV blocks and DeltaNet state)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto",
                   help="how the attention layers' KV cache is stored: auto = the model dtype; int8 / fp8 (e4m3) = "
                        "one byte per value plus a float32 scale per token per KV head, about half the memory (so "
                        "about twice the context in the same --cache-memory) at a small cost in accuracy "
                        "(default: auto)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    g = p.add_argument_group("sampling", "defaults are the checkpoint's generation_config.json (greedy when it says "
                             "do_sample: false, as the embedded model's does), the same as the server's")
    limit = f"default: {max_tokens}" if max_tokens else "default: until the end of the turn or the context"
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most ({limit})")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's "
                   "generation_config, else 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeating tokens")
    g.add_argument("--presence-penalty", type=float, default=None, help="subtracted once per token already generated")
    g.add_argument("--frequency-penalty", type=float, default=None, help="subtracted per occurrence")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def _sampling_params(args: argparse.Namespace, tokenizer):
    """The flags over the checkpoint's generation_config.json: the same defaults as LLM and the server."""
    from .engine import SamplingParams
    from .engine.params import sampling_defaults

    chosen = sampling_defaults(getattr(tokenizer, "generation_config", None) or {})
    chosen.update({name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None})
    try:
        return SamplingParams(max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop), **chosen)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _load_llm(args: argparse.Namespace):
    from .checkpoint import CheckpointError
    from .llm import LLM

    try:
        return LLM(args.model, dtype=args.dtype, threads=args.threads, cache_memory=args.cache_memory,
                   max_model_len=args.max_model_len, quantization=args.quantization,
                   speculative_config=args.speculative_config,
                   enable_prefix_caching=not getattr(args, "no_prefix_caching", False),
                   kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    except (CheckpointError, ValueError) as e:
        raise CommandError(str(e).splitlines()[0]) from None


class _Timer:
    """Prompt tokens/s up to the first generated token, decode tokens/s after it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0

    def token(self, n: int) -> None:
        if n and self.first is None:
            self.first = time.perf_counter()
        self.tokens += n

    def report(self, prompt_tokens: int) -> str:
        end = time.perf_counter()
        first = self.first or end
        pp = prompt_tokens / max(first - self.start, 1e-9)
        dec = (self.tokens - 1) / (end - first) if self.tokens > 1 and end > first else 0.0
        return (f"prompt: {prompt_tokens} tokens, {pp:.1f} tok/s; decode: {self.tokens} tokens, "
                f"{dec:.1f} tok/s")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt, streaming the text to stdout",
                       description="Complete PROMPT with the model and stream the text as it is generated. Ends "
                                   "with prompt and decode speed on stderr. With --chat the prompt is sent as a "
                                   "user message through the chat template (thinking on unless --no-think).")
    p.add_argument("prompt", metavar="PROMPT", help="the text to complete ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT as a chat user message")
    p.add_argument("--no-think", action="store_true", help="with --chat: thinking off (empty think block)")
    _add_model_args(p)
    _add_sampling_args(p, 128)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load_llm(args)
    params = _sampling_params(args, llm.tokenizer)
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   enable_thinking=not args.no_think)
    timer = _Timer()
    n_prompt = 0
    try:
        for out in llm.stream(prompt, params):
            n_prompt = len(out.prompt_token_ids)
            o = out.outputs[0]
            timer.token(len(o.delta_token_ids))
            sys.stdout.write(o.delta_text)
            sys.stdout.flush()
    except ValueError as e:
        raise CommandError(str(e)) from None
    sys.stdout.write("\n")
    print(timer.report(n_prompt), file=sys.stderr)
    return 0


_CHAT_DESCRIPTION = """\
An interactive chat in the terminal: the answer streams as it is generated, the model's thinking is shown set
apart (dimmed on a terminal), and the conversation is kept until /reset. With --message it answers one message
and exits.

Tools: --mcp 'CMD ARGS' starts a stdio MCP server and offers its tools to the model (repeatable, one server
each); --python-tool offers a sandboxed Python interpreter. The model may call tools several times before it
answers (at most --max-rounds model turns). Every call is shown, e.g. [tool call] calculator(expression="2+2"),
then its result, [tool result] 4. Unless --yes is given, each call is asked about first (y/n); when stdin is not
a terminal there is no one to ask, so calls are refused and the model told so -- pass --yes to run them.

Pictures (a model with a vision tower): --image PATH and --video PATH attach files to the first message,
/image PATH and /video PATH in the REPL to the next one. A text-only model refuses them.
"""

_CHAT_EPILOG = """\
commands (in the REPL):
  /help            list the commands
  /reset           clear the conversation (the --system message stays)
  /think on|off    switch thinking on or off (/think alone says which it is)
  /tools           list the tools offered to the model
  /image PATH      attach a picture to the next message (repeatable; a model with a vision tower)
  /video PATH      attach a video (a file PyAV reads, or an animated GIF / PNG / WebP) to the next message
  /exit, /quit     leave (Ctrl-D too); Ctrl-C stops the answer being generated
  //text           send a message that starts with '/' (as /text)

the python tool (--python-tool):
  each call runs in a fresh `python -I` process in a scratch folder deleted afterwards, with an empty
  environment, no network (a network namespace via `unshare --net` where Linux allows it, else sockets disabled
  in the process), 20 s of CPU, 30 s of wall clock, 1 GiB of memory, 64 MiB per file written, no subprocesses,
  and the first 8000 characters of stdout / stderr given back. It is not a filesystem jail: the code can read
  what your account can.

examples:
  qwen35 chat
  qwen35 chat --python-tool -m 'Use python to compute 2**100'
  qwen35 chat --mcp 'python my_server.py' --mcp 'npx -y @modelcontextprotocol/server-filesystem /tmp'
  echo 'What is 123 * 45?' | qwen35 chat --mcp 'python calc_server.py' --yes
  qwen35 chat --model ~/models/Qwen3.5-0.8B --image circles.png -m 'How many circles?'

MCP support needs the MCP Python SDK: pip install 'qwen35[mcp]'.
"""

# REPL commands and what /help says about them, in the order it lists them.
_CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation (the system message stays)",
    "/think on|off": "switch thinking on or off (/think alone says which it is)",
    "/tools": "list the tools offered to the model",
    "/image PATH": "attach a picture to the next message (repeatable)",
    "/video PATH": "attach a video to the next message (repeatable)",
    "/exit": "leave (also /quit and Ctrl-D)",
    "//text": "send a message that starts with '/'",
}


class _ChatHelpFormatter(argparse.HelpFormatter):
    """Keeps text laid out by hand (any with a newline: chat's description and epilog) as it is, and wraps the
    rest (the argument groups' descriptions) as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat in the terminal, with tools (MCP servers, a sandboxed python)",
                       description=_CHAT_DESCRIPTION, epilog=_CHAT_EPILOG, formatter_class=_ChatHelpFormatter)
    p.add_argument("--message", "-m", metavar="TEXT", help="answer this one message and exit")
    p.add_argument("--system", metavar="TEXT", help="a system message")
    p.add_argument("--no-think", action="store_true", help="start with thinking off")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="attach this picture to the first message, --message or the first one typed (repeatable, "
                        "in order; needs a model with a vision tower)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="attach this video to the first message, after the pictures (repeatable; a file PyAV "
                        "reads, or an animated GIF / PNG / WebP)")
    g = p.add_argument_group("tools")
    g.add_argument("--mcp", action="append", default=[], metavar="'CMD ARGS'",
                   help="start this stdio MCP server and offer its tools (repeatable; split like a shell command "
                        "line, so quote it as one argument)")
    g.add_argument("--python-tool", action="store_true",
                   help="offer a 'python' tool that runs code in a sandbox (see below)")
    g.add_argument("--yes", "-y", action="store_true",
                   help="run tool calls without asking (default: show each call and ask y/n on the terminal)")
    g.add_argument("--max-rounds", type=int, default=8, metavar="N",
                   help="model turns per message at most, tool calls included (default: 8)")
    _add_model_args(p)
    _add_sampling_args(p, None)
    p.set_defaults(func=_run_chat)


def _indented(text: str, first: str, limit: int = 40) -> str:
    """``first`` + the text, later lines indented under it; long results are cut for the screen (the model
    still gets all of it)."""
    lines = text.splitlines() or [""]
    more = len(lines) - limit
    lines = lines[:limit] + ([f"... ({more} more lines)"] if more > 0 else [])
    return "\n".join([first + lines[0]] + ["  " + line for line in lines[1:]])


class _ChatView:
    """The terminal side of the agent loop.  :meth:`chat` has ``LLM.chat``'s signature, so ``run_agent`` drives
    it like an LLM, but it streams each model turn as it is generated: the output goes through
    ChatStreamProcessor, so thinking, answer and tool calls come apart and a call is never shown as raw XML.
    :meth:`event` shows the calls and results the loop reports; :meth:`confirm` asks before each call."""

    def __init__(self, llm, out=None, ask: bool = True) -> None:
        self.llm = llm
        self.out = out or sys.stdout
        self.ask = ask
        tty = self.out.isatty()
        self.dim, self.reset = ("\033[2m", "\033[0m") if tty else ("", "")

    def chat(self, messages, params=None, tools=None, tool_choice="auto", enable_thinking=None):
        from .chat.completion import ChatStreamProcessor, build_chat_prompt, chat_result

        prompt = build_chat_prompt(self.llm.tokenizer, messages, tools=tools, tool_choice=tool_choice,
                                   enable_thinking=enable_thinking)
        processor = ChatStreamProcessor(prompt)
        base = params if params is not None else self.llm.get_default_sampling_params()
        timer, last, state = _Timer(), None, None
        out = self.out

        def show(kind: str, text: str) -> None:
            nonlocal state
            if not text:
                return
            if kind != state:
                if kind == "reasoning":
                    out.write(f"{self.dim}[thinking]\n")
                elif state == "reasoning":
                    out.write(f"{self.reset}\n[answer]\n")
                state = kind
            out.write(text)
            out.flush()

        stream = self.llm.stream(_with_media(prompt.text, messages), prompt.sampling_params(base))
        try:
            for item in stream:
                last = item
                o = item.outputs[0]
                timer.token(len(o.delta_token_ids))
                delta = processor.feed(o.delta_text)
                show("reasoning", delta.reasoning)
                show("content", delta.content)
        finally:
            stream.close()  # an interrupted turn: abort the request in the engine
        delta = processor.finish()
        show("reasoning", delta.reasoning)
        show("content", delta.content)
        if state is not None:
            out.write(f"{self.reset}\n")
        out.flush()
        print(f"({timer.report(len(last.prompt_token_ids))})", file=sys.stderr)
        return chat_result(prompt, last)

    def event(self, event) -> None:
        from .agent import format_call

        if event.kind == "tool_call":
            print(_indented(format_call(event.call.name, event.call.arguments), "[tool call] "), file=self.out,
                  flush=True)
        elif event.kind == "tool_result":
            print(_indented(event.text, "[tool result] "), file=self.out, flush=True)
        elif event.kind == "declined":
            print(f"[tool call declined] {event.call.name} was not run", file=self.out, flush=True)
        elif event.kind == "max_rounds":
            print("(stopped: the model still wanted tools after --max-rounds turns)", file=sys.stderr)

    def confirm(self, call) -> bool:
        if not self.ask:
            return True
        if not sys.stdin.isatty():
            print(f"qwen35 chat: not running {call.name}: stdin is not a terminal to ask on; pass --yes to run "
                  "tool calls without asking", file=sys.stderr)
            return False
        while True:
            try:
                answer = input(f"run {call.name}? [y/n] ").strip().lower()
            except EOFError:
                return False
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False


def _with_media(text: str, messages: list[dict]):
    """The prompt for LLM.stream: the text alone, or vLLM's dict with the conversation's pictures (every turn's,
    in order: a later turn resends them all, and the prefix cache finds them again)."""
    from .chat.vision_prompt import media_parts

    media: dict[str, list] = {}
    for part in media_parts(messages):
        media.setdefault(part.kind, []).append(part.source)
    return {"prompt": text, "multi_modal_data": media} if media else text


def _media_part(kind: str, path: str) -> dict:
    """A content part for a picture or video file named on the command line or by /image, /video."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise CommandError(f"--{kind} {path}: no such file")
    return {"type": kind, kind: file}


def _user_message(text: str, media: list[dict]) -> dict:
    return {"role": "user", "content": [*media, {"type": "text", "text": text}] if media else text}


def _chat_tools(args: argparse.Namespace, stack) -> list:
    """The tools asked for on the command line; MCP servers are closed by ``stack``."""
    import logging

    from .agent import MCPClient, MCPError, PythonTool

    tools = [PythonTool()] if args.python_tool else []
    if args.mcp:
        # the SDK logs unreadable server output with a traceback through logging's last-resort handler: keep the
        # terminal for the chat (a broken server is reported as one line instead)
        logging.getLogger("mcp").addHandler(logging.NullHandler())
        try:
            client = MCPClient(args.mcp)
        except (MCPError, ValueError) as e:  # ValueError: a command that cannot be split
            raise CommandError(str(e).splitlines()[0]) from None
        stack.callback(client.close)
        names = {t.name for t in tools}
        for tool in client.tools:
            if tool.name in names:
                raise CommandError(f"two tools are named {tool.name!r} (the second from MCP server "
                                   f"'{tool.extra.get('server')}')")
            names.add(tool.name)
            tools.append(tool)
    return tools


def _chat_turn(view: _ChatView, params, messages: list[dict], thinking: bool, tools: list,
               max_rounds: int) -> list[dict]:
    """One user message through the agent loop, streamed; returns the conversation with the new turns."""
    from .agent import run_agent

    result = run_agent(view, messages, tools, confirm=view.confirm, max_rounds=max_rounds, on_event=view.event,
                       params=params, enable_thinking=thinking)
    return result.messages


class _ChatSession:
    """The REPL's state and commands."""

    def __init__(self, view: _ChatView, params, tools: list, base: list[dict], thinking: bool,
                 max_rounds: int) -> None:
        self.view, self.params, self.tools, self.base = view, params, tools, base
        self.thinking, self.max_rounds = thinking, max_rounds
        self.messages = list(base)
        self.media: list[dict] = []  # pictures and videos for the next message (--image, /image)

    def send(self, text: str) -> None:
        media, self.media = self.media, []  # attached to this message only, sent or not
        try:
            self.messages = _chat_turn(self.view, self.params, self.messages + [_user_message(text, media)],
                                       self.thinking, self.tools, self.max_rounds)
        except KeyboardInterrupt:  # the history stays as it was before this message
            print("\n(interrupted)", file=sys.stderr)

    def attach(self, kind: str, rest: list[str]) -> None:
        from .llm import no_vision_reason

        if not rest:
            print(f"usage: /{kind} PATH", file=sys.stderr)
            return
        refusal = no_vision_reason(self.view.llm.model)
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            return
        path = " ".join(rest)  # a path with spaces needs no quotes
        try:
            self.media.append(_media_part(kind, path))
        except CommandError as e:
            print(f"error: {str(e).removeprefix('--')}", file=sys.stderr)
            return
        print(f"{kind} {path} attached to the next message ({len(self.media)} waiting)", file=sys.stderr)

    def command(self, line: str) -> bool:
        """Run a /command; True when the REPL should end."""
        name, *rest = line.split()
        if name in ("/exit", "/quit"):
            return True
        if name == "/help":
            width = max(map(len, _CHAT_COMMANDS))
            print("\n".join(f"  {cmd:<{width}}  {what}" for cmd, what in _CHAT_COMMANDS.items()))
        elif name in ("/image", "/video"):
            self.attach(name[1:], rest)
        elif name == "/reset":
            self.messages = list(self.base)
            print("history cleared", file=sys.stderr)
        elif name == "/think":
            if len(rest) > 1 or (rest and rest[0] not in ("on", "off")):
                print(f"usage: /think on|off (got {' '.join(rest)!r})", file=sys.stderr)
            else:
                if rest:
                    self.thinking = rest[0] == "on"
                print(f"thinking {'on' if self.thinking else 'off'}", file=sys.stderr)
        elif name == "/tools":
            if not self.tools:
                print("no tools (start the chat with --mcp 'CMD ARGS' or --python-tool)")
            width = max((len(t.name) for t in self.tools), default=0)
            for tool in self.tools:
                summary = (tool.description or "").strip().split(". ")[0].splitlines()[0] if tool.description else ""
                summary = summary if len(summary) <= 80 else summary[:77] + "..."
                print(f"  {tool.name:<{width}}  {summary}  [{tool.source}]")
        else:
            print(f"unknown command {name}; the commands are: {', '.join(_CHAT_COMMANDS)}", file=sys.stderr)
        return False


def _run_chat(args: argparse.Namespace) -> int:
    import contextlib

    from .agent import ToolUnavailableError

    if args.max_rounds < 1:
        raise CommandError(f"--max-rounds must be a positive integer, got {args.max_rounds}")
    with contextlib.ExitStack() as stack:
        tools = _chat_tools(args, stack)  # before the model: a bad --mcp fails fast
        media = [_media_part("image", p) for p in args.image] + [_media_part("video", p) for p in args.video]
        llm = _load_llm(args)
        if media:
            from .llm import no_vision_reason

            refusal = no_vision_reason(llm.model)
            if refusal is not None:
                raise CommandError(f"--{media[0]['type']}: {refusal}")
        params = _sampling_params(args, llm.tokenizer)
        view = _ChatView(llm, ask=not args.yes)
        base = [{"role": "system", "content": args.system}] if args.system else []
        session = _ChatSession(view, params, tools, base, not args.no_think, args.max_rounds)
        session.media = media
        try:
            if args.message is not None:
                try:
                    _chat_turn(view, params, base + [_user_message(args.message, media)], session.thinking,
                               tools, args.max_rounds)
                except ValueError as e:  # a prompt longer than the context, say
                    raise CommandError(str(e).splitlines()[0]) from None
                except KeyboardInterrupt:
                    print("\n(interrupted)", file=sys.stderr)
                    return 130
                return 0
            names = ", ".join(t.name for t in tools)
            print(f"qwen35 chat{f' (tools: {names})' if tools else ''} - /help lists the commands, /exit quits",
                  file=sys.stderr)
            while True:
                try:
                    line = input("> ")
                except (EOFError, KeyboardInterrupt):
                    print(file=sys.stderr)
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/") and not text.startswith("//"):
                    if session.command(text):
                        return 0
                    continue
                try:
                    session.send(text[1:] if text.startswith("//") else line)
                except ValueError as e:  # a conversation past the context: say so, let /reset fix it
                    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        except ToolUnavailableError as e:  # an MCP server that crashed: one line, exit status 2
            raise CommandError(str(e).splitlines()[0]) from None


# ----------------------------------------------------------------------------------------------------------------
# serve

_SERVE_DESCRIPTION = """\
Serve a model over HTTP with an OpenAI-compatible API: POST /v1/chat/completions (reasoning_content, tools,
streaming), POST /v1/completions, GET /v1/models, GET /health and GET /metrics (Prometheus).
Open http://HOST:PORT/ in a browser for a chat page (streaming, thinking, tool calls; works offline).
Listens on 127.0.0.1 (this machine only) unless --host says otherwise; set --api-key before exposing it.
"""

_SERVE_EPILOG = """\
examples:
  qwen35 serve --model ~/models/Qwen3.5-0.8B --port 8000
  qwen35 serve --model ~/models/Qwen3.5-27B --host 0.0.0.0 --api-key $KEY --max-num-seqs 32 --cache-memory 20GiB

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
    "model": "Qwen3.5-0.8B", "messages": [{"role": "user", "content": "Hi"}],
    "chat_template_kwargs": {"enable_thinking": false}}'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

requests:
  thinking is on by default; switch it per request with "chat_template_kwargs": {"enable_thinking": false}.
  The reasoning comes back as message.reasoning_content (and .reasoning), tool calls as message.tool_calls.
  tool_choice "required" or a named function, and response_format (json_object / json_schema), are enforced by
  grammar-constrained decoding (llguidance: pip install 'qwen35[structured]').
  Sampling parameters a request leaves out come from the checkpoint's generation_config.json.

pictures (a model with a vision tower; a text-only model answers them 400):
  content parts {"type": "image_url", "image_url": {"url": ...}} and {"type": "video_url", ...} (or
  transformers' {"type": "image", "image": ...}). data: URLs are always accepted; file paths and file:// URLs only
  inside --allowed-local-media-path DIR; http(s) URLs only with --allow-remote-media. A picture that cannot be
  used (corrupt, too large, aspect ratio beyond 200:1, not allowed) is a 400 whose param names its content part.
"""


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, tools, streaming, metrics)",
                       description=_SERVE_DESCRIPTION, epilog=_SERVE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    g.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/* requests")
    g.add_argument("--served-model-name", metavar="NAME", help="the model name clients send and /v1/models lists "
                   "(default: the checkpoint folder's name)")
    g.add_argument("--max-num-seqs", type=int, default=16, metavar="N",
                   help="sequences decoded at once; more requests wait in a queue (default: 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, metavar="N",
                   help="tokens per forward pass, decodes plus prompt chunks (default: 512)")
    g.add_argument("--max-tokens-cap", type=int, metavar="N", help="largest max_tokens a request may ask for, and "
                   "what it gets when it sets none (default: the context length)")
    g.add_argument("--max-body-size", metavar="SIZE", default="16MiB",
                   help="largest request body; larger ones get 413 (default: 16MiB)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    m = p.add_argument_group("pictures", "where the images and videos of chat requests may come from: data: URLs "
                             "always, nothing else unless allowed here")
    m.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="let requests name files (a path or a file:// URL) inside DIR, and only there; a path "
                        "outside it is refused (default: no local files)")
    m.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http:// and https:// picture URLs. The server then connects wherever a request "
                        "says, hosts of its own network included: turn this on only where that is safe "
                        "(default: refused)")
    m.add_argument("--media-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="with --allow-remote-media: give up on a connection that is silent this long (default: 10)")
    m.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="refuse pictures (and video frames) larger than N pixels, from the size their header "
                        "declares, before decoding them (default: 67108864, 8192x8192)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as e:
        raise CommandError(f"the server needs the 'serve' extra (pip install 'qwen35[serve]'): {e}") from None
    from .checkpoint import CheckpointError
    from .llm import parse_bytes

    if not 0 < args.port < 65536:
        raise CommandError(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_tokens_cap", "max_image_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    try:
        max_body = parse_bytes(args.max_body_size)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
              served_model_name=args.served_model_name, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, cache_memory=args.cache_memory,
              max_model_len=args.max_model_len, threads=args.threads, max_tokens_cap=args.max_tokens_cap,
              max_body_bytes=max_body, quantization=getattr(args, "quantization", None),
              speculative_config=args.speculative_config,
              enable_prefix_caching=not getattr(args, "no_prefix_caching", False),
              allowed_local_media_path=args.allowed_local_media_path, allow_remote_media=args.allow_remote_media,
              media_fetch_timeout_s=args.media_fetch_timeout, max_image_pixels=args.max_image_pixels,
              log_level=args.log_level, kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    except (CheckpointError, ValueError) as e:
        raise CommandError(str(e).splitlines()[0]) from None
    return 0


# ----------------------------------------------------------------------------------------------------------------
# convert

_CONVERT_DESCRIPTION = """\
Convert between a checkpoint folder (config.json, safetensors, tokenizer) and a llama.cpp GGUF file, either way:
a folder IN becomes the GGUF file OUT (the layout and metadata llama.cpp's convert_hf_to_gguf.py writes, tokenizer
and chat template included); a .gguf file IN becomes the folder OUT (dequantised weights in the official layout,
tokenizer.json, tokenizer_config.json and chat_template.jinja rebuilt from the file).
"""

_CONVERT_EPILOG = """\
types (--type, folder -> GGUF):
  bf16   every matrix in BF16
  q8_0   every matrix in Q8_0 (as the converter's --outtype q8_0)
  q4_0   the large matrices in Q4_0; embedding, output head, DeltaNet in_proj_a / in_proj_b and mtp.fc in Q8_0
  Norms, routers, the DeltaNet conv / A / dt stay F32 in every type.

examples:
  qwen35 convert ~/models/Qwen3.5-0.8B qwen3.5-0.8b-q8_0.gguf --type q8_0
  qwen35 convert Qwen3.5-0.8B-Q4_K_M.gguf ~/models/qwen3.5-0.8b-from-gguf
"""


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="checkpoint folder -> GGUF file, or GGUF file -> checkpoint folder",
                       description=_CONVERT_DESCRIPTION, epilog=_CONVERT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="a checkpoint folder, or a .gguf file")
    p.add_argument("output", metavar="OUT", help="the .gguf file to write (IN a folder), or the folder (IN a .gguf)")
    # qwen35.quant.gguf.FILE_TYPES, spelled out so that building the parser imports no torch
    p.add_argument("--type", choices=["bf16", "q8_0", "q4_0"], default="bf16",
                   help="tensor type of the GGUF written from a folder (default: bf16)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto",
                   help="dtype of the weights: of the model read from IN (default: auto, bf16 unless all float32)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="folder with the tokenizer.json to put in the GGUF (default: IN)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import CheckpointError, load_model, save_pretrained
    from .quant.gguf import GGUFError, load_gguf, read_gguf_metadata, save_gguf

    src, dst = Path(args.input), Path(args.output)
    start = time.perf_counter()
    try:
        if src.is_dir():
            if dst.suffix.lower() != ".gguf" or dst.is_dir():
                raise CommandError(f"OUT must be a .gguf file path when IN is a folder, got {dst}")
            model = load_model(src, dtype=args.dtype, quantization=None)  # GGUF types start from float
            save_gguf(model, Path(args.tokenizer) if args.tokenizer else src, dst, file_type=args.type)
        elif src.is_file() and src.suffix.lower() == ".gguf":
            from .chat.gguf_vocab import write_tokenizer_files
            from .chat.tokenizer import TokenizerError

            if dst.exists() and not dst.is_dir():
                raise CommandError(f"OUT must be a folder when IN is a .gguf file, and {dst} is a file")
            model = load_gguf(src, dtype=args.dtype)
            save_pretrained(model, dst)
            try:
                write_tokenizer_files(read_gguf_metadata(src), dst,
                                      model_max_length=model.config.text.max_position_embeddings)
            except TokenizerError as e:
                raise CommandError(str(e)) from None
        else:
            raise CommandError(f"IN must be a checkpoint folder or a .gguf file, got {src}")
    except (CheckpointError, GGUFError) as e:
        raise CommandError(str(e).splitlines()[0]) from None
    print(f"wrote {dst} in {time.perf_counter() - start:.1f}s")
    return 0


_QUANTIZE_DESCRIPTION = """\
Write a quantized copy of a checkpoint folder that qwen35 (and, for fp8, transformers and vLLM) loads directly.
A machine that cannot hold the bf16 weights then loads the quantized folder with about its size in memory.

IN is read tensor by tensor and each converted weight is quantized as it is read, so the float model is never
built: the peak memory is about the quantized model plus one shard being written.  OUT is an ordinary folder
(config.json with the format's quantization_config, safetensors, the tokenizer files copied from IN).

formats:
  fp8   the official Qwen3.5-*-FP8 layout: weight float8_e4m3fn + weight_scale_inv float32 per 128x128 block;
        quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}.
        Kept high precision as in the official release: embeddings, lm_head, DeltaNet in_proj_a/in_proj_b,
        the MoE router and shared_expert_gate, mtp.fc, norms, conv1d, A_log, dt_bias, the vision tower.
  int8  weight-only int8, one scale per output row (qwen35's --quantization int8), in compressed-tensors'
        naming: weight int8 + weight_scale float32 [rows, 1]; quantization_config {"quant_method":
        "compressed-tensors", "format": "int-quantized", ...}.  lm_head is int8 too; the same exceptions
        otherwise.
  int4  4-bit symmetric weights, one bf16 scale per group of 32 inputs (--group-size), qwen35's own packing
        (qwen35/quant/int4.py): weight uint8 [rows, inputs/2] + weight_scale bfloat16 [rows, inputs/group] +
        weight_shape int64 [2]; the lm_head int8 by default (--lm-head); quantization_config
        {"quant_method": "qwen35-int4", "group_size": 32, "lm_head": "int8", ...}.  Only qwen35 reads it.
Routed experts are written per expert (experts.E.{gate,up,down}_proj.weight), as the official FP8 checkpoints are.
"""

_QUANTIZE_EPILOG = """\
examples:
  qwen35 quantize ~/models/Qwen3.5-0.8B ~/models/Qwen3.5-0.8B-fp8 --quantization fp8
  qwen35 generate --model ~/models/Qwen3.5-0.8B-fp8 "Hello"      # loads as FP8, no --quantization needed
  qwen35 quantize ~/models/Qwen3.5-35B-A3B ~/models/Qwen3.5-35B-A3B-int4 --quantization int4
"""


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="checkpoint folder -> quantized checkpoint folder (fp8, int8, int4)",
                       description=_QUANTIZE_DESCRIPTION, epilog=_QUANTIZE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="a checkpoint folder (bf16, float32, or quantized: re-quantized)")
    p.add_argument("output", metavar="OUT", help="the folder to write (created; must not be IN)")
    p.add_argument("--quantization", required=True, choices=["fp8", "int8", "int4"],
                   help="the weight format to write (see above)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="int4 only: inputs sharing one scale, a power of two >= 32 (default 32: the lowest KL "
                        "measured, 4.5 bits per weight; 64 is 4.25)")
    p.add_argument("--lm-head", choices=["int8", "int4", "keep"], default=None,
                   help="int4 only: how the output head is stored (default int8: the KL of a bf16 head at half "
                        "its bytes; keep: the model's dtype)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto",
                   help="dtype of the weights kept high precision (default: auto, bf16 unless IN is all float32)")
    p.add_argument("--max-shard-size", metavar="SIZE", default="2GiB",
                   help="largest safetensors shard to write, e.g. 2GiB (default); the writer holds one shard in "
                        "memory at a time")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import CheckpointError, load_model, save_pretrained
    from .llm import parse_bytes

    src, dst = Path(args.input), Path(args.output)
    if not src.is_dir():
        raise CommandError(f"IN must be a checkpoint folder, got {src}")
    if dst.exists() and (not dst.is_dir() or dst.resolve() == src.resolve()):
        raise CommandError(f"OUT must be a new folder (not IN, not a file), got {dst}")
    try:
        shard = parse_bytes(args.max_shard_size)
    except ValueError as e:
        raise CommandError(str(e)) from None
    quantization = args.quantization
    if args.group_size is not None or args.lm_head is not None:
        if quantization != "int4":
            raise CommandError(f"--group-size and --lm-head apply to --quantization int4, not {quantization}")
        from .quant.int4 import DEFAULT_GROUP_SIZE
        from .quant.saved import Int4Format

        try:
            quantization = Int4Format(group_size=DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size,
                                      lm_head=None if args.lm_head == "keep" else args.lm_head or "int8")
        except ValueError as e:
            raise CommandError(str(e)) from None
    start = time.perf_counter()
    try:
        # an explicit dtype would widen a quantized IN first; "auto" keeps the rest of the weights as stored
        model = load_model(src, dtype=args.dtype, quantization=quantization)
        save_pretrained(model, dst, max_shard_bytes=shard)
    except CheckpointError as e:
        raise CommandError(str(e).splitlines()[0]) from None
    print(f"wrote {dst} ({args.quantization}) in {time.perf_counter() - start:.1f}s")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.cli import DESCRIPTION, EPILOG, add_train_arguments

    p = sub.add_parser("train", help="train a small Qwen3.5 (+ MTP head) on synthetic chat data",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train.cli import run_train

    return run_train(args)


def _add_rl(sub: argparse._SubParsersAction) -> None:
    from .rl.cli import DESCRIPTION, EPILOG, add_rl_arguments  # no torch, no ray: --help stays instant

    p = sub.add_parser("rl", help="improve a model with RL on verifiable tasks (Ray: rollouts + trainer)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rl_arguments(p)
    p.set_defaults(func=_run_rl)


def _run_rl(args: argparse.Namespace) -> int:
    from .rl.cli import run_rl_command

    return run_rl_command(args)


# ----------------------------------------------------------------------------------------------------------------
# the parser and the entry point

# Adders of every subcommand, in the order `qwen35 --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_generate, _add_chat,
                                                                    _add_serve, _add_train, _add_rl, _add_convert,
                                                                    _add_quantize]


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
        check_switches()
    except ValueError as e:  # a bad QWEN35_CPU_BF16 / QWEN35_NATIVE_ISA: say so before loading anything
        return _fail(args.command, str(e))
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`qwen35 info ... | head`): not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error while exiting
        return 0
    except (CommandError, ConfigError, OSError) as e:  # OSError: a folder or file that cannot be read
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _fail(args.command, message)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
