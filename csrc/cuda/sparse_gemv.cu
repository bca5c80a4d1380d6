// CUDA kernels of the sparse GEMV family.
//
// rows_axpy: block (n-tile, k-split, b); each thread owns one output column and walks the rows of
// its k-split. The row's coefficient is the same for every thread of the block, so the skip is
// warp-uniform (no divergence) and a skipped row issues no weight load. Reads of w_t[row, n-tile]
// are coalesced. Partial sums from the k-splits meet in an fp32 buffer with atomicAdd; split-K
// keeps all SMs busy at batch 1, where there are only out/256 column tiles.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sparse_gemv.h"

namespace fastarch {
namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f32(c10::Half v) { return static_cast<float>(v); }

constexpr int kThreads = 256;

template <typename T, typename XT>
__global__ void rows_axpy_kernel(const XT* __restrict__ a, int64_t stride_a,
                                 const T* __restrict__ w, const int64_t* __restrict__ idx,
                                 float* __restrict__ y, int64_t K, int64_t N, int64_t k_per_split,
                                 float threshold, bool x_gather, bool use_threshold) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t b = blockIdx.z;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k1 = min(K, k0 + k_per_split);
  const XT* ab = a + b * stride_a;
  float acc = 0.f;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t row = idx ? idx[k] : k;
    const float v = to_f32(ab[x_gather ? row : k]);
    const bool keep = use_threshold ? (fabsf(v) > threshold) : (v != 0.f);
    if (keep && n < N) acc += v * to_f32(w[row * N + n]);
  }
  if (n < N && k1 > k0) atomicAdd(&y[b * N + n], acc);
}

template <typename T>
__global__ void mlp_hidden_kernel(const T* __restrict__ x, const T* __restrict__ w_in,
                                  const T* __restrict__ w_up, const T* __restrict__ b_in,
                                  const T* __restrict__ b_up, const int64_t* __restrict__ idx,
                                  float* __restrict__ h, int64_t K, int64_t IN, float threshold,
                                  int act, bool rows_only) {
  // one warp per (b, listed neuron); rows_only: plain dot products (gather_gemv)
  const int warps = blockDim.x / 32;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y;
  if (k >= K) return;
  const int64_t j = idx[k];
  const T* xb = x + b * IN;
  float g = 0.f;
  for (int64_t i = lane; i < IN; i += 32) g += to_f32(w_in[j * IN + i]) * to_f32(xb[i]);
  for (int off = 16; off > 0; off /= 2) g += __shfl_xor_sync(0xffffffff, g, off);
  if (b_in) g += to_f32(b_in[j]);
  if (rows_only) {
    if (lane == 0) h[b * K + k] = g;
    return;
  }
  switch (act) {
    case 0: g = g / (1.f + __expf(-g)); break;
    case 1: g = 0.5f * g * (1.f + erff(g * 0.70710678118654752f)); break;
    case 2: g = 0.5f * g * (1.f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g))); break;
    default: g = g > 0.f ? g : 0.f;
  }
  float v = 0.f;
  if (fabsf(g) > threshold) {  // warp-uniform: g is the same in every lane after the reduction
    v = g;
    if (w_up) {
      float u = 0.f;
      for (int64_t i = lane; i < IN; i += 32) u += to_f32(w_up[j * IN + i]) * to_f32(xb[i]);
      for (int off = 16; off > 0; off /= 2) u += __shfl_xor_sync(0xffffffff, u, off);
      if (b_up) u += to_f32(b_up[j]);
      v *= u;
    }
  }
  if (lane == 0) h[b * K + k] = v;
}

void check_cuda(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "fastarch: ", name,
              " must be on the device of x (", x.device(), "), got ", t.device());
}

int sm_count(const at::Tensor& x) {
  return at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
}

// y(B, N) fp32 = sum over k of coefficient(b, k) * w_t[row_k, :]
template <typename T, typename XT>
void launch_rows_axpy(const XT* a, int64_t stride_a, int64_t B, const T* w, const int64_t* idx,
                      int64_t K, int64_t N, float* y, float threshold, bool x_gather,
                      bool use_threshold, int sms) {
  if (B == 0 || N == 0 || K == 0) return;
  const int64_t n_tiles = (N + kThreads - 1) / kThreads;
  int64_t splits = std::max<int64_t>(1, (4 * sms + n_tiles * B - 1) / (n_tiles * B));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, K / 64));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t per = (K + splits - 1) / splits;
  dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(splits),
            static_cast<unsigned>(B));
  rows_axpy_kernel<T, XT><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      a, stride_a, w, idx, y, K, N, per, threshold, x_gather, use_threshold);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int act_code(const std::string& a) {
  if (a == "silu" || a == "swish") return 0;
  if (a == "gelu") return 1;
  if (a == "gelu_tanh" || a == "gelu_new" || a == "gelu_pytorch_tanh") return 2;
  if (a == "relu") return 3;
  TORCH_CHECK(false, "fastarch: activation must be one of silu, gelu, gelu_tanh, relu; got '", a,
              "'");
}

at::Tensor finish(at::Tensor y, const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

}  // namespace

