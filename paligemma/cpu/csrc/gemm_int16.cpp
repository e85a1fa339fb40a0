// bf16 / fp32 weights x activations, both as 12-bit integers in int16 -> fp32: the "int16" prefill path of
// bf16 weights on CPUs with AVX2 and no bf16 units (see paligemma/cpu/kernels.py).
//
// y[m, n] = step[m] * sw[n] * sum_k a[m, k] * q[n, k], where q is the weight quantized per output channel
// (q = round(w / sw), sw = max|w[n]| / 2047: finer than bf16's 8-bit significand for every weight above
// 1/16 of its row's largest) and a the activations quantized per token (a = round(x / step), step =
// max|x[m]| / 2047). Symmetric on both sides, so no zero point.
//
// AVX2 `vpmaddwd` multiplies 16 int16 pairs and adds them in pairs into 8 int32 lanes: 16 multiply-adds per
// instruction against fp32 FMA's 8. 12 bits on each side keep the int32 sums exact over a K block of 512
// (512 * 2047 * 2047 < 2^31); blocks are added in fp32 (each block's sum exact, converted with 24 bits).
// With AVX512-VNNI or AVX-VNNI the add is fused (`vpdpwssd`).
//
// Blocking as gemm_int8.cpp (dot-product form, both operands contiguous along K): each thread owns a range
// of output channels; for each K block, an NR-row weight tile (NR * KC * 2 bytes, L1) meets every MR-row
// tile of the activations (the M x KC block, L2), laid out by K blocks.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t KC = 512;   // K elements per block: int32 sums stay exact (see the top)
constexpr int64_t LDQ = KC + 32;  // the weight tile buffer's row stride (padded)
constexpr int64_t MC = 320;  // at most this many activation rows (320 KB of a K block) per pass over the weights
constexpr float QMAX = 2047.f;  // 12-bit symmetric levels on each side

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

// A row's step: max|v| / QMAX (1 for a zero row; NaN when the row holds a NaN or an infinity, so that its
// products come out NaN, as fp32's would, instead of finite numbers from levels that mean nothing).
template <typename T>
float row_step(const T* row, int64_t K) {
  float amax = 0.f;
  bool nan = false;
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 v = load8(row + k);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float m8[8];
  _mm256_store_ps(m8, vmax);
  for (int i = 0; i < 8; ++i) amax = std::max(amax, m8[i]);
  nan = _mm256_movemask_ps(vnan) != 0;
#endif
  for (; k < K; ++k) {
    const float v = to_float(row[k]);
    amax = std::max(amax, std::fabs(v));
    nan = nan || std::isnan(v);
  }
  return (nan || std::isinf(amax)) ? NAN : amax > 0.f ? amax / QMAX : 1.f;
}

// n values -> int16 levels round(v * inv), clamped to [-QMAX, QMAX] (a NaN row's levels are bounded
// nonsense; its NaN step makes the results NaN). n a multiple of 8 with AVX2.
template <typename T>
inline void quantize_into(const T* v, int64_t n, float inv, int16_t* out) {
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256 iv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-(int)QMAX), hi = _mm256_set1_epi32((int)QMAX);
  for (; k + 8 <= n; k += 8) {  // cvtps rounds half to even (default MXCSR), as nearbyint
    const __m256i i = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(load8(v + k), iv)), lo), hi);
    _mm_storeu_si128((__m128i*)(out + k), _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
  }
#endif
  for (; k < n; ++k) out[k] = (int16_t)std::max(-QMAX, std::min(QMAX, std::nearbyint(to_float(v[k]) * inv)));
}

// int8 weights are already levels (|q| <= 127): widened as they are, their scale applied at the end.
inline void quantize_into(const int8_t* v, int64_t n, float, int16_t* out) {
  int64_t k = 0;
#if defined(__AVX2__)
  for (; k + 16 <= n; k += 16)
    _mm256_storeu_si256((__m256i*)(out + k), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(v + k))));
