// CPU kernels of the block-sparse attention family (block_sparse_attention and its backward).
//
// Flash-style forward: the (Lq, Lk) score matrix is never formed. Work items are
// (batch, query head, query tile[, key split]); each walks the key/value tiles its block mask
// lists, keeping a running row max m, row sum l and an fp32 accumulator (online softmax). Tiles
// come in two lists (as in FlexAttention's BlockMask): "full" tiles need no element mask,
// "partial" tiles evaluate the element mask
//   allowed(q, kv) = (window_ok(kv - qpos) || kv < prefix_len) && same_doc(q, kv) && bitmap(q, kv)
// with qpos = q + q_offset, from a small descriptor (window, prefix, document ids) plus, for any
// other mask, a per-tile bitmap (tile_masks[tile_mask_index[...]]). No dense (Lq, Lk) mask exists.
// The two lists are walked merged in key order so that a run of consecutive tiles (full or
// partial) is one wider product.
//
// The two products of a tile, S = Q K^T and O += P V: in the prefill forward with AVX2 and head
// dims up to FASTARCH_ATTN_NN_MAX_D (default 96; measured: at D = 128 MKL is as fast), an
// in-place register-blocked kernel (gemm_nn) over a K^T the call transposes once; elsewhere
// MKL's sgemm when libtorch exports it (a weak symbol: the extension still loads without MKL
// and then uses the plain loops below).
// bf16/fp16 tiles are converted to fp32 scratch first (cost ~ 1/(4*block) of the flops).
//
// Decode (few query rows, few (b, h) items) splits the key tiles of an item over threads and merges
// the partial (m, l, acc) afterwards (flash-decoding). With AVX-512, a call of one query tile of up
// to 16 rows whose block mask the heads of each GQA group share runs as (batch, kv head) units
// instead, the group's query heads stacked as rows (decode_grouped_forward). The backward
// recomputes P tile by tile from the saved lse (see the comment above backward_item).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "aligned.h"
#include "convert.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#if defined(__AVX2__) && defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

extern "C" {
// Fortran BLAS sgemm (column-major), exported by MKL inside libtorch_cpu on x86 builds.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace fastarch {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Row sums l are tested as !(l <= 0): a row that saw a NaN score has l = NaN and must give NaN
// (as SDPA and the reference do), not the zeros of a row that saw nothing.


template <typename T>
inline void load_row_f32(const T* __restrict src, float* __restrict dst, int64_t n, float mul) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      uint32_t b = uint32_t(u[i]) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      dst[i] = f * mul;
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const _Float16* h = reinterpret_cast<const _Float16*>(src);
    int64_t i = 0;
#if defined(__AVX512F__)
    // vcvtph2ps, 16 at a time (gcc leaves the loop below scalar: an fp16 call took 1.4x the
    // fp32 one, a decode step 7x)
    const __m512 vm = _mm512_set1_ps(mul);
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(
                                                  reinterpret_cast<const __m256i*>(h + i))),
                                              vm));
#endif
    for (; i < n; ++i) dst[i] = float(h[i]) * mul;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * mul;
  }
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t n, float mul) {
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // round to nearest even, as c10 does
    const __m512 vm = _mm512_set1_ps(mul);
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i), vm)));
  }
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::Half>) {  // vcvtps2ph, round to nearest even
    const __m512 vm = _mm512_set1_ps(mul);
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(src + i), vm),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i] * mul);
}

// store_row with non-temporal stores where dst and n allow (fp32 rows on 64 bytes, bf16 rows on
// 32): the output is written once and not read again by the call, and a plain store first reads
// every line it misses. Returns false (nothing written) where they do not. The caller fences
// (_mm_sfence) before its results are read by another thread.
template <typename T>
inline bool store_row_stream(const float* __restrict src, T* __restrict dst, int64_t n,
                             float mul) {
#if defined(__AVX512F__)
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst);
  const __m512 vm = _mm512_set1_ps(mul);
  if constexpr (std::is_same_v<T, float>) {
    if (n % 16 != 0 || a % 64 != 0) return false;
    for (int64_t i = 0; i < n; i += 16)
      _mm512_stream_ps(dst + i, _mm512_mul_ps(_mm512_loadu_ps(src + i), vm));
    return true;
  }
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (n % 16 != 0 || a % 32 != 0) return false;
    for (int64_t i = 0; i < n; i += 16)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + i), vm)));
    return true;
  }
#endif
#endif
  (void)src, (void)dst, (void)n, (void)mul;
  return false;
}

// exp(x) for x <= ~88, vectorisable: 2^t = 2^round(t) * 2^f, |f| <= 1/2, Taylor degree 7
// (relative error ~1e-8 before rounding). Returns exactly 0 below 2^-126 (and for -inf).
inline float fast_exp(float x) {
  if (x != x) return x;  // NaN in, NaN out (a NaN score must reach the output, as in SDPA)
  float t = x * 1.4426950408889634f;
  t = t < -127.f ? -127.f : (t > 127.f ? 127.f : t);
  const float r = std::nearbyint(t);
  const float f = (t - r) * 0.6931471805599453f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t e = static_cast<int32_t>(r) + 127;
  const uint32_t bits = static_cast<uint32_t>(e < 1 ? 1 : e) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return r < -126.f ? 0.f : p * s;
}

// Row kernels of the online softmax, 8 lanes at a time with AVX2 + FMA (the same polynomial as
// fast_exp, so both paths give the same numbers); the compiler does not vectorise fast_exp's
// clamps, rounding and exponent bits by itself.
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp8(__m256 x) {
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  // (max / min return their second operand when one is NaN: t comes second, so NaN stays NaN)
  t = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-127.f), t));
  const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, r), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127));
  e = _mm256_max_epi32(e, _mm256_set1_epi32(1));
  const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  const __m256 under = _mm256_cmp_ps(r, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, sc));
}

inline float hmax8(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
#endif

#if defined(__AVX512F__)
// 2^t in 16 lanes, for the exp pass of the fp32 softmax rows (exp_sub_row; the bf16 P of
// exp_live_to_bf16 takes exp2_16_p3_nonpos below): 2^round(t) by scalef (exact) times a
// degree-5 polynomial for 2^f on [-1/2, 1/2], a relative-error fit (max 2.3e-7 in fp32, about
// 2 ulp; fast_exp's degree-7 series costs two multiply-adds and two multiplies more per 16
// scores, and with AVX-512 the softmax rows are much of what is left once the tile products run
// on AMX / oneDNN kernels).
// A mask zeroes what fast_exp flushes (round(t) < -126), so -inf gives 0; NaN stays NaN.
inline __m512 exp2_16_p5(__m512 t) {
  t = _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-127.f), t));
  const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, r);
  __m512 p = _mm512_set1_ps(1.3276471737320922e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541540091724e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713276093736e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022119720074633f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469670620412f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000716554334f));
  const __mmask16 keep = _mm512_cmp_ps_mask(r, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep, p, r);
}

// c3 f^3 + c2 f^2 + c1 f + c0 in 16 lanes
inline __m512 poly3_16(__m512 f, float c3, float c2, float c1, float c0) {
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(c3), f, _mm512_set1_ps(c2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c1));
  return _mm512_fmadd_ps(p, f, _mm512_set1_ps(c0));
}

// 2^t in 16 lanes for t <= 0 (or NaN, kept), at the precision of a bf16 P: a degree-3
// relative-error fit of 2^f (max 7.5e-5, a 26th of bf16's half ulp) and no clamps (the mask of
// an exponent e < -126 also zeroes -inf, whatever its f). Against a guessed reference t may be
// positive: 2^t then grows, up to inf, which the row sum's check catches (guessed_exp_ok).
// Four vector operations fewer than exp2_16_p5 per 16 scores (five with AVX512DQ) in the bf16
// exp pass, most of a sliding-window call's softmax.
inline __m512 exp2_16_p3_nonpos(__m512 t) {
#if defined(__AVX512DQ__)
  // f = t - floor(t) in [0, 1) in one step (vreduceps), and scalef takes floor(t) from t
  // itself: one vector operation fewer than rounding and subtracting. The fit on [0, 1) has
  // the same relative error (2^f on [0, 1) is 2^(1/2) 2^(f - 1/2)).
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 e = t;
  const __m512 p = poly3_16(f, 0.07802452f, 0.22606717f, 0.69583353f, 0.99992522f);
#else
  const __m512 e = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, e);  // in [-1/2, 1/2]
  const __m512 p = poly3_16(f, 0.05517098307609558f, 0.24260972440242767f, 0.6932609677314758f,
                            0.9999281764030457f);
#endif
  const __mmask16 keep = _mm512_cmp_ps_mask(e, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep, p, e);
}
#endif

// max(init, s[0..n))
inline float row_max(const float* __restrict s, int64_t n, float init) {
  int64_t j = 0;
  float mx = init;
#if defined(__AVX512F__)
  if (n >= 16) {
    // four independent maxima: one chain of vmaxps waits its latency per 16 scores (the row max
    // was ~17% of a bf16 sliding-window call on AMX, perf)
    __m512 m0 = _mm512_set1_ps(init), m1 = m0, m2 = m0, m3 = m0;
    for (; j + 64 <= n; j += 64) {
      m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
      m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
      m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + j + 32));
      m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + j + 48));
    }
    for (; j + 16 <= n; j += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
    if (j < n) {  // the tail in one masked load (lanes past n read as -inf); a sliding-window
                  // row's live columns are rarely a multiple of 16, and the scalar loop below
                  // was ~4% of an fp32 window call (perf)
      const __mmask16 k = __mmask16((1u << (n - j)) - 1);
      m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), k, s + j));
      j = n;
    }
    mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (n - j >= 8) {
    __m256 m = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
    mx = hmax8(m);
  }
#endif
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// s[j] = exp(s[j] - sub) for j < n; returns the sum of the new values.
inline float exp_sub_row(float* __restrict s, int64_t n, float sub) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  {
    // 2^((s - sub) log2 e) by the degree-5 fit (2.3e-7 relative, ~2 fp32 ulp: the rows' P
    // feeds an fp32 product whose own rounding is larger), the difference taken first so that
    // scores near the max lose nothing to cancellation; the tail in one masked step
    const __m512 vs = _mm512_set1_ps(sub), vl = _mm512_set1_ps(1.4426950408889634f);
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
      const __m512 e = exp2_16_p5(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vs), vl));
      _mm512_storeu_ps(s + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    if (j < n) {
      const __mmask16 k = __mmask16((1u << (n - j)) - 1);
      const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), k, s + j);
      const __m512 e = exp2_16_p5(_mm512_mul_ps(_mm512_sub_ps(x, vs), vl));
      _mm512_mask_storeu_ps(s + j, k, e);
      acc = _mm512_add_ps(acc, e);
      j = n;
    }
    sum = _mm512_reduce_add_ps(acc);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vs = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vs));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum += hsum8(acc);
#endif
  for (; j < n; ++j) {
    const float e = fast_exp(s[j] - sub);
    s[j] = e;
    sum += e;
  }
  return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
