/* Decode attention over the paged KV cache, read in place.
 *
 * Why this exists: a decode token attends over its sequence's whole history, which lives in KV blocks spread
 * over the pool.  In PyTorch that means gathering the history into a contiguous (and, for a batch, zero-padded)
 * copy every step and layer, then SDPA over the copy: at 16K tokens of Qwen3.5-0.8B that is 64 MB copied per
 * step per sequence, and decode slows with depth several times faster than the reading itself requires.
 * Here each (sequence, KV head) walks its block table and reads every key and value row once, where it lies,
 * for all the query heads that share it (GQA), with an online softmax (running max and sum, rescaled per
 * tile of keys) so nothing of size L is materialised.
 *
 * q [n, H, d] (rows of stride ldq), pools k, v [R, Hkv, d] (flat rows: position p of sequence s is row
 * tables[s * max_blocks + p / bs] * bs + p % bs), lengths [n] keys per sequence (>= 1), out [n, H, d]
 * contiguous.  q / out are float32 or bf16 (q_bf16), the pools float32 or bf16 (kv_bf16).  Arithmetic in
 * float32; the output is rounded once.  Returns 0, or -1 on arguments the kernel does not take, -2 out of
 * memory. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "simd.h"

#define TILE 32 /* keys scored before their values are accumulated */

/* a row of d values from a float32 or bf16 buffer, as float32 vectors */
static inline vec load_row(const void *p, int bf16, int64_t i) {
    return bf16 ? vload_w((const uint16_t *)p + i) : vload_x((const float *)p + i);
}

