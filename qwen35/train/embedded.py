"""The embedded default model: its config, the recipe that trains it, and its evaluation.

The model is a tiny Qwen3.5-MoE in the official text-only format (``qwen3_5_moe_text``): 4 layers in the 3:1
pattern (three Gated DeltaNet, one gated attention), 8 routed experts (top 2) plus a sigmoid-gated shared
expert in every layer, one MTP block, a 2048-token byte-level BPE.  About 7 M parameters with the MTP block, so
the bf16 checkpoint is ~14 MB; transformers loads it as ``Qwen3_5MoeForCausalLM``.

Why this shape (measured on the project's 2-core CPU machine): at this size the step time
is dominated by per-op overhead and the delta rule, so 4 wide layers train about 1.7x more tokens per second
than 8 narrower ones of similar parameter count; within a ~50 minute budget the token count matters more than
depth for the rigid, local procedures of the synthetic tasks (the DeltaNet layers do the in-context recall the
digit-by-digit traces need).  Narrow experts (128) keep the active compute per token small; the shared expert
(256) carries what every token needs.

Throughput of the recipe: 1,300-1,700 tokens/s on the 2-core CPU machine with both threads free (~2,100 tokens
per step of 16 sequences, 1.2-1.6 s per step, so the default 2,400 steps take about an hour), ~23,000 tokens/s
on one H100 (``--device cuda``, ~4.5 minutes).  Measured on held-out problems (benchmarks/RESULTS.md): 1,200 steps learn
every format but not operand copying (2-digit addition 0%); 2,400 steps reach 92-100% on 2-digit addition.

Vision stage: ``python -m qwen35.train.embedded --out DIR --vision-from qwen35/assets/default [--vision-steps N]``
gives a trained model a tiny vision tower and trains both on synthetic picture questions
(:mod:`qwen35.train.embedded_vision`).

Recipe: ``python -m qwen35.train.embedded --out DIR [--steps N] [--device cuda]`` trains (tokenizer, model,
MTP head), writes ``DIR/model`` (the checkpoint folder to ship, bf16) and evaluates it into ``DIR/eval.json``:

* exact match per verifiable task on held-out problems, greedy, chat template with thinking on;
* tool calls on held-out tool prompts: parsed with ``qwen35.chat.parsers.parse_tool_calls`` and checked against
  the tool schemas (well-formed), and against the expected calls (exact);
* MTP top-1 acceptance under teacher forcing on held-out chat text: against the true token after next, and
  against the main model's own greedy prediction of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qwen35.train.config import TrainConfig

EMBEDDED_MODEL: dict[str, Any] = {
    "model_type": "qwen3_5_moe_text",
    "architectures": ["Qwen3_5MoeForCausalLM"],
    "vocab_size": 2048,  # replaced by the trained tokenizer's size
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    # gated attention: 4 query heads sharing 2 KV heads of 64; a quarter of each head rotates (16 dims), as in
    # the official models; theta 1e4 instead of 1e7 because the context is ~1k tokens, not 262k
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    # Gated DeltaNet: 4 q/k heads of 32, 8 value heads of 32 (two value heads per key head, as officially)
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 256,
    "router_aux_loss_coef": 0.001,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False,
    "mamba_ssm_dtype": "float32",
}

# Task weights of the recipe: 2-digit addition is the headline behaviour, the other arithmetic shares its
# procedure; tool tasks carry a ~350-token tool prompt for ~45 learned tokens, so they are kept lighter.
EMBEDDED_MIX: dict[str, float] = {
    "add2": 2.5, "add3": 1.5, "sub2": 1.0, "sub3": 1.0,
    "count": 0.8, "sort": 0.6, "reverse": 0.6, "upper": 0.4, "remove": 0.5,
    "calculator": 0.6, "lookup": 0.6, "multi_tool": 0.3, "multi_turn": 0.6,
    "story": 0.4, "chat": 0.3, "text": 0.4,
}

DEFAULT_STEPS = 2400


def recipe_config(out_dir: str | Path, steps: int = DEFAULT_STEPS, threads: int | None = 2, **overrides: Any
                  ) -> TrainConfig:
    """The TrainConfig of the embedded model (warmup and schedule scale with ``steps``)."""
    cfg = TrainConfig(
        model="embedded", steps=steps, batch_size=16, grad_accum=1, seq_len=640,
        lr=3e-3, min_lr=3e-4, warmup_steps=min(100, max(1, steps // 20)), weight_decay=0.1, grad_clip=1.0,
        mtp_loss_weight=0.3, eval_every=max(1, steps // 15), eval_batches=8, save_every=max(1, steps // 10),
        seed=0, out_dir=str(out_dir), n_held_out=256, vocab_size=2048, tokenizer_examples=6000,
        data_mix=dict(EMBEDDED_MIX), think_prob=0.7, threads=threads,
        save_dtype="bfloat16")  # as official checkpoints; halves the shipped size (A_log, dt_bias stay fp32)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def run_recipe(out_dir: str | Path, steps: int = DEFAULT_STEPS, threads: int | None = 2, resume: bool = False,
               evaluate_after: bool = True, eval_per_task: int = 50, **overrides: Any) -> dict[str, Any]:
    """Tokenizer + training + evaluation; returns the evaluation (also written to ``out_dir/eval.json``)."""
    from qwen35.train.loop import train

    cfg = recipe_config(out_dir, steps, threads, **overrides)
    result = train(cfg, resume=resume)
    report: dict[str, Any] = {"train_seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                              "final_eval_loss": result.evals[-1] if result.evals else None}
    if evaluate_after and result.model_dir is not None:
        report.update(evaluate(result.model_dir, per_task=eval_per_task, device=cfg.device))
    (Path(out_dir) / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------------------------------
# evaluation

EVAL_SEED = 12345  # any seed gives held-out problems (the split is by problem hash); fixed for comparability
TOOL_TASKS = ("calculator", "lookup", "multi_tool")


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
                    max_new_tokens: int = 384, batch_size: int = 32,
                    images: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt until a stop id (included) or the budget, in left-padded batches with
    a :class:`SequenceCache` (each row gets the tokens it would get alone).

    ``images[i]``: the ``(pixel_values, image_grid_thw)`` of prompt i's pictures (its image pad tokens already
    expanded), or None for a text prompt; the prompt pass then takes them and positions are M-RoPE."""
    from qwen35.model import SequenceCache

    device = next(model.parameters()).device
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        L = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for r, i in enumerate(rows):
            p = torch.tensor(list(prompts[i]), dtype=torch.long)
            ids[r, L - len(p):] = p
            mask[r, L - len(p):] = 1
        cache = SequenceCache()
        pictures = [images[i] for i in rows if images[i] is not None] if images is not None else []
        vision = {}
        if pictures:
            vision = {"pixel_values": torch.cat([p for p, _ in pictures]).to(device),
                      "image_grid_thw": torch.cat([g for _, g in pictures])}
        out = model(ids.to(device), attention_mask=mask.to(device), cache=cache, logits_to_keep=1, **vision)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        gen: list[list[int]] = [[] for _ in rows]
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            picked, finished = nxt.tolist(), done.tolist()
            for r in range(len(rows)):
                if not finished[r]:
                    gen[r].append(picked[r])
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
            out = model(nxt[:, None], cache=cache, logits_to_keep=1)
        for r, i in enumerate(rows):
            results[i] = gen[r]
    return results