at::Tensor sparse_gemv_cuda(const at::Tensor& x_in, const at::Tensor& w_t,
                            const std::optional<at::Tensor>& bias, double threshold) {
  TORCH_CHECK(x_in.dim() == 2 && w_t.dim() == 2 && x_in.size(1) == w_t.size(0),
              "fastarch: x must be (B, in) and w_t (in, out)");
  TORCH_CHECK(threshold >= 0, "fastarch: threshold must be >= 0, got ", threshold);
  check_cuda(w_t, x_in, "w_t");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), w = w_t.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = w.size(1);
  at::Tensor y = at::zeros({B, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_gemv_cuda",
                                  [&] {
    launch_rows_axpy<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), K, B, w.data_ptr<scalar_t>(),
                                         nullptr, K, N, y.data_ptr<float>(),
                                         static_cast<float>(threshold), true, true, sm_count(x));
  });
  return finish(y, bias, x);
}

at::Tensor sparse_gemv_index_cuda(const at::Tensor& x_in, const at::Tensor& w_t,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& index) {
  TORCH_CHECK(x_in.dim() == 2 && w_t.dim() == 2 && x_in.size(1) == w_t.size(0),
              "fastarch: x must be (B, in) and w_t (in, out)");
  check_cuda(w_t, x_in, "w_t");
  check_cuda(index, x_in, "index");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), w = w_t.contiguous(), idx = index.to(at::kLong).contiguous();
  const int64_t B = x.size(0), N = w.size(1);
  at::Tensor y = at::zeros({B, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_gemv_idx",
                                  [&] {
    launch_rows_axpy<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), x.size(1), B,
                                         w.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                                         idx.numel(), N, y.data_ptr<float>(), 0.f, true, false,
                                         sm_count(x));
  });
  return finish(y, bias, x);
}

at::Tensor gather_gemv_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                            const std::optional<at::Tensor>& bias, const at::Tensor& index) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "fastarch: x must be (B, in) and w (out, in)");
  check_cuda(w_in, x_in, "w");
  check_cuda(index, x_in, "index");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), idx = index.to(at::kLong).contiguous();
  const int64_t B = x.size(0), IN = x.size(1), K = idx.numel();
  at::Tensor y = at::zeros({B, K}, x.options().dtype(at::kFloat));
  if (B && K) {
    dim3 grid(static_cast<unsigned>((K + 7) / 8), static_cast<unsigned>(B));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gather_gemv",
                                    [&] {
      mlp_hidden_kernel<scalar_t><<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), nullptr, nullptr, nullptr,
          idx.data_ptr<int64_t>(), y.data_ptr<float>(), K, IN, 0.f, 0, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat).index_select(0, idx));
  return y.to(x.scalar_type());
}

at::Tensor sparse_mlp_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                           const std::optional<at::Tensor>& w_up, const at::Tensor& w_out_t,
                           const std::optional<at::Tensor>& b_in,
                           const std::optional<at::Tensor>& b_up,
                           const std::optional<at::Tensor>& b_out,
                           const std::optional<at::Tensor>& neuron_index, double threshold,
                           const std::string& activation) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && w_out_t.dim() == 2 &&
                  x_in.size(1) == w_in.size(1) && w_out_t.size(0) == w_in.size(0),
              "fastarch: x (B, hidden), w_in (inter, hidden), w_out_t (inter, out) expected");
  TORCH_CHECK(threshold >= 0, "fastarch: threshold must be >= 0, got ", threshold);
  check_cuda(w_in, x_in, "w_in");
  check_cuda(w_out_t, x_in, "w_out_t");
  const int act = act_code(activation);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), IN = x.size(1), N = w_out_t.size(1);
  at::Tensor idx = neuron_index.has_value()
                       ? neuron_index->to(at::kLong).contiguous()
                       : at::arange(w_in.size(0), x.options().dtype(at::kLong));
  const int64_t K = idx.numel();
  at::Tensor h = at::zeros({B, K}, x.options().dtype(at::kFloat));
  at::Tensor y = at::zeros({B, N}, x.options().dtype(at::kFloat));
  at::Tensor wi = w_in.contiguous(), wo = w_out_t.contiguous();
  at::Tensor wu = w_up.has_value() ? w_up->contiguous() : at::Tensor();
  at::Tensor bi = b_in.has_value() ? b_in->contiguous() : at::Tensor();
  at::Tensor bu = b_up.has_value() ? b_up->contiguous() : at::Tensor();
  if (B && K) {
    dim3 grid(static_cast<unsigned>((K + 7) / 8), static_cast<unsigned>(B));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_mlp",
                                    [&] {
      mlp_hidden_kernel<scalar_t><<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), wi.data_ptr<scalar_t>(),
          wu.defined() ? wu.data_ptr<scalar_t>() : nullptr,
          bi.defined() ? bi.data_ptr<scalar_t>() : nullptr,
          bu.defined() ? bu.data_ptr<scalar_t>() : nullptr, idx.data_ptr<int64_t>(),
          h.data_ptr<float>(), K, IN, static_cast<float>(threshold), act, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_rows_axpy<scalar_t, float>(h.data_ptr<float>(), K, B, wo.data_ptr<scalar_t>(),
                                        idx.data_ptr<int64_t>(), K, N, y.data_ptr<float>(), 0.f,
                                        false, false, sm_count(x));
    });
  }
  return finish(y, b_out, x);
}

}  // namespace fastarch
