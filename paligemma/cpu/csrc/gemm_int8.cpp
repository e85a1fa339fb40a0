// int8 weights x 8-bit activations -> fp32: the "int8" prefill path (see paligemma/cpu/kernels.py).
//
// y[m, n] = step[m] * sw[n] * sum_k (a[m, k] - zp[m]) * w[n, k], where w is the model's own int8 layout
// ([N, K], row-major, one scale per output channel: no packing, no second copy) and a the activations
// quantized here per token (row), asymmetrically: a = clamp(round(x / step) + zp, 0, L) over the row's
// [min(x, 0), max(x, 0)], L = 255 levels, or 127 with AVX2 alone (below). Asymmetric as torch's dynamic
// quantization: GELU outputs (SigLIP's fc2 input) span [-0.17, max] and get twice symmetric's resolution.
// The zero point comes back out through the weights' row sums: sum_k (a - zp) w = sum_k a w - zp sum_k w.
// Products are exact in int32 for K <= 65536.
//
// AVX2: u8 x s8 pairs with `vpmaddubsw` (32 multiply-adds per instruction, 4x fp32 FMA's 8) summed to
// int32 by `vpmaddwd` with ones. Its int16 pair sums saturate above 32767, so activations get 7 bits
// (a <= 127: |pairs| <= 2 * 127 * 128 = 32512), as fbgemm's and oneDNN's `reduce_range`. With AVX512-VNNI or
// AVX-VNNI: u8 x s8 quadruples summed straight into int32 (`vpdpbusd`, no saturation), 8 bits.
//
// Blocking (dot-product form, both operands contiguous along K): each thread owns a range of output
// channels; for each K block (at most KC, see `block_k`) and each pass of at most MC_BYTES of activation rows
// (in L2), an NR-row weight tile (NR * KC bytes) stays in L1 while every MR-row tile of the pass goes over it.
// Partial sums go to the output as int32; the last K block converts them in place to fp32 with the zero point
// and scales.
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

// Activation bytes of one pass over a K block's weights (rows x kc): in L2 (0.5-2 MB per core). A 448 px prompt's
// 1036 rows x 2048 (2 MB) went to L3 for every 4-channel weight tile.
constexpr int64_t MC_BYTES = 320 * 1024;
constexpr int64_t KC = 4096;  // K elements per block at most: a weight tile is NR * KC = 16 KB (L1); a pass of rows, MC_BYTES, in L2

// K elements per block: K split into ceil(K / KC) blocks of equal length, rounded up to 32 (the last block
// takes the rest, a multiple of 16). Even blocks, not KC then a remainder: a short last block (K = 4304:
// 4096 + 208) pays a tile's fixed costs for little work (AVX2, 256 x 4304 x 1152: 273 -> 300 GFLOP/s).
inline int64_t block_k(int64_t K) {
  const int64_t blocks = (K + KC - 1) / KC;
  return ((K + blocks - 1) / blocks + 31) / 32 * 32;
}

typedef uint8_t act_t;  // the unsigned operand of `vpmaddubsw` / `vpdpbusd`
#if defined(__AVX2__) && !((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define PG_MADDUBS 1
constexpr int LEVELS = 127;
#else
constexpr int LEVELS = 255;
#endif

// Row m of x -> its activations with step[m] and zp[m] (see the top). An all-zero row gets step 1, zero point 0.
// Laid out by K blocks: block k0 (kc = min(block_k(K), K - k0) columns) holds rows 0..M-1 one after another at
// a + k0 * M, so a tile's rows, and the tiles after it, are one sequential stream (as a GEMM's packed A).
void quantize_acts(const float* x, int64_t M, int64_t K, act_t* a, float* step, int32_t* zp) {
  const int64_t bk = block_k(K);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x + m * K;
      float lo = 0.f, hi = 0.f;
      int64_t k = 0;
#if defined(__AVX2__)
      __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(row + k);
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
      }
      alignas(32) float l8[8], h8[8];
      _mm256_store_ps(l8, vlo);
      _mm256_store_ps(h8, vhi);
      for (int i = 0; i < 8; ++i) lo = std::min(lo, l8[i]), hi = std::max(hi, h8[i]);