def _held_out(task: str, n: int, max_rounds: int = 200) -> list[dict[str, Any]]:
    """Up to n held-out examples of one task, one per problem (thinking mode is set by the caller).  Tasks
    with few distinct problems (a word list of a few hundred entries) may hold out fewer than n: the
    evaluation then uses all of them and reports the count."""
    from qwen35.train.data import generate_examples, is_held_out

    seen, out = set(), []
    for round_ in range(max_rounds):
        for ex in generate_examples(256, EVAL_SEED * 1_000_003 + round_, {task: 1.0}):
            key = tuple(ex["keys"])
            if is_held_out(ex) and key not in seen:
                seen.add(key)
                out.append(ex)
                if len(out) == n:
                    return out
    return out


def check_tool_calls(calls, tools: Sequence[Mapping[str, Any]]) -> bool:
    """Whether parsed calls are well formed against the schemas: at least one call, every function known, every
    required parameter present, no unknown parameter, values of the declared JSON type and enum, and no string value
    holding the call format's own tags.  (The parser keeps a header outside the schema as text of the value before
    it -- real values may quote the format -- but no answer of these tasks does, so here it is a malformed call.)"""
    if not calls:
        return False
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools}
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
             "array": list}
    for call in calls:
        if call.name not in schemas:
            return False
        try:
            args = json.loads(call.arguments)
        except json.JSONDecodeError:
            return False
        schema = schemas[call.name]
        props = schema.get("properties", {})
        if not isinstance(args, dict) or set(schema.get("required", [])) - set(args) or set(args) - set(props):
            return False
        for name, value in args.items():
            spec = props[name]
            if "type" in spec and spec["type"] in kinds and not isinstance(value, kinds[spec["type"]]):
                return False
            if "enum" in spec and value not in spec["enum"]:
                return False
            if isinstance(value, str) and any(tag in value for tag in _CALL_TAGS):
                return False
    return True


