/* y = x · Wᵀ for bfloat16 weights and float32 activations, for the few-row products of decoding.
 *
 * Why this exists: on x86 CPUs without AVX512-BF16/AMX, PyTorch runs a bf16 matrix-vector product through an
 * emulated path that reads the weight at roughly half the memory bandwidth, and a 2..32-row product (a batch of
 * decodes) at a fraction of float32 speed.  Widening a bf16 value to float32 is one integer shift, so a kernel
 * that streams the bf16 weight once, widens it in registers and multiplies in float32 is bound by memory at one
 * row and by FMA throughput at sixteen.
 *
 * Layout: x [M, K] float32 (row stride ldx), w [N, K] bf16 (contiguous rows), y [M, N] float32 (row stride ldy).
 * Threads split the weight rows; each thread walks its rows in blocks of NB and, for each block, the activation
 * rows in blocks of up to MB, so the widened weight block is used MB times from registers.  Accumulation is in
 * float32 in vector lanes, summed across lanes at the end of each dot product.
 *
 * Built at first use with the host compiler (per instruction-set variant, see simd.h); qwen35/kernels/__init__.py falls back to
 * PyTorch when no compiler is present.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "simd.h"

/* register blocking per instruction set: MB activation rows x NB weight rows of accumulators */
#if VL == 16
#define MB 8 /* 8 x 3 accumulators + 3 weight vectors + 1 activation vector = 28 of 32 registers */
#define NB 3
#elif VL == 8
#define MB 4 /* 4 x 3 accumulators + 3 weight vectors + 1 activation vector = 16 registers */
#define NB 3
#else
#define MB 4
#define NB 2
#endif

/* One block: mb activation rows (<= MB) times nb weight rows (<= NB).  mb, nb, wf32 and xb are compile-time
 * constants at every call site (see block()), so the accumulator array lives in registers.  The weight rows are
 * bf16, or (wf32) float32 rows already widened into a scratch block; the activation rows float32, or (xb) bf16
 * widened as they are read — half the bytes, so 16 rows of K <= 1,024 stay in L1 across weight blocks (measured
 * on the AVX2 EPYC, 16 x 1,024 -> 3,584: 85 against 75 GFLOP/s with float32 activation rows). */
static inline __attribute__((always_inline)) void micro(const int mb, const int nb, const int wf32, const int xb,
                                                        const void *x, int64_t ldx, const void *w, int64_t K,
                                                        void *y, int64_t ldy, int y_bf16) {
    vec acc[MB][NB];
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++) acc[i][j] = vzero();
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        vec wv[NB];
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++)
            wv[j] = wf32 ? vload_x((const float *)w + j * K + k) : vload_w((const uint16_t *)w + j * K + k);
#pragma GCC unroll 8
        for (int i = 0; i < mb; i++) {
            vec xv = xb ? vload_w((const uint16_t *)x + i * ldx + k) : vload_x((const float *)x + i * ldx + k);
#pragma GCC unroll 4
            for (int j = 0; j < nb; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) {
            float s = vsum(acc[i][j]);
            for (int64_t t = k; t < K; t++)
                s += (xb ? bf16_to_f32(((const uint16_t *)x)[i * ldx + t]) : ((const float *)x)[i * ldx + t]) *
                     (wf32 ? ((const float *)w)[j * K + t] : bf16_to_f32(((const uint16_t *)w)[j * K + t]));
            if (y_bf16)
                ((uint16_t *)y)[i * ldy + j] = f32_to_bf16(s);
            else
                ((float *)y)[i * ldy + j] = s;
        }
}

#define CASE_NB(m, n) case n: micro(m, n, wf32, xb, x, ldx, w, K, y, ldy, y_bf16); return;
#if NB > 2
#define CASE_NB3(m) CASE_NB(m, 3)
#else
#define CASE_NB3(m)
#endif
#define CASE_MB(m)                                     \
    case m:                                            \
        switch (nb) { CASE_NB(m, 1) CASE_NB(m, 2) CASE_NB3(m) } \
        return;

#define DEFINE_BLOCK(name, WF32, XB)                                                                               \
    static void name(int mb, int nb, const void *x, int64_t ldx, const void *w, int64_t K, void *y, int64_t ldy,  \
                     int y_bf16) {                                                                                 \
        const int wf32 = WF32, xb = XB;                                                                            \
        switch (mb) { CASE_MB(1) CASE_MB(2) CASE_MB(3) CASE_MB(4) MORE_MB }                                        \
    }
