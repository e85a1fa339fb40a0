// CPU kernels of paligemma's fast path (see paligemma/cpu/kernels.py for what each one is for).
// Built on first use by torch.utils.cpp_extension.load with -march=native for the host's vector width:
// AVX-512, AVX2 or plain C++ (the preprocessor picks the branch below).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <algorithm>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// ---- fp32 vectors of VW lanes, loaded from fp32 / bf16 / int8 ------------------------------------
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vec;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vloadx(const float* p) { return _mm512_loadu_ps(p); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload(const uint16_t* p) {
  __m256i v = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
static inline vec vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#elif defined(__AVX2__)
#define VW 8
typedef __m256 vec;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vloadx(const float* p) { return _mm256_loadu_ps(p); }
static inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload(const uint16_t* p) {
  __m128i v = _mm_loadu_si128((const __m128i*)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline vec vload(const int8_t* p) {
  int64_t b; std::memcpy(&b, p, 8);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(b)));
}
#else
#define VW 1
#define _mm_prefetch(p, h) __builtin_prefetch(p)
typedef float vec;
static inline vec vzero() { return 0.f; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline vec vloadx(const float* p) { return *p; }
static inline float vsum(vec a) { return a; }
static inline vec vload(const float* p) { return *p; }
static inline vec vload(const uint16_t* p) { uint32_t u = uint32_t(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline vec vload(const int8_t* p) { return float(*p); }
#endif

static inline float sload(const float* p) { return *p; }
static inline float sload(const uint16_t* p) { uint32_t u = uint32_t(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline float sload(const int8_t* p) { return float(*p); }

// y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n], for M rows and NB output channels at a time.
template <typename T, int M, int NB>
static void gemv_rows(const float* x, const T* w, int64_t K, int64_t n0, int64_t n1, float* y, int64_t N,
                      const float* scale, const float* bias) {
  const int64_t Kv = K - K % VW;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    vec acc[M][NB];  // M * NB accumulators, all in registers (the loops below are fully unrolled)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[m][j] = vzero();
    const bool ahead = n + 2 * NB <= n1;
    for (int64_t k = 0; k < Kv; k += VW) {
      vec wv[NB];
      // One cache line of each of the next NB rows, into L2 (T1), not L1 (T0): the hardware prefetchers stop at
      // 4 KB pages, so each next row is asked for by hand. Into L1 these requests held its few miss buffers and
      // the streams stalled; into L2, one row read at 37 vs 23 GB/s (bf16, 257k x 2048, AVX2 build, 2 threads;
      // benchmarks/RESULTS.md, run 13).
      if (ahead && ((k * (int64_t)sizeof(T)) & 63) == 0) {
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) _mm_prefetch((const char*)(w + (n + NB + j) * K + k), _MM_HINT_T1);
      }
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) wv[j] = vload(w + (n + j) * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        vec xv = vloadx(x + m * K + k);
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) acc[m][j] = vfma(wv[j], xv, acc[m][j]);
      }
    }
    for (int m = 0; m < M; ++m) for (int j = 0; j < NB; ++j) {
      float s = vsum(acc[m][j]);
      for (int64_t k = Kv; k < K; ++k) s += sload(w + (n + j) * K + k) * x[m * K + k];
      if (scale) s *= scale[n + j];
      if (bias) s += bias[n + j];
      y[m * N + n + j] = s;
    }
  }
  if (n < n1) gemv_rows<T, M, 1>(x, w, K, n, n1, y, N, scale, bias);
}

template <typename T, int M>
static void gemv_m(const float* x, const T* w, int64_t K, int64_t N, float* y, const float* scale, const float* bias) {
  // M * NB accumulators + NB weight vectors + 1 activation vector must fit the vector registers: 32 with
  // AVX-512, 16 with AVX2 (where 3-4 rows x 4 channels would spill to the stack).
#if defined(__AVX512F__) || defined(PALIGEMMA_GEMV_WIDE)
  constexpr int NB = M <= 2 ? 4 : (M <= 4 ? 4 : 2);
#else
  constexpr int NB = M <= 2 ? 4 : 2;
#endif
  const int64_t blocks = (N + NB - 1) / NB;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    gemv_rows<T, M, NB>(x, w, K, b0 * NB, std::min(N, b1 * NB), y, N, scale, bias);
  });
}

template <typename T>
static void gemv_t(const float* x, const T* w, int64_t M, int64_t K, int64_t N, float* y, const float* s, const float* b) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {  // rows in groups of up to 4: one weight pass per group
    const float* xm = x + m0 * K; float* ym = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: gemv_m<T, 1>(xm, w, K, N, ym, s, b); break;
      case 2: gemv_m<T, 2>(xm, w, K, N, ym, s, b); break;
      case 3: gemv_m<T, 3>(xm, w, K, N, ym, s, b); break;
      default: gemv_m<T, 4>(xm, w, K, N, ym, s, b); break;
    }
  }
}

