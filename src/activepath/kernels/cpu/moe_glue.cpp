// The small steps around the expert GEMMs — top-k selection, the dispatch plan and the
// weighted combine — as one native call each.
//
// Why: at decode an MoE layer's experts stream ~150 MB of weights, which evicts every cache;
// each of the dozen small torch ops of routing/dispatch/combine then costs 10-25 us instead
// of 2-5 us (measured on Zen 4), and together they were 5 % of the layer. One call per step
// touches far less code and data.
//
// Every function works row by row (token by token) with a fixed order, so results do not
// depend on the batch: the same contract as the GEMM kernels.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bf16.h"

namespace {

// Top-k of one row of logits: ids by descending logit, ties to the lower expert id.
// Softmax is monotonic, so the top-k of the logits are the top-k of the probabilities.
void select_topk(const float* row, int64_t E, int64_t K, int64_t* ids) {
    for (int64_t j = 0; j < K; ++j) ids[j] = -1;
    for (int64_t e = 0; e < E; ++e) {
        const float v = row[e];
        int64_t pos = K;
        while (pos > 0 && (ids[pos - 1] < 0 || v > row[ids[pos - 1]])) --pos;
        if (pos == K) continue;
        for (int64_t j = K - 1; j > pos; --j) ids[j] = ids[j - 1];
        ids[pos] = e;
    }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// One GEMM segment per slot of a single token's plan: slot j (sorted by expert) is row j,
// computed by expert sorted_ids[j]. A token's top-k experts are distinct, so one row each.
std::vector<int64_t> one_row_segments(const int64_t* sorted_ids, int64_t K) {
    std::vector<int64_t> segments(3 * K);
    for (int64_t j = 0; j < K; ++j) {
        segments[3 * j] = sorted_ids[j];
        segments[3 * j + 1] = j;
        segments[3 * j + 2] = j + 1;
    }
    return segments;
}

// The GEMM over one token's K slots (one row each, segments from the plan), timed into *seconds.
template <typename Gemm>
int one_row_gemm(const int64_t* sorted_ids, int64_t K, double* seconds, Gemm gemm) {
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int64_t> segments = one_row_segments(sorted_ids, K);
    const int rc = gemm(segments.data());
    *seconds = seconds_since(start);
    return rc;
}

template <typename O, typename Wt>
__attribute__((optimize("fp-contract=off")))
int combine(const O* out, int64_t S, int64_t H, const Wt* weights, const int64_t* order, const int64_t* token_idx,
            int64_t T, float* y, int num_threads) {
    const int64_t chunk = 256;
    const int64_t chunks = (H + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t h0 = c * chunk, h1 = h0 + chunk < H ? h0 + chunk : H;
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = h0; h < h1; ++h) y[t * H + h] = 0.0f;
        for (int64_t j = 0; j < S; ++j) {
            const float wj = to_f32(weights[order[j]]);
            const O* src = out + j * H;
            float* dst = y + token_idx[j] * H;
            for (int64_t h = h0; h < h1; ++h) {
                const float product = to_f32(src[h]) * wj;
                dst[h] = dst[h] + product;
            }
        }
    }
    return 0;
}

}  // namespace