#if MB > 4
#define MORE_MB CASE_MB(5) CASE_MB(6) CASE_MB(7) CASE_MB(8)
#else
#define MORE_MB
#endif
DEFINE_BLOCK(block, 0, 0)        /* bf16 weight rows, widened as they are read */
DEFINE_BLOCK(block_f32, 1, 0)    /* weight rows widened once into scratch */
DEFINE_BLOCK(block_f32_xb, 1, 1) /* weight rows widened once, bf16 activation rows */

/* y rows [0, M) for one block of nb weight rows: with more activation rows than one register block holds, the
 * weight rows are widened to float32 once (nb x K floats, L1/L2-resident) and every row block reads those,
 * instead of widening the same bf16 values M / MB times.  x is float32 rows, or (x_bf16, only with scratch) the
 * caller's bf16 rows read in place. */
static void rows_block(int64_t M, int nb, const void *x, int x_bf16, int64_t ldx, const uint16_t *w, int64_t K,
                       void *y, int64_t ldy, int y_bf16, float *wscratch) {
    const int widened = M > MB && wscratch;
    if (widened) {
        for (int j = 0; j < nb; j++) {
            int64_t k = 0;
            for (; k + VL <= K; k += VL) vstore(wscratch + j * K + k, vload_w(w + j * K + k));
            for (; k < K; k++) wscratch[j * K + k] = bf16_to_f32(w[j * K + k]);
        }
    }
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = (int)(M - m0 < MB ? M - m0 : MB);
        void *yb = y_bf16 ? (void *)((uint16_t *)y + m0 * ldy) : (void *)((float *)y + m0 * ldy);
        if (widened && x_bf16)
            block_f32_xb(mb, nb, (const uint16_t *)x + m0 * ldx, ldx, wscratch, K, yb, ldy, y_bf16);
        else if (widened)
            block_f32(mb, nb, (const float *)x + m0 * ldx, ldx, wscratch, K, yb, ldy, y_bf16);
        else
            block(mb, nb, (const float *)x + m0 * ldx, ldx, w, K, yb, ldy, y_bf16);
    }
}

/* One activation row (batch-1 decode) is bound by streaming the weight from memory.  The rows of a block are
 * walked one after the other — the weight is read as one sequential stream, which the hardware prefetcher
 * follows best (measured on a 2-core EPYC, AVX2, 248,320 x 1,024 bf16 from DRAM: 25 GB/s, against 20 for
 * eight rows read side by side with software prefetch) — with four accumulator chains per row to hide the FMA
 * latency.  GEMV_NB rows form one work item. */
#define GEMV_NB 8
static inline float dot_bf16_row(const float *x, const uint16_t *w, int64_t K) {
    vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t k = 0;
    for (; k + 4 * VL <= K; k += 4 * VL) {
        a0 = vfma(vload_x(x + k), vload_w(w + k), a0);
        a1 = vfma(vload_x(x + k + VL), vload_w(w + k + VL), a1);
        a2 = vfma(vload_x(x + k + 2 * VL), vload_w(w + k + 2 * VL), a2);
        a3 = vfma(vload_x(x + k + 3 * VL), vload_w(w + k + 3 * VL), a3);
    }
    for (; k + VL <= K; k += VL) a0 = vfma(vload_x(x + k), vload_w(w + k), a0);
    float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
    for (; k < K; k++) s += x[k] * bf16_to_f32(w[k]);
    return s;
}

static void gemv_rows(const float *x, const uint16_t *w, int64_t K, int nb, void *y, int y_bf16) {
    for (int j = 0; j < nb; j++) {
        const float s = dot_bf16_row(x, w + j * K, K);
        if (y_bf16)
            ((uint16_t *)y)[j] = f32_to_bf16(s);
        else
            ((float *)y)[j] = s;
    }
}

/* The activation rows as float32: x itself, or (x_bf16) a widened copy in *scratch (the caller frees it), whose
 * row stride replaces *ldx.  NULL when the copy cannot be allocated.  Widening once here lets every inner loop
 * read float32. */
static const float *float_rows(const void *x_in, int x_bf16, int64_t *ldx, int64_t M, int64_t K, float **scratch) {
    *scratch = NULL;
    if (!x_bf16) return (const float *)x_in;
    float *f = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (!f) return NULL;
    for (int64_t i = 0; i < M; i++)
        for (int64_t t = 0; t < K; t++) f[i * K + t] = bf16_to_f32(((const uint16_t *)x_in)[i * *ldx + t]);
    *scratch = f;
    *ldx = K;
    return f;
}

const char *q35_isa(void) { return ISA; }

