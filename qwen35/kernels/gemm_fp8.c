/* y = x · Wᵀ for block-FP8 weights (float8_e4m3fn with one float32 scale per bn×bk block), few-row products.
 *
 * Why this exists: PyTorch has no CPU product for float8 weights; its only route is to widen the whole weight
 * to float32/bf16 first, which writes and re-reads 2-4x the bytes a decode step needs.  Here each weight row is
 * streamed once as bytes and dequantized in registers (qwen35/quant/fp8.py has the layout).
 *
 * e4m3 -> float32 without a table: the byte s.eeee.mmm is re-packed as the fp16 s.0eeee.mmm0000000 — the same
 * mantissa, the exponent field unchanged, which in fp16's bias of 15 (e4m3's is 7) is the e4m3 value times 2^-8,
 * subnormals included — and F16C / AVX-512 widen fp16 to float32 exactly (not subject to denormals-are-zero).
 * The 2^8 is folded into the block's scale (a power of two: exact), so each dequantized weight is
 * round(fp8 · scale_inv), the very float32 value qwen35.kernels.ops.dequantize_fp8_blocks computes.  (e4m3fn's
 * NaN pattern, which the quantizer never writes, reads as 480 · scale here.)
 *
 * One activation row: rows of the weight four at a time (four streams, one shared x load), each row's bk-wide
 * blocks multiplied by their own scale.  More rows: NB weight rows dequantized once into an L1-resident float32
 * scratch block, then every MB-row block of activations multiplied against it from registers.  Accumulation in
 * float32.  x [M, K] float32 or bf16 (x_bf16, row stride ldx); w [N, K] fp8 bytes; scale [ceil(N/bn),
 * ceil(K/bk)] float32; y [M, N] contiguous, float32 or bf16 (y_bf16).  Returns 0, -1 bad arguments, -2 out of
 * memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "simd.h"

/* one e4m3 byte -> float32 times 2^-8 (the scalar twin of the vector path; exact for every non-NaN byte) */
static inline float fp8_scaled(uint8_t b) {
    const uint32_t e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e) { /* 2^(e-7) (1 + m/8) · 2^-8: float32 exponent field e - 15 + 127 */
        const uint32_t u = ((e + 112u) << 23) | (m << 20);
        memcpy(&v, &u, sizeof v);
    } else { /* m/8 · 2^-6 · 2^-8 */
        v = (float)m * (1.0f / 131072.0f);
    }
    return (b & 0x80) ? -v : v;
}

#if VL == 16
/* 16 e4m3 bytes -> 16 float32 lanes of value · 2^-8 */
static inline vec vload_fp8(const uint8_t *p) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i h = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16((short)0x8000)),
                                      _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(0x3f80)));
    return _mm512_cvtph_ps(h);
}
#elif VL == 8
static inline vec vload_fp8(const uint8_t *p) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(b, 8), _mm_set1_epi16((short)0x8000)),
                                   _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(0x3f80)));
    return _mm256_cvtph_ps(h);
}
#else
static inline vec vload_fp8(const uint8_t *p) { return fp8_scaled(*p); }
#endif

#define FP8_MB 4 /* activation rows per register block */
#define FP8_NB 4 /* weight rows per register block (and per one-row group) */

/* the scales of weight row n, one per bk-wide column block, times 2^8 */
static inline const float *row_scales(const float *scale, int64_t n, int64_t bn, int64_t kb) {
    return scale + (n / bn) * kb;
}

/* one activation row x times nr (<= FP8_NB) weight rows starting at w (row stride K) */
static inline __attribute__((always_inline)) void gemv_fp8(const int nr, const float *x, const uint8_t *w,
                                                          const float *const *sc, int64_t K, int64_t bk,
                                                          float *out) {
    vec acc[FP8_NB];
#pragma GCC unroll 4
    for (int j = 0; j < nr; j++) acc[j] = vzero();
    float tail[FP8_NB] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += bk, b++) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        vec sv[FP8_NB];
        float ss[FP8_NB];
#pragma GCC unroll 4
        for (int j = 0; j < nr; j++) {
            ss[j] = sc[j][b] * 256.0f;
            sv[j] = vset1(ss[j]);
        }
        int64_t k = k0;
        for (; k + VL <= k1; k += VL) {
            const vec xv = vload_x(x + k);
#pragma GCC unroll 4
            for (int j = 0; j < nr; j++) acc[j] = vfma(xv, vmul(vload_fp8(w + j * K + k), sv[j]), acc[j]);
        }
        for (; k < k1; k++)
            for (int j = 0; j < nr; j++) tail[j] += x[k] * (fp8_scaled(w[j * K + k]) * ss[j]);
    }
    for (int j = 0; j < nr; j++) out[j] = vsum(acc[j]) + tail[j];
}

