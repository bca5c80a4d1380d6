// CPU kernels of the sparse GEMV family (sparse_gemv, sparse_gemv_index, gather_gemv, sparse_mlp).
//
// Layout: the weight of an input-sparse product is input-major, w_t = W^T of shape (in, out), so an
// active input channel i is one contiguous row w_t[i, :]. Skipping a channel skips a whole row of
// memory traffic, which is what pays in a memory-bound decode GEMV.
//
// Work split: the active rows are divided among threads; each thread accumulates into a private
// fp32 buffer of shape (B, out) and the buffers are summed at the end. Rows are consumed four at a
// time so that each pass over the accumulator performs four fused multiply-adds per load/store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aligned.h"

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <limits>
#include <string>
#include <vector>

namespace fastarch {
namespace {

// acc[o] += a0*w0[o] + a1*w1[o] + a2*w2[o] + a3*w3[o]; written so that gcc vectorises it.
template <typename T>
inline void axpy4(float* __restrict acc, const T* __restrict w0, const T* __restrict w1,
                  const T* __restrict w2, const T* __restrict w3, float a0, float a1, float a2,
                  float a3, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* u0 = reinterpret_cast<const uint16_t*>(w0);
    const uint16_t* u1 = reinterpret_cast<const uint16_t*>(w1);
    const uint16_t* u2 = reinterpret_cast<const uint16_t*>(w2);
    const uint16_t* u3 = reinterpret_cast<const uint16_t*>(w3);
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) {
      uint32_t b0 = uint32_t(u0[o]) << 16, b1 = uint32_t(u1[o]) << 16;
      uint32_t b2 = uint32_t(u2[o]) << 16, b3 = uint32_t(u3[o]) << 16;
      float f0, f1, f2, f3;
      std::memcpy(&f0, &b0, 4);
      std::memcpy(&f1, &b1, 4);
      std::memcpy(&f2, &b2, 4);
      std::memcpy(&f3, &b3, 4);
      acc[o] += a0 * f0 + a1 * f1 + a2 * f2 + a3 * f3;
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const _Float16* h0 = reinterpret_cast<const _Float16*>(w0);
    const _Float16* h1 = reinterpret_cast<const _Float16*>(w1);
    const _Float16* h2 = reinterpret_cast<const _Float16*>(w2);
    const _Float16* h3 = reinterpret_cast<const _Float16*>(w3);
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) {
      acc[o] += a0 * float(h0[o]) + a1 * float(h1[o]) + a2 * float(h2[o]) + a3 * float(h3[o]);
    }
  } else {
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) {
      acc[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o];
    }
  }
}

template <typename T>
inline void axpy1(float* __restrict acc, const T* __restrict w, float a, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(w);
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) {
      uint32_t b = uint32_t(u[o]) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      acc[o] += a * f;
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const _Float16* h = reinterpret_cast<const _Float16*>(w);
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) acc[o] += a * float(h[o]);
  } else {
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) acc[o] += a * w[o];
  }
}

template <typename T>
inline float dot(const T* __restrict w, const float* __restrict x, int64_t n) {
  float s = 0.f;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(w);
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) {
      uint32_t b = uint32_t(u[k]) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      s += f * x[k];
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const _Float16* h = reinterpret_cast<const _Float16*>(w);
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += float(h[k]) * x[k];
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += w[k] * x[k];
  }
  return s;
}

template <typename T>
inline void widen(float* __restrict dst, const T* __restrict src, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(src);
    int64_t o = 0;
#if defined(__AVX512F__)
    for (; o + 16 <= n; o += 16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + o));
      __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      _mm512_storeu_ps(dst + o, _mm512_castsi512_ps(w));
    }
#elif defined(__AVX2__)
    for (; o + 8 <= n; o += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + o));
      __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
      _mm256_storeu_ps(dst + o, _mm256_castsi256_ps(w));
    }
#endif
    for (; o < n; ++o) {
      uint32_t b = uint32_t(u[o]) << 16;
      std::memcpy(dst + o, &b, 4);
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const _Float16* h = reinterpret_cast<const _Float16*>(src);
    int64_t o = 0;
#if defined(__F16C__)
    for (; o + 8 <= n; o += 8) {
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + o));
      _mm256_storeu_ps(dst + o, _mm256_cvtph_ps(v));
    }
#endif
    for (; o < n; ++o) dst[o] = float(h[o]);
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

#if defined(__AVX512F__)
// Batch 1, fp32: the same sum as axpy4, with the 4 weight rows prefetched 2 KiB ahead, running on
// into the next 4 rows (n0..n3) near the end, so that no row starts cold. At a full union the
// hardware prefetcher alone left the kernel at 0.85-0.97x of MKL's GEMV on the Sapphire Rapids
// host; a /tmp C++ copy of the loop went from 10.3-11.4 ms to 9.9-10.1 ms over 4096x14336 /
// 14336x4096 with the prefetch.
inline void axpy4_stream(float* __restrict acc, const float* const (&w)[4],
                         const float* const (&next)[4], const float (&a)[4], int64_t n) {
  constexpr int64_t kAhead = 512;  // floats
  const __m512 c0 = _mm512_set1_ps(a[0]), c1 = _mm512_set1_ps(a[1]);
  const __m512 c2 = _mm512_set1_ps(a[2]), c3 = _mm512_set1_ps(a[3]);
  int64_t o = 0;
  for (; o + 16 <= n; o += 16) {
    const int64_t p = o + kAhead;
    for (int i = 0; i < 4; ++i) {
      if (p < n)
        _mm_prefetch(reinterpret_cast<const char*>(w[i] + p), _MM_HINT_T0);
      else if (next[i] != nullptr && p - n < n)
        _mm_prefetch(reinterpret_cast<const char*>(next[i] + (p - n)), _MM_HINT_T0);
    }
    __m512 s = _mm512_loadu_ps(acc + o);
    s = _mm512_fmadd_ps(c0, _mm512_loadu_ps(w[0] + o), s);
    s = _mm512_fmadd_ps(c1, _mm512_loadu_ps(w[1] + o), s);
    s = _mm512_fmadd_ps(c2, _mm512_loadu_ps(w[2] + o), s);
    s = _mm512_fmadd_ps(c3, _mm512_loadu_ps(w[3] + o), s);
    _mm512_storeu_ps(acc + o, s);
  }
  for (; o < n; ++o)
    acc[o] += a[0] * w[0][o] + a[1] * w[1][o] + a[2] * w[2][o] + a[3] * w[3][o];
}

// sum_k w[k] * x[k] over fp32 rows read once from memory (sparse_mlp's gate / up rows at batch 1),
// prefetched 2 KiB ahead and on into the row read next.
inline float dot_stream(const float* __restrict w, const float* __restrict x, int64_t n,
                        const float* next) {
  constexpr int64_t kAhead = 512;
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    for (int64_t p = k + kAhead; p < k + kAhead + 32; p += 16) {
      if (p < n)
        _mm_prefetch(reinterpret_cast<const char*>(w + p), _MM_HINT_T0);
      else if (next != nullptr && p - n < n)
        _mm_prefetch(reinterpret_cast<const char*>(next + (p - n)), _MM_HINT_T0);
    }
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), s1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  for (; k < n; ++k) s += w[k] * x[k];
  return s;
}
#else
inline float dot_stream(const float* w, const float* x, int64_t n, const float*) {
  return dot<float>(w, x, n);
}

inline void axpy4_stream(float* acc, const float* const (&w)[4], const float* const (&)[4],
                         const float (&a)[4], int64_t n) {
  axpy4<float>(acc, w[0], w[1], w[2], w[3], a[0], a[1], a[2], a[3], n);
}
#endif

// Small batches (2..4 rows): acc[b][o] += sum_i a[b][i] * w_i[o] for every b, with the 4 weight
// values of column o widened to fp32 once, in registers, and used for all NB batch rows. This
// avoids the fp32 staging buffer of the larger-batch path, whose extra store and reload cost more
// than they save when the batch is this small (bench/results/sparse_gemv.md, AVX2 box).
template <typename T>
inline float load_f(const T* __restrict p, int64_t o) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t b = uint32_t(reinterpret_cast<const uint16_t*>(p)[o]) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return float(reinterpret_cast<const _Float16*>(p)[o]);
  } else {
    return p[o];
  }
}

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <typename T>
inline __m256 load8_f(const T* __restrict p) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
}
#endif

template <typename T, int NB>
inline void axpy4_nb(float* __restrict acc, int64_t ld, const T* __restrict w0,
                     const T* __restrict w1, const T* __restrict w2, const T* __restrict w3,
                     const float (&a)[4][4], int64_t n) {
  int64_t o0 = 0;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  __m256 c[NB][4];
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < 4; ++i) c[b][i] = _mm256_set1_ps(a[b][i]);
  for (; o0 + 8 <= n; o0 += 8) {
    const __m256 f0 = load8_f<T>(w0 + o0), f1 = load8_f<T>(w1 + o0);
    const __m256 f2 = load8_f<T>(w2 + o0), f3 = load8_f<T>(w3 + o0);
    for (int b = 0; b < NB; ++b) {
      float* p = acc + b * ld + o0;
      __m256 s = _mm256_loadu_ps(p);
      s = _mm256_fmadd_ps(c[b][0], f0, s);
      s = _mm256_fmadd_ps(c[b][1], f1, s);
      s = _mm256_fmadd_ps(c[b][2], f2, s);
      s = _mm256_fmadd_ps(c[b][3], f3, s);
      _mm256_storeu_ps(p, s);
    }
  }
#endif
  for (int64_t o = o0; o < n; ++o) {
    const float f0 = load_f<T>(w0, o), f1 = load_f<T>(w1, o);
    const float f2 = load_f<T>(w2, o), f3 = load_f<T>(w3, o);
    for (int b = 0; b < NB; ++b)
      acc[b * ld + o] += a[b][0] * f0 + a[b][1] * f1 + a[b][2] * f2 + a[b][3] * f3;
  }
}

// Indices, in order, of the columns of x (B rows of n) where active(x[b, i]) holds in some row.
// Flags are or-ed row by row and compacted without a branch (both vectorise): an early-exit scan
// per column mispredicted about every other element at s=0.5 (~1.5 ms at batch 64 x 8192).
template <typename Active>
std::vector<int64_t> active_columns(const float* x, int64_t B, int64_t n, Active active) {
  std::vector<uint8_t> flag(static_cast<size_t>(n), 0);
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * n;
    for (int64_t i = 0; i < n; ++i) flag[i] |= static_cast<uint8_t>(active(xr[i]));
  }
  std::vector<int64_t> cols(static_cast<size_t>(n));
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    cols[k] = i;
    k += flag[i];
  }
  cols.resize(k);
  return cols;
}

// ---- bf16 batches with the bf16 dot instruction (AVX512-BF16) ---------------------------------
// vdpbf16ps adds a.even * b.even + a.odd * b.odd into each fp32 lane: two multiply-adds per lane,
// twice the work of an fp32 FMA. The weight is stored input-major, so the two bf16 values a lane
// needs, w_t[i, o] and w_t[j, o], sit in two different rows. Any two *active* rows i and j are
// paired on the fly: unpacking the 16-bit halves of row i and row j interleaves them into
// (w_t[i, o], w_t[j, o]) pairs, and the coefficient pair (x[b, i], x[b, j]) is one 32-bit
// broadcast. Channels are still skipped one by one, the layout stays the one copy we keep, and no
// fp32 widening is needed.
//
// The unpack works within 128-bit lanes, so the accumulators of a 32-column block hold the
// columns in "unpack order": lo lane 4q+m is column 8q+m, hi lane 4q+m is column 8q+4+m (q < 4,
// m < 4). They are put back in column order once per panel, when the result is written.
//
// Blocking: threads split the output into panels (no partial sums to add up). Two ways to feed
// the instruction, chosen by batch size (AMD Zen 4, 2026-12-01, /tmp micro-benchmarks and
// bench_sparse_gemv.py; figures in bench/RESULTS.md):
//  * direct (B < kPackBatch): pairs are unpacked from the weight rows in the inner loop, 4 batch
//    rows x 64 columns = 16 accumulators in registers, kDirectPairs pairs per pass. Small batches
//    are bound by reading the weight, which this does once, in long runs per row.
//  * packed (B >= kPackBatch): each chunk of kPackPairs pairs is unpacked once into an L1/L2
//    buffer (prefetching the next chunk's rows meanwhile) and every 6-row group of the batch
//    reads it from there: the unpacks are no longer repeated per batch group. 6 rows x 64
//    columns (24 accumulators, 4 vector loads and 6 broadcasts per 24 instructions) rather than
//    2 x 64 (8 accumulators, 6 loads per 8): in cache, one thread, 1024x1024 at batch 64, 3.2
//    against 2.4 G instructions/s (oneDNN's F.linear: 5.7); 4096x14336 / 14336x4096 from memory
//    at batches 16-64, 0.6-0.8x of F.linear against 0.5-0.7x (interleaved, 25 rounds; the
//    host's noise between identical variants was +-0.05).
//    The prefetch addresses are stepped, not divided out of a line counter: two 64-bit
//    divisions per prefetched line cost about as much as the instructions they fed.
//    Chunks of 64 pairs (256 KiB, in L2) rather than 32: half the passes of each accumulator
//    tile through L2 per pair. 2026-12-02, chunk sizes alternated call by call in one process
//    against F.linear (30-40 rounds; 8B and 1B MLP shapes, batches 16 / 32 / 64): 64 pairs was
//    the faster in 11 of 12 cells (+0.02 to +0.12 of F.linear's time), 128 pairs or 512-column
//    panels slower at batches 16-32. In cache (1024x1024, batch 64, one thread) 32 -> 64 pairs
//    took 2.2 -> 2.3 G products/s, where F.linear does 3.1 and the instruction's peak is 3.5.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define FASTARCH_BF16_DOT 1
constexpr int64_t kAccFloats = 65536;  // per-thread accumulator budget (256 KiB, in L2)
constexpr int64_t kDirectPairs = 8;
constexpr int64_t kPackBatch = 12;
constexpr int64_t kPackPairs = 64;
constexpr int kPackGroup = 6;          // packed: 6 batch rows x 64 columns = 24 accumulators
constexpr int64_t kPackPanel = 1024;   // packed chunk: 64 pairs x 1024 columns = 256 KiB