_CALL_TAGS = ("<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>")


def _expected_calls(message: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["function"]["name"], dict(c["function"]["arguments"])) for c in message.get("tool_calls", [])]


def evaluate(model_dir: str | Path, per_task: int = 50, tasks: Sequence[str] | None = None,
             max_new_tokens: int = 384, mtp_examples: int = 200, batch_size: int = 32,
             hidden_source: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Held-out evaluation of a trained checkpoint folder (see the module docstring for the metrics).

    Returns ``{"exact_match": {task: rate}, "exact_match_mean": ..., "tool_calls": {...}, "mtp": {...},
    "samples": {task: first generated answer}, "seconds": ...}``."""
    from qwen35.chat import Tokenizer, parse_tool_calls, split_reasoning
    from qwen35.checkpoint import load_model
    from qwen35.train.data import VERIFIABLE_TASKS, check_answer, prompt_for

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    # the MTP head is model.mtp, reading the hidden source it was trained with unless one is asked for
    model = load_model(model_dir, dtype="float32", mtp_hidden_source=hidden_source).eval().to(device)
    tok = Tokenizer(model_dir)
    raw_tok = _raw_tokenizer(model_dir)
    stop = sorted(tok.stop_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.endoftext_id

    report: dict[str, Any] = {"exact_match": {}, "samples": {}, "tool_calls": {}}
    prompts: list[list[int]] = []
    jobs: list[tuple[str, str, dict[str, Any]]] = []  # (kind, task, example)
    for task in (tasks or VERIFIABLE_TASKS):
        for ex in _held_out(task, per_task):
            messages, tools, _ = prompt_for(ex)  # the last assistant turn holds the checkable answer
            prompts.append(tok.encode(tok.apply_chat_template(messages, tools=tools, enable_thinking=True)))
            jobs.append(("answer", task, ex))
            if task in TOOL_TASKS:  # the first assistant turn must be a tool call
                messages, tools, _ = prompt_for(ex, 0)
                prompts.append(tok.encode(tok.apply_chat_template(messages, tools=tools, enable_thinking=True)))
                jobs.append(("call", task, ex))
    outputs = greedy_generate(model, prompts, stop, pad, max_new_tokens, batch_size)

    hits: dict[str, list[bool]] = {}
    formed: dict[str, list[bool]] = {}
    exact_calls: dict[str, list[bool]] = {}
    for (kind, task, ex), ids in zip(jobs, outputs):
        text = tok.decode([i for i in ids if i not in tok.stop_token_ids])
        _, content = split_reasoning(text, thinking=True)
        if kind == "answer":
            ok = check_answer(ex, content)
            hits.setdefault(task, []).append(ok)
            report["samples"].setdefault(task, text[-300:])
        else:
            first = [m for m in ex["messages"] if m["role"] == "assistant"][0]
            _, calls = parse_tool_calls(content, ex["tools"])
            formed.setdefault(task, []).append(check_tool_calls(calls, ex["tools"]))
            got = [(c.name, json.loads(c.arguments)) for c in calls]
            exact_calls.setdefault(task, []).append(got == _expected_calls(first))
    report["exact_match"] = {t: sum(v) / len(v) for t, v in hits.items()}
    report["problems"] = {t: len(v) for t, v in hits.items()}
    report["exact_match_mean"] = sum(report["exact_match"].values()) / max(len(report["exact_match"]), 1)
    report["tool_calls"] = {
        "well_formed": {t: sum(v) / len(v) for t, v in formed.items()},
        "exact": {t: sum(v) / len(v) for t, v in exact_calls.items()},
    }
    report["n_per_task"] = per_task
    if model.mtp is not None and mtp_examples > 0:
        report["mtp"] = mtp_acceptance(model, model.mtp, raw_tok, mtp_examples)
    report["seconds"] = time.perf_counter() - t0
    return report


def _raw_tokenizer(model_dir: Path):
    """The ``tokenizers`` object itself: encode_with_mask needs the character offsets of each token."""
    from tokenizers import Tokenizer as RawTokenizer

    return RawTokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


@torch.no_grad()
def mtp_acceptance(model, head, tok, n_examples: int = 200, examples: Sequence[dict[str, Any]] | None = None
                   ) -> dict[str, float]:
    """Teacher-forced top-1 acceptance of the MTP head on held-out chat text.

    At each position t the head reads the main model's hidden state at t and the true token t+1 and predicts
    token t+2.  ``vs_truth``: that prediction equals the true token t+2.  ``vs_main``: it equals the main
    model's own greedy prediction of token t+2 (argmax of its logits at t+1) — what speculative decoding with
    one draft token accepts.  ``tok`` is the ``tokenizers.Tokenizer`` (offsets are needed for the loss
    mask).  ``*_assistant`` restricts to positions whose token t+2 is assistant output
    (what a model generates); ``main_accuracy_assistant`` is the main model's own next-token accuracy there.
    """
    from qwen35.train.bpe import encode_with_mask
    from qwen35.train.data import generate_split, render_with_spans

    if examples is None:
        _, examples = generate_split(0, n_examples, EVAL_SEED + 1)
    sums = dict.fromkeys(("truth", "main", "truth_a", "main_a", "main_acc_a"), 0)
    n = n_a = 0
    for ex in examples:
        text, spans = render_with_spans(ex)
        ids, mask = encode_with_mask(tok, text, spans)
        if len(ids) < 3:
            continue
        x = torch.tensor([ids], device=model.device)
        out = model(x)
        logits2, _ = head.draft(model, out.hidden_states[:, :-2], x[:, 1:-1])
        draft = logits2[0].argmax(-1)  # predictions of tokens 2..T-1
        truth = x[0, 2:]
        main = out.logits[0, 1:-1].argmax(-1)  # the main model's prediction of the same tokens
        m = torch.tensor(mask[2:], dtype=torch.bool, device=x.device)
        sums["truth"] += int((draft == truth).sum())
        sums["main"] += int((draft == main).sum())
        sums["truth_a"] += int(((draft == truth) & m).sum())
        sums["main_a"] += int(((draft == main) & m).sum())
        sums["main_acc_a"] += int(((main == truth) & m).sum())
        n += len(truth)
        n_a += int(m.sum())
    return {"vs_truth": sums["truth"] / max(n, 1), "vs_main": sums["main"] / max(n, 1),
            "vs_truth_assistant": sums["truth_a"] / max(n_a, 1), "vs_main_assistant": sums["main_a"] / max(n_a, 1),
            "main_accuracy_assistant": sums["main_acc_a"] / max(n_a, 1), "positions": n,
            "assistant_positions": n_a}


# ----------------------------------------------------------------------------------------------------------------
# which hidden state should the MTP head read?


def compare_mtp_hidden_sources(model_dir: str | Path, steps: int = 300, batch_size: int = 16, lr: float = 3e-3,
                               seed: int = 1, n_eval: int = 200, threads: int | None = None) -> dict[str, Any]:
    """Train two fresh MTP heads on the frozen trunk of a trained model, one reading the pre-norm and one the
    post-norm hidden states, on the same batches, and report each one's acceptance (:func:`mtp_acceptance`).

    The trunk is shared and frozen, so the only difference is the hidden source.  (A trunk trained jointly
    with one of the two heads may slightly favour that one.)"""
    from qwen35.checkpoint import load_model
    from qwen35.model import init_weights
    from qwen35.model.mtp import HIDDEN_SOURCES, MTPHead
    from qwen35.train.batches import BatchStream, encode_examples
    from qwen35.train.data import generate_split
    from qwen35.train.losses import mtp_inputs
    from qwen35.train.optim import OptimConfig, make_optimizer, optimizer_step

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = load_model(model_dir, dtype="float32").eval()
    tok = _raw_tokenizer(Path(model_dir))
    train_ex, _ = generate_split(steps * batch_size, 0, seed + 1000)
    data = encode_examples(tok, train_ex, 640)
    stream = BatchStream(data, batch_size, seed, tok.token_to_id("<|endoftext|>"))
    cfg = OptimConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 20), weight_decay=0.1)
    heads, opts = {}, {}
    for src in HIDDEN_SOURCES:
        heads[src] = MTPHead(model.text_config, src)
        init_weights(heads[src])
        opts[src] = make_optimizer(list(heads[src].parameters()), cfg)
    losses: dict[str, list[float]] = {s: [] for s in HIDDEN_SOURCES}
    for step in range(steps):
        batch = stream[step]
        with torch.no_grad():
            hidden = model(batch.ids, logits_to_keep=1).hidden_states
        h, nxt = mtp_inputs(hidden, batch.ids)
        keep = batch.loss_mask[:, 2:]
        for src, head in heads.items():
            logits, _, _ = head.draft_with_router(model, h, nxt, logits_at=keep)
            loss = torch.nn.functional.cross_entropy(logits, batch.ids[:, 2:][keep])
            loss.backward()
            optimizer_step(opts[src], list(head.parameters()), step, cfg)
            losses[src].append(float(loss.detach()))
    _, held = generate_split(0, n_eval, EVAL_SEED + 1)
    out: dict[str, Any] = {}
    for src, head in heads.items():
        head.eval()
        out[src] = mtp_acceptance(model, head, tok, examples=held)
        out[src]["final_train_loss"] = sum(losses[src][-20:]) / min(20, len(losses[src]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qwen35.train.embedded",
        description="Train the embedded default model (tokenizer, model, MTP head) and evaluate it.")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder; the checkpoint goes to DIR/model")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimiser steps (default {DEFAULT_STEPS})")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", help="where to train and evaluate: cpu (default), cuda, cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the run saved in DIR/checkpoint")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--eval-only", action="store_true", help="only evaluate DIR/model")
    p.add_argument("--per-task", type=int, default=50, help="held-out problems per task in the evaluation")
    p.add_argument("--compare-mtp-sources", type=int, metavar="STEPS", default=0,
                   help="after training, train fresh pre-norm and post-norm MTP heads on the frozen model for "
                        "STEPS steps and report their acceptance")
    p.add_argument("--vision-from", metavar="MODEL",
                   help="instead: the vision stage (qwen35.train.embedded_vision) -- give the trained text model "
                        "folder MODEL a vision tower and train both on picture questions with text replay")
    from qwen35.train.embedded_vision import add_arguments, run_from_args

    add_arguments(p)
    args = p.parse_args(argv)
    if args.vision_from:
        return run_from_args(args, args.vision_from)
    out = Path(args.out)
    if args.eval_only:
        torch.set_num_threads(args.threads)
        report = evaluate(out / "model", per_task=args.per_task, device=args.device)
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    else:
        report = run_recipe(out, args.steps, args.threads, resume=args.resume, evaluate_after=not args.no_eval,
                            eval_per_task=args.per_task, device=args.device)
    if args.compare_mtp_sources:
        report["mtp_hidden_sources"] = compare_mtp_hidden_sources(out / "model", args.compare_mtp_sources,
                                                                  threads=args.threads)
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["EMBEDDED_MODEL", "EMBEDDED_MIX", "DEFAULT_STEPS", "recipe_config", "run_recipe", "evaluate",
           "greedy_generate", "mtp_acceptance", "check_tool_calls", "compare_mtp_hidden_sources", "main"]
