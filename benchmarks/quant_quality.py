"""How much each weight format changes a model's next-token distributions, measured rather than assumed.

For every format in ``--formats`` the checkpoint is loaded, converted, and run over the same held-out token
sequences as the unconverted (bf16) reference; per predicted position it compares the two next-token
distributions:

  KL        mean KL(p_bf16 || p_format) in nats over all positions (llama.cpp's perplexity tool reports the same
            quantity as "Mean KLD"); also its 99th percentile
  top-1     how often the format's most likely next token is the reference's
  ppl       perplexity of the format on the held-out text (the real next tokens)
  weights   bytes of the converted model's parameters and buffers as a bf16 deployment holds them: every tensor
            at its element_size() (fp8 / int8 / uint8 data, float32 and bf16 scales), a tied matrix once; in the
            float32 comparison run (--dtype float32) the float32 parameters a bf16 load keeps in bf16 count 2 B

Held-out text: the embedded model's own held-out split (``qwen35.train.data.generate_split`` with its evaluation
seed, rendered with the chat template exactly as in training), tokenized with the checkpoint's tokenizer; scored
are the assistant turns' tokens (``--positions assistant``, what the model was trained to produce; prompts are
context) or every token (``--positions all``, the choice for random-weight checkpoints, where only the KL and
top-1 columns mean anything).
Products run in float32 by default so that the only difference between rows is the weight format; a checkpoint too
large for that (the 35B-A3B shape cut to 8 layers: 15 GB in bf16) runs with ``--dtype bfloat16``.  Every format is
quantized tensor by tensor while the checkpoint is read (qwen35.load_model(..., quantization=...)), so no row ever
holds the float model next to its quantized one; the reference's log-probabilities are kept (positions x vocab
float32: keep --sequences x --tokens small for a 248K vocabulary).

  python benchmarks/quant_quality.py                                  # the embedded model, every format
  python benchmarks/quant_quality.py --model /path/to/ckpt --formats bf16,int8,int4 --sequences 8 --tokens 128
  python benchmarks/quant_quality.py --markdown results.md            # also write the table there
  python benchmarks/quant_quality.py --model $RIG/ckpt/qwen35-35b-a3b-8L-random --dtype bfloat16 \
      --positions all --formats int4 --sequences 2 --tokens 64 --threads 2

A new format is one entry in FORMATS (name -> the ``quantization`` argument of qwen35.load_model).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen35.checkpoint import KEEP_FP32  # noqa: E402
from qwen35.quant.saved import Int4Format, SavedFormat  # noqa: E402

# name -> the format load_model quantizes into while reading ("bf16" is the reference: None, the float model)
FORMATS: dict[str, str | SavedFormat | None] = {
    "bf16": None,
    "int8": "int8",
    "fp8": "fp8",  # block-FP8 as the official -FP8 checkpoints (qwen35/quant/fp8.py)
    "int4": "int4",  # the default recipe: group 32, lm_head int8
    "int4-g64": Int4Format(group_size=64),
    "int4-g128": Int4Format(group_size=128),
    "int4-head4": Int4Format(lm_head="int4"),
    "int4-head16": Int4Format(lm_head=None),
    # the same weights with float32 activations in every product (Limits.q8_activations off): what rounding the
    # activations to int8 per block of 32, the default of the native int4 / int8 products, costs
    "int8-float-act": "int8",
    "int4-float-act": "int4",
}
FLOAT_ACTIVATIONS = {"int8-float-act", "int4-float-act"}


@contextlib.contextmanager
def activations_for(name: str):
    """Products of format ``name`` with int8-rounded activations (the default) or float32 ones."""
    from qwen35.kernels import ops

    saved = dict(ops.LIMITS)
    if name in FLOAT_ACTIVATIONS:
        for kind, lim in saved.items():
            ops.LIMITS[kind] = dataclasses.replace(lim, q8_activations=False)
    try:
        yield
    finally:
        ops.LIMITS.update(saved)


HELD_OUT_SEED = 12346  # the embedded model's own evaluation draws its held-out set with this seed (EVAL_SEED + 1)


def token_sequences(model_path: str, n: int, max_tokens: int, vocab: int, positions: str
                    ) -> list[tuple[list[int], list[bool]]]:
    """(token ids, whether each id is scored) for n held-out examples.  ``positions="assistant"`` scores the
    tokens of the assistant turns (what the model generates and was trained on; prompts are context),
    ``"all"`` every token."""
    from tokenizers import Tokenizer

    from qwen35.train.bpe import encode_with_mask
    from qwen35.train.data import generate_split, render_with_spans

    tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
    _, held = generate_split(0, n, seed=HELD_OUT_SEED)
    out = []
    for ex in held:
        ids, mask = encode_with_mask(tok, *render_with_spans(ex))
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if positions == "all":
            mask = [True] * len(ids)
        if any(i >= vocab for i in ids):
            raise SystemExit(f"{model_path}: its tokenizer gives ids beyond the model's vocabulary of {vocab}")
        if len(ids) > 1 and any(mask[1:]):
            out.append((ids, mask))
    return out


def load(model_path: str, dtype: str, quantization: str | SavedFormat | None) -> torch.nn.Module:
    from qwen35.checkpoint import load_model

    return load_model(model_path, dtype=dtype, quantization=quantization).eval()


def model_bytes(model: torch.nn.Module, widened: bool) -> int:
    """Bytes of the parameters and persistent buffers as a bf16 deployment holds them, a shared tensor once:
    each at its element_size().  ``widened``: the model was loaded in float32 for the comparison, so its float32
    parameters (embeddings, norms, kept projections) count as the bf16 they are deployed in, except A_log /
    dt_bias, which a bf16 load keeps in float32 too; buffers (quantized weights, their scales) are in their
    format's own dtypes whatever the load dtype."""
    params = {id(p) for p in model.parameters()}
    seen, total = set(), 0
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        size = t.element_size()
        if widened and id(t) in params and t.dtype == torch.float32 and not name.endswith(KEEP_FP32):
            size = 2
        total += t.numel() * size
    return total