// Round to nearest even, as c10::BFloat16 does, without its branch: a NaN (the index form takes
// coefficients without a threshold test) becomes c10's quiet NaN.
inline uint32_t bf16_bits_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? 0x7FC0u : r;  // NaN stays a (quiet) NaN, as in c10
}

inline __mmask32 tail_mask(int64_t n) {  // the first min(n, 32) of 32 lanes
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : ((__mmask32(1) << n) - 1);
}

// The 4 paired vectors (lo, hi of columns 0-31, lo, hi of columns 32-63) of rows i and j.
inline void pair_rows(const uint16_t* wi, const uint16_t* wj, __mmask32 m0, __mmask32 m1,
                      __m512i (&v)[4]) {
  const __m512i i0 = _mm512_maskz_loadu_epi16(m0, wi), i1 = _mm512_maskz_loadu_epi16(m1, wi + 32);
  const __m512i j0 = _mm512_maskz_loadu_epi16(m0, wj), j1 = _mm512_maskz_loadu_epi16(m1, wj + 32);
  v[0] = _mm512_unpacklo_epi16(i0, j0);
  v[1] = _mm512_unpackhi_epi16(i0, j0);
  v[2] = _mm512_unpacklo_epi16(i1, j1);
  v[3] = _mm512_unpackhi_epi16(i1, j1);
}

// The n <= 32 columns of one block back in column order, from the lo / hi accumulators of the
// paired-vector (unpack) order that pair_rows produces.
inline void store_unpacked32(__m512 lo, __m512 hi, float* dst, int64_t n) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  float col[32];
  _mm512_storeu_ps(col, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(col + 16, _mm512_permutex2var_ps(lo, second, hi));
  std::memcpy(dst, col, sizeof(float) * std::min<int64_t>(32, n));
}

// acc (NB rows of 64 columns, unpack order) += the np pairs of one tile. Packed: pw holds 4
// vectors per pair and xp is pair-major (xp[p * ldx + b]); direct: the pairs are read from the
// weight rows ri / rj (w points at the tile's first column) and xp is batch-major.
template <int NB, bool kPacked>
inline void dot_pairs_tile(float* __restrict acc, int64_t lda, const __m512i* __restrict pw,
                           const uint16_t* __restrict w, int64_t out,
                           const int64_t* __restrict ri, const int64_t* __restrict rj,
                           const uint32_t* __restrict xp, int64_t ldx, int64_t np, __mmask32 m0,
                           __mmask32 m1) {
  __m512 c[NB][4];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < 4; ++v) c[b][v] = _mm512_loadu_ps(acc + b * lda + 16 * v);
  for (int64_t p = 0; p < np; ++p) {
    __m512i v4[4];
    if constexpr (kPacked) {
      for (int v = 0; v < 4; ++v) v4[v] = _mm512_loadu_si512(pw + 4 * p + v);
    } else {
      pair_rows(w + ri[p] * out, w + rj[p] * out, m0, m1, v4);
    }
    for (int b = 0; b < NB; ++b) {
      const uint32_t xv = kPacked ? xp[p * ldx + b] : xp[b * ldx + p];
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xv));
      for (int v = 0; v < 4; ++v) c[b][v] = _mm512_dpbf16_ps(c[b][v], (__m512bh)v4[v], xb);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc + b * lda + 16 * v, c[b][v]);
}

template <int NB, bool kPacked>
inline void dot_pairs_group(int64_t nb, float* acc, int64_t lda, const __m512i* pw,
                            const uint16_t* w, int64_t out, const int64_t* ri, const int64_t* rj,
                            const uint32_t* xp, int64_t ldx, int64_t np, __mmask32 m0,
                            __mmask32 m1) {
  if constexpr (NB > 1) {
    if (nb < NB) {
      dot_pairs_group<NB - 1, kPacked>(nb, acc, lda, pw, w, out, ri, rj, xp, ldx, np, m0, m1);
      return;
    }
  }
  dot_pairs_tile<NB, kPacked>(acc, lda, pw, w, out, ri, rj, xp, ldx, np, m0, m1);
}

// ---- bf16 batches on AMX tiles (Intel Sapphire Rapids and later) ------------------------------
// On CPUs with AMX, oneDNN's F.linear runs bf16 batches on the tile unit, far beyond what
// vdpbf16ps reaches (6-row register tiles above: 0.2-0.6x of F.linear at batches 8-64). The
// packed buffer above is already what TDPBF16PS wants for its B operand: row p of a tile is the
// 16 (w_t[i_p, o], w_t[j_p, o]) pairs of one paired vector, so a tile of 16 pairs is one strided
// load of it. The A operand is the coefficient pairs, batch-major; C tiles of 16 columns hold
// the accumulators in the same unpack order as the vector path, so the write-back is shared.
// Tiles: tmm0-3 accumulate 64 columns of up to 16 batch rows, tmm4 the coefficients, tmm5-7 the
// weight pairs. The tile data state is asked of the kernel once (Linux >= 5.16); where it is
// refused, or FASTARCH_GEMV_AMX=0, the vector path runs.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) || __GNUC__ >= 11)
#define FASTARCH_AMX 1
#define FASTARCH_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
constexpr int kAmxRows = 16;  // batch rows per tile

bool amx_usable() {
  static const bool ok = [] {
    const char* e = std::getenv("FASTARCH_GEMV_AMX");
    if (e && std::string(e) == "0") return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;  // AMX-TILE, AMX-BF16
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;   // arch_prctl, asm/prctl.h
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Batch rows from which the AMX path runs (FASTARCH_GEMV_AMX_FROM overrides, for measuring).
// 2026-12-03, Xeon with AMX (Sapphire Rapids class, 2 cores of a shared VM), sparse_gemv against
// F.linear, best of three alternating processes, 14336x4096 / 4096x14336 / 2048x8192 / 4096x4096,
// s = 0 and 0.5: batch 2-4 vector path 0.73-2.23x, AMX 0.59-1.09x; batch 8 vector 0.49-0.69x,
// AMX 0.57-0.88x; batches 12-64 vector 0.24-0.48x, AMX 0.57-1.18x. (The packing is memory-bound
// and the tile work does not overlap it: packing alone took ~7 ms of 4096x14336 at batch 8, the
// tile work alone ~1 ms, both ~9-11 ms.) 2026-12-04, with the streaming order for batches of up
// to 16 (amx_stream_pairs), same host and shapes, two alternating runs, AMX from 2 rows against
// from 8: batch 2 0.86-1.20x / 1.06-1.61x (s = 0 / 0.5) against 0.87-1.21x / 1.03-1.55x, batch 4
// 0.78-1.20x against 0.79-1.14x, batch 6 0.87-1.16x against 0.59-0.96x: from 2 rows.
int64_t amx_batch_from() {
  static const int64_t from = [] {
    const char* e = std::getenv("FASTARCH_GEMV_AMX_FROM");
    return e ? std::max<int64_t>(2, std::atoll(e)) : int64_t(2);
  }();
  return from;
}

FASTARCH_AMX_TARGET void amx_begin(int m) {  // m batch rows in tmm0-4, 16 pairs in tmm5-7
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = static_cast<uint8_t>(i < 5 ? m : 16);
  }
  // GCC's _tile_loadconfig names only 8 bytes of its operand as read: without this barrier the
  // stores to the rest of cfg may be dropped as dead (a standalone test faulted on ldtilecfg)
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

FASTARCH_AMX_TARGET void amx_end() { _tile_release(); }

// The four C tiles of 64 columns (tmm0-3) from / to acc (row stride sc bytes), and one step of
// 16 pairs on them: tmm4 holds the coefficients, b the 4 paired vectors per pair (row stride sb).
FASTARCH_AMX_TARGET inline void amx_load_c4(const float* acc, int64_t sc) {
  _tile_loadd(0, acc, sc);
  _tile_loadd(1, acc + 16, sc);
  _tile_loadd(2, acc + 32, sc);
  _tile_loadd(3, acc + 48, sc);
}

FASTARCH_AMX_TARGET inline void amx_store_c4(float* acc, int64_t sc) {
  _tile_stored(0, acc, sc);
  _tile_stored(1, acc + 16, sc);
  _tile_stored(2, acc + 32, sc);
  _tile_stored(3, acc + 48, sc);
}

FASTARCH_AMX_TARGET inline void amx_dp4(const __m512i* b, int64_t sb) {
  _tile_loadd(5, b, sb);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(6, b + 1, sb);
  _tile_dpbf16ps(1, 4, 6);
  _tile_loadd(7, b + 2, sb);
  _tile_dpbf16ps(2, 4, 7);
  _tile_loadd(5, b + 3, sb);
  _tile_dpbf16ps(3, 4, 5);
}

// acc (m rows of 64 columns, unpack order, row stride lda floats) += the np16 pairs of one packed
// tile (pw: 4 vectors per pair) weighted by xp (m rows of pairs at row stride ldx), np16 % 16 == 0.
FASTARCH_AMX_TARGET void amx_pairs_tile(float* acc, int64_t lda, const __m512i* pw,
                                        const uint32_t* xp, int64_t ldx, int64_t np16) {
  const int64_t sc = lda * 4, sa = ldx * 4, sb = 4 * 64;
  amx_load_c4(acc, sc);
  for (int64_t p = 0; p < np16; p += 16) {
    _tile_loadd(4, xp + p, sa);
    amx_dp4(pw + 4 * p, sb);
  }
  amx_store_c4(acc, sc);
}

// Batches of up to 16 rows (32 for up to 8192 columns), streaming: the pairs are split over the
// threads (each thread keeps accumulators for every column, m x lda floats, summed at the end)
// and each chunk of 16 pairs walks its 32 weight rows from end to end, 64 columns at a time: the
// 16 x 64 pairs of a tile are unpacked into an L1 buffer and go straight into the tile products.
// The panel loop below instead packs 64 pairs of a 1-2K column panel ahead of the tile work: 128
// short row segments per chunk, which the hardware prefetchers follow far worse. /tmp
// micro-benchmark, 2026-12-04, the Xeon with AMX, 2 threads, batch 8: unpacking alone 45-54 GB/s
// in this order against 24-36 GB/s in panels; with the tile work 3.7-5.5 ms of 4096x14336 (the
// panel kernel ~8 ms, F.linear ~6 ms).
// Tiles of 8 rows up to batch 8 halve the accumulator traffic (3.7-3.9 ms against
// 4.4-5.5 ms with 16 rows at that shape). Batches of 17-32 (two row groups, 32 columns at a time)
// only up to 8192 columns: batch 32, 4096x4096 1.6-2.1 ms against F.linear's ~1.8 (the panel
// loop ~2.5), 2048 -> 8192 1.6-1.9 against ~2.2; at 4096 -> 14336 the 1.8 MB of accumulators per
// thread leave L2 and it took 13.7 ms against F.linear's ~6.4.
// Column panels within the streaming order (rows walked 2-4K columns at a time) were slower still:
// 8.7-11 ms of 4096x14336 at batch 8.
// acc (m x lda, unpack order) += the pairs [p0, p1) of (ri, rj) weighted by xp (batch-major, row
// stride ldx; pairs past the end of the call are zero there). p1 - p0 is a multiple of 16 except
// for the call's last pairs.
constexpr int64_t kStreamAhead = 256;  // elements (512 bytes)
constexpr int64_t kAmxStream32MaxOut = 8192;  // batches of 17-32: columns up to this
FASTARCH_AMX_TARGET void amx_stream_pairs(float* acc, int64_t lda, const uint16_t* w, int64_t out,
                                          const int64_t* ri, const int64_t* rj,
                                          const uint32_t* xp, int64_t ldx, int64_t p0, int64_t p1,
                                          int m) {
  alignas(64) __m512i buf[16 * 4];
  const int64_t sc = lda * 4, sb = 4 * 64;
  amx_begin(m == 32 ? 16 : m);  // m = 32: every tile 16 x 64 bytes
  for (int64_t q0 = p0; q0 < p1; q0 += 16) {
    const int64_t np = std::min<int64_t>(16, p1 - q0);
    for (int64_t p = np; p < 16; ++p)  // zeros, not stale pairs: 0 x NaN would be NaN
      for (int v = 0; v < 4; ++v) buf[4 * p + v] = _mm512_setzero_si512();
    _tile_loadd(4, xp + q0, ldx * 4);
    if (m == 32) _tile_loadd(5, xp + 16 * ldx + q0, ldx * 4);
    for (int64_t c = 0; c < out; c += 64) {
      const __mmask32 m0 = tail_mask(out - c), m1 = tail_mask(out - c - 32);
      for (int64_t p = 0; p < np; ++p) {
        const uint16_t* wi = w + ri[q0 + p] * out + c;
        const uint16_t* wj = w + rj[q0 + p] * out + c;
        // 32 rows at once are more streams than the L2 prefetcher follows well: each row's next
        // lines are asked for 512 bytes ahead (4 tiles; 128 bytes ahead was slower, 2 KiB no
        // better; +15% at 4096x14336 and 14336x4096, batch 8, micro-benchmark). A prefetch past
        // the end of a row is harmless.
        _mm_prefetch(reinterpret_cast<const char*>(wi + kStreamAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wi + kStreamAhead + 32), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wj + kStreamAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wj + kStreamAhead + 32), _MM_HINT_T0);
        __m512i v4[4];
        pair_rows(wi, wj, m0, m1, v4);
        for (int v = 0; v < 4; ++v) _mm512_store_si512(buf + 4 * p + v, v4[v]);
      }
      float* a = acc + c;
      if (m == 32) {  // two row groups (tmm4 / tmm5), 32 columns at a time
        for (int h = 0; h < 2; ++h) {
          float* a0 = a + 32 * h;
          float* a1 = a0 + 16 * lda;
          _tile_loadd(0, a0, sc);
          _tile_loadd(1, a0 + 16, sc);
          _tile_loadd(2, a1, sc);
          _tile_loadd(3, a1 + 16, sc);
          _tile_loadd(6, buf + 2 * h, sb);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          _tile_loadd(7, buf + 2 * h + 1, sb);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
          _tile_stored(0, a0, sc);
          _tile_stored(1, a0 + 16, sc);
          _tile_stored(2, a1, sc);
          _tile_stored(3, a1 + 16, sc);
        }
        continue;
      }
      amx_load_c4(a, sc);
      amx_dp4(buf, sb);
      amx_store_c4(a, sc);
    }
  }
  amx_end();
}

// FASTARCH_GEMV_AMX_STREAM=0: batches of up to 16 rows through the panel loop instead.
bool amx_stream_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_GEMV_AMX_STREAM");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// y (B <= 32 rows, out) = the P pairs (ri, rj) weighted by xp (batch-major, row stride ldx, zero
// past P and past B). Returns y.
at::Tensor amx_stream_rows(at::Tensor y, int64_t B, const int64_t* ri, const int64_t* rj,
                           int64_t P, const uint16_t* w, int64_t out, const uint32_t* xp,
                           int64_t ldx) {
  const int m = B <= 8 ? 8 : B <= 16 ? 16 : 32;
  const int64_t lda = (out + 63) / 64 * 64 + 16;  // + one line: rows not 4 KiB apart (see ldx)
  // Below about a million multiply-adds per thread a second thread costs more than it saves;
  // each thread's range is whole chunks of 16 pairs.
  const int64_t chunks = (P + 15) / 16;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>({int64_t(at::get_num_threads()), chunks, (2 * P * out * B) >> 20}));
  const int64_t per = (chunks + nthreads - 1) / nthreads * 16;
  std::vector<aligned_vector<float>> accs(static_cast<size_t>(nthreads));
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = std::min(P, t * per), p1 = std::min(P, p0 + per);
      accs[t].assign(static_cast<size_t>(m * lda), 0.f);
      if (p0 < p1) amx_stream_pairs(accs[t].data(), lda, w, out, ri, rj, xp, ldx, p0, p1, m);
    }
  });
  // Sum of the threads' accumulators, back in column order (blocks of 32 columns from their lo /
  // hi vectors, as in the panel loop).
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (out + 31) / 32;
  at::parallel_for(0, B * blocks, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, t0 = (i % blocks) * 32;
      __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
      for (int64_t t = 0; t < nthreads; ++t) {
        const float* a = accs[t].data() + b * lda + t0;
        lo = _mm512_add_ps(lo, _mm512_loadu_ps(a));
        hi = _mm512_add_ps(hi, _mm512_loadu_ps(a + 16));
      }
      store_unpacked32(lo, hi, yp + b * out + t0, out - t0);
    }
  });
  return y;
}
#endif

