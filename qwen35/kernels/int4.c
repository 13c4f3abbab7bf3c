/* Products with 4-bit weights (qwen35/quant/int4.py), for the few-row matmuls of decoding, and the dequantisation
 * of such a weight to float32 / bf16 for prompt-sized products.
 *
 * Why: decoding one token reads every weight once, so its speed is the speed at which the weights stream from
 * memory; 4-bit weights are a quarter of bf16's bytes.  PyTorch has no kernel for this format on x86 CPUs (its
 * int4 kernels want a packed tile layout of their own and bf16 activations), so this one streams the packed rows
 * once, widens the nibbles in registers and multiplies in float32.
 *
 * Format (one weight matrix [N, K]; group size G a power of two >= 32; Kp = K rounded up to a multiple of
 * max(G, 64)):
 *   w       [N, Kp / 2] uint8: each block of 64 consecutive weights k0..k0+63 of a row is 32 bytes read as eight
 *           little-endian 32-bit words; bits 4i..4i+3 of word j hold weight k0 + 8i + j as a two's-complement
 *           nibble (−8..7).  Loaded into the eight 32-bit lanes of an AVX2 register, weights k0+8i .. k0+8i+7
 *           come out in lane order with two shifts (left to the top, arithmetic right by 28: the sign comes
 *           for free) — no shuffles, which were what limited a byte-per-lane layout (2x slower at one row,
 *           1 thread).  Weights past K (padding) are 0.
 *   scales  [N, Kp / G] bf16: weight k of row n is q · scales[n, k / G], exact in float32.
 * Activations x [M, K] float32 or bf16 (x_bf16, row stride ldx); y [M, N] contiguous, float32 or bf16 (y_bf16).
 *
 * One activation row: per row, per group, the 4-bit values (as float32) meet x in FMAs into a group partial sum
 * that the group's scale then multiplies into the row total (one extra FMA per group, no per-weight multiply);
 * rows are walked one after the other, the weight as one sequential stream (as gemm_bf16.c's gemv).  The
 * unpacking is 256-bit AVX2 code in the avx2 and avx512 builds alike (the layout is made for 8 lanes; the
 * product is bound by the unpacking, not by the vector width), portable C in the scalar build.  More rows: a
 * block of NB4 weight rows is dequantised once into an L1-resident float32 block and every block of MB4
 * activation rows multiplies it from registers (simd.h vectors).  Threads split the weight rows.  A second entry
 * point, q35_linear_int4_q8 (at the end of the file), rounds the activations to int8 first and sums in integers:
 * faster, at the price of that rounding; qwen35/kernels/ops.py sends every row count to it by default
 * (Limits.q8_activations), since each row is rounded and summed alone and so gets the same bits in any batch.
 *
 * Built at first use per instruction-set variant (simd.h); qwen35/kernels/__init__.py falls back to PyTorch
 * when no compiler is present.  Returns 0, -1 on bad arguments, -2 out of memory. */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "simd.h"

#define QBLOCK 64 /* weights per 32-byte block of eight 8-nibble words */
#define GEMV_ROWS 8 /* weight rows per work item at one activation row */

#if VL == 16
#define MB4 8 /* 8 x 3 accumulators + 3 weight vectors + 1 activation vector = 28 of 32 registers */
#define NB4 3
#elif VL == 8
#define MB4 4 /* 4 x 3 accumulators + 3 weight + 1 activation = 16 registers */
#define NB4 3
#else
#define MB4 4
#define NB4 2
#endif

/* the signed 4-bit value of weight k of a packed row (scalar code and tails) */
static inline int nibble(const uint8_t *row, int64_t k) {
    const int64_t r = k % QBLOCK, i = r / 8, j = r % 8;
    const uint8_t byte = row[(k / QBLOCK) * 32 + 4 * j + i / 2];
    const int u = (i & 1) ? byte >> 4 : byte & 15;
    return u >= 8 ? u - 16 : u;
}

#if defined(__AVX2__) && defined(__FMA__)
/* weights 8i .. 8i+7 of the block loaded in v, as float32 lanes (i a literal) */
#define Q4(v, i) _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32((v), 28 - 4 * (i)), 28))
#define Q4_FMA(acc, v, x, i) acc = _mm256_fmadd_ps(_mm256_loadu_ps((x) + 8 * (i)), Q4(v, i), acc)

