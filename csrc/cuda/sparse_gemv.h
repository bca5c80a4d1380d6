// CUDA entry points of the sparse GEMV family, bound into fastarch._C by csrc/ops.cpp. The op
// dispatcher's CUDA kernel is a Python chooser (Triton or these), see fastarch/ops/sparse_gemv.py.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace fastarch {
at::Tensor sparse_gemv_cuda(const at::Tensor& x, const at::Tensor& w_t,
                            const std::optional<at::Tensor>& bias, double threshold);
at::Tensor sparse_gemv_index_cuda(const at::Tensor& x, const at::Tensor& w_t,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& index);
at::Tensor gather_gemv_cuda(const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& bias, const at::Tensor& index);
at::Tensor sparse_mlp_cuda(const at::Tensor& x, const at::Tensor& w_in,
                           const std::optional<at::Tensor>& w_up, const at::Tensor& w_out_t,
                           const std::optional<at::Tensor>& b_in,
                           const std::optional<at::Tensor>& b_up,
                           const std::optional<at::Tensor>& b_out,
                           const std::optional<at::Tensor>& neuron_index, double threshold,
                           const std::string& activation);
}  // namespace fastarch
