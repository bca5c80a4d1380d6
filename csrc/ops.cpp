// The one list of fastarch operator schemas. Kernels register implementations per device in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu; fake (meta) kernels and the PyTorch references
// live in src/fastarch/ops/<family>.py.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef FASTARCH_WITH_CUDA
#include "cuda/sparse_gemv.h"
#endif

TORCH_LIBRARY(fastarch, m) {
  // ---- activation sparsity (sparse GEMV family) -------------------------------------------
  // y = (x * [|x| > threshold]) @ w_t + bias, with w_t input-major: (in_features, out_features).
  m.def("sparse_gemv(Tensor x, Tensor w_t, Tensor? bias, float threshold) -> Tensor");
  // y = x[:, index] @ w_t[index, :] + bias: only the listed input channels contribute.
  m.def("sparse_gemv_index(Tensor x, Tensor w_t, Tensor? bias, Tensor index) -> Tensor");
  // y[:, k] = x @ w[index[k], :] + bias[index[k]]: only the listed output rows, compact output.
  m.def("gather_gemv(Tensor x, Tensor w, Tensor? bias, Tensor index) -> Tensor");
  // Fused MLP over a neuron subset: h_j = act(x.w_in_j + b_in_j) [* (x.w_up_j + b_up_j)],
  // neuron j kept when it is listed (or no list) and |act(.)| > threshold;
  // y = sum_kept h_j * w_out_t[j, :] + b_out.
  m.def(
      "sparse_mlp(Tensor x, Tensor w_in, Tensor? w_up, Tensor w_out_t, Tensor? b_in, "
      "Tensor? b_up, Tensor? b_out, Tensor? neuron_index, float threshold, str activation) "
      "-> Tensor");

  // ---- attention variants (block-sparse attention family) ---------------------------------
  // Flash-style attention over the key/value tiles a block mask lists per query tile: "full"
  // tiles unmasked, "partial" tiles with the element mask (window/prefix/doc descriptor and
  // optional per-tile bitmaps), ALiBi / relative-position-bias / softcap score mods.
  // q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D); returns (out, lse fp32).
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, "
      "Tensor kv_indices, Tensor? full_kv_num_blocks, Tensor? full_kv_indices, "
      "Tensor? tile_masks, Tensor? tile_mask_index, Tensor? q_doc_ids, Tensor? kv_doc_ids, "
      "Tensor? alibi_slopes, Tensor? rel_bias, int block_size, int q_offset, int window_left, "
      "int window_right, int prefix_len, float scale, float softcap) -> (Tensor, Tensor)");
  // Its backward: (dq, dk, dv, drel_bias) from grad_out (and grad_lse), recomputing P tile by
  // tile; drel_bias has rel_bias's shape (an empty tensor when rel_bias is None).
  m.def(
      "block_sparse_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks, Tensor kv_indices, "
      "Tensor? full_kv_num_blocks, Tensor? full_kv_indices, Tensor? tile_masks, "
      "Tensor? tile_mask_index, Tensor? q_doc_ids, Tensor? kv_doc_ids, Tensor? alibi_slopes, "
      "Tensor? rel_bias, int block_size, int q_offset, int window_left, int window_right, "
      "int prefix_len, float scale, float softcap) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- structured pruning (N:M linear family) ---------------------------------------------
  // y = x @ W^T + bias with W N:M-sparse along the input: values (out, in*n/m) and their
  // positions inside each group of m, indices (out, in*n/m) uint8.
  m.def("nm_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, int n, int m) -> Tensor");
}

#ifdef FASTARCH_WITH_CPU
namespace fastarch {
std::string cpu_gemv_paths();  // csrc/cpu/sparse_gemv.cpp
std::string cpu_attention_paths();  // csrc/cpu/block_sparse_attention.cpp
bool cpu_attention_amx();
bool cpu_attention_grouped_decode();
}
#endif

namespace {
bool cuda_built() {
#ifdef FASTARCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastarch native kernels (the ops are registered in torch.ops.fastarch)";
  m.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled into this build");
  m.def("cpu_capability", []() {
#if defined(__AVX512F__)
    return std::string("avx512");
#elif defined(__AVX2__)
    return std::string("avx2");
#else
    return std::string("default");
#endif
  });
#ifdef FASTARCH_WITH_CPU  // (FASTARCH_CPU=0 builds the CUDA kernels alone)
  m.def("cpu_gemv_paths", &fastarch::cpu_gemv_paths,
        "the bf16 batch kernels of sparse_gemv usable here (bf16-dot, amx or widening)");
  m.def("cpu_attention_paths", &fastarch::cpu_attention_paths,
        "the tile products of the CPU attention prefill here (bf16: amx / bf16-dot / fp32-tiles; "
        "fp32: brgemm / avx2 / mkl)");
  m.def("cpu_attention_amx", &fastarch::cpu_attention_amx,
        "whether the CPU attention prefill runs bf16 tiles on AMX here");
  m.def("cpu_attention_grouped_decode", &fastarch::cpu_attention_grouped_decode,
        "whether CPU decode calls run GQA groups as units here (an AVX-512 build)");
#endif
#ifdef FASTARCH_WITH_CUDA
  // CUDA kernels are bound here; the dispatcher's CUDA entry is a Python chooser between these
  // and the Triton kernels (fastarch/ops/<family>.py).
  m.def("sparse_gemv_cuda", &fastarch::sparse_gemv_cuda);
  m.def("sparse_gemv_index_cuda", &fastarch::sparse_gemv_index_cuda);
  m.def("gather_gemv_cuda", &fastarch::gather_gemv_cuda);
  m.def("sparse_mlp_cuda", &fastarch::sparse_mlp_cuda);
#endif
}
