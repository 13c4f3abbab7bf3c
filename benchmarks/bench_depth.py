"""Decode speed against context depth, through the engine's runner over the paged hybrid cache.

For each depth D, one (or --batch) sequence(s) hold D tokens of history in the cache, then decode steps are
timed (embedding, every layer, final norm, LM head; sampling excluded).  The history is *synthetic*: the KV rows
and DeltaNet states are filled with random values of the model dtype instead of prefilling D real tokens, since
a decode step's cost depends on how much it reads, not on what — so a 64K curve takes minutes, not hours.  (For
a side-by-side with llama.cpp at depth, whose llama-bench must prefill, use real prompts: RESULTS.md.)

Attention is measured both ways in the same process, alternating per depth:
  in-place   the native paged kernel reads each block where it lies (qwen35/kernels/paged_attention.c)
  gather     the PyTorch reference: gather the history into a padded copy, then SDPA over it

The KV cache's storage format is a third axis (--kv-cache-dtype auto,int8 runs both, alternating per depth): auto
keeps K/V in the model dtype, int8 / fp8 store one byte per value plus a float32 scale per token per KV head
(qwen35/engine/kv_quant.py; the history's rows are quantized from random values of the model dtype).

  python benchmarks/bench_depth.py --model CKPT [--depths 0,4096,16384,65536] [--batch 1] [--steps 16]
                                   [--kv-cache-dtype auto,int8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF-format checkpoint folder")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantization", choices=["int8"])
    p.add_argument("--depths", default="0,1024,4096,16384,32768,65536", help="comma-separated history lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together, each at the same depth")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per depth and mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="in-place,gather")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="comma-separated KV cache formats to measure side by side: auto (the model dtype), int8, fp8")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import qwen35
    from qwen35.engine.cache import HybridCache
    from qwen35.engine.kv_quant import check_kv_cache_dtype, memory_name
    from qwen35.engine.params import SamplingParams
    from qwen35.engine.runner import ModelRunner
    from qwen35.engine.scheduler import ScheduledBatch
    from qwen35.engine.sequence import Sequence
    from qwen35.kernels import ops

    depths = [int(d) for d in a.depths.split(",")]
    try:
        kv_dtypes = [check_kv_cache_dtype(k.strip()) for k in a.kv_cache_dtype.split(",")]
    except ValueError as e:
        p.error(str(e))
    model = qwen35.load_model(a.model, dtype=a.dtype)
    if a.quantization == "int8":
        from qwen35.quant import quantize_int8
        quantize_int8(model)
    cfg = model.config
    block = 16
    warm = 2
    longest = max(depths) + warm + a.steps + 1
    blocks = a.batch * -(-longest // block) + 1
    from qwen35.memory import kv_bytes_per_token, state_bytes_per_sequence
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.dtype]
    caches, runners = {}, {}
    for kv in kv_dtypes:
        memory = a.batch * state_bytes_per_sequence(cfg, name).total \
            + blocks * block * kv_bytes_per_token(cfg, memory_name(kv, model.dtype))
        caches[kv] = HybridCache.from_budget(cfg, memory, a.batch, block, model.dtype, kv_cache_dtype=kv)
        runners[kv] = ModelRunner(model, caches[kv])
    vocab = cfg.text.vocab_size
    g = torch.Generator().manual_seed(0)
    saved = dict(ops.LIMITS)
    gather = {k: dataclasses.replace(v, decode_attention_min_keys=0) for k, v in saved.items()}

    def fill(cache: HybridCache, seqs: list[Sequence], depth: int) -> None:
        for s in seqs:
            rows = cache.token_rows(s.seq_id, 0, depth)
            for layer in cache.kv.keys:
                kv = cache.layer_kv(layer)
                shape = (len(rows), *kv.keys.shape[1:])
                kv.write(rows, torch.randn(shape, generator=g).to(model.dtype),
                         torch.randn(shape, generator=g).to(model.dtype))  # quantized on the way in
            slot = cache.slot_of[s.seq_id]
            for st in cache.slots.states.values():
                st[slot] = torch.randn(st.shape[1:], generator=g) * 0.05

    results = []
    columns = [(mode, kv) for kv in kv_dtypes for mode in a.modes.split(",")]
    for depth in depths:
        row = {"depth": depth}
        for mode, kv in columns:
            cache, runner = caches[kv], runners[kv]
            col = mode if kv == "auto" else f"{mode} {kv}-KV"
            ops.LIMITS.update(saved if mode == "in-place" else gather)
            seqs = [Sequence(f"s{i}", torch.randint(0, vocab, (depth + 1,), generator=g).tolist(),
                             SamplingParams()) for i in range(a.batch)]
            for s in seqs:
                cache.admit(s.seq_id)
                if not cache.grow(s.seq_id, depth + warm + a.steps + 1):
                    raise RuntimeError("cache too small")
                s.num_computed = depth
            fill(cache, seqs, depth)
            t0 = 0.0
            for step in range(warm + a.steps):
                if step == warm:
                    t0 = time.perf_counter()
                done, logits, _ = runner.run(ScheduledBatch(decodes=list(seqs)))  # (rows per sequence unused)
                for s, lg in zip(done, logits):
                    s.output_ids.append(int(lg.argmax()))
            dt = time.perf_counter() - t0
            row[col] = a.batch * a.steps / dt
            for s in seqs:
                cache.release(s.seq_id)
            print(f"depth {depth:6d}  {col:16s}  {row[col]:7.2f} tok/s", file=sys.stderr, flush=True)
        results.append(row)
    ops.LIMITS.update(saved)

    modes = [mode if kv == "auto" else f"{mode} {kv}-KV" for mode, kv in columns]
    base = {m: results[0][m] for m in modes}
    print(f"\nmodel {a.model}, {a.dtype}{', int8' if a.quantization else ''}, batch {a.batch}, {a.threads} threads, "
          f"CPU kind {ops.cpu_kind()}\n")
    print("| depth | " + " | ".join(f"{m} tok/s" for m in modes) + " | " + " | ".join(f"{m} / depth {depths[0]}"
                                                                          for m in modes) + " |")
    print("|---" * (1 + 2 * len(modes)) + "|")
    for r in results:
        print(f"| {r['depth']} | " + " | ".join(f"{r[m]:.2f}" for m in modes) + " | "
              + " | ".join(f"{r[m] / base[m]:.2f}x" for m in modes) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