#if defined(__AVX2__)
// int8 weights at decode, with integer products: each activation row is quantized to int16 levels
// (symmetric, step = max|x| / 32767: rounding errors up to 2^-16 of the row's largest value, the weights'
// up to 2^-8 of their channel's), the weights are sign-extended to int16 (`vpmovsxbw`: one instruction per
// 16 weights) and `vpmaddwd` multiplies 16 pairs and adds them to 8 int32 lanes (`vpdpwssd` does both with
// VNNI). The fp32 route needs two conversions and an FMA per 8 weights and row, and at 4 rows is bound by
// them, not by memory.
// Sums are exact in int32 over blocks of I8_BLOCK weights (each lane adds 256 pair sums of at most
// 2 * 32767 * 128: < 2^31), and the blocks are added in fp32. A row's result does not depend on the other
// rows of the call. A row with a NaN or infinity (or only values below 32767 * FLT_MIN) takes the fp32 route
// (`gemv_t`) alone, so it comes out as there.
constexpr int I8_LEVELS = 32767;
constexpr int64_t I8_BLOCK = 4096;

static inline __m256i dot_i16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

static inline float hsum256(__m256 a) {  // `vsum` of the AVX2 build, for the AVX-512 build's __m256 too
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s); return _mm_cvtss_f32(s);
}

// x float[K] -> q int16[K] with x ~= q * step; false (q untouched) when the row holds a NaN or infinity, or
// its largest value is below 32767 * FLT_MIN (the step would be subnormal, or 0).
static bool quantize_row_i16(const float* x, int64_t K, int16_t* q, float* step) {
  float amax = 0.f;
  bool finite = true;
  int64_t k = 0;
  const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // NaN or infinity
    m = _mm256_max_ps(m, a);
  }
  finite = _mm256_movemask_ps(bad) == 0;
  float lanes[8]; _mm256_storeu_ps(lanes, m);
  for (float v : lanes) amax = std::max(amax, v);
  for (; k < K; ++k) { finite &= std::isfinite(x[k]); amax = std::max(amax, std::fabs(x[k])); }
  if (!finite || (amax > 0.f && amax < float(I8_LEVELS) * std::numeric_limits<float>::min())) return false;
  const float s = amax > 0.f ? amax / float(I8_LEVELS) : 1.f;
  *step = s;
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-I8_LEVELS), hi = _mm256_set1_epi32(I8_LEVELS);
  for (k = 0; k + 8 <= K; k += 8) {  // cvtps rounds half to even (default MXCSR), as std::nearbyint
    const __m256i i = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k), sv)), lo), hi);
    _mm_storeu_si128((__m128i*)(q + k), _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
  }
  for (; k < K; ++k) q[k] = (int16_t)std::max(-float(I8_LEVELS), std::min(float(I8_LEVELS), std::nearbyint(x[k] / s)));
  return true;
}

