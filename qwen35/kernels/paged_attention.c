/* Decode attention over the paged KV cache, read in place.
 *
 * Why this exists: a decode token attends over its sequence's whole history, which lives in KV blocks spread
 * over the pool.  In PyTorch that means gathering the history into a contiguous (and, for a batch, zero-padded)
 * copy every step and layer, then SDPA over the copy: at 16K tokens of Qwen3.5-0.8B that is 64 MB copied per
 * step per sequence, and decode slows with depth several times faster than the reading itself requires.
 * Here each sequence's block table is walked and every key and value row read once, where it lies, for all
 * the query heads that share it (GQA), with an online softmax (running max and sum, rescaled per tile of keys)
 * so nothing of size L is materialised; a long sequence's keys are split between threads (flash-decoding).
 *
 * q [n, H, d] (rows of stride ldq), pools k, v [R, Hkv, d] (flat rows: position p of sequence s is row
 * tables[s * max_blocks + p / bs] * bs + p % bs), lengths [n] keys per sequence (>= 1), out [n, H, d]
 * contiguous.  q / out are float32 or bf16 (q_bf16), the pools float32 or bf16 (kv_bf16).  Arithmetic in
 * float32; the output is rounded once.  Returns 0, or -1 on arguments the kernel does not take, -2 out of
 * memory.
 *
 * The quantized KV cache (q35_paged_decode_attention_quant; qwen35/engine/kv_quant.py): int8 or float8_e4m3fn
 * pools with one float32 scale per token per KV head (ks, vs [R, Hkv]), read in place like the float pools.
 * The scales never touch the inner loops: a key row's scale multiplies its finished dot product, a value row's
 * scale its softmax weight (after the running sum has taken the unscaled weight).  e4m3 is widened through
 * IEEE half: its sign, exponent and mantissa bits moved into half's places give a half whose value is the e4m3
 * value times 2^-8, subnormals included, and F16C widens half to float32 in one instruction; the 2^8 is folded
 * into the row scale. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "simd.h"

#define TILE 32 /* keys scored before their values are accumulated */
#define MAX_SPLITS 64
#define GMAX 8  /* query heads handled together per KV head (larger GQA groups are split into chunks of 8) */

/* storage kinds of the pools (the KB argument below) */
enum { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2, KV_E4M3 = 3 };
#define E4M3_UNIT 256.0f /* kv_e4m3_one / kv_load_e4m3 give the e4m3 value times 2^-8 */

/* one e4m3 byte as float32, times 2^-8: (8 + m) 2^(e - 18) for exponent field e > 0, m 2^-17 for e = 0 */
static inline float kv_e4m3_one(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float f = e ? ldexpf((float)(8 + m), e - 18) : ldexpf((float)m, -17);
    return (b & 0x80) ? -f : f;
}

#if VL == 16
static inline vec kv_load_e4m3(const uint8_t *p) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                      _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
    return _mm512_cvtph_ps(h);
}
#elif VL == 8
static inline vec kv_load_e4m3(const uint8_t *p) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
    return _mm256_cvtph_ps(h);
}
#else
static inline vec kv_load_e4m3(const uint8_t *p) { return kv_e4m3_one(*p); }
#endif

/* VL values of a row stored as KB, as float32 (int8: the integers; e4m3: times 2^-8; unscaled) */
static inline __attribute__((always_inline)) vec load_row(const int KB, const void *p, int64_t i) {
    switch (KB) {
    case KV_BF16: return vload_w((const uint16_t *)p + i);
    case KV_INT8: return vload_q8((const int8_t *)p + i);
    case KV_E4M3: return kv_load_e4m3((const uint8_t *)p + i);
    default: return vload_x((const float *)p + i);
    }
}