#endif
  for (; k < n; ++k) out[k] = v[k];
}

// x [M, K] -> a (by K blocks: block k0 holds rows 0..M-1 one after another at a + k0 * M) and step [M].
void quantize_acts(const float* x, int64_t M, int64_t K, int16_t* a, float* step) {
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float s = step[m] = row_step(x + m * K, K);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        quantize_into(x + m * K + k0, kc, 1.f / s, a + k0 * M + m * kc);
      }
    }
  });
}

// Output (m, n): v (this K block's exact sum) added to the fp32 partial, times the scales at the last block.
inline void store(float* p, int32_t v, bool first, bool last, float scale) {
  const float total = first ? float(v) : *p + float(v);
  *p = last ? total * scale : total;
}

#if defined(__AVX2__)
constexpr int NR = 4;  // output channels per tile: their 4 sums reduce together with two rounds of hadd
constexpr int MR = 2;  // 16 registers: 8 accumulators + 4 weight vectors + activation + product

inline __m256i dot_add(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// MR_ rows of a (stride lda) against NR rows of q (stride ldq) over kc elements (a multiple of 16).
template <int MR_>
inline void tile(const int16_t* a, int64_t lda, const int16_t* q, int64_t ldq, int64_t kc, float* c, int64_t ldc,
                 bool first, bool last, const float* step, const float* sw) {
  __m256i acc[MR_][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kc; k += 16) {
    __m256i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_si256((const __m256i*)(q + j * ldq + k));
#pragma GCC unroll 8
    for (int i = 0; i < MR_; ++i) {
      const __m256i av = _mm256_loadu_si256((const __m256i*)(a + i * lda + k));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = dot_add(acc[i][j], av, wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i) {  // 4 x 8 lanes -> 4 sums, in channel order
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[i][0], acc[i][1]), _mm256_hadd_epi32(acc[i][2], acc[i][3]));
    alignas(16) int32_t r[4];
    _mm_store_si128((__m128i*)r, _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
    for (int j = 0; j < NR; ++j) store(c + i * ldc + j, r[j], first, last, step[i] * sw[j]);
  }
}
#endif

// Any shape, no vectors: the remainder channels (N % NR) and CPUs without AVX2.
void tile_scalar(const int16_t* a, int64_t lda, const int16_t* q, int64_t ldq, int64_t kc, float* c, int64_t ldc,
                 int rows, int cols, bool first, bool last, const float* step, const float* sw) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      int32_t s = 0;
      for (int64_t k = 0; k < kc; ++k) s += int32_t(a[i * lda + k]) * int32_t(q[j * ldq + k]);
      store(c + i * ldc + j, s, first, last, step[i] * sw[j]);
    }
}