#endif
      for (; k < K; ++k) lo = std::min(lo, row[k]), hi = std::max(hi, row[k]);
      float s = (hi - lo) / float(LEVELS);
      if (!(s > 0.f)) s = 1.f;
      const int32_t z = (int32_t)std::nearbyint(-lo / s);  // in [0, LEVELS]
      step[m] = s;
      zp[m] = z;
      for (int64_t k0 = 0; k0 < K; k0 += bk) {  // K block k0 of row m: at a + k0 * M + m * kc (see `gemm`)
        const int64_t kc = std::min(bk, K - k0);
        act_t* out = a + k0 * M + m * kc - k0;  // out[k] for k in [k0, k0 + kc)
        k = k0;
#if defined(__AVX2__)
        const __m256 sv = _mm256_set1_ps(s);
        const __m256i zv = _mm256_set1_epi32(z), top = _mm256_set1_epi32(LEVELS), zero = _mm256_setzero_si256();
        for (; k + 8 <= k0 + kc; k += 8) {  // cvtps rounds half to even (default MXCSR), as nearbyint
          __m256i i = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(row + k), sv)), zv);
          i = _mm256_min_epi32(_mm256_max_epi32(i, zero), top);
          const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));  // 8 x int16
          _mm_storel_epi64((__m128i*)(out + k), _mm_packus_epi16(p16, p16));  // 8 x uint8
        }
#endif
        for (; k < k0 + kc; ++k)
          out[k] = (act_t)std::max(0.f, std::min(float(LEVELS), std::nearbyint(row[k] / s) + float(z)));
      }
    }
  });
}

// sum_k w[n, k] for every output channel.
void row_sums(const int8_t* w, int64_t N, int64_t K, int32_t* sums) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = w + n * K;
      int32_t s = 0;
      int64_t k = 0;
#if defined(__AVX2__)
      const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
      __m256i acc = _mm256_setzero_si256();
      for (; k + 32 <= K; k += 32)
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i*)(row + k))), ones16));
      alignas(32) int32_t lanes[8];
      _mm256_store_si256((__m256i*)lanes, acc);
      for (int l = 0; l < 8; ++l) s += lanes[l];
#endif
      for (; k < K; ++k) s += row[k];
      sums[n] = s;
    }
  });
}

// What the output tile needs besides the products: row m's step and zero point, channel n's scale and row sum.
struct Scales {
  const float* step;
  const int32_t* zp;
  const float* sw;
  const int32_t* wsum;
};

// Output (m, n) of a tile whose first row is m0 and first channel n0: v (this K block's sum) added to the
// int32 partial sum, or (last K block) the total as fp32.
inline void store(int32_t* p, int32_t v, bool first, bool last, const Scales& sc, int64_t m, int64_t n) {
  const int32_t total = first ? v : *p + v;
  if (last) {
    const float f = float(int64_t(total) - int64_t(sc.zp[m]) * sc.wsum[n]) * (sc.step[m] * sc.sw[n]);
    std::memcpy(p, &f, 4);
  } else {
    *p = total;
  }
}

#if defined(__AVX2__)
constexpr int NR = 4;  // output channels per tile: their 4 sums reduce together with two rounds of hadd

// Row i of a tile: its 4 x 8-lane accumulators -> the 4 sums, in channel order.
inline void reduce_store(const __m256i* acc, int32_t* c, bool first, bool last, const Scales& sc, int64_t m,
                         int64_t n) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
  alignas(16) int32_t r[4];
  _mm_store_si128((__m128i*)r, _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
  for (int j = 0; j < NR; ++j) store(c + j, r[j], first, last, sc, m, n + j);
}

#if defined(PG_MADDUBS)
constexpr int MR = 2;  // 16 registers: 8 accumulators + 4 weight vectors + activation, ones, product

