// bf16-weight GEMM for weights in nn.Linear layout ([N, K] bf16 rows), fp32 activations:
//     y[m, n] = sum_k x[m, k] * float(w[n, k])  (+ b[n])
// over segments (expert e, rows lo..hi of x), like ap_grouped_nk_gemm in nk_gemm.cpp, whose
// structure and reasons this file follows.
//
// What differs: each 16-wide weight vector is loaded as 32 bytes and widened to fp32 in
// registers (a bf16 is the top half of an fp32: zero-extend and shift, exact), so a decode
// step reads half the bytes of fp32. Accumulation is fp32 in the fixed order of the fp32
// kernel: batch-invariant. Models shipped in bf16 keep half the memory and, at decode, get
// about twice the fp32 speed instead of BLAS's bf16 path (slower than fp32 without AMX).
//
// Everything but the exported function sits in an anonymous namespace: this file is linked
// into the same library as nk_gemm.cpp.
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load_f32(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline f32x16 load_bf16_as_f32(const uint16_t* p) {
    f32x16 v;
#if defined(__AVX512F__)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    std::memcpy(&v, &w, sizeof(v));
#else
    u32x16 bits;
    for (int i = 0; i < 16; ++i) bits[i] = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&v, &bits, sizeof(v));
#endif
    return v;
}

inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

#if defined(__AVX512F__)
#define AP_PIN_VECTOR(v) asm("" : "+v"(v))
#else
#define AP_PIN_VECTOR(v) ((void)0)
#endif

// The fp32 kernel's fixed pairwise lane reduction.
inline float lane_sum(f32x16 v) {
    float a[8], b[4];
    for (int i = 0; i < 8; ++i) a[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; ++i) b[i] = a[i] + a[i + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// pf (may be null): the next tile's rows, prefetched into L2 (see nk_gemm.cpp).
template <int MB, int NB>
void tile_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t K, const float* b,
               float* y, int64_t ldy, const uint16_t* pf) {
    f32x16 acc[MB][NB];
    for (int m = 0; m < MB; ++m)
        for (int n = 0; n < NB; ++n) acc[m][n] = f32x16{};
    const int64_t k16 = K - K % 16;
    for (int64_t k = 0; k < k16; k += 16) {
        if (pf && k % 32 == 0)  // one 64-byte line holds 32 bf16
            for (int n = 0; n < NB; ++n) __builtin_prefetch(pf + n * ldw + k, 0, 1);
        f32x16 wv[NB];
        for (int n = 0; n < NB; ++n) {
            wv[n] = load_bf16_as_f32(w + n * ldw + k);
            AP_PIN_VECTOR(wv[n]);
        }
        for (int m = 0; m < MB; ++m) {
            f32x16 xv = load_f32(x + m * ldx + k);
            AP_PIN_VECTOR(xv);
            for (int n = 0; n < NB; ++n) acc[m][n] += xv * wv[n];
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int n = 0; n < NB; ++n) {
            float s = lane_sum(acc[m][n]);
            for (int64_t k = k16; k < K; ++k) s += x[m * ldx + k] * bf16_to_f32(w[n * ldw + k]);
            y[m * ldy + n] = b ? s + b[n] : s;
        }
}

template <int MB>
void row_block_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t K, const float* b,
                    float* y, int64_t ldy, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const uint16_t* next = n + 8 <= n1 ? w + (n + 4) * ldw : nullptr;
        tile_bf16<MB, 4>(x, ldx, w + n * ldw, ldw, K, b ? b + n : b, y + n, ldy, next);
    }
    for (; n < n1; ++n) tile_bf16<MB, 1>(x, ldx, w + n * ldw, ldw, K, b ? b + n : b, y + n, ldy, nullptr);
}

void block_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t K, const float* b,
                float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) row_block_bf16<4>(x + m * ldx, ldx, w, ldw, K, b, y + m * ldy, ldy, n0, n1);
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (m1 - m) {
        case 3: row_block_bf16<3>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 2: row_block_bf16<2>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        case 1: row_block_bf16<1>(xm, ldx, w, ldw, K, b, ym, ldy, n0, n1); break;
        default: break;
    }
}

}  // namespace

extern "C" {

// As ap_grouped_nk_gemm, with w (and its strides) in bf16 elements.
int ap_grouped_nk_gemm_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t w_estride, int64_t ldw,
                            const float* b, int64_t b_estride, float* y, int64_t ldy, int64_t N, int64_t K,
                            const int64_t* segments, int64_t G, int64_t n_block, int64_t m_block,
                            int num_threads) {
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
        while (first_item[g + 1] <= it) ++g;
        const int64_t local = it - first_item[g];
        const int64_t mp = local / nb_per_seg, nb = local % nb_per_seg;
        const int64_t e = segments[3 * g], lo = segments[3 * g + 1], hi = segments[3 * g + 2];
        const int64_t m0 = lo + mp * m_block;
        const int64_t m1 = m0 + m_block < hi ? m0 + m_block : hi;
        const int64_t n0 = nb * n_block;
        const int64_t n1 = n0 + n_block < N ? n0 + n_block : N;
        block_bf16(x, ldx, w + e * w_estride, ldw, K, b ? b + e * b_estride : b, y, ldy, m0, m1, n0, n1);
    }
    return 0;
}

}  // extern "C"