// C(m x n, ldc) (+)= A(m x k, lda) * B(k x n, ldb), all row-major, B read in place (no packing):
// R rows x 16 columns of C in 2R registers, A broadcast, B rows loaded 16 at a time. Used for
// S = Q K^T against a K^T the forward transposes once per call (B = K^T columns c0..), and for
// O += P V (B = V rows). MKL's sgemm packs both operands on every call, which at tile sizes
// (64 x 256 x 64) is a fifth of its time.
template <int R>
inline void nn_block(int n, int k, const float* __restrict a, int lda, const float* __restrict b,
                     int ldb, float* __restrict c, int ldc, bool accumulate) {
  for (int j0 = 0; j0 < n; j0 += 16) {
    const int rest = n - j0;
    __m256i m0, m1;
    const bool full = rest >= 16;
    if (!full) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), lane);
      m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest - 8), lane);
    }
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) {
      if (accumulate) {
        const float* cr = c + int64_t(r) * ldc + j0;
        acc[r][0] = full ? _mm256_loadu_ps(cr) : _mm256_maskload_ps(cr, m0);
        acc[r][1] = full ? _mm256_loadu_ps(cr + 8) : _mm256_maskload_ps(cr + 8, m1);
      } else {
        acc[r][0] = _mm256_setzero_ps();
        acc[r][1] = _mm256_setzero_ps();
      }
    }
    const float* bj = b + j0;
    if (full) {
      for (int kk = 0; kk < k; ++kk) {
        const __m256 b0 = _mm256_loadu_ps(bj + int64_t(kk) * ldb);
        const __m256 b1 = _mm256_loadu_ps(bj + int64_t(kk) * ldb + 8);
        for (int r = 0; r < R; ++r) {
          const __m256 av = _mm256_broadcast_ss(a + int64_t(r) * lda + kk);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
    } else {
      for (int kk = 0; kk < k; ++kk) {
        const __m256 b0 = _mm256_maskload_ps(bj + int64_t(kk) * ldb, m0);
        const __m256 b1 = _mm256_maskload_ps(bj + int64_t(kk) * ldb + 8, m1);
        for (int r = 0; r < R; ++r) {
          const __m256 av = _mm256_broadcast_ss(a + int64_t(r) * lda + kk);
          acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      float* cr = c + int64_t(r) * ldc + j0;
      if (full) {
        _mm256_storeu_ps(cr, acc[r][0]);
        _mm256_storeu_ps(cr + 8, acc[r][1]);
      } else {
        _mm256_maskstore_ps(cr, m0, acc[r][0]);
        _mm256_maskstore_ps(cr + 8, m1, acc[r][1]);
      }
    }
  }
}

inline void gemm_nn(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                    float* c, int ldc, bool accumulate) {
  int i = 0;
  for (; i + 6 <= m; i += 6)
    nn_block<6>(n, k, a + int64_t(i) * lda, lda, b, ldb, c + int64_t(i) * ldc, ldc, accumulate);
  const float* ai = a + int64_t(i) * lda;
  float* ci = c + int64_t(i) * ldc;
  switch (m - i) {
    case 5: nn_block<5>(n, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 4: nn_block<4>(n, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 3: nn_block<3>(n, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 2: nn_block<2>(n, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 1: nn_block<1>(n, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
}
constexpr bool kHaveNN = true;
#else
inline void gemm_nn(int, int, int, const float*, int, const float*, int, float*, int, bool) {}
constexpr bool kHaveNN = false;
#endif

// C(m x n, row-major, ldc) = A(m x k, lda) * B(n x k, ldb)^T      (S = Q K^T)
inline void gemm_abt(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                     float* c, int ldc) {
  if (sgemm_ != nullptr) {
    const float one = 1.f, zero = 0.f;
    // Column-major view: C^T (n x m) = B (n x k) * A^T.
    sgemm_("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
    return;
  }
  for (int i = 0; i < m; ++i) {
    const float* ai = a + int64_t(i) * lda;
    float* ci = c + int64_t(i) * ldc;
    for (int j = 0; j < n; ++j) {
      const float* bj = b + int64_t(j) * ldb;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < k; ++d) s += ai[d] * bj[d];
      ci[j] = s;
    }
  }
}

// C(m x n, ldc) += A(m x k, lda) * B(k x n, ldb)      (O += P V)
inline void gemm_ab_acc(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                        float* c, int ldc) {
  if (sgemm_ != nullptr) {
    const float one = 1.f;
    // Column-major view: C^T (n x m) += B^T (n x k) * A^T (k x m).
    sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &one, c, &ldc);
    return;
  }
  for (int i = 0; i < m; ++i) {
    const float* ai = a + int64_t(i) * lda;
    float* ci = c + int64_t(i) * ldc;
    for (int j = 0; j < k; ++j) {
      const float p = ai[j];
      if (p == 0.f) continue;
      const float* bj = b + int64_t(j) * ldb;
#pragma omp simd
      for (int d = 0; d < n; ++d) ci[d] += p * bj[d];
    }
  }
}

// C(m x n, ldc) += A(k x m, lda)^T * B(k x n, ldb)      (dV += P^T dO, dK += dS^T Q)
inline void gemm_atb_acc(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                         float* c, int ldc) {
  if (sgemm_ != nullptr) {
    const float one = 1.f;
    // Column-major view: C^T (n x m) += B^T (n x k) * A (k x m).
    sgemm_("N", "T", &n, &m, &k, &one, b, &ldb, a, &lda, &one, c, &ldc);
    return;
  }
  for (int kk = 0; kk < k; ++kk) {
    const float* ak = a + int64_t(kk) * lda;
    const float* bk = b + int64_t(kk) * ldb;
    for (int i = 0; i < m; ++i) {
      const float x = ak[i];
      if (x == 0.f) continue;
      float* ci = c + int64_t(i) * ldc;
#pragma omp simd
      for (int j = 0; j < n; ++j) ci[j] += x * bk[j];
    }
  }
}

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 block of 32-bit words: r[i] holds row i on entry and
// column i on return (unpack 32 / 64-bit, then two rounds of 128-bit lane shuffles).
inline void transpose16x16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}
#endif

// The bf16 exp pass against a guessed reference. The softmax only needs some reference r with
// every exp(s - r) in range, not the row max: the pass takes the previous row's lse (neighbouring
// rows of a tile score alike) or, on a row's later runs, the reference of its first, and keeps the
// result when the row sum lies in [2^-40, 2^40]. Then no exp overflowed, nothing that matters
// underflowed (an e below 2^-126 is under 2^-86 of the sum), the bf16 P keeps its relative
// precision and a later run needs no rescale of the accumulator. Otherwise (the guess was off by
// more than ~27 in the exponent, or the row saw nothing or a NaN) the row is redone against its
// max. This drops the max pass, a sixth of a window row's softmax. lse = r + log(l) holds for
// any r (the pair path never splits the keys of a row, so no merge sees r). The range costs
// headroom: P reaches 2^40, so P V overflows for |V| above ~2^80 (before, ~2^120).
// FASTARCH_ATTN_GUESSED_REF=0 always takes the max (tests compare the two).
inline bool guessed_exp_ok(float total) { return total >= 0x1p-40f && total <= 0x1p40f; }

// ln(x) to within ln 2 for a normal x > 0: the binary exponent (a guess needs no more)
inline float ln_approx(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return float(int((u >> 23) & 0xFFu) - 127) * 0.6931471805599453f;
}

bool attn_guessed_ref_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_ATTN_GUESSED_REF");
    return !(e && e[0] == '0');
  }();
  return on;
}

// O += P V on AMX by 32-row products at D = 128: oneDNN's kernel for a 64-row tile's 64 x 128
// output runs well below its rate at 32 rows (one thread, 320 keys: 4.8 vs 3.5 us per tile,
// /tmp micro-benchmark); 2 threads, S=4096, H=8, bf16, alternated: the window 7.5-7.7 ->
// 6.6-6.9 ms in 4 rounds of 5, causal 1-3% faster. At D = 64 it was 5% slower, at D = 80 / 96
// level, so they keep one product.
inline bool pv_by_32_rows(int64_t m, int64_t D) { return m > 32 && D >= 128; }

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define FASTARCH_ATTN_BF16_DOT 1

// bf16 tile products with vdpbf16ps (each fp32 lane adds a.even * b.even + a.odd * b.odd: two
// multiply-adds, twice an fp32 FMA): C (R x 16V) (+)= mul * sum_t bcast(a[r][t]) * b[t][0..16V),
// where a[r][t] and every lane of b[t] are bf16 pairs along the reduction. S = Q K^T takes Q rows
// as pairs along D and K in (D/2, bs) pair layout; O += P V takes P rows as pairs along the keys and
// V in (keys/2, D) pair layout. R x V accumulators stay in registers (R * V <= 24 of 32).
template <int R, int V>
inline void dp_block(int64_t kp, const uint32_t* __restrict a, int64_t lda,
                     const uint32_t* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc,
                     bool accumulate, float mul) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < kp; ++t) {
    __m512bh bv[V];
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + t * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + t]));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], bv[v], av);
    }
  }
  const __m512 vm = _mm512_set1_ps(mul);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(c + r * ldc + 16 * v, mul == 1.f ? acc[r][v] : _mm512_mul_ps(acc[r][v], vm));
}

template <int R, int V>
inline void dp_rows(int64_t m, int64_t kp, const uint32_t* a, int64_t lda, const uint32_t* b,
                    int64_t ldb, float* c, int64_t ldc, bool accumulate, float mul) {
  if constexpr (R > 1) {
    if (m < R) {
      dp_rows<R - 1, V>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul);
      return;
    }
  }
  dp_block<R, V>(kp, a, lda, b, ldb, c, ldc, accumulate, mul);
}

template <int V>
inline void dp_gemm_v(int64_t m, int64_t kp, const uint32_t* a, int64_t lda, const uint32_t* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate, float mul) {
  constexpr int R = std::max(1, std::min(6, 24 / V));
  for (int64_t i = 0; i < m; i += R)
    dp_rows<R, V>(std::min<int64_t>(R, m - i), kp, a + i * lda, lda, b, ldb, c + i * ldc, ldc,
                  accumulate, mul);
}

// C (m x n) for n a multiple of 16 up to 128.
inline void dp_gemm(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t lda,
                    const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
                    float mul) {
  switch (n / 16) {
    case 1: dp_gemm_v<1>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
    case 2: dp_gemm_v<2>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
    case 3: dp_gemm_v<3>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
    case 4: dp_gemm_v<4>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
    case 5: dp_gemm_v<5>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
    case 6: dp_gemm_v<6>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
    case 7: dp_gemm_v<7>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
    default: dp_gemm_v<8>(m, kp, a, lda, b, ldb, c, ldc, accumulate, mul); break;
  }
}

// The softmax rows of the pair path over their live columns [jl, jh) by aligned 16-lane steps:
// the first and last step masked, so that no load or store splits a cache line (a window row's
// live columns start one further per row, and the unaligned passes split most of theirs) and the
// P row's zeros around the live columns are whole vector stores (a memset call each, before).
// The lanes of a step at column j (a multiple of 16) that lie in [lo, hi).
inline __mmask16 live_lanes(int64_t j, int64_t lo, int64_t hi) {
  uint32_t k = 0xFFFFu;
  if (j < lo) k &= ~((1u << (lo - j)) - 1u);
  if (j + 16 > hi) k &= (1u << (hi - j)) - 1u;
  return __mmask16(k);
}

// max(init, s[jl .. jh)), s readable up to column (jh + 15) / 16 * 16 (rows on 64 bytes: the
// score rows are, so no step splits a line).
inline float row_max_live(const float* __restrict s, int64_t jl, int64_t jh, float init) {
  if (jl >= jh) return init;
  const int64_t j0 = jl & ~int64_t(15), jlast = (jh - 1) & ~int64_t(15);
  __m512 m0 = _mm512_set1_ps(init), m1 = m0, m2 = m0, m3 = m0;
  m0 = _mm512_mask_max_ps(m0, live_lanes(j0, jl, jh), m0, _mm512_loadu_ps(s + j0));
  if (jlast > j0) {
    m1 = _mm512_mask_max_ps(m1, live_lanes(jlast, jl, jh), m1, _mm512_loadu_ps(s + jlast));
    int64_t j = j0 + 16;
    for (; j + 48 < jlast; j += 64) {  // four chains: one waits its latency per step
      m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
      m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
      m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + j + 32));
      m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + j + 48));
    }
    for (; j < jlast; j += 16) m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + j));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

// The bf16 P row dst[0 .. npad): exp(mul * s[j] - sub) on [jl, jh), zeros elsewhere (dst rows
// writable up to a multiple of 16 past npad and past jh); returns the sum of the fp32 e.
inline float exp_live_to_bf16(const float* __restrict s, int64_t jl, int64_t jh, int64_t npad,
                              float mul, float sub, uint16_t* __restrict dst) {
  auto zeros = [dst](int64_t from, int64_t to) {
    for (int64_t j = from; j < to; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm256_setzero_si256());
  };
  if (jl >= jh) {
    zeros(0, npad);
    return 0.f;
  }
  constexpr float kLog2e = 1.4426950408889634f;
  const __m512 vm = _mm512_set1_ps(mul * kLog2e), vs = _mm512_set1_ps(sub * kLog2e);
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const int64_t j0 = jl & ~int64_t(15), jlast = (jh - 1) & ~int64_t(15);
  zeros(0, j0);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = j0; j <= jlast; j += 16) {
    // lanes off the live columns read as -inf: exp gives 0 there
    const __mmask16 k = j == j0 || j == jlast ? live_lanes(j, jl, jh) : __mmask16(0xFFFF);
    const __m512 x = _mm512_mask_loadu_ps(ninf, k, s + j);
    const __m512 e = exp2_16_p3_nonpos(_mm512_fmsub_ps(x, vm, vs));
    acc = _mm512_add_ps(acc, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  zeros(jlast + 16, npad);
  return _mm512_reduce_add_ps(acc);
}

// FASTARCH_ATTN_BF16_DOT=0: bf16 attention through fp32 tiles instead (comparisons, tests).
bool attn_bf16_dot_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_ATTN_BF16_DOT");
    return !(e && e[0] == '0');
  }();
  return on;
}
#endif

// oneDNN's batch-reduce GEMM micro-kernels, as libtorch exports them (at::native::cpublas::brgemm,
// the kernels of ATen's own CPU flash attention): on CPUs with AMX they run bf16 tile products
// on the tile unit, and their fp32 kernels use the full vector width. The Xeon host with AMX
// (2 cores, 2026-12-03, S=4096, H=8, D=64, the kernels below vs SDPA): bf16 causal took 3.3x
// SDPA's time (SDPA's flash kernel is on AMX; vdpbf16ps is not) and fp32 causal 1.6x (the AVX2
// register kernel uses half of AVX-512's width). /tmp micro-benchmark, one thread, 64-row tiles:
// brgemm bf16 220-1200 GFLOP/s (run to run on this VM; 300-700 typical), fp32 100-120 GFLOP/s.
//
// bf16 on AMX: oneDNN wants B in pairs along the reduction (VNNI), which is the layout the
// bf16-dot path already builds (K as (D/2, block) pairs, V as (keys/2, D) pairs), so the same
// regrouping feeds either kernel. A first call checks the layout on a small product against plain
// loops and turns the path off if they differ (a later oneDNN with another packed format).
// FASTARCH_ATTN_AMX=0 turns it off.
namespace cpublas = at::native::cpublas;

// C (m x n) = A (m x k) B (k x n) by brgemm and by plain loops, on fixed data: max |difference|
// relative to max |C|, or +inf when brgemm throws (not built with oneDNN's ukernels).
// B is read with leading dimension ldb >= n (pairs: (k/2, ldb) pairs, of which the first n of
// each row are used), as the forward reads a run of key tiles out of longer pair rows.
template <typename T>
double brgemm_self_check(int64_t m, int64_t n, int64_t k, bool pairs, int64_t ldb = 0) {
  if (ldb < n) ldb = n;
  std::vector<T> a(size_t(m * k)), b(size_t(k * n));
  std::vector<float> af(a.size()), bf(b.size()), c(size_t(m * n)), ref(size_t(m * n), 0.f);
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = T(float(int64_t(i * 7 % 13) - 6) / 8.f);
    af[i] = float(a[i]);
  }
  for (size_t i = 0; i < b.size(); ++i) {
    b[i] = T(float(int64_t(i * 5 % 11) - 5) / 4.f);
    bf[i] = float(b[i]);
  }
  // the unused columns past n hold a value that would show in C if they were read
  std::vector<T> bp(size_t(k * ldb), T(1000.f));
  for (int64_t t = 0; t < (pairs ? k / 2 : k); ++t)
    for (int64_t j = 0; j < n; ++j) {
      if (pairs)  // (k/2, ldb) pairs: bp[(t * ldb + j) * 2 + e] = b[(2t + e) * n + j]
        for (int e = 0; e < 2; ++e) bp[size_t((t * ldb + j) * 2 + e)] = b[size_t((2 * t + e) * n + j)];
      else
        bp[size_t(t * ldb + j)] = b[size_t(t * n + j)];
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t t = 0; t < k; ++t)
      for (int64_t j = 0; j < n; ++j) ref[size_t(i * n + j)] += af[size_t(i * k + t)] * bf[size_t(t * n + j)];
  try {
    cpublas::brgemm(m, n, k, k, ldb, n, false, a.data(), bp.data(), c.data(), pairs);
    cpublas::brgemm_release(pairs);
  } catch (const std::exception&) {
    return std::numeric_limits<double>::infinity();
  }
  double err = 0, mx = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    err = std::max(err, double(std::fabs(c[i] - ref[i])));
    mx = std::max(mx, double(std::fabs(ref[i])));
  }
  return err / std::max(mx, 1e-30);
}

#if defined(FASTARCH_ATTN_BF16_DOT)
bool attn_amx_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_ATTN_AMX");
    if (e && e[0] == '0') return false;
    bool pack = false;
    try {
      pack = cpublas::could_pack(at::kBFloat16);  // true where B must be in pairs: AMX
    } catch (const std::exception&) {
      return false;
    }
    // the products are exact in fp32 on these small integers over 8 / 4
    return pack && brgemm_self_check<at::BFloat16>(37, 64, 96, true) < 1e-6 &&
           brgemm_self_check<at::BFloat16>(37, 192, 64, true, 320) < 1e-6;
  }();
  return on;
}
#endif

// fp32 tile products by brgemm or by gemm_nn: measured once per process on the shapes of a
// 64-query tile (S = Q K^T at D = 64, O += P V over 256 keys), faster one taken. The Xeon host
// with AMX: brgemm. FASTARCH_ATTN_BRGEMM=0 / 1 forces either (1 still needs brgemm to work).
bool attn_f32_brgemm() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_ATTN_BRGEMM");
    if (e && e[0] == '0') return false;
    if (!(brgemm_self_check<float>(37, 64, 96, false) < 1e-6)) return false;
    if ((e && e[0] == '1') || !kHaveNN) return true;
    std::vector<float> a(64 * 256), b(256 * 64), c(64 * 64);
    for (size_t i = 0; i < a.size(); ++i) a[i] = float(i % 17) * 0.01f;
    for (size_t i = 0; i < b.size(); ++i) b[i] = float(i % 13) * 0.01f;
    auto best_of = [](auto&& fn) {
      double best = std::numeric_limits<double>::infinity();
      for (int round = 0; round < 5; ++round) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < 40; ++r) fn();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      return best;
    };
    const double t_brg = best_of([&] {
      cpublas::brgemm(64, 64, 64, 64, 64, 64, false, a.data(), b.data(), c.data(), false);
      cpublas::brgemm(64, 64, 256, 256, 64, 64, true, a.data(), b.data(), c.data(), false);
    });
    cpublas::brgemm_release(false);
    const double t_nn = best_of([&] {
      gemm_nn(64, 64, 64, a.data(), 64, b.data(), 64, c.data(), 64, false);
      gemm_nn(64, 64, 256, a.data(), 256, b.data(), 64, c.data(), 64, true);
    });
    return t_brg < t_nn;
  }();
  return on;
}

