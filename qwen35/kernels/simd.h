/* One vector vocabulary for the kernels, per instruction set: the library is built once per variant
 * (qwen35/kernels/__init__.py: -march=native, x86-64-v4 = AVX-512, x86-64-v3 = AVX2, x86-64 = scalar) and the
 * same source compiles to each, so every path can be built and tested on any host that runs it.
 *
 * vec holds VL float32 lanes.  vload_w widens VL bf16 values (a shift per lane); vsum is the horizontal sum. */
#ifndef QWEN35_SIMD_H
#define QWEN35_SIMD_H
#include <stdint.h>

#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ISA "avx512"
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
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
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
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
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
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline vec vmul(vec a, vec b) { return a * b; }
static inline float vsum(vec v) { return v; }
#endif

#endif