/* x · ŵ for one packed row, whole 64-blocks vectorised (K % 64 weights in scalar code).  Per group a partial sum
 * in two chains; group totals alternate between two accumulators so consecutive groups never wait on each
 * other. */
static inline float dot_q4_row(const float *x, const uint8_t *w, const uint16_t *scales, int64_t G, int64_t K) {
    const int64_t nblocks = K / QBLOCK;
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    if (G == 32) { /* two groups per block */
        for (int64_t b = 0; b < nblocks; b++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
            const float *xb = x + QBLOCK * b;
            __m256 pa = _mm256_mul_ps(_mm256_loadu_ps(xb), Q4(v, 0));
            __m256 pb = _mm256_mul_ps(_mm256_loadu_ps(xb + 8), Q4(v, 1));
            Q4_FMA(pa, v, xb, 2);
            Q4_FMA(pb, v, xb, 3);
            __m256 pc = _mm256_mul_ps(_mm256_loadu_ps(xb + 32), Q4(v, 4));
            __m256 pd = _mm256_mul_ps(_mm256_loadu_ps(xb + 40), Q4(v, 5));
            Q4_FMA(pc, v, xb, 6);
            Q4_FMA(pd, v, xb, 7);
            t0 = _mm256_fmadd_ps(_mm256_add_ps(pa, pb), _mm256_set1_ps(bf16_to_f32(scales[2 * b])), t0);
            t1 = _mm256_fmadd_ps(_mm256_add_ps(pc, pd), _mm256_set1_ps(bf16_to_f32(scales[2 * b + 1])), t1);
        }
    } else {
        const int64_t per_group = G / QBLOCK;
        for (int64_t b = 0, g = 0; b < nblocks; g++) {
            const int64_t bend = b + per_group < nblocks ? b + per_group : nblocks;
            __m256 pa = _mm256_setzero_ps(), pb = _mm256_setzero_ps();
            for (; b < bend; b++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
                const float *xb = x + QBLOCK * b;
                Q4_FMA(pa, v, xb, 0);
                Q4_FMA(pb, v, xb, 1);
                Q4_FMA(pa, v, xb, 2);
                Q4_FMA(pb, v, xb, 3);
                Q4_FMA(pa, v, xb, 4);
                Q4_FMA(pb, v, xb, 5);
                Q4_FMA(pa, v, xb, 6);
                Q4_FMA(pb, v, xb, 7);
            }
            const __m256 sv = _mm256_set1_ps(bf16_to_f32(scales[g]));
            if (g & 1)
                t1 = _mm256_fmadd_ps(_mm256_add_ps(pa, pb), sv, t1);
            else
                t0 = _mm256_fmadd_ps(_mm256_add_ps(pa, pb), sv, t0);
        }
    }
    const __m256 t = _mm256_add_ps(t0, t1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float tail = 0.0f;
    for (int64_t k = nblocks * QBLOCK; k < K; k++) tail += x[k] * ((float)nibble(w, k) * bf16_to_f32(scales[k / G]));
    return _mm_cvtss_f32(h) + tail;
}

/* one packed row dequantised into float32 dst[0, K): exactly q · scale, as the reference */
static inline void dequant_row_f32(const uint8_t *w, const uint16_t *scales, int64_t G, int64_t K, float *dst) {
    const int64_t nblocks = K / QBLOCK;
    for (int64_t b = 0; b < nblocks; b++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
        float *d = dst + QBLOCK * b;
        const __m256 s0 = _mm256_set1_ps(bf16_to_f32(scales[QBLOCK * b / G]));
        const __m256 s1 = G == 32 ? _mm256_set1_ps(bf16_to_f32(scales[2 * b + 1])) : s0;
        _mm256_storeu_ps(d, _mm256_mul_ps(Q4(v, 0), s0));
        _mm256_storeu_ps(d + 8, _mm256_mul_ps(Q4(v, 1), s0));
        _mm256_storeu_ps(d + 16, _mm256_mul_ps(Q4(v, 2), s0));
        _mm256_storeu_ps(d + 24, _mm256_mul_ps(Q4(v, 3), s0));
        _mm256_storeu_ps(d + 32, _mm256_mul_ps(Q4(v, 4), s1));
        _mm256_storeu_ps(d + 40, _mm256_mul_ps(Q4(v, 5), s1));
        _mm256_storeu_ps(d + 48, _mm256_mul_ps(Q4(v, 6), s1));
        _mm256_storeu_ps(d + 56, _mm256_mul_ps(Q4(v, 7), s1));
    }
    for (int64_t k = nblocks * QBLOCK; k < K; k++) dst[k] = (float)nibble(w, k) * bf16_to_f32(scales[k / G]);
}
#else
static inline float dot_q4_row(const float *x, const uint8_t *w, const uint16_t *scales, int64_t G, int64_t K) {
    float tot = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += G) {
        const int64_t kend = k0 + G < K ? k0 + G : K;
        float p = 0.0f;
        for (int64_t k = k0; k < kend; k++) p += x[k] * (float)nibble(w, k);
        tot += p * bf16_to_f32(scales[k0 / G]);
    }
    return tot;
}

