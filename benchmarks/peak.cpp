// Register-only throughput of the instructions the prefill GEMMs are built from, one thread
// (benchmarks/bench_peak.py compiles and runs this). Each loop keeps 8-10 independent accumulators in
// registers (and distinct products: a repeated one would be computed once), so nothing but the execution ports bounds it: the ceiling a GEMM on those instructions can
// approach, and how the integer ones compare with fp32 FMA on this core at this moment.
//
//   fma256      vfmadd231ps ymm: 8 multiply-adds (the fp32 GEMMs of MKL / oneDNN with AVX2)
//   maddubs256  vpmaddubsw + vpmaddwd (by ones) + vpaddd: 32 u8 x s8 multiply-adds (our int8 GEMM, AVX2)
//   maddwd256   vpmaddwd + vpaddd: 16 int16 multiply-adds (our int16 GEMM, AVX2)
//   dpwssd256   vpdpwssd ymm: 16 (the int16 GEMM with VNNI)
//   dpbusd256   vpdpbusd ymm: 32 (the int8 GEMM with VNNI: AVX-VNNI or AVX512-VNNI)
//   fma512 / dpbusd512  the same on 512-bit vectors (AVX-512)
//
// Usage: peak SECONDS_PER_LOOP NAME... ; prints "NAME GMAC/s" lines.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Runs `body` (one round over 10 accumulators) until `seconds` passed; multiply-adds per second.
double rate(double seconds, double macs_per_round, void (*body)(long)) {
  long rounds = 0, n = 1 << 16;
  const double t0 = now();
  double t = t0;
  while (t - t0 < seconds) {
    body(n);
    rounds += n;
    t = now();
  }
  return macs_per_round * rounds / (t - t0);
}

template <class V, int N>
void sink(const V (&acc)[N]) {  // keep every accumulator's result alive: the compiler must compute them all
  asm volatile("" : : "m"(acc) : "memory");
}

__attribute__((target("avx2,fma"), noinline)) void fma256_rounds(long n) {
  __m256 a[10], x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps(float(i));
  for (long k = 0; k < n; ++k) {
    asm volatile("" : "+x"(x), "+x"(y));
#pragma GCC unroll 10
    for (int i = 0; i < 10; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
  }
  sink(a);
}
double fma256(double s) { return rate(s, 10 * 8, fma256_rounds); }

__attribute__((target("avx2"), noinline)) void maddubs256_rounds(long n) {
  // 8 distinct products (a repeated one would be computed once): 8 accumulators + 5 operands + ones
  __m256i a[8], u = _mm256_set1_epi8(3), w0 = _mm256_set1_epi8(-5), w1 = _mm256_set1_epi8(7),
                w2 = _mm256_set1_epi8(9), w3 = _mm256_set1_epi8(-2);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < 8; ++i) a[i] = _mm256_set1_epi32(i);
  for (long k = 0; k < n; ++k) {
    asm volatile("" : "+x"(u), "+x"(w0), "+x"(w1), "+x"(w2), "+x"(w3));
    const __m256i p[8] = {_mm256_maddubs_epi16(u, w0), _mm256_maddubs_epi16(u, w1), _mm256_maddubs_epi16(u, w2),
                          _mm256_maddubs_epi16(u, w3), _mm256_maddubs_epi16(w0, u), _mm256_maddubs_epi16(w1, u),
                          _mm256_maddubs_epi16(w2, u), _mm256_maddubs_epi16(w3, u)};
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(p[i], ones));
  }
  sink(a);
}
double maddubs256(double s) { return rate(s, 8 * 32, maddubs256_rounds); }

