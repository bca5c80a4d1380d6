// Cache-line aligned std::vector storage for the CPU kernels' scratch buffers. A large
// std::vector / malloc block starts 16 bytes past a page, so every 64-byte row of an AMX tile
// or a 512-bit vector in it straddles two cache lines. Measured on the Xeon host with AMX (one
// thread, /tmp micro-benchmark of at::native::cpublas::brgemm, bf16 64 x 64 x 320 accumulated):
// 1550 GFLOP/s with A, B and C on 64-byte boundaries, 440 with all three 16 bytes past one.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace fastarch {

template <typename T>
struct LineAligned {
  using value_type = T;
  static constexpr std::size_t kAlign = 64;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlign)));
  }
  void deallocate(T* ptr, std::size_t) { ::operator delete(ptr, std::align_val_t(kAlign)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};

template <typename T>
using aligned_vector = std::vector<T, LineAligned<T>>;

// n 4-byte elements rounded up to whole cache lines (offsets into one aligned scratch block)
constexpr int64_t lines_of_floats(int64_t n) { return (n + 15) / 16 * 16; }

}  // namespace fastarch