static inline void dequant_row_f32(const uint8_t *w, const uint16_t *scales, int64_t G, int64_t K, float *dst) {
    for (int64_t k = 0; k < K; k++) dst[k] = (float)nibble(w, k) * bf16_to_f32(scales[k / G]);
}
#endif

/* mb activation rows (<= MB4) times nb float32 weight rows (<= NB4, stride K); mb and nb are compile-time
 * constants at each call site (block4()), so the accumulators stay in registers */
static inline __attribute__((always_inline)) void micro4(const int mb, const int nb, const float *x, int64_t ldx,
                                                         const float *w, int64_t K, void *y, int64_t ldy,
                                                         int y_bf16) {
    vec acc[MB4][NB4];
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++) acc[i][j] = vzero();
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        vec wv[NB4];
#pragma GCC unroll 4
        for (int j = 0; j < nb; j++) wv[j] = vload_x(w + j * K + k);
#pragma GCC unroll 8
        for (int i = 0; i < mb; i++) {
            const vec xv = vload_x(x + i * ldx + k);
#pragma GCC unroll 4
            for (int j = 0; j < nb; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) {
            float s = vsum(acc[i][j]);
            for (int64_t t = k; t < K; t++) s += x[i * ldx + t] * w[j * K + t];
            act_st(y, y_bf16, i * ldy + j, s);
        }
}

#define Q4_CASE_NB(m, n) case n: micro4(m, n, x, ldx, w, K, y, ldy, y_bf16); return;
#if NB4 > 2
#define Q4_CASE_NB3(m) Q4_CASE_NB(m, 3)
#else
#define Q4_CASE_NB3(m)
#endif
#define Q4_CASE_MB(m) \
    case m: \
        switch (nb) { Q4_CASE_NB(m, 1) Q4_CASE_NB(m, 2) Q4_CASE_NB3(m) } \
        return;
#if MB4 > 4
#define Q4_MORE_MB Q4_CASE_MB(5) Q4_CASE_MB(6) Q4_CASE_MB(7) Q4_CASE_MB(8)
#else
#define Q4_MORE_MB
#endif
static void block4(int mb, int nb, const float *x, int64_t ldx, const float *w, int64_t K, void *y, int64_t ldy,
                   int y_bf16) {
    switch (mb) { Q4_CASE_MB(1) Q4_CASE_MB(2) Q4_CASE_MB(3) Q4_CASE_MB(4) Q4_MORE_MB }
}

