// Element conversions shared by the CPU kernels: every kernel computes in fp32 and reads fp32,
// bf16 or fp16 storage. bf16 -> fp32 is a 16-bit shift, written so that gcc vectorises it.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fastarch {

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

}  // namespace fastarch