// Vectors of the integer route: 32 int16 pairs per product with AVX512-BW + VNNI (`vpdpwssd` on zmm), else 16.
// Each int32 lane still adds at most 512 products per block of I8_BLOCK weights (256 with zmm).
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr int64_t IW = 32;
typedef __m512i ivec;
typedef __m512 ifvec;
static inline ivec iload_w(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
static inline ivec iload_x(const int16_t* p) { return _mm512_loadu_si512((const void*)p); }
static inline ivec idot(ivec acc, ivec a, ivec b) { return _mm512_dpwssd_epi32(acc, a, b); }
static inline ivec izero() { return _mm512_setzero_si512(); }
static inline ifvec ifzero() { return _mm512_setzero_ps(); }
static inline ifvec ifadd(ifvec t, ivec a) { return _mm512_add_ps(t, _mm512_cvtepi32_ps(a)); }
static inline float ifsum(ifvec t) { return _mm512_reduce_add_ps(t); }
#else
constexpr int64_t IW = 16;
typedef __m256i ivec;
typedef __m256 ifvec;
static inline ivec iload_w(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
static inline ivec iload_x(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline ivec idot(ivec acc, ivec a, ivec b) { return dot_i16(acc, a, b); }
static inline ivec izero() { return _mm256_setzero_si256(); }
static inline ifvec ifzero() { return _mm256_setzero_ps(); }
static inline ifvec ifadd(ifvec t, ivec a) { return _mm256_add_ps(t, _mm256_cvtepi32_ps(a)); }
static inline float ifsum(ifvec t) { return hsum256(t); }
#endif

// y[m, n] = step[m] * scale[n] * sum_k q[m, k] * w[n, k] + bias[n], M rows and NB output channels at a time.
template <int M, int NB>
static void gemv_i8_rows(const int16_t* q, const float* step, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                         float* y, int64_t N, const float* scale, const float* bias) {
  const int64_t Kv = K - K % IW;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    ifvec total[M][NB];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) total[m][j] = ifzero();
    const bool ahead = n + 2 * NB <= n1;
    for (int64_t k0 = 0; k0 < Kv; k0 += I8_BLOCK) {
      const int64_t k1 = std::min(Kv, k0 + I8_BLOCK);
      ivec acc[M][NB];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) acc[m][j] = izero();
      for (int64_t k = k0; k < k1; k += IW) {
        if (ahead && (k & 63) == 0) {  // one cache line of each of the next NB rows, into L2 (see gemv_rows)
#pragma GCC unroll 8
          for (int j = 0; j < NB; ++j) _mm_prefetch((const char*)(w + (n + NB + j) * K + k), _MM_HINT_T1);
        }
        ivec wv[NB];
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) wv[j] = iload_w(w + (n + j) * K + k);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const ivec xv = iload_x(q + m * K + k);
#pragma GCC unroll 8
          for (int j = 0; j < NB; ++j) acc[m][j] = idot(acc[m][j], xv, wv[j]);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) total[m][j] = ifadd(total[m][j], acc[m][j]);
    }
    for (int m = 0; m < M; ++m) for (int j = 0; j < NB; ++j) {
      int32_t tail = 0;
      for (int64_t k = Kv; k < K; ++k) tail += int32_t(q[m * K + k]) * int32_t(w[(n + j) * K + k]);
      float s = (ifsum(total[m][j]) + float(tail)) * step[m];
      if (scale) s *= scale[n + j];
      if (bias) s += bias[n + j];
      y[m * N + n + j] = s;
    }
  }
  if (n < n1) gemv_i8_rows<M, 1>(q, step, w, K, n, n1, y, N, scale, bias);
}

template <int M>
static void gemv_i8_m(const int16_t* q, const float* step, const int8_t* w, int64_t K, int64_t N, float* y,
                      const float* scale, const float* bias) {
  // M * NB int32 accumulators + NB weight vectors + 1 activation vector fit the vector registers: 16 with
  // AVX2 (NB = 3 at 3-4 rows measured no faster than 2), 32 with AVX-512.
#if defined(__AVX512F__)
  constexpr int NB = 4;
#else
  constexpr int NB = M <= 2 ? 4 : 2;
#endif
  const int64_t blocks = (N + NB - 1) / NB;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    gemv_i8_rows<M, NB>(q, step, w, K, b0 * NB, std::min(N, b1 * NB), y, N, scale, bias);
  });
}

