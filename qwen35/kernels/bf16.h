/* bfloat16 <-> float32 for the kernels: widening is a shift; narrowing rounds to nearest even, as PyTorch does,
 * and keeps NaN a (quiet) NaN. */
#ifndef QWEN35_BF16_H
#define QWEN35_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* the float32 value a float32 -> bf16 -> float32 round trip gives */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* element i of an activation buffer that holds bf16 (flag set) or float32 values, read and written as float32;
 * act_round rounds a float32 result as storing it in that buffer would */
static inline float act_ld(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void act_st(void *p, int bf16, int64_t i, float f) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(f);
    else
        ((float *)p)[i] = f;
}

static inline float act_round(int bf16, float f) { return bf16 ? round_bf16(f) : f; }

#endif
