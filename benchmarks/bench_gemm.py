"""Prefill GEMM micro-benchmark: PaliGemma's many-row products through MKL (what transformers and the exact
mode use), oneDNN's fp32 matmul (the fast formats' "fp32" path), and the int8 path, side by side.

    python benchmarks/bench_gemm.py --threads 2 [--emulate avx2|avx2-vnni] [--rows 268] [--shapes 2048x16384,...]

Each shape K x N is a weight [N, K] of fp32 values ~N(0, 0.02) and `--rows` activation rows; every variant
runs in this process, the variants interleaved, median of `--repeats` rounds. Prints GFLOP/s and each variant's time
relative to MKL's `F.linear`, with the CPU and the paths in force. `--emulate avx2` (or `--emulate-avx2`) re-runs
this script with `paligemma.cpu.features.EMULATE_AVX2` (MKL, oneDNN, ATen and our kernels capped at AVX2);
`--emulate avx2-vnni` with `EMULATE_AVX2_VNNI` (AVX2 and AVX-VNNI, as Intel's CPUs since Alder Lake).

  mkl            F.linear(x, w): MKL sgemm, the reference
  onednn         torch.ops.mkldnn._linear_pointwise(x, w): oneDNN's fp32 matmul on the plain weight
  mkl-packed     MKL's packed sgemm (weight packed in advance)
  widen+mkl      a bf16 weight widened to fp32, then MKL: the "fp32" path before oneDNN
  ours-fp32      paligemma.cpu.formats._matmul on the bf16 weight with the "fp32" path (widen + fp32_gemm)
  int8-packed    torch's int8 GEMM (oneDNN / fbgemm) on a weight packed in advance (memory: a second copy)
  int8-per-call  torch's int8 GEMM as the int8 path ran before ours: quantize + pack per call, then the GEMM
  ours-int8      the int8 path now: the compiled int8 GEMM (csrc/gemm_int8.cpp) on the int8 weight as stored
                 (int8 mode), per-token 7-bit (AVX2) / 8-bit (VNNI) activations quantized inside
  ours-int16     the default mode's path on AVX2 CPUs: the compiled int16 GEMM (csrc/gemm_int16.cpp) on the bf16
                 weight as stored, 12-bit weights (quantized tile by tile inside) and activations
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SHAPES = "2048x16384,16384x2048,2048x2048,1152x4304,4304x1152"


def run(rows: int, shapes: list[tuple[int, int]], repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from paligemma.cpu import describe, features, formats, kernels

    features.set_prefill_path("fp32")
    info = describe()
    print(f"cpu: {info['cpu']}; flags {' '.join(info['flags'])}; torch {info['torch_capability']}; "
          f"fp32 path engine {info['fp32_gemm_engine']}; int8 engine {info['int8_engine']}; "
          f"{torch.get_num_threads()} threads; {rows} rows; ours-int8: "
          + (f"{kernels.extension().gemm_int8_activation_levels()}-level activations" if kernels.extension()
             else f"unavailable ({kernels.unavailable_reason()})"), flush=True)
    g = torch.Generator().manual_seed(0)
    for K, N in shapes:
        x = torch.randn(rows, K, generator=g)
        w = torch.randn(N, K, generator=g) * 0.02
        wb = w.bfloat16()
        variants = {"mkl": lambda: F.linear(x, w),
                    "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                    "widen+mkl": lambda: F.linear(x, wb.float()),
                    "ours-fp32": lambda: formats._matmul(x, wb, None)}
        try:
            wm = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            variants["mkl-packed"] = lambda: torch.ops.mkl._mkl_linear(x, wm, w, None, rows)
        except (RuntimeError, AttributeError) as e:
            print(f"  mkl-packed unavailable: {e}")
        if features.int8_gemm_engine() is not None:
            packed = formats.pack_int8(wb, None)
            variants["int8-packed"] = lambda: formats.int8_gemm(x, packed)
            variants["int8-per-call"] = lambda: formats.int8_gemm(x, formats.pack_int8(wb, None))
        q, qs = formats.quantize_rows(wb)
        if kernels.gemm_int8(x, q, qs) is not None:
            variants["ours-int8"] = lambda: kernels.gemm_int8(x, q, qs)
        if kernels.gemm_int16(x, wb) is not None:
            variants["ours-int16"] = lambda: kernels.gemm_int16(x, wb)
        for f in variants.values():  # warm-up: primitive creation, first-touch pages
            f()
        samples = {name: [] for name in variants}
        for _ in range(repeats):  # interleaved: a slow minute of this shared machine hits every variant alike
            for name, f in variants.items():
                t = time.perf_counter()
                f()
                samples[name].append(time.perf_counter() - t)
        times = {name: statistics.median(ts) for name, ts in samples.items()}
        flop = 2 * rows * K * N
        print(f"{rows} x {K} x {N}: " + "; ".join(
            f"{name} {flop / t / 1e9:.0f} GFLOP/s ({t / times['mkl']:.2f}x)" for name, t in times.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", type=int, default=268, help="activation rows (268: one 224 px image + 12 tokens)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated KxN weight shapes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--emulate", choices=["avx2", "avx2-vnni"], help="run as on an AVX2-only CPU, or AVX2 with "
                    "AVX-VNNI (see the docstring)")
    ap.add_argument("--emulate-avx2", dest="emulate", action="store_const", const="avx2", help="= --emulate avx2")
    args = ap.parse_args()
    from paligemma.cpu import features

    if args.emulate == "avx2-vnni" and "avx_vnni" not in features._cpuinfo()[1]:
        ap.error("--emulate avx2-vnni needs a CPU with AVX-VNNI (flag avx_vnni); this one has none: use --emulate avx2")
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    except ValueError:
        ap.error(f"--shapes {args.shapes!r}: expected comma-separated KxN, e.g. 2048x16384")
    if any(len(s) != 2 or min(s) < 1 for s in shapes) or args.rows < 1 or args.repeats < 1:
        ap.error("--shapes need two positive sizes each; --rows and --repeats must be >= 1")
    emulation = features.EMULATE.get(args.emulate, {})
    if any(os.environ.get(k) != v for k, v in emulation.items()):  # re-run with every variable set before torch loads
        env = dict(os.environ, **emulation)
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)
    import torch

    torch.set_num_threads(args.threads)
    run(args.rows, shapes, args.repeats)


if __name__ == "__main__":
    main()