static inline __attribute__((always_inline)) float load_one(const int KB, const void *p, int64_t i) {
    switch (KB) {
    case KV_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case KV_INT8: return (float)((const int8_t *)p)[i];
    case KV_E4M3: return kv_e4m3_one(((const uint8_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* One tile of nt keys for one chunk of GC query heads of a KV head, folded into that chunk's running softmax
 * state (mx, sum: per head; acc [GC, d]).  GC and KB are compile-time constants at every call site (see the
 * dispatch below), so the per-head accumulators of both passes live in registers:
 *   scores: each key row is widened once per vector and multiplied into GC running dot products;
 *   values: d is walked one vector at a time with GC accumulators held across the tile's keys, each value row
 *           widened once per vector (the tile's rows stay in L1 between the vectors).
 * row[t] is the element offset of key t's row for this KV head; qf [GC, d] is pre-scaled; sc [GC, TILE].
 * Quantized pools (KB >= KV_INT8): ksc[t] / vsc[t] are the scales of key t's K and V rows for this KV head. */
static inline __attribute__((always_inline)) void attend_tile(const int GC, const int KB, const float *qf,
                                                              const void *k, const void *v, const int64_t *row,
                                                              const float *ksc, const float *vsc,
                                                              int64_t nt, int64_t d, float *mx, float *sum,
                                                              float *acc, float *sc) {
    float corr[GMAX];
    /* scores: two accumulator chains per head when the group is small, to keep both FMA pipes busy */
    for (int64_t t = 0; t < nt; t++) {
        const int64_t off = row[t];
        vec a[GMAX], b2[GMAX];
        for (int g = 0; g < GC; g++) a[g] = b2[g] = vzero();
        int64_t i = 0;
        if (GC <= 4)
            for (; i + 2 * VL <= d; i += 2 * VL) {
                const vec k0 = load_row(KB, k, off + i), k1 = load_row(KB, k, off + i + VL);
                for (int g = 0; g < GC; g++) {
                    a[g] = vfma(vload_x(qf + g * d + i), k0, a[g]);
                    b2[g] = vfma(vload_x(qf + g * d + i + VL), k1, b2[g]);
                }
            }
        for (; i + VL <= d; i += VL) {
            const vec kv = load_row(KB, k, off + i);
            for (int g = 0; g < GC; g++) a[g] = vfma(vload_x(qf + g * d + i), kv, a[g]);
        }
        const float kmul = KB >= KV_INT8 ? ksc[t] : 1.0f;
        for (int g = 0; g < GC; g++) {
            float sg = vsum(vadd(a[g], b2[g]));
            for (int64_t r = i; r < d; r++) sg += qf[g * d + r] * load_one(KB, k, off + r);
            sc[g * TILE + t] = KB >= KV_INT8 ? sg * kmul : sg;
        }
    }
    /* online softmax: new running max, rescale of what was accumulated, exponentials of this tile */
    for (int g = 0; g < GC; g++) {
        float *sg = sc + g * TILE;
        float m = mx[g];
        for (int64_t t = 0; t < nt; t++) m = sg[t] > m ? sg[t] : m;
        const float c = expf(mx[g] - m); /* exp(-inf) = 0 on the first tile */
        float l = sum[g] * c;
        int64_t t = 0;
        if (nt == TILE) {
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
        if (KB >= KV_INT8) /* the sum took the weights; the values take weight x row scale */
            for (t = 0; t < nt; t++) sg[t] *= vsc[t];
    }
    /* values (two vectors of d at a time when the group is small: two accumulator chains per head) */
    int64_t i = 0;
    if (GC <= 4)
        for (; i + 2 * VL <= d; i += 2 * VL) {
            vec a[GMAX], b2[GMAX];
            for (int g = 0; g < GC; g++) {
                a[g] = vmul(vload_x(acc + g * d + i), vset1(corr[g]));
                b2[g] = vmul(vload_x(acc + g * d + i + VL), vset1(corr[g]));
            }
            for (int64_t t = 0; t < nt; t++) {
                const vec v0 = load_row(KB, v, row[t] + i), v1 = load_row(KB, v, row[t] + i + VL);
                for (int g = 0; g < GC; g++) {
                    const vec pw = vset1(sc[g * TILE + t]);
                    a[g] = vfma(pw, v0, a[g]);
                    b2[g] = vfma(pw, v1, b2[g]);
                }
            }
            for (int g = 0; g < GC; g++) {
                vstore(acc + g * d + i, a[g]);
                vstore(acc + g * d + i + VL, b2[g]);
            }
        }
    for (; i + VL <= d; i += VL) {
        vec a[GMAX];
        for (int g = 0; g < GC; g++) a[g] = vmul(vload_x(acc + g * d + i), vset1(corr[g]));
        for (int64_t t = 0; t < nt; t++) {
            const vec vv = load_row(KB, v, row[t] + i);
            for (int g = 0; g < GC; g++) a[g] = vfma(vset1(sc[g * TILE + t]), vv, a[g]);
        }
        for (int g = 0; g < GC; g++) vstore(acc + g * d + i, a[g]);
    }
    for (; i < d; i++)
        for (int g = 0; g < GC; g++) {
            float a = acc[g * d + i] * corr[g];
            for (int64_t t = 0; t < nt; t++) a += sc[g * TILE + t] * load_one(KB, v, row[t] + i);
            acc[g * d + i] = a;
        }
}

#define TILE_CASE(gc)                                                                                         \
    case gc:                                                                                                  \
        switch (kind) {                                                                                       \
        case KV_BF16: attend_tile(gc, KV_BF16, qf, k, v, hrow, hks, hvs, nt, d, mx, sum, acc, sc); break;     \
        case KV_INT8: attend_tile(gc, KV_INT8, qf, k, v, hrow, hks, hvs, nt, d, mx, sum, acc, sc); break;     \
        case KV_E4M3: attend_tile(gc, KV_E4M3, qf, k, v, hrow, hks, hvs, nt, d, mx, sum, acc, sc); break;     \
        default: attend_tile(gc, KV_F32, qf, k, v, hrow, hks, hvs, nt, d, mx, sum, acc, sc);                  \
        }                                                                                                     \
        break;

/* Work items are (sequence, key range): each walks its keys tile by tile and, per tile, every KV head and chunk
 * of query heads, so the rows it reads (all heads of a token are adjacent in the pool) form one stream.  When
 * there are fewer sequences than threads, a sequence's keys are split between several items (flash-decoding),
 * whose partial softmax states (max, sum, unnormalised output) are merged at the end. */
static int paged_decode(const void *q, int q_bf16, int64_t ldq, const void *k, const void *v, int kind,
                        const float *kscale, const float *vscale, const int64_t *tables, int64_t max_blocks,
                        const int64_t *lengths, int64_t n, int64_t H, int64_t Hkv, int64_t d, int64_t bs,
                        float scale, void *out, int threads) {
    if (n <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || d <= 0 || bs <= 0 || max_blocks <= 0 || ldq < H * d) return -1;
    if (kind < KV_F32 || kind > KV_E4M3 || (kind >= KV_INT8 && (!kscale || !vscale))) return -1;
    const float unit = kind == KV_E4M3 ? E4M3_UNIT : 1.0f;
    int64_t longest = 0;
    for (int64_t s = 0; s < n; s++) {
        if (lengths[s] < 1 || lengths[s] > max_blocks * bs) return -1;
        if (lengths[s] > longest) longest = lengths[s];
    }
    if (threads < 1) threads = 1;
    const int64_t G = H / Hkv, chunks = (G + GMAX - 1) / GMAX;
    /* splits per sequence: enough items for every thread, each at least 8 tiles long */
    int64_t splits = (threads + n - 1) / n;
    const int64_t max_splits = (longest + 8 * TILE - 1) / (8 * TILE);
    if (splits > max_splits) splits = max_splits;
    if (splits > MAX_SPLITS) splits = MAX_SPLITS;
    if (splits < 1) splits = 1;
    const int64_t items = n * splits;
    if (threads > items) threads = (int)items;
    /* partial state per item: the running max [H] and sum [H] and the unnormalised outputs [H, d] */
    const int64_t pstride = H * (2 + d);
    float *part = (float *)malloc(sizeof(float) * (size_t)(items * pstride));
    if (!part) return -2;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(H * d + GMAX * TILE));
        if (!buf) {
            rc = -2;
        } else {
            float *qf_all = buf, *sc = buf + H * d;
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items; it++) {
                const int64_t s = it / splits, sp = it % splits, L = lengths[s];
                const int64_t per = ((L + splits - 1) / splits + TILE - 1) / TILE * TILE;
                const int64_t a = sp * per, b = a + per < L ? a + per : L;
                const int64_t *table = tables + s * max_blocks;
                float *pmx = part + it * pstride, *psum = pmx + H, *pacc = psum + H;
                for (int64_t hh = 0; hh < H; hh++) {
                    pmx[hh] = -INFINITY;
                    psum[hh] = 0.0f;
                    for (int64_t i = 0; i < d; i++) {
                        qf_all[hh * d + i] = load_one(q_bf16, q, s * ldq + hh * d + i) * scale;
                        pacc[hh * d + i] = 0.0f;
                    }
                }
                const int64_t esz = kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1;
                int64_t tok[TILE], hrow[TILE];
                float hks[TILE], hvs[TILE];
                for (int64_t p0 = a; p0 < b; p0 += TILE) {
                    const int64_t nt = b - p0 < TILE ? b - p0 : TILE;
                    for (int64_t t = 0; t < nt; t++) tok[t] = table[(p0 + t) / bs] * bs + (p0 + t) % bs;
                    /* the next tile's rows are fetched while this one computes: blocks may lie anywhere in the
                     * pool, and the hardware prefetcher loses the stream at every block boundary */
                    for (int64_t p = p0 + TILE; p < p0 + 2 * TILE && p < b; p++) {
                        const int64_t off = (table[p / bs] * bs + p % bs) * Hkv * d * esz;
                        for (int64_t by = 0; by < Hkv * d * esz; by += 64) {
                            __builtin_prefetch((const char *)k + off + by, 0, 1);
                            __builtin_prefetch((const char *)v + off + by, 0, 1);
                        }
                    }
                    for (int64_t h = 0; h < Hkv; h++) {
                        for (int64_t t = 0; t < nt; t++) hrow[t] = (tok[t] * Hkv + h) * d;
                        if (kind >= KV_INT8)
                            for (int64_t t = 0; t < nt; t++) {
                                hks[t] = kscale[tok[t] * Hkv + h] * unit;
                                hvs[t] = vscale[tok[t] * Hkv + h] * unit;
                            }
                        for (int64_t c = 0; c < chunks; c++) {
                            const int64_t g0 = h * G + c * GMAX, gc = G - c * GMAX < GMAX ? G - c * GMAX : GMAX;
                            const float *qf = qf_all + g0 * d;
                            float *mx = pmx + g0, *sum = psum + g0, *acc = pacc + g0 * d;
                            switch (gc) { TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5)
                                          TILE_CASE(6) TILE_CASE(7) TILE_CASE(8) }
                        }
                    }
                }
            }
            free(buf);
        }
    }
    if (rc == 0) { /* merge the splits of every (sequence, head) and normalise */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t sh = 0; sh < n * H; sh++) {
            const int64_t s = sh / H, hh = sh % H;
            float m = -INFINITY;
            for (int64_t sp = 0; sp < splits; sp++) {
                const float mi = part[(s * splits + sp) * pstride + hh];
                m = mi > m ? mi : m;
            }
            float l = 0.0f, w[MAX_SPLITS];
            for (int64_t sp = 0; sp < splits; sp++) {
                const float *pi = part + (s * splits + sp) * pstride;
                const float li = pi[H + hh];
                w[sp] = li > 0.0f ? expf(pi[hh] - m) : 0.0f; /* an empty split adds nothing */
                l += li * w[sp];
            }
            const float inv = 1.0f / l;
            for (int64_t i = 0; i < d; i++) {
                float y = 0.0f;
                for (int64_t sp = 0; sp < splits; sp++)
                    y += part[(s * splits + sp) * pstride + 2 * H + hh * d + i] * w[sp];
                y *= inv;
                if (q_bf16)
                    ((uint16_t *)out)[(s * H + hh) * d + i] = f32_to_bf16(y);
                else
                    ((float *)out)[(s * H + hh) * d + i] = y;
            }
        }
    }
    free(part);
    return rc;
}

int q35_paged_decode_attention(const void *q, int q_bf16, int64_t ldq, const void *k, const void *v, int kv_bf16,
                               const int64_t *tables, int64_t max_blocks, const int64_t *lengths, int64_t n,
                               int64_t H, int64_t Hkv, int64_t d, int64_t bs, float scale, void *out,
                               int threads) {
    return paged_decode(q, q_bf16, ldq, k, v, kv_bf16 ? KV_BF16 : KV_F32, NULL, NULL, tables, max_blocks, lengths,
                        n, H, Hkv, d, bs, scale, out, threads);
}

/* kv_kind 2: int8 pools, 3: float8_e4m3fn pools; ks / vs [R, Hkv] float32 scales (row value = stored x scale) */
int q35_paged_decode_attention_quant(const void *q, int q_bf16, int64_t ldq, const void *k, const void *v,
                                     int kv_kind, const float *ks, const float *vs, const int64_t *tables,
                                     int64_t max_blocks, const int64_t *lengths, int64_t n, int64_t H, int64_t Hkv,
                                     int64_t d, int64_t bs, float scale, void *out, int threads) {
    if (kv_kind != KV_INT8 && kv_kind != KV_E4M3) return -1;
    return paged_decode(q, q_bf16, ldq, k, v, kv_kind, ks, vs, tables, max_blocks, lengths, n, H, Hkv, d, bs,
                        scale, out, threads);
}

/* ---- quantize-on-write for the quantized KV cache ------------------------------------------------------------
 *
 * Why: storing one decode token's keys or values took six small PyTorch operations per attention layer
 * (|x|, max, divide, round, clamp, cast) and two indexed copies, which cost about what the int8 pools save on
 * the reads at short context (benchmarks/RESULTS.md, session 7).  Here each (token, KV head) row is quantized
 * straight into its pool row.  The arithmetic is qwen35.kernels.ops.quantize_kv's, so the bytes are the same:
 * scale = max|row| / qmax (float32 division), q = x / scale (float32 division; scale 0 divides by 1), int8
 * rounded half to even and clamped to ±127; e4m3 clamped to ±448 and rounded to nearest even (subnormals
 * included, −0 kept, NaN to NaN) by bit arithmetic on the float32 value.
 *
 * x [n, Hkv, d] contiguous, float32 or bf16 (x_bf16); rows [n] pool rows; pool [R, Hkv, d] bytes; scales [R, Hkv]
 * float32; kind KV_INT8 or KV_E4M3.  Returns 0, -1 on a bad kind. */
static inline uint8_t f32_to_e4m3(float v) {
    union { float f; uint32_t u; } b = {v};
    const uint8_t sign = (uint8_t)((b.u >> 24) & 0x80);
    const uint32_t a = b.u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint8_t)(sign | 0x7F); /* NaN */
    union { uint32_t u; float f; } m = {a};
    if (m.f < 0.015625f) /* below 2^-6: a subnormal of e4m3 (step 2^-9); 8 steps is 2^-6, the next code */
        return (uint8_t)(sign | (uint8_t)nearbyintf(m.f * 512.0f));
    /* normal: keep 3 mantissa bits, rounding to nearest even; a carry moves into the exponent as it should */
    const uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20; /* float32 exponent and 3 mantissa bits */
    return (uint8_t)(sign | (uint8_t)(r - (120u << 3)));    /* rebias 127 -> 7 */
}

int q35_kv_write_quant(const void *x, int x_bf16, int64_t n, int64_t H, int64_t D, const int64_t *rows, uint8_t *pool,
                       float *scales, int kind) {
    if (kind != KV_INT8 && kind != KV_E4M3) return -1;
    const float qmax = kind == KV_INT8 ? 127.0f : 448.0f;
    for (int64_t t = 0; t < n; t++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t src = (t * H + h) * D, dst = rows[t] * H + h;
            float amax = 0.0f;
            for (int64_t i = 0; i < D; i++) {
                const float a = fabsf(act_ld(x, x_bf16, src + i));
                amax = a > amax ? a : amax;
            }
            const float scale = amax / qmax, div = scale > 0.0f ? scale : 1.0f;
            scales[dst] = scale;
            uint8_t *out = pool + dst * D;
            for (int64_t i = 0; i < D; i++) {
                float q = act_ld(x, x_bf16, src + i) / div;
                q = q > qmax ? qmax : q < -qmax ? -qmax : q;
                out[i] = kind == KV_INT8 ? (uint8_t)(int8_t)nearbyintf(q) : f32_to_e4m3(q);
            }
        }
    return 0;
}