extern "C" {

int ap_grouped_nk_gemm(const float* x, int64_t ldx, const float* w, int64_t w_estride, int64_t ldw,
                       const float* b, int64_t b_estride, float* y, int64_t ldy, int64_t N, int64_t K,
                       const int64_t* segments, int64_t G, int64_t n_block, int64_t m_block, int num_threads);
int ap_softmax_topk(const float* logits, int64_t T, int64_t E, int64_t K, int normalize, float scale,
                    int64_t* ids, float* weights);
int ap_grouped_nk_gemm_i8(const float* x, int64_t ldx, const int8_t* q, int64_t q_estride, int64_t ldq,
                          const float* scale, int64_t scale_estride, const float* b, int64_t b_estride, float* y,
                          int64_t ldy, int64_t N, int64_t K, const int64_t* segments, int64_t G, int64_t n_block,
                          int64_t m_block, int num_threads);

// The whole softmax router in one call: logits [T, E] = x [T, H] @ w [E, H].T (+ bias), by
// the small-batch GEMM, then ap_softmax_topk. One call instead of two saves its share of
// Python and dispatch overhead, which at decode runs on caches the experts just flushed.
int ap_route_softmax_topk(const float* x, int64_t T, int64_t H, const float* w, const float* bias, int64_t E,
                          int64_t K, int normalize, float scale, float* logits, int64_t* ids, float* weights,
                          int64_t n_block, int64_t m_block, int num_threads) {
    const int64_t segment[3] = {0, 0, T};
    const int rc = ap_grouped_nk_gemm(x, H, w, 0, H, bias, 0, logits, E, E, H, segment, 1, n_block, m_block,
                                      num_threads);
    return rc != 0 ? rc : ap_softmax_topk(logits, T, E, K, normalize, scale, ids, weights);
}

// Softmax routing: logits [T, E] → ids [T, K] (descending probability) and weights [T, K]:
// the softmax probabilities of the chosen experts (over all E), renormalised over the K when
// `normalize` (p / (sum + 1e-20)), then times `scale`. Probabilities in double, rounded once.
int ap_softmax_topk(const float* logits, int64_t T, int64_t E, int64_t K, int normalize, float scale,
                    int64_t* ids, float* weights) {
    if (T < 0 || E <= 0 || K <= 0 || K > E) return 1;
    for (int64_t t = 0; t < T; ++t) {
        const float* row = logits + t * E;
        int64_t* ids_t = ids + t * K;
        float* w_t = weights + t * K;
        select_topk(row, E, K, ids_t);
        const double top = row[ids_t[0]];
        double denom = 0.0;
        for (int64_t e = 0; e < E; ++e) denom += std::exp(static_cast<double>(row[e]) - top);
        for (int64_t j = 0; j < K; ++j)
            w_t[j] = static_cast<float>(std::exp(static_cast<double>(row[ids_t[j]]) - top) / denom);
        if (normalize) {  // in fp32, like the torch path: p / (sum + 1e-20)
            float sum = 0.0f;
            for (int64_t j = 0; j < K; ++j) sum += w_t[j];
            sum += 1e-20f;
            for (int64_t j = 0; j < K; ++j) w_t[j] = w_t[j] / sum;
        }
        if (scale != 1.0f)
            for (int64_t j = 0; j < K; ++j) w_t[j] = w_t[j] * scale;
    }
    return 0;
}

// Dispatch plan: slots s = t * K + k sorted by expert, stably (token order inside an
// expert). ids [S] in [0, E) → order [S], token_idx [S], sorted_ids [S], counts [E] and
// offsets [E + 1] (expert e owns sorted positions offsets[e]..offsets[e+1]).
int ap_plan_dispatch(const int64_t* ids, int64_t S, int64_t K, int64_t E, int64_t* order,
                     int64_t* token_idx, int64_t* sorted_ids, int64_t* counts, int64_t* offsets) {
    if (S < 0 || K <= 0 || E <= 0) return 1;
    for (int64_t e = 0; e < E; ++e) counts[e] = 0;
    for (int64_t s = 0; s < S; ++s) {
        if (ids[s] < 0 || ids[s] >= E) return 2;
        ++counts[ids[s]];
    }
    std::vector<int64_t> next(E);
    int64_t offset = 0;
    for (int64_t e = 0; e < E; ++e) {
        next[e] = offsets[e] = offset;
        offset += counts[e];
    }
    offsets[E] = offset;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t j = next[ids[s]]++;
        order[j] = s;
        token_idx[j] = s / K;
        sorted_ids[j] = ids[s];
    }
    return 0;
}