// y (B, out) fp32 = sum_k xa[b, k] * w_t[rows[k], :], for bf16 w_t and B >= 2.
at::Tensor rows_dot_bf16(const float* xa, int64_t B, const int64_t* rows, int64_t K,
                         const c10::BFloat16* w_in, int64_t out) {
  auto y = at::zeros({B, out}, at::TensorOptions().dtype(at::kFloat));
  if (K == 0 || out == 0 || B == 0) return y;
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_in);
#if defined(FASTARCH_AMX)
  const bool amx = B >= amx_batch_from() && amx_usable();
#else
  constexpr bool amx = false;
#endif
  const bool packed = amx || B >= kPackBatch;
  // AMX: batch rows in tiles of 16, pairs in tiles of 16; the coefficients are zero-padded to
  // whole tiles (Bp x Pp), as are the accumulators. (In this panel loop tiles of fewer rows were
  // no faster; the streaming order takes 8-row tiles up to batch 8.)
  const int64_t m = amx ? kAmxRows : 0;
  const int64_t Bp = amx ? (B + m - 1) / m * m : B;
  // Rows with a non-zero coefficient in some batch row, paired in order; an odd one out is paired
  // with itself and a zero coefficient.
  const std::vector<int64_t> keep = active_columns(xa, B, K, [](float v) { return v != 0.f; });
  const int64_t nkeep = static_cast<int64_t>(keep.size());
  const int64_t P = (nkeep + 1) / 2;
  if (P == 0) return y;
  const int64_t Pp = amx ? (P + 15) / 16 * 16 : P;
  // Row strides of the tiles' A and C operands: a multiple of 4 KiB puts all 16 rows of a tile
  // in one L1 set, so AMX rows get one extra cache line.
  const int64_t ldx = amx ? Pp + 16 : P;
  std::vector<int64_t> ri(P), rj(P);
  for (int64_t p = 0; p < P; ++p) {
    ri[p] = rows[keep[2 * p]];
    rj[p] = rows[keep[std::min(2 * p + 1, nkeep - 1)]];
  }
  // Coefficient pairs (x[b, ka], x[b, kb]) as two bf16 in one 32-bit word, pair-major for the
  // packed path and batch-major for the direct one and AMX; split over the threads (B * P
  // conversions were a serial ~1 ms at batch 64 over 8192 inputs).
  aligned_vector<uint32_t> xp(static_cast<size_t>(Bp * ldx), 0u);
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xr = xa + b * K;
      for (int64_t p = 0; p < P; ++p) {
        const bool pair = 2 * p + 1 < nkeep;
        const uint32_t lo = bf16_bits_rne(xr[keep[2 * p]]);
        const uint32_t hi = pair ? bf16_bits_rne(xr[keep[2 * p + 1]]) : 0u;
        xp[amx ? b * ldx + p : packed ? p * B + b : b * P + p] = lo | (hi << 16);
      }
    }
  });
#if defined(FASTARCH_AMX)
  if (amx && (B <= kAmxRows || (B <= 2 * kAmxRows && out <= kAmxStream32MaxOut)) &&
      amx_stream_enabled())
    return amx_stream_rows(y, B, ri.data(), rj.data(), P, w, out, xp.data(), ldx);
#endif
  // Below about a million multiply-adds per thread a second thread costs more than it saves.
  const int64_t work = 2 * P * out * B;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>({int64_t(at::get_num_threads()), (out + 63) / 64, work >> 20}));
  // Panels: as wide as the buffers allow (long runs of each weight row for the prefetcher), a
  // multiple of the thread count, of 64 columns.
  int64_t widest = std::max<int64_t>(64, ((amx ? 2 : 1) * kAccFloats / Bp) / 64 * 64);
  widest = std::min(widest, amx ? 2 * kPackPanel : packed ? kPackPanel : widest);
  int64_t panels = std::max<int64_t>(nthreads, (out + widest - 1) / widest);
  panels = (panels + nthreads - 1) / nthreads * nthreads;
  const int64_t panel_w = std::max<int64_t>(64, ((out + panels - 1) / panels + 63) / 64 * 64);
  panels = (out + panel_w - 1) / panel_w;
  const int64_t chunk = packed ? kPackPairs : kDirectPairs;
  const int64_t G = amx ? m : packed ? kPackGroup : 4;  // batch rows per register / AMX tile
  const int64_t tiles_max = panel_w / 64;
  const int64_t lda = amx ? panel_w + 16 : panel_w;  // accumulator row stride (see ldx)
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels, (panels + nthreads - 1) / nthreads, [&](int64_t p0, int64_t p1) {
    aligned_vector<float> acc(static_cast<size_t>(Bp * lda));
    // 64-byte aligned buffer of paired vectors: [tile][pair][4]
    std::vector<__m512i> pwbuf(packed ? static_cast<size_t>(tiles_max * chunk * 4) : 0);
#if defined(FASTARCH_AMX)
    if (amx) amx_begin(static_cast<int>(m));  // tile state is per thread
#endif
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t c0 = panel * panel_w, ncol = std::min(panel_w, out - c0);
      const int64_t tiles = (ncol + 63) / 64;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t q0 = 0; q0 < P; q0 += chunk) {
        const int64_t np = std::min(chunk, P - q0);
        const int64_t np16 = (np + 15) / 16 * 16;  // AMX: whole tiles of pairs, zero-padded
        if (packed) {
          for (int64_t p = 0; p < np; ++p) {
            const uint16_t* wi = w + ri[q0 + p] * out + c0;
            const uint16_t* wj = w + rj[q0 + p] * out + c0;
            for (int64_t t = 0; t < tiles; ++t) {
              __m512i v4[4];
              pair_rows(wi + 64 * t, wj + 64 * t, tail_mask(ncol - 64 * t),
                        tail_mask(ncol - 64 * t - 32), v4);
              __m512i* d = pwbuf.data() + (t * chunk + p) * 4;
              for (int v = 0; v < 4; ++v) _mm512_storeu_si512(d + v, v4[v]);
            }
          }
          if (amx) {
            for (int64_t t = 0; t < tiles; ++t)
              for (int64_t p = np; p < np16; ++p)
                for (int v = 0; v < 4; ++v)
                  _mm512_storeu_si512(pwbuf.data() + (t * chunk + p) * 4 + v, _mm512_setzero_si512());
          }
        }
        // The next chunk's rows (this panel's slice) are prefetched into L2 across the calls of
        // this one, so that its packing does not wait on memory.
        const int64_t nq = q0 + chunk, nnp = packed ? std::min(chunk, P - nq) : 0;
        const int64_t lines_row = (ncol + 31) / 32;
        // (AMX: not at all; spread between the short tile calls, the prefetches only slowed the
        // packing down, 2026-12-03, /tmp micro-benchmark on the Sapphire Rapids host)
        const int64_t lines = nnp > 0 && !amx ? 2 * nnp * lines_row : 0;
        const int64_t ngroups = (Bp + G - 1) / G;
        const int64_t per_call = (lines + tiles * ngroups - 1) / std::max<int64_t>(1, tiles * ngroups);
        int64_t line = 0, pf_r = 0, pf_l = 0;  // line = pf_r * lines_row + pf_l (no divisions)
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t t0 = 64 * t;
          const __mmask32 m0 = tail_mask(ncol - t0), m1 = tail_mask(ncol - t0 - 32);
          const uint16_t* wt = w + c0 + t0;
          const __m512i* pw = pwbuf.data() + t * chunk * 4;
          for (int64_t b0 = 0; b0 < Bp; b0 += G) {
            for (int64_t e = 0; e < per_call && line < lines; ++e, ++line) {
              const int64_t row = (pf_r & 1) ? rj[nq + (pf_r >> 1)] : ri[nq + (pf_r >> 1)];
              _mm_prefetch(reinterpret_cast<const char*>(w + row * out + c0 + 32 * pf_l),
                           _MM_HINT_T1);
              if (++pf_l == lines_row) {
                pf_l = 0;
                ++pf_r;
              }
            }
            float* a = acc.data() + b0 * lda + t0;
#if defined(FASTARCH_AMX)
            if (amx) {
              amx_pairs_tile(a, lda, pw, xp.data() + b0 * ldx + q0, ldx, np16);
              continue;
            }
#endif
            if (packed) {
              dot_pairs_group<kPackGroup, true>(B - b0, a, lda, pw, nullptr, out, nullptr,
                                                nullptr, xp.data() + q0 * B + b0, B, np, m0, m1);
            } else {
              dot_pairs_group<4, false>(B - b0, a, lda, nullptr, wt, out, &ri[q0], &rj[q0],
                                        xp.data() + b0 * P + q0, P, np, m0, m1);
            }
          }
        }
      }
      // Back to column order, blocks of 32 columns.
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t0 = 0; t0 < ncol; t0 += 32) {
          const float* a = acc.data() + b * lda + t0;
          store_unpacked32(_mm512_loadu_ps(a), _mm512_loadu_ps(a + 16), yp + b * out + c0 + t0,
                           ncol - t0);
        }
      }
    }
