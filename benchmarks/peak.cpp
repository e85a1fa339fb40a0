// Register-only throughput of the instructions the prefill GEMMs are built from, one thread
// (benchmarks/bench_peak.py compiles and runs this). Each loop is written in assembly (compiled intrinsics
// kept accumulators on the stack or merged repeated products) over independent accumulators in registers, so nothing but the execution ports bounds it: the ceiling a GEMM on those instructions can
// approach, and how the integer ones compare with fp32 FMA on this core at this moment.
//
//   fma256      vfmadd231ps ymm: 8 multiply-adds (the fp32 GEMMs of MKL / oneDNN with AVX2)
//   maddubs256  vpmaddubsw + vpmaddwd (by ones) + vpaddd: 32 u8 x s8 multiply-adds (our int8 GEMM, AVX2)
//   maddwd256   vpmaddwd + vpaddd: 16 int16 multiply-adds (our int16 GEMM, AVX2)
//   dpwssd256   vpdpwssd ymm: 16 (the int16 GEMM with VNNI)
//   dpbusd256   vpdpbusd ymm, VEX (AVX-VNNI): 32 (the int8 GEMM with AVX-VNNI)
//   dpbusd256_evex  the same EVEX-encoded (AVX512-VNNI + VL: the int8 GEMM of the -march=native build there)
//   fma512 / dpbusd512  the same on 512-bit vectors (AVX-512)
//
// Usage: peak SECONDS_PER_LOOP NAME... ; prints "NAME GMAC/s" lines. The first loop a process runs can
// find the core at a lower clock: bench_peak.py warms up first and rotates the order between rounds.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Runs `body` (n rounds of one instruction group per accumulator) until `seconds` passed; multiply-adds per second.
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

// (The two multi-instruction loops after these keep x14, x15 as operands and add products in x5.. / x6..)
// Loops of one instruction: operands x14, x15 and accumulators x0..x9 zeroed, then per round
// `INSN x15, x14, x<i>` for the 10 accumulators. R is the register file, "ymm" or "zmm".
#define PG_EACH10(X, A, B, R) X " %%" R A ", %%" R B ", %%" R "0\n" X " %%" R A ", %%" R B ", %%" R "1\n" X " %%" R A ", %%" R B ", %%" R "2\n" X " %%" R A ", %%" R B ", %%" R "3\n" X " %%" R A ", %%" R B ", %%" R "4\n" X " %%" R A ", %%" R B ", %%" R "5\n" X " %%" R A ", %%" R B ", %%" R "6\n" X " %%" R A ", %%" R B ", %%" R "7\n" X " %%" R A ", %%" R B ", %%" R "8\n" X " %%" R A ", %%" R B ", %%" R "9\n"
#define PG_LOOP10(NAME, TARGET, MACS, XOR, INSN, R)                                                      \
  __attribute__((target(TARGET), noinline)) void NAME##_rounds(long n) {                                  \
    asm volatile(XOR " %%" R "14, %%" R "14, %%" R "14\n" XOR " %%" R "15, %%" R "15, %%" R "15\n"        \
                 PG_EACH10(XOR, "14", "14", R) "1:\n" PG_EACH10(INSN, "15", "14", R)                      \
                 "dec %0\n jnz 1b\n vzeroupper\n"                                                         \
                 : "+r"(n) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",     \
                   "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc");                     \
  }                                                                                                       \
  double NAME(double s) { return rate(s, MACS, NAME##_rounds); }

PG_LOOP10(fma256, "avx2,fma", 10 * 8, "vxorps", "vfmadd231ps", "ymm")
PG_LOOP10(dpwssd256, "avx2,avxvnni", 10 * 16, "vpxor", "%{vex%} vpdpwssd", "ymm")
PG_LOOP10(dpbusd256, "avx2,avxvnni", 10 * 32, "vpxor", "%{vex%} vpdpbusd", "ymm")
PG_LOOP10(dpbusd256_evex, "avx512f,avx512vl,avx512vnni", 10 * 32, "vpxor", "vpdpbusd", "ymm")  // EVEX: AVX512-VNNI
PG_LOOP10(fma512, "avx512f", 10 * 16, "vpxord", "vfmadd231ps", "zmm")
PG_LOOP10(dpbusd512, "avx512f,avx512vnni", 10 * 64, "vpxord", "vpdpbusd", "zmm")


__attribute__((target("avx2"), noinline)) void maddubs256_rounds(long n) {
  asm volatile(
      "vpxor %%ymm14, %%ymm14, %%ymm14\n vpxor %%ymm15, %%ymm15, %%ymm15\n vpcmpeqw %%ymm13, %%ymm13, %%ymm13\n"
      "1:\n"
      "vpmaddubsw %%ymm15, %%ymm14, %%ymm5\n"
      "vpmaddubsw %%ymm15, %%ymm14, %%ymm6\n"
      "vpmaddubsw %%ymm15, %%ymm14, %%ymm7\n"
      "vpmaddubsw %%ymm15, %%ymm14, %%ymm8\n"
      "vpmaddubsw %%ymm15, %%ymm14, %%ymm9\n"
      "vpmaddwd %%ymm13, %%ymm5, %%ymm5\n"
      "vpmaddwd %%ymm13, %%ymm6, %%ymm6\n"
      "vpmaddwd %%ymm13, %%ymm7, %%ymm7\n"
      "vpmaddwd %%ymm13, %%ymm8, %%ymm8\n"
      "vpmaddwd %%ymm13, %%ymm9, %%ymm9\n"
      "vpaddd %%ymm5, %%ymm0, %%ymm0\n"
      "vpaddd %%ymm6, %%ymm1, %%ymm1\n"
      "vpaddd %%ymm7, %%ymm2, %%ymm2\n"
      "vpaddd %%ymm8, %%ymm3, %%ymm3\n"
      "vpaddd %%ymm9, %%ymm4, %%ymm4\n"
      "dec %0\n"
      "jnz 1b\n"
      "vzeroupper\n"
      : "+r"(n) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc");
}
double maddubs256(double s) { return rate(s, 5 * 32, maddubs256_rounds); }

__attribute__((target("avx2"), noinline)) void maddwd256_rounds(long n) {
  asm volatile(
      "vpxor %%ymm14, %%ymm14, %%ymm14\n vpxor %%ymm15, %%ymm15, %%ymm15\n"
      "1:\n"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm6\n"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm7\n"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm8\n"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm9\n"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm10\n"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm11\n"
      "vpaddd %%ymm6, %%ymm0, %%ymm0\n"
      "vpaddd %%ymm7, %%ymm1, %%ymm1\n"
      "vpaddd %%ymm8, %%ymm2, %%ymm2\n"
      "vpaddd %%ymm9, %%ymm3, %%ymm3\n"
      "vpaddd %%ymm10, %%ymm4, %%ymm4\n"
      "vpaddd %%ymm11, %%ymm5, %%ymm5\n"
      "dec %0\n"
      "jnz 1b\n"
      "vzeroupper\n"
      : "+r"(n) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc");
}
double maddwd256(double s) { return rate(s, 6 * 16, maddwd256_rounds); }


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
    else if (!std::strcmp(name, "dpbusd256_evex")) r = dpbusd256_evex(s);
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
