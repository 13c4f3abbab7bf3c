/* The small per-token operations of a decoder layer, each in one pass.
 *
 * Why this exists: at one decode token a Qwen3.5-0.8B layer does ~50 PyTorch operations on vectors of a few
 * thousand values (the zero-centred RMSNorm alone is five: widen, normalise, 1 + w, multiply, narrow), and each
 * costs more in dispatch than in arithmetic.  Each function here is one of those compound operations, kept
 * only where it measured faster than the PyTorch composition at decode sizes (a scalar exp per value loses to
 * PyTorch's vectorised SiLU beyond a few thousand values: SwiGLU and the DeltaNet gates stay in PyTorch), with
 * PyTorch's rounding: the inputs and outputs are in the model's dtype
 * (float32, or bf16 flagged by `bf16`), the arithmetic in float32, and a value is rounded to bf16 exactly
 * where the PyTorch composition (qwen35/model/norm.py, deltanet.py, moe.py) rounds it.
 *
 * Rows have a row stride (ld*) so that column slices of one fused projection output are read in place.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "bf16.h"

/* parallel only when there is enough work to pay for waking the other threads */
#define WORTH_THREADS(work) ((work) >= 65536)

/* 1 / sqrt(mean(x²) + eps) over one row of D values */
static inline float inv_rms(const void *x, int bf16, int64_t off, int64_t D, float eps) {
    float ss = 0.0f;
    for (int64_t d = 0; d < D; d++) {
        const float v = act_ld(x, bf16, off + d);
        ss += v * v;
    }
    return 1.0f / sqrtf(ss / (float)D + eps);
}

/* y = x · rsqrt(mean(x²) + eps) · (offset + w), in float32, rounded once at the end.
 * offset 1 is the zero-centred decoder norm (weight stored as w − 1), offset 0 a plain scale.
 * x rows have stride ldx, y is contiguous [M, D]; w has the activation dtype (w_bf16). */
int q35_rms_norm(const void *x, int64_t ldx, void *y, int bf16, const void *w, int w_bf16, float offset,
                 float eps, int64_t M, int64_t D, int threads) {
    if (M < 0 || D <= 0 || ldx < D) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (WORTH_THREADS(M * D))
    for (int64_t i = 0; i < M; i++) {
        const float r = inv_rms(x, bf16, i * ldx, D, eps);
        for (int64_t d = 0; d < D; d++)
            act_st(y, bf16, i * D + d, act_ld(x, bf16, i * ldx + d) * r * (offset + act_ld(w, w_bf16, d)));
    }
    return 0;
}

/* The DeltaNet output norm, per head of D values:  y = (w · norm(o)) · SiLU(z)
 * with PyTorch's roundings in bf16: norm(o) is rounded, w · norm(o) is rounded (both bf16), SiLU(z) is taken
 * in float32 and the product rounded once.  o [M, D] rows of stride ldo, z rows of stride ldz, y [M, D]. */
int q35_gated_rms_norm(const void *o, int64_t ldo, const void *z, int64_t ldz, void *y, int bf16,
                       const void *w, int w_bf16, float eps, int64_t M, int64_t D, int threads) {
    if (M < 0 || D <= 0 || ldo < D || ldz < D) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (WORTH_THREADS(M * D))
    for (int64_t i = 0; i < M; i++) {
        const float r = inv_rms(o, bf16, i * ldo, D, eps);
        for (int64_t d = 0; d < D; d++) {
            const float n = act_round(bf16, act_ld(o, bf16, i * ldo + d) * r);
            const float wn = act_round(bf16, act_ld(w, w_bf16, d) * n);
            const float zz = act_ld(z, bf16, i * ldz + d);
            act_st(y, bf16, i * D + d, wn * (zz / (1.0f + expf(-zz))));
        }
    }
    return 0;
}
