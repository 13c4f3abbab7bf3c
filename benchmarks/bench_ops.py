"""The ops of qwen35/kernels/ops.py, native against PyTorch, at the sizes where ops.LIMITS puts a cut-off.

Each table answers one question the limits table depends on, on *this* machine (the CPU kind is printed):
  linear     bf16-weight product at M rows: native kernel | widen to float32 + F.linear | PyTorch bf16 F.linear
             (sets linear_max_rows and widen_min_rows)
  norm       zero-centred RMSNorm and the gated DeltaNet norm over M rows: native | PyTorch
             (sets norm_max_elements and gated_norm_max_elements)
  attention  paged decode attention at depth L: native in place | gather + SDPA (decode_attention_min_keys)
  moe        a MoE layer's routed experts for M tokens: native | the grouped PyTorch loop (moe_max_tokens)
  quant      int4 (group 32) and int8 weight products at M rows: int8 activations (the default,
             q8_activations) | the float32 native kernel | dequantize + PyTorch float32 GEMM; the lm_head shape
             (248,320 x 1,024) at 1 and 16 rows

Shapes are Qwen3.5-0.8B's (hidden 1024, MLP 3584, 8 q / 2 kv heads x 256) and 35B-A3B's experts (256 x 512,
top 8).  Times are medians of --reps calls, in microseconds.

  python benchmarks/bench_ops.py [--threads 2] [--only linear,norm,attention,moe,quant]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in r) + " |")


def bench_linear(k, reps: int) -> None:
    rows = []
    for N, K in ((3584, 1024), (1024, 3584)):
        w = (torch.randn(N, K) * 0.02).bfloat16()
        for M in (1, 4, 16, 32, 48, 64, 128, 256):
            x = torch.randn(M, K).bfloat16()
            rows.append([f"{M} x {K} -> {N}",
                         timed(lambda: k.linear_bf16(x, w, out_dtype=torch.bfloat16), reps),
                         timed(lambda: F.linear(x.float(), w.float()).bfloat16(), reps),
                         timed(lambda: F.linear(x, w), reps)])
    table("bf16-weight product (us)", ["rows x in -> out", "native", "widen + float32", "PyTorch bf16"], rows)


def bench_norm(k, reps: int) -> None:
    from qwen35.kernels.ops import gated_rms_norm_reference, rms_norm_reference

    rows = []
    for M, D in ((1, 1024), (16, 1024), (32, 1024), (64, 1024)):
        x, w = torch.randn(M, D).bfloat16(), torch.zeros(D).bfloat16()
        rows.append([f"RMSNorm {M} x {D}", timed(lambda: k.rms_norm(x, w, 1e-6, 1.0), reps),
                     timed(lambda: rms_norm_reference(x, w, 1e-6, 1.0), reps)])
    for M in (1, 2, 4, 16):
        o, z, w = torch.randn(M, 16, 128).bfloat16(), torch.randn(M, 16, 128).bfloat16(), torch.ones(128).bfloat16()
        rows.append([f"gated norm {M} x 16 x 128", timed(lambda: k.gated_rms_norm(o, z, w, 1e-6), reps),
                     timed(lambda: gated_rms_norm_reference(o, z, w, 1e-6), reps)])
    table("norms (us)", ["op", "native", "PyTorch"], rows)


def bench_attention(k, reps: int) -> None:
    from qwen35.kernels.ops import paged_decode_attention_reference

    rows = []
    bs, H, Hkv, d = 16, 8, 2, 256
    for n, L in ((1, 256), (1, 4096), (1, 16384), (1, 65536), (16, 1024), (16, 4096)):
        blocks = n * (L // bs)
        keys = torch.randn(blocks * bs, Hkv, d).bfloat16()
        values = torch.randn(blocks * bs, Hkv, d).bfloat16()
        tables = torch.randperm(blocks).reshape(n, L // bs)
        lengths = torch.full((n,), L)
        q = torch.randn(n, H, d).bfloat16()
        r = max(3, reps // (1 + L * n // 4096))
        rows.append([f"{n} x depth {L}", timed(lambda: k.paged_decode_attention(q, keys, values, tables, lengths,
                                                                                bs, d ** -0.5), r),
                     timed(lambda: paged_decode_attention_reference(q, keys, values, tables, lengths, bs, d ** -0.5),
                           r)])
    table("paged decode attention, one layer, 8 q / 2 kv heads x 256, bf16 (us)",
          ["sequences x depth", "native in place", "gather + SDPA"], rows)


def bench_moe(k, reps: int) -> None:
    from qwen35.kernels.ops import moe_experts_reference

    E, H, I, top = 256, 2048, 512, 8
    gate_up = (torch.randn(E, 2 * I, H) * 0.02).bfloat16()
    down = (torch.randn(E, H, I) * 0.02).bfloat16()
    rows = []
    for M in (1, 4, 16, 48):
        x = torch.randn(M, H).bfloat16()
        ids = torch.stack([torch.randperm(E)[:top] for _ in range(M)])
        wts = torch.rand(M, top).softmax(-1).bfloat16()
        r = max(3, reps // 4)
        rows.append([M, timed(lambda: k.moe_experts(x, ids, wts, gate_up, down), r),
                     timed(lambda: moe_experts_reference(x, ids, wts, gate_up, down), r)])
    table("MoE routed experts, 256 experts x 512, top 8, hidden 2048, bf16 (us)",
          ["tokens", "native", "PyTorch loop"], rows)


def bench_quant(k, reps: int) -> None:
    from qwen35.kernels import ops
    from qwen35.quant.int4 import quantize_groups
    from qwen35.quant.int8 import quantize_rows

    rows = []
    shapes = [(3584, 1024, (1, 16, 64, 512)), (1024, 3584, (1, 16, 64, 512)), (248320, 1024, (1, 16))]
    for N, K, Ms in shapes:
        w = torch.randn(N, K) * 0.02
        q4, s4 = quantize_groups(w, 32)
        q8, s8 = quantize_rows(w)
        del w
        for M in Ms:
            x = torch.randn(M, K).bfloat16()
            n = max(2, reps // (10 if N > 100000 or M >= 512 else 1))
            rows.append([f"int4 {M} x {K} -> {N}", timed(lambda: k.linear_int4_q8(x, q4, s4, K, 32), n),
                         timed(lambda: k.linear_int4(x, q4, s4, K, 32), n),
                         timed(lambda: F.linear(x.float(), ops.dequantize_int4(q4, s4, K, 32)), n)])
            rows.append([f"int8 {M} x {K} -> {N}", timed(lambda: k.linear_int8_q8(x, q8, s8), n),
                         timed(lambda: k.linear_int8(x, q8, s8), n),
                         timed(lambda: F.linear(x.float(), q8.float() * s8[:, None]), n)])
    table("int4 (group 32) / int8 weight products, bf16 activations (us)",
          ["weight rows x in -> out", "int8 activations", "float32 kernel", "dequantize + float32 GEMM"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--only", default="linear,norm,attention,moe,quant")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from qwen35 import kernels
    from qwen35.kernels import ops

    k = kernels.native()
    if k is None:
        print("native kernels unavailable on this machine: nothing to compare", file=sys.stderr)
        return 1
    print(f"CPU kind {ops.cpu_kind()} (host native bf16: {ops.host_has_native_bf16()}), kernels {k.isa}, "
          f"{a.threads} threads")
    with torch.inference_mode():
        for name in a.only.split(","):
            {"linear": bench_linear, "norm": bench_norm, "attention": bench_attention, "moe": bench_moe,
             "quant": bench_quant}[name](k, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
