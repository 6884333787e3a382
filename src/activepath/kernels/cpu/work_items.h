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
// of the output, so items never race. A segment of exactly one row takes items of
// one_row_n_block weight rows instead of n_block (its item is a pure weight stream; the
// kernel decides how long a stream its prefetching needs). The split never changes what an
// item computes for an output element. Returns 0, or nonzero for bad arguments.
template <typename Fn>
inline int for_each_work_item(const int64_t* segments, int64_t G, int64_t N, int64_t K, int64_t n_block,
                              int64_t one_row_n_block, int64_t m_block, int num_threads, Fn fn) {
    if (N <= 0 || K < 0 || G < 0 || n_block <= 0 || one_row_n_block <= 0 || m_block <= 0 || num_threads <= 0)
        return 1;
    std::vector<int64_t> first_item(G + 1, 0);
    for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = segments[3 * g + 2] - segments[3 * g + 1];
        if (rows < 0) return 2;
        const int64_t block = rows == 1 ? one_row_n_block : n_block;
        first_item[g + 1] = first_item[g] + (N + block - 1) / block * ((rows + m_block - 1) / m_block);
    }
    const int64_t items = first_item[G];
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t it = 0; it < items; ++it) {
        int64_t g = 0;
        while (first_item[g + 1] <= it) ++g;  // G is small (active experts)
        const int64_t local = it - first_item[g];
        const int64_t e = segments[3 * g], lo = segments[3 * g + 1], hi = segments[3 * g + 2];
        const int64_t block = hi - lo == 1 ? one_row_n_block : n_block;
        const int64_t per_pass = (N + block - 1) / block;
        const int64_t m0 = lo + local / per_pass * m_block;
        const int64_t n0 = local % per_pass * block;
        fn(e, m0, m0 + m_block < hi ? m0 + m_block : hi, n0, n0 + block < N ? n0 + block : N);
    }
    return 0;
}

}  // namespace ap