// FASTARCH_ATTN_RUN_KEYS: the most keys of consecutive tiles fused into one product (0 or unset:
// the defaults where Params::group is set).
int64_t attn_run_keys() {
  static const int64_t keys = [] {
    const char* e = std::getenv("FASTARCH_ATTN_RUN_KEYS");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(0);
  }();
  return keys;
}

// FASTARCH_ATTN_PAIRS_PER_HEAD=0: the bf16 K / V pairs by one call-wide pass before the tiles
// (block_sparse_attention_cpu) even where each thread could regroup its own heads.
bool attn_pairs_per_head() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_ATTN_PAIRS_PER_HEAD");
    return !(e && e[0] == '0');
  }();
  return on;
}

// Row length of the bf16 K pairs, (D/2) rows of every key of a (batch, kv head): the keys plus
// one cache line where that would be a multiple of 1 KiB, so that the 16 rows a register
// transpose stores to do not all fall in the same L1 sets.
inline int64_t kpairs_ld(int64_t keys) { return keys % 256 == 0 ? keys + 16 : keys; }

// Everything a work item needs, gathered once.
struct Params {
  int64_t B, Hq, Hkv, Lq, Lk, D, bs, Qt, Kt;
  int64_t q_offset, window_left, window_right, prefix_len;
  float scale, softcap;
  // strides (elements) of q, k, v over (b, h, l); the last dim is contiguous
  int64_t qs[3], ks[3], vs[3];
  // block mask: dims (Bm, Hm, Qt[, W]) with Bm in {1, B}, Hm in {1, Hq}
  int64_t Bm, Hm, W, Wf;
  int64_t group;  // most consecutive full tiles fused into one product
  const int32_t* num;
  const int32_t* idx;
  const int32_t* fnum;  // may be null
  const int32_t* fidx;
  const uint8_t* tile_masks;  // (P, bs, bs) or null
  const int32_t* tile_mask_index;  // (Bm, Hm, Qt, W) or null
  const int64_t* q_doc;  // (Bd, Lq) or null
  const int64_t* kv_doc;  // (Bd, Lk)
  int64_t Bd;
  const float* alibi;  // (Hq) or null
  const float* rel;  // relative position bias (Hq, 2 R + 1) or null
  int64_t rel_r;
  // Forward only, when set: K^T as fp32 tiles (B, Hkv, Kt, D, bs) (tile-major: rows of one
  // tile's K^T are bs floats apart, not Lk, which would alias in L1) and V as fp32
  // (B, Hkv, Lk, D) (V null when v is fp32 already: read in place), for gemm_nn.
  const float* kt_all = nullptr;
  const float* v32_all = nullptr;
  // Forward, bf16 with the bf16 dot instruction, when set: K as (B, Hkv, D/2, kpairs_ld(Kt * bs))
  // 32-bit pairs (K[j, 2t], K[j, 2t+1]) (the keys of consecutive tiles adjacent, so that a run of
  // tiles is one product) and V as (B, Hkv, vrows, D) 32-bit pairs (V[2u, d], V[2u+1, d]),
  // zero-padded, for brgemm on AMX or dp_gemm. With pairs per head, each thread's copy of the
  // Params points at its own buffers, and the call's own Params hold none.
  bool pairs = false;  // the bf16 pair products (Q read in place, scaled in S)
  const uint32_t* kp_all = nullptr;
  const uint32_t* vp_all = nullptr;
  int64_t kp_ld = 0;  // pairs per row of kp_all: kpairs_ld(Kt * bs)
  int64_t vrows = 0;  // rows of pairs per (batch, kv head) in vp_all (a multiple of 16)
  // words from one (batch, kv head) of kp_all / vp_all to the next: (D/2) kp_ld and vrows D, or
  // 0 where a thread holds the pairs of one (batch, kv head) at a time (pairs_per_head)
  int64_t kp_stride = 0, vp_stride = 0;
  bool amx = false;   // the pair products by brgemm on AMX tiles (pairs set)
  bool brg32 = false;  // the fp32 tile products (kt_all set) by brgemm instead of gemm_nn
};

// The K and V rows [c0, c0 + n) of one (batch, kv-head) as fp32 for the tile GEMMs: read in place
// when the storage is fp32, else widened into kbuf / vbuf (n x D each).
struct KVTile {
  const float* k;
  const float* v;
  int64_t ldk, ldv;
};

template <typename T>
inline KVTile stage_kv_tile(const Params& p, const T* kb, const T* vb, int64_t c0, int64_t n,
                            int64_t D, float* kbuf, float* vbuf) {
  if constexpr (std::is_same_v<T, float>) {
    return {kb + c0 * p.ks[2], vb + c0 * p.vs[2], p.ks[2], p.vs[2]};
  } else {
    for (int64_t j = 0; j < n; ++j) {
      load_row_f32<T>(kb + (c0 + j) * p.ks[2], kbuf + j * D, D, 1.f);
      load_row_f32<T>(vb + (c0 + j) * p.vs[2], vbuf + j * D, D, 1.f);
    }
    return {kbuf, vbuf, D, D};
  }
}

// Softcap and ALiBi on one score row: query row qi, key columns c0 .. c0 + n - 1. tanh_out
// (backward) receives tanh(s / cap).
inline void score_mods_row(const Params& p, float* __restrict s, int64_t n, int64_t qi,
                           int64_t c0, float slope, const float* relh,
                           float* __restrict tanh_out) {
  const int64_t qpos = qi + p.q_offset;
  if (p.softcap > 0) {
    const float cap = p.softcap, inv_cap = 1.f / p.softcap;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      // tanh(x) = 1 - 2 / (exp(2x) + 1), which cancels for small |x| (a cap of 1e6 over scores
      // of ~10 lost all but a few bits): there the odd series to x^9 (error < 6e-8 relative
      // below 0.3)
      const float x = s[j] * inv_cap, x2 = x * x;
      const float series =
          x * (1.f + x2 * (-1.f / 3 + x2 * (2.f / 15 + x2 * (-17.f / 315 + x2 * (62.f / 2835)))));
      const float th = std::fabs(x) < 0.3f ? series : 1.f - 2.f / (fast_exp(2.f * x) + 1.f);
      s[j] = cap * th;
      if (tanh_out) tanh_out[j] = th;
    }
  }
  if (slope != 0.f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] += slope * float(c0 + j - qpos);
  }
  if (relh != nullptr) {  // bias of the clipped distance kv - q, in [-R, R]
    const int64_t R = p.rel_r;
    for (int64_t j = 0; j < n; ++j) s[j] += relh[std::clamp<int64_t>(c0 + j - qpos, -R, R) + R];
  }
}

// The element mask of a partial tile on one score row (s[j] = -inf where not allowed).
// The columns [jlo, jhi) of keys c0 .. c0 + n - 1 that query row qi's window allows (all n
// without a window).
inline std::pair<int64_t, int64_t> window_cols(const Params& p, int64_t qi, int64_t c0, int64_t n) {
  const int64_t qpos = qi + p.q_offset;
  const int64_t big = int64_t(1) << 40;
  const int64_t lo = p.window_left < 0 ? -big : qpos - p.window_left;
  const int64_t hi = p.window_right < 0 ? big : qpos + p.window_right;
  const int64_t jlo = std::clamp<int64_t>(lo - c0, 0, n);
  return {jlo, std::clamp<int64_t>(hi - c0 + 1, jlo, n)};
}

inline void mask_row(const Params& p, float* __restrict s, int64_t n, int64_t qi, int64_t c0,
                     const uint8_t* bmr, int64_t bd) {
  // Window (or prefix): the allowed columns are [jlo, jhi) plus [0, jpre).
  const auto [jlo, jhi] = window_cols(p, qi, c0, n);
  const int64_t jpre = std::clamp<int64_t>(p.prefix_len - c0, 0, n);
  for (int64_t j = jpre; j < jlo; ++j) s[j] = kNegInf;
  for (int64_t j = std::max(jhi, jpre); j < n; ++j) s[j] = kNegInf;
  if (p.q_doc) {
    const int64_t qd = p.q_doc[bd * p.Lq + qi];
    const int64_t* kd = p.kv_doc + bd * p.Lk + c0;
    for (int64_t j = 0; j < n; ++j)
      if (kd[j] != qd) s[j] = kNegInf;
  }
  if (bmr) {
    for (int64_t j = 0; j < n; ++j)
      if (!bmr[j]) s[j] = kNegInf;
  }
}

// The tiles of one block-mask row in key order: (tile index, slot in the partial list or -1).
inline int64_t merged_tiles(const Params& p, int64_t row, std::vector<int64_t>& kts,
                            std::vector<int64_t>& slots) {
  const int64_t nf = p.fnum ? p.fnum[row] : 0, np = p.num[row];
  kts.resize(size_t(nf + np));
  slots.resize(size_t(nf + np));
  int64_t a = 0, b = 0, o = 0;
  while (a < nf || b < np) {
    const int64_t fa = a < nf ? p.fidx[row * p.Wf + a] : INT64_MAX;
    const int64_t pb = b < np ? p.idx[row * p.W + b] : INT64_MAX;
    if (fa <= pb) {
      kts[o] = fa;
      slots[o++] = -1;
      ++a;
    } else {
      kts[o] = pb;
      slots[o++] = b++;
    }
  }
  return o;
}

