"""Prefix caching on a multi-turn chat: time to first token of every turn with and without the cache, and the share
of each turn's prompt served from it.

A conversation of --turns turns (a long system prompt, short questions, thinking on, greedy) is run twice on one
loaded model: with prefix caching (the default) and with it off (a second engine on the same weights).  Each turn's
prompt is the chat template's rendering of the whole history, including the previous answers as ``result.message``
(the template drops their reasoning), so a cached turn recomputes only the last answer, the new question and the
generation prompt.  The two runs must produce the same conversation; the script says so.

  python benchmarks/bench_prefix_cache.py                       # the embedded model
  python benchmarks/bench_prefix_cache.py --model CKPT --max-tokens 16 --system-tokens 400
      (CKPT: e.g. a random-weight checkpoint of the Qwen3.5-0.8B shape, made with the peers' tools'
      make_random_checkpoint.py --which dense; its answers are noise, which does not matter for the timing)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-tokens", type=int, default=600, help="length of the system prompt (default: 600)")
    ap.add_argument("--max-tokens", type=int, default=160, help="tokens per answer at most (default: 160)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    a = ap.parse_args(argv)

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
    on, off = results["on"], results["off"]
    same = [r["answer"] for r in on] == [r["answer"] for r in off]

    import torch
    print(f"\nmodel {a.model or 'embedded'} ({llm.model.dtype}), {torch.get_num_threads()} threads; "
          f"{a.turns} turns, system prompt {len(tok.encode(system))} tokens, thinking on, greedy, "
          f"max {a.max_tokens} tokens per answer\n")
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
    print(f"\nsame conversation with and without the cache: {'yes' if same else 'NO'}")
    print(f"prefix cache: {llm.engine.cache.prefix_usage()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"on": on, "off": off, "same": same}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