// The integer route for int8 weights. A row that `quantize_row_i16` declines (NaN, infinity, all values below
// 32767 * FLT_MIN) is computed alone on the fp32 route afterwards, so no row's result depends on another's.
static void gemv_i8(const float* x, const int8_t* w, int64_t M, int64_t K, int64_t N, float* y, const float* s,
                    const float* b) {
  // 64-byte aligned: a vector load of a row that straddles two cache lines costs two, and the rows are
  // loaded once per weight vector (a malloc'd buffer is 16-byte aligned: half the loads straddled, and the
  // 4-row kernel ran at ~65% of its in-cache speed)
  auto q_buf = torch::empty({M * K + 32}, torch::dtype(torch::kInt16));
  int16_t* q = q_buf.data_ptr<int16_t>();
  q += ((64 - reinterpret_cast<uintptr_t>(q) % 64) % 64) / sizeof(int16_t);
  std::vector<float> step(M, 1.f);
  std::vector<int64_t> declined;
  for (int64_t m = 0; m < M; ++m)
    if (!quantize_row_i16(x + m * K, K, q + m * K, step.data() + m)) {
      std::fill(q + m * K, q + (m + 1) * K, int16_t(0));  // its integer result is replaced below
      declined.push_back(m);
    }
  for (int64_t m0 = 0; m0 < M; m0 += 4) {  // rows in groups of up to 4: one weight pass per group
    const int16_t* qm = q + m0 * K; const float* sm = step.data() + m0; float* ym = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: gemv_i8_m<1>(qm, sm, w, K, N, ym, s, b); break;
      case 2: gemv_i8_m<2>(qm, sm, w, K, N, ym, s, b); break;
      case 3: gemv_i8_m<3>(qm, sm, w, K, N, ym, s, b); break;
      default: gemv_i8_m<4>(qm, sm, w, K, N, ym, s, b); break;
    }
  }
  for (int64_t m : declined) gemv_t<int8_t>(x + m * K, w, 1, K, N, y + m * N, s, b);
}
#endif

// x float[M, K] contiguous; w [N, K] float32 / bfloat16 / int8; scale float[N] or empty; bias float[N] or empty;
// int_acts: int8 weights take the integer route (`gemv_i8`) where this build has it.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor bias, bool int_acts) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w must be contiguous [N, K]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors expected");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  for (const auto& [t, what] : {std::pair<const torch::Tensor&, const char*>{scale, "scale"}, {bias, "bias"}})
    TORCH_CHECK(t.numel() == 0 || (t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                                   t.numel() == N),
                "gemv: ", what, " must be empty or a contiguous float32 CPU tensor of N = ", N, " values, got ",
                t.scalar_type(), " with ", t.numel());
  auto y = torch::empty({M, N}, x.options());
  const float* s = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  switch (w.scalar_type()) {
    case at::kFloat: gemv_t<float>(x.data_ptr<float>(), w.data_ptr<float>(), M, K, N, y.data_ptr<float>(), s, b); break;
    case at::kBFloat16: gemv_t<uint16_t>(x.data_ptr<float>(), (const uint16_t*)w.data_ptr(), M, K, N, y.data_ptr<float>(), s, b); break;
    case at::kChar:
#if defined(__AVX2__)
      if (int_acts) { gemv_i8(x.data_ptr<float>(), w.data_ptr<int8_t>(), M, K, N, y.data_ptr<float>(), s, b); break; }
#endif
      gemv_t<int8_t>(x.data_ptr<float>(), w.data_ptr<int8_t>(), M, K, N, y.data_ptr<float>(), s, b); break;
    default: TORCH_CHECK(false, "gemv: weight dtype must be float32, bfloat16 or int8");
  }
  return y;
}

// Symmetric per-row int8: scale[r] = max|w[r]| / 127 (1 for an all-zero row), q = round_half_even(w / scale).
template <typename T>
static void quantize_rows_t(const T* src, int64_t N, int64_t K, int8_t* q, float* scale) {
  at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = src + r * K;
      int8_t* out = q + r * K;
      float amax = 0.f;
      int64_t k = 0;
#if defined(__AVX512F__)
      __m512 m = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(vload(row + k)));
      amax = _mm512_reduce_max_ps(m);
#elif defined(__AVX2__)
      __m256 m = _mm256_setzero_ps();
      const __m256 sign = _mm256_set1_ps(-0.f);
      for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, vload(row + k)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
      amax = _mm_cvtss_f32(h);
#endif
      for (; k < K; ++k) amax = std::max(amax, std::fabs(sload(row + k)));
      float s = amax / 127.f;
      if (!(s > 0.f)) s = 1.f;
      scale[r] = s;
      k = 0;
