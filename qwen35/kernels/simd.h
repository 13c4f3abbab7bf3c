/* One vector vocabulary for the kernels, per instruction set: the library is built once per variant
 * (qwen35/kernels/__init__.py: -march=native, x86-64-v4 = AVX-512, x86-64-v3 = AVX2, x86-64 = scalar) and the
 * same source compiles to each, so every path can be built and tested on any host that runs it.
 *
 * vec holds VL float32 lanes.  vload_w widens VL bf16 values (a shift per lane), vload_q8 VL int8 values;
 * vsum is the horizontal sum. */
#ifndef QWEN35_SIMD_H
#define QWEN35_SIMD_H
#include <stdint.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#if defined(__AVX512BF16__)
/* vdpbf16ps: 32 bf16 products summed pairwise into 16 float32 lanes in one instruction (gemm_bf16.c uses it for
 * bf16 activation rows) */
#define ISA "avx512bf16"
#define HAVE_DPBF16 1
#else
#define ISA "avx512"
#endif
#define VL 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float f) { return _mm512_set1_ps(f); }
static inline vec vload_x(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vload_w(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec vload_q8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline float vmaxall(vec v) { return _mm512_reduce_max_ps(v); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n for whole-number n in [-126, 127] */
static inline vec vpow2i(vec n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
/* round float32 lanes to the nearest bf16 value (ties to even), kept as float32; NaN stays NaN */
static inline vec vround_bf16(vec a) {
    __m512i u = _mm512_castps_si512(a);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), a);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ISA "avx2"
#define VL 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float f) { return _mm256_set1_ps(f); }
static inline vec vload_x(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vload_w(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec vload_q8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline float vmaxall(vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2i(vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline vec vround_bf16(vec a) {
    __m256i u = _mm256_castps_si256(a);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
#else
#define ISA "scalar"
#define VL 1
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vset1(float f) { return f; }
static inline vec vload_x(const float *p) { return *p; }
static inline void vstore(float *p, vec v) { *p = v; }
static inline vec vload_w(const uint16_t *p) { return bf16_to_f32(*p); }
static inline vec vload_q8(const int8_t *p) { return (float)*p; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline vec vmul(vec a, vec b) { return a * b; }
static inline float vsum(vec v) { return v; }
static inline vec vadd(vec a, vec b) { return a + b; }
static inline vec vsub(vec a, vec b) { return a - b; }
static inline vec vdiv(vec a, vec b) { return a / b; }
static inline vec vmax(vec a, vec b) { return a > b ? a : b; }
static inline vec vmin(vec a, vec b) { return a < b ? a : b; }
static inline float vmaxall(vec v) { return v; }
#endif

#if VL > 1
/* e^x in float32 lanes, within 2 ulp of expf over [-87.3, 88] (inputs outside are clamped there: e^-87.3 is
 * float32's smallest normal, e^88 is 1.6e38); NaN propagates (the clamps take x as their second operand).
 * x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so n ln2 is exact), e^r by a degree-6 polynomial (Taylor
 * coefficients: truncation error 2e-8 at |r| = 0.347, under 1 ulp), then 2^n through the exponent field.
 * Why: a scalar expf per value is what made one-pass SiLU code lose to PyTorch's vectorised kernels. */
static inline vec vexp(vec x) {
    const vec xc = vmin(vset1(88.0f), vmax(vset1(-87.33654f), x));
    const vec n = vround(vmul(xc, vset1(1.44269504088896341f)));
    vec r = vfma(n, vset1(-0.693359375f), xc);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vec p = vset1(1.0f / 720.0f);
    p = vfma(p, r, vset1(1.0f / 120.0f));
    p = vfma(p, r, vset1(1.0f / 24.0f));
    p = vfma(p, r, vset1(1.0f / 6.0f));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
    return vmul(p, vpow2i(n));
}
#else
#include <math.h>
static inline vec vexp(vec x) { return expf(x); }
static inline vec vround_bf16(vec a) { return round_bf16(a); }
#endif

/* One block of 32 activations k0 .. k0+31 of a row (values past K are 0) rounded to int8 as
 * qwen35.kernels.ops.quantize_activations_q8_reference defines it: q = round_half_even(x · (127 / amax)) in
 * −127..127 (the product rounded to float32 first), returning the block scale d = amax / 127 (0, and q 0, for an
 * all-zero block).  Shared by the int8-activation products of int4.c and gemm_bf16.c. */
static inline float round_block_q8(const void *x, int x_bf16, int64_t k0, int64_t K, int8_t *q) {
    const float round_magic = 12582912.0f; /* 1.5 · 2^23: (v + m) − m rounds |v| < 2^22 half to even */
    const int64_t k1 = k0 + 32 < K ? k0 + 32 : K;
    float amax = 0.0f;
    for (int64_t k = k0; k < k1; k++) {
        const float a = act_ld(x, x_bf16, k), m = a < 0 ? -a : a;
        if (m > amax) amax = m;
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t k = k0; k < k0 + 32; k++) {
        int v = 0;
        if (k < k1) {
            volatile float t = act_ld(x, x_bf16, k) * inv; /* no FMA contraction into the add below */
            v = (int)((t + round_magic) - round_magic);
            v = v > 127 ? 127 : v < -127 ? -127 : v;
        }
        q[k - k0] = (int8_t)v;
    }
    return amax / 127.0f;
}

/* Work items of several weights in one call (the *_multi products): weight i has Ns[i] output rows, cut into
 * items of `per` rows; col0[i] is its first output column, first[i] its first item (first[nw] = all items).
 * Returns the total columns, or -1 when a weight has no rows.  multi_item finds the weight of item b. */
static inline int64_t multi_plan(int nw, const int64_t *Ns, int64_t per, int64_t *col0, int64_t *first) {
    int64_t cols = 0;
    first[0] = 0;
    for (int i = 0; i < nw; i++) {
        if (Ns[i] <= 0) return -1;
        col0[i] = cols;
        cols += Ns[i];
        first[i + 1] = first[i] + (Ns[i] + per - 1) / per;
    }
    return cols;
}

static inline int multi_item(const int64_t *first, int64_t b) {
    int wi = 0;
    while (b >= first[wi + 1]) wi++;
    return wi;
}

#endif
