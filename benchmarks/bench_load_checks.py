"""What the loader's non-finite check costs: load time with and without it, on the same checkpoint.

    python benchmarks/bench_load_checks.py --size small --ckpt /tmp/pg-small   # ~1 GB bf16, 3B widths, 2 layers
    python benchmarks/bench_load_checks.py --size full --ckpt /tmp/pg1-3b      # PaliGemma-3B-pt-224, random weights

The checkpoint is the one `bench_cpu.py` writes (written here if absent). Each mode loads `--repeats` times
after one warm-up load (page cache warm); the median is printed for `quantize=None` (fp32 plain modules)
and the default mode. "unchecked" replaces the per-block check with a pass-through, so the difference is
the check's whole cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_cpu import ensure_checkpoint  # noqa: E402
from paligemma import loading  # noqa: E402


def timed(path: Path, quantize, repeats: int) -> float:
    loading.load_model(path, quantize=quantize)  # warm the page cache (and the kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = loading.load_model(path, quantize=quantize)
        times.append(time.perf_counter() - t0)
        del model
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ensure_checkpoint(args.ckpt, args.size)
    checked = loading._finite
    for quantize in (None, "auto"):
        with_check = timed(args.ckpt, quantize, args.repeats)
        loading._finite = lambda key, file, blocks: blocks
        try:
            without = timed(args.ckpt, quantize, args.repeats)
        finally:
            loading._finite = checked
        print(f"quantize={quantize!s:5s} load {with_check:.3f} s checked, {without:.3f} s unchecked "
              f"({(with_check / without - 1) * 100:+.1f}%)", flush=True)


if __name__ == "__main__":
    main()
