// Weight-only int8 GEMM for weights in nn.Linear layout ([N, K] int8 rows, one fp32 scale
// per output row), fp32 activations:
//     y[m, n] = scale[n] * sum_k x[m, k] * float(q[n, k])  (+ b[n])
// over a list of segments (expert e, rows lo..hi of x), like ap_grouped_nk_gemm in
// nk_gemm.cpp, whose structure this file follows (see there for the why of each choice).
//
// What differs: each 16-wide weight vector is loaded as 16 bytes and widened to 16 fp32
// lanes in registers (vpmovsxbd + vcvtdq2ps under AVX-512; AVX2 and scalar fallbacks), so
// a decode step reads 4x fewer weight bytes than fp32, and the next weight tiles are
// prefetched in software (see row_block_i8). The conversion is exact, the scale is applied once per output
// element after the sum, and the summation order of every y[m, n] is fixed (16-lane
// partial sums over k, a fixed lane reduction, the k tail, then scale and bias) whatever
// the number of rows, the tiling or the thread: results are batch-invariant.
//
// Everything but the exported function sits in an anonymous namespace: this file is linked
// into the same library as nk_gemm.cpp.
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "work_items.h"

namespace {

typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 load_f32(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

// 16 int8 → 16 fp32 (exact, so every variant gives the same bits). gcc 12 scalarizes
// __builtin_convertvector from an int8 vector, hence the intrinsics.
inline f32x16 load_i8_as_f32(const int8_t* p) {
    f32x16 v;
#if defined(__AVX512F__)
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    std::memcpy(&v, &f, sizeof(v));
#elif defined(__AVX2__)
    const __m128i b0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i b1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
    std::memcpy(&v, &lo, sizeof(lo));
    std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
    for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
#endif
    return v;
}

// Keep a vector in a register (see tile_i8). A 64-byte vector fits one register only with
// AVX-512; elsewhere the pin is left out (an "impossible constraint" otherwise).
#if defined(__AVX512F__)
#define AP_PIN_VECTOR(v) asm("" : "+v"(v))
#else
#define AP_PIN_VECTOR(v) ((void)0)
#endif

inline float sum_lanes(f32x16 v) {
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
}

// MB rows of x (stride ldx) times NB int8 rows of q (stride ldq) → y[MB, NB] (stride ldy).
// pf (may be null): the first weight row of a later tile, fetched into L2 while this one runs.
template <int MB, int NB>
void tile_i8(const float* x, int64_t ldx, const int8_t* q, int64_t ldq, int64_t K,
             const float* scale, const float* b, float* y, int64_t ldy, const int8_t* pf) {
    f32x16 acc[MB][NB];
    for (int m = 0; m < MB; ++m)
        for (int n = 0; n < NB; ++n) acc[m][n] = f32x16{};
    const int64_t k16 = K - K % 16;
    for (int64_t k = 0; k < k16; k += 16) {
        if (pf && k % 64 == 0)
            for (int n = 0; n < NB; ++n) __builtin_prefetch(pf + n * ldq + k, 0, 1);
        f32x16 wv[NB];
        for (int n = 0; n < NB; ++n) {
            wv[n] = load_i8_as_f32(q + n * ldq + k);
            // Keep the widened weights in registers: converted once, used by all MB rows.
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
            float s = sum_lanes(acc[m][n]);
            for (int64_t k = k16; k < K; ++k) s += x[m * ldx + k] * static_cast<float>(q[n * ldq + k]);
            s *= scale[n];
            y[m * ldy + n] = b ? s + b[n] : s;
        }
}

// Software prefetch, PF_TILES tiles ahead, into L2 (locality hint 1): an int8 row is only
// K bytes, too short a stream for the hardware prefetchers to ramp up on. Measured on Zen 4
// (one token, 8 experts of [1536, 2048] from DRAM): no prefetch 10 GB/s on one thread and
// 15 GB/s on two; 2 tiles ahead into L2 20 GB/s and 28-31 GB/s (the fp32 kernel's DRAM
// roofline); into L1 (hint 3) only 11 and 20 GB/s. Prefetches stay inside this work item's
// rows [n0, n1).
constexpr int64_t PF_TILES = 2;

template <int MB>
void row_block_i8(const float* x, int64_t ldx, const int8_t* q, int64_t ldq, int64_t K,
                  const float* scale, const float* b, float* y, int64_t ldy, int64_t n0,
                  int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const int8_t* pf = n + 4 * (PF_TILES + 1) <= n1 ? q + (n + 4 * PF_TILES) * ldq : nullptr;
        tile_i8<MB, 4>(x, ldx, q + n * ldq, ldq, K, scale + n, b ? b + n : b, y + n, ldy, pf);
    }
    for (; n < n1; ++n) {
        const int8_t* pf = n + PF_TILES < n1 ? q + (n + PF_TILES) * ldq : nullptr;
        tile_i8<MB, 1>(x, ldx, q + n * ldq, ldq, K, scale + n, b ? b + n : b, y + n, ldy, pf);
    }
}

constexpr int MB_MAX_I8 = 4;

void block_i8(const float* x, int64_t ldx, const int8_t* q, int64_t ldq, int64_t K,
              const float* scale, const float* b, float* y, int64_t ldy, int64_t m0, int64_t m1,
              int64_t n0, int64_t n1) {
    int64_t m = m0;
    for (; m + MB_MAX_I8 <= m1; m += MB_MAX_I8)
        row_block_i8<MB_MAX_I8>(x + m * ldx, ldx, q, ldq, K, scale, b, y + m * ldy, ldy, n0, n1);
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (m1 - m) {
        case 3: row_block_i8<3>(xm, ldx, q, ldq, K, scale, b, ym, ldy, n0, n1); break;
        case 2: row_block_i8<2>(xm, ldx, q, ldq, K, scale, b, ym, ldy, n0, n1); break;
        case 1: row_block_i8<1>(xm, ldx, q, ldq, K, scale, b, ym, ldy, n0, n1); break;
        default: break;
    }
}

}  // namespace

extern "C" {

// segments: G triples (e, lo, hi); rows lo..hi of x use int8 matrix e (q + e * q_estride,
// rows of stride ldq) with scales scale + e * scale_estride, and write rows lo..hi of y.
// b (may be null) is [E, N] with stride b_estride. n_block: weight rows per work item;
// m_block: x rows per pass over a weight tile. Returns 0, or nonzero on bad arguments.
int ap_grouped_nk_gemm_i8(const float* x, int64_t ldx, const int8_t* q, int64_t q_estride,
                          int64_t ldq, const float* scale, int64_t scale_estride,
                          const float* b, int64_t b_estride, float* y, int64_t ldy, int64_t N,
                          int64_t K, const int64_t* segments, int64_t G, int64_t n_block,
                          int64_t m_block, int num_threads) {
    return ap::for_each_work_item(segments, G, N, K, n_block, n_block, m_block, num_threads,
                                  [&](int64_t e, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
                                      block_i8(x, ldx, q + e * q_estride, ldq, K, scale + e * scale_estride,
                                               b ? b + e * b_estride : b, y, ldy, m0, m1, n0, n1);
                                  });
}

// Which vector branch this build compiled (512: AVX-512, 256: AVX2, 0: scalar), so a test
// can check that a build variant (ACTIVEPATH_NATIVE_FLAGS) really took the branch it names.
int ap_simd_width(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

}  // extern "C"