// MR_ rows of a (stride lda) against NR rows of w (stride ldw) over kc elements (a multiple of 16).
template <int MR_>
inline void tile(const act_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t kc, int32_t* c, int64_t ldc,
                 bool first, bool last, const Scales& sc, int64_t m, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR_][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k + 32 <= kc; k += 32) {
    __m256i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_si256((const __m256i*)(w + j * ldw + k));
#pragma GCC unroll 8
    for (int i = 0; i < MR_; ++i) {
      const __m256i av = _mm256_loadu_si256((const __m256i*)(a + i * lda + k));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(av, wv[j]), ones));
    }
  }
  if (kc % 32) {  // 16 left (K % 32 == 16, e.g. SigLIP's 4304): the same in 128 bits
    const int64_t k = kc - 16;
    const __m128i ones128 = _mm_set1_epi16(1);
    for (int i = 0; i < MR_; ++i) {
      const __m128i av = _mm_loadu_si128((const __m128i*)(a + i * lda + k));
      for (int j = 0; j < NR; ++j) {
        const __m128i wv = _mm_loadu_si128((const __m128i*)(w + j * ldw + k));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_zextsi128_si256(_mm_madd_epi16(_mm_maddubs_epi16(av, wv), ones128)));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i) reduce_store(acc[i], c + i * ldc, first, last, sc, m + i, n);
}
#else
// VNNI: `vpdpbusd` multiplies 4 u8 x s8 pairs per int32 lane and adds them to it, no int16 step (32
// multiply-adds per 256-bit instruction, twice `vpdpwssd`'s 16 and 4x an fp32 FMA's 8).
// 2 x 4 tiles (8 accumulators) in both builds: with AVX-512's 32 registers 4 x 4 tiles were 8% slower on 2
// threads (interleaved A/B, Xeon EMR, 2026-12-06), though faster on one.
constexpr int MR = 2;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dot_add(__m256i acc, __m256i a, __m256i w) { return _mm256_dpbusd_epi32(acc, a, w); }
inline __m128i dot_add(__m128i acc, __m128i a, __m128i w) { return _mm_dpbusd_epi32(acc, a, w); }
#else  // AVX-VNNI (VEX-encoded)
inline __m256i dot_add(__m256i acc, __m256i a, __m256i w) { return _mm256_dpbusd_avx_epi32(acc, a, w); }
inline __m128i dot_add(__m128i acc, __m128i a, __m128i w) { return _mm_dpbusd_avx_epi32(acc, a, w); }
#endif

// acc[i][j] += rows i of a x rows j of w over [k, kc), 32 elements per step, then a 16-element rest in 128 bits.
template <int MR_>
inline void dot_rest(__m256i (&acc)[MR_][NR], const act_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t k,
                     int64_t kc) {
  for (; k + 32 <= kc; k += 32) {
    __m256i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_si256((const __m256i*)(w + j * ldw + k));
#pragma GCC unroll 8
    for (int i = 0; i < MR_; ++i) {
      const __m256i av = _mm256_loadu_si256((const __m256i*)(a + i * lda + k));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = dot_add(acc[i][j], av, wv[j]);
    }
  }
  if (kc % 32) {  // 16 left: the same in 128 bits
    const int64_t k16 = kc - 16;
    for (int i = 0; i < MR_; ++i) {
      const __m128i av = _mm_loadu_si128((const __m128i*)(a + i * lda + k16));
      for (int j = 0; j < NR; ++j) {
        const __m128i wv = _mm_loadu_si128((const __m128i*)(w + j * ldw + k16));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_zextsi128_si256(dot_add(_mm_setzero_si128(), av, wv)));
      }
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// AVX512-VNNI: 512-bit vectors, 64 multiply-adds per `vpdpbusd` (bench_peak: 1.7x the 256-bit rate on a Xeon
// EMR, 2x on Zen 5). The accumulators fold to 256 bits for the K rest (32 and / or 16) and the reduction.
template <int MR_>
inline void tile(const act_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t kc, int32_t* c, int64_t ldc,
                 bool first, bool last, const Scales& sc, int64_t m, int64_t n) {
  __m512i wide[MR_][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wide[i][j] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= kc; k += 64) {
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512((const void*)(w + j * ldw + k));
#pragma GCC unroll 8
    for (int i = 0; i < MR_; ++i) {
      const __m512i av = _mm512_loadu_si512((const void*)(a + i * lda + k));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) wide[i][j] = _mm512_dpbusd_epi32(wide[i][j], av, wv[j]);
    }
  }
  __m256i acc[MR_][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j)
      acc[i][j] = _mm256_add_epi32(_mm512_castsi512_si256(wide[i][j]), _mm512_extracti64x4_epi64(wide[i][j], 1));
  dot_rest<MR_>(acc, a, lda, w, ldw, k, kc);  // 0, 16, 32 or 48 left
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i) reduce_store(acc[i], c + i * ldc, first, last, sc, m + i, n);
}
#else
template <int MR_>
inline void tile(const act_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t kc, int32_t* c, int64_t ldc,
                 bool first, bool last, const Scales& sc, int64_t m, int64_t n) {
  __m256i acc[MR_][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  dot_rest<MR_>(acc, a, lda, w, ldw, 0, kc);
#pragma GCC unroll 8
  for (int i = 0; i < MR_; ++i) reduce_store(acc[i], c + i * ldc, first, last, sc, m + i, n);
}
#endif  // 512 / 256 bits
#endif  // maddubs / VNNI
#endif  // AVX2

// Any shape, no vectors: the remainder channels (N % NR) and CPUs without AVX2.
void tile_scalar(const act_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t kc, int32_t* c, int64_t ldc,
                 int rows, int cols, bool first, bool last, const Scales& sc, int64_t m, int64_t n) {
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      int32_t s = 0;
      for (int64_t k = 0; k < kc; ++k) s += int32_t(a[i * lda + k]) * int32_t(w[j * ldw + k]);
      store(c + i * ldc + j, s, first, last, sc, m + i, n + j);
    }
}