// Combine: y [T, H] = 0, then for each sorted slot j in order:
// y[token_idx[j]] += out[j] * weights[order[j]] (weights: [T * K], slot order),
// the product rounded to fp32 before the add (no FMA: the same bits as scaling the rows first,
// then index_add_). Parallel over columns of H only, so each element's sum order is fixed.
// out and weights are fp32 or bf16 (out_bf16 / w_bf16), widened exactly to fp32: the same
// bits as the torch path, which converts them to fp32 first. y is fp32.
int ap_combine(const void* out, int out_bf16, int64_t S, int64_t H, const void* weights, int w_bf16,
               const int64_t* order, int64_t num_slots, const int64_t* token_idx, int64_t T, float* y,
               int num_threads) {
    if (S < 0 || H <= 0 || T < 0) return 1;
    for (int64_t j = 0; j < S; ++j)
        if (token_idx[j] < 0 || token_idx[j] >= T || order[j] < 0 || order[j] >= num_slots) return 2;
    if (out_bf16)
        return w_bf16 ? combine(static_cast<const uint16_t*>(out), S, H, static_cast<const uint16_t*>(weights),
                                order, token_idx, T, y, num_threads)
                      : combine(static_cast<const uint16_t*>(out), S, H, static_cast<const float*>(weights),
                                order, token_idx, T, y, num_threads);
    return w_bf16 ? combine(static_cast<const float*>(out), S, H, static_cast<const uint16_t*>(weights), order,
                            token_idx, T, y, num_threads)
                  : combine(static_cast<const float*>(out), S, H, static_cast<const float*>(weights), order,
                            token_idx, T, y, num_threads);
}

// One token through an MoE layer: the router and dispatch plan (route_and_plan), the
// gate/up GEMM with one row per slot, then (after the activation, in the caller) the down
// GEMM and the combine. Every slot reads the token's row in place (ldx = 0), which is what
// gathering it K times gives: the same kernels with the same arguments and the same bits as
// the general path, minus its Python. fp32 and int8 (per-row scales) weights.
// seconds: [router, plan, gate/up GEMM] and [down GEMM, combine].
static int route_and_plan(const float* x, int64_t H, const float* w_router, const float* b_router, int64_t E,
                          int64_t K, int normalize, float scale, float* logits, int64_t* ids, float* weights,
                          int64_t* order, int64_t* token_idx, int64_t* sorted_ids, int64_t* counts,
                          int64_t* offsets, double* seconds, int64_t n_block, int64_t m_block, int router_threads) {
    auto start = std::chrono::steady_clock::now();
    const int rc = ap_route_softmax_topk(x, 1, H, w_router, b_router, E, K, normalize, scale, logits, ids, weights,
                                         n_block, m_block, router_threads);
    if (rc != 0) return rc;
    seconds[0] = seconds_since(start);
    start = std::chrono::steady_clock::now();
    const int plan_rc = ap_plan_dispatch(ids, K, K, E, order, token_idx, sorted_ids, counts, offsets);
    seconds[1] = seconds_since(start);
    return plan_rc != 0 ? 10 + plan_rc : 0;
}

static int combine_token(const float* out, int64_t H, const int64_t* order, const int64_t* token_idx, int64_t K,
                         const float* weights, float* y, double* seconds, int combine_threads) {
    const auto start = std::chrono::steady_clock::now();
    const int rc = ap_combine(out, 0, K, H, weights, 0, order, K, token_idx, 1, y, combine_threads);
    seconds[1] = seconds_since(start);
    return rc != 0 ? 30 + rc : 0;
}