#ifdef HAVE_DPBF16
/* ---- bf16 activation rows on CPUs with AVX512-BF16 ---------------------------------------------------------
 *
 * Why: with bf16 activations (a bf16 model) no value needs widening: vdpbf16ps multiplies 32 bf16 pairs and adds
 * them, pairwise, into 16 float32 lanes — one instruction where the float32 path spends a load, a widening shift
 * and an FMA per 16 weights and has to widen the activation rows first.  Measured on a 2-core AMD EPYC with
 * AVX512-BF16 (benchmarks/RESULTS.md, session 10).  The products of two bf16 values are exact in float32 and the
 * sums are float32, as on the FMA path; the instruction flushes subnormal inputs and results to zero, which bf16
 * weights and activations of a working model do not reach (tests/kernels compare it with the float32 reference).
 *
 * K is walked in steps of 32; a shorter last step loads with a mask (zeros contribute nothing), so every K is
 * exact without a scalar tail. */
static inline __m512 dp_load(const uint16_t *p, int64_t left) {
    const __mmask32 m = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, p));
}
static inline __m512 dp(__m512 acc, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

/* one activation row against nb weight rows, each row in one sequential stream (as gemv_rows) */
static void dp_gemv_rows(const uint16_t *x, const uint16_t *w, int64_t K, int nb, void *y, int y_bf16) {
    for (int j = 0; j < nb; j++) {
        const uint16_t *wr = w + j * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            a0 = dp(a0, dp_load(x + k, 32), dp_load(wr + k, 32));
            a1 = dp(a1, dp_load(x + k + 32, 32), dp_load(wr + k + 32, 32));
        }
        for (; k < K; k += 32) a0 = dp(a0, dp_load(x + k, K - k), dp_load(wr + k, K - k));
        act_st(y, y_bf16, j, _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
    }
}

/* mb activation rows (<= MB, stride ldx) times nb weight rows (<= NB): the MB x NB accumulators stay in registers
 * (mb and nb are constants at every call site, see dp_block) */
static inline __attribute__((always_inline)) void dp_micro(const int mb, const int nb, const uint16_t *x, int64_t ldx,
                                                           const uint16_t *w, int64_t K, void *y, int64_t ldy,
                                                           int y_bf16) {
    __m512 acc[MB][NB];
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const int64_t left = K - k;
        __m512 wv[NB];
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++) wv[j] = dp_load(w + j * K + k, left);
#pragma GCC unroll 8
        for (int i = 0; i < mb; i++) {
            const __m512 xv = dp_load(x + i * ldx + k, left);
#pragma GCC unroll 4
            for (int j = 0; j < nb; j++) acc[i][j] = dp(acc[i][j], xv, wv[j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) act_st(y, y_bf16, i * ldy + j, _mm512_reduce_add_ps(acc[i][j]));
}

#define DP_NB(m, n) case n: dp_micro(m, n, x, ldx, w, K, y, ldy, y_bf16); return;
#define DP_MB(m) case m: switch (nb) { DP_NB(m, 1) DP_NB(m, 2) DP_NB(m, 3) } return;
static void dp_block(int mb, int nb, const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t K, void *y,
                     int64_t ldy, int y_bf16) {
    switch (mb) { DP_MB(1) DP_MB(2) DP_MB(3) DP_MB(4) DP_MB(5) DP_MB(6) DP_MB(7) DP_MB(8) }
}

/* q35_linear_bf16_multi for bf16 x: the same work items (blocks of weight rows split between threads) */
static void dp_linear_multi(const uint16_t *x, int64_t ldx, int nw, const uint16_t *const *ws, const int64_t *Ns,
                            const int64_t *col0, const int64_t *first_block, int64_t rows_per_block, void *y,
                            int y_bf16, int64_t ldy, int64_t M, int64_t K, int threads) {
    const int64_t nblocks = first_block[nw];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < nblocks; b++) {
        const int wi = multi_item(first_block, b);
        const int64_t N = Ns[wi], n0 = (b - first_block[wi]) * rows_per_block;
        const uint16_t *w = ws[wi] + n0 * K;
        const int64_t c = col0[wi] + n0;
        const int nb = (int)(N - n0 < rows_per_block ? N - n0 : rows_per_block);
        if (M == 1) {
            dp_gemv_rows(x, w, K, nb, y_bf16 ? (void *)((uint16_t *)y + c) : (void *)((float *)y + c), y_bf16);
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mb = (int)(M - m0 < MB ? M - m0 : MB);
            const int64_t at = m0 * ldy + c;
            dp_block(mb, nb, x + m0 * ldx, ldx, w, K, y_bf16 ? (void *)((uint16_t *)y + at) : (void *)((float *)y + at),
                     ldy, y_bf16);
        }
    }
}
#endif

/* y = x · [W_0 | W_1 | …]ᵀ: several weights that read the same activations (a layer's input projections) in one
 * call, their outputs side by side in the rows of y (weight i's columns start where weight i−1's end).  One
 * parallel region and one widening of x serve them all.  x is float32, or bf16 when x_bf16 (widened here once,
 * so the inner loop reads float32); y is written as float32, or rounded to bf16 when y_bf16 — so a bf16 model
 * needs no conversions around the call.  Returns 0 on success, -1 on arguments the kernel does not take (the
 * caller checks them first), -2 when the scratch for a bf16 x cannot be allocated. */
#define MAX_WEIGHTS 8
int q35_linear_bf16_multi(const void *x_in, int x_bf16, int64_t ldx, int nw, const uint16_t *const *ws,
                          const int64_t *Ns, void *y, int y_bf16, int64_t ldy, int64_t M, int64_t K, int threads) {
    if (M <= 0 || K <= 0 || ldx < K || nw < 1 || nw > MAX_WEIGHTS || NB > 3) return -1;
    int64_t col0[MAX_WEIGHTS], first_block[MAX_WEIGHTS + 1];
    const int64_t rows_per_block = M == 1 ? GEMV_NB : NB;
    const int64_t total_cols = multi_plan(nw, Ns, rows_per_block, col0, first_block);
    if (total_cols < 0 || ldy < total_cols) return -1;
    const int64_t nblocks = first_block[nw];
    if (threads < 1) threads = 1;
    if (threads > nblocks) threads = (int)nblocks;
#ifdef HAVE_DPBF16
    if (x_bf16) {
        dp_linear_multi((const uint16_t *)x_in, ldx, nw, ws, Ns, col0, first_block, rows_per_block, y, y_bf16, ldy, M,
                        K, threads);
        return 0;
    }
#endif
    /* bf16 activations are widened once up front for the one-row and small-block paths; the widened-weight path
     * (M > MB) reads them in place */
    const int x_in_place = x_bf16 && M > MB;
    float *scratch = NULL;
    const void *x = x_in_place ? x_in : (const void *)float_rows(x_in, x_bf16, &ldx, M, K, &scratch);
    if (!x) return -2;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        float *wscratch = M > MB ? (float *)malloc((size_t)(NB * K) * sizeof(float)) : NULL;
        if (M > MB && !wscratch) rc = -2; /* bf16 rows read in place need the widened weights */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            if (M > MB && !wscratch) continue;
            const int wi = multi_item(first_block, b);
            const int64_t N = Ns[wi], n0 = (b - first_block[wi]) * rows_per_block;
            const uint16_t *w = ws[wi] + n0 * K;
            const int64_t c = col0[wi] + n0;
            void *yc = y_bf16 ? (void *)((uint16_t *)y + c) : (void *)((float *)y + c);
            if (M == 1) {
                gemv_rows((const float *)x, w, K, (int)(N - n0 < GEMV_NB ? N - n0 : GEMV_NB), yc, y_bf16);
                continue;
            }
            rows_block(M, (int)(N - n0 < NB ? N - n0 : NB), x, x_in_place, ldx, w, K, yc, ldy, y_bf16, wscratch);
        }
        free(wscratch);
    }
    free(scratch);
    return rc;
}

