// Scalar weight/activation element → fp32, for the kernels that take fp32 or bf16 (raw bits
// in a uint16_t). Shared by nk_gemm.cpp and moe_glue.cpp.
#pragma once

#include <cstdint>
#include <cstring>

static inline float to_f32(float w) { return w; }

// A bf16 is the top half of an fp32: exact.
static inline float to_f32(uint16_t w) {
    const uint32_t bits = static_cast<uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}