// One (b, h, q tile) walks tiles [t0, t1) of its row (full and partial tiles merged in key order),
// leaving the unnormalised accumulator acc (m x D), the row reference mrow (the row max, or on
// the bf16 pair path a guessed reference: guessed_exp_ok) and row sum lrow relative to it.
template <typename T>
void attend_tiles(const Params& p, const T* q, const T* k, const T* v, int64_t b, int64_t h,
                  int64_t qt, int64_t t0, int64_t t1, float* qbuf, float* kbuf, float* vbuf,
                  float* sbuf, float* acc, float* mrow, float* lrow) {
  const int64_t D = p.D, bs = p.bs;
  const int64_t r0 = qt * bs, m = std::min(bs, p.Lq - r0);
  const int64_t hk = h / (p.Hq / p.Hkv);
  const T* qb = q + b * p.qs[0] + h * p.qs[1];
  const T* kb = k + b * p.ks[0] + hk * p.ks[1];
  const T* vb = v + b * p.vs[0] + hk * p.vs[1];
  const bool dot = p.pairs;
  if (!dot) {
    for (int64_t i = 0; i < m; ++i)
      load_row_f32<T>(qb + (r0 + i) * p.qs[2], qbuf + i * D, D, p.scale);
  }
  std::fill(acc, acc + m * D, 0.f);
  std::fill(mrow, mrow + m, kNegInf);
  std::fill(lrow, lrow + m, 0.f);

  const int64_t bm = p.Bm == 1 ? 0 : b, hm = p.Hm == 1 ? 0 : h;
  const int64_t row = (bm * p.Hm + hm) * p.Qt + qt;
  const float slope = p.alibi ? p.alibi[h] : 0.f;
  const float* relh = p.rel ? p.rel + h * (2 * p.rel_r + 1) : nullptr;
  const int64_t bd = p.Bd == 1 ? 0 : b;

  const int64_t ldS = (p.group + 1) * bs;  // row stride of the score buffer (longest run)
  thread_local std::vector<int64_t> kts, slots;
  merged_tiles(p, row, kts, slots);
  for (int64_t t = t0; t < t1;) {
    const int64_t kt = kts[t];
    // A run of consecutive key tiles is one wider product (fewer, larger GEMMs); the element
    // mask is applied to the partial tiles of the run only.
    int64_t g = 1;
    while (g < p.group && t + g < t1 && kts[t + g] == kt + g) ++g;
    // A lone tile right after a full run joins it (the buffers hold group + 1 tiles): a run of its
    // own would cost a second pass over the accumulator for a 1-tile-deep P V product. A sliding
    // window row (5 tiles at window 256, block 64, D 64) is then one run instead of 4 + 1.
    if (g == p.group && t + g < t1 && kts[t + g] == kt + g &&
        (t + g + 1 == t1 || kts[t + g + 1] != kt + g + 1))
      ++g;
    const int64_t tfirst = t;
    t += g;
    const int64_t c0 = kt * bs, n = std::min(g * bs, p.Lk - c0);
    const float* vp = nullptr;
    int64_t ldv = 0;
    // The live columns of a row, [jl, jh): with a window and no prefix inside the run, every
    // column outside the window that is not in a full tile is a partial tile's masked one, so
    // the row max and the exp pass skip it and its P is zero (a 256-key window row spans 320
    // keys of 64-key tiles; the diagonal tile of a causal row is half masked).
    const bool ranged = (p.window_left >= 0 || p.window_right >= 0) && p.prefix_len <= c0;
    int64_t full_lo = n, full_hi = 0;  // the columns of the run's full tiles
    if (ranged) {
      for (int64_t u = 0; u < g; ++u)
        if (slots[tfirst + u] < 0) {
          full_lo = std::min(full_lo, u * bs);
          full_hi = std::max(full_hi, std::min(n, (u + 1) * bs));
        }
    }
    // (the window's own columns of the row, and the live ones)
    auto window_and_live_cols = [&](int64_t i) {
      using Cols = std::pair<int64_t, int64_t>;
      if (!ranged) return std::pair<Cols, Cols>{{0, n}, {0, n}};
      const Cols w = window_cols(p, r0 + i, c0, n);
      Cols live = w;
      if (full_lo < full_hi) live = {std::min(w.first, full_lo), std::max(w.second, full_hi)};
      return std::pair<Cols, Cols>{w, live};
    };
    auto live_cols = [&](int64_t i) { return window_and_live_cols(i).second; };
    // fp32 products of a windowed run by blocks of kRowBlock rows, each over the columns some
    // row of the block sees (rounded out to 16 for aligned rows): a 64-row tile's window rows
    // cover 320 columns between them, a 32-row block's 288, so the products skip the dead
    // corners of the two partial tiles (~10% of their multiply-adds at window 256).
    constexpr int64_t kRowBlock = 32;
    const bool blocked = ranged && !dot && p.kt_all != nullptr && m > kRowBlock;
    // and O += P V of the bf16 pair path on AMX by such blocks (pv_by_32_rows)
    const bool pv_blocked = dot && p.amx && pv_by_32_rows(m, D);
    static_assert(kRowBlock == 32, "pv_by_32_rows splits by kRowBlock rows");
    std::array<std::pair<int64_t, int64_t>, 256 / kRowBlock> cols_of_block{};  // (bs <= 256)
    if (blocked || (ranged && pv_blocked)) {
      for (int64_t a = 0; a < m; a += kRowBlock) {
        int64_t lo = n, hi = 0;
        for (int64_t i = a; i < std::min(m, a + kRowBlock); ++i) {
          const auto [jl, jh] = live_cols(i);
          if (jl < jh) lo = std::min(lo, jl), hi = std::max(hi, jh);
        }
        cols_of_block[size_t(a / kRowBlock)] =
            lo >= hi ? std::pair<int64_t, int64_t>{0, 0}
                     : std::pair<int64_t, int64_t>{lo / 16 * 16, std::min(n, (hi + 15) / 16 * 16)};
      }
    }
    auto block_cols = [&](int64_t a) { return cols_of_block[size_t(a / kRowBlock)]; };
#if defined(FASTARCH_ATTN_BF16_DOT)
    if (dot) {
      const int64_t bh = b * p.Hkv + hk;
      const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qb + r0 * p.qs[2]);
      const int64_t lkp = p.kp_ld;
      const uint32_t* kpairs = p.kp_all + bh * p.kp_stride + c0;
      if (p.amx) {  // unscaled: the scale is applied with the score mods
        const auto* qa = reinterpret_cast<const at::BFloat16*>(q32);
        // the run's keys are adjacent columns of the pair rows: one product for all g tiles
        cpublas::brgemm(m, g * bs, D, p.qs[2], lkp, ldS, false, qa,
                        reinterpret_cast<const at::BFloat16*>(kpairs), sbuf, true);
      } else {
        for (int64_t u = 0; u < g; ++u)
          dp_gemm(m, bs, D / 2, q32, p.qs[2] / 2, kpairs + u * bs, lkp, sbuf + u * bs, ldS,
                  false, p.scale);
      }
    } else
#endif
    if (p.kt_all != nullptr) {
      const int64_t bh = b * p.Hkv + hk;
      for (int64_t u = 0; u < g; ++u) {
        const int64_t nu = std::min(bs, p.Lk - c0 - u * bs);
        const float* ktu = p.kt_all + ((bh * p.Kt + kt + u) * D) * bs;
        // this tile's columns that each row block computes; one product of all m rows where
        // every block needs the whole tile (full tiles: one oneDNN call, not one per block)
        bool whole = !blocked;
        if (blocked) {
          whole = true;
          for (int64_t a = 0; a < m && whole; a += kRowBlock) {
            const auto [lo, hi] = block_cols(a);
            whole = lo <= u * bs && hi >= u * bs + nu;
          }
        }
        for (int64_t a = 0; a < m; a += whole ? m : kRowBlock) {
          const int64_t mh = whole ? m : std::min(kRowBlock, m - a);
          int64_t jl = 0, jh = nu;
          if (!whole) {
            const auto [lo, hi] = block_cols(a);
            jl = std::clamp<int64_t>(lo - u * bs, 0, nu);
            jh = std::clamp<int64_t>(hi - u * bs, jl, nu);
            if (jl == jh) continue;
          }
          float* sa = sbuf + a * ldS + u * bs + jl;
          if (p.brg32)
            cpublas::brgemm(mh, jh - jl, D, D, bs, ldS, false, qbuf + a * D, ktu + jl, sa, false);
          else
            gemm_nn(int(mh), int(jh - jl), int(D), qbuf + a * D, int(D), ktu + jl, int(bs), sa,
                    int(ldS), false);
        }
      }
      if (p.v32_all != nullptr) {
        vp = p.v32_all + (bh * p.Lk + c0) * D;
        ldv = D;
      } else {
        vp = reinterpret_cast<const float*>(vb) + c0 * p.vs[2];
        ldv = p.vs[2];
      }
    } else {
      const KVTile kv = stage_kv_tile<T>(p, kb, vb, c0, n, D, kbuf, vbuf);
      vp = kv.v;
      ldv = kv.ldv;
      gemm_abt(int(m), int(n), int(D), qbuf, int(D), kv.k, int(kv.ldk), sbuf, int(ldS));
    }

    // AMX scores come unscaled: without score mods the scale goes into the exponent (one pass
    // less over the row), else it is applied first.
    const bool mods = p.softcap > 0 || slope != 0.f || relh != nullptr;
    const float mul = p.amx && !mods && p.scale > 0 ? p.scale : 1.f;
#if defined(FASTARCH_ATTN_BF16_DOT)
    // bf16 P for the pair product, written by the exp pass: rows ldp apart, even, with room for
    // the odd key's zero pair; for brgemm the reduction is padded with zero keys to a multiple
    // of 32 (oneDNN's kernels are several times slower on other tails: 300 keys 500 GFLOP/s,
    // 288 keys 1100, /tmp micro-benchmark)
    thread_local aligned_vector<uint16_t> pbf;
    const int64_t ldp = (ldS + 2 + 31) / 32 * 32;
    const int64_t npad = p.amx ? (n + 31) / 32 * 32 : n + (n & 1);
    if (dot) pbf.resize(size_t(bs * ldp));
#endif
    const bool lazy = dot && attn_guessed_ref_enabled();
    float guess = kNegInf;  // the next row's reference: this row's lse (-inf: none yet)
    // a row's lse as the next row's guess, where its sum passes the check
    auto lse_guess = [](float m, float l) {
      return guessed_exp_ok(l) ? m + ln_approx(l) : kNegInf;
    };
    for (int64_t i = 0; i < m; ++i) {
      float* s = sbuf + i * ldS;
      const auto [wcols, lcols] = window_and_live_cols(i);
      const auto [jl, jh] = lcols;
      // scale and score mods on the live columns only (the passes below read no others)
      if (p.amx && mul == 1.f && p.scale != 1.f) {
        const float sc = p.scale;
#pragma omp simd
        for (int64_t j = jl; j < jh; ++j) s[j] *= sc;
      }
      if (jl < jh) score_mods_row(p, s + jl, jh - jl, r0 + i, c0 + jl, slope, relh, nullptr);
      // the live columns are the window's own (the run's full tiles inside it, as a block mask
      // made from the window has them)
      const bool live_is_window = ranged && lcols == wcols;
      for (int64_t u = 0; u < g; ++u) {
        const int64_t slot = slots[tfirst + u];
        if (slot < 0) continue;
        const int64_t cu = c0 + u * bs, nu = std::min(bs, p.Lk - cu);
        const uint8_t* bmr = nullptr;
        if (p.tile_mask_index != nullptr) {
          const int32_t ti = p.tile_mask_index[row * p.W + slot];
          if (ti >= 0) bmr = p.tile_masks + (int64_t(ti) * bs + i) * bs;
        }
        // what a window alone masks lies outside [jl, jh), which the passes below skip
        if (bmr == nullptr && p.q_doc == nullptr && live_is_window) continue;
        mask_row(p, s + u * bs, nu, r0 + i, cu, bmr, bd);
      }
      // a row's first run: alpha = 0, and its accumulator holds only zeros (or NaN, from 0 * inf
      // in V), which scaling by 0 would leave as they are
      const bool first = mrow[i] == kNegInf;
      float mx;
#if defined(FASTARCH_ATTN_BF16_DOT)
      if (dot && lazy) {
        // The exp pass against a guessed reference instead of the row max (guessed_exp_ok)
        const float ref = first ? guess : mrow[i];
        if (ref != kNegInf) {
          const float sum = exp_live_to_bf16(s, jl, jh, npad, mul, ref, pbf.data() + i * ldp);
          const float total = lrow[i] + sum;  // (0, or the NaN of a run that saw one)
          if (guessed_exp_ok(total)) {
            lrow[i] = total;
            mrow[i] = ref;
            guess = lse_guess(ref, total);
            continue;
          }
        }
      }
      if (dot)
        mx = mul == 1.f ? row_max_live(s, jl, jh, mrow[i])
                        : std::max(mrow[i], mul * row_max_live(s, jl, jh, kNegInf));
      else
#endif
        mx = mul == 1.f ? row_max(s + jl, jh - jl, mrow[i])
                        : std::max(mrow[i], mul * row_max(s + jl, jh - jl, kNegInf));
      const float mref = mx == kNegInf ? 0.f : mx;
      const float alpha = first ? 0.f : fast_exp(mrow[i] - mref);
      float sum;
#if defined(FASTARCH_ATTN_BF16_DOT)
      if (dot) {
        sum = exp_live_to_bf16(s, jl, jh, npad, mul, mref, pbf.data() + i * ldp);
      } else
#endif
      {
        sum = exp_sub_row(s + jl, jh - jl, mref);
        std::fill(s, s + jl, 0.f);
        std::fill(s + jh, s + n, 0.f);
      }
      lrow[i] = lrow[i] * alpha + sum;
      mrow[i] = mx;
      if (lazy) guess = lse_guess(mref, lrow[i]);
      if (alpha != 1.f && !first) {
        float* a = acc + i * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
#if defined(FASTARCH_ATTN_BF16_DOT)
    if (dot) {
      const int64_t bh = b * p.Hkv + hk;
      const uint32_t* vpairs = p.vp_all + bh * p.vp_stride + (c0 / 2) * D;
      if (pv_blocked) {
        // kRowBlock rows a product, each over the keys its rows see (block_cols, rounded out
        // to 32: P is zero past a row's live columns)
        for (int64_t a = 0; a < m; a += kRowBlock) {
          const int64_t mh = std::min(kRowBlock, m - a);
          int64_t lo = 0, hi = npad;
          if (ranged) {
            const auto [cl, ch] = block_cols(a);
            if (cl == ch) continue;  // rows that see nothing: P is zero
            lo = cl / 32 * 32;
            hi = std::min(npad, (ch + 31) / 32 * 32);
          }
          cpublas::brgemm(mh, D, hi - lo, ldp, D, D, true,
                          reinterpret_cast<const at::BFloat16*>(pbf.data() + a * ldp + lo),
                          reinterpret_cast<const at::BFloat16*>(vpairs + (lo / 2) * D),
                          acc + a * D, true);
        }
      } else if (p.amx)
        cpublas::brgemm(m, D, npad, ldp, D, D, true,
                        reinterpret_cast<const at::BFloat16*>(pbf.data()),
                        reinterpret_cast<const at::BFloat16*>(vpairs), acc, true);
      else
        dp_gemm(m, D, npad / 2, reinterpret_cast<const uint32_t*>(pbf.data()), ldp / 2, vpairs, D,
                acc, D, true, 1.f);
      continue;
    }
#endif
    if (blocked) {
      for (int64_t a = 0; a < m; a += kRowBlock) {
        const int64_t mh = std::min(kRowBlock, m - a);
        const auto [lo, hi] = block_cols(a);
        if (lo == hi) continue;
        const float* pa = sbuf + a * ldS + lo;
        if (p.brg32)
          cpublas::brgemm(mh, D, hi - lo, ldS, ldv, D, true, pa, vp + lo * ldv, acc + a * D,
                          false);
        else
          gemm_nn(int(mh), int(D), int(hi - lo), pa, int(ldS), vp + lo * ldv, int(ldv),
                  acc + a * D, int(D), true);
      }
    } else if (p.brg32)
      cpublas::brgemm(m, D, n, ldS, ldv, D, true, sbuf, vp, acc, false);
    else if (p.kt_all != nullptr)
      gemm_nn(int(m), int(D), int(n), sbuf, int(ldS), vp, int(ldv), acc, int(D), true);
    else
      gemm_ab_acc(int(m), int(D), int(n), sbuf, int(ldS), vp, int(ldv), acc, int(D));
  }
}

void check_mask_tensor(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.dim() == dims, "fastarch: ", name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, "fastarch: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fastarch: ", name, " must be on the CPU like q");
}

// The checked, contiguous inputs of a call and the Params pointing into them.
struct Prepared {
  Params p{};
  at::Tensor q, k, v, num, idx, fnum, fidx, tm, tmi, qd, kd, al, rel;
  int64_t max_tiles = 0;
};

