// bfloat16 <-> float on the bits, for the CPU kernels that take bfloat16 operands under autocast
// (c10's conversions do not vectorize in their loops): widen is exact; narrow rounds to nearest
// even and keeps NaN a NaN. For T = S both are the identity.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace dinrec {

template <typename T>
inline T widen(T v) { return v; }
inline float widen(at::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename S, typename T>
inline S narrow(T v) { return S(v); }
template <>
inline at::BFloat16 narrow<at::BFloat16, float>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return at::BFloat16(uint16_t(nan ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}

}  // namespace dinrec
