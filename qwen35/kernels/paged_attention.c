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

/* acc[0..d) += p * v_row */
static inline void add_row(float *acc, float p, const void *v, int kv_bf16, int64_t off, int64_t d) {
    const vec pv = vset1(p);
    int64_t i = 0;
    for (; i + VL <= d; i += VL) vstore(acc + i, vfma(pv, load_row(v, kv_bf16, off + i), vload_x(acc + i)));
    for (; i < d; i++) acc[i] += p * load_one(v, kv_bf16, off + i);
}

/* acc[0..d) = acc * c + p * v_row */
static inline void axpy_row(float *acc, float c, float p, const void *v, int kv_bf16, int64_t off, int64_t d) {
    const vec cv = vset1(c), pv = vset1(p);
    int64_t i = 0;
    for (; i + VL <= d; i += VL) vstore(acc + i, vfma(pv, load_row(v, kv_bf16, off + i), vmul(cv, vload_x(acc + i))));
    for (; i < d; i++) acc[i] = acc[i] * c + p * load_one(v, kv_bf16, off + i);
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
        /* per thread: G queries and accumulators of d values, G x TILE scores, G running max / sum */
        float *buf = (float *)malloc(sizeof(float) * (size_t)(2 * G * d + G * TILE + 2 * G));
        if (!buf) {
            rc = -2;
        } else {
            float *qf = buf, *acc = buf + G * d, *sc = acc + G * d, *mx = sc + G * TILE, *sum = mx + G;
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
                    for (int64_t t = 0; t < nt; t++) {
                        const int64_t p = p0 + t;
                        row[t] = ((table[p / bs] * bs + p % bs) * Hkv + h) * d;
                        dots(qf, G, k, kv_bf16, row[t], d, sc + t, TILE);
                    }
                    for (int64_t g = 0; g < G; g++) {
                        float m = mx[g];
                        for (int64_t t = 0; t < nt; t++) m = sc[g * TILE + t] > m ? sc[g * TILE + t] : m;
                        const float c = expf(mx[g] - m); /* exp(-inf) = 0 on the first tile */
                        float l = sum[g] * c;
                        for (int64_t t = 0; t < nt; t++) {
                            const float e = expf(sc[g * TILE + t] - m);
                            sc[g * TILE + t] = e;
                            l += e;
                        }
                        mx[g] = m;
                        sum[g] = l;
                        /* the rescale rides on the first value row of the tile */
                        axpy_row(acc + g * d, c, sc[g * TILE], v, kv_bf16, row[0], d);
                    }
                    for (int64_t t = 1; t < nt; t++)
                        for (int64_t g = 0; g < G; g++)
                            add_row(acc + g * d, sc[g * TILE + t], v, kv_bf16, row[t], d);
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
