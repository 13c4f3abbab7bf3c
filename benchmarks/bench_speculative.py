"""Speculative decoding against plain decoding, through qwen35.LLM, on the same prompts in one run.

For each configuration (none, and each --configs entry) the same chat prompts are generated greedily, solo (batch 1,
one request at a time) and all together (--concurrent at once), and the decode speed (generated tokens / wall time)
is printed with the ratio to plain decoding, the acceptance per draft position, and a check that every output is
token-identical to plain decoding's.

  python benchmarks/bench_speculative.py [--model CKPT] [--configs '[{"method": "ngram", "num_speculative_tokens": 2}]']

Default model: the embedded one; default prompts: its own tasks (additions with thinking, whose reasoning repeats
the numbers -- what prompt lookup can find).  --prompt-file gives one prompt per line instead.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _prompts(llm, args) -> list[str]:
    if args.prompt_file:
        lines = [line.strip() for line in open(args.prompt_file, encoding="utf-8") if line.strip()]
    else:
        pairs = [(47, 38), (12, 99), (55, 55), (3, 8), (61, 29), (70, 45), (18, 84), (99, 99)]
        lines = [f"What is {a} + {b}?" for a, b in pairs]
    lines = (lines * (1 + args.concurrent // len(lines)))[:args.concurrent]
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in lines]


class StepClock:
    """Wall time per decode step (steps that run no prompt chunk), split into the model forward (``runner.run``),
    the drafter's own forward (``after_step``: the MTP layer) and the rest (scheduling, sampling, verification,
    Python): where a speculative step's time goes, and what bounds its speed-up even with no engine overhead."""

    def __init__(self, engine) -> None:
        self.steps = 0
        self.tokens = 0
        self.seconds = {"step": 0.0, "forward": 0.0, "draft": 0.0}
        self.on = False
        self._current: dict[str, float] = {}
        self._prefill = False
        step, run = engine.step, engine.runner.run

        def timed_step():
            self._current, self._prefill = {"forward": 0.0, "draft": 0.0}, False
            t = time.perf_counter()
            out = step()
            if self.on and not self._prefill:
                self.steps += 1
                self.tokens += sum(len(c.delta_token_ids) for o in out for c in o.outputs)
                self.seconds["step"] += time.perf_counter() - t
                for k, v in self._current.items():
                    self.seconds[k] += v
            return out

        def timed_run(batch):
            self._prefill = self._prefill or bool(batch.prefills)
            return self._timed("forward", run, batch)

        engine.step, engine.runner.run = timed_step, timed_run
        if engine.drafter is not None:
            after = engine.drafter.after_step
            engine.drafter.after_step = lambda *a, **k: self._timed("draft", after, *a, **k)

    def _timed(self, key: str, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._current[key] = self._current.get(key, 0.0) + time.perf_counter() - t

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        out = {k: round(1000 * v / n, 3) for k, v in self.seconds.items()}
        out["rest"] = round(out["step"] - out["forward"] - out["draft"], 3)
        return out

    def tokens_per_step(self) -> float:
        return round(self.tokens / max(self.steps, 1), 3)


def _run(llm, prompts, params, concurrent: bool) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    if concurrent:
        outs = llm.generate(prompts, params)
    else:
        outs = [llm.generate(p, params)[0] for p in prompts]
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--configs", default='[{"method": "ngram", "num_speculative_tokens": 1}, '
                                        '{"method": "ngram", "num_speculative_tokens": 2}, '
                                        '{"method": "ngram", "num_speculative_tokens": 3}]',
                   help="JSON list of speculative_config objects to compare with plain decoding")
    p.add_argument("--concurrent", type=int, default=16, help="prompts, run solo and all at once")
    p.add_argument("--solo", type=int, default=4, help="how many of the prompts to time solo")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the best is kept)")
    p.add_argument("--prompt-file")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import qwen35
    from qwen35 import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    settings = [None] + json.loads(a.configs)
    results = []
    reference: dict[str, list[list[int]]] = {}
    for spec in settings:
        llm = qwen35.LLM(a.model, dtype=a.dtype, speculative_config=spec, max_num_seqs=max(16, a.concurrent))
        prompts = _prompts(llm, a)
        _run(llm, prompts[:2], params, True)  # warm-up: kernels, allocator
        clock = StepClock(llm.engine)
        row = {"config": spec or "plain"}
        for mode, batch in (("solo", prompts[:a.solo]), ("concurrent", prompts)):
            best, ids = None, None
            clock.on = mode == "solo"
            for _ in range(a.repeats):
                seconds, ids = _run(llm, batch, params, mode == "concurrent")
                best = seconds if best is None else min(best, seconds)
            tokens = sum(len(t) for t in ids)
            row[mode] = {"tokens": tokens, "seconds": round(best, 3), "tok_s": round(tokens / best, 1)}
            if mode == "solo":
                row["solo_ms_per_step"] = clock.per_step_ms()
                row["solo_tokens_per_step"] = clock.tokens_per_step()
            if spec is None:
                reference[mode] = ids
            else:
                row[mode]["identical"] = ids == reference[mode]
        if spec is not None:
            stats = llm.engine.drafter.stats
            row["acceptance"] = round(stats.accepted / max(stats.proposed, 1), 3)
            row["acceptance_by_position"] = [round(x, 3) for x in stats.acceptance_by_position()]
        results.append(row)

    base = results[0]
    print(f"{'config':<46} {'solo tok/s':>10} {'x':>6} {'16x tok/s':>10} {'x':>6}  identical  acceptance by position")
    for row in results:
        name = json.dumps(row["config"]) if row["config"] != "plain" else "plain"
        s, c = row["solo"], row["concurrent"]
        same = "" if row is base else str(s["identical"] and c["identical"])
        acc = "" if row is base else " ".join(f"{x:.2f}" for x in row["acceptance_by_position"])
        print(f"{name:<46} {s['tok_s']:>10.1f} {s['tok_s'] / base['solo']['tok_s']:>6.2f} {c['tok_s']:>10.1f} "
              f"{c['tok_s'] / base['concurrent']['tok_s']:>6.2f}  {same:<9}  {acc}")
    # the bound: the speed-up if only the two forwards cost anything (tokens per step x plain forward / spec forwards)
    plain_forward = base["solo_ms_per_step"]["forward"]
    print("\nsolo decode steps (no prompt chunk), ms per step: forward / drafter forward / rest; tokens per step; "
          "speed-up bound with zero engine overhead = tokens per step x plain forward / (forward + drafter forward)")
    for row in results:
        name = json.dumps(row["config"]) if row["config"] != "plain" else "plain"
        ms, per = row["solo_ms_per_step"], row["solo_tokens_per_step"]
        bound = per * plain_forward / max(ms["forward"] + ms["draft"], 1e-9)
        print(f"{name:<46} {ms['forward']:>7.2f} {ms['draft']:>7.2f} {ms['rest']:>7.2f}   {per:>5.2f}   {bound:>5.2f}x")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