// w [N, K] (bf16 / int8, as stored) with inv[n] = 1 / its step (bf16; 1 for int8) and scale sw[n]: each
// thread converts one NR-row tile of one K block at a time into levels in an L1 buffer (2 x NR x KC bytes)
// and passes every activation row over it: the weights are read once per call, as stored, with no copy.
template <typename T>
void gemm(const int16_t* a, const float* step, const T* w, const float* inv, const float* sw, int64_t M, int64_t K,
          int64_t N, float* c) {
  constexpr int64_t G = 4;  // threads split the output channels by groups of 4 (NR)
  const int64_t groups = (N + G - 1) / G;
  // rows per pass over a K block: the activation block (rows x KC x 2 bytes) stays in L2; passes of even size
  const int64_t passes = (M + MC - 1) / MC, mc = (M + passes - 1) / passes;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) int16_t qt[G * LDQ];  // this tile's levels, row j at qt + j * LDQ
    const int64_t n0 = g0 * G, n1 = std::min(N, g1 * G);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const bool first = k0 == 0, last = k0 + kc == K;
      for (int64_t r0 = 0; r0 < M; r0 += mc) {
        const int64_t r1 = std::min(M, r0 + mc);
        const int16_t* ab = a + k0 * M;  // this K block of every row (`quantize_acts`' layout)
        for (int64_t n = n0; n < n1; n += G) {
          const int cols = (int)std::min<int64_t>(G, n1 - n);
          for (int j = 0; j < cols; ++j) quantize_into(w + (n + j) * K + k0, kc, inv[n + j], qt + j * LDQ);
          // the next group's weight rows (or this thread's first, for the next pass), a cache line per
          // activation tile: their memory latency hides behind this tile's arithmetic
          const bool more = n + G < n1;
          const int64_t nk0 = more ? k0 : r1 < M ? k0 : k0 + KC;
          const char* next = (const char*)(w + (more ? n + G : n0) * K + nk0);
          const int64_t lines = nk0 < K ? G * ((std::min(KC, K - nk0) * (int64_t)sizeof(T) + 63) / 64) : 0;
          int64_t m = r0;
#if defined(__AVX2__)
          if (cols == NR) {
            for (int64_t p = 0; m + MR <= r1; m += MR, ++p) {
              if (p < lines) _mm_prefetch(next + (p % G) * K * (int64_t)sizeof(T) + (p / G) * 64, _MM_HINT_T0);
              tile<MR>(ab + m * kc, kc, qt, LDQ, kc, c + m * N + n, N, first, last, step + m, sw + n);
            }
            for (; m < r1; ++m) tile<1>(ab + m * kc, kc, qt, LDQ, kc, c + m * N + n, N, first, last, step + m, sw + n);
          }
#endif
          if (m < r1)
            tile_scalar(ab + m * kc, kc, qt, LDQ, kc, c + m * N + n, N, (int)(r1 - m), cols, first, last, step + m, sw + n);
        }
      }
    }
  });
}

}  // namespace

// w bfloat16 [N, K] contiguous -> float32 [N]: each output channel's step, max|w[n]| / 2047 (what gemm_int16
// needs besides w; callers may keep it).
torch::Tensor int16_row_steps(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16,
              "int16_row_steps: contiguous bfloat16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  auto steps = torch::empty({N}, w.options().dtype(at::kFloat));
  const uint16_t* p = (const uint16_t*)w.data_ptr();
  float* out = steps.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) out[n] = row_step(p + n * K, K);
  });
  return steps;
}

// x float32 [M, K] contiguous (quantized per row here) @ w [N, K].T -> float32 [M, N]. w bfloat16 with
// sw = int16_row_steps(w) (quantized per tile here), or int8 with its scale sw (levels as stored).
torch::Tensor gemm_int16(torch::Tensor x, torch::Tensor w, torch::Tensor sw) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "gemm_int16: x must be contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kChar) && w.is_contiguous() &&
              w.size(1) == x.size(1), "gemm_int16: w must be contiguous bfloat16 or int8 [N, K]");
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.is_contiguous() && sw.numel() == w.size(0), "gemm_int16: sw must be float32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "gemm_int16: K must be a multiple of 16");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto a = torch::empty({M, K}, x.options().dtype(at::kShort));
  auto step = torch::empty({M}, x.options());
  quantize_acts(x.data_ptr<float>(), M, K, a.data_ptr<int16_t>(), step.data_ptr<float>());
  const float* s = sw.data_ptr<float>();
  if (w.scalar_type() == at::kBFloat16) {
    auto inv = 1.0 / sw;  // [N]
    gemm(a.data_ptr<int16_t>(), step.data_ptr<float>(), (const uint16_t*)w.data_ptr(), inv.data_ptr<float>(), s, M,
         K, N, y.data_ptr<float>());
  } else {
    auto ones = torch::ones({N}, sw.options());
    gemm(a.data_ptr<int16_t>(), step.data_ptr<float>(), w.data_ptr<int8_t>(), ones.data_ptr<float>(), s, M, K, N,
         y.data_ptr<float>());
  }
  return y;
}