#if defined(FASTARCH_AMX)
    if (amx) amx_end();
#endif
  });
  return y;
}

// out[b] = sum_k row[k] * x[b, k] for NB batch rows of bf16 x, straight from the bf16 values
// (each lane of vdpbf16ps takes two neighbouring k): no widening, twice the work per instruction.
template <int NB>
inline void dot_rows_tile(const uint16_t* __restrict row, const uint16_t* __restrict x,
                          int64_t ldx, int64_t n, float* __restrict out) {
  __m512 c[NB][2];
  for (int b = 0; b < NB; ++b) c[b][0] = c[b][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + k);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(row + k + 32);
    for (int b = 0; b < NB; ++b) {
      c[b][0] = _mm512_dpbf16_ps(c[b][0], w0, (__m512bh)_mm512_loadu_si512(x + b * ldx + k));
      c[b][1] = _mm512_dpbf16_ps(c[b][1], w1, (__m512bh)_mm512_loadu_si512(x + b * ldx + k + 32));
    }
  }
  for (; k < n; k += 32) {
    const __mmask32 m = tail_mask(n - k);
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, row + k);
    for (int b = 0; b < NB; ++b)
      c[b][0] = _mm512_dpbf16_ps(c[b][0], w0,
                                 (__m512bh)_mm512_maskz_loadu_epi16(m, x + b * ldx + k));
  }
  for (int b = 0; b < NB; ++b) out[b] = _mm512_reduce_add_ps(_mm512_add_ps(c[b][0], c[b][1]));
}

inline void dot_rows_bf16(const c10::BFloat16* row, const c10::BFloat16* x, int64_t B,
                          int64_t n, float* out) {
  const uint16_t* r = reinterpret_cast<const uint16_t*>(row);
  const uint16_t* xu = reinterpret_cast<const uint16_t*>(x);
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) dot_rows_tile<4>(r, xu + b * n, n, n, out + b);
  switch (B - b) {
    case 3: dot_rows_tile<3>(r, xu + b * n, n, n, out + b); break;
    case 2: dot_rows_tile<2>(r, xu + b * n, n, n, out + b); break;
    case 1: dot_rows_tile<1>(r, xu + b * n, n, n, out + b); break;
    default: break;
  }
}

// out[r * ldo + b] = sum_k rows[r][k] * x[b, k] for 4 rows at once: each 32-k step of x is loaded
// once for the 4 rows (the one-row tile loads the whole input again per row, which made the
// gate / up products of sparse_mlp at batch 8 load-bound on x rather than on the weight).
template <int NB>
inline void dot_rows4_tile(const uint16_t* const* rows, const uint16_t* __restrict x, int64_t ldx,
                           int64_t n, float* __restrict out, int64_t ldo) {
  __m512 c[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) c[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 32) {
    const __mmask32 m = tail_mask(n - k);
    __m512bh w[4];
    for (int r = 0; r < 4; ++r) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, rows[r] + k);
    for (int b = 0; b < NB; ++b) {
      const __m512bh xb = (__m512bh)_mm512_maskz_loadu_epi16(m, x + b * ldx + k);
      for (int r = 0; r < 4; ++r) c[r][b] = _mm512_dpbf16_ps(c[r][b], w[r], xb);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) out[r * ldo + b] = _mm512_reduce_add_ps(c[r][b]);
}

// out (4, B) = the B dot products of each of the 4 rows.
inline void dot_rows4_bf16(const uint16_t* const* rows, const c10::BFloat16* x, int64_t B,
                           int64_t n, float* out) {
  const uint16_t* xu = reinterpret_cast<const uint16_t*>(x);
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) dot_rows4_tile<4>(rows, xu + b * n, n, n, out + b, B);
  switch (B - b) {
    case 3: dot_rows4_tile<3>(rows, xu + b * n, n, n, out + b, B); break;
    case 2: dot_rows4_tile<2>(rows, xu + b * n, n, n, out + b, B); break;
    case 1: dot_rows4_tile<1>(rows, xu + b * n, n, n, out + b, B); break;
    default: break;
  }
}

// FASTARCH_GEMV_BF16_DOT=0 turns the bf16-dot kernels off (the widening kernels run instead), for
// same-machine comparisons and to test those paths on such CPUs.
bool bf16_dot_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTARCH_GEMV_BF16_DOT");
    return !(e && std::string(e) == "0");
  }();
  return on;
}
#endif

// ---- batches of fp32 / fp16 (and bf16 without the bf16 dot) on AVX-512: register tiles --------
// The staging path in rows_axpy below re-reads and re-writes each batch row's accumulators for
// every 4 weight rows, so batches of 8+ are bound by L1/L2 traffic (fp16 0.25-0.6x of F.linear
// at batches 8-64 on the Sapphire Rapids host). Here, as in the packed bf16 path, each chunk of
// active rows is widened once into an fp32 buffer ([tile of 64 columns][row][64]) and every
// 6-row group of the batch runs over it with 6 x 64 accumulators in registers: 4 vector loads and
// 6 broadcasts feed 24 FMAs.
#if defined(__AVX512F__)
#define FASTARCH_TILED_FMA 1
constexpr int kTiledGroup = 6;
constexpr int64_t kTiledChunk = 64;    // rows per chunk
constexpr int64_t kTiledPanel = 1024;  // columns per panel: chunk buffer 64 x 1024 x 4 B = 256 KiB

template <typename T>
inline __m512 load16_f(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_maskz_loadu_ps(m, p);
  }
}

inline __mmask16 tail_mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// acc (NB rows of 64 columns, row stride lda) += sum_k xk[k * ldx + b] * pw[k * 64 + c].
template <int NB>
inline void fma_tile(float* __restrict acc, int64_t lda, const float* __restrict pw,
                     const float* __restrict xk, int64_t ldx, int64_t nk) {
  __m512 c[NB][4];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < 4; ++v) c[b][v] = _mm512_loadu_ps(acc + b * lda + 16 * v);
  for (int64_t k = 0; k < nk; ++k) {
    const float* wk = pw + 64 * k;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    const __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
    for (int b = 0; b < NB; ++b) {
      const __m512 xb = _mm512_set1_ps(xk[k * ldx + b]);
      c[b][0] = _mm512_fmadd_ps(w0, xb, c[b][0]);
      c[b][1] = _mm512_fmadd_ps(w1, xb, c[b][1]);
      c[b][2] = _mm512_fmadd_ps(w2, xb, c[b][2]);
      c[b][3] = _mm512_fmadd_ps(w3, xb, c[b][3]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(acc + b * lda + 16 * v, c[b][v]);
}

template <int NB>
inline void fma_group(int64_t nb, float* acc, int64_t lda, const float* pw, const float* xk,
                      int64_t ldx, int64_t nk) {
  if constexpr (NB > 1) {
    if (nb < NB) {
      fma_group<NB - 1>(nb, acc, lda, pw, xk, ldx, nk);
      return;
    }
  }
  fma_tile<NB>(acc, lda, pw, xk, ldx, nk);
}

// The rows some batch row uses (into keep) and their coefficients, row-major: xk[k * B + b].
inline std::vector<float> used_coefficients(const float* xa, int64_t B, int64_t K,
                                            std::vector<int64_t>& keep) {
  keep = active_columns(xa, B, K, [](float v) { return v != 0.f; });
  const int64_t nk = static_cast<int64_t>(keep.size());
  std::vector<float> xk(static_cast<size_t>(nk * B));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < nk; ++k) xk[k * B + b] = xa[b * K + keep[k]];
  return xk;
}

template <typename T>
at::Tensor rows_fma_stream(at::Tensor y, int64_t B, const int64_t* rows,
                           const std::vector<int64_t>& keep, const std::vector<float>& xk,
                           const T* w, int64_t out);
int64_t stream_batch_upto(bool fp32);

// y (B, out) fp32 = sum_k xa[b, k] * w_t[rows[k], :]: up to stream_batch_upto rows in streaming
// order (rows_fma_stream), else register tiles over column panels.
template <typename T>
at::Tensor rows_fma_tiled(const float* xa, int64_t B, const int64_t* rows, int64_t K, const T* w,
                          int64_t out) {
  auto y = at::zeros({B, out}, at::TensorOptions().dtype(at::kFloat));
  if (K == 0 || out == 0 || B == 0) return y;
  std::vector<int64_t> keep;
  const std::vector<float> xk = used_coefficients(xa, B, K, keep);
  const int64_t nk = static_cast<int64_t>(keep.size());
  if (nk == 0) return y;
  if (B <= stream_batch_upto(std::is_same_v<T, float>))
    return rows_fma_stream<T>(std::move(y), B, rows, keep, xk, w, out);
  const int64_t work = nk * out * B;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>({int64_t(at::get_num_threads()), (out + 63) / 64, work >> 20}));
  int64_t panels = std::max<int64_t>(nthreads, (out + kTiledPanel - 1) / kTiledPanel);
  panels = (panels + nthreads - 1) / nthreads * nthreads;
  const int64_t panel_w = std::max<int64_t>(64, ((out + panels - 1) / panels + 63) / 64 * 64);
  panels = (out + panel_w - 1) / panel_w;
  const int64_t lda = panel_w + 16;  // not a multiple of 4 KiB: rows in different L1 sets
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels, (panels + nthreads - 1) / nthreads, [&](int64_t p0, int64_t p1) {
    aligned_vector<float> acc(static_cast<size_t>(B * lda));
    std::vector<float> pw(static_cast<size_t>(panel_w / 64 * kTiledChunk * 64));
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t c0 = panel * panel_w, ncol = std::min(panel_w, out - c0);
      const int64_t tiles = (ncol + 63) / 64;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k0 = 0; k0 < nk; k0 += kTiledChunk) {
        const int64_t kc = std::min(kTiledChunk, nk - k0);
        for (int64_t k = 0; k < kc; ++k) {  // widen: each row's slice read once, in order
          const T* wr = w + rows[keep[k0 + k]] * out + c0;
          for (int64_t t = 0; t < tiles; ++t) {
            float* d = pw.data() + (t * kTiledChunk + k) * 64;
            for (int v = 0; v < 4; ++v) {
              const int64_t o = 64 * t + 16 * v;
              _mm512_storeu_ps(d + 16 * v, load16_f<T>(wr + o, tail_mask16(ncol - o)));
            }
          }
        }
        for (int64_t t = 0; t < tiles; ++t) {
          const float* pt = pw.data() + t * kTiledChunk * 64;
          for (int64_t b0 = 0; b0 < B; b0 += kTiledGroup)
            fma_group<kTiledGroup>(B - b0, acc.data() + b0 * lda + 64 * t, lda, pt,
                                   xk.data() + k0 * B + b0, B, kc);
        }
      }
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(yp + b * out + c0, acc.data() + b * lda, sizeof(float) * ncol);
    }
  });
  return y;
}