#if defined(__AVX512F__)
      const __m512 sv = _mm512_set1_ps(s);
      const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
      for (; k + 16 <= K; k += 16) {  // cvtps rounds half to even (default MXCSR), as torch.round
        __m512i i = _mm512_cvtps_epi32(_mm512_div_ps(vload(row + k), sv));
        _mm_storeu_si128((__m128i*)(out + k), _mm512_cvtsepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(i, lo), hi)));
      }
#elif defined(__AVX2__)
      const __m256 sv = _mm256_set1_ps(s);
      const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
      for (; k + 8 <= K; k += 8) {  // cvtps rounds half to even (default MXCSR), as torch.round
        __m256i i = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_div_ps(vload(row + k), sv)), lo), hi);
        __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));  // 8 x int16, in order
        _mm_storel_epi64((__m128i*)(out + k), _mm_packs_epi16(p16, p16));  // 8 x int8
      }
#endif
      for (; k < K; ++k) out[k] = (int8_t)std::max(-127.f, std::min(127.f, std::nearbyint(sload(row + k) / s)));
    }
  });
}

// w [N, K] float32 / bfloat16 -> fills q int8 [N, K] and scale float32 [N].
void quantize_rows(torch::Tensor w, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && q.is_contiguous() && q.sizes() == w.sizes(), "quantize_rows: shapes");
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == w.size(0), "quantize_rows: dtypes");
  if (w.scalar_type() == at::kFloat)
    quantize_rows_t<float>(w.data_ptr<float>(), w.size(0), w.size(1), q.data_ptr<int8_t>(), scale.data_ptr<float>());
  else if (w.scalar_type() == at::kBFloat16)
    quantize_rows_t<uint16_t>((const uint16_t*)w.data_ptr(), w.size(0), w.size(1), q.data_ptr<int8_t>(), scale.data_ptr<float>());
  else
    TORCH_CHECK(false, "quantize_rows: float32 or bfloat16 weights expected");
}

// int8 [N, K] -> bfloat16 [N, K], exact (the integers are kept; scales are applied to the GEMM output).
torch::Tensor int8_to_bf16(torch::Tensor q, torch::Tensor out) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "int8_to_bf16: contiguous int8 tensor expected");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.numel() == q.numel(), "int8_to_bf16: out");
  const int8_t* src = q.data_ptr<int8_t>();
  uint16_t* dst = (uint16_t*)out.data_ptr();
  const int64_t n = q.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if defined(__AVX512F__)
    for (; i + 16 <= i1; i += 16) {
      __m512i f = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + i)))));
      _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(f, 16)));
    }
#endif
    for (; i < i1; ++i) { float f = float(src[i]); uint32_t u; std::memcpy(&u, &f, 4); dst[i] = uint16_t(u >> 16); }
  });
  return out;
}

torch::Tensor gemm_int8(torch::Tensor x, torch::Tensor w, torch::Tensor sw, torch::Tensor wsum);  // gemm_int8.cpp
torch::Tensor int8_row_sums(torch::Tensor w);
int64_t gemm_int8_activation_levels();
torch::Tensor int16_row_steps(torch::Tensor w);  // gemm_int16.cpp
torch::Tensor gemm_int16(torch::Tensor x, torch::Tensor w, torch::Tensor sw);

// GELU, tanh form: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3); exp as Cephes'
// expf (degree-5 polynomial after reduction by ln 2; relative error ~1e-7). In place, times `up` when given
// (GeGLU), so the MLP's [rows, intermediate] product takes one pass instead of GELU's and the product's.
#if defined(__AVX2__)
static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

void gelu_tanh_(torch::Tensor x, torch::Tensor up) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "gelu_tanh_: contiguous float32 x");
  TORCH_CHECK(up.numel() == 0 || (up.scalar_type() == at::kFloat && up.is_contiguous() && up.numel() == x.numel()),
              "gelu_tanh_: up must be float32 like x, or empty");
  float* p = x.data_ptr<float>();
  const float* u = up.numel() ? up.data_ptr<float>() : nullptr;
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if defined(__AVX2__)
    const __m256 k2 = _mm256_set1_ps(-2.f * 0.7978845608028654f), c = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.f);
    for (; i + 8 <= i1; i += 8) {
      const __m256 v = _mm256_loadu_ps(p + i);
      const __m256 inner = _mm256_mul_ps(k2, _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v));  // -2u
      __m256 g = _mm256_div_ps(v, _mm256_add_ps(one, exp256(inner)));
      if (u) g = _mm256_mul_ps(g, _mm256_loadu_ps(u + i));
      _mm256_storeu_ps(p + i, g);
    }