/* ---- int8 weights with one float32 scale per row (qwen35/quant/int8.py) ----------------------------------------
 *
 * Why: PyTorch's int8 weight kernel (aten._weight_int8pack_mm) decodes at the speed of the bf16 model on a 2-core
 * AVX2 machine (8 tok/s for Qwen3.5-0.8B against llama.cpp Q8_0's 21): it does not stream the half-size weights
 * any faster.  Here a weight row is dequantised as q · scale — exactly the values of the reference
 * (Int8Linear.dequantized()) — in registers at one activation row (one sequential stream, as gemv_rows), or
 * into an L1-resident float32 block shared by every row block at more, and multiplied in float32.
 *
 * x [M, K] float32 or bf16 (x_bf16, row stride ldx), q [N, K] int8, scale [N] float32, y [M, N] contiguous,
 * float32 or bf16 (y_bf16).  Returns 0, -1 on bad arguments, -2 out of memory. */
static inline float dot_q8_row(const float *x, const int8_t *w, float scale, int64_t K) {
    const vec sv = vset1(scale);
    vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t k = 0;
    for (; k + 4 * VL <= K; k += 4 * VL) {
        a0 = vfma(vload_x(x + k), vmul(vload_q8(w + k), sv), a0);
        a1 = vfma(vload_x(x + k + VL), vmul(vload_q8(w + k + VL), sv), a1);
        a2 = vfma(vload_x(x + k + 2 * VL), vmul(vload_q8(w + k + 2 * VL), sv), a2);
        a3 = vfma(vload_x(x + k + 3 * VL), vmul(vload_q8(w + k + 3 * VL), sv), a3);
    }
    for (; k + VL <= K; k += VL) a0 = vfma(vload_x(x + k), vmul(vload_q8(w + k), sv), a0);
    float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
    for (; k < K; k++) s += x[k] * ((float)w[k] * scale);
    return s;
}

