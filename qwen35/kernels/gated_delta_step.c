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
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

int q35_gated_delta_step(float *restrict states, const int64_t *restrict slots, int64_t n, int64_t Hk,
                         int64_t Hv, int64_t dk, int64_t dv, const float *restrict q, const float *restrict k,
                         const float *restrict v, const float *restrict g, const float *restrict beta,
                         float *restrict out, int threads) {
    if (n <= 0 || Hk <= 0 || Hv % Hk != 0 || dk <= 0 || dv <= 0 || dv > 4096) return -1;
    const int64_t group = Hv / Hk;
    const int64_t tasks = n * Hv;
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t i = t / Hv, h = t % Hv;
        float *restrict S = states + (slots[i] * Hv + h) * dk * dv;
        const float *restrict qh = q + (i * Hk + h / group) * dk;
        const float *restrict kh = k + (i * Hk + h / group) * dk;
        const float *restrict vh = v + t * dv;
        float *restrict oh = out + t * dv;
        const float a = expf(g[t]), b = beta[t];
        float delta[dv];
        for (int64_t c = 0; c < dv; c++) delta[c] = 0.0f;
        for (int64_t r = 0; r < dk; r++) {
            const float kr = kh[r];
            const float *restrict row = S + r * dv;
            for (int64_t c = 0; c < dv; c++) delta[c] += row[c] * kr;
        }
        for (int64_t c = 0; c < dv; c++) {
            delta[c] = b * (vh[c] - a * delta[c]);
            oh[c] = 0.0f;
        }
        for (int64_t r = 0; r < dk; r++) {
            const float kr = kh[r], qr = qh[r];
            float *restrict row = S + r * dv;
            for (int64_t c = 0; c < dv; c++) {
                const float s = a * row[c] + kr * delta[c];
                row[c] = s;
                oh[c] += s * qr;
            }
        }
    }
    return 0;
}