// The same products in streaming order (as amx_stream_pairs for bf16): the active rows are split
// over the threads, each thread keeps accumulators for every column (B x lda floats, summed at
// the end), and each chunk of 16 rows is walked from end to end, 64 columns at a time for up to 4
// batch rows, else 32, with each row prefetched 512 bytes ahead. At each column step every group
// of up to 8 batch rows (NB x V accumulators in registers) takes the chunk's slice from L1.
template <typename T, int NB, int V>
inline void fma_stream_group(float* __restrict acc, int64_t lda, const T* const* __restrict wr,
                             int64_t kc, const float* __restrict xk, int64_t ldk, int64_t c,
                             int64_t ncol) {
  __m512 a[NB][V];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < V; ++v) a[b][v] = _mm512_loadu_ps(acc + b * lda + c + 16 * v);
  __mmask16 mk[V];
  for (int v = 0; v < V; ++v) mk[v] = tail_mask16(ncol - c - 16 * v);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load16_f<T>(wr[k] + c + 16 * v, mk[v]);
    for (int b = 0; b < NB; ++b) {
      const __m512 xb = _mm512_set1_ps(xk[k * ldk + b]);
      for (int v = 0; v < V; ++v) a[b][v] = _mm512_fmadd_ps(xb, wv[v], a[b][v]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + b * lda + c + 16 * v, a[b][v]);
}

// fma_stream_group for nb <= NB batch rows
template <typename T, int NB, int V>
inline void fma_stream_rows(int64_t nb, float* acc, int64_t lda, const T* const* wr, int64_t kc,
                            const float* xk, int64_t ldk, int64_t c, int64_t out) {
  if constexpr (NB > 1) {
    if (nb < NB) {
      fma_stream_rows<T, NB - 1, V>(nb, acc, lda, wr, kc, xk, ldk, c, out);
      return;
    }
  }
  fma_stream_group<T, NB, V>(acc, lda, wr, kc, xk, ldk, c, out);
}

// acc (B x lda) += the kc rows wr weighted by xk (kc x B), column steps of 16 V
template <typename T, int V>
inline void fma_stream_chunk(int64_t B, float* acc, int64_t lda, const T* const* wr, int64_t kc,
                             const float* xk, int64_t out) {
  constexpr int64_t step = 16 * V;
  constexpr int64_t ahead = 512 / sizeof(T);
  for (int64_t c = 0; c < out; c += step) {
    for (int64_t k = 0; k < kc; ++k)  // the step's lines, 512 bytes ahead
      for (int64_t l = 0; l < step; l += 64 / int64_t(sizeof(T)))
        _mm_prefetch(reinterpret_cast<const char*>(wr[k] + c + ahead + l), _MM_HINT_T0);
    constexpr int G = V == 4 ? 4 : 8;  // batch rows per group: G x V <= 16 accumulators
    for (int64_t b0 = 0; b0 < B; b0 += G)
      fma_stream_rows<T, G, V>(B - b0, acc + b0 * lda, lda, wr, kc, xk + b0, B, c, out);
  }
}

template <typename T>
at::Tensor rows_fma_stream(at::Tensor y, int64_t B, const int64_t* rows,
                           const std::vector<int64_t>& keep, const std::vector<float>& xk,
                           const T* w, int64_t out) {
  const int64_t nk = static_cast<int64_t>(keep.size());
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (nk + kChunk - 1) / kChunk;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>({int64_t(at::get_num_threads()), chunks, (nk * out * B) >> 20}));
  const int64_t per = (chunks + nthreads - 1) / nthreads * kChunk;
  const int64_t lda = (out + 63) / 64 * 64 + 16;  // rows not 4 KiB apart
  std::vector<aligned_vector<float>> accs(static_cast<size_t>(nthreads));
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      accs[t].assign(static_cast<size_t>(B * lda), 0.f);
      const int64_t k0 = std::min(nk, t * per), k1 = std::min(nk, k0 + per);
      const T* wr[kChunk];
      for (int64_t q = k0; q < k1; q += kChunk) {
        const int64_t kc = std::min(kChunk, k1 - q);
        for (int64_t k = 0; k < kc; ++k) wr[k] = w + rows[keep[q + k]] * out;
        if (B <= 4)
          fma_stream_chunk<T, 4>(B, accs[t].data(), lda, wr, kc, xk.data() + q * B, out);
        else
          fma_stream_chunk<T, 2>(B, accs[t].data(), lda, wr, kc, xk.data() + q * B, out);
      }
    }
  });
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* yr = yp + b * out;
      std::memcpy(yr, accs[0].data() + b * lda, sizeof(float) * out);
      for (int64_t t = 1; t < nthreads; ++t) {
        const float* a = accs[t].data() + b * lda;
        for (int64_t o = 0; o < out; ++o) yr[o] += a[o];
      }
    }
  });
  return y;
}

// Batch rows up to which rows_axpy takes the streaming order (from tiled_batch_from) for fp16 /
// fp32; FASTARCH_GEMV_STREAM_UPTO overrides, 0 turns it off. 2026-12-04, Xeon with AMX /
// AVX512-FP16 (2 cores of a shared VM), the five Llama shapes, s = 0 / 0.5, at a full union,
// against F.linear, two alternating runs of bench_sparse_gemv.py: fp16 batch 4 1.50-1.79x
// (staging kernel 0.73-1.76x), 6 1.30-1.80x (at::mm 0.70-0.84x), 8 1.24-1.61x (register tiles
// 0.64-0.74x, at::mm 0.68-0.96x), 16 0.94-1.14x (0.70-0.78x), 24 0.85-0.98x (at::mm 0.72-0.78x),
// 32 0.75-0.87x (at::mm 0.75-0.81x), 64 0.61-0.71x (at::mm 0.77-0.87x); fp32 batch 6 1.34-1.68x
// (staging 1.02-1.36x), 8 1.67-2.39x (tiles 1.13-1.31x), 16 1.40-1.66x (1.06-1.24x), 24
// 1.09-1.31x (MKL 1.01-1.21x), 32 1.02-1.22x (MKL 0.99-1.18x), 64 0.75-0.87x (MKL 0.93-1.12x).
// Batches 2-3 were level with the kernels they would replace. Then every group of batch rows at
// each column step, and every line of a step prefetched (fp32 had one of two): two runs against
// the build before, fp32 batch 8 1.68-2.27x -> 1.80-2.64x, 16 1.41-1.59x -> 1.51-1.88x, 24
// 1.11-1.25x -> 1.21-1.43x, fp16 level; and at batch 32 fp32 1.15-1.33x against MKL's
// 0.98-1.13x, at 48 0.84-1.11x against 0.97-1.11x (fp16 48: 0.53-0.75x against oneDNN's
// 0.78-0.84x). Not measured on AMD Zen 4.
int64_t stream_batch_upto(bool fp32) {
  static const char* e = std::getenv("FASTARCH_GEMV_STREAM_UPTO");
  if (e) return std::atoll(e);
  (void)fp32;  // the same limit for both, measured separately
  return 32;
}

// Batch rows from which rows_axpy takes the batch kernels: the streaming order up to
// stream_batch_upto, the register tiles above it (FASTARCH_GEMV_TILED_FROM overrides; 0 turns
// both off). Since 2026-12-04 fp32 from 5 rows and fp16 from 4 (stream_batch_upto's comment);
// the register tiles against the staging kernel before that, 2026-12-03, Sapphire Rapids-class
// Xeon (2 cores of a shared VM), against F.linear, best of two alternating processes, the four
// Llama shapes of the bench, s = 0 / 0.5:
//  * fp16: batch 5 staging 0.56-0.91x, tiles 0.71-0.80x; batch 8 0.50-0.71x vs 0.66-0.89x;
//    batches 16-64 0.26-0.59x vs 0.53-0.90x (oneDNN's fp16 GEMM is not memory-bound there).
//  * fp32: batch 5 1.11-1.73x vs 1.01-1.31x; batch 8 0.83-1.62x vs 1.33-1.74x; batches 16-64
//    0.31-0.86x vs 0.71-1.49x.
int64_t tiled_batch_from(bool fp32) {
  static const char* e = std::getenv("FASTARCH_GEMV_TILED_FROM");
  if (e) return std::atoll(e) <= 0 ? std::numeric_limits<int64_t>::max() : int64_t(std::atoll(e));
  return fp32 ? 5 : 4;  // the streaming order from these (stream_batch_upto), tiles above it
}
#endif

// ---- the shared core: y(B, out) = sum_k xa(B, k) * w_t[rows[k], :] ------------------------------
// xa is fp32 (B, K) holding the coefficient of each listed row per batch row (0 = skip);
// rows holds K row indices into w_t. Returns fp32 (B, out).
template <typename T>
at::Tensor rows_axpy(const float* xa, int64_t B, const int64_t* rows, int64_t K, const T* w,
                     int64_t out) {
#if defined(FASTARCH_BF16_DOT)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (B > 1 && bf16_dot_enabled()) return rows_dot_bf16(xa, B, rows, K, w, out);
  }
#endif
#if defined(FASTARCH_TILED_FMA)
  if (B >= tiled_batch_from(std::is_same_v<T, float>))
    return rows_fma_tiled<T>(xa, B, rows, K, w, out);
#endif
  auto y = at::zeros({B, out}, at::TensorOptions().dtype(at::kFloat));
  if (K == 0 || out == 0 || B == 0) return y;
  // A thread is worth starting only for enough work: a decode GEMV of a small layer takes tens
  // of microseconds, and a parallel region that waits on a descheduled thread costs far more.
  constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;  // multiply-adds
  const int64_t work = K * out * B;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>({int64_t(at::get_num_threads()), K / 4, work / kMinWorkPerThread}));
  std::vector<at::Tensor> partial(nthreads);
  const int64_t per = (K + nthreads - 1) / nthreads;
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * per, k1 = std::min(K, k0 + per);
      at::Tensor acc_t = (t == 0) ? y : at::zeros({B, out}, y.options());
      float* acc = acc_t.data_ptr<float>();
      if (B > 1) {
        // Batch: each block of 4 rows is read from memory once and applied to every batch row
        // while it is in cache (tiles of the output keep the 4 row slices in L1/L2).
        constexpr int64_t kTile = 2048;
        std::vector<float> wbuf(std::is_same_v<T, float> ? 0 : 4 * kTile);
        for (int64_t kb = k0; kb < k1; kb += 4) {
          const int64_t nk = std::min<int64_t>(4, k1 - kb);
          const T* wr[4];
          for (int i = 0; i < 4; ++i) wr[i] = w + rows[kb + std::min<int64_t>(i, nk - 1)] * out;
          if (nk == 4 && B <= 4) {
            float a[4][4] = {};
            bool any = false;
            for (int64_t b = 0; b < B; ++b)
              for (int i = 0; i < 4; ++i) {
                a[b][i] = xa[b * K + kb + i];
                any = any || a[b][i] != 0.f;
              }
            if (!any) continue;
            for (int64_t o0 = 0; o0 < out; o0 += kTile) {
              const int64_t n = std::min(kTile, out - o0);
              float* ac = acc + o0;
              if (B == 2) {
                axpy4_nb<T, 2>(ac, out, wr[0] + o0, wr[1] + o0, wr[2] + o0, wr[3] + o0, a, n);
              } else if (B == 3) {
                axpy4_nb<T, 3>(ac, out, wr[0] + o0, wr[1] + o0, wr[2] + o0, wr[3] + o0, a, n);
              } else {
                axpy4_nb<T, 4>(ac, out, wr[0] + o0, wr[1] + o0, wr[2] + o0, wr[3] + o0, a, n);
              }
            }
            continue;
          }
          for (int64_t o0 = 0; o0 < out; o0 += kTile) {
            const int64_t n = std::min(kTile, out - o0);
            // bf16/fp16: widen the 4 row slices to fp32 once (32 KiB, stays in L1) instead of
            // once per batch row; the per-row work is then plain fp32 FMAs.
            const float* wf[4];
            if constexpr (std::is_same_v<T, float>) {
              for (int i = 0; i < 4; ++i) wf[i] = wr[i] + o0;
            } else {
              for (int i = 0; i < 4; ++i) {
                float* dst = wbuf.data() + i * kTile;
                widen<T>(dst, wr[i] + o0, n);
                wf[i] = dst;
              }
            }
            for (int64_t b = 0; b < B; ++b) {
              const float* xb = xa + b * K + kb;
              float a[4] = {0.f, 0.f, 0.f, 0.f};
              for (int64_t i = 0; i < nk; ++i) a[i] = xb[i];
              if (a[0] == 0.f && a[1] == 0.f && a[2] == 0.f && a[3] == 0.f) continue;
              if (nk == 4) {
                axpy4<float>(acc + b * out + o0, wf[0], wf[1], wf[2], wf[3], a[0], a[1], a[2],
                             a[3], n);
              } else {
                for (int64_t i = 0; i < nk; ++i)
                  if (a[i] != 0.f) axpy1<float>(acc + b * out + o0, wf[i], a[i], n);
              }
            }
          }
        }
        partial[t] = acc_t;
        continue;
      }
      if constexpr (std::is_same_v<T, float>) {  // batch 1: 4 active rows a pass, prefetched
        const float* xb = xa;
        std::vector<int64_t> ks;
        ks.reserve(static_cast<size_t>(k1 - k0));
        for (int64_t k = k0; k < k1; ++k)
          if (xb[k] != 0.f) ks.push_back(k);
        const int64_t nnz = static_cast<int64_t>(ks.size()), full = nnz / 4 * 4;
        for (int64_t j = 0; j < full; j += 4) {
          const float* wr[4];
          const float* nx[4] = {nullptr, nullptr, nullptr, nullptr};
          float a4[4];
          for (int i = 0; i < 4; ++i) {
            wr[i] = w + rows[ks[j + i]] * out;
            a4[i] = xb[ks[j + i]];
            if (j + 4 + i < nnz) nx[i] = w + rows[ks[j + 4 + i]] * out;
          }
          axpy4_stream(acc, wr, nx, a4, out);
        }
        for (int64_t j = full; j < nnz; ++j) axpy1<T>(acc, w + rows[ks[j]] * out, xb[ks[j]], out);
        partial[t] = acc_t;
        continue;
      }
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = xa + b * K;
        float* ab = acc + b * out;
        // Pack the non-zero coefficients of this batch row so the inner loop runs 4 rows a pass.
        int64_t k = k0;
        int64_t buf_k[4];
        float buf_a[4];
        int nb = 0;
        for (; k < k1; ++k) {
          const float a = xb[k];
          if (a == 0.f) continue;
          buf_k[nb] = rows[k];
          buf_a[nb] = a;
          if (++nb == 4) {
            if constexpr (std::is_same_v<T, c10::Half>) {
              // fp16: the explicit F16C loop (the auto-vectorised one was 0.6-0.9x of F.linear at
              // batch 1 on the AVX2 box, bench/results/sparse_gemv.md)
              const float a4[4][4] = {{buf_a[0], buf_a[1], buf_a[2], buf_a[3]}};
              axpy4_nb<T, 1>(ab, out, w + buf_k[0] * out, w + buf_k[1] * out, w + buf_k[2] * out,
                             w + buf_k[3] * out, a4, out);
            } else {
              axpy4<T>(ab, w + buf_k[0] * out, w + buf_k[1] * out, w + buf_k[2] * out,
                       w + buf_k[3] * out, buf_a[0], buf_a[1], buf_a[2], buf_a[3], out);
            }
            nb = 0;
          }
        }
        for (int i = 0; i < nb; ++i) axpy1<T>(ab, w + buf_k[i] * out, buf_a[i], out);
      }
      partial[t] = acc_t;
    }
  });
  for (int64_t t = 1; t < nthreads; ++t) y.add_(partial[t]);
  return y;
}

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastarch: ", name, " must be 2-D, got shape ", t.sizes());
}