#endif
    for (; i < i1; ++i) {
      const float v = p[i];
      const float g = v / (1.f + std::exp(-2.f * 0.7978845608028654f * (v + 0.044715f * v * v * v)));
      p[i] = u ? g * u[i] : g;
    }
  });
}

// Gemma 2's attention probabilities, in place, one pass per row over scores still in cache:
// s = softmax_k(mask ? cap * tanh(pre * s) : lowest), as transformers computes them (scores * scale, then
// / cap, tanh, * cap, masked_fill(finfo.min), fp32 softmax), without the five [rows, K] tensors its ops make.
// s float32 [G, C, K] contiguous; mask bool [Gm, C, K] (last dim contiguous; group g reads mask g / (G / Gm)),
// or empty for none. A row whose keys are all masked gets 1 / K everywhere (softmax over equal values, as
// torch); a NaN at an attended key makes the row NaN (as torch's softmax). tanh: Eigen's rational
// approximation (|error| <= 3e-7; exactly +-1 from |x| = 7.9988 on, where fp32's tanh rounds to +-1 too);
// exp: exp256 above.
#if defined(__AVX2__)
static inline __m256 tanh256(__m256 x) {
  // max/min keep a NaN x (they return their second operand when either is NaN)
  const __m256 c = _mm256_max_ps(_mm256_set1_ps(-7.99881172180175781f), _mm256_min_ps(_mm256_set1_ps(7.99881172180175781f), x));
  const __m256 x2 = _mm256_mul_ps(c, c);
  __m256 p = _mm256_set1_ps(-2.76076847742355e-16f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.00018790482477e-13f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-8.60467152213735e-11f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(5.12229709037114e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.48572235717979e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(6.37261928875436e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(4.89352455891786e-03f));
  p = _mm256_mul_ps(p, c);
  __m256 q = _mm256_set1_ps(1.19825839466702e-06f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(1.18534705686654e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(2.26843463243900e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(4.89352518554385e-03f));
  const __m256 small = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), x), _mm256_set1_ps(0.0004f), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_div_ps(p, q), x, small);  // tanh(x) = x below 4e-4, to the last bit
}
#endif

static void softcap_softmax_row(float* s, const bool* m, int64_t K, float pre, float cap) {
  const float lowest = -std::numeric_limits<float>::max();
  float mx = lowest;
  bool nan = false;
  int64_t k = 0;
#if defined(__AVX2__)
  __m256 vmx = _mm256_set1_ps(lowest), vnan = _mm256_setzero_ps();
  const __m256 vpre = _mm256_set1_ps(pre), vcap = _mm256_set1_ps(cap), vlow = _mm256_set1_ps(lowest);
  for (; k + 8 <= K; k += 8) {
    __m256 t = _mm256_mul_ps(vcap, tanh256(_mm256_mul_ps(vpre, _mm256_loadu_ps(s + k))));
    if (m) {
      int64_t b; std::memcpy(&b, m + k, 8);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b)), _mm256_setzero_si256()));
      t = _mm256_blendv_ps(vlow, t, keep);  // a masked NaN is gone, as with masked_fill
    }
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(t, t, _CMP_UNORD_Q));
    vmx = _mm256_max_ps(vmx, t);
    _mm256_storeu_ps(s + k, t);
  }
  nan = _mm256_movemask_ps(vnan) != 0;
  float lanes[8]; _mm256_storeu_ps(lanes, vmx);
  for (float v : lanes) mx = std::max(mx, v);
