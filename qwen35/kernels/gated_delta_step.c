/* One decode step of the gated delta rule, applied in place to rows of a state pool.
 *
 * Why this exists: in PyTorch a decode step of a DeltaNet layer for n sequences gathers their states out of
 * the slot pool, decays them, reads them twice (prediction and output), writes the update and scatters them
 * back: about ten passes over n x Hv x dk x dv floats (16 MB per layer for 16 sequences of Qwen3.5-0.8B), which
 * cost more than the layer's weights.  Here each (sequence, head) state is read from its slot and written
 * back once; the second pass over it hits the L2 cache (one head's state is 64 KB at dk = dv = 128).
 *
 * Per head, with α = exp(g) (the same recurrence as qwen35/model/gated_delta_rule.py):
 *     pred  = (α S)ᵀ k
 *     delta = β (v − pred)
 *     S    ← α S + k deltaᵀ
 *     o     = Sᵀ q
 * q and k arrive L2-normalised (q also scaled by dk^-1/2); key head h / (Hv / Hk) serves value head h.
 * q, k, v are read in place from rows of stride ld (the conv output [q | k | v] of each sequence).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "simd.h"

/* One (sequence, head): two passes over its dk x dv state.  DV is a compile-time constant at the call site that
 * matters (128, every Qwen3.5 model), so delta and o stay in vector registers. */
static inline __attribute__((always_inline)) void head_step(const int64_t DV, float *restrict S, int64_t dk,
                                                            const float *restrict qh, const float *restrict kh,
                                                            const float *restrict vh, float a, float b,
                                                            float *restrict oh) {
    float delta[DV], acc[DV];
    for (int64_t c = 0; c < DV; c++) delta[c] = 0.0f;
    for (int64_t r = 0; r < dk; r++) {
        const float kr = kh[r];
        const float *restrict row = S + r * DV;
        for (int64_t c = 0; c < DV; c++) delta[c] += row[c] * kr;
    }
    for (int64_t c = 0; c < DV; c++) {
        delta[c] = b * (vh[c] - a * delta[c]);
        acc[c] = 0.0f;
    }
    for (int64_t r = 0; r < dk; r++) {
        const float kr = kh[r], qr = qh[r];
        float *restrict row = S + r * DV;
        for (int64_t c = 0; c < DV; c++) {
            const float s = a * row[c] + kr * delta[c];
            row[c] = s;
            acc[c] += s * qr;
        }
    }
    for (int64_t c = 0; c < DV; c++) oh[c] = acc[c];
}

static void gated_delta_step(float *restrict states, const int64_t *restrict slots, int64_t n, int64_t Hk,
                             int64_t Hv, int64_t dk, int64_t dv, const float *q, const float *k, const float *v,
                             int64_t ld, const float *restrict g, const float *restrict beta, float *restrict out,
                             int threads) {
    const int64_t group = Hv / Hk;
    const int64_t tasks = n * Hv;
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t i = t / Hv, h = t % Hv;
        float *S = states + (slots[i] * Hv + h) * dk * dv;
        const float *qh = q + i * ld + (h / group) * dk;
        const float *kh = k + i * ld + (h / group) * dk;
        const float *vh = v + i * ld + h * dv;
        const float a = expf(g[t]), b = beta[t];
        if (dv == 128)
            head_step(128, S, dk, qh, kh, vh, a, b, out + t * dv);
        else
            head_step(dv, S, dk, qh, kh, vh, a, b, out + t * dv);
    }
}

/* The whole stateful half of a DeltaNet decode step for n sequences, in place on the pools:
 *   conv:  act_c = SiLU(Σ_j [window_c | x_c]_j w_cj), window_c ← its last K−1 inputs     (per channel c)
 *   split act into q | k | v, L2-normalise q and k per head (q also × dk^-1/2)
 *   the gated delta step above on states[slots].
 * qkv [n, C] (rows of stride ldq), conv weight [C, Kc] and the window pool [P, C, Kc−1] are float32 or bf16
 * (the model's dtype, flag `bf16`); in bf16 the activations are rounded to bf16 as PyTorch's bf16 conv would leave
 * them.
 * The state pool is float32; out [n, Hv, dv] float32. */
int q35_deltanet_decode(const void *qkv, int64_t ldq, const void *conv_w, void *windows, int bf16, int64_t Kc,
                        float *states, const int64_t *slots, int64_t n, int64_t Hk, int64_t Hv, int64_t dk,
                        int64_t dv, const float *g, const float *beta, float *out, int threads) {
    const int64_t key_dim = Hk * dk, C = 2 * key_dim + Hv * dv, W = Kc - 1;
    if (n <= 0 || ldq < C || Kc < 1 || Kc > 16 || Hk <= 0 || Hv % Hk != 0 || dk <= 0 || dv <= 0 || dv > 4096) return -1;
    float *act = (float *)malloc((size_t)(n * C) * sizeof(float));
    if (!act) return -2;
    if (threads < 1) threads = 1;
    /* sequence-major, channel-minor: each thread walks contiguous windows and weights */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < n * C; t++) {
        const int64_t i = t / C, c = t % C;
        const int64_t base = (slots[i] * C + c) * W;
        const float x = act_ld(qkv, bf16, i * ldq + c);
        float y = 0.0f;
        for (int64_t j = 0; j < W; j++) {
            const float prod = act_ld(windows, bf16, base + j) * act_ld(conv_w, bf16, c * Kc + j);
            y += bf16 ? round_bf16(prod) : prod;
        }
        const float last = x * act_ld(conv_w, bf16, c * Kc + W);
        y += bf16 ? round_bf16(last) : last;
        act[i * C + c] = bf16 ? round_bf16(y) : y;
        for (int64_t j = 0; j + 1 < W; j++) act_st(windows, bf16, base + j, act_ld(windows, bf16, base + j + 1));
        if (W > 0) act_st(windows, bf16, base + W - 1, x);
    }
    /* SiLU over the pre-activations, VL channels at a time (a scalar expf per channel was half of this step's
     * time at 16 sequences); rounded to bf16 as PyTorch's bf16 SiLU leaves it */
    const int64_t total = n * C, vend = total - total % VL;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < vend; t += VL) {
        const vec y = vload_x(act + t);
        const vec a = vdiv(y, vadd(vset1(1.0f), vexp(vsub(vzero(), y))));
        vstore(act + t, bf16 ? vround_bf16(a) : a);
    }
    for (int64_t t = vend; t < total; t++) {
        const float a = act[t] / (1.0f + expf(-act[t]));
        act[t] = bf16 ? round_bf16(a) : a;
    }
    /* q and k in place: L2-normalise per head (eps 1e-6 inside the square root, as l2_normalize) */
    const float scale = 1.0f / sqrtf((float)dk);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < n * 2 * Hk; t++) {
        const int64_t i = t / (2 * Hk), r = t % (2 * Hk);
        float *h = act + i * C + r * dk;
        float ss = 0.0f;
        for (int64_t d = 0; d < dk; d++) ss += h[d] * h[d];
        const float inv = 1.0f / sqrtf(ss + 1e-6f) * (r < Hk ? scale : 1.0f);
        for (int64_t d = 0; d < dk; d++) h[d] *= inv;
    }
    /* each row of act is [q (Hk·dk) | k (Hk·dk) | v (Hv·dv)]: the step reads them there */
    gated_delta_step(states, slots, n, Hk, Hv, dk, dv, act, act + key_dim, act + 2 * key_dim, C, g, beta, out,
                     threads);
    free(act);
    return 0;
}