void prepare(Prepared& pr, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const std::optional<at::Tensor>& tile_masks,
    const std::optional<at::Tensor>& tile_mask_index, const std::optional<at::Tensor>& q_doc_ids,
    const std::optional<at::Tensor>& kv_doc_ids, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& rel_bias,
    int64_t block_size, int64_t q_offset, int64_t window_left, int64_t window_right,
    int64_t prefix_len, double scale, double softcap) {
  Params& p = pr.p;
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "fastarch: q, k, v must be 4-D (B, H, L, D), got ", q_in.sizes(), ", ",
              k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "fastarch: q, k, v must share a dtype");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16 ||
                  q_in.scalar_type() == at::kHalf,
              "fastarch: q must be float32, bfloat16 or float16, got ", q_in.scalar_type());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Lk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B, "fastarch: k and v must have batch ", B);
  TORCH_CHECK(v_in.size(1) == Hkv && v_in.size(2) == Lk, "fastarch: v must have the heads and ",
              "length of k, got ", v_in.sizes(), " and ", k_in.sizes());
  TORCH_CHECK(k_in.size(3) == D && v_in.size(3) == D, "fastarch: q, k, v must share the head dim");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fastarch: query heads (", Hq,
              ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(D >= 1, "fastarch: the head dim (q.size(3)) must be >= 1, got ", D);
  TORCH_CHECK(block_size >= 1 && block_size <= 256, "fastarch: block_size must be in [1, 256]");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap),
              "fastarch: softcap must be finite and >= 0, got ", softcap);
  TORCH_CHECK(std::isfinite(scale), "fastarch: scale must be finite, got ", scale);
  // positions are int64 sums of these and of lengths: keep them far from overflow
  constexpr int64_t kPosLimit = int64_t(1) << 40;
  for (auto [v, n] : {std::pair<int64_t, const char*>{q_offset, "q_offset"},
                      {window_left, "window_left"}, {window_right, "window_right"},
                      {prefix_len, "prefix_len"}}) {
    TORCH_CHECK(v > -kPosLimit && v < kPosLimit, "fastarch: ", n, " = ", v,
                " is outside (-2^40, 2^40)");
  }
  const int64_t bs = block_size;
  const int64_t Qt = (Lq + bs - 1) / bs, Kt = (Lk + bs - 1) / bs;

  auto last_contig = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  pr.q = last_contig(q_in);
  pr.k = last_contig(k_in);
  pr.v = last_contig(v_in);
  const at::Tensor &q = pr.q, &k = pr.k, &v = pr.v;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D; p.bs = bs; p.Qt = Qt; p.Kt = Kt;
  p.q_offset = q_offset; p.window_left = window_left; p.window_right = window_right;
  p.prefix_len = prefix_len; p.scale = float(scale); p.softcap = float(softcap);
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q.stride(i);
    p.ks[i] = k.stride(i);
    p.vs[i] = v.stride(i);
  }

  check_mask_tensor(kv_num_blocks, "kv_num_blocks", 3);
  check_mask_tensor(kv_indices, "kv_indices", 4);
  const int64_t Bm = kv_num_blocks.size(0), Hm = kv_num_blocks.size(1);
  TORCH_CHECK((Bm == 1 || Bm == B) && (Hm == 1 || Hm == Hq) && kv_num_blocks.size(2) == Qt,
              "fastarch: kv_num_blocks must have shape (1 or ", B, ", 1 or ", Hq, ", ", Qt,
              ") for Lq=", Lq, " and block_size=", bs, ", got ", kv_num_blocks.sizes());
  TORCH_CHECK(kv_indices.size(0) == Bm && kv_indices.size(1) == Hm && kv_indices.size(2) == Qt,
              "fastarch: kv_indices must have shape (", Bm, ", ", Hm, ", ", Qt, ", W), got ",
              kv_indices.sizes());
  at::Tensor& num = pr.num = kv_num_blocks.contiguous();
  at::Tensor& idx = pr.idx = kv_indices.contiguous();
  at::Tensor &fnum = pr.fnum, &fidx = pr.fidx;
  TORCH_CHECK(full_kv_num_blocks.has_value() == full_kv_indices.has_value(),
              "fastarch: full_kv_num_blocks and full_kv_indices must be given together");
  if (full_kv_num_blocks.has_value()) {
    check_mask_tensor(*full_kv_num_blocks, "full_kv_num_blocks", 3);
    check_mask_tensor(*full_kv_indices, "full_kv_indices", 4);
    TORCH_CHECK(full_kv_num_blocks->sizes() == kv_num_blocks.sizes(),
                "fastarch: full_kv_num_blocks must have the shape of kv_num_blocks ",
                kv_num_blocks.sizes(), ", got ", full_kv_num_blocks->sizes());
    TORCH_CHECK(full_kv_indices->size(0) == Bm && full_kv_indices->size(1) == Hm &&
                    full_kv_indices->size(2) == Qt,
                "fastarch: full_kv_indices must have shape (", Bm, ", ", Hm, ", ", Qt,
                ", W), got ", full_kv_indices->sizes());
    fnum = full_kv_num_blocks->contiguous();
    fidx = full_kv_indices->contiguous();
  }
  // Consecutive tiles fused into one product: up to 256 keys, fewer for wide heads so that the
  // K and V rows of a run (2 * 256 * D floats) stay within L2 (the AMX forward sets its own).
  p.group = std::max<int64_t>(1, (attn_run_keys() > 0 ? attn_run_keys()
                                  : std::min<int64_t>(256, 16384 / std::max<int64_t>(D, 1))) / bs);
  p.Bm = Bm; p.Hm = Hm; p.W = idx.size(3); p.Wf = fidx.defined() ? fidx.size(3) : 0;
  p.num = num.data_ptr<int32_t>();
  p.idx = idx.data_ptr<int32_t>();
  p.fnum = fnum.defined() ? fnum.data_ptr<int32_t>() : nullptr;
  p.fidx = fidx.defined() ? fidx.data_ptr<int32_t>() : nullptr;
  // Validate the lists (never read out of bounds).
  const int64_t rows = Bm * Hm * Qt;
  int64_t& max_tiles = pr.max_tiles;
  std::vector<uint8_t> seen_row;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = p.num[r], nf = p.fnum ? p.fnum[r] : 0;
    TORCH_CHECK(n >= 0 && n <= p.W, "fastarch: kv_num_blocks holds ", n, ", outside [0, ", p.W,
                "]");
    TORCH_CHECK(nf >= 0 && nf <= p.Wf, "fastarch: full_kv_num_blocks holds ", nf,
                ", outside [0, ", p.Wf, "]");
    for (int64_t j = 0; j < n; ++j) {
      const int32_t t = p.idx[r * p.W + j];
      TORCH_CHECK(t >= 0 && t < Kt, "fastarch: kv_indices holds tile ", t, ", outside [0, ", Kt,
                  ")");
    }
    for (int64_t j = 0; j < nf; ++j) {
      const int32_t t = p.fidx[r * p.Wf + j];
      TORCH_CHECK(t >= 0 && t < Kt, "fastarch: full_kv_indices holds tile ", t, ", outside [0, ",
                  Kt, ")");
    }
    // A tile listed twice would be counted twice by the online softmax.
    seen_row.assign(size_t(Kt), 0);
    for (int64_t j = 0; j < n; ++j) seen_row[size_t(p.idx[r * p.W + j])] += 1;
    for (int64_t j = 0; j < nf; ++j) seen_row[size_t(p.fidx[r * p.Wf + j])] += 1;
    for (int64_t t = 0; t < Kt; ++t)
      TORCH_CHECK(seen_row[size_t(t)] <= 1, "fastarch: key tile ", t,
                  " is listed twice for one query tile (kv_indices / full_kv_indices)");
    max_tiles = std::max(max_tiles, n + nf);
  }

  at::Tensor &tm = pr.tm, &tmi = pr.tmi;
  TORCH_CHECK(tile_masks.has_value() == tile_mask_index.has_value(),
              "fastarch: tile_masks and tile_mask_index must be given together");
  if (tile_masks.has_value()) {
    TORCH_CHECK(tile_masks->dim() == 3 && tile_masks->size(1) == bs && tile_masks->size(2) == bs,
                "fastarch: tile_masks must have shape (P, ", bs, ", ", bs, "), got ",
                tile_masks->sizes());
    TORCH_CHECK(tile_masks->scalar_type() == at::kBool || tile_masks->scalar_type() == at::kByte,
                "fastarch: tile_masks must be bool or uint8");
    check_mask_tensor(*tile_mask_index, "tile_mask_index", 4);
    TORCH_CHECK(tile_mask_index->sizes() == kv_indices.sizes(),
                "fastarch: tile_mask_index must have the shape of kv_indices ", kv_indices.sizes(),
                ", got ", tile_mask_index->sizes());
    tm = tile_masks->contiguous().view(at::kByte);
    tmi = tile_mask_index->contiguous();
    const int32_t* ti = tmi.data_ptr<int32_t>();
    const int64_t P = tm.size(0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < p.num[r]; ++j) {
        const int32_t x = ti[r * p.W + j];
        TORCH_CHECK(x >= -1 && x < P, "fastarch: tile_mask_index holds ", x, ", outside [-1, ",
                    P, ")");
      }
    p.tile_masks = tm.data_ptr<uint8_t>();
    p.tile_mask_index = ti;
  }
  at::Tensor &qd = pr.qd, &kd = pr.kd;
  TORCH_CHECK(q_doc_ids.has_value() == kv_doc_ids.has_value(),
              "fastarch: q_doc_ids and kv_doc_ids must be given together");
  if (q_doc_ids.has_value()) {
    TORCH_CHECK(q_doc_ids->dim() == 2 && kv_doc_ids->dim() == 2 &&
                    q_doc_ids->size(0) == kv_doc_ids->size(0) &&
                    (q_doc_ids->size(0) == 1 || q_doc_ids->size(0) == B) &&
                    q_doc_ids->size(1) == Lq && kv_doc_ids->size(1) == Lk,
                "fastarch: q_doc_ids / kv_doc_ids must have shapes (B, Lq) / (B, Lk), got ",
                q_doc_ids->sizes(), " and ", kv_doc_ids->sizes());
    TORCH_CHECK(at::isIntegralType(q_doc_ids->scalar_type(), /*includeBool=*/false) &&
                    at::isIntegralType(kv_doc_ids->scalar_type(), /*includeBool=*/false),
                "fastarch: q_doc_ids / kv_doc_ids must be integer tensors, got ",
                q_doc_ids->scalar_type(), " and ", kv_doc_ids->scalar_type());
    qd = q_doc_ids->to(at::kLong).contiguous();
    kd = kv_doc_ids->to(at::kLong).contiguous();
    p.q_doc = qd.data_ptr<int64_t>();
    p.kv_doc = kd.data_ptr<int64_t>();
    p.Bd = qd.size(0);
  }
  at::Tensor& al = pr.al;
  if (alibi_slopes.has_value()) {
    TORCH_CHECK(alibi_slopes->dim() == 1 && alibi_slopes->size(0) == Hq,
                "fastarch: alibi_slopes must have shape (", Hq, "), got ", alibi_slopes->sizes());
    al = alibi_slopes->to(at::kFloat).contiguous();
    p.alibi = al.data_ptr<float>();
  }
  if (rel_bias.has_value()) {
    TORCH_CHECK(rel_bias->dim() == 2 && rel_bias->size(0) == Hq && rel_bias->size(1) % 2 == 1,
                "fastarch: rel_bias must have shape (", Hq, ", 2 R + 1), got ", rel_bias->sizes());
    pr.rel = rel_bias->to(at::kFloat).contiguous();
    p.rel = pr.rel.data_ptr<float>();
    p.rel_r = rel_bias->size(1) / 2;
  }

}

// n elements of scratch: the calling thread's kept buffer (grown as needed, left for its next
// call: a fresh multi-MiB allocation is fresh pages, whose first-touch faults cost as much as
// filling them) where keep, else the call's own.
template <typename T>
T* kept_or_local(bool keep, aligned_vector<T>& kept, aligned_vector<T>& local, size_t n) {
  aligned_vector<T>& buf = keep ? kept : local;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

#if defined(FASTARCH_ATTN_BF16_DOT)
// Key tile kt of (batch b, kv head h) into the bf16 pair layouts of Params::kp_all / vp_all (pure
// data movement, no rounding): kbh and vbh are that (batch, kv head)'s pair rows. The last tile
// also writes the zero pair rows past the keys.
void pair_kv_tile(const Params& p, const uint16_t* ks, const uint16_t* vs, int64_t b, int64_t h,
                  int64_t kt, uint32_t* kbh, uint32_t* vbh) {
  const int64_t D = p.D, bs = p.bs, Kt = p.Kt, Lk = p.Lk, D2 = D / 2, lkp = p.kp_ld,
                lk2 = p.vrows;
  const uint16_t* kr = ks + b * p.ks[0] + h * p.ks[1];
  const uint16_t* vr = vs + b * p.vs[0] + h * p.vs[1];
  uint32_t* kt_out = kbh + kt * bs;  // rows lkp apart
  // K tile rows -> (D/2, bs) pairs: a 32-bit transpose (each row's bf16 pairs are already
  // adjacent), 16 keys x 16 pairs at a time in registers; the partial last block of keys
  // and a D/2 that is not a multiple of 16 (D = 80, 112) take the scalar loop below.
  const int64_t full = std::min<int64_t>(bs, std::max<int64_t>(0, Lk - kt * bs)) / 16 * 16;
  const int64_t t16 = D2 / 16 * 16;
  auto pairs_of_row = [&](const uint16_t* row, int64_t j, int64_t t_begin) {
    for (int64_t t = t_begin; t < D2; ++t)
      kt_out[t * lkp + j] = uint32_t(row[2 * t]) | (uint32_t(row[2 * t + 1]) << 16);
  };
  for (int64_t j0 = 0; j0 < full; j0 += 16) {
    const uint16_t* r0 = kr + (kt * bs + j0) * p.ks[2];
    for (int64_t t0 = 0; t0 < t16; t0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(r0 + i * p.ks[2] + 2 * t0);
      transpose16x16_epi32(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kt_out + (t0 + i) * lkp + j0, r[i]);
    }
    for (int64_t j = j0; j < j0 + 16; ++j) pairs_of_row(r0 + (j - j0) * p.ks[2], j, t16);
  }
  for (int64_t j = full; j < bs; ++j) {
    const int64_t c = kt * bs + j;
    if (c < Lk) {
      pairs_of_row(kr + c * p.ks[2], j, 0);
    } else {
      for (int64_t t = 0; t < D2; ++t) kt_out[t * lkp + j] = 0;
    }
  }
  const int64_t u_end = kt + 1 == Kt ? lk2 : (kt + 1) * bs / 2;
  for (int64_t u = kt * bs / 2; u < u_end; ++u) {  // V pairs, zeros past the keys
    const uint16_t* r0 = vr + (2 * u) * p.vs[2];
    uint32_t* o = vbh + u * D;
    if (2 * u >= Lk) {
      std::fill(o, o + D, 0u);
    } else if (2 * u + 1 < Lk) {
      const uint16_t* r1 = r0 + p.vs[2];
      int64_t d = 0;
#if defined(__AVX512BW__)
      // 32 dims of both rows at a time: unpack interleaves 16-bit words within each
      // 128-bit lane, the 64-bit permutes put the lanes back in order (the widening loop
      // below was ~40% of this regrouping pass, perf)
      const __m512i lanes0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
      const __m512i lanes1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
      for (; d + 32 <= D; d += 32) {
        const __m512i a = _mm512_loadu_si512(r0 + d), b = _mm512_loadu_si512(r1 + d);
        const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
        _mm512_storeu_si512(o + d, _mm512_permutex2var_epi64(lo, lanes0, hi));
        _mm512_storeu_si512(o + d + 16, _mm512_permutex2var_epi64(lo, lanes1, hi));
      }
#endif
      for (; d < D; ++d) o[d] = uint32_t(r0[d]) | (uint32_t(r1[d]) << 16);
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = r0[d];
    }
  }
}
#endif

// One output row from its unnormalised accumulator acc (D), row reference m and row sum l:
// out = acc / l and lse = m + log l (zeros and -inf for a row that saw nothing)
template <typename T>
inline void finish_row(const float* acc, float m, float l, int64_t D, T* out, float* lse) {
  store_row<T>(acc, out, D, !(l <= 0.f) ? 1.f / l : 0.f);
  *lse = !(l <= 0.f) ? m + std::log(l) : kNegInf;
}

// One output row from the partial results of its key splits (flash-decoding's merge): split s
// holds the row max m[s * rs], the row sum l[s * rs] relative to it and the accumulator
// acc[s * rs * D ..] (rs: rows from one split's results to the next); tmp holds D floats.
template <typename T>
inline void merge_split_row(int64_t nsplit, int64_t D, int64_t rs, const float* m,
                            const float* l, const float* acc, float* tmp, T* out, float* lse) {
  float mx = kNegInf;
  for (int64_t s = 0; s < nsplit; ++s) mx = std::max(mx, m[s * rs]);
  const float mref = mx == kNegInf ? 0.f : mx;
  float sum = 0.f;
  std::fill(tmp, tmp + D, 0.f);
  for (int64_t s = 0; s < nsplit; ++s) {
    const float ls = l[s * rs];
    const float a = !(ls <= 0.f) ? std::exp(m[s * rs] - mref) : 0.f;
    if (a == 0.f) continue;
    sum += a * ls;
    const float* src = acc + s * rs * D;
    for (int64_t d = 0; d < D; ++d) tmp[d] += a * src[d];
  }
  finish_row<T>(tmp, mx, sum, D, out, lse);
}

#if defined(__AVX512F__)
// ---- grouped decode ----------------------------------------------------------------------------
// A call of one query tile (Lq <= block, decode over a KV cache) whose block mask is shared by the
// heads of each GQA group (Hm == 1, or per-head rows alike within each group, as top-k selection
// makes them) takes each (batch, kv head) as one unit: the G = Hq / Hkv query heads of a GQA
// group stacked into G * Lq rows, so that each K / V row is read once for the whole group (the
// per-head items read it G times), and the products by the small kernels below instead of two
// sgemm calls per tile (MKL packs both operands on every call: at one to a few rows, that and the
// bf16 -> fp32 staging of each tile were most of a decode call).

// v[0..16) -> the vector of their horizontal sums (lane j: the sum of v[j]'s lanes)
inline __m512 hsum16x16(const __m512 (&v)[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane L: the lane-L sums of v[4i .. 4i+4)
    const __m512d c = _mm512_castps_pd(t[2 * i]), d = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// s[r * lds + j] = q_r . k_j for rows r < M and keys j < n: q rows q[r], k rows ldk apart, both
// fp32 (D a multiple of 16: FMAs) or both bf16 (uint16_t, D a multiple of 32: the bf16 dot
// instruction; no rounding, the products of bf16 pairs are exact in fp32). Sixteen keys at a
// time, one accumulator each, summed by hsum16x16.
template <typename E>
inline void decode_scores(int64_t M, int64_t n, int64_t D, const E* const* q, const E* k,
                          int64_t ldk, float* s, int64_t lds) {
  constexpr int64_t step = std::is_same_v<E, float> ? 16 : 32;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nb = std::min<int64_t>(16, n - j0);
    const E* kr[16];
    for (int64_t j = 0; j < 16; ++j) kr[j] = k + (j0 + (j < nb ? j : 0)) * ldk;
    for (int64_t r = 0; r < M; ++r) {
      const E* qr = q[r];
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += step) {
        if constexpr (std::is_same_v<E, float>) {
          const __m512 qv = _mm512_loadu_ps(qr + d);
          for (int j = 0; j < 16; ++j)
            acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kr[j] + d), acc[j]);
        } else {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(qr + d);
          for (int j = 0; j < 16; ++j)
            acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_loadu_si512(kr[j] + d));
#endif
        }
      }
      _mm512_mask_storeu_ps(s + r * lds + j0, __mmask16((1u << nb) - 1), hsum16x16(acc));
    }
  }
}