void check_weight(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "fastarch: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "fastarch: ", name, " has dtype ",
              w.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "fastarch: ", name, " is on ", w.device(),
              " but x is on ", x.device());
  TORCH_CHECK(w.is_contiguous(), "fastarch: ", name, " must be contiguous (prepare it once)");
}

void check_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t n,
                const char* name) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fastarch: ", name,
              " must have shape (", n, "), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
              "fastarch: ", name, " must match x in dtype and device");
}

at::Tensor check_index(const at::Tensor& index, int64_t limit, const at::Tensor& x,
                       const char* name) {
  TORCH_CHECK(index.dim() == 1, "fastarch: ", name, " must be 1-D, got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, "fastarch: ",
              name, " must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.device() == x.device(), "fastarch: ", name, " is on ", index.device(),
              " but x is on ", x.device());
  at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < idx.numel(); ++k) {
    TORCH_CHECK(p[k] >= 0 && p[k] < limit, "fastarch: ", name, "[", k, "] = ", p[k],
                " is out of range [0, ", limit, ")");
  }
  return idx;
}

// Dispatch to the dense product (at::mm on the input-major weight, no second copy). Figures:
// interleaved same-process timings of bench/bench_sparse_gemv.py and bench/results/sparse_gemv.md,
// AMD EPYC (Zen 3), AVX2 + F16C only (no AVX-512, no AVX512-BF16), 2 cores, shared with other jobs:
//  * fp32, batch <= 16 (<= 64 when built with AVX-512, below): the kernel beats F.linear at every density, even 1.0 (s=0 over 4096x4096,
//    11008x4096, 4096x11008: batch 1 1.26-1.38x, batches 2-16 1.33-5.26x), so density never
//    sends it to the dense
//    product; larger fp32 batches go to at::mm (MKL GEMM on the (in, out) layout is within a few
//    % of F.linear there: batch 16, mm 1.19x vs kernel 1.27x of F.linear).
//  * bf16/fp16, any batch: at::mm on the (in, out) layout is 0.02-0.07x of F.linear on this CPU
//    (no native bf16/fp16 GEMM for the transposed operand: 4096x4096 bf16 batch 2 takes ~0.4 s
//    against 12 ms), and widening the weight to fp32 for MKL is 0.09x, so these dtypes never go
//    dense; the kernel (widened once per 4-row block, small batches in registers) is used for
//    every batch size: s=0, batch 1: 1.10-1.32x; batches 2-16: 1.64-2.94x of F.linear. (The earlier AVX-512 box dispatched bf16 batches to the dense product at
//    0.6x; that choice is 0.03x here.)
//  * bf16 on CPUs with AVX512-BF16 (AMD Zen 4 EPYC, 2 cores, 2026-12-01, /tmp script of the same
//    interleaved kind as the bench, 14336x4096 / 4096x14336 / 2048x8192, s=0): oneDNN's bf16 GEMM
//    is fast there, but only on the (out, in) layout we do not keep. On the stored (in, out)
//    layout at::mm is 0.43-0.50x of F.linear at batches 2-8 and 0.65-0.73x at 64; the kernel is
//    0.77-0.99x at batches 2-4, 0.36-0.49x at 8 and 0.20-0.25x at 64, but 0.67-0.80x at batch 8
//    when s=0.9 leaves a union of ~0.56. So bf16 batches above 4 with a union above 0.7 take
//    at::mm there. Neither reaches F.linear: see bench/RESULTS.md (a paired-row layout for the
//    bf16 dot instructions would be needed).
// FASTARCH_GEMV_DENSE_ABOVE (density) / FASTARCH_GEMV_DENSE_BATCH_ABOVE override every dtype (the
// tests use them to drive each branch).
double dense_above(at::ScalarType dt) {
  static const char* e = std::getenv("FASTARCH_GEMV_DENSE_ABOVE");
  if (e) return std::atof(e);
  (void)dt;
  return 1.01;  // never: see above
}

int64_t dense_batch_above(at::ScalarType dt) {
  static const char* e = std::getenv("FASTARCH_GEMV_DENSE_BATCH_ABOVE");
  if (e) return std::atoll(e);
  if (dt != at::kFloat) return std::numeric_limits<int64_t>::max();
#if defined(__AVX512F__)
  // Built with AVX-512 (AMD Zen 4 EPYC, 2 cores, 2026-12-01, bench_sparse_gemv.py with this
  // switch at 1000): the kernel is 1.04-2.09x of F.linear at batch 32 and 0.97-1.58x at 64 (s=0
  // and 0.5, five shapes), at::mm 0.78-1.09x; larger batches are not measured.
  return 64;
#else
  return 16;
#endif
}

#if !defined(FASTARCH_BF16_DOT)
// Built without the bf16 dot kernels (e.g. a portable -march) but running on a CPU that has
// the instruction: its dense bf16 GEMM is the faster one for large, dense batches.
bool cpu_has_bf16_dot() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}
#endif

// AVX512-FP16 (CPUID.7.0:EDX[23]): oneDNN then has a native fp16 GEMM, also for the (in, out)
// layout we keep; without it at::mm on fp16 is 0.02-0.07x of F.linear (above).
bool cpu_has_avx512fp16() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 23) & 1u);
  }();
  return has;
#else
  return false;
#endif
}

// Batches above wide_batch_above(dt) whose union is nearly everything, where oneDNN / MKL has a
// native GEMM for the (in, out) layout we keep: fp16 on CPUs with AVX512-FP16, bf16 on CPUs with
// AMX tiles for weights at least as wide as they are tall, fp32 on Intel CPUs (cpu_is_intel).
// 2026-12-03, Xeon with AMX-BF16 and AVX512-FP16, 2 cores of a shared VM,
// `bench_sparse_gemv.py --dtypes bfloat16,float16 --batches 64` with this switch off
// (FASTARCH_GEMV_DENSE_BATCH_ABOVE=100000) and on, alternated 3 times, medians as ratios to
// F.linear over 14336x4096 / 4096x14336 / 8192x2048 / 2048x8192 / 4096x4096, s = 0
// and 0.5: fp16 0.66-0.86x -> 0.76-0.91x on every shape; bf16 where out >= in 0.89-1.04x ->
// 0.83-1.12x (bench/RESULTS.md). A first A/B (batches 32 and 64, every bf16 shape on at::mm)
// had the two down projections (in > out) at 0.70-0.82x -> 0.60-0.73x: they stay on the
// kernel. Batch 32 (the kernel in both runs) moved by up to 0.07 there: the noise of this host.
// An earlier pass over batches 8-128 had at::mm behind the kernel at 8-16.
// fp32 on Intel CPUs (MKL's sgemm, either layout): at a full union at::mm on the (in, out)
// layout was 1.27-1.74x of F.linear at batch 16 against the kernel's 1.10-1.60x, 0.86-1.21x at
// 32 (kernel 0.92-1.10x), 0.88-1.22x at 64 (kernel 0.72-0.97x), and behind it at 4-8 (Xeon with
// AMX, 2 threads, the five Llama shapes, interleaved in one process, 2026-12-04). On AMD Zen 4
// the kernel stays ahead at 32-64 (dense_batch_above's comment), so this is Intel only.
bool cpu_is_intel() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  static const bool is = __builtin_cpu_is("intel");
  return is;
#else
  return false;
#endif
}

bool dense_wide_batches(at::ScalarType dt, int64_t in, int64_t out) {
#if defined(FASTARCH_AMX)
  if (dt == at::kBFloat16) return out >= in && amx_usable();
#endif
  (void)in;
  (void)out;
  if (dt == at::kFloat) return cpu_is_intel();
  return dt == at::kHalf && cpu_has_avx512fp16();
}

// The batch above which a nearly full union goes to at::mm where dense_wide_batches says so.
// fp16 (AVX512-FP16, 2026-12-04, same host and method as fp32 above): at::mm / kernel against
// F.linear at batch 4 0.82-1.04x / 1.49-2.01x, 6 0.78-1.13x / 0.76-0.91x, 8 0.75-1.07x /
// 0.74-0.92x, 16 0.79-1.06x / 0.72-0.88x, 32 0.83-1.05x / 0.65-0.88x: from 6 rows. bf16 (AMX):
// at::mm behind the kernel at 8-16 on every shape (0.63-0.89x / 0.82-0.94x), level at 32.
// Since the streaming order (stream_batch_upto's comment, 2026-12-04): above 32 rows.
int64_t wide_batch_above(at::ScalarType dt) {
  if (dt == at::kFloat) return 32;
  if (dt == at::kHalf) return 32;
  return 32;
}

bool use_dense_product(at::ScalarType dt, int64_t B, double density, int64_t in, int64_t out) {
  if (B > dense_batch_above(dt) || density > dense_above(dt)) return true;
  static const bool overridden = std::getenv("FASTARCH_GEMV_DENSE_ABOVE") != nullptr ||
                                 std::getenv("FASTARCH_GEMV_DENSE_BATCH_ABOVE") != nullptr;
  if (!overridden && B > wide_batch_above(dt) && density > 0.8 &&
      dense_wide_batches(dt, in, out))
    return true;
#if defined(FASTARCH_BF16_DOT)
  // bf16-dot kernel (6-row packed tiles) vs at::mm on the stored layout, as ratios to F.linear
  // (Zen 4, 2026-12-02, s=0, 14336x4096 and 4096x14336, interleaved in one process): batch 16
  // kernel 0.7-0.9x, at::mm 0.43-0.57x; 64: 0.6-0.87x vs 0.62-0.69x; 128: 0.73-0.80x vs
  // 0.74-0.79x; 512: 0.70-0.80x vs 0.87-0.93x. The kernel's time also falls with the union,
  // at::mm's does not, so at::mm only for prefill-sized batches whose union is nearly everything.
  return !overridden && dt == at::kBFloat16 && B > 128 && density > 0.8;
#else
  return !overridden && dt == at::kBFloat16 && cpu_has_bf16_dot() && B > 4 && density > 0.7;
#endif
}

