/* The small per-token operations of a decoder layer, each in one pass.
 *
 * Why this exists: at one decode token a Qwen3.5-0.8B layer does ~50 PyTorch operations on vectors of a few
 * thousand values (the zero-centred RMSNorm alone is five: widen, normalise, 1 + w, multiply, narrow), and each
 * costs more in dispatch than in arithmetic — about a quarter of a batch-1 decode step.  Each function here is
 * one of those compound operations, with PyTorch's rounding: the inputs and outputs are in the model's dtype
 * (float32, or bf16 flagged by `bf16`), the arithmetic in float32, and a value is rounded to bf16 exactly
 * where the PyTorch composition (qwen35/model/norm.py, deltanet.py, moe.py) rounds it.
 *
 * Rows have a row stride (ld*) so that column slices of one fused projection output are read in place.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "bf16.h"

static inline float ld(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int bf16, int64_t i, float f) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(f);
    else
        ((float *)p)[i] = f;
}

static inline float rnd(int bf16, float f) { return bf16 ? round_bf16(f) : f; }

/* parallel only when there is enough work to pay for waking the other threads */
#define WORTH_THREADS(work) ((work) >= 65536)

/* y = x · rsqrt(mean(x²) + eps) · (offset + w), in float32, rounded once at the end.
 * offset 1 is the zero-centred decoder norm (weight stored as w − 1), offset 0 a plain scale.
 * x rows have stride ldx, y is contiguous [M, D]; w has the activation dtype (w_bf16). */
int q35_rms_norm(const void *x, int64_t ldx, void *y, int bf16, const void *w, int w_bf16, float offset,
                 float eps, int64_t M, int64_t D, int threads) {
    if (M < 0 || D <= 0 || ldx < D) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (WORTH_THREADS(M * D))
    for (int64_t i = 0; i < M; i++) {
        float ss = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            const float v = ld(x, bf16, i * ldx + d);
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++)
            st(y, bf16, i * D + d, ld(x, bf16, i * ldx + d) * r * (offset + ld(w, w_bf16, d)));
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
        float ss = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            const float v = ld(o, bf16, i * ldo + d);
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++) {
            const float n = rnd(bf16, ld(o, bf16, i * ldo + d) * r);
            const float wn = rnd(bf16, ld(w, w_bf16, d) * n);
            const float zz = ld(z, bf16, i * ldz + d);
            st(y, bf16, i * D + d, wn * (zz / (1.0f + expf(-zz))));
        }
    }
    return 0;
}

/* The DeltaNet gates from the raw projections b and a [M, H] (rows of stride ldb / lda, activation dtype):
 *   beta = sigmoid(b)                                  (rounded to the activation dtype, then widened)
 *   g    = −exp(A_log) · softplus(a + dt_bias)         (float32; softplus(x) = x above 20, as PyTorch)
 * A_log and dt_bias [H] have their own dtype flag (they are float32 in some checkpoints, bf16 in others).
 * beta and g are written as float32 [M, H]. */
int q35_deltanet_gates(const void *b, int64_t ldb, const void *a, int64_t lda, int bf16, const void *A_log,
                       const void *dt_bias, int p_bf16, float *beta, float *g, int64_t M, int64_t H) {
    if (M < 0 || H <= 0 || ldb < H || lda < H) return -1;
    for (int64_t i = 0; i < M; i++)
        for (int64_t h = 0; h < H; h++) {
            const float bb = ld(b, bf16, i * ldb + h);
            beta[i * H + h] = rnd(bf16, 1.0f / (1.0f + expf(-bb)));
            const float x = ld(a, bf16, i * lda + h) + ld(dt_bias, p_bf16, h);
            const float sp = x > 20.0f ? x : log1pf(expf(x));
            g[i * H + h] = -expf(ld(A_log, p_bf16, h)) * sp;
        }
    return 0;
}

/* SwiGLU's middle: y = SiLU(gate) · up for gate and up [M, I] in rows of strides ldg and ldu (column slices of
 * one fused projection are read in place).  In bf16, SiLU(gate) is rounded before the product, as PyTorch does. */
int q35_silu_mul(const void *gate, int64_t ldg, const void *up, int64_t ldu, void *y, int bf16, int64_t M,
                 int64_t I, int threads) {
    if (M < 0 || I <= 0 || ldg < I || ldu < I) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (WORTH_THREADS(M * I))
    for (int64_t i = 0; i < M; i++)
        for (int64_t c = 0; c < I; c++) {
            const float gt = ld(gate, bf16, i * ldg + c);
            st(y, bf16, i * I + c, rnd(bf16, gt / (1.0f + expf(-gt))) * ld(up, bf16, i * ldu + c));
        }
    return 0;
}