int ap_token_route_gate_up(const float* x, int64_t H, const float* w_router, const float* b_router, int64_t E,
                           int64_t K, int normalize, float scale, const float* w_gate_up, int64_t w_estride,
                           int64_t ldw, int64_t N, float* logits, int64_t* ids, float* weights, int64_t* order,
                           int64_t* token_idx, int64_t* sorted_ids, int64_t* counts, int64_t* offsets,
                           float* gate_up, double* seconds, int64_t n_block, int64_t m_block, int router_threads,
                           int gemm_threads) {
    const int rc = route_and_plan(x, H, w_router, b_router, E, K, normalize, scale, logits, ids, weights, order,
                                  token_idx, sorted_ids, counts, offsets, seconds, n_block, m_block, router_threads);
    if (rc != 0) return rc;
    const int gemm_rc = one_row_gemm(sorted_ids, K, &seconds[2], [&](const int64_t* segments) {
        return ap_grouped_nk_gemm(x, 0, w_gate_up, w_estride, ldw, nullptr, 0, gate_up, N, N, H, segments, K,
                                  n_block, m_block, gemm_threads);
    });
    return gemm_rc != 0 ? 20 + gemm_rc : 0;
}

int ap_token_route_gate_up_i8(const float* x, int64_t H, const float* w_router, const float* b_router, int64_t E,
                              int64_t K, int normalize, float scale, const int8_t* q_gate_up, int64_t q_estride,
                              int64_t ldq, const float* q_scale, int64_t scale_estride, const float* bias,
                              int64_t b_estride, int64_t N, float* logits, int64_t* ids, float* weights,
                              int64_t* order, int64_t* token_idx, int64_t* sorted_ids, int64_t* counts,
                              int64_t* offsets, float* gate_up, double* seconds, int64_t n_block, int64_t m_block,
                              int64_t n_block_i8, int64_t m_block_i8, int router_threads, int gemm_threads) {
    const int rc = route_and_plan(x, H, w_router, b_router, E, K, normalize, scale, logits, ids, weights, order,
                                  token_idx, sorted_ids, counts, offsets, seconds, n_block, m_block, router_threads);
    if (rc != 0) return rc;
    const int gemm_rc = one_row_gemm(sorted_ids, K, &seconds[2], [&](const int64_t* segments) {
        return ap_grouped_nk_gemm_i8(x, 0, q_gate_up, q_estride, ldq, q_scale, scale_estride, bias, b_estride,
                                     gate_up, N, N, H, segments, K, n_block_i8, m_block_i8, gemm_threads);
    });
    return gemm_rc != 0 ? 20 + gemm_rc : 0;
}

int ap_token_down_combine(const float* h, int64_t I, const float* w_down, int64_t w_estride, int64_t ldw,
                          int64_t H, const int64_t* sorted_ids, const int64_t* order, const int64_t* token_idx,
                          int64_t K, const float* weights, float* out, float* y, double* seconds, int64_t n_block,
                          int64_t m_block, int gemm_threads, int combine_threads) {
    const int rc = one_row_gemm(sorted_ids, K, &seconds[0], [&](const int64_t* segments) {
        return ap_grouped_nk_gemm(h, I, w_down, w_estride, ldw, nullptr, 0, out, H, H, I, segments, K, n_block,
                                  m_block, gemm_threads);
    });
    if (rc != 0) return rc;
    return combine_token(out, H, order, token_idx, K, weights, y, seconds, combine_threads);
}

int ap_token_down_combine_i8(const float* h, int64_t I, const int8_t* q_down, int64_t q_estride, int64_t ldq,
                             const float* q_scale, int64_t scale_estride, const float* bias, int64_t b_estride,
                             int64_t H, const int64_t* sorted_ids, const int64_t* order, const int64_t* token_idx,
                             int64_t K, const float* weights, float* out, float* y, double* seconds,
                             int64_t n_block_i8, int64_t m_block_i8, int gemm_threads, int combine_threads) {
    const int rc = one_row_gemm(sorted_ids, K, &seconds[0], [&](const int64_t* segments) {
        return ap_grouped_nk_gemm_i8(h, I, q_down, q_estride, ldq, q_scale, scale_estride, bias, b_estride, out, H,
                                     H, I, segments, K, n_block_i8, m_block_i8, gemm_threads);
    });
    if (rc != 0) return rc;
    return combine_token(out, H, order, token_idx, K, weights, y, seconds, combine_threads);
}

}  // extern "C"
