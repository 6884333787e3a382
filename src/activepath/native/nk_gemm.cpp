// Small-batch GEMM for weights in nn.Linear layout ([N, K], rows contiguous), fp32 or bf16
// weights, fp32 activations and outputs:
//     y[m, n] = sum_k x[m, k] * w[n, k]  (+ b[n])
// over a list of segments (expert e, rows lo..hi of x), so one call runs every active
// expert of an MoE layer. Built for the shapes where BLAS is weakest on CPU: a few rows
// of x against a large weight matrix (decode, and prefill with few tokens per expert).
//
// Why a dot-product form: each weight row is streamed exactly once per tile of x rows,
// from DRAM, by one thread; BLAS splits such products across threads in ways that leave
// bandwidth unused. Why it is batch-invariant: every y[m, n] is accumulated in the same
// order (16-lane partial sums over k, a fixed lane reduction, then the k tail) whatever
// the number of rows, the tiling or the thread that computes it.
//
// bf16 weights are widened exactly to fp32 in registers (a bf16 is the top half of an fp32),
// so a decode step reads half the bytes of fp32 and sums in the same order.
//
// Parallelism: OpenMP, linked against the libgomp that torch itself loaded (same soname),
// so torch's thread pool is reused instead of a second one competing for the cores.
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "work_items.h"

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float* p) {
    v16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

// 16 bf16 (raw bits) → 16 fp32, exact.
static inline v16 load16(const uint16_t* p) {
    v16 v;
#if defined(__AVX512F__)
    const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
    std::memcpy(&v, &bits, sizeof(v));
#else
    for (int i = 0; i < 16; ++i) {
        const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
        std::memcpy(&v[i], &bits, sizeof(float));
    }
#endif
    return v;
}

static inline float to_f32(float w) { return w; }

static inline float to_f32(uint16_t w) {
    const uint32_t bits = static_cast<uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

// A fixed pairwise tree (halves, then quarters, ...): the same order for every output
// element, and 4 vector adds instead of 15 dependent scalar ones, which matter for short
// rows (a 768-wide down projection is only 48 vectors per row).
static inline float lane_sum(v16 v) {
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// MB rows of x (stride ldx) times NB rows of w (stride ldw) → y[MB, NB] (stride ldy).
// pf (may be null): the next tile's NB weight rows, prefetched into L2 line by line while
// this tile computes. A weight row is only a few KiB, too short a stream for the hardware
// prefetchers to ramp up; measured on Zen 4, one row of x against [1536, 2048] experts from
// DRAM: 37 -> 45 GB/s, and [2048, 768]: 28 -> 35 GB/s (benchmarks/native_gemm.py).
// W is the weight element: float, or uint16_t holding bf16 bits.
template <typename W, int MB, int NB>
static void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                 const float* b, float* y, int64_t ldy, const W* pf) {
    constexpr int64_t per_line = 64 / sizeof(W);  // weights per 64-byte cache line
    v16 acc[MB][NB];
    for (int m = 0; m < MB; ++m)
        for (int n = 0; n < NB; ++n) acc[m][n] = v16{};
    const int64_t k16 = K - K % 16;
    for (int64_t k = 0; k < k16; k += 16) {
        if (pf && k % per_line == 0)
            for (int n = 0; n < NB; ++n) __builtin_prefetch(pf + n * ldw + k, 0, 1);
        v16 wv[NB];
        for (int n = 0; n < NB; ++n) {
            wv[n] = load16(w + n * ldw + k);
#ifdef __AVX512F__
            // Pin the weight vector in a register: without this gcc re-loads it for every
            // row of x, doubling the loads per FMA and halving the FMA rate. (A 64-byte
            // vector fits one register only with AVX-512.)
            asm("" : "+v"(wv[n]));
#endif
        }
        for (int m = 0; m < MB; ++m) {
            v16 xv = load16(x + m * ldx + k);
#ifdef __AVX512F__
            asm("" : "+v"(xv));
#endif
            for (int n = 0; n < NB; ++n) acc[m][n] += xv * wv[n];
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int n = 0; n < NB; ++n) {
            float s = lane_sum(acc[m][n]);
            for (int64_t k = k16; k < K; ++k) s += x[m * ldx + k] * to_f32(w[n * ldw + k]);
            y[m * ldy + n] = b ? s + b[n] : s;
        }
}

template <typename W, int MB, int NB>
static void row_block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                      const float* b, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + NB <= n1; n += NB) {
        const W* next = n + 2 * NB <= n1 ? w + (n + NB) * ldw : nullptr;  // stay inside [n0, n1)
        tile<W, MB, NB>(x, ldx, w + n * ldw, ldw, K, b ? b + n : b, y + n, ldy, next);
    }
    for (; n < n1; ++n) tile<W, MB, 1>(x, ldx, w + n * ldw, ldw, K, b ? b + n : b, y + n, ldy, nullptr);
}

// Rows [m0, m1) of x against weight rows [n0, n1), in register tiles of MB_MAX x NB
// (MB_MAX * NB accumulators, NB weight vectors, one x vector: within 32 registers).
template <typename W, int MB_MAX, int NB>
static void block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                  const float* b, float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0,
                  int64_t n1) {
    int64_t m = m0;
    for (; m + MB_MAX <= m1; m += MB_MAX)
        row_block<W, MB_MAX, NB>(x + m * ldx, ldx, w, ldw, K, b, y + m * ldy, ldy, n0, n1);
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (m1 - m) {
        case 7: row_block<W, 7, NB>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 6: row_block<W, 6, NB>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 5: row_block<W, 5, NB>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 4: row_block<W, 4, NB>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 3: row_block<W, 3, NB>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 2: row_block<W, 2, NB>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 1: row_block<W, 1, NB>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        default: break;
    }
}

