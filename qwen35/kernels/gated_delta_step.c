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

/* ---- the causal depthwise conv + SiLU of a prompt chunk (qwen35.kernels.ops.causal_conv1d_silu) --------------
 *
 * Why: in PyTorch the prompt-side conv of a DeltaNet layer is a concatenation with the window, a transposed
 * float32 copy, K shifted multiply-adds over [C, T] and a SiLU — six passes over a 6,144 x 512 chunk of the 0.8B
 * shape, ~9 ms per layer on a 2-core EPYC, where one pass over the inputs is enough.  Here each token's channels
 * are one contiguous row of x (the projection's output, [B, T, C]), so VL channels are summed at a time against
 * the weight transposed once to [K, C], and the activations are written in the same [B, T, C] layout the model
 * splits into q | k | v, with no transposes either way.
 *
 * Arithmetic as the reference: per channel y = Σ_k in[t−K+1+k] · w_k in float32, summed in k order (the first
 * product, then one add per tap: no fused multiply-add, the library is built with -std=c11, which turns FP
 * contraction off), rounded to bf16 for a bf16 model (as .to(bf16)), then SiLU y / (1 + e^−y) in float32 with
 * the vectorised exp of simd.h (within 2 ulp), rounded again for bf16.  Inputs before the chunk come from the
 * window [B, C, K−1] (zeros when NULL); new_window [B, C, K−1] receives the last K−1 inputs, history included.
 * x, window, weight [C, K], y and new_window share one dtype (bf16 or float32, flag bf16).
 * Returns 0, -1 on bad arguments, -2 out of memory. */
int q35_causal_conv1d_silu(const void *x, int bf16, const void *window, const void *weight, void *y,
                           void *new_window, int64_t B, int64_t T, int64_t C, int64_t K, int threads) {
    const int64_t W = K - 1;
    if (B <= 0 || T <= 0 || C <= 0 || K < 1 || K > 16) return -1;
    float *wt = (float *)malloc((size_t)(K * C) * sizeof(float));
    float *hist = (float *)calloc((size_t)(B * (W > 0 ? W : 1) * C), sizeof(float));
    if (!wt || !hist) { free(wt); free(hist); return -2; }
    for (int64_t c = 0; c < C; c++)
        for (int64_t k = 0; k < K; k++) wt[k * C + c] = act_ld(weight, bf16, c * K + k);
    if (window)
        for (int64_t b = 0; b < B; b++)
            for (int64_t c = 0; c < C; c++)
                for (int64_t j = 0; j < W; j++) hist[(b * W + j) * C + c] = act_ld(window, bf16, (b * C + c) * W + j);
    if (threads < 1) threads = 1;
    const int64_t vend = C - C % VL;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < T; t++) {
                const int64_t row = b * T + t;
                /* input j of this sequence, channel c: x rows from the chunk, the window before it */
#define CONV_IN(j, c) ((j) >= 0 ? act_ld(x, bf16, (b * T + (j)) * C + (c)) : hist[(b * W + W + (j)) * C + (c)])
                int64_t c = 0;
#if VL > 1
                for (; c < vend; c += VL) {
                    vec s = vzero();
                    for (int64_t k = 0; k < K; k++) {
                        const int64_t j = t - W + k;
                        vec xv;
                        if (j >= 0)
                            xv = bf16 ? vload_w((const uint16_t *)x + (b * T + j) * C + c)
                                      : vload_x((const float *)x + (b * T + j) * C + c);
                        else
                            xv = vload_x(hist + (b * W + W + j) * C + c);
                        const vec p = vmul(xv, vload_x(wt + k * C + c));
                        s = k == 0 ? p : vadd(s, p);
                    }
                    if (bf16) s = vround_bf16(s);
                    vec a = vdiv(s, vadd(vset1(1.0f), vexp(vsub(vzero(), s))));
                    float tmp[VL];
                    vstore(tmp, a);
                    for (int l = 0; l < VL; l++) act_st(y, bf16, row * C + c + l, tmp[l]);
                }
#endif
                for (; c < C; c++) {
                    float s = 0.0f;
                    for (int64_t k = 0; k < K; k++) {
                        const float p = CONV_IN(t - W + k, c) * wt[k * C + c];
                        s = k == 0 ? p : s + p;
                    }
                    s = act_round(bf16, s);
                    act_st(y, bf16, row * C + c, s / (1.0f + expf(-s)));
                }
            }
    }
    /* the new window: inputs T−W .. T−1 (from the window when the chunk is shorter than it) */
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t i = 0; i < W; i++) {
                const int64_t j = T - W + i;
                act_st(new_window, bf16, (b * C + c) * W + i, CONV_IN(j, c));
            }
#undef CONV_IN
    free(wt);
    free(hist);
    return 0;
}