int q35_linear_int8(const void *x_in, int x_bf16, int64_t ldx, const int8_t *w, const float *scale, void *y,
                    int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0 || N <= 0 || K <= 0 || ldx < K) return -1;
    float *scratch = NULL;
    const float *x = float_rows(x_in, x_bf16, &ldx, M, K, &scratch);
    if (!x) return -2;
    const int64_t per = M == 1 ? GEMV_NB : NB, nblocks = (N + per - 1) / per;
    if (threads < 1) threads = 1;
    if (threads > nblocks) threads = (int)nblocks;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        float *wf = M > 1 ? (float *)malloc((size_t)(NB * K) * sizeof(float)) : NULL;
        if (M > 1 && !wf) rc = -2;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t n0 = b * per;
            const int nb = (int)(N - n0 < per ? N - n0 : per);
            void *yc = y_bf16 ? (void *)((uint16_t *)y + n0) : (void *)((float *)y + n0);
            if (M == 1) {
                for (int j = 0; j < nb; j++) {
                    const float v = dot_q8_row(x, w + (n0 + j) * K, scale[n0 + j], K);
                    if (y_bf16)
                        ((uint16_t *)yc)[j] = f32_to_bf16(v);
                    else
                        ((float *)yc)[j] = v;
                }
                continue;
            }
            if (!wf) continue;
            for (int j = 0; j < nb; j++) {
                const int8_t *q = w + (n0 + j) * K;
                const vec sv = vset1(scale[n0 + j]);
                int64_t k = 0;
                for (; k + VL <= K; k += VL) vstore(wf + j * K + k, vmul(vload_q8(q + k), sv));
                for (; k < K; k++) wf[j * K + k] = (float)q[k] * scale[n0 + j];
            }
            for (int64_t m0 = 0; m0 < M; m0 += MB) {
                const int mb = (int)(M - m0 < MB ? M - m0 : MB);
                void *yb = y_bf16 ? (void *)((uint16_t *)yc + m0 * N) : (void *)((float *)yc + m0 * N);
                block_f32(mb, nb, x + m0 * ldx, ldx, wf, K, yb, N, y_bf16);
            }
        }
        free(wf);
    }
    free(scratch);
    return rc;
}

/* ---- int8 weights times int8-rounded activations (q35_linear_int8_q8) ------------------------------------------
 *
 * Why: the product above widens every weight byte to a float32 lane before its FMA (four vector operations per 8
 * weights), so at one activation row it is bound by that work, not by the bytes (about 8-10 GB/s on one AVX2
 * core, which reads 15 GB/s).  Rounding each activation row to int8 once per call (cost K, against N·K for the
 * product) keeps the weights bytes: per 32 weights and activation row one load, a sign, a _mm256_maddubs_epi16
 * (|w| unsigned × sign(w)·x signed, adjacent pairs summed to int16: at most 2·127·127, no overflow), a
 * _mm256_madd_epi16 to int32, one convert and one FMA — llama.cpp's Q8_0 × Q8_0 dot product, on this project's
 * plain row-major int8 weights.
 *
 * Numerics: the activations are rounded exactly as int4.c's q35_linear_int4_q8 rounds them (blocks of 32,
 * q = round_half_even(x · (127 / amax)), d = amax / 127), so
 *     y[m, n] = scale[n] · Σ_blocks d[m, b] · Σ_{k in block b} q_w[n, k] · q_x[m, k]
 * with the inner sums exact in int32 (qwen35.kernels.ops.linear_int8_q8_reference defines it).  A row's result
 * depends on that row alone — the same bits in a decode step and in the prompt that holds it — because every
 * row goes through the same operations whatever the number of rows in the call.
 *
 * Loops: threads split blocks of Q8W_ROWS weight rows; within one, blocks of Q8W_R activation rows (4 x K bytes,
 * in L1) are outermost, so each work item reads the rounded activations once. */
#define Q8W_BLOCK 32
#define Q8W_ROWS 8
#define Q8W_R 4

/* one activation row x [K] into q [nd · 32] (zero past K) and d [nd] */
static void round_row_q8(const void *x, int x_bf16, int64_t K, int8_t *q, float *d) {
    for (int64_t b = 0; b * Q8W_BLOCK < K; b++) d[b] = round_block_q8(x, x_bf16, b * Q8W_BLOCK, K, q + b * Q8W_BLOCK);
}