// 16 elements of a K / V row as fp32
template <typename T>
inline __m512 load16_f32(const T* src) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(src));
  }
}

// acc[r, d0 .. d0 + 16 VB) += sum_j p[r, j] v[j, d0 ..] for RB rows: RB x VB accumulators in
// registers, each V row converted once for the RB rows
template <typename T, int RB, int VB>
inline void decode_pv_block(int64_t n, const float* p, int64_t ldp, const T* v, int64_t ldv,
                            float* acc, int64_t lda, int64_t d0) {
  __m512 c[RB][VB];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < VB; ++u) c[r][u] = _mm512_loadu_ps(acc + r * lda + d0 + 16 * u);
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[VB];
    for (int u = 0; u < VB; ++u) vv[u] = load16_f32<T>(v + j * ldv + d0 + 16 * u);
    for (int r = 0; r < RB; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r * ldp + j]);
      for (int u = 0; u < VB; ++u) c[r][u] = _mm512_fmadd_ps(pj, vv[u], c[r][u]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < VB; ++u) _mm512_storeu_ps(acc + r * lda + d0 + 16 * u, c[r][u]);
}

template <typename T, int RB>
inline void decode_pv_rows(int64_t n, int64_t D, const float* p, int64_t ldp, const T* v,
                           int64_t ldv, float* acc, int64_t lda) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) decode_pv_block<T, RB, 4>(n, p, ldp, v, ldv, acc, lda, d0);
  for (; d0 < D; d0 += 16) decode_pv_block<T, RB, 1>(n, p, ldp, v, ldv, acc, lda, d0);
}

// acc (M x D, lda) += P (M x n, ldp) V (n x D, ldv); D a multiple of 16
template <typename T>
inline void decode_pv(int64_t M, int64_t n, int64_t D, const float* p, int64_t ldp, const T* v,
                      int64_t ldv, float* acc, int64_t lda) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) decode_pv_rows<T, 4>(n, D, p + r * ldp, ldp, v, ldv, acc + r * lda, lda);
  switch (M - r) {
    case 3: decode_pv_rows<T, 3>(n, D, p + r * ldp, ldp, v, ldv, acc + r * lda, lda); break;
    case 2: decode_pv_rows<T, 2>(n, D, p + r * ldp, ldp, v, ldv, acc + r * lda, lda); break;
    case 1: decode_pv_rows<T, 1>(n, D, p + r * ldp, ldp, v, ldv, acc + r * lda, lda); break;
    default: break;
  }
}

// FASTARCH_ATTN_DECODE_GROUP=0: decode calls by the per-head items (comparisons, tests).
bool attn_decode_group_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_ATTN_DECODE_GROUP");
    return !(e && e[0] == '0');
  }();
  return on;
}

// Whether the query heads of every GQA group share their block-mask rows (a per-head mask, as
// top-k selection makes, that is the same within each group): tile lists and tile masks alike.
inline bool mask_rows_shared_by_groups(const Params& p) {
  const int64_t G = p.Hq / p.Hkv;
  if (p.Hm == 1 || G == 1) return true;
  for (int64_t bm = 0; bm < p.Bm; ++bm)
    for (int64_t qt = 0; qt < p.Qt; ++qt)
      for (int64_t h = 0; h < p.Hq; ++h) {
        if (h % G == 0) continue;
        const int64_t r = (bm * p.Hm + h) * p.Qt + qt, r0 = (bm * p.Hm + h / G * G) * p.Qt + qt;
        const int64_t n = p.num[r], nf = p.fnum ? p.fnum[r] : 0;
        if (n != p.num[r0] || (p.fnum && nf != p.fnum[r0])) return false;
        for (int64_t t = 0; t < n; ++t) {
          if (p.idx[r * p.W + t] != p.idx[r0 * p.W + t]) return false;
          if (p.tile_mask_index && p.tile_mask_index[r * p.W + t] != p.tile_mask_index[r0 * p.W + t])
            return false;
        }
        for (int64_t t = 0; t < nf; ++t)
          if (p.fidx[r * p.Wf + t] != p.fidx[r0 * p.Wf + t]) return false;
      }
  return true;
}

// Whether a call takes the grouped decode: one query tile of at most 16 rows, block-mask rows
// shared within each GQA group, D a multiple of 16 and at most 64 stacked rows. With more rows
// its row-at-a-time products fall behind the sgemm ones (2 threads, 4096 keys, D=128, Hq=Hkv=8,
// alternated: bf16 0.61 vs 1.07 ms at one row, 2.3 vs 2.6 at 16, 4.1 vs 3.7 at 32, 8.4 vs 6.5 at
// 64; fp32 likewise).
inline bool decode_grouped(const Params& p) {
  return p.Qt == 1 && p.Lq <= 16 && p.D % 16 == 0 && p.D > 0 && (p.Hq / p.Hkv) * p.Lq <= 64 &&
         attn_decode_group_enabled() && mask_rows_shared_by_groups(p);
}

// The block-mask row of unit (b, kv head hk): its group's first query head's (one query tile)
inline int64_t decode_unit_row(const Params& p, int64_t b, int64_t hk) {
  return ((p.Bm == 1 ? 0 : b) * p.Hm + (p.Hm == 1 ? 0 : hk * (p.Hq / p.Hkv))) * p.Qt;
}

// One unit (batch b, kv head hk) walks tiles [t0, t1) of its block-mask row for the G * Lq stacked
// rows (row r: query head hk * G + r / Lq, query r % Lq), leaving the unnormalised acc (M x D),
// the row max mrow and the row sum lrow, as attend_tiles does for one head.
template <typename T>
void decode_group(const Params& p, const T* q, const T* k, const T* v, int64_t b, int64_t hk,
                  int64_t t0, int64_t t1, float* qbuf, float* kbuf, float* sbuf, float* acc,
                  float* mrow, float* lrow) {
  const int64_t D = p.D, bs = p.bs, m = p.Lq, G = p.Hq / p.Hkv, M = G * m;
  const T* kb = k + b * p.ks[0] + hk * p.ks[1];
  const T* vb = v + b * p.vs[0] + hk * p.vs[1];
  auto q_row = [&](int64_t r) { return q + b * p.qs[0] + (hk * G + r / m) * p.qs[1] + (r % m) * p.qs[2]; };
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
  const bool dot = bf16 && D % 32 == 0;
#else
  const bool dot = false;
#endif
  // the stacked rows: bf16 read in place (scaled in S), else scaled fp32 copies in qbuf
  thread_local std::vector<const uint16_t*> q16rows;
  thread_local std::vector<const float*> q32rows;
  q16rows.resize(size_t(M));
  q32rows.resize(size_t(M));
  for (int64_t r = 0; r < M; ++r) {
    if (dot) {
      q16rows[size_t(r)] = reinterpret_cast<const uint16_t*>(q_row(r));
    } else {
      load_row_f32<T>(q_row(r), qbuf + r * D, D, p.scale);
      q32rows[size_t(r)] = qbuf + r * D;
    }
  }
  std::fill(acc, acc + M * D, 0.f);
  std::fill(mrow, mrow + M, kNegInf);
  std::fill(lrow, lrow + M, 0.f);
  const int64_t row = decode_unit_row(p, b, hk);
  const int64_t bd = p.Bd == 1 ? 0 : b;
  thread_local std::vector<int64_t> kts, slots;
  merged_tiles(p, row, kts, slots);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t kt = kts[t], slot = slots[t];
    const int64_t c0 = kt * bs, n = std::min(bs, p.Lk - c0);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (dot) {
      if constexpr (bf16)
        decode_scores<uint16_t>(M, n, D, q16rows.data(),
                                reinterpret_cast<const uint16_t*>(kb + c0 * p.ks[2]), p.ks[2],
                                sbuf, bs);
    } else
#endif
    {
      const float* kr;
      int64_t ldk;
      if constexpr (std::is_same_v<T, float>) {
        kr = kb + c0 * p.ks[2];
        ldk = p.ks[2];
      } else {
        // widened once per tile for all M rows (load_row_f32's fp16 loop was 4x the whole
        // bf16 call, /tmp script)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(kbuf + j * D + d, load16_f32<T>(kb + (c0 + j) * p.ks[2] + d));
        kr = kbuf;
        ldk = D;
      }
      decode_scores<float>(M, n, D, q32rows.data(), kr, ldk, sbuf, bs);
    }
    for (int64_t r = 0; r < M; ++r) {
      const int64_t h = hk * G + r / m, qi = r % m;
      float* s = sbuf + r * bs;
      if (dot) {
        const float sc = p.scale;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) s[j] *= sc;
      }
      score_mods_row(p, s, n, qi, c0, p.alibi ? p.alibi[h] : 0.f,
                     p.rel ? p.rel + h * (2 * p.rel_r + 1) : nullptr, nullptr);
      if (slot >= 0) {
        const uint8_t* bmr = nullptr;
        if (p.tile_mask_index != nullptr) {
          const int32_t ti = p.tile_mask_index[row * p.W + slot];
          if (ti >= 0) bmr = p.tile_masks + (int64_t(ti) * bs + qi) * bs;
        }
        mask_row(p, s, n, qi, c0, bmr, bd);
      }
      const bool first = mrow[r] == kNegInf;
      const float mx = row_max(s, n, mrow[r]);
      const float mref = mx == kNegInf ? 0.f : mx;
      const float alpha = first ? 0.f : fast_exp(mrow[r] - mref);
      const float sum = exp_sub_row(s, n, mref);
      lrow[r] = lrow[r] * alpha + sum;
      mrow[r] = mx;
      if (alpha != 1.f && !first) {
        float* a = acc + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    decode_pv<T>(M, n, D, sbuf, bs, vb + c0 * p.vs[2], p.vs[2], acc, D);
  }
}
// The grouped decode of a whole call (decode_grouped(p)): units (batch, kv head), their key tiles
// split over the threads when there are too few units to fill them (merged as flash-decoding
// does), results into out (B, Hq, Lq, D) and lse (B, Hq, Lq).
template <typename T>
void decode_grouped_forward(const Params& p, int64_t max_tiles, const T* q, const T* k,
                            const T* v, T* out, float* lse) {
  const int64_t D = p.D, bs = p.bs, m = p.Lq, G = p.Hq / p.Hkv, M = G * m;
  const int64_t units = p.B * p.Hkv, threads = at::get_num_threads();
  int64_t nsplit = 1;
  if (units < 2 * threads && max_tiles >= 8)
    nsplit = std::max<int64_t>(1, std::min<int64_t>((2 * threads + units - 1) / units, max_tiles / 4));
  std::vector<float> pacc, pm, pl;
  if (nsplit > 1) {
    pacc.resize(size_t(units * nsplit * M * D));
    pm.resize(size_t(units * nsplit * M));
    pl.resize(size_t(units * nsplit * M));
  }
  // row r of a unit -> its output row (b, hk * G + r / m, r % m)
  auto out_row = [&](int64_t unit, int64_t r) {
    const int64_t b = unit / p.Hkv, h = (unit % p.Hkv) * G + r / m;
    return (b * p.Hq + h) * p.Lq + r % m;
  };
  at::parallel_for(0, units * nsplit, 1, [&](int64_t w0, int64_t w1) {
    thread_local aligned_vector<float> scratch;
    const int64_t nq = lines_of_floats(M * D), nk = lines_of_floats(bs * D),
                  ns = lines_of_floats(M * bs), nm = lines_of_floats(M);
    const size_t need = size_t(2 * nq + nk + ns + 2 * nm);
    if (scratch.size() < need) scratch.resize(need);
    float* qbuf = scratch.data();
    float* kbuf = qbuf + nq;
    float* sbuf = kbuf + nk;
    float* accb = sbuf + ns;
    float* mb = accb + nq;
    float* lb = mb + nm;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t unit = w / nsplit, split = w % nsplit;
      const int64_t b = unit / p.Hkv, hk = unit % p.Hkv;
      const int64_t row = decode_unit_row(p, b, hk);
      const int64_t ntile = int64_t(p.num[row]) + (p.fnum ? p.fnum[row] : 0);
      const int64_t per = (ntile + nsplit - 1) / nsplit;
      const int64_t t0 = std::min(ntile, split * per), t1 = std::min(ntile, t0 + per);
      float* acc = nsplit > 1 ? pacc.data() + w * M * D : accb;
      float* mr = nsplit > 1 ? pm.data() + w * M : mb;
      float* lr = nsplit > 1 ? pl.data() + w * M : lb;
      decode_group<T>(p, q, k, v, b, hk, t0, t1, qbuf, kbuf, sbuf, acc, mr, lr);
      if (nsplit > 1) continue;
      for (int64_t r = 0; r < M; ++r) {
        const int64_t o = out_row(unit, r);
        finish_row<T>(acc + r * D, mr[r], lr[r], D, out + o * D, lse + o);
      }
    }
  });
  if (nsplit == 1) return;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> tmp(static_cast<size_t>(D));
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t w0 = unit * nsplit;  // the unit's first split
      for (int64_t r = 0; r < M; ++r) {
        const int64_t o = out_row(unit, r);
        merge_split_row<T>(nsplit, D, M, pm.data() + w0 * M + r, pl.data() + w0 * M + r,
                           pacc.data() + (w0 * M + r) * D, tmp.data(), out + o * D, lse + o);
      }
    }
  });
}
#endif

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const std::optional<at::Tensor>& tile_masks,
    const std::optional<at::Tensor>& tile_mask_index, const std::optional<at::Tensor>& q_doc_ids,
    const std::optional<at::Tensor>& kv_doc_ids, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& rel_bias,
    int64_t block_size, int64_t q_offset, int64_t window_left, int64_t window_right,
    int64_t prefix_len, double scale, double softcap) {
  Prepared pr;
  prepare(pr, q_in, k_in, v_in, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
          tile_masks, tile_mask_index, q_doc_ids, kv_doc_ids, alibi_slopes, rel_bias, block_size,
          q_offset,
          window_left, window_right, prefix_len, scale, softcap);
  const Params& p = pr.p;
  const at::Tensor &q = pr.q, &k = pr.k, &v = pr.v;
  const int64_t B = p.B, Hq = p.Hq, Lq = p.Lq, D = p.D, bs = p.bs, Qt = p.Qt;
  const int64_t Bm = p.Bm, Hm = p.Hm, max_tiles = pr.max_tiles;
  at::Tensor out = at::empty({B, Hq, Lq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Lq == 0 || D == 0) {
    out.zero_();
    lse.fill_(kNegInf);
    return {out, lse};
  }
#if defined(__AVX512F__)
  if (decode_grouped(p)) {
    float* lp = lse.data_ptr<float>();
    switch (q.scalar_type()) {
      case at::kBFloat16:
        decode_grouped_forward<c10::BFloat16>(p, max_tiles, q.data_ptr<c10::BFloat16>(),
                                              k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(),
                                              out.data_ptr<c10::BFloat16>(), lp);
        break;
      case at::kHalf:
        decode_grouped_forward<c10::Half>(p, max_tiles, q.data_ptr<c10::Half>(),
                                          k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(),
                                          out.data_ptr<c10::Half>(), lp);
        break;
      default:
        decode_grouped_forward<float>(p, max_tiles, q.data_ptr<float>(), k.data_ptr<float>(),
                                      v.data_ptr<float>(), out.data_ptr<float>(), lp);
    }
    return {out, lse};
  }
#endif

  // Split the key tiles of an item when there are too few items to fill the threads (decode).
  const int64_t items = B * Hq * Qt;
  const int64_t threads = at::get_num_threads();
  int64_t nsplit = 1;
  if (items < 2 * threads && max_tiles >= 8) {
    nsplit = std::min<int64_t>((2 * threads + items - 1) / items, max_tiles / 4);
    nsplit = std::max<int64_t>(nsplit, 1);
  }
  // Prefill: K^T (and V for bf16 / fp16) as fp32 once per call, for the in-place products
  // (each K / V row is then read by ~Qt query tiles without being packed or widened again).
  at::Tensor v32;
  Params& pw = pr.p;
  static const int64_t nn_max_d = [] {
    const char* e = std::getenv("FASTARCH_ATTN_NN_MAX_D");
    return e ? std::atoll(e) : int64_t(96);
  }();

  aligned_vector<uint32_t> klocal, vlocal;  // the pair layouts of a call too large to keep
  aligned_vector<float> kt_local;  // likewise the fp32 K^T tiles
#if defined(FASTARCH_ATTN_BF16_DOT)
  // bf16 prefill with the bf16 dot instruction (D and the block a multiple of 16, up to 128): K
  // and V regrouped into bf16 pairs once per call (pure data movement, no rounding).
  const bool bf16_dot = q.scalar_type() == at::kBFloat16 && Qt >= 2 && nsplit == 1 &&
                        D % 16 == 0 && D <= 128 && bs % 16 == 0 && bs <= 128 &&
                        p.qs[2] % 2 == 0 && attn_bf16_dot_enabled();
  // Pairs per head: each thread takes whole (batch, kv head) units and regroups a unit's key
  // tiles into its own buffers just before the unit's query tiles first read them, so that the
  // pairs are written to and read from its caches and K / V are read once, instead of one pass
  // over all of K and V into call-wide buffers first. Where the units do not divide evenly over
  // the threads, or the block mask differs per batch or head (units of uneven cost), the
  // call-wide pass is kept and the items are dealt per query tile.
  // FASTARCH_ATTN_PAIRS_PER_HEAD=0 turns it off (comparisons, tests).
  bool pairs_per_head = false;
  const uint16_t* k16 = nullptr;
  const uint16_t* v16 = nullptr;
  if (bf16_dot) {
    const int64_t Hkv = p.Hkv, Kt = p.Kt, D2 = D / 2;
    pw.kp_ld = kpairs_ld(Kt * bs);
    // V pairs per (b, kv head): every tile's, plus 16 zero rows for brgemm's reduction padded to
    // 32 keys past the last tile start (attend_tiles)
    pw.vrows = Kt * bs / 2 + 16;
    pw.kp_stride = D2 * pw.kp_ld;
    pw.vp_stride = pw.vrows * D;
    const int64_t units = B * Hkv;
    pairs_per_head = attn_pairs_per_head() && units >= threads && units % threads == 0 &&
                     Bm == 1 && Hm == 1;
    k16 = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
    v16 = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
    if (!pairs_per_head) {
      // Up to 32 MiB are kept per calling thread for the next call: a fresh multi-MiB
      // allocation is fresh pages each call, and their first-touch faults cost as much as the
      // regrouping (S=4096, H=8, D=64: 7.0 -> 5.2 ms for a call that computes only the diagonal
      // tiles).
      const size_t nk = size_t(units * pw.kp_stride), nv = size_t(units * pw.vp_stride);
      const bool keep = nk + nv <= (size_t(8) << 20);
      thread_local aligned_vector<uint32_t> kcache, vcache;
      uint32_t* kd = kept_or_local(keep, kcache, klocal, nk);
      uint32_t* vd = kept_or_local(keep, vcache, vlocal, nv);
      // one pass, in parallel over (batch, kv head) and key tiles
      at::parallel_for(0, units * Kt, 1, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t kt = w % Kt, bh = w / Kt;
          pair_kv_tile(p, k16, v16, bh / Hkv, bh % Hkv, kt, kd + bh * p.kp_stride,
                       vd + bh * p.vp_stride);
        }
      });
      pw.kp_all = kd;
      pw.vp_all = vd;
    } else {
      pw.kp_stride = pw.vp_stride = 0;  // each thread's own buffers (the attend loop below)
    }
    pw.pairs = true;
    pw.amx = attn_amx_enabled();
    // On AMX, runs of up to 512 keys: bf16 K / V pairs of 512 keys are 64 KiB each at D = 64,
    // within L2, and a longer P V product amortises its pass over the accumulator. Xeon with
    // AMX, 2 threads, S=4096, H=8, bf16, alternated runs of a /tmp script (2026-12-07): causal
    // 46-48 -> 39 ms at D=128 (SDPA 43-47), 26.4 -> 25.0 ms at D=64 (SDPA 31-32); the sliding
    // window (5-tile rows) 11.6 -> 10.5 ms at D=128, level at D=64.
    if (pw.amx && attn_run_keys() == 0) pw.group = std::max<int64_t>(1, 512 / bs);
  } else
