"""First token of one weight format under several prefill paths, side by side: an A/B of the GEMM a format's
prefill takes (`paligemma.cpu.features`), end to end, on a full checkpoint.

    python benchmarks/bench_paths.py --ckpt DIR --quantize int8 --paths bf16,int8 --rounds 2 [--threads 2]

Each (round, path) is a fresh process with PALIGEMMA_PREFILL=path (`auto`: the CPU's own choice), the paths
alternated within each round so that a drifting machine shifts both alike. A process loads the model, runs
one untimed generate call of one new token (kernels, first-touch pages), then times `--calls` more and keeps
the best. Prints each process's figures, each path's best, and the ratios to the first path, with the CPU,
and the greedy token of every process (they should agree; int8 activations can flip a near tie).
The prompt is bench_cpu's (1 image + 11 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(ckpt: str, quantize: str, threads: int, calls: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import bench_cpu
    import paligemma
    from paligemma.config import PaliGemmaConfig
    from paligemma.cpu import formats

    cfg = PaliGemmaConfig.from_file(ckpt)
    model = paligemma.load_model(ckpt, quantize=None if quantize == "none" else quantize)
    weights = next((m.weight.dtype for m in model.modules() if isinstance(m, formats.QuantLinear)), None)
    ids, px = bench_cpu.inputs(cfg, 1)
    times = []
    with torch.no_grad():
        for _ in range(calls + 1):
            t = time.perf_counter()
            out = model.generate(ids, px, max_new_tokens=1, eos_token_ids=(-1,))
            times.append(time.perf_counter() - t)
        path = formats.prefill_path(weights) if weights is not None else "plain"
    return {"path_taken": path, "first_s": times[0], "warm_s": min(times[1:]), "token": int(out[0, -1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (bench_cpu.py --ckpt writes one)")
    ap.add_argument("--quantize", default="int8", help="weight format: int8, bf16, fp32, auto or none (exact)")
    ap.add_argument("--paths", default="bf16,int8", help="comma-separated PALIGEMMA_PREFILL values (auto allowed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2, help="timed generate calls per process (best kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.ckpt, args.quantize, args.threads, args.calls)))
        return
    if not (Path(args.ckpt) / "config.json").is_file():
        sys.exit(f"bench_paths: no checkpoint at {args.ckpt}; write one with benchmarks/bench_cpu.py --ckpt {args.ckpt}")
    from paligemma.cpu import features

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    print(f"cpu: {features.cpu_model()}; flags {' '.join(features.describe()['flags'])}; {args.threads} threads; "
          f"weights {args.quantize}; paths {', '.join(paths)}", flush=True)
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for p in paths if r % 2 == 0 else paths[::-1]:  # alternate the order between rounds
            cmd = [sys.executable, __file__, "--child", "--ckpt", args.ckpt, "--quantize", args.quantize,
                   "--threads", str(args.threads), "--calls", str(args.calls)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PALIGEMMA_PREFILL=p))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"bench_paths: path {p} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            res = json.loads(lines[-1])
            print(f"round {r + 1} PALIGEMMA_PREFILL={p}: took {res['path_taken']}, first token {res['first_s']:.2f} s, "
                  f"warm {res['warm_s']:.2f} s, token {res['token']}", flush=True)
            b = best.setdefault(p, dict(res))
            b["first_s"], b["warm_s"] = min(b["first_s"], res["first_s"]), min(b["warm_s"], res["warm_s"])
    base = best[paths[0]]
    for p in paths:
        b = best[p]
        first, warm = b["first_s"] / max(base["first_s"], 1e-9), b["warm_s"] / max(base["warm_s"], 1e-9)
        print(f"{p:>6} ({b['path_taken']}): best first {b['first_s']:.2f} s ({first:.2f}x), "
              f"best warm {b['warm_s']:.2f} s ({warm:.2f}x {paths[0]})")


if __name__ == "__main__":
    main()