int q35_linear_int4(const void *x_in, int x_bf16, int64_t ldx, const uint8_t *w, const uint16_t *scales,
                    int64_t G, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0 || N <= 0 || K <= 0 || ldx < K || G < 32 || (G & (G - 1))) return -1;
    const int64_t span = G > QBLOCK ? G : QBLOCK, row_bytes = (K + span - 1) / span * span / 2,
                  ngroups = row_bytes * 2 / G;
    /* bf16 activations are widened once, so every inner loop reads float32 */
    float *xs = NULL;
    const float *x = (const float *)x_in;
    if (x_bf16) {
        xs = (float *)malloc((size_t)(M * K) * sizeof(float));
        if (!xs) return -2;
        for (int64_t i = 0; i < M; i++)
            for (int64_t t = 0; t < K; t++) xs[i * K + t] = bf16_to_f32(((const uint16_t *)x_in)[i * ldx + t]);
        x = xs;
        ldx = K;
    }
    const int64_t per = M == 1 ? GEMV_ROWS : NB4, nblocks = (N + per - 1) / per;
    if (threads < 1) threads = 1;
    if (threads > nblocks) threads = (int)nblocks;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        float *wf = M > 1 ? (float *)malloc((size_t)(NB4 * K) * sizeof(float)) : NULL;
        if (M > 1 && !wf) rc = -2;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t n0 = b * per;
            const int nb = (int)(N - n0 < per ? N - n0 : per);
            if (M == 1) {
                for (int j = 0; j < nb; j++)
                    act_st(y, y_bf16, n0 + j,
                           dot_q4_row(x, w + (n0 + j) * row_bytes, scales + (n0 + j) * ngroups, G, K));
                continue;
            }
            if (!wf) continue;
            for (int j = 0; j < nb; j++)
                dequant_row_f32(w + (n0 + j) * row_bytes, scales + (n0 + j) * ngroups, G, K, wf + j * K);
            for (int64_t m0 = 0; m0 < M; m0 += MB4) {
                const int mb = (int)(M - m0 < MB4 ? M - m0 : MB4);
                void *yb = y_bf16 ? (void *)((uint16_t *)y + m0 * N + n0) : (void *)((float *)y + m0 * N + n0);
                block4(mb, nb, x + m0 * ldx, ldx, wf, K, yb, N, y_bf16);
            }
        }
        free(wf);
    }
    free(xs);
    return rc;
}

/* out [N, K] = the dequantised weight, for prompt-sized products that multiply it with a GEMM: float32 (exact),
 * or (out_bf16) rounded to the nearest bf16 — a 4-bit value times an 8-bit scale has up to 12 significant bits,
 * so this adds a relative error <= 2^-9, far below the 4-bit step.  One pass, threads split rows. */
int q35_dequantize_int4(const uint8_t *w, const uint16_t *scales, int64_t G, void *out, int out_bf16, int64_t N,
                        int64_t K, int threads) {
    if (N <= 0 || K <= 0 || G < 32 || (G & (G - 1))) return -1;
    const int64_t span = G > QBLOCK ? G : QBLOCK, row_bytes = (K + span - 1) / span * span / 2,
                  ngroups = row_bytes * 2 / G;
    if (threads < 1) threads = 1;
    if (threads > N) threads = (int)N;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        float *row = out_bf16 ? (float *)malloc((size_t)K * sizeof(float)) : NULL;
        if (out_bf16 && !row) rc = -2;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!out_bf16) {
                dequant_row_f32(w + n * row_bytes, scales + n * ngroups, G, K, (float *)out + n * K);
                continue;
            }
            if (!row) continue;
            dequant_row_f32(w + n * row_bytes, scales + n * ngroups, G, K, row);
            uint16_t *o = (uint16_t *)out + n * K;
            for (int64_t k = 0; k < K; k++) o[k] = f32_to_bf16(row[k]);
        }
        free(row);
    }
    return rc;
}

