/* The small per-token operations of a decoder layer, each in one pass.
 *
 * Why this exists: at one decode token a Qwen3.5-0.8B layer does ~50 PyTorch operations on vectors of a few
 * thousand values (the zero-centred RMSNorm alone is five: widen, normalise, 1 + w, multiply, narrow), and each
 * costs more in dispatch than in arithmetic.  Each function here is one of those compound operations, kept
 * only where it measured faster than the PyTorch composition at decode sizes (SwiGLU and the DeltaNet gates stay
 * in PyTorch), vectorised through simd.h (VL values at a time; the gated norm's SiLU with its vexp), with
 * PyTorch's rounding: the inputs and outputs are in the model's dtype
 * (float32, or bf16 flagged by `bf16`), the arithmetic in float32, and a value is rounded to bf16 exactly
 * where the PyTorch composition (qwen35/model/norm.py, deltanet.py, moe.py) rounds it.
 *
 * Rows have a row stride (ld*) so that column slices of one fused projection output are read in place.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "simd.h"

/* VL values of an activation row, bf16 (flag) or float32, as float32 lanes; and the way back, rounded to nearest
 * even for bf16 exactly as act_st rounds each value */
static inline vec vload_act(const void *p, int bf16, int64_t i) {
    return bf16 ? vload_w((const uint16_t *)p + i) : vload_x((const float *)p + i);
}
static inline void vstore_act(void *p, int bf16, int64_t i, vec v) {
    if (!bf16) {
        vstore((float *)p + i, v);
        return;
    }
    float t[VL];
    vstore(t, v);
    for (int l = 0; l < VL; l++) ((uint16_t *)p)[i + l] = f32_to_bf16(t[l]);
}

/* parallel only when there is enough work to pay for waking the other threads */
#define WORTH_THREADS(work) ((work) >= 65536)

/* 1 / sqrt(mean(x²) + eps) over one row of D values (VL partial sums, then the lanes: another order than
 * PyTorch's, so bf16 results may sit one rounding step apart — what the tests allow) */
static inline float inv_rms(const void *x, int bf16, int64_t off, int64_t D, float eps) {
    vec acc = vzero();
    int64_t d = 0;
    for (; d + VL <= D; d += VL) {
        const vec v = vload_act(x, bf16, off + d);
        acc = vfma(v, v, acc);
    }
    float ss = vsum(acc);
    for (; d < D; d++) {
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
        int64_t d = 0;
        for (; d + VL <= D; d += VL)
            vstore_act(y, bf16, i * D + d, vmul(vmul(vload_act(x, bf16, i * ldx + d), vset1(r)),
                                                 vadd(vset1(offset), vload_act(w, w_bf16, d))));
        for (; d < D; d++)
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
        int64_t d = 0;
        /* SiLU with the vectorised exp of simd.h (within 2 ulp of expf) */
        for (; d + VL <= D; d += VL) {
            vec n = vmul(vload_act(o, bf16, i * ldo + d), vset1(r));
            if (bf16) n = vround_bf16(n);
            vec wn = vmul(vload_act(w, w_bf16, d), n);
            if (bf16) wn = vround_bf16(wn);
            const vec zz = vload_act(z, bf16, i * ldz + d);
            vstore_act(y, bf16, i * D + d, vmul(wn, vdiv(zz, vadd(vset1(1.0f), vexp(vsub(vzero(), zz))))));
        }
        for (; d < D; d++) {
            const float n = act_round(bf16, act_ld(o, bf16, i * ldo + d) * r);
            const float wn = act_round(bf16, act_ld(w, w_bf16, d) * n);
            const float zz = act_ld(z, bf16, i * ldz + d);
            act_st(y, bf16, i * D + d, wn * (zz / (1.0f + expf(-zz))));
        }
    }
    return 0;
}