static inline float load_one(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* the scores of one key row against the G queries that share it, in one pass over the row (it is widened
 * once per vector, not once per query head) — GQA groups of up to 8 in registers, larger ones 8 at a time */
#define GMAX 8
static inline void dots_upto8(const float *q, int64_t G, const void *k, int kv_bf16, int64_t off, int64_t d,
                              float *out, int64_t out_stride) {
    vec acc[GMAX];
#pragma GCC unroll 8
    for (int g = 0; g < GMAX; g++) acc[g] = vzero();
    int64_t i = 0;
    for (; i + VL <= d; i += VL) {
        const vec kv = load_row(k, kv_bf16, off + i);
#pragma GCC unroll 8
        for (int g = 0; g < GMAX; g++)
            if (g < G) acc[g] = vfma(vload_x(q + g * d + i), kv, acc[g]);
    }
    for (int64_t g = 0; g < G; g++) {
        float s = vsum(acc[g]);
        for (int64_t t = i; t < d; t++) s += q[g * d + t] * load_one(k, kv_bf16, off + t);
        out[g * out_stride] = s;
    }
}

static inline void dots(const float *q, int64_t G, const void *k, int kv_bf16, int64_t off, int64_t d, float *out,
                        int64_t out_stride) {
    for (int64_t g0 = 0; g0 < G; g0 += GMAX)
        dots_upto8(q + g0 * d, G - g0 < GMAX ? G - g0 : GMAX, k, kv_bf16, off, d, out + g0 * out_stride, out_stride);
}

/* acc[g][0..d) = acc[g] · c[g] + Σ_t p[g][t] · v_t over the nt keys of a tile, for the G query heads of a KV head.
 * d is walked one vector at a time with the G accumulators in registers across all keys of the tile: each value
 * row is widened once per vector for every head, and the accumulators are loaded and stored once per tile, not
 * once per key (the tile's value rows, 32 x d, stay in L1 between the passes). */
static inline void accumulate_tile(float *acc, int64_t G, const float *c, const float *p, const int64_t *row,
                                   int64_t nt, const void *v, int kv_bf16, int64_t d) {
    for (int64_t g0 = 0; g0 < G; g0 += GMAX) {
        const int64_t gn = G - g0 < GMAX ? G - g0 : GMAX;
        float *a0 = acc + g0 * d;
        const float *p0 = p + g0 * TILE;
        int64_t i = 0;
        for (; i + VL <= d; i += VL) {
            vec a[GMAX] = {0};
#pragma GCC unroll 8
            for (int g = 0; g < GMAX; g++)
                if (g < gn) a[g] = vmul(vload_x(a0 + g * d + i), vset1(c[g0 + g]));
            for (int64_t t = 0; t < nt; t++) {
                const vec vv = load_row(v, kv_bf16, row[t] + i);
#pragma GCC unroll 8
                for (int g = 0; g < GMAX; g++)
                    if (g < gn) a[g] = vfma(vset1(p0[g * TILE + t]), vv, a[g]);
            }
#pragma GCC unroll 8
            for (int g = 0; g < GMAX; g++)
                if (g < gn) vstore(a0 + g * d + i, a[g]);
        }
        for (; i < d; i++)
            for (int64_t g = 0; g < gn; g++) {
                float s = a0[g * d + i] * c[g0 + g];
                for (int64_t t = 0; t < nt; t++) s += p0[g * TILE + t] * load_one(v, kv_bf16, row[t] + i);
                a0[g * d + i] = s;
            }
    }
}

int q35_paged_decode_attention(const void *q, int q_bf16, int64_t ldq, const void *k, const void *v, int kv_bf16,
                               const int64_t *tables, int64_t max_blocks, const int64_t *lengths, int64_t n,
                               int64_t H, int64_t Hkv, int64_t d, int64_t bs, float scale, void *out,
                               int threads) {
    if (n <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || d <= 0 || bs <= 0 || max_blocks <= 0 || ldq < H * d) return -1;
    for (int64_t s = 0; s < n; s++)
        if (lengths[s] < 1 || lengths[s] > max_blocks * bs) return -1;
    const int64_t G = H / Hkv, items = n * Hkv;
    if (threads < 1) threads = 1;
    if (threads > items) threads = (int)items;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        /* per thread: G queries and accumulators of d values, G x TILE scores, G running max / sum / rescale */
        float *buf = (float *)malloc(sizeof(float) * (size_t)(2 * G * d + G * TILE + 3 * G));
        if (!buf) {
            rc = -2;
        } else {
            float *qf = buf, *acc = buf + G * d, *sc = acc + G * d, *mx = sc + G * TILE, *sum = mx + G,
                  *corr = sum + G;
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items; it++) {
                const int64_t s = it / Hkv, h = it % Hkv, L = lengths[s];
                const int64_t *table = tables + s * max_blocks;
                for (int64_t g = 0; g < G; g++) {
                    const int64_t qoff = s * ldq + (h * G + g) * d;
                    for (int64_t i = 0; i < d; i++) qf[g * d + i] = load_one(q, q_bf16, qoff + i) * scale;
                    for (int64_t i = 0; i < d; i++) acc[g * d + i] = 0.0f;
                    mx[g] = -INFINITY;
                    sum[g] = 0.0f;
                }
                for (int64_t p0 = 0; p0 < L; p0 += TILE) {
                    const int64_t nt = L - p0 < TILE ? L - p0 : TILE;
                    int64_t row[TILE];
                    /* the next tile's rows are fetched while this one computes: blocks lie anywhere in the pool,
                     * so the hardware prefetcher loses the stream at every block boundary */
                    const int64_t esz = kv_bf16 ? 2 : 4;
                    for (int64_t p = p0 + TILE; p < p0 + 2 * TILE && p < L; p++) {
                        const char *kr = (const char *)k + ((table[p / bs] * bs + p % bs) * Hkv + h) * d * esz;
                        const char *vr = (const char *)v + ((table[p / bs] * bs + p % bs) * Hkv + h) * d * esz;
                        for (int64_t b = 0; b < d * esz; b += 64) {
                            __builtin_prefetch(kr + b, 0, 1);
                            __builtin_prefetch(vr + b, 0, 1);
                        }
                    }
                    for (int64_t t = 0; t < nt; t++) {
                        const int64_t p = p0 + t;
                        row[t] = ((table[p / bs] * bs + p % bs) * Hkv + h) * d;
                        dots(qf, G, k, kv_bf16, row[t], d, sc + t, TILE);
                    }
                    for (int64_t g = 0; g < G; g++) {
                        float *sg = sc + g * TILE;
                        float m = mx[g];
                        for (int64_t t = 0; t < nt; t++) m = sg[t] > m ? sg[t] : m;
                        const float c = expf(mx[g] - m); /* exp(-inf) = 0 on the first tile */
                        float l = sum[g] * c;
                        int64_t t = 0;
                        if (nt == TILE) { /* whole tiles: the exponentials VL at a time */
                            vec lv = vzero();
                            for (; t < TILE; t += VL) {
                                const vec e = vexp(vsub(vload_x(sg + t), vset1(m)));
                                vstore(sg + t, e);
                                lv = vadd(lv, e);
                            }
                            l += vsum(lv);
                        }
                        for (; t < nt; t++) {
                            const float e = expf(sg[t] - m);
                            sg[t] = e;
                            l += e;
                        }
                        mx[g] = m;
                        sum[g] = l;
                        corr[g] = c;
                    }
                    accumulate_tile(acc, G, corr, sc, row, nt, v, kv_bf16, d);
                }
                for (int64_t g = 0; g < G; g++) {
                    const float inv = 1.0f / sum[g];
                    const int64_t o = (s * H + h * G + g) * d;
                    for (int64_t i = 0; i < d; i++) {
                        const float y = acc[g * d + i] * inv;
                        if (q_bf16)
                            ((uint16_t *)out)[o + i] = f32_to_bf16(y);
                        else
                            ((float *)out)[o + i] = y;
                    }
                }
            }
            free(buf);
        }
    }
    return rc;
}
