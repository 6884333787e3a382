// How the grouped GEMM kernels split a call into parallel work: one item per (segment,
// pass of m_block rows of x, block of n_block weight rows). Shared by nk_gemm.cpp and
// nk_gemm_i8.cpp, so both schedule the same way.
#pragma once

#include <cstdint>
#include <vector>

namespace ap {

// Runs fn(e, m0, m1, n0, n1) for every work item of `segments` (G triples (e, lo, hi)) on
// `num_threads` OpenMP threads, dynamically scheduled (items differ in cost when experts
// get different numbers of rows). Each item writes only rows [m0, m1) x columns [n0, n1)
// of the output, so items never race. Returns 0, or nonzero for bad arguments.
template <typename Fn>
inline int for_each_work_item(const int64_t* segments, int64_t G, int64_t N, int64_t K, int64_t n_block,
                              int64_t m_block, int num_threads, Fn fn) {
    if (N <= 0 || K < 0 || G < 0 || n_block <= 0 || m_block <= 0 || num_threads <= 0) return 1;
    const int64_t nb_per_seg = (N + n_block - 1) / n_block;
    std::vector<int64_t> first_item(G + 1, 0);
    for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = segments[3 * g + 2] - segments[3 * g + 1];
        if (rows < 0) return 2;
        first_item[g + 1] = first_item[g] + nb_per_seg * ((rows + m_block - 1) / m_block);
    }
    const int64_t items = first_item[G];
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t it = 0; it < items; ++it) {
        int64_t g = 0;
        while (first_item[g + 1] <= it) ++g;  // G is small (active experts)
        const int64_t local = it - first_item[g];
        const int64_t mp = local / nb_per_seg, nb = local % nb_per_seg;
        const int64_t e = segments[3 * g], lo = segments[3 * g + 1], hi = segments[3 * g + 2];
        const int64_t m0 = lo + mp * m_block;
        const int64_t n0 = nb * n_block;
        fn(e, m0, m0 + m_block < hi ? m0 + m_block : hi, n0, n0 + n_block < N ? n0 + n_block : N);
    }
    return 0;
}

}  // namespace ap