/* ---- the int8-activation product (q35_linear_int4_q8), for every row count ------------------------------------
 *
 * Why: the float32 product above is bound by widening each nibble to a float32 lane (three vector operations per
 * 8 weights before the FMA).  Rounding the activation row to int8 once per call (cost K, against N·K for the
 * product) lets the weights stay bytes: per 64-weight block one load, a xor, two masks, a shift, two
 * _mm256_maddubs_epi16 (unsigned nibble byte × signed activation byte, adjacent pairs summed to int16), an add
 * and two _mm256_madd_epi16 (to int32 per 32-weight half), then one convert and one FMA per half.  That is the
 * shape of llama.cpp's Q4_0 × Q8_0 dot product, written here for this file's packed layout.
 *
 * Numerics (the price): each block of 32 consecutive activations k0..k0+31 (k0 a multiple of 32; the row is
 * zero-padded to Kp) is stored as q = round_half_even(x · (127 / amax)) in −127..127 with the float32 scale
 * d = amax / 127 (both 0 for an all-zero block), as llama.cpp's Q8_0 does.  The product is then
 *     y[m, n] = Σ_blocks  scales[n, k0 / G] · d[m, k0 / 32] · Σ_{k in block} q_w[n, k] · q_x[m, k]
 * with the inner sums exact in int32; only the float32 summation order differs from
 * qwen35.kernels.ops.linear_int4_q8_reference, which defines it.  Against the float32 product the activation
 * rounding adds a relative error of about 2^-8 per block (see tests/quant/test_int4.py).
 *
 * Layout: maddubs pairs byte t of the weight block with byte t of the activations, so the quantised row is
 * stored in the weight's own order: per 64-block, bytes 0..31 are the activations met by the low nibbles
 * (position 4j + p holds weight 16p + j), bytes 32..63 those met by the high nibbles (weight 16p + 8 + j).
 * Within each 32-bit lane the int16 pair sums come out as [first 32 weights, second 32 weights], so madd with
 * (1, 0) and (0, 1) separates the two 32-weight blocks.  The nibbles are used unsigned (q_w + 8, one xor with
 * 0x88 per byte), so the AVX2 code subtracts 8 · Σ_{block} d · Σ q_x per group once per weight row (c below,
 * precomputed per activation row); the scalar build multiplies signed values directly.  Up to Q8_ROWS activation
 * rows share each unpacked weight block; threads split the weight rows.  Every row goes through the same
 * operations in the same order whatever R is, so a row's result does not depend on the rows beside it (a
 * decode step reproduces the bits of the full forward; tests/quant/test_int4.py checks it per ISA variant). */
#define Q8_BLOCK 32
#define Q8_ROWS 4

/* one activation row x [K] (float32 or bf16) into xq [Kp] (weight order), d [Kp / 32] and, per group of G,
 * c [Kp / G] = 8 · Σ_{blocks of the group} d · Σ q */
static void quantize_row_q8(const void *x, int x_bf16, int64_t K, int64_t Kp, int64_t G, int8_t *xq, float *d,
                            float *c) {
    for (int64_t g = 0; g < Kp / G; g++) c[g] = 0.0f;
    for (int64_t k0 = 0; k0 < Kp; k0 += Q8_BLOCK) {
        int8_t q[Q8_BLOCK];
        const float scale = round_block_q8(x, x_bf16, k0, K, q);
        int sum = 0;
        for (int64_t k = k0; k < k0 + Q8_BLOCK; k++) { /* into the weight's order (see above) */
            const int64_t r64 = k % QBLOCK, p = r64 / 16, h = (r64 / 8) & 1, j = r64 % 8;
            xq[k - r64 + 32 * h + 4 * j + p] = q[k - k0];
            sum += q[k - k0];
        }
        d[k0 / Q8_BLOCK] = scale;
        c[k0 / G] += 8.0f * scale * (float)sum;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 t) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* R (a constant at each call site) activation rows (xq stride Kp, d stride Kp/32, c stride ngroups) times one
 * packed weight row: out[r] */
static inline __attribute__((always_inline)) void dot_q8_rows(const int R, const int8_t *xq, const float *d,
                                                              const float *c, const uint8_t *w,
                                                              const uint16_t *scales, int64_t G, int64_t Kp,
                                                              float *out) {
    const int64_t nblocks = Kp / QBLOCK, ngroups = Kp / G, nd = Kp / Q8_BLOCK;
    const __m256i low4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x88);
    const __m256i first = _mm256_set1_epi32(1), second = _mm256_set1_epi32(1 << 16);
    __m256 t0[Q8_ROWS], t1[Q8_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) t0[r] = t1[r] = _mm256_setzero_ps();
#define Q8_HALVES(r, b)                                                                                         \
    const int8_t *q = xq + (r) * Kp + QBLOCK * (b);                                                             \
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q)),      \
                                         _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q + 32)))); \
    const __m256 fa = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, first));                                        \
    const __m256 fb = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, second));
    /* per 32-block the weight scale times the activation scale, 8 64-blocks at a time (vectors at G 32, 64) */
    float sd[Q8_ROWS][16];
    const int gshift = __builtin_ctzll((unsigned long long)(G / Q8_BLOCK)); /* 32-blocks per group, log2 */
    for (int64_t b0 = 0; b0 < nblocks; b0 += 8) {
        const int64_t bend = b0 + 8 < nblocks ? b0 + 8 : nblocks;
        if (G <= 64 && bend - b0 == 8) { /* 16 scales at 32, 8 each used twice at 64 */
            for (int h = 0; h < 2; h++) {
                __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                    (const __m128i *)(scales + (G == 32 ? 2 * b0 + 8 * h : b0)))), 16));
                if (G == 64)
                    sv = _mm256_permutevar8x32_ps(sv, _mm256_add_epi32(_mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0),
                                                                       _mm256_set1_epi32(4 * h)));
#pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    _mm256_storeu_ps(sd[r] + 8 * h, _mm256_mul_ps(sv, _mm256_loadu_ps(d + r * nd + 2 * b0 + 8 * h)));
            }
        } else {
            for (int64_t t = 0; t < 2 * (bend - b0); t++) {
                const float st = bf16_to_f32(scales[(2 * b0 + t) >> gshift]);
                for (int r = 0; r < R; r++) sd[r][t] = st * d[r * nd + 2 * b0 + t];
            }
        }
        for (int64_t b = b0; b < bend; b++) {
            const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 32 * b)), flip);
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                Q8_HALVES(r, b)
                t0[r] = _mm256_fmadd_ps(fa, _mm256_broadcast_ss(sd[r] + 2 * (b - b0)), t0[r]);
                t1[r] = _mm256_fmadd_ps(fb, _mm256_broadcast_ss(sd[r] + 2 * (b - b0) + 1), t1[r]);
            }
        }
    }
#undef Q8_HALVES
    /* the unsigned-nibble offset: Σ_g s_g · c_g, eight groups at a time */
    int64_t g = 0;
    __m256 cv[Q8_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) cv[r] = _mm256_setzero_ps();
    for (; g + 8 <= ngroups; g += 8) {
        const __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(scales + g))), 16));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) cv[r] = _mm256_fmadd_ps(sv, _mm256_loadu_ps(c + r * ngroups + g), cv[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        float corr = hsum8(cv[r]);
        for (int64_t t = g; t < ngroups; t++) corr += bf16_to_f32(scales[t]) * c[r * ngroups + t];
        out[r] = hsum8(_mm256_add_ps(t0[r], t1[r])) - corr;
    }
}

static void dot_q8(int R, const int8_t *xq, const float *d, const float *c, const uint8_t *w, const uint16_t *scales,
                   int64_t G, int64_t Kp, float *out) {
    switch (R) {
    case 1: dot_q8_rows(1, xq, d, c, w, scales, G, Kp, out); return;
    case 2: dot_q8_rows(2, xq, d, c, w, scales, G, Kp, out); return;
    case 3: dot_q8_rows(3, xq, d, c, w, scales, G, Kp, out); return;
    default: dot_q8_rows(4, xq, d, c, w, scales, G, Kp, out); return;
    }
}
#else
/* portable: signed nibbles times signed activation bytes, exact int per 32-block (c unused) */
static void dot_q8(int R, const int8_t *xq, const float *d, const float *c, const uint8_t *w, const uint16_t *scales,
                   int64_t G, int64_t Kp, float *out) {
    (void)c;
    const int64_t nblocks = Kp / QBLOCK, nd = Kp / Q8_BLOCK;
    for (int r = 0; r < R; r++) {
        const int8_t *q = xq + r * Kp;
        float tot = 0.0f;
        for (int64_t b = 0; b < nblocks; b++) {
            int isum[2] = {0, 0};
            for (int t = 0; t < 32; t++) {
                const int byte = w[32 * b + t], lo = ((byte & 15) ^ 8) - 8, hi = ((byte >> 4) ^ 8) - 8;
                isum[(t & 3) >= 2] += lo * q[QBLOCK * b + t] + hi * q[QBLOCK * b + 32 + t];
            }
            for (int h = 0; h < 2; h++) {
                const int64_t k0 = QBLOCK * b + Q8_BLOCK * h;
                tot += bf16_to_f32(scales[k0 / G]) * d[r * nd + k0 / Q8_BLOCK] * (float)isum[h];
            }
        }
        out[r] = tot;
    }
}
#endif

