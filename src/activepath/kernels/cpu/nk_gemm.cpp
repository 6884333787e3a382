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
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"
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
// pf (may be null): the NB weight rows of a tile ahead (row_block's PD), prefetched into L2
// line by line while this tile computes. A weight row is only a few KiB, too short a stream
// for the hardware prefetchers to ramp up; measured on Zen 4, one row of x against
// [1536, 2048] experts from DRAM: 37 -> 45 GB/s, and [2048, 768]: 28 -> 35 GB/s
// (benchmarks/native_gemm.py).
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

// Weight rows [n0, n1) in tiles of NB rows; each tile prefetches the tile PD tiles ahead.
template <typename W, int MB, int NB, int PD = 1>
static void row_block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                      const float* b, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + NB <= n1; n += NB) {
        const W* ahead = n + (PD + 1) * NB <= n1 ? w + (n + PD * NB) * ldw : nullptr;  // stay inside [n0, n1)
        tile<W, MB, NB>(x, ldx, w + n * ldw, ldw, K, b ? b + n : b, y + n, ldy, ahead);
    }
    for (; n < n1; ++n) tile<W, MB, 1>(x, ldx, w + n * ldw, ldw, K, b ? b + n : b, y + n, ldy, nullptr);
}

// One row of x (decode: each expert's only token, and the dense projections) is a pure
// weight stream, paced by how far ahead the prefetches run. Its work items are up to 128
// weight rows (for_each_work_item's one_row_n_block) instead of n_block, so fewer items start
// with a stream nobody prefetched, and its tiles reach further ahead: short rows (K <= 1024,
// a 3 KiB down-projection row) in tiles of 8 rows, 1 tile (24 KiB) ahead, where 2-row tiles
// reached 6 KiB; long rows in tiles of 4, 2 tiles (64 KiB) ahead. Decode steps of the
// Qwen3-30B-A3B shape x 4 layers, alternating with the previous kernels in one process
// (benchmarks/native_ab.py): 4-9 % faster with the host's memory fast (~30 ms steps);
// with it slow (~39 ms), 2 % faster in 12 of 12 rounds of one run, -3.5..+1.6 % in others.
// 8-row tiles for the long rows too measured faster in the fast state but up to 6 % slower
// in the slow one: more concurrent streams.
// Each output is summed as before: the same bits.
constexpr int64_t ONE_ROW_N_BLOCK = 128;
#if defined(__AVX512F__)
constexpr int SHORT_ONE_NB = 8;  // 8 accumulators + 8 weight vectors + x: 17 of 32 zmm
#else
constexpr int SHORT_ONE_NB = 2;  // a v16 takes two of 16 ymm: keep the 2-row tiles
#endif

// Rows [m0, m1) of x against weight rows [n0, n1), in register tiles of MB_MAX x NB
// (MB_MAX * NB accumulators, NB weight vectors, one x vector: within 32 registers); a lone
// row in tiles of ONE_NB, prefetching ONE_PD tiles ahead (see ONE_ROW_N_BLOCK).
template <typename W, int MB_MAX, int NB, int ONE_NB, int ONE_PD>
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
        case 1: row_block<W, 1, ONE_NB, ONE_PD>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
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
        block<W, 8, 2, SHORT_ONE_NB, 1>(x, ldx, w, ldw, K, b, y, ldy, m0, m1, n0, n1);
    else
        block<W, 4, 4, 4, 2>(x, ldx, w, ldw, K, b, y, ldy, m0, m1, n0, n1);
}

// ---- Panel kernel: experts (and dense layers) with many rows, fp32 weights ----------------
//
// The dot-product tiles above load one x vector per weight vector, so past ~16 rows they are
// limited by loads, not FMAs (about 140-170 GFLOP/s here against a 190 GFLOP/s peak). The
// panel kernel is the outer-product form: x is packed into panels of 16 rows transposed
// ([K][16], so a vector holds 16 rows of one column), each weight element is broadcast from
// memory into the FMA, and a tile of PANEL_MV panels x PANEL_NR weight rows keeps
// PANEL_MV * PANEL_NR accumulators: 12 FMAs per 2 vector loads + 12 broadcasts. Measured on
// Zen 4 (8 experts of [1536, 2048] and [2048, 768], benchmarks/native_gemm.py): 143-150
// GFLOP/s at 16 rows vs 120 for the dot kernel and 65-71 for BLAS, 190-207 at 128-512 rows
// vs 157-178 (dot) and 160-190 (BLAS).
//
// Summation order: y[m, n] is one fp32 FMA chain over k = 0..K-1 (each accumulator lane is a
// row), whatever the panel pairing, the tile or the thread; rows past the last full panel
// (rows % 16) take the dot kernel. So a row's result depends on its position in its segment:
// this path is for the `grouped` backend, not the batch-invariant one.
#if defined(__AVX512F__)
constexpr int PANEL_MV = 2, PANEL_NR = 12;  // 24 accumulators + 2 x vectors of 32 zmm
#else
constexpr int PANEL_MV = 1, PANEL_NR = 6;   // a v16 is two ymm: 12 + 2 of 16 registers
#endif
constexpr int64_t PANEL_ROWS = 16;