@torch.inference_mode()
def log_probs(model: torch.nn.Module, seqs: list[tuple[list[int], list[bool]]]) -> list[torch.Tensor]:
    """Per sequence, the log-probabilities of the next token at every scored position [n_scored, vocab]."""
    out = []
    for ids, mask in seqs:
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        out.append(torch.log_softmax(logits[torch.tensor(mask[1:])], dim=-1))
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], seqs: list[tuple[list[int], list[bool]]]
            ) -> dict[str, float]:
    kls, agree, nll, n = [], 0, 0.0, 0
    for r, g, (ids, mask) in zip(ref, got, seqs):
        kls.append((r.exp() * (r - g)).sum(-1))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        targets = torch.tensor(ids[1:])[torch.tensor(mask[1:])]
        nll += float(-g.gather(-1, targets[:, None]).sum())
        n += len(targets)
    kl = torch.cat(kls)
    return {"kl": float(kl.mean()), "kl99": float(kl.quantile(0.99)), "top1": agree / n,
            "ppl": float(torch.exp(torch.tensor(nll / n))), "positions": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--sequences", type=int, default=64, help="held-out examples (default 64)")
    p.add_argument("--tokens", type=int, default=512, help="at most this many tokens per example (default 512)")
    p.add_argument("--positions", choices=["assistant", "all"], default="assistant",
                   help="score the assistant turns' tokens (default: what the model generates) or every token")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the float weights and activations (default float32: only the format differs "
                        "between rows; bfloat16 halves the reference's memory for big checkpoints)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from qwen35.llm import default_model_path

    model_path = a.model or str(default_model_path())
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        p.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if "bf16" in formats:
        formats.remove("bf16")
    t0 = time.perf_counter()
    widened = a.dtype == "float32"
    ref_model = load(model_path, a.dtype, None)
    seqs = token_sequences(model_path, a.sequences, a.tokens, ref_model.config.text.vocab_size, a.positions)
    ref = log_probs(ref_model, seqs)
    rows = [("bf16", compare(ref, ref, seqs), model_bytes(ref_model, widened))]
    del ref_model
    gc.collect()
    print(f"  reference done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for name in formats:
        m = load(model_path, a.dtype, FORMATS[name])
        with activations_for(name):
            rows.append((name, compare(ref, log_probs(m, seqs), seqs), model_bytes(m, widened)))
        del m
        gc.collect()
        print(f"  {name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    base = rows[0][2]
    lines = [f"KL divergence to bf16 over {rows[0][1]['positions']} next-token positions ({a.positions} tokens) of "
             f"{len(seqs)} held-out sequences, `{model_path}` ({torch.get_num_threads()} thread(s), {a.dtype} "
             "weights and activations; weights = bytes as deployed in bf16)", "",
             "| format | mean KL (nats) | KL p99 | top-1 agreement | perplexity | weights |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r, nbytes in rows:
        lines.append(f"| {name} | {r['kl']:.5f} | {r['kl99']:.4f} | {100 * r['top1']:.2f}% | {r['ppl']:.4f} | "
                     f"{nbytes / 2**20:.1f} MiB ({100 * nbytes / base:.0f}%) |")
    table = "\n".join(lines)
    print(table)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
