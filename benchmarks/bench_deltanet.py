"""The chunked gated delta rule: qwen35's against transformers' torch reference, same inputs, one process.

Shapes of one DeltaNet layer of Qwen3.5-0.8B (16 key / 16 value heads of 128) and of 35B-A3B (16 / 32);
bf16 inputs as the model passes them; the runs of the two alternate, and the best of N is reported.

  python benchmarks/bench_deltanet.py [--threads 2] [--tokens 512] [--reps 10]
"""

from __future__ import annotations

import argparse
import time
import warnings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from qwen35.model.gated_delta_rule import gated_delta_rule_chunked

    torch.set_num_threads(a.threads)
    print(f"| shape (k heads / v heads) | tokens | qwen35 ms | transformers ms | speed-up |\n|---|---|---|---|---|")
    for hk, hv in ((16, 16), (16, 32)):
        g = torch.Generator().manual_seed(0)
        T, d = a.tokens, 128
        q = torch.randn(1, T, hk, d, generator=g).bfloat16()
        k = torch.randn(1, T, hk, d, generator=g).bfloat16()
        v = torch.randn(1, T, hv, d, generator=g).bfloat16()
        gate = -torch.rand(1, T, hv, generator=g) * 2
        beta = torch.rand(1, T, hv, generator=g).bfloat16()
        runs = {
            "ours": lambda: gated_delta_rule_chunked(q, k, v, gate, beta),
            "hf": lambda: torch_chunk_gated_delta_rule(q, k, v, g=gate, beta=beta, use_qk_l2norm_in_kernel=True,
                                                       output_final_state=True),
        }
        best = {n: float("inf") for n in runs}
        for f in runs.values():
            f()
        for _ in range(a.reps):
            for n, f in runs.items():
                t = time.perf_counter()
                f()
                best[n] = min(best[n], time.perf_counter() - t)
        print(f"| {hk} / {hv} | {T} | {best['ours'] * 1e3:.1f} | {best['hf'] * 1e3:.1f} | "
              f"{best['hf'] / best['ours']:.2f}x |")


if __name__ == "__main__":
    main()