/* R activation rows (q stride nd·32, d stride nd) times one int8 weight row w [K]: out[r], before the row scale */
static inline __attribute__((always_inline)) void dot_i8_rows(const int R, const int8_t *q, const float *d,
                                                              int64_t nd, const int8_t *w, int64_t K, float *out) {
    const int64_t full = K / Q8W_BLOCK, ldq = nd * Q8W_BLOCK;
    int64_t b = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    /* AVX512-VNNI: two blocks (64 weights) per step; vpdpbusd sums four |w| · sign(w)·x byte products straight
     * into int32 (the integers of maddubs + madd below, exactly), lanes 0-7 block b, 8-15 block b + 1, each
     * scaled by its activation block's scale.  About half the instructions of the AVX2 path per weight
     * (measured: benchmarks/RESULTS.md, session 10). */
    __m512 acc[Q8W_R];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (; b + 2 <= full; b += 2) {
        const __m512i wv = _mm512_loadu_si512((const void *)(w + Q8W_BLOCK * b));
        const __m512i aw = _mm512_abs_epi8(wv); /* −128 gives byte 0x80 = 128 unsigned, still right */
        const __mmask64 neg = _mm512_movepi8_mask(wv);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(q + r * ldq + Q8W_BLOCK * b));
            const __m512i xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
            const __m512i s32 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, xs);
            const __m512 dv = _mm512_insertf32x8(_mm512_set1_ps(d[r * nd + b]), _mm256_set1_ps(d[r * nd + b + 1]), 1);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), dv, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[Q8W_R];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    /* even and odd blocks into two accumulators, so consecutive blocks' FMAs do not wait on each other; every
     * row takes the same path whatever R is (a row's bits must not depend on its batch) */
    __m256 odd[Q8W_R];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) odd[r] = _mm256_setzero_ps();
#define I8_BLOCK(ACC, bb)                                                                                         \
    {                                                                                                            \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + Q8W_BLOCK * (bb)));                         \
        const __m256i aw = _mm256_sign_epi8(wv, wv); /* |w| unsigned: −128 gives byte 0x80 = 128, still right */ \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                                    \
            const __m256i xs =                                                                                   \
                _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(q + r * ldq + Q8W_BLOCK * (bb))), wv);     \
            const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);                           \
            ACC[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_broadcast_ss(d + r * nd + (bb)), ACC[r]);   \
        }                                                                                                        \
    }
    for (; b + 2 <= full; b += 2) {
        I8_BLOCK(acc, b)
        I8_BLOCK(odd, b + 1)
    }
    if (b < full) {
        I8_BLOCK(acc, b)
        b++;
    }
#undef I8_BLOCK
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm256_add_ps(acc[r], odd[r]);
    for (int r = 0; r < R; r++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm_cvtss_f32(h);
    }
#else
    for (int r = 0; r < R; r++) out[r] = 0.0f;
#endif
    for (; b < nd; b++) { /* whole blocks in the scalar build; the partial last block in every build */
        const int64_t k0 = b * Q8W_BLOCK, k1 = k0 + Q8W_BLOCK < K ? k0 + Q8W_BLOCK : K;
        for (int r = 0; r < R; r++) {
            int32_t isum = 0;
            for (int64_t k = k0; k < k1; k++) isum += (int32_t)w[k] * (int32_t)q[r * ldq + k];
            out[r] += d[r * nd + b] * (float)isum;
        }
    }
}

static void dot_i8(int R, const int8_t *q, const float *d, int64_t nd, const int8_t *w, int64_t K, float *out) {
    switch (R) {
    case 1: dot_i8_rows(1, q, d, nd, w, K, out); return;
    case 2: dot_i8_rows(2, q, d, nd, w, K, out); return;
    case 3: dot_i8_rows(3, q, d, nd, w, K, out); return;
    default: dot_i8_rows(4, q, d, nd, w, K, out); return;
    }
}

/* several int8 weights [N_i, K] that read the same activations, outputs side by side in the rows of y (row stride
 * ldy >= ΣN_i), the activations rounded once; each value as the one-weight call computes it */