// ---- sparse_gemv ---------------------------------------------------------------------------------
at::Tensor sparse_gemv_cpu(const at::Tensor& x_in, const at::Tensor& w_t,
                           const std::optional<at::Tensor>& bias, double threshold) {
  check_2d(x_in, "x");
  check_2d(w_t, "w_t");
  check_weight(x_in, w_t, "w_t");
  TORCH_CHECK(x_in.size(1) == w_t.size(0), "fastarch: x has ", x_in.size(1),
              " features but w_t has ", w_t.size(0), " input rows (w_t must be (in, out))");
  TORCH_CHECK(threshold >= 0 && !std::isnan(threshold),
              "fastarch: threshold must be >= 0, got ", threshold);
  const int64_t B = x_in.size(0), in = x_in.size(1), out = w_t.size(1);
  check_bias(x_in, bias, out, "bias");
  at::Tensor x = x_in.contiguous();
  at::Tensor xf = x.to(at::kFloat);
  const float t = static_cast<float>(threshold);
  const float* xp = xf.data_ptr<float>();

  // Union of the active channels over the batch, with the masked coefficients packed (B, K).
  const std::vector<int64_t> rows =
      active_columns(xp, B, in, [t](float v) { return std::fabs(v) > t; });
  const int64_t K = static_cast<int64_t>(rows.size());
  const double density = in > 0 ? double(K) / double(in) : 0.0;
  if (use_dense_product(x.scalar_type(), B, density, in, out)) {
    // compare in fp32 like the spec: a half-precision comparison would round the threshold
    at::Tensor xm = at::where(xf.abs() > threshold, x, at::zeros({}, x.options()));
    at::Tensor y = at::mm(xm, w_t);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  std::vector<float> xa(static_cast<size_t>(B * K));
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K)), [&](int64_t b0,
                                                                                  int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xr = xp + b * in;
      float* dst = xa.data() + b * K;
      if (K == in) {  // every channel active somewhere: a plain (vectorised) select
        for (int64_t k = 0; k < K; ++k) dst[k] = std::fabs(xr[k]) > t ? xr[k] : 0.f;
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const float v = xr[rows[k]];
          dst[k] = std::fabs(v) > t ? v : 0.f;
        }
      }
    }
  });
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_gemv", [&] {
    y = rows_axpy<scalar_t>(xa.data(), B, rows.data(), K, w_t.data_ptr<scalar_t>(), out);
  });
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

// ---- sparse_gemv_index ---------------------------------------------------------------------------
at::Tensor sparse_gemv_index_cpu(const at::Tensor& x_in, const at::Tensor& w_t,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& index) {
  check_2d(x_in, "x");
  check_2d(w_t, "w_t");
  check_weight(x_in, w_t, "w_t");
  TORCH_CHECK(x_in.size(1) == w_t.size(0), "fastarch: x has ", x_in.size(1),
              " features but w_t has ", w_t.size(0), " input rows (w_t must be (in, out))");
  const int64_t B = x_in.size(0), in = x_in.size(1), out = w_t.size(1);
  check_bias(x_in, bias, out, "bias");
  at::Tensor idx = check_index(index, in, x_in, "index");
  const int64_t K = idx.numel();
  const int64_t* rows = idx.data_ptr<int64_t>();
  at::Tensor xf = x_in.contiguous().to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  std::vector<float> xa(static_cast<size_t>(B * K));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) xa[b * K + k] = xp[b * in + rows[k]];
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(),
                                  "sparse_gemv_index", [&] {
    y = rows_axpy<scalar_t>(xa.data(), B, rows, K, w_t.data_ptr<scalar_t>(), out);
  });
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x_in.scalar_type());
}

// ---- gather_gemv ---------------------------------------------------------------------------------
// rows per gather_gemv task: at least ~1M multiply-adds each (see rows_axpy)
inline int64_t gather_grain(int64_t in, int64_t B) {
  return std::max<int64_t>(16, (int64_t(1) << 20) / std::max<int64_t>(1, in * B));
}

template <typename T>
void gather_rows_dot(const float* xf, int64_t B, int64_t in, const T* w, const int64_t* rows,
                     int64_t K, float* y) {
  const int64_t grain = gather_grain(in, B);
  // bf16 / fp16 rows are widened to fp32 once (F16C / shifts, into L1) and dotted from there: the
  // mixed-type dot was 0.11-0.2x of F.linear for fp16 on Zen 4 at batches 1-64 (2026-12-02).
  constexpr bool kWiden = !std::is_same_v<T, float>;
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    std::vector<float> wbuf(kWiden ? in : 0);
    for (int64_t k = k0; k < k1; ++k) {
      const T* wr = w + rows[k] * in;
      if constexpr (kWiden) {
        widen<T>(wbuf.data(), wr, in);
        for (int64_t b = 0; b < B; ++b) y[b * K + k] = dot<float>(wbuf.data(), xf + b * in, in);
      } else {
        for (int64_t b = 0; b < B; ++b) y[b * K + k] = dot<T>(wr, xf + b * in, in);
      }
    }
  });
}

// gather_gemv reads the listed rows of the (out, in) weight, the layout F.linear uses; above a
// fraction of the rows (per dtype and batch) F.linear over all rows and a column gather is the
// faster of the two. Zen 4 EPYC, 2 cores, 2026-12-02, /tmp script alternating F.linear and the
// kernel in one process (14336x4096 and 8192x2048, all / 80% / half / 30% of the rows), the
// kernel's time against F.linear's at all rows: fp32 1.1-1.7x at batches 1-16, 0.92x at 32,
// 0.59-0.64x at 64; bf16 (bf16-dot build) 1.3-1.5x at 1, 1.1-1.2x at 2, 0.76-0.84x at 8,
// 0.6-0.65x at 16, 0.46-0.52x at 32, 0.38-0.44x at 64, 0.36-0.38x at 128; fp16 0.51-0.52x at 1,
// 0.67-0.77x at 2, 0.92-0.94x at 4, 0.92-1.04x at 8, 1.09-1.29x at 32-64. The kernel's time
// falls with the fraction (row gathers in random order a little slower than in a run), so the
// limits sit a little under those ratios. FASTARCH_GATHER_DENSE_ABOVE overrides them (tests).
double gather_dense_above(at::ScalarType dt, int64_t B) {
  static const char* e = std::getenv("FASTARCH_GATHER_DENSE_ABOVE");
  if (e) return std::atof(e);
  constexpr double kNever = 2.0;
  if (dt == at::kFloat) return B < 32 ? kNever : B < 64 ? 0.85 : 0.55;
  if (dt == at::kHalf) return B == 1 ? 0.35 : B < 4 ? 0.65 : B < 32 ? 0.9 : kNever;
#if defined(FASTARCH_BF16_DOT)
  if (dt == at::kBFloat16 && bf16_dot_enabled())
    return B < 8 ? kNever : B < 16 ? 0.75 : B < 32 ? 0.6 : B < 64 ? 0.45 : B < 128 ? 0.35 : 0.3;
#endif
  return kNever;  // not measured: the kernel
}

// y[:, k] = full[:, idx[k]] for a (B, N) result. index_select along dim 1 takes ~3 ns per bf16
// element here (a (64, 14336) gather cost 3 ms, 8% of the bf16 F.linear it follows); a plain
// copy loop over the rows is several times faster, and all the rows in order need no copy at all.
at::Tensor gather_columns(const at::Tensor& full, const at::Tensor& idx) {
  const int64_t B = full.size(0), N = full.size(1), K = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  bool identity = K == N;
  for (int64_t k = 0; identity && k < K; ++k) identity = ip[k] == k;
  if (identity) return full;
  at::Tensor y = at::empty({B, K}, full.options());
  auto copy = [&](auto tag) {
    using E = decltype(tag);
    const E* src = static_cast<const E*>(full.data_ptr());
    E* dst = static_cast<E*>(y.data_ptr());
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)),
                     [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const E* s = src + b * N;
        E* d = dst + b * K;
        for (int64_t k = 0; k < K; ++k) d[k] = s[ip[k]];
      }
    });
  };
  if (full.element_size() == 2) copy(uint16_t{});
  else if (full.element_size() == 4) copy(uint32_t{});
  else return full.index_select(1, idx);
  return y;
}

at::Tensor gather_gemv_cpu(const at::Tensor& x_in, const at::Tensor& w,
                           const std::optional<at::Tensor>& bias, const at::Tensor& index) {
  check_2d(x_in, "x");
  check_2d(w, "w");
  check_weight(x_in, w, "w");
  TORCH_CHECK(x_in.size(1) == w.size(1), "fastarch: x has ", x_in.size(1),
              " features but w has ", w.size(1), " columns (w must be (out, in))");
  const int64_t B = x_in.size(0), in = x_in.size(1), out = w.size(0);
  check_bias(x_in, bias, out, "bias");
  at::Tensor idx = check_index(index, out, x_in, "index");
  const int64_t K = idx.numel();
  if (K > 0 && double(K) > gather_dense_above(x_in.scalar_type(), B) * double(out)) {
    at::Tensor full = bias.has_value() ? at::linear(x_in, w, *bias) : at::linear(x_in, w);
    return gather_columns(full.contiguous(), idx);
  }
  at::Tensor y = at::empty({B, K}, x_in.options().dtype(at::kFloat));
#if defined(FASTARCH_BF16_DOT)
  if (x_in.scalar_type() == at::kBFloat16 && bf16_dot_enabled()) {
    // bf16 rows against the bf16 input with the bf16 dot instruction, 4 rows per input load
    // (as sparse_mlp's gate / up rows)
    at::Tensor xb = x_in.contiguous();
    const auto* xv = xb.data_ptr<c10::BFloat16>();
    const auto* wb = w.data_ptr<c10::BFloat16>();
    const auto* wu = reinterpret_cast<const uint16_t*>(wb);
    const int64_t* rows = idx.data_ptr<int64_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, K, gather_grain(in, B), [&](int64_t k0, int64_t k1) {
      std::vector<float> o(4 * B);
      int64_t k = k0;
      for (; k + 4 <= k1; k += 4) {
        const uint16_t* r4[4];
        for (int r = 0; r < 4; ++r) r4[r] = wu + rows[k + r] * in;
        dot_rows4_bf16(r4, xv, B, in, o.data());
        for (int r = 0; r < 4; ++r)
          for (int64_t b = 0; b < B; ++b) yp[b * K + k + r] = o[r * B + b];
      }
      for (; k < k1; ++k) {
        dot_rows_bf16(wb + rows[k] * in, xv, B, in, o.data());
        for (int64_t b = 0; b < B; ++b) yp[b * K + k] = o[b];
      }
    });
  } else
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "gather_gemv",
                                  [&] {
    at::Tensor xf = x_in.contiguous().to(at::kFloat);
    gather_rows_dot<scalar_t>(xf.data_ptr<float>(), B, in, w.data_ptr<scalar_t>(),
                              idx.data_ptr<int64_t>(), K, y.data_ptr<float>());
  });
  if (bias.has_value()) y.add_(bias->to(at::kFloat).index_select(0, idx));
  return y.to(x_in.scalar_type());
}

// ---- sparse_mlp ----------------------------------------------------------------------------------
enum class Act { SiLU, GELU, GELUTanh, ReLU };

Act parse_activation(const std::string& a) {
  if (a == "silu" || a == "swish") return Act::SiLU;
  if (a == "gelu") return Act::GELU;
  if (a == "gelu_tanh" || a == "gelu_new" || a == "gelu_pytorch_tanh") return Act::GELUTanh;
  if (a == "relu") return Act::ReLU;
  TORCH_CHECK(false, "fastarch: activation must be one of silu, gelu, gelu_tanh, relu; got '", a,
              "'");
}

inline float apply_act(Act a, float v) {
  switch (a) {
    case Act::SiLU:
      return v / (1.f + std::exp(-v));
    case Act::GELU:
      return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case Act::GELUTanh: {
      const float c = 0.79788456080286536f;  // sqrt(2/pi)
      return 0.5f * v * (1.f + std::tanh(c * (v + 0.044715f * v * v * v)));
    }
    case Act::ReLU:
    default:
      return v > 0.f ? v : 0.f;
  }
}