// Tile shape by row length. Short rows (K <= 1024, e.g. a 768-wide down projection): 8 rows
// of x fit in L1 together, so 8 x 2 tiles read each weight row once for 8 tokens. Long rows
// (K = 2048): 8 rows of x would spill L1, and 4 x 4 tiles measured faster. Measured on Zen 4
// at 8 rows per expert: down 25 -> 33 GB/s with 8 x 2; gate/up 24 (4 x 4) vs 19 (8 x 2).
template <typename W>
static void run_block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                      const float* b, float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0,
                      int64_t n1) {
    if (K <= 1024)
        block<W, 8, 2>(x, ldx, w, ldw, K, b, y, ldy, m0, m1, n0, n1);
    else
        block<W, 4, 4>(x, ldx, w, ldw, K, b, y, ldy, m0, m1, n0, n1);
}

template <typename W>
static int grouped(const float* x, int64_t ldx, const W* w, int64_t w_estride, int64_t ldw, const float* b,
                   int64_t b_estride, float* y, int64_t ldy, int64_t N, int64_t K, const int64_t* segments,
                   int64_t G, int64_t n_block, int64_t m_block, int num_threads) {
    return ap::for_each_work_item(segments, G, N, K, n_block, m_block, num_threads,
                                  [&](int64_t e, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
                                      run_block(x, ldx, w + e * w_estride, ldw, K, b ? b + e * b_estride : b, y,
                                                ldy, m0, m1, n0, n1);
                                  });
}

extern "C" {

// segments: G triples (e, lo, hi); rows lo..hi of x use weight matrix e (w + e * w_estride)
// and write rows lo..hi of y. b (may be null) is [E, N] with stride b_estride.
// n_block: weight rows per work item; m_block: x rows per pass over a weight tile.
// Returns 0, or nonzero for bad arguments.
int ap_grouped_nk_gemm(const float* x, int64_t ldx, const float* w, int64_t w_estride,
                       int64_t ldw, const float* b, int64_t b_estride, float* y, int64_t ldy,
                       int64_t N, int64_t K, const int64_t* segments, int64_t G,
                       int64_t n_block, int64_t m_block, int num_threads) {
    return grouped(x, ldx, w, w_estride, ldw, b, b_estride, y, ldy, N, K, segments, G, n_block, m_block,
                   num_threads);
}

// As ap_grouped_nk_gemm, with w (and its strides) in bf16 elements.
int ap_grouped_nk_gemm_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t w_estride, int64_t ldw,
                            const float* b, int64_t b_estride, float* y, int64_t ldy, int64_t N, int64_t K,
                            const int64_t* segments, int64_t G, int64_t n_block, int64_t m_block,
                            int num_threads) {
    return grouped(x, ldx, w, w_estride, ldw, b, b_estride, y, ldy, N, K, segments, G, n_block, m_block,
                   num_threads);
}

}  // extern "C"