// Rows [lo, lo + 16 * panels) of x → panels [K][16], one after another.
static void pack_panels(const float* x, int64_t ldx, int64_t lo, int64_t panels, int64_t K, float* dst) {
    for (int64_t p = 0; p < panels; ++p) {
        const float* src = x + (lo + p * PANEL_ROWS) * ldx;
        float* d = dst + p * K * PANEL_ROWS;
        for (int64_t k0 = 0; k0 < K; k0 += 64)  // 64 columns at a time: 16 source rows stay in L1
            for (int64_t r = 0; r < PANEL_ROWS; ++r)
                for (int64_t k = k0; k < K && k < k0 + 64; ++k) d[k * PANEL_ROWS + r] = src[r * ldx + k];
    }
}

// MV panels (16 * MV rows) x NR weight rows → y. No software prefetch: with 12 weight rows
// streaming at once the hardware prefetchers keep up, and prefetching the next rows measured
// 0-9 % slower (16-128 rows).
template <int MV, int NR>
static void panel_tile(const float* xt, int64_t K, const float* w, int64_t ldw, const float* b, float* y,
                       int64_t ldy) {
    v16 acc[MV][NR];
    for (int i = 0; i < MV; ++i)
        for (int n = 0; n < NR; ++n) acc[i][n] = v16{};
    for (int64_t k = 0; k < K; ++k) {
        v16 xv[MV];
        for (int i = 0; i < MV; ++i) {
            xv[i] = load16(xt + i * K * PANEL_ROWS + k * PANEL_ROWS);
#ifdef __AVX512F__
            asm("" : "+v"(xv[i]));
#endif
        }
        for (int n = 0; n < NR; ++n) {
            const float ws = w[n * ldw + k];
            for (int i = 0; i < MV; ++i) acc[i][n] += xv[i] * ws;
        }
    }
    for (int i = 0; i < MV; ++i) {
        float cols[NR][PANEL_ROWS];
        for (int n = 0; n < NR; ++n) std::memcpy(cols[n], &acc[i][n], sizeof(cols[n]));
        for (int64_t r = 0; r < PANEL_ROWS; ++r) {
            float* yr = y + (i * PANEL_ROWS + r) * ldy;
            for (int n = 0; n < NR; ++n) yr[n] = b ? cols[n][r] + b[n] : cols[n][r];
        }
    }
}

// Every panel of a segment against NR weight rows: the rows (NR * K floats) stay in L2
// while the panels stream past them in pairs.
template <int NR>
static void panel_group(const float* xt, int64_t panels, int64_t K, const float* w, int64_t ldw, const float* b,
                        float* y, int64_t ldy) {
    int64_t p = 0;
    for (; p + PANEL_MV <= panels; p += PANEL_MV)
        panel_tile<PANEL_MV, NR>(xt + p * K * PANEL_ROWS, K, w, ldw, b, y + p * PANEL_ROWS * ldy, ldy);
    for (; p < panels; ++p) panel_tile<1, NR>(xt + p * K * PANEL_ROWS, K, w, ldw, b, y + p * PANEL_ROWS * ldy, ldy);
}

// One work item: every row of a segment (rows lo..hi, its full panels packed at xt) against
// weight rows [n0, n1), NR rows at a time; rows past the last full panel in the dot kernel.
static void panel_item(const float* x, int64_t ldx, const float* xt, int64_t panels, const float* w,
                       int64_t ldw, int64_t K, const float* b, float* y, int64_t ldy, int64_t lo, int64_t hi,
                       int64_t n0, int64_t n1) {
    float* yp = y + lo * ldy;
    int64_t n = n0;
    for (; n + PANEL_NR <= n1; n += PANEL_NR)
        panel_group<PANEL_NR>(xt, panels, K, w + n * ldw, ldw, b ? b + n : b, yp + n, ldy);
    for (; n + 4 <= n1; n += 4) panel_group<4>(xt, panels, K, w + n * ldw, ldw, b ? b + n : b, yp + n, ldy);
    for (; n < n1; ++n) panel_group<1>(xt, panels, K, w + n * ldw, ldw, b ? b + n : b, yp + n, ldy);
    const int64_t rest = lo + panels * PANEL_ROWS;
    if (rest < hi) run_block<float>(x, ldx, w, ldw, K, b, y, ldy, rest, hi, n0, n1);
}