// The listed fraction of the neurons above which sparse_mlp takes its gate / up products from
// the dense GEMM: gather_gemv's, except where the MLP was measured on its own (2026-12-03,
// Sapphire Rapids-class Xeon, bench_sparse_gemv.py MLP table, 8B and 1B shapes, against the dense
// MLP, kernel path / dense gate-up; the kernel's time falls with the fraction, the dense one's
// does not):
//  * fp16, batch 1: all neurons 0.82-0.87x / 1.07-1.24x; half 1.47-1.54x / 1.20-1.23x: equal
//    near 0.7 (gather_gemv alone crosses at 0.35: the MLP's kernel also skips up rows).
//  * fp32, batch 1: all 0.87-0.89x / 0.94-1.01x; half 1.49-1.67x / 1.11-1.16x: near 0.9.
//  * fp32, batch 8: all 0.73-0.85x / 1.09-1.20x; half 1.41-1.69x / 1.24-1.29x: near 0.7.
//  * fp16, batch 8 (2026-12-04, same kind of host, forced both ways, two runs each): all
//    0.38-0.42x / 0.87-0.97x; half 0.71-0.77x / 1.05-1.10x: the kernel's time halves with the
//    fraction, so equal near 0.35. (bf16 batch 8: all 0.64-0.66x / 0.84-0.88x, half
//    1.11-1.25x / 1.02-1.10x: gather_gemv's switch, unchanged.)
// The dense side is the dense MLP's own GEMMs plus a column gather, so where a CPU's GEMM is
// slower than this one's, taking it costs little against the dense baseline.
double mlp_dense_above(at::ScalarType dt, int64_t B) {
  static const bool overridden = std::getenv("FASTARCH_GATHER_DENSE_ABOVE") != nullptr;
  const double gather = gather_dense_above(dt, B);
  if (overridden) return gather;
  if (dt == at::kHalf && B == 1) return 0.7;
  if (dt == at::kFloat && B == 1) return 0.9;
  if (dt == at::kFloat && B >= 8) return std::min(gather, 0.7);
  if (dt == at::kHalf && B >= 8) return std::min(gather, 0.35);
  return gather;
}

at::Tensor sparse_mlp_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& w_up, const at::Tensor& w_out_t,
                          const std::optional<at::Tensor>& b_in,
                          const std::optional<at::Tensor>& b_up,
                          const std::optional<at::Tensor>& b_out,
                          const std::optional<at::Tensor>& neuron_index, double threshold,
                          c10::string_view activation) {
  check_2d(x_in, "x");
  check_2d(w_in, "w_in");
  check_2d(w_out_t, "w_out_t");
  check_weight(x_in, w_in, "w_in");
  check_weight(x_in, w_out_t, "w_out_t");
  const int64_t B = x_in.size(0), hidden = x_in.size(1), inter = w_in.size(0);
  TORCH_CHECK(w_in.size(1) == hidden, "fastarch: w_in must be (intermediate, ", hidden,
              "), got ", w_in.sizes());
  TORCH_CHECK(w_out_t.size(0) == inter, "fastarch: w_out_t must be (", inter,
              ", out), got ", w_out_t.sizes());
  const int64_t out = w_out_t.size(1);
  if (w_up.has_value()) {
    check_2d(*w_up, "w_up");
    check_weight(x_in, *w_up, "w_up");
    TORCH_CHECK(w_up->sizes() == w_in.sizes(), "fastarch: w_up must have the shape of w_in ",
                w_in.sizes(), ", got ", w_up->sizes());
  }
  check_bias(x_in, b_in, inter, "b_in");
  check_bias(x_in, b_up, inter, "b_up");
  check_bias(x_in, b_out, out, "b_out");
  TORCH_CHECK(!b_up.has_value() || w_up.has_value(), "fastarch: b_up given without w_up");
  TORCH_CHECK(threshold >= 0 && !std::isnan(threshold),
              "fastarch: threshold must be >= 0, got ", threshold);
  const Act act = parse_activation(std::string(activation));

  at::Tensor idx;
  if (neuron_index.has_value()) {
    idx = check_index(*neuron_index, inter, x_in, "neuron_index");
  } else {
    idx = at::arange(inter, at::TensorOptions().dtype(at::kLong));
  }
  const int64_t K = idx.numel();
  const int64_t* rows = idx.data_ptr<int64_t>();
  at::Tensor xf = x_in.contiguous().to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  at::Tensor bin = b_in.has_value() ? b_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bup = b_up.has_value() ? b_up->to(at::kFloat).contiguous() : at::Tensor();
  const float t = static_cast<float>(threshold);
  std::vector<float> h(static_cast<size_t>(B * K));
  // Where gather_gemv over these rows would take the dense GEMM (a listed fraction of the
  // neurons above its measured crossover for this dtype and batch), so do the gate / up products:
  // all rows with at::linear on the (inter, hidden) weights, then the listed columns. The up rows
  // of neurons below the threshold are then not skipped.
  const bool dense_in =
      K > 0 && double(K) > mlp_dense_above(x_in.scalar_type(), B) * double(inter);
  if (dense_in) {
    at::Tensor g = gather_columns(at::linear(x_in, w_in).contiguous(), idx).to(at::kFloat);
    at::Tensor u = w_up.has_value()
                       ? gather_columns(at::linear(x_in, *w_up).contiguous(), idx).to(at::kFloat)
                       : at::Tensor();
    const float* gp = g.data_ptr<float>();
    const float* up = u.defined() ? u.data_ptr<float>() : nullptr;
    const float* bi = bin.defined() ? bin.data_ptr<float>() : nullptr;
    const float* bu = bup.defined() ? bup.data_ptr<float>() : nullptr;
    at::parallel_for(0, B * K, 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t j = rows[e % K];
        float gv = apply_act(act, bi ? gp[e] + bi[j] : gp[e]);
        float v = 0.f;
        if (std::fabs(gv) > t) v = up ? gv * (bu ? up[e] + bu[j] : up[e]) : gv;
        h[e] = v;
      }
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "sparse_mlp_in",
                                  [&] {
    if (dense_in) return;  // h is filled above
    const scalar_t* wi = w_in.data_ptr<scalar_t>();
    const scalar_t* wu = w_up.has_value() ? w_up->data_ptr<scalar_t>() : nullptr;
    const float* bi = bin.defined() ? bin.data_ptr<float>() : nullptr;
    const float* bu = bup.defined() ? bup.data_ptr<float>() : nullptr;
    const int64_t grain =
        std::max<int64_t>(16, (int64_t(1) << 20) / std::max<int64_t>(1, 2 * hidden * B));
#if defined(FASTARCH_BF16_DOT)
    // bf16 batches with the bf16 dot instruction: the B dot products of a gate / up row straight
    // from the bf16 row and the bf16 input (the widening path below was 0.41x of the dense MLP
    // at batch 8 on Zen 4 when every neuron is kept).
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (B > 1 && bf16_dot_enabled()) {
        // (a plain lambda, not a template: the casts keep the other dtypes' copies compiling)
        at::Tensor xb = x_in.contiguous();
        const auto* xv = reinterpret_cast<const c10::BFloat16*>(xb.data_ptr<scalar_t>());
        const auto* wib = reinterpret_cast<const c10::BFloat16*>(wi);
        const auto* wub = reinterpret_cast<const c10::BFloat16*>(wu);
        const auto* wiu = reinterpret_cast<const uint16_t*>(wi);
        const auto* wuu = reinterpret_cast<const uint16_t*>(wu);
        at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
          std::vector<float> g(4 * B), u(4 * B);
          // neurons k .. k + nr - 1: gate rows' activations in g (row-major (nr, B)) -> h
          auto finish = [&](int64_t k, int64_t nr) {
            bool any[4] = {false, false, false, false};
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t j = rows[k + r];
              for (int64_t b = 0; b < B; ++b) {
                float& gv = g[r * B + b];
                gv = apply_act(act, bi ? gv + bi[j] : gv);
                any[r] = any[r] || std::fabs(gv) > t;
              }
            }
            if (wub) {  // up rows only for neurons some batch row keeps
              if (nr == 4 && any[0] && any[1] && any[2] && any[3]) {
                const uint16_t* ur[4];
                for (int r = 0; r < 4; ++r) ur[r] = wuu + rows[k + r] * hidden;
                dot_rows4_bf16(ur, xv, B, hidden, u.data());
              } else {
                for (int64_t r = 0; r < nr; ++r)
                  if (any[r]) dot_rows_bf16(wub + rows[k + r] * hidden, xv, B, hidden, &u[r * B]);
              }
            }
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t j = rows[k + r];
              for (int64_t b = 0; b < B; ++b) {
                const float gv = g[r * B + b];
                float v = 0.f;
                if (std::fabs(gv) > t) v = wu ? gv * (bu ? u[r * B + b] + bu[j] : u[r * B + b]) : gv;
                h[b * K + k + r] = v;
              }
            }
          };
          int64_t k = k0;
          for (; k + 4 <= k1; k += 4) {
            const uint16_t* gr[4];
            for (int r = 0; r < 4; ++r) gr[r] = wiu + rows[k + r] * hidden;
            dot_rows4_bf16(gr, xv, B, hidden, g.data());
            finish(k, 4);
          }
          for (; k < k1; ++k) {
            dot_rows_bf16(wib + rows[k] * hidden, xv, B, hidden, g.data());
            finish(k, 1);
          }
        });
        return;
      }
    }
#endif
    // bf16/fp16 batches: widen each gate / up row to fp32 once (it stays in L1) and take the B
    // dot products from the fp32 copy, instead of widening the row again for every batch row.
    constexpr bool kWiden = !std::is_same_v<scalar_t, float>;
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      std::vector<float> gbuf(kWiden ? hidden : 0), ubuf(gbuf.size());
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t j = rows[k];
        // fp16 at batch 1 too: the auto-vectorised fp16 dot was 0.3-0.98x of the dense MLP on the
        // AVX2 box (bench/results/sparse_gemv.md); the F16C widen + fp32 dot is not.
        const bool staged = kWiden && (B > 1 || std::is_same_v<scalar_t, c10::Half>);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (B == 1) {  // rows prefetched ahead, into the up row and the next neuron's gate row
            // (casts: this lambda is not a template, so the other dtypes' copies compile it too)
            const auto* wif = reinterpret_cast<const float*>(wi);
            const auto* wuf = reinterpret_cast<const float*>(wu);
            const float* gr = wif + j * hidden;
            const float* ur = wuf ? wuf + j * hidden : nullptr;
            const float* ng = k + 1 < k1 ? wif + rows[k + 1] * hidden : nullptr;
            float g = dot_stream(gr, xp, hidden, ur ? ur : ng);
            if (bi) g += bi[j];
            g = apply_act(act, g);
            float v = 0.f;
            if (std::fabs(g) > t) {
              v = g;
              if (ur) v *= dot_stream(ur, xp, hidden, ng) + (bu ? bu[j] : 0.f);
            }
            h[k] = v;
            continue;
          }
        }
        if (staged) widen<scalar_t>(gbuf.data(), wi + j * hidden, hidden);
        bool up_staged = false;
        for (int64_t b = 0; b < B; ++b) {
          float g = staged ? dot<float>(gbuf.data(), xp + b * hidden, hidden)
                           : dot<scalar_t>(wi + j * hidden, xp + b * hidden, hidden);
          if (bi) g += bi[j];
          g = apply_act(act, g);
          float v = 0.f;
          if (std::fabs(g) > t) {  // the up row is read only for kept neurons
            v = g;
            if (wu) {
              float u;
              if (staged) {
                if (!up_staged) {
                  widen<scalar_t>(ubuf.data(), wu + j * hidden, hidden);
                  up_staged = true;
                }
                u = dot<float>(ubuf.data(), xp + b * hidden, hidden);
              } else {
                u = dot<scalar_t>(wu + j * hidden, xp + b * hidden, hidden);
              }
              if (bu) u += bu[j];
              v *= u;
            }
          }
          h[b * K + k] = v;
        }
      }
    });
  });
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "sparse_mlp_out",
                                  [&] {
    y = rows_axpy<scalar_t>(h.data(), B, rows, K, w_out_t.data_ptr<scalar_t>(), out);
  });
  if (b_out.has_value()) y.add_(b_out->to(at::kFloat));
  return y.to(x_in.scalar_type());
}

}  // namespace

// The bf16 batch kernels this build and this CPU run ("bf16-dot": vdpbf16ps, "amx": AMX tiles),
// for `python -m fastarch.info`.
std::string cpu_gemv_paths() {
  std::string paths;
#if defined(FASTARCH_BF16_DOT)
  if (bf16_dot_enabled()) paths += "bf16-dot";
#if defined(FASTARCH_AMX)
  if (bf16_dot_enabled() && amx_usable()) paths += ",amx";  // (a branch of the bf16-dot kernel)
#endif
#endif
  return paths.empty() ? "widening" : paths;
}

TORCH_LIBRARY_IMPL(fastarch, CPU, m) {
  m.impl("sparse_gemv", &sparse_gemv_cpu);
  m.impl("sparse_gemv_index", &sparse_gemv_index_cpu);
  m.impl("gather_gemv", &gather_gemv_cpu);
  m.impl("sparse_mlp", &sparse_mlp_cpu);
}

}  // namespace fastarch