/* Several packed weights [N_i, K] (one group size) that read the same activations: their outputs side by side in
 * the rows of y (row stride ldy >= ΣN_i; weight i's columns start where weight i−1's end).  The activations are
 * rounded once and one parallel region serves every weight — the q/k/v or gate/up projections of a layer in one
 * call.  Each output value is computed exactly as the one-weight call computes it. */
#define Q8_MAX_WEIGHTS 8
int q35_linear_int4_q8_multi(const void *x, int x_bf16, int64_t ldx, int nw, const uint8_t *const *ws,
                             const uint16_t *const *ss, const int64_t *Ns, int64_t G, void *y, int y_bf16,
                             int64_t ldy, int64_t M, int64_t K, int threads) {
    if (M <= 0 || K <= 0 || ldx < K || G < 32 || (G & (G - 1)) || nw < 1 || nw > Q8_MAX_WEIGHTS) return -1;
    const int64_t span = G > QBLOCK ? G : QBLOCK, row_bytes = (K + span - 1) / span * span / 2,
                  Kp = row_bytes * 2, ngroups = Kp / G, nd = Kp / Q8_BLOCK;
    int64_t col0[Q8_MAX_WEIGHTS], first_item[Q8_MAX_WEIGHTS + 1];
    const int64_t cols = multi_plan(nw, Ns, GEMV_ROWS, col0, first_item);
    if (cols < 0 || ldy < cols) return -1;
    int8_t *xq = (int8_t *)malloc((size_t)(M * Kp));
    float *d = (float *)malloc((size_t)(M * nd) * sizeof(float)), *c = (float *)malloc((size_t)(M * ngroups) * sizeof(float));
    if (!xq || !d || !c) {
        free(xq), free(d), free(c);
        return -2;
    }
    const int64_t nwork = first_item[nw];
    if (threads < 1) threads = 1;
    if (threads > nwork) threads = (int)nwork;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_row_q8(x_bf16 ? (const void *)((const uint16_t *)x + m * ldx)
                                   : (const void *)((const float *)x + m * ldx),
                            x_bf16, K, Kp, G, xq + m * Kp, d + m * nd, c + m * ngroups);
        /* (the implicit barrier: every row is rounded before any product reads it) */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nwork; b++) {
            const int wi = multi_item(first_item, b);
            const int64_t N = Ns[wi], n0 = (b - first_item[wi]) * GEMV_ROWS,
                          nend = n0 + GEMV_ROWS < N ? n0 + GEMV_ROWS : N;
            const uint8_t *w = ws[wi];
            const uint16_t *scales = ss[wi];
            /* activation blocks outermost: a block of Q8_ROWS rounded rows (Q8_ROWS x Kp bytes) stays in L1 while
             * the work item's GEMV_ROWS weight rows pass it, so a prompt streams the rounded activations once per
             * work item, not once per weight row */
            for (int64_t m0 = 0; m0 < M; m0 += Q8_ROWS) {
                const int R = (int)(M - m0 < Q8_ROWS ? M - m0 : Q8_ROWS);
                for (int64_t n = n0; n < nend; n++) {
                    float out[Q8_ROWS];
                    dot_q8(R, xq + m0 * Kp, d + m0 * nd, c + m0 * ngroups, w + n * row_bytes,
                           scales + n * ngroups, G, Kp, out);
                    for (int r = 0; r < R; r++) act_st(y, y_bf16, (m0 + r) * ldy + col0[wi] + n, out[r]);
                }
            }
        }
    }
    free(xq), free(d), free(c);
    return 0;
}

int q35_linear_int4_q8(const void *x, int x_bf16, int64_t ldx, const uint8_t *w, const uint16_t *scales,
                       int64_t G, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    return q35_linear_int4_q8_multi(x, x_bf16, ldx, 1, &w, &scales, &N, G, y, y_bf16, N, M, K, threads);
}