int q35_linear_int8_q8_multi(const void *x, int x_bf16, int64_t ldx, int nw, const int8_t *const *ws,
                             const float *const *scales, const int64_t *Ns, void *y, int y_bf16, int64_t ldy,
                             int64_t M, int64_t K, int threads) {
    if (M <= 0 || K <= 0 || ldx < K || nw < 1 || nw > MAX_WEIGHTS) return -1;
    int64_t col0[MAX_WEIGHTS], first_item[MAX_WEIGHTS + 1];
    const int64_t cols = multi_plan(nw, Ns, Q8W_ROWS, col0, first_item);
    if (cols < 0 || ldy < cols) return -1;
    const int64_t nd = (K + Q8W_BLOCK - 1) / Q8W_BLOCK, ldq = nd * Q8W_BLOCK;
    int8_t *q = (int8_t *)malloc((size_t)(M * ldq));
    float *d = (float *)malloc((size_t)(M * nd) * sizeof(float));
    if (!q || !d) {
        free(q), free(d);
        return -2;
    }
    const int64_t nwork = first_item[nw];
    if (threads < 1) threads = 1;
    if (threads > nwork) threads = (int)nwork;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            round_row_q8(x_bf16 ? (const void *)((const uint16_t *)x + m * ldx) : (const void *)((const float *)x + m * ldx),
                         x_bf16, K, q + m * ldq, d + m * nd);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nwork; b++) {
            const int wi = multi_item(first_item, b);
            const int64_t N = Ns[wi], n0 = (b - first_item[wi]) * Q8W_ROWS, nend = n0 + Q8W_ROWS < N ? n0 + Q8W_ROWS : N;
            const int8_t *w = ws[wi];
            const float *sc = scales[wi];
            for (int64_t m0 = 0; m0 < M; m0 += Q8W_R) {
                const int R = (int)(M - m0 < Q8W_R ? M - m0 : Q8W_R);
                for (int64_t n = n0; n < nend; n++) {
                    float out[Q8W_R];
                    dot_i8(R, q + m0 * ldq, d + m0 * nd, nd, w + n * K, K, out);
                    for (int r = 0; r < R; r++) act_st(y, y_bf16, (m0 + r) * ldy + col0[wi] + n, sc[n] * out[r]);
                }
            }
        }
    }
    free(q), free(d);
    return 0;
}

int q35_linear_int8_q8(const void *x, int x_bf16, int64_t ldx, const int8_t *w, const float *scale, void *y,
                       int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    return q35_linear_int8_q8_multi(x, x_bf16, ldx, 1, &w, &scale, &N, y, y_bf16, N, M, K, threads);
}

/* ---- the routed experts of a sparse-MoE layer, for a few tokens ---------------------------------------------
 *
 * Why: a decode step of Qwen3.5-35B-A3B sends each token to 8 of 256 experts; in PyTorch every chosen expert
 * costs a dozen small operations (gather, two products, SwiGLU, scale, scatter-add), which for 16 tokens is
 * ~100 experts x 8 layers of dispatch, more than the weights take to stream.  Here all (token, expert) pairs
 * of a layer run in three parallel passes: the gate/up products of every chosen expert, SwiGLU, the down
 * products; then each token sums its experts' outputs, weighted.
 *
 * Arithmetic and rounding follow qwen35/model/moe.py (Experts.expert + grouped_experts): with bf16
 * activations (act_bf16) every intermediate PyTorch would store in bf16 is rounded here too, and a token's
 * expert outputs are added in increasing expert order, as the index_add_ over expert-sorted pairs does.
 *
 * x [M, H] (act dtype), experts [M, k] int64, weights [M, k] (act dtype), gate_up [E, 2I, H] and down [E, H, I]
 * bf16, y [M, H] (act dtype).  Returns 0, -1 on bad arguments (an expert id out of range), -2 out of memory. */

/* rows [r0, r0 + nr) of one expert matrix w [R, K] times the n gathered rows of X (stride K) into Y (stride ldy) */
static void expert_rows(const float *X, int64_t n, const uint16_t *w, int64_t K, int64_t r0, int nr, float *Y,
                        int64_t ldy) {
    if (n == 1) {
        gemv_rows(X, w + r0 * K, K, nr, Y + r0, 0);
        return;
    }
    for (int64_t m0 = 0; m0 < n; m0 += MB) {
        const int mb = (int)(n - m0 < MB ? n - m0 : MB);
        block(mb, nr, X + m0 * K, K, w + r0 * K, K, Y + m0 * ldy + r0, ldy, 0);
    }
}

/* Y_s = X_s · W_eᵀ for every expert group: rows gstart[g]..gstart[g+1] of X (stride K) against expert gexp[g]'s
 * matrix (R x K, experts R*K apart in W), into rows of Y (stride R).  Work items are blocks of output rows. */
static void grouped_products(const float *X, int64_t K, const uint16_t *W, int64_t R, const int64_t *gstart,
                             const int64_t *gexp, int64_t ngroups, float *Y, int threads) {
    const int64_t per = (R + GEMV_NB - 1) / GEMV_NB;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (int64_t it = 0; it < ngroups * per; it++) {
        const int64_t g = it / per, r0 = (it % per) * GEMV_NB, n = gstart[g + 1] - gstart[g];
        const int64_t rend = r0 + GEMV_NB < R ? r0 + GEMV_NB : R, step = n == 1 ? GEMV_NB : NB;
        const uint16_t *w = W + gexp[g] * R * K;
        for (int64_t r = r0; r < rend; r += step) {
            const int nr = (int)(rend - r < step ? rend - r : step);
            expert_rows(X + gstart[g] * K, n, w, K, r, nr, Y + gstart[g] * R, R);
        }
    }
}