#endif
  for (; k < K; ++k) {
    float t = cap * std::tanh(pre * s[k]);
    if (m && !m[k]) t = lowest;
    nan |= std::isnan(t);
    mx = std::max(mx, t);
    s[k] = t;
  }
  if (nan) { std::fill(s, s + K, std::numeric_limits<float>::quiet_NaN()); return; }
  if (mx == lowest) { std::fill(s, s + K, 1.f / float(K)); return; }  // every key masked: uniform, as torch
  float sum = 0.f;
  k = 0;
#if defined(__AVX2__)
  __m256 vsum = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(mx);
  for (; k + 8 <= K; k += 8) {
    const __m256 t = _mm256_loadu_ps(s + k);
    const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(t, vm)), _mm256_cmp_ps(t, vlow, _CMP_GT_OQ));  // masked: 0
    vsum = _mm256_add_ps(vsum, e);
    _mm256_storeu_ps(s + k, e);
  }
  float lanes2[8]; _mm256_storeu_ps(lanes2, vsum);
  for (float v : lanes2) sum += v;
#endif
  for (; k < K; ++k) {
    const float e = s[k] > lowest ? std::exp(s[k] - mx) : 0.f;
    sum += e;
    s[k] = e;
  }
  const float inv = 1.f / sum;
  k = 0;
#if defined(__AVX2__)
  for (const __m256 vi = _mm256_set1_ps(inv); k + 8 <= K; k += 8) _mm256_storeu_ps(s + k, _mm256_mul_ps(_mm256_loadu_ps(s + k), vi));
#endif
  for (; k < K; ++k) s[k] *= inv;
}

void softcap_softmax_(torch::Tensor s, torch::Tensor mask, double pre, double cap) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 3, "softcap_softmax_: contiguous float32 [G, C, K]");
  const int64_t G = s.size(0), C = s.size(1), K = s.size(2);
  TORCH_CHECK(s.device().is_cpu(), "softcap_softmax_: CPU tensors expected");
  const bool masked = mask.dim() == 3;  // "no mask" is an empty 1-d tensor; an empty [0, C, K] mask is refused
  if (masked)
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(1) == C && mask.size(2) == K &&
                mask.stride(2) == 1 && mask.size(0) > 0 && G % mask.size(0) == 0 && mask.device().is_cpu(),
                "softcap_softmax_: mask must be a CPU bool [Gm, C, K], last dim contiguous, Gm > 0 dividing G");
  const int64_t per = masked ? G / mask.size(0) : 1, ms0 = masked ? mask.stride(0) : 0, ms1 = masked ? mask.stride(1) : 0;
  float* p = s.data_ptr<float>();
  const bool* mp = masked ? mask.data_ptr<bool>() : nullptr;
  at::parallel_for(0, G * C, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = r / C, c = r % C;
      softcap_softmax_row(p + r * K, mp ? mp + (g / per) * ms0 + c * ms1 : nullptr, K, float(pre), float(cap));
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "x float32[M, K] @ w[N, K].T (fp32 / bf16 / int8 weights) * scale[N] + bias[N]; int_acts: int8 weights by int16 activation levels");
  m.def("int8_to_bf16", &int8_to_bf16, "int8 -> bfloat16, exactly, into out");
  m.def("gemm_int8", &gemm_int8, "x float32[M, K] (quantized per row here) @ w int8[N, K].T * sw[N], int32 products");
  m.def("int8_row_sums", &int8_row_sums, "int8 [N, K] -> int32 [N] row sums");
  m.def("softcap_softmax_", &softcap_softmax_, "s = softmax(mask ? cap * tanh(pre * s) : lowest) over the last dim, in place");
  m.def("gelu_tanh_", &gelu_tanh_, "x = gelu_tanh(x) (* up, when given), in place");
  m.def("gemm_int8_activation_levels", &gemm_int8_activation_levels, "127 (AVX2: vpmaddubsw) or 255 (VNNI, plain C++)");
  m.def("int16_row_steps", &int16_row_steps, "bfloat16 [N, K] -> float32 [N]: max|w[n]| / 2047");
  m.def("gemm_int16", &gemm_int16, "x float32[M, K] @ w[N, K].T (bf16 or int8 * sw[N]), 12-bit levels, int32 block sums");
  m.def("quantize_rows", &quantize_rows, "float32/bfloat16 [N, K] -> int8 [N, K] + per-row float32 scale");
}