static int grouped_panel(const float* x, int64_t ldx, const float* w, int64_t w_estride, int64_t ldw,
                         const float* b, int64_t b_estride, float* y, int64_t ldy, int64_t N, int64_t K,
                         const int64_t* segments, int64_t G, float* scratch, int64_t n_block, int num_threads) {
    if (N <= 0 || K <= 0 || G < 0 || n_block <= 0 || num_threads <= 0) return 1;
    std::vector<int64_t> first_panel(G + 1, 0);  // segment g's panels start at first_panel[g]
    for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = segments[3 * g + 2] - segments[3 * g + 1];
        if (rows < 0) return 2;
        first_panel[g + 1] = first_panel[g] + rows / PANEL_ROWS;
    }
    // Work items of segments with full panels are compute-bound; the others (a few rows, the
    // dot kernel) are bandwidth-bound. Two queues, and even threads drain the compute queue
    // first, odd threads the bandwidth queue: while one thread computes the other streams
    // weights, instead of both waiting on the same resource. Each item writes its own part
    // of y whichever thread runs it, so the result does not depend on the schedule.
    const int64_t per_seg = (N + n_block - 1) / n_block;
    std::vector<int64_t> queues[2];  // [0]: compute-bound items, [1]: bandwidth-bound
    for (int64_t g = 0; g < G; ++g)
        for (int64_t nb = 0; nb < per_seg; ++nb)
            queues[first_panel[g + 1] > first_panel[g] ? 0 : 1].push_back(g * per_seg + nb);
    std::atomic<size_t> next[2] = {{0}, {0}};
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < G; ++g)
            pack_panels(x, ldx, segments[3 * g + 1], first_panel[g + 1] - first_panel[g], K,
                        scratch + first_panel[g] * K * PANEL_ROWS);
        // (the implicit barrier: every panel is packed before any tile reads one)
        const int mine = omp_get_thread_num() % 2;
        for (int q : {mine, 1 - mine}) {
            for (size_t i; (i = next[q].fetch_add(1)) < queues[q].size();) {
                const int64_t it = queues[q][i];
                const int64_t g = it / per_seg, n0 = (it % per_seg) * n_block;
                const int64_t e = segments[3 * g];
                panel_item(x, ldx, scratch + first_panel[g] * K * PANEL_ROWS, first_panel[g + 1] - first_panel[g],
                           w + e * w_estride, ldw, K, b ? b + e * b_estride : b, y, ldy, segments[3 * g + 1],
                           segments[3 * g + 2], n0, n0 + n_block < N ? n0 + n_block : N);
            }
        }
    }
    return 0;
}

template <typename W>
static int grouped(const float* x, int64_t ldx, const W* w, int64_t w_estride, int64_t ldw, const float* b,
                   int64_t b_estride, float* y, int64_t ldy, int64_t N, int64_t K, const int64_t* segments,
                   int64_t G, int64_t n_block, int64_t m_block, int num_threads) {
    // Longer items, but not so few that a thread idles (a 128-expert router is 128 rows);
    // a multiple of 8 rows, so that items start on a tile boundary.
    const int64_t per_thread = num_threads > 0 ? N / num_threads / 8 * 8 : 0;
    const int64_t longer = per_thread < ONE_ROW_N_BLOCK ? per_thread : ONE_ROW_N_BLOCK;
    const int64_t one_row_n_block = longer > n_block ? longer : n_block;
    return ap::for_each_work_item(segments, G, N, K, n_block, one_row_n_block, m_block, num_threads,
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

// As ap_grouped_nk_gemm (fp32 weights), for segments with many rows: full 16-row panels of
// each segment in the outer-product panel kernel, the remaining rows in the dot kernel.
// scratch: sum over segments of floor(rows / 16) * 16 * K floats, overwritten.
int ap_grouped_nk_gemm_panel(const float* x, int64_t ldx, const float* w, int64_t w_estride, int64_t ldw,
                             const float* b, int64_t b_estride, float* y, int64_t ldy, int64_t N, int64_t K,
                             const int64_t* segments, int64_t G, float* scratch, int64_t n_block,
                             int num_threads) {
    return grouped_panel(x, ldx, w, w_estride, ldw, b, b_estride, y, ldy, N, K, segments, G, scratch, n_block,
                         num_threads);
}

}  // extern "C"