int q35_moe_experts(const void *x, int act_bf16, int64_t M, int64_t H, const int64_t *experts,
                    const void *weights, int64_t k, const uint16_t *gate_up, const uint16_t *down, int64_t E,
                    int64_t I, void *y, int threads) {
    if (M <= 0 || H <= 0 || k <= 0 || k > 64 || E <= 0 || I <= 0 || NB > 3) return -1;
    const int64_t P = M * k;
    for (int64_t p = 0; p < P; p++)
        if (experts[p] < 0 || experts[p] >= E) return -1;
    int64_t *count = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *order = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    float *X = (float *)malloc((size_t)(P * H) * sizeof(float));
    float *G = (float *)malloc((size_t)(P * 2 * I) * sizeof(float));
    float *A = (float *)malloc((size_t)(P * I) * sizeof(float));
    float *D = (float *)malloc((size_t)(P * H) * sizeof(float));
    /* group starts and work items (one per expert group and block of output rows) */
    int64_t *gstart = (int64_t *)malloc((size_t)(P + 1) * sizeof(int64_t));
    int64_t *gexp = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    int64_t *slot_of = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    int rc = 0;
    if (!count || !order || !X || !G || !A || !D || !gstart || !gexp || !slot_of) { rc = -2; goto done; }
    /* stable counting sort of the pairs by expert: within an expert, pairs stay in token order */
    for (int64_t p = 0; p < P; p++) count[experts[p] + 1]++;
    for (int64_t e = 0; e < E; e++) count[e + 1] += count[e];
    int64_t ngroups = 0;
    for (int64_t e = 0; e < E; e++)
        if (count[e + 1] > count[e]) { gstart[ngroups] = count[e]; gexp[ngroups++] = e; }
    gstart[ngroups] = P;
    for (int64_t p = 0; p < P; p++) order[count[experts[p]]++] = p;
    /* sorted pair s reads token order[s] / k */
    for (int64_t s = 0; s < P; s++) {
        const int64_t t = order[s] / k;
        for (int64_t h = 0; h < H; h++)
            X[s * H + h] = act_ld(x, act_bf16, t * H + h);
    }
    if (threads < 1) threads = 1;
    /* pass 1: gate and up rows of every chosen expert */
    grouped_products(X, H, gate_up, 2 * I, gstart, gexp, ngroups, G, threads);
    /* pass 2: SwiGLU, rounded as PyTorch rounds the bf16 gate, up, SiLU(gate) and product */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t s = 0; s < P; s++)
        for (int64_t c = 0; c < I; c++) {
            const float gt = act_round(act_bf16, G[s * 2 * I + c]), up = act_round(act_bf16, G[s * 2 * I + I + c]);
            A[s * I + c] = act_round(act_bf16, act_round(act_bf16, gt / (1.0f + expf(-gt))) * up);
        }
    /* pass 3: down rows */
    grouped_products(A, I, down, H, gstart, gexp, ngroups, D, threads);
    /* pass 4: each token adds its experts' weighted outputs, in increasing expert (= sorted) order */
    {
        for (int64_t s = 0; s < P; s++) slot_of[order[s]] = s;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < M; t++) {
            int64_t pos[64];
            const int64_t kk = k;
            for (int64_t j = 0; j < kk; j++) pos[j] = slot_of[t * k + j];
            for (int64_t a = 1; a < kk; a++) /* insertion sort: k is small */
                for (int64_t b = a; b > 0 && pos[b - 1] > pos[b]; b--) {
                    const int64_t tmp = pos[b]; pos[b] = pos[b - 1]; pos[b - 1] = tmp;
                }
            for (int64_t h = 0; h < H; h++) {
                float acc = 0.0f;
                for (int64_t j = 0; j < kk; j++) {
                    const int64_t s = pos[j], p = order[s];
                    const float wgt = act_ld(weights, act_bf16, p);
                    acc = act_round(act_bf16, acc + act_round(act_bf16, act_round(act_bf16, D[s * H + h]) * wgt));
                }
                act_st(y, act_bf16, t * H + h, acc);
            }
        }
    }
done:
    free(count); free(order); free(X); free(G); free(A); free(D); free(gstart); free(gexp); free(slot_of);
    return rc;
}