#endif
  if (Qt >= 2 && nsplit == 1 && ((kHaveNN && D <= nn_max_d) || attn_f32_brgemm())) {
    pw.brg32 = attn_f32_brgemm();
    // One parallel pass per key tile: widen and transpose its rows into (D, bs), zeros past the
    // keys. (Three tensor passes before, zeros + copy + transpose into a fresh allocation: ~10%
    // of a sliding-window call at S=4096, fp32, on the Xeon host.) Kept between calls like the
    // bf16 pairs below, up to 32 MiB per calling thread.
    const int64_t Hkv = p.Hkv, Kt = p.Kt, Lk = p.Lk;
    const size_t nk = size_t(B * Hkv * Kt * D * bs);
    thread_local aligned_vector<float> kt_cache;
    float* kd = kept_or_local(nk <= (size_t(8) << 20), kt_cache, kt_local, nk);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "kt_tiles", [&] {
      const scalar_t* ks = k.data_ptr<scalar_t>();
      at::parallel_for(0, B * Hkv * Kt, 1, [&](int64_t w0, int64_t w1) {
        std::vector<float> row(static_cast<size_t>(D));
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t kt = w % Kt, bh = w / Kt, b = bh / Hkv, h = bh % Hkv;
          const scalar_t* kr = ks + b * p.ks[0] + h * p.ks[1];
          float* out = kd + w * D * bs;
          int64_t j_done = 0;
#if defined(__AVX512F__)
          if constexpr (!std::is_same_v<scalar_t, double>) {  // (the op takes no double)
            // 16 keys x 16 dims at a time through registers, fp16 / bf16 widened as they load
            // (the scalar loop below stores one float per (d, key), bs floats apart: ~6-8% of
            // an fp32 sliding-window call, perf)
            const int64_t full = std::min<int64_t>(bs, std::max<int64_t>(0, Lk - kt * bs)) / 16 * 16;
            if (D % 16 == 0 && bs % 16 == 0) {
              for (int64_t j0 = 0; j0 < full; j0 += 16) {
                const scalar_t* r0 = kr + (kt * bs + j0) * p.ks[2];
                for (int64_t d0 = 0; d0 < D; d0 += 16) {
                  __m512i r[16];
                  for (int i = 0; i < 16; ++i)
                    r[i] = _mm512_castps_si512(load16_f32<scalar_t>(r0 + i * p.ks[2] + d0));
                  transpose16x16_epi32(r);
                  for (int i = 0; i < 16; ++i)
                    _mm512_storeu_ps(out + (d0 + i) * bs + j0, _mm512_castsi512_ps(r[i]));
                }
              }
              j_done = full;
            }
          }
#endif
          for (int64_t j = j_done; j < bs; ++j) {
            const int64_t c = kt * bs + j;
            if (c < Lk) {
              load_row_f32<scalar_t>(kr + c * p.ks[2], row.data(), D, 1.f);
              for (int64_t d = 0; d < D; ++d) out[d * bs + j] = row[size_t(d)];
            } else {
              for (int64_t d = 0; d < D; ++d) out[d * bs + j] = 0.f;
            }
          }
        }
      });
    });
    pw.kt_all = kd;
    if (v.scalar_type() != at::kFloat) {
      v32 = v.to(at::kFloat).contiguous();
      pw.v32_all = v32.data_ptr<float>();
    }
  }
  // Partial results of the splits: acc (items*nsplit, bs, D), m and l (items*nsplit, bs).
  std::vector<float> pacc, pm, pl;
  if (nsplit > 1) {
    pacc.resize(size_t(items * nsplit * bs * D));
    pm.resize(size_t(items * nsplit * bs));
    pl.resize(size_t(items * nsplit * bs));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "block_sparse_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* lp = lse.data_ptr<float>();
    // Without splits, the items are dealt round-robin to one chunk per thread, so that cheap and
    // expensive query tiles (causal: the first tiles see few keys) mix in every chunk even when
    // B * Hq is small or odd; with splits (decode), one work unit per chunk.
    const int64_t total = items * nsplit;
    const int64_t nch = nsplit == 1 ? std::max<int64_t>(1, std::min(threads, total)) : total;
    const int64_t stride = nsplit == 1 ? nch : total;
    at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      const int64_t gb = (p.group + 1) * bs;  // the longest run (attend_tiles)
      // every buffer on a cache line: brgemm's tile rows must not straddle two (aligned.h)
      const int64_t nq = lines_of_floats(bs * D), nkv = lines_of_floats(gb * D),
                    ns = lines_of_floats(bs * gb), nm = lines_of_floats(bs);
      // Kept per thread between calls and not cleared: every part is written before it is
      // read. (A fresh zeroed block per call, ~480 KiB with the 512-key runs on AMX, was the
      // largest cost of a one-tile call: its memset ~16% of it, perf.)
      thread_local aligned_vector<float> scratch;
      const size_t need = size_t(2 * nq + 2 * nkv + ns + 2 * nm);
      if (scratch.size() < need) scratch.resize(need);
      float* qbuf = scratch.data();
      float* kbuf = qbuf + nq;
      float* vbuf = kbuf + nkv;
      float* sbuf = vbuf + nkv;
      float* accb = sbuf + ns;
      float* mb = accb + nq;
      float* lb = mb + nm;
      bool streamed = false;
      // the output rows of one item (acc normalised by the row sums) and their lse
      auto store_item = [&](int64_t b, int64_t h, int64_t qt, const float* acc, const float* mr,
                            const float* lr) {
        const int64_t r0 = qt * bs, m = std::min(bs, Lq - r0);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t o = ((b * Hq + h) * Lq + r0 + i);
          const float l = lr[i], inv = !(l <= 0.f) ? 1.f / l : 0.f;
          if (store_row_stream<scalar_t>(acc + i * D, op + o * D, D, inv))
            streamed = true;
          else
            store_row<scalar_t>(acc + i * D, op + o * D, D, inv);
          lp[o] = !(l <= 0.f) ? mr[i] + std::log(l) : kNegInf;
        }
      };
#if defined(FASTARCH_ATTN_BF16_DOT)
      if (pairs_per_head) {
        // (batch, kv head) units dealt round-robin to the chunks; the query heads of a unit take
        // turns per query tile, so a key tile is read by the whole GQA group while it is hot
        const int64_t Hkv = p.Hkv, G = Hq / Hkv, units = B * Hkv;
        // kept for the next call up to 8 MiB per thread, and 64 MiB over all the threads, as
        // every worker holds its own (8192 keys take 4 MiB at D = 128, 2 MiB at D = 64);
        // longer calls allocate theirs per call
        const size_t nk = size_t((D / 2) * p.kp_ld), nv = size_t(p.vrows * D);
        const bool keep = nk + nv <= std::min<size_t>(
            size_t(2) << 20, (size_t(16) << 20) / size_t(std::max<int64_t>(1, threads)));
        thread_local aligned_vector<uint32_t> kh_cache, vh_cache;
        aligned_vector<uint32_t> kh_local, vh_local;
        Params pt = p;
        uint32_t* kd = kept_or_local(keep, kh_cache, kh_local, nk);
        uint32_t* vd = kept_or_local(keep, vh_cache, vh_local, nv);
        pt.kp_all = kd;
        pt.vp_all = vd;
        for (int64_t c = c0; c < c1; ++c)
        for (int64_t unit = c; unit < units; unit += nch) {
          const int64_t b = unit / Hkv, hk = unit % Hkv;
          int64_t paired = 0;  // key tiles [0, paired) of this unit are in the buffers
          for (int64_t qt = 0; qt < Qt; ++qt) {
            const int64_t row = qt;  // one block-mask row set (Bm == Hm == 1)
            const int64_t np = p.num[row], nf = p.fnum ? p.fnum[row] : 0;
            int64_t last = -1;
            for (int64_t t = 0; t < np; ++t) last = std::max<int64_t>(last, p.idx[row * p.W + t]);
            for (int64_t t = 0; t < nf; ++t)
              last = std::max<int64_t>(last, p.fidx[row * p.Wf + t]);
            // and one tile more: a product's reduction padded to 32 keys reads up to 31 keys
            // past a run, which must be finite (zeros times stale infinities would be NaN)
            const int64_t need = std::min(p.Kt, last + 2);
            for (; paired < need; ++paired)
              pair_kv_tile(pt, k16, v16, b, hk, paired, kd, vd);
            for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
              attend_tiles<scalar_t>(pt, qp, kp, vp, b, h, qt, 0, np + nf, qbuf, kbuf, vbuf,
                                     sbuf, accb, mb, lb);
              store_item(b, h, qt, accb, mb, lb);
            }
          }
        }
      } else
