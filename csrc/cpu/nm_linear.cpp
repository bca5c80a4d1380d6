// CPU kernel of the N:M linear family: y = x @ W^T + bias, W stored N:M along the input dim.
//
// Layout: values (O, KC) with KC = K*n/m kept weights per row, indices (O, KC) uint8 = position of
// each kept weight inside its group of m inputs. Work split: output rows among threads. Each row
// is read once for up to 8 batch rows at a time (decode batch 1..8 reads every kept weight once);
// the x columns of a group are contiguous (m values), so the gather stays in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "convert.h"

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace fastarch {
namespace {

// dot(kept values of one row, x gathered at their columns); vectorised with gathers.
template <typename T, int N, int M>
inline float nm_dot(const T* __restrict v, const uint8_t* __restrict id, const float* __restrict x,
                    int64_t KC) {
  float acc = 0.0f;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(v);
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < KC; ++k) {
      uint32_t b = uint32_t(u[k]) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      acc += f * x[(k / N) * M + id[k]];
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const _Float16* h = reinterpret_cast<const _Float16*>(v);
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < KC; ++k) acc += float(h[k]) * x[(k / N) * M + id[k]];
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < KC; ++k) acc += v[k] * x[(k / N) * M + id[k]];
  }
  return acc;
}

template <typename T, int N, int M>
void nm_rows(const T* x, const T* vals, const uint8_t* idx, const T* bias, T* y, int64_t B,
             int64_t O, int64_t KC, int64_t K) {
  if (B == 1) {  // decode: one gathered dot product per output row
    std::vector<float> xf(static_cast<size_t>(K));
    for (int64_t i = 0; i < K; ++i) xf[i] = to_f32(x[i]);
    at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const float bv = bias ? to_f32(bias[o]) : 0.0f;
        y[o] = static_cast<T>(nm_dot<T, N, M>(vals + o * KC, idx + o * KC, xf.data(), KC) + bv);
      }
    });
    return;
  }
  // small batches: x transposed to (K, 8) fp32 tiles, so each kept weight is one 8-wide FMA
  // against the 8 batch values of its column (read once for all rows of the tile)
  constexpr int64_t R = 8;
  for (int64_t b0 = 0; b0 < B; b0 += R) {
    const int64_t nb = std::min(R, B - b0);
    std::vector<float> xt(static_cast<size_t>(K * R), 0.0f);
    for (int64_t r = 0; r < nb; ++r)
      for (int64_t k = 0; k < K; ++k) xt[k * R + r] = to_f32(x[(b0 + r) * K + k]);
    at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const T* v = vals + o * KC;
        const uint8_t* id = idx + o * KC;
        float acc[R] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t k = 0; k < KC; ++k) {
          const float w = to_f32(v[k]);
          const float* xc = xt.data() + ((k / N) * M + id[k]) * R;
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) acc[r] += w * xc[r];
        }
        const float bv = bias ? to_f32(bias[o]) : 0.0f;
        for (int64_t r = 0; r < nb; ++r) y[(b0 + r) * O + o] = static_cast<T>(acc[r] + bv);
      }
    });
  }
}

template <typename T>
void nm_dispatch(const T* x, const T* v, const uint8_t* i, const T* b, T* y, int64_t B, int64_t O,
                 int64_t KC, int64_t K, int64_t n, int64_t m) {
  if (n == 2 && m == 4) return nm_rows<T, 2, 4>(x, v, i, b, y, B, O, KC, K);
  if (n == 4 && m == 8) return nm_rows<T, 4, 8>(x, v, i, b, y, B, O, KC, K);
  if (n == 1 && m == 4) return nm_rows<T, 1, 4>(x, v, i, b, y, B, O, KC, K);
  if (n == 2 && m == 8) return nm_rows<T, 2, 8>(x, v, i, b, y, B, O, KC, K);
  TORCH_CHECK(false, "nm_linear: unsupported pattern ", n, ":", m);
}

at::Tensor nm_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                         const std::optional<at::Tensor>& bias, int64_t n, int64_t m) {
  TORCH_CHECK(x.dim() == 2, "nm_linear: x must be 2-D (B, in)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "nm_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(values.dim() == 2 && indices.sizes() == values.sizes(),
              "nm_linear: values and indices must be 2-D with the same shape");
  TORCH_CHECK(indices.scalar_type() == at::kByte, "nm_linear: indices must be uint8");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "nm_linear: values must have x's dtype");
  TORCH_CHECK(n > 0 && m > n && m <= 255, "nm_linear: bad pattern ", n, ":", m);
  const int64_t B = x.size(0), O = values.size(0), KC = values.size(1);
  TORCH_CHECK(KC % n == 0, "nm_linear: values.size(1) must be a multiple of n");
  const int64_t K = KC / n * m;
  TORCH_CHECK(x.size(1) == K, "nm_linear: x.size(1) must be ", K);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O && bias->scalar_type() == x.scalar_type(),
                "nm_linear: bias must be (out,) with x's dtype");
  }
  auto xc = x.contiguous();
  auto vc = values.contiguous();
  auto ic = indices.contiguous();
  TORCH_CHECK(ic.numel() == 0 || ic.max().item<int64_t>() < m, "nm_linear: indices must be < m");
  at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty({B, O}, x.options());
  if (B == 0 || O == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nm_linear", [&] {
    nm_dispatch<scalar_t>(xc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                          ic.data_ptr<uint8_t>(), bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
                          y.data_ptr<scalar_t>(), B, O, KC, K, n, m);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastarch, CPU, m) { m.impl("nm_linear", &nm_linear_cpu); }

}  // namespace fastarch