/* mb (<= FP8_MB) activation rows times nb (<= FP8_NB) float32 weight rows wf (row stride K) */
static inline __attribute__((always_inline)) void block_f32(const int mb, const int nb, const float *x, int64_t ldx,
                                                           const float *wf, int64_t K, float out[FP8_MB][FP8_NB]) {
    vec acc[FP8_MB][FP8_NB];
#pragma GCC unroll 4
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++) acc[i][j] = vzero();
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        vec wv[FP8_NB];
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++) wv[j] = vload_x(wf + j * K + k);
#pragma GCC unroll 4
        for (int i = 0; i < mb; i++) {
            const vec xv = vload_x(x + i * ldx + k);
#pragma GCC unroll 4
            for (int j = 0; j < nb; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) {
            float s = vsum(acc[i][j]);
            for (int64_t t = k; t < K; t++) s += x[i * ldx + t] * wf[j * K + t];
            out[i][j] = s;
        }
}

#define FP8_BLOCK_CASE(m)                                                                          \
    case m:                                                                                        \
        switch (nb) {                                                                              \
        case 1: block_f32(m, 1, x, ldx, wf, K, out); return;                                      \
        case 2: block_f32(m, 2, x, ldx, wf, K, out); return;                                      \
        case 3: block_f32(m, 3, x, ldx, wf, K, out); return;                                      \
        default: block_f32(m, 4, x, ldx, wf, K, out); return;                                     \
        }
static void block_any(int mb, int nb, const float *x, int64_t ldx, const float *wf, int64_t K,
                      float out[FP8_MB][FP8_NB]) {
    switch (mb) { FP8_BLOCK_CASE(1) FP8_BLOCK_CASE(2) FP8_BLOCK_CASE(3) default: FP8_BLOCK_CASE(4) }
}

static void gemv_any(int nr, const float *x, const uint8_t *w, const float *const *sc, int64_t K, int64_t bk,
                     float *out) {
    switch (nr) {
    case 1: gemv_fp8(1, x, w, sc, K, bk, out); return;
    case 2: gemv_fp8(2, x, w, sc, K, bk, out); return;
    case 3: gemv_fp8(3, x, w, sc, K, bk, out); return;
    default: gemv_fp8(4, x, w, sc, K, bk, out); return;
    }
}

static inline void store(void *y, int y_bf16, int64_t i, float v) {
    if (y_bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

int q35_linear_fp8(const void *x_in, int x_bf16, int64_t ldx, const uint8_t *w, const float *scale, int64_t bn,
                   int64_t bk, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0 || N <= 0 || K <= 0 || ldx < K || bn <= 0 || bk <= 0) return -1;
    const int64_t kb = (K + bk - 1) / bk;
    /* activations as float32 rows (bf16 widened once: M x K is small next to the weight) */
    float *xs = NULL;
    const float *x = (const float *)x_in;
    if (x_bf16) {
        xs = (float *)malloc((size_t)(M * K) * sizeof(float));
        if (!xs) return -2;
        for (int64_t i = 0; i < M; i++)
            for (int64_t k = 0; k < K; k++) xs[i * K + k] = bf16_to_f32(((const uint16_t *)x_in)[i * ldx + k]);
        x = xs;
        ldx = K;
    }
    const int64_t nblocks = (N + FP8_NB - 1) / FP8_NB;
    if (threads < 1) threads = 1;
    if (threads > nblocks) threads = (int)nblocks;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        float *wf = M > 1 ? (float *)malloc((size_t)(FP8_NB * K) * sizeof(float)) : NULL;
        if (M > 1 && !wf) rc = -2;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t n0 = b * FP8_NB;
            const int nb = (int)(N - n0 < FP8_NB ? N - n0 : FP8_NB);
            const float *sc[FP8_NB];
            for (int j = 0; j < nb; j++) sc[j] = row_scales(scale, n0 + j, bn, kb);
            if (M == 1) {
                float out[FP8_NB];
                gemv_any(nb, x, w + n0 * K, sc, K, bk, out);
                for (int j = 0; j < nb; j++) store(y, y_bf16, n0 + j, out[j]);
                continue;
            }
            if (!wf) continue;
            for (int j = 0; j < nb; j++) {  /* dequantize nb rows once: round(fp8 · scale_inv) per value */
                const uint8_t *q = w + (n0 + j) * K;
                float *dst = wf + j * K;
                for (int64_t k0 = 0, c = 0; k0 < K; k0 += bk, c++) {
                    const int64_t k1 = k0 + bk < K ? k0 + bk : K;
                    const float s = sc[j][c] * 256.0f;
                    const vec sv = vset1(s);
                    int64_t k = k0;
                    for (; k + VL <= k1; k += VL) vstore(dst + k, vmul(vload_fp8(q + k), sv));
                    for (; k < k1; k++) dst[k] = fp8_scaled(q[k]) * s;
                }
            }
            for (int64_t m0 = 0; m0 < M; m0 += FP8_MB) {
                const int mb = (int)(M - m0 < FP8_MB ? M - m0 : FP8_MB);
                float out[FP8_MB][FP8_NB];
                block_any(mb, nb, x + m0 * ldx, ldx, wf, K, out);
                for (int i = 0; i < mb; i++)
                    for (int j = 0; j < nb; j++) store(y, y_bf16, (m0 + i) * N + n0 + j, out[i][j]);
            }
        }
        free(wf);
    }
    free(xs);
    return rc;
}