#endif
      for (int64_t c = c0; c < c1; ++c)
      for (int64_t w = c; w < total; w += stride) {
        const int64_t item = w / nsplit, split = w % nsplit;
        const int64_t qt = item % Qt, h = (item / Qt) % Hq, b = item / (Qt * Hq);
        const int64_t bm = Bm == 1 ? 0 : b, hm = Hm == 1 ? 0 : h;
        const int64_t row = (bm * Hm + hm) * Qt + qt;
        const int64_t ntile = int64_t(p.num[row]) + (p.fnum ? p.fnum[row] : 0);
        const int64_t per = (ntile + nsplit - 1) / nsplit;
        const int64_t t0 = std::min(ntile, split * per), t1 = std::min(ntile, t0 + per);
        float* acc = nsplit > 1 ? pacc.data() + w * bs * D : accb;
        float* mr = nsplit > 1 ? pm.data() + w * bs : mb;
        float* lr = nsplit > 1 ? pl.data() + w * bs : lb;
        attend_tiles<scalar_t>(p, qp, kp, vp, b, h, qt, t0, t1, qbuf, kbuf, vbuf, sbuf, acc, mr,
                               lr);
        if (nsplit == 1) store_item(b, h, qt, acc, mr, lr);
      }
      if (streamed) _mm_sfence();
      if (p.amx) cpublas::brgemm_release(true);  // the tile configuration of this thread
      if (p.brg32) cpublas::brgemm_release(false);
    });
    if (nsplit > 1) {
      at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> tmp(static_cast<size_t>(D));
        for (int64_t item = i0; item < i1; ++item) {
          const int64_t qt = item % Qt, h = (item / Qt) % Hq, b = item / (Qt * Hq);
          const int64_t r0 = qt * bs, m = std::min(bs, Lq - r0);
          const int64_t w0 = item * nsplit;  // the item's first split
          for (int64_t i = 0; i < m; ++i) {
            const int64_t o = ((b * Hq + h) * Lq + r0 + i);
            merge_split_row<scalar_t>(nsplit, D, bs, pm.data() + w0 * bs + i,
                                      pl.data() + w0 * bs + i, pacc.data() + (w0 * bs + i) * D,
                                      tmp.data(), op + o * D, lp + o);
          }
        }
      });
    }
  });
  return {out, lse};
}

// ---- backward ----------------------------------------------------------------------------------
// Per (b, h, q tile): recompute P = exp(S - lse) tile by tile (no (Lq, Lk) matrix), then
//   dV_j += P^T dO,  dP = dO V_j^T,  dS = P * (dP - Di) [* (1 - tanh^2) under softcap],
//   dQ += scale * dS K_j,  dK_j += scale * dS^T Q,   Di = rowsum(dO * O) - dlse,
//   drel[h, clip(kv - qpos, -R, R) + R] += P * (dP - Di)   (the bias enters the score after the
//   softcap, so its gradient is dS before the softcap's chain factor).
// dQ rows belong to one item; dK / dV (and drel) are shared by the items of a kv head (of a head),
// so each chunk of items accumulates into its own fp32 buffers, summed at the end.
template <typename T>
void backward_item(const Params& p, const T* q, const T* k, const T* v, const T* go,
                   const T* o, const float* lse, const float* glse, int64_t b, int64_t h,
                   int64_t qt, float* qbuf, float* dobuf, float* kbuf, float* vbuf, float* pbuf,
                   float* dpbuf, float* tbuf, float* dq, float* di, float* dk_all,
                   float* dv_all, float* drel_all) {
  const int64_t D = p.D, bs = p.bs;
  const int64_t r0 = qt * bs, m = std::min(bs, p.Lq - r0);
  const int64_t hk = h / (p.Hq / p.Hkv);
  const T* qb = q + b * p.qs[0] + h * p.qs[1];
  const T* kb = k + b * p.ks[0] + hk * p.ks[1];
  const T* vb = v + b * p.vs[0] + hk * p.vs[1];
  const int64_t orow0 = (b * p.Hq + h) * p.Lq + r0;  // row of (out, grad_out, lse), contiguous
  for (int64_t i = 0; i < m; ++i) {
    load_row_f32<T>(qb + (r0 + i) * p.qs[2], qbuf + i * D, D, p.scale);
    load_row_f32<T>(go + (orow0 + i) * D, dobuf + i * D, D, 1.f);
    float* orow = kbuf;  // scratch for one row of out
    load_row_f32<T>(o + (orow0 + i) * D, orow, D, 1.f);
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += dobuf[i * D + d] * orow[d];
    di[i] = acc - (glse ? glse[orow0 + i] : 0.f);
  }
  std::fill(dq, dq + m * D, 0.f);
  const int64_t bm = p.Bm == 1 ? 0 : b, hm = p.Hm == 1 ? 0 : h;
  const int64_t row = (bm * p.Hm + hm) * p.Qt + qt;
  const int64_t nfull = p.fnum ? p.fnum[row] : 0;
  const int64_t ntile = nfull + p.num[row];
  const float slope = p.alibi ? p.alibi[h] : 0.f;
  const float* relh = p.rel ? p.rel + h * (2 * p.rel_r + 1) : nullptr;
  const int64_t bd = p.Bd == 1 ? 0 : b;
  for (int64_t t = 0; t < ntile; ++t) {
    const bool partial = t >= nfull;
    const int64_t slot = partial ? t - nfull : t;
    const int64_t kt = partial ? p.idx[row * p.W + slot] : p.fidx[row * p.Wf + slot];
    const int64_t c0 = kt * bs, n = std::min(bs, p.Lk - c0);
    const KVTile kv = stage_kv_tile<T>(p, kb, vb, c0, n, D, kbuf, vbuf);
    const float* kp = kv.k;
    const float* vp = kv.v;
    const int64_t ldk = kv.ldk, ldv = kv.ldv;
    const uint8_t* bitmap = nullptr;
    if (partial && p.tile_mask_index != nullptr) {
      const int32_t ti = p.tile_mask_index[row * p.W + slot];
      if (ti >= 0) bitmap = p.tile_masks + int64_t(ti) * bs * bs;
    }
    gemm_abt(int(m), int(n), int(D), qbuf, int(D), kp, int(ldk), pbuf, int(bs));
    for (int64_t i = 0; i < m; ++i) {
      float* s = pbuf + i * bs;
      score_mods_row(p, s, n, r0 + i, c0, slope, relh, p.softcap > 0 ? tbuf + i * bs : nullptr);
      if (partial) mask_row(p, s, n, r0 + i, c0, bitmap ? bitmap + i * bs : nullptr, bd);
      const float l = lse[orow0 + i];
      if (l == kNegInf) {
        std::fill(s, s + n, 0.f);
      } else {
        exp_sub_row(s, n, l);
      }
    }
    float* dvj = dv_all + ((b * p.Hkv + hk) * p.Lk + c0) * D;
    float* dkj = dk_all + ((b * p.Hkv + hk) * p.Lk + c0) * D;
    gemm_atb_acc(int(n), int(D), int(m), pbuf, int(bs), dobuf, int(D), dvj, int(D));
    gemm_abt(int(m), int(n), int(D), dobuf, int(D), vp, int(ldv), dpbuf, int(bs));
    for (int64_t i = 0; i < m; ++i) {
      const float* pr = pbuf + i * bs;
      float* ds = dpbuf + i * bs;
      const float dii = di[i];
      if (relh != nullptr) {
        // Bins of kv - qpos over the row: clipped to 0 below jlo, to 2R above jhi, else
        // consecutive.
        float* dr = drel_all + h * (2 * p.rel_r + 1);
        const int64_t R = p.rel_r, off = c0 - (r0 + i + p.q_offset);  // distance at j = 0
        const int64_t jlo = std::clamp<int64_t>(-R - off, 0, n);
        const int64_t jhi = std::clamp<int64_t>(R - off + 1, jlo, n);
        float lo = 0.f, hi = 0.f;
        for (int64_t j = 0; j < jlo; ++j) lo += pr[j] * (ds[j] - dii);
        for (int64_t j = jhi; j < n; ++j) hi += pr[j] * (ds[j] - dii);
        dr[0] += lo;
        dr[2 * R] += hi;
        for (int64_t j = jlo; j < jhi; ++j) dr[off + R + j] += pr[j] * (ds[j] - dii);
      }
      if (p.softcap > 0) {
        const float* th = tbuf + i * bs;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ds[j] = pr[j] * (ds[j] - dii) * (1.f - th[j] * th[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ds[j] = pr[j] * (ds[j] - dii);
      }
    }
    gemm_ab_acc(int(m), int(D), int(n), dpbuf, int(bs), kp, int(ldk), dq, int(D));
    gemm_atb_acc(int(n), int(D), int(m), dpbuf, int(bs), qbuf, int(D), dkj, int(D));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
    const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const std::optional<at::Tensor>& tile_masks,
    const std::optional<at::Tensor>& tile_mask_index, const std::optional<at::Tensor>& q_doc_ids,
    const std::optional<at::Tensor>& kv_doc_ids, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& rel_bias,
    int64_t block_size, int64_t q_offset, int64_t window_left, int64_t window_right,
    int64_t prefix_len, double scale, double softcap) {
  Prepared pr;
  prepare(pr, q_in, k_in, v_in, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
          tile_masks, tile_mask_index, q_doc_ids, kv_doc_ids, alibi_slopes, rel_bias, block_size,
          q_offset,
          window_left, window_right, prefix_len, scale, softcap);
  const Params& p = pr.p;
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, bs = p.bs;
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && out.sizes() == q_in.sizes(),
              "fastarch: grad_out and out must have the shape of q ", q_in.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q_in.scalar_type() &&
                  out.scalar_type() == q_in.scalar_type(),
              "fastarch: grad_out and out must have the dtype of q");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Lq &&
                  lse.scalar_type() == at::kFloat,
              "fastarch: lse must be float32 (B, Hq, Lq), got ", lse.sizes());
  at::Tensor go = grad_out.contiguous(), o = out.contiguous(), ls = lse.contiguous();
  at::Tensor gl;
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), "fastarch: grad_lse must have the shape of lse");
    gl = grad_lse->to(at::kFloat).contiguous();
  }
  const int64_t items = B * Hq * p.Qt;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const int64_t kv_elems = B * Hkv * Lk * D;
  at::Tensor dq32 = at::empty({B, Hq, Lq, D}, q_in.options().dtype(at::kFloat));
  at::Tensor dkv = at::zeros({nchunks, 2, kv_elems}, q_in.options().dtype(at::kFloat));
  const int64_t rel_elems = p.rel ? Hq * (2 * p.rel_r + 1) : 0;
  at::Tensor drel = at::zeros({nchunks, rel_elems}, q_in.options().dtype(at::kFloat));
  if (items > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_in.scalar_type(),
                                    "block_sparse_attention_backward", [&] {
      const scalar_t* qp = pr.q.data_ptr<scalar_t>();
      const scalar_t* kp = pr.k.data_ptr<scalar_t>();
      const scalar_t* vp = pr.v.data_ptr<scalar_t>();
      const scalar_t* gop = go.data_ptr<scalar_t>();
      const scalar_t* op = o.data_ptr<scalar_t>();
      const float* lp = ls.data_ptr<float>();
      const float* glp = gl.defined() ? gl.data_ptr<float>() : nullptr;
      float* dqp = dq32.data_ptr<float>();
      float* dkvp = dkv.data_ptr<float>();
      float* drelp = drel.data_ptr<float>();
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<float> scratch(size_t(5 * bs * D + 3 * bs * bs + bs));
        float* qbuf = scratch.data();
        float* dobuf = qbuf + bs * D;
        float* kbuf = dobuf + bs * D;
        float* vbuf = kbuf + bs * D;
        float* dqb = vbuf + bs * D;
        float* pbuf = dqb + bs * D;
        float* dpbuf = pbuf + bs * bs;
        float* tbuf = dpbuf + bs * bs;
        float* di = tbuf + bs * bs;
        for (int64_t c = c0; c < c1; ++c) {
          float* dk_all = dkvp + c * 2 * kv_elems;
          float* dv_all = dk_all + kv_elems;
          float* drel_all = drelp + c * rel_elems;
          // Items are dealt round-robin so that long and short causal rows mix in each chunk.
          for (int64_t item = c; item < items; item += nchunks) {
            const int64_t qt = item % p.Qt, h = (item / p.Qt) % Hq, b = item / (p.Qt * Hq);
            backward_item<scalar_t>(p, qp, kp, vp, gop, op, lp, glp, b, h, qt, qbuf, dobuf,
                                    kbuf, vbuf, pbuf, dpbuf, tbuf, dqb, di, dk_all, dv_all,
                                    drel_all);
            const int64_t r0 = qt * bs, m = std::min(bs, Lq - r0);
            float* dst = dqp + ((b * Hq + h) * Lq + r0) * D;
            const float sc = p.scale;
            for (int64_t e = 0; e < m * D; ++e) dst[e] = dqb[e] * sc;
          }
        }
      });
    });
  } else {
    dq32.zero_();
  }
  at::Tensor sums = dkv.sum(0);  // (2, kv_elems)
  // Copies: dk and dv must not share the storage of `sums` (the schema says fresh tensors).
  at::Tensor dk = sums[0].view({B, Hkv, Lk, D}).to(q_in.scalar_type(), false, true);
  at::Tensor dv = sums[1].view({B, Hkv, Lk, D}).to(q_in.scalar_type(), false, true);
  // drel: the gradient of rel_bias, in its dtype; an empty tensor (dtype of q) without one.
  at::Tensor drel_out = p.rel ? drel.sum(0).view(rel_bias->sizes()).to(rel_bias->scalar_type())
                              : at::empty({0}, q_in.options());
  return {dq32.to(q_in.scalar_type()), dk, dv, drel_out};
}

}  // namespace

// The tile products the prefill forward runs here, for `python -m fastarch.info`: bf16 "amx"
// (brgemm on AMX tiles), "bf16-dot" (vdpbf16ps) or "fp32-tiles"; fp32 "brgemm" or "avx2" /
// "mkl" (gemm_nn / sgemm). Asking runs the one-off checks and the fp32 timing.
std::string cpu_attention_paths() {
  std::string bf16 = "fp32-tiles";
#if defined(FASTARCH_ATTN_BF16_DOT)
  if (attn_bf16_dot_enabled()) bf16 = attn_amx_enabled() ? "amx" : "bf16-dot";
#endif
  const std::string f32 = attn_f32_brgemm() ? "brgemm" : kHaveNN ? "avx2" : "mkl";
#if defined(__AVX512F__)
  const std::string decode = attn_decode_group_enabled() ? ", grouped decode" : "";
#else
  const std::string decode;
#endif
  return "bf16 " + bf16 + ", fp32 " + f32 + decode;
}

// Whether this build has the grouped decode (AVX-512) and it is on (no timing: cheap at import)
bool cpu_attention_grouped_decode() {
#if defined(__AVX512F__)
  return attn_decode_group_enabled();
#else
  return false;
#endif
}

// Whether bf16 prefill tiles run on AMX here (no fp32 timing): BlockSparseAttention leaves plain
// bf16 causal / full attention to SDPA on such CPUs (fastarch/attention/module.py).
bool cpu_attention_amx() {
#if defined(FASTARCH_ATTN_BF16_DOT)
  return attn_bf16_dot_enabled() && attn_amx_enabled();
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(fastarch, CPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cpu);
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward_cpu);
}

}  // namespace fastarch