void gemm(const act_t* a, const int8_t* w, const Scales& sc, int64_t M, int64_t K, int64_t N, int32_t* c) {
  const int64_t bk = block_k(K);
  constexpr int64_t G = 4;  // threads split the output channels by groups of 4 (NR)
  const int64_t groups = (N + G - 1) / G;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    const int64_t n0 = g0 * G, n1 = std::min(N, g1 * G);
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
      const int64_t kc = std::min(bk, K - k0);
      const bool first = k0 == 0, last = k0 + kc == K;
      const act_t* ab = a + k0 * M;  // this K block of every row (`quantize_acts`' layout)
      // rows per pass over the weights: the pass's activations (rows x kc bytes) stay in L2; passes of equal size
      const int64_t most = std::max<int64_t>(MC_BYTES / kc, 2), passes = (M + most - 1) / most;
      const int64_t mc = (M + passes - 1) / passes;
      for (int64_t r0 = 0; r0 < M; r0 += mc) {
        const int64_t r1 = std::min(M, r0 + mc);
        for (int64_t n = n0; n < n1; n += G) {
          const int8_t* wt = w + n * K + k0;
          const int cols = (int)std::min<int64_t>(G, n1 - n);
          int64_t m = r0;
#if defined(__AVX2__)
          if (cols == NR) {
            for (; m + MR <= r1; m += MR) tile<MR>(ab + m * kc, kc, wt, K, kc, c + m * N + n, N, first, last, sc, m, n);
            for (; m < r1; ++m) tile<1>(ab + m * kc, kc, wt, K, kc, c + m * N + n, N, first, last, sc, m, n);
          }
#endif
          if (m < r1)
            tile_scalar(ab + m * kc, kc, wt, K, kc, c + m * N + n, N, (int)(r1 - m), cols, first, last, sc, m, n);
        }
      }
    }
  });
}

}  // namespace

// w int8 [N, K] contiguous -> int32 [N]: sum_k w[n, k] (what gemm_int8 needs besides w; callers may keep it).
torch::Tensor int8_row_sums(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "int8_row_sums: contiguous int8 [N, K]");
  auto sums = torch::empty({w.size(0)}, w.options().dtype(at::kInt));
  row_sums(w.data_ptr<int8_t>(), w.size(0), w.size(1), sums.data_ptr<int32_t>());
  return sums;
}

// x float32 [M, K] contiguous, w int8 [N, K] contiguous, sw float32 [N], wsum int32 [N] (int8_row_sums(w))
// or empty (computed here) -> float32 [M, N].
torch::Tensor gemm_int8(torch::Tensor x, torch::Tensor w, torch::Tensor sw, torch::Tensor wsum) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "gemm_int8: x must be contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "gemm_int8: w must be contiguous int8 [N, K]");
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.is_contiguous() && sw.numel() == w.size(0), "gemm_int8: sw must be float32 [N]");
  TORCH_CHECK(wsum.numel() == 0 || (wsum.scalar_type() == at::kInt && wsum.is_contiguous() && wsum.numel() == w.size(0)),
              "gemm_int8: wsum must be int32 [N] or empty");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0 && K <= 65536, "gemm_int8: K must be a multiple of 16, at most 65536");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto a = torch::empty({M, K}, x.options().dtype(at::kByte));
  auto step = torch::empty({M}, x.options());
  auto zp = torch::empty({M}, x.options().dtype(at::kInt));
  act_t* ap = (act_t*)a.data_ptr();
  quantize_acts(x.data_ptr<float>(), M, K, ap, step.data_ptr<float>(), zp.data_ptr<int32_t>());
  if (wsum.numel() == 0) wsum = int8_row_sums(w);
  const Scales sc{step.data_ptr<float>(), zp.data_ptr<int32_t>(), sw.data_ptr<float>(), wsum.data_ptr<int32_t>()};
  gemm(ap, w.data_ptr<int8_t>(), sc, M, K, N, (int32_t*)y.data_ptr<float>());  // int32 partials in y's memory
  return y;
}

// Levels of the activations' quantization in this build: 127 with AVX2 alone (vpmaddubsw), 255 otherwise.
int64_t gemm_int8_activation_levels() { return LEVELS; }