__attribute__((target("avx2"), noinline)) void maddwd256_rounds(long n) {
  __m256i a[8], u = _mm256_set1_epi16(3), w0 = _mm256_set1_epi16(-5), w1 = _mm256_set1_epi16(7),
                w2 = _mm256_set1_epi16(9), w3 = _mm256_set1_epi16(-2);
  for (int i = 0; i < 8; ++i) a[i] = _mm256_set1_epi32(i);
  for (long k = 0; k < n; ++k) {
    asm volatile("" : "+x"(u), "+x"(w0), "+x"(w1), "+x"(w2), "+x"(w3));
    const __m256i p[8] = {_mm256_madd_epi16(u, w0), _mm256_madd_epi16(u, w1), _mm256_madd_epi16(u, w2),
                          _mm256_madd_epi16(u, w3), _mm256_madd_epi16(w0, w1), _mm256_madd_epi16(w1, w2),
                          _mm256_madd_epi16(w2, w3), _mm256_madd_epi16(w3, w0)};
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) a[i] = _mm256_add_epi32(a[i], p[i]);
  }
  sink(a);
}
double maddwd256(double s) { return rate(s, 8 * 16, maddwd256_rounds); }

__attribute__((target("avx2,avxvnni"), noinline)) void dpwssd256_rounds(long n) {
  __m256i a[10], u = _mm256_set1_epi16(3), w = _mm256_set1_epi16(-5);
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_epi32(i);
  for (long k = 0; k < n; ++k) {
    asm volatile("" : "+x"(u), "+x"(w));
#pragma GCC unroll 10
    for (int i = 0; i < 10; ++i) a[i] = _mm256_dpwssd_avx_epi32(a[i], u, w);
  }
  sink(a);
}
double dpwssd256(double s) { return rate(s, 10 * 16, dpwssd256_rounds); }

__attribute__((target("avx2,avxvnni"), noinline)) void dpbusd256_rounds(long n) {
  __m256i a[10], u = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-5);
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_epi32(i);
  for (long k = 0; k < n; ++k) {
    asm volatile("" : "+x"(u), "+x"(w));
#pragma GCC unroll 10
    for (int i = 0; i < 10; ++i) a[i] = _mm256_dpbusd_avx_epi32(a[i], u, w);
  }
  sink(a);
}
double dpbusd256(double s) { return rate(s, 10 * 32, dpbusd256_rounds); }

__attribute__((target("avx512f"), noinline)) void fma512_rounds(long n) {
  __m512 a[10], x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
  for (int i = 0; i < 10; ++i) a[i] = _mm512_set1_ps(float(i));
  for (long k = 0; k < n; ++k) {
    asm volatile("" : "+v"(x), "+v"(y));
#pragma GCC unroll 10
    for (int i = 0; i < 10; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
  }
  sink(a);
}
double fma512(double s) { return rate(s, 10 * 16, fma512_rounds); }

__attribute__((target("avx512f,avx512vnni"), noinline)) void dpbusd512_rounds(long n) {
  __m512i a[10], u = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-5);
  for (int i = 0; i < 10; ++i) a[i] = _mm512_set1_epi32(i);
  for (long k = 0; k < n; ++k) {
    asm volatile("" : "+v"(u), "+v"(w));
#pragma GCC unroll 10
    for (int i = 0; i < 10; ++i) a[i] = _mm512_dpbusd_epi32(a[i], u, w);
  }
  sink(a);
}
double dpbusd512(double s) { return rate(s, 10 * 64, dpbusd512_rounds); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s SECONDS NAME...\n", argv[0]);
    return 2;
  }
  const double s = std::atof(argv[1]);
  for (int i = 2; i < argc; ++i) {
    const char* name = argv[i];
    double r = -1;
    if (!std::strcmp(name, "fma256")) r = fma256(s);
    else if (!std::strcmp(name, "maddubs256")) r = maddubs256(s);
    else if (!std::strcmp(name, "maddwd256")) r = maddwd256(s);
    else if (!std::strcmp(name, "dpwssd256")) r = dpwssd256(s);
    else if (!std::strcmp(name, "dpbusd256")) r = dpbusd256(s);
    else if (!std::strcmp(name, "fma512")) r = fma512(s);
    else if (!std::strcmp(name, "dpbusd512")) r = dpbusd512(s);
    else {
      std::fprintf(stderr, "unknown loop %s\n", name);
      return 2;
    }
    std::printf("%s %.2f\n", name, r / 1e9);
    std::fflush(stdout);
  }
  return 0;
}
