"""Register-level ceilings of the prefill GEMMs' instructions on this CPU, one thread, side by side.

    python benchmarks/bench_peak.py [--seconds 1] [--rounds 3]

Compiles benchmarks/peak.cpp (g++) and runs its loops interleaved, `--rounds` times, keeping each loop's
best: fp32 FMA (what MKL's and oneDNN's fp32 GEMMs, hence transformers' prefill, are made of) against the
integer instructions of our int8 and int16 GEMMs (AVX2 `vpmaddubsw` / `vpmaddwd`, VNNI `vpdpbusd` /
`vpdpwssd`), in multiply-adds per second. Only the loops this CPU reports the flags for are run.

Why: a GEMM-bound prefill on an instruction that does R times fp32 FMA's multiply-adds per second cannot
take less than 1/R of an fp32 GEMM's time at equal efficiency. The issue-14 targets (first token <= 0.5x
transformers fp32 for int8, <= 0.8x for the default mode) need R >= 2 (int8) and R >= 1.25 (int16) with
room to spare; the script prints R and that bound for each integer loop. On a VM the rates move with
the neighbours (fp32 FMA went from 48 to 35 G/s on one Xeon vCPU within an hour), so run it next to any
benchmark whose ratios it should explain.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOOPS = {  # name: (flags the CPU must report, what uses it)
    "fma256": (("avx2", "fma"), "fp32 GEMMs with AVX2 (MKL / oneDNN: transformers, the exact mode)"),
    "maddubs256": (("avx2",), "our int8 GEMM, AVX2 (7-bit activations)"),
    "maddwd256": (("avx2",), "our int16 GEMM, AVX2 (the default mode's prefill there)"),
    "dpwssd256": (("avx_vnni",), "our int16 GEMM with AVX-VNNI"),
    "dpbusd256": (("avx_vnni",), "our int8 GEMM with AVX-VNNI"),
    "dpbusd256_evex": (("avx512_vnni", "avx512vl"), "our int8 GEMM with AVX512-VNNI (256-bit vectors, EVEX)"),
    "fma512": (("avx512f",), "fp32 GEMMs with AVX-512"),
    "dpbusd512": (("avx512f", "avx512_vnni"), "int8 on 512-bit vectors (not used by our GEMM)"),
}
TARGETS = {"maddubs256": 0.5, "dpbusd256": 0.5, "dpbusd256_evex": 0.5, "maddwd256": 0.8, "dpwssd256": 0.8}  # issue 14, int8 / default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per loop per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each loop's best is kept")
    args = ap.parse_args()
    if args.seconds <= 0 or args.rounds < 1:
        ap.error("--seconds must be > 0 and --rounds >= 1")
    from paligemma.cpu import features

    model, flags = features._cpuinfo()
    loops = [n for n, (need, _) in LOOPS.items() if all(f in flags for f in need)]
    if "fma256" not in loops:
        sys.exit(f"bench_peak: this CPU ({model}) reports no AVX2 + FMA; nothing to compare")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "peak"
        build = subprocess.run(["g++", "-O2", "-std=c++17", str(ROOT / "benchmarks" / "peak.cpp"), "-o", str(exe)],
                               capture_output=True, text=True)
        if build.returncode != 0:
            sys.exit(f"bench_peak: g++ failed:\n{build.stderr[-2000:]}")
        best: dict[str, float] = {}
        for r in range(args.rounds):  # each round in a new order, after an untimed warm-up loop at full clock
            order = loops[r % len(loops):] + loops[:r % len(loops)]
            out = subprocess.run([str(exe), str(args.seconds), "fma256", *order], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"bench_peak: the probe failed (exit {out.returncode}) running {order}: {out.stderr[-500:]}")
            for line in out.stdout.split("\n")[1:]:  # the warm-up's line left out
                if line:
                    name, value = line.split()
                    best[name] = max(best.get(name, 0.0), float(value))
    print(f"cpu: {model}; flags {' '.join(sorted(f for f in flags if f.startswith(('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx_vnni', 'amx'))))}")
    print(f"one thread, best of {args.rounds} interleaved rounds of {args.seconds:g} s per loop")
    ref = best["fma256"]
    for name in loops:
        r = best[name] / ref
        line = f"  {name:11s} {best[name]:7.1f} G multiply-adds/s  {r:5.2f}x fma256   {LOOPS[name][1]}"
        if name in TARGETS:
            ok = 1 / r <= TARGETS[name]
            line += f"\n{'':15s}GEMM-bound first token >= {1 / r:.2f}x an fp32 GEMM prefill at equal efficiency " \
                    f"(target {TARGETS[name]}: {'reachable' if ok else 'out of reach on this instruction, at this moment'})"
        print(line)


if __name__ == "__main__":
    main()
