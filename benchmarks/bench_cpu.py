"""CPU inference benchmark: this project's modes against transformers, side by side, one process each.

    python benchmarks/bench_cpu.py --size full --ckpt /tmp/pg1-3b      # PaliGemma-3B-pt-224, random weights
    python benchmarks/bench_cpu.py --size small --ckpt /tmp/pg-small   # same widths, fewer layers: minutes
    python benchmarks/bench_cpu.py --size tiny --ckpt /tmp/pg-tiny     # seconds (the smoke test)

1. Writes, once, a checkpoint with random weights in the hub layout (bf16, sparse PG1 config.json,
   3 shards + index for `full`) with `paligemma.testing`; an existing `--ckpt` is reused.
2. Measures the machine: read bandwidth (sum of a 1 GiB fp32 tensor) and fp32 GEMM GFLOP/s.
3. Runs every mode in a fresh subprocess, so peak RSS (VmHWM) is that mode's alone, with
   the same thread count: load-to-ready seconds, vision tower latency (one image, best of 2), time to
   first token (1 image + an 11-token prompt: <bos>, 10 tokens, "\\n") and greedy decode tokens/s
   (`--new-tokens`, EOS ignored) for the first call and warm (best of 2 more calls, which must give the
   same tokens), the same for a batch of 4 (for our modes, which have batch targets, once more warm).
   The checkpoint files are read once before each mode, so every load starts from a warm page cache.
4. Prints a table, the achieved fraction of the measured bandwidth (decode: weight bytes read per
   step) and GEMM throughput (prefill FLOPs / warm TTFT), the logits error and greedy agreement (16
   tokens) against ours-fp32, and the ratios the issue targets, each marked met or MISSED.

Modes: ours-default (`paligemma.load_model(path)` with no options: for this bf16 checkpoint on a CPU,
bf16 weights), ours-fp32 (plain modules: transformers' exact computation), ours-fp32k (fp32 weights + decode
kernel), ours-bf16x (bf16 weights, prefill GEMMs in fp32: exact products for a bf16 checkpoint), ours-bf16 (bf16
weights, the prefill path the CPU's features pick: bf16 with bf16 units, else fp32), ours-int8 (int8
weights, same rule), ours-bf16-a16 / ours-int8-a16 (the same with dtype=torch.bfloat16 activations),
hf-fp32, hf-bf16 (transformers, when installed). `--modes` picks a subset; the default leaves out ours-bf16
(= ours-default) and the -a16 modes.

    python benchmarks/bench_cpu.py --size full --ckpt DIR --resolutions 224,448,896 [--emulate avx2]

runs PaliGemma 2 3B layouts at 224 / 448 / 896 px (checkpoints DIR-224, DIR-448, DIR-896; batch 4 at
224 only), prints each resolution's table and targets and how the first token's time grows.
`--rounds N` runs the modes N times, interleaved (a, b, c, a, b, c), and keeps each time's best and each
memory figure's worst: on a VM whose speed drifts between processes (+-20% here) one round can decide a ratio.
`--emulate avx2` (or `--emulate-avx2`) sets, for every mode's process (ours and transformers), the variables
of `paligemma.cpu.features.EMULATE_AVX2` so that MKL, oneDNN, fbgemm, ATen and our kernels use AVX2 only;
`--emulate avx2-vnni` those of `EMULATE_AVX2_VNNI`, AVX2 with AVX-VNNI (Intel laptops and desktops since
Alder Lake), on a CPU that has AVX-VNNI.
Every run prints the CPU model, its flags and the prefill GEMM path each mode took.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_TOKEN, BOS, NEWLINE = 257152, 2, 108
ALL_MODES = ["ours-default", "ours-fp32", "ours-fp32k", "ours-bf16x", "ours-bf16", "ours-int8", "ours-bf16-a16",
             "ours-int8-a16", "hf-fp32", "hf-bf16"]
DEFAULT_MODES = ["ours-default", "ours-fp32", "ours-fp32k", "ours-bf16x", "ours-int8", "hf-fp32", "hf-bf16"]
# mode -> (quantize=, PALIGEMMA_PREFILL): "fp32" = prefill GEMMs in fp32, "auto" = the path the CPU's features pick
# (paligemma/cpu/features.py: bf16 with bf16 units, else fp32 on widened weights)
OURS = {"ours-default": ("auto", "auto"), "ours-fp32": (None, "auto"), "ours-fp32k": ("fp32", "auto"),
        "ours-bf16x": ("bf16", "fp32"), "ours-bf16": ("bf16", "auto"), "ours-int8": ("int8", "auto"),
        "ours-bf16-a16": ("bf16", "auto"), "ours-int8-a16": ("int8", "auto")}  # -a16: dtype=torch.bfloat16 activations
FORMAT_BYTES = {"plain": 4, "fp32": 4, "bf16": 2, "int8": 1, "hf-fp32": 4, "hf-bf16": 2}  # weight bytes read per element
AGREE_TOKENS = 16  # greedy tokens compared with ours-fp32


def pg1_config(size: str) -> dict:
    """Sparse config.json as Google published PaliGemma-3B-pt-224 (DESIGN.md, config); `small` keeps the widths
    and the 257216-row vocabulary and cuts the layers; `tiny` is the test-suite model."""
    if size == "tiny":
        from paligemma.testing import tiny_config

        return tiny_config("pg1")
    text_layers, vision_layers = {"full": (18, 27), "small": (2, 3)}[size]
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2048, "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN, "projection_dim": 2048, "vocab_size": 257216, "torch_dtype": "bfloat16",
        "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                        "num_attention_heads": 8, "num_key_value_heads": 1, "num_hidden_layers": text_layers,
                        "num_image_tokens": 256, "vocab_size": 257216},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_attention_heads": 16, "num_hidden_layers": vision_layers, "patch_size": 14,
                          "num_image_tokens": 256, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                          "vision_use_head": False},
    }


def pg2_config(size: str, resolution: int) -> dict:
    """Sparse config.json as Google published PaliGemma 2 3B-pt-448 / -896 (Gemma 2 2B decoder, SigLIP
    So400m at 448 / 896 px: 1024 / 4096 image tokens); `small` cuts the layers, `tiny` is the test model
    with the image size scaled by resolution / 224."""
    n_img = (resolution // 14) ** 2
    if size == "tiny":
        from paligemma.testing import tiny_config

        cfg = tiny_config("pg2")
        v = cfg["vision_config"]
        v["image_size"] = v["image_size"] * resolution // 224
        tokens = (v["image_size"] // v["patch_size"]) ** 2
        v["num_image_tokens"] = cfg["text_config"]["num_image_tokens"] = tokens
        return cfg
    text_layers, vision_layers = {"full": (26, 27), "small": (2, 3)}[size]
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma", "bos_token_id": 2,
        "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2048, "image_token_index": IMAGE_TOKEN,
        "projection_dim": 2304, "torch_dtype": "bfloat16",
        "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                        "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": text_layers,
                        "num_image_tokens": n_img, "num_key_value_heads": 4, "vocab_size": 257216},
        "vision_config": {"hidden_size": 1152, "image_size": resolution, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": vision_layers, "num_image_tokens": n_img, "num_positions": n_img,
                          "patch_size": 14, "projection_dim": 2304, "projector_hidden_act": "gelu_fast",
                          "vision_use_head": False},
    }


def layout(resolutions: list[int], resolution: int) -> str:
    """224 alone: PaliGemma-3B-pt-224 (the AMX table's model); with 448 / 896: PaliGemma 2 3B at each one."""
    return "pg1-224" if resolutions == [224] else f"pg2-{resolution}"


def ensure_checkpoint(ckpt: Path, size: str, which: str = "pg1-224") -> None:
    if (ckpt / "config.json").is_file():
        return
    from paligemma.testing import write_random_checkpoint

    t = time.time()
    family, resolution = which.split("-")
    config = pg1_config(size) if family == "pg1" else pg2_config(size, int(resolution))
    shard = {"full": 2 * 2**30, "small": 2**29, "tiny": 2**30}[size]  # full: 3 shards, as on the hub
    write_random_checkpoint(ckpt, config, seed=0, dtype=torch.bfloat16, max_shard_bytes=shard, tokenizer=False)
    print(f"wrote {size} checkpoint to {ckpt} in {time.time() - t:.0f} s", flush=True)


# ------------------------------------------------------------------------------------ model arithmetic
def model_numbers(cfg) -> dict:
    """Weight elements read per decode step and FLOPs of the prefill (1 image + `T` tokens)."""
    t, v = cfg.text, cfg.vision
    attn = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim \
        + t.num_attention_heads * t.head_dim * t.hidden_size
    layer = attn + 3 * t.hidden_size * t.intermediate_size
    head = t.vocab_size * t.hidden_size
    vis_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    n_img = cfg.num_image_tokens
    T = n_img + 12
    vis_flops = v.num_hidden_layers * (2 * vis_layer * n_img + 4 * n_img * n_img * v.hidden_size) \
        + 2 * n_img * v.hidden_size * cfg.projection_dim
    txt_flops = t.num_hidden_layers * (2 * layer * T + 4 * T * T * t.num_attention_heads * t.head_dim) + 2 * head
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim  # keys + values, elements
    return {"decode_elems": t.num_hidden_layers * layer + head, "prefill_flops": vis_flops + txt_flops,
            "vision_flops": vis_flops, "prompt_len": T, "kv_elems_per_token": kv_per_token}


def probe_machine(threads: int) -> dict:
    torch.set_num_threads(threads)
    import paligemma.cpu

    cpu = paligemma.cpu.describe()
    big = torch.ones(256 * 2**20)  # 1 GiB
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    a, b = torch.randn(512, 2048), torch.randn(8192, 2048)
    torch.nn.functional.linear(a, b)
    mm = min(_timed(lambda: torch.nn.functional.linear(a, b)) for _ in range(5))
    return {"read_GBps": big.nbytes / best / 1e9, "fp32_gemm_GFLOPs": 2 * 512 * 2048 * 8192 / mm / 1e9, "cpu": cpu}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------ one mode (child)
def inputs(cfg, batch: int):
    ids = [cfg.image_token_index] * cfg.num_image_tokens + [BOS] + [1000 + 37 * i for i in range(10)] + [NEWLINE]
    input_ids = torch.tensor([ids] * batch)
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    pixel_values = torch.rand(batch, 3, s, s, generator=g) * 2 - 1
    return input_ids, pixel_values


def run_mode(mode: str, ckpt: Path, threads: int, new_tokens: int, logits_file: Path | None = None,
             batches: tuple[int, ...] = (1, 4)) -> dict:
    torch.set_num_threads(threads)
    from paligemma.config import PaliGemmaConfig

    cfg = PaliGemmaConfig.from_file(ckpt)
    res = {"mode": mode}
    t0 = time.perf_counter()
    if mode.startswith("ours"):
        import paligemma

        act = torch.bfloat16 if mode.endswith("-a16") else torch.float32
        if mode == "ours-default":  # what `paligemma.load(path)` does with no options
            model = paligemma.load_model(ckpt)
        else:
            model = paligemma.load_model(ckpt, dtype=act, quantize=OURS[mode][0])
        from paligemma.cpu.formats import weight_format

        res["format"] = weight_format(model) or "plain"
        import paligemma.cpu

        # compiled once per machine and cached; loading the cached build is part of ready
        cpu = paligemma.cpu.describe() if res["format"] != "plain" else None
        path = None if cpu is None else cpu.get(f"prefill_path_{res['format']}_weights", "fp32")
        res["gemm_path"] = "plain (MKL fp32)" if cpu is None else \
            "fp32" if res["format"] == "fp32" else \
            f"{path} ({cpu.get(f'{path}_gemm', cpu['fp32_gemm_engine'] if path == 'fp32' else 'bf16')}" \
            f"; {cpu['prefill_path_source']})"
        vision = lambda px: model.get_image_features(px)  # noqa: E731
        last_logits = lambda ids, px: model(ids, px, num_logits_to_keep=1).logits[:, -1]  # noqa: E731

        def generate(ids, px, on_token, n=new_tokens):
            return model.generate(ids, px, max_new_tokens=n, eos_token_ids=(-1,), streamer=on_token)
    else:
        import transformers

        dtype = torch.float32 if mode == "hf-fp32" else torch.bfloat16
        res["format"] = mode
        res["gemm_path"] = f"transformers {'fp32' if dtype == torch.float32 else 'bf16'}"
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).eval()
        model.generation_config.eos_token_id = None
        vision = lambda px: model.get_image_features(pixel_values=px.to(dtype))  # noqa: E731
        last_logits = lambda ids, px: model(input_ids=ids, pixel_values=px.to(dtype),  # noqa: E731
                                            token_type_ids=torch.zeros_like(ids), logits_to_keep=1).logits[:, -1]

        class Streamer:  # transformers calls put() with the prompt first, then with each new token
            def __init__(self, on_token):
                self.on_token, self.prompt_seen = on_token, False

            def put(self, value):
                if self.prompt_seen:
                    self.on_token(value)
                self.prompt_seen = True

            def end(self):
                pass

        def generate(ids, px, on_token, n=new_tokens):
            return model.generate(input_ids=ids, pixel_values=px.to(dtype), attention_mask=torch.ones_like(ids),
                                  token_type_ids=torch.zeros_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  streamer=Streamer(on_token))
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_GB"] = _rss_gb()

    with torch.no_grad():
        ids1, px1 = inputs(cfg, 1)
        res["vision_s"] = min(_timed(lambda: vision(px1)) for _ in range(2))
        for batch in batches:
            ids, px = inputs(cfg, batch) if batch > 1 else (ids1, px1)
            key = "" if batch == 1 else "b4_"
            ttft, rate, out = _timed_generate(generate, ids, px)
            res[key + "ttft_s"], res[key + "decode_tok_s"] = ttft, batch * rate
            res[key + "new_tokens"] = out.shape[1] - (ids.shape[1] if mode.startswith("hf") else 0)
            first = _first_tokens(out, ids, mode)
            res[key + "first_tokens"] = first
            res[key + "peak_rss_GB"] = _rss_gb()  # peak so far: b4_peak_rss_GB is the whole run's
            if batch == 1:  # again, warm (best of 2): one-time costs (kernel generation, first-touch pages) aside
                warm = [_timed_generate(generate, ids, px) for _ in range(2)]
                res["ttft_warm_s"] = min(w[0] for w in warm)
                res["decode_warm_tok_s"] = max(w[1] for w in warm)
                res["warm_tokens_same"] = all(_first_tokens(w[2], ids, mode) == first for w in warm)
            elif mode.startswith("ours"):  # batch 4 again, warm: the batch-4 / single target compares warm rates
                _, rate, out = _timed_generate(generate, ids, px)
                res["b4_decode_warm_tok_s"] = batch * rate
                res["warm_tokens_same"] = res["warm_tokens_same"] and _first_tokens(out, ids, mode) == first
    if 4 not in batches:  # batch 4 not run (the long-prompt resolutions): its columns stay empty
        res.update({"b4_ttft_s": float("nan"), "b4_decode_tok_s": float("nan"), "b4_peak_rss_GB": res["peak_rss_GB"]})
    if logits_file is not None:  # for the accuracy columns: next-token logits after the prompt, [V]
        with torch.no_grad():
            torch.save(last_logits(ids1, px1)[0].float(), logits_file)
    return res


def _timed_generate(generate, ids, px) -> tuple[float, float, torch.Tensor]:
    """One greedy generate call: (seconds to the first token, decode steps per second after it, output)."""
    stamps = []
    t = time.perf_counter()
    out = generate(ids, px, lambda tok: stamps.append(time.perf_counter()))
    return stamps[0] - t, (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def _first_tokens(out: torch.Tensor, ids: torch.Tensor, mode: str) -> list[int]:
    new = out[:, ids.shape[1]:] if mode.startswith("hf") else out  # transformers returns the prompt too
    return new[0, :AGREE_TOKENS].tolist()


def _rss_gb() -> float:
    """Peak resident memory of this process so far, GB. VmHWM, not getrusage: Linux's ru_maxrss keeps the
    peak of the image this process was forked from (the driver), which would hide small modes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux, bytes on macOS


# ------------------------------------------------------------------------------------ driver
def warm_page_cache(ckpt: Path) -> None:
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def child(args, what: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--ckpt", str(args.ckpt), "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--size", args.size, "--logits-dir", str(args.logits_dir),
           "--batches", args.batches]
    env = dict(os.environ, PALIGEMMA_PREFILL=OURS.get(what, (None, "auto"))[1])
    if args.emulate:  # both sides: MKL, oneDNN, fbgemm, ATen's kernels and ours as on an AVX2(-VNNI) CPU
        from paligemma.cpu.features import EMULATE

        env.update(EMULATE[args.emulate])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"mode": what, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"mode": what, "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def add_accuracy(results: list[dict], logits_dir: Path) -> None:
    """Relative error max|l - l_ref| / max|l_ref| of each mode's next-token logits against ours-fp32, and
    whether the first AGREE_TOKENS greedy tokens agree."""
    base = next((r for r in results if r["mode"] == "ours-fp32" and "error" not in r), None)
    if base is None:  # no reference in this run: a logits file left by an earlier run (another CPU, other code) is not one
        return
    ref = torch.load(logits_dir / "ours-fp32.pt")
    for r in results:
        f = logits_dir / f"{r['mode']}.pt"
        if f.is_file() and "error" not in r:
            r["logits_rel_err"] = ((torch.load(f) - ref).abs().max() / ref.abs().max()).item()
            r["tokens_agree"] = r["first_tokens"] == base["first_tokens"]


def _b4_warm_over_1(r: dict) -> float:
    """Batch-4 decode tok/s over single-row, warm calls both (NaN where batch 4 did not run warm)."""
    return r.get("b4_decode_warm_tok_s", float("nan")) / r["decode_warm_tok_s"]


def report(machine: dict, results: list[dict], numbers: dict, fp32_bytes: float, resolution: int = 224) -> str:
    bw, gf = machine["read_GBps"], machine["fp32_gemm_GFLOPs"]
    rows = ["| mode | weights | prefill GEMM | load s | RSS GB loaded / peak 1 row / all | vision s | TTFT s (first / warm) | decode tok/s (first / warm) "
            "| b4 TTFT s | b4 decode tok/s (first / warm) | b4/1 (first / warm) | decode GB/s (of read bw) | prefill GFLOP/s (of fp32 GEMM) "
            f"| logits err vs ours-fp32 | {AGREE_TOKENS} tokens = ours-fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['mode']} | {r['error']} |" + " |" * 13)
            continue
        gbs = numbers["decode_elems"] * FORMAT_BYTES[r["format"]] * r.get("decode_warm_tok_s", r["decode_tok_s"]) / 1e9
        gfl = numbers["prefill_flops"] / r["ttft_warm_s"] / 1e9
        rows.append(
            f"| {r['mode']} | {r['format']} | {r.get('gemm_path', '')} | {r['load_s']:.1f} "
            f"| {r['rss_after_load_GB']:.2f} / {r['peak_rss_GB']:.2f} / {r['b4_peak_rss_GB']:.2f} "
            f"| {r['vision_s']:.2f} | {r['ttft_s']:.2f} / {r['ttft_warm_s']:.2f} "
            f"| {r['decode_tok_s']:.2f} / {r.get('decode_warm_tok_s', float('nan')):.2f} | {r['b4_ttft_s']:.2f} "
            f"| {r['b4_decode_tok_s']:.2f} / {r.get('b4_decode_warm_tok_s', float('nan')):.2f} "
            f"| {r['b4_decode_tok_s'] / r['decode_tok_s']:.2f} / {_b4_warm_over_1(r):.2f} | {gbs:.1f} ({gbs / bw:.0%}) "
            f"| {gfl:.0f} ({gfl / gf:.0%}) "
            + (f"| {r['logits_rel_err']:.1e} | {'yes' if r.get('tokens_agree') else 'no'} |" if "logits_rel_err" in r
               else "| - | - |"))  # no reference: ours-fp32 not among the modes
    by = {r["mode"]: r for r in results if "error" not in r}
    rounds = max([r.get("rounds", 1) for r in by.values()] or [1])
    cpu = machine.get("cpu", {})
    lines = ["", f"machine: read {bw:.1f} GB/s, fp32 GEMM {gf:.0f} GFLOP/s; fp32 weights {fp32_bytes / 1e9:.2f} GB",
             f"cpu: {cpu.get('cpu')}; flags {' '.join(cpu.get('flags', []))}; torch {cpu.get('torch_capability')}; "
             f"kernels for {cpu.get('isa')}; prefill path {cpu.get('prefill_path')} ({cpu.get('prefill_path_source')})"
             + (f"; emulating AVX2 ({' '.join(f'{k}={v}' for k, v in cpu['emulation_env'].items())})"
                if cpu.get("emulation_env") else ""),
             "TTFT and decode ratios use the warm figures (best of 2 generate calls after the first); the first call's "
             "follow them. batch-4 / single compares warm rates too (our modes run batch 4 twice)."
             + (f" Each figure: the best of {rounds} interleaved rounds (processes) per mode; memory: the worst."
                if rounds > 1 else ""),
             "", "targets (ratio measured in this run; target in brackets):"]

    def ratio(a, b, key):
        return by[a][key] / by[b][key] if a in by and b in by else None

    def rss(mode, weight_bytes):
        return by[mode]["b4_peak_rss_GB"] * 1e9 / weight_bytes if mode in by else None

    def value(mode, key):  # None (not measured) when the mode, or its reference (ours-fp32's logits), did not run
        return by[mode].get(key) if mode in by else None

    checks = [  # (what, value, target, first-request value)
        ("ours-fp32 decode / hf-fp32 decode", ratio("ours-fp32", "hf-fp32", "decode_warm_tok_s"), ">= 1.35",
         ratio("ours-fp32", "hf-fp32", "decode_tok_s")),
        ("ours-fp32k decode / hf-fp32 decode", ratio("ours-fp32k", "hf-fp32", "decode_warm_tok_s"), ">= 1.35",
         ratio("ours-fp32k", "hf-fp32", "decode_tok_s")),
        ("ours-fp32 TTFT / hf-fp32 TTFT", ratio("ours-fp32", "hf-fp32", "ttft_warm_s"), "<= 0.8",
         ratio("ours-fp32", "hf-fp32", "ttft_s")),
        ("ours-fp32 load / hf-fp32 load", ratio("ours-fp32", "hf-fp32", "load_s"), "<= 0.35"),
        ("ours-fp32 peak RSS / fp32 weight bytes", rss("ours-fp32", fp32_bytes), "<= 1.1"),
        ("ours-default decode / hf-bf16 decode", ratio("ours-default", "hf-bf16", "decode_warm_tok_s"), ">= 1.2",
         ratio("ours-default", "hf-bf16", "decode_tok_s")),
        ("ours-default TTFT / hf-fp32 TTFT", ratio("ours-default", "hf-fp32", "ttft_warm_s"), "<= 0.8",
         ratio("ours-default", "hf-fp32", "ttft_s")),
        ("ours-default peak RSS / bf16 weight bytes", rss("ours-default", fp32_bytes / 2), "<= 1.1"),
        ("ours-default logits error vs ours-fp32", value("ours-default", "logits_rel_err"), "<= 0.01"),
        ("ours-bf16x decode / hf-bf16 decode", ratio("ours-bf16x", "hf-bf16", "decode_warm_tok_s"), ">= 1.2",
         ratio("ours-bf16x", "hf-bf16", "decode_tok_s")),
        ("ours-bf16x TTFT / hf-fp32 TTFT", ratio("ours-bf16x", "hf-fp32", "ttft_warm_s"), "<= 0.8",
         ratio("ours-bf16x", "hf-fp32", "ttft_s")),
        ("ours-bf16 decode / hf-bf16 decode", ratio("ours-bf16", "hf-bf16", "decode_warm_tok_s"), ">= 1.2",
         ratio("ours-bf16", "hf-bf16", "decode_tok_s")),
        ("ours-bf16 TTFT / hf-fp32 TTFT", ratio("ours-bf16", "hf-fp32", "ttft_warm_s"), "<= 0.8",
         ratio("ours-bf16", "hf-fp32", "ttft_s")),
        ("ours-int8 decode / hf-bf16 decode", ratio("ours-int8", "hf-bf16", "decode_warm_tok_s"), ">= 1.6",
         ratio("ours-int8", "hf-bf16", "decode_tok_s")),
        ("ours-int8 decode tok/s", value("ours-int8", "decode_warm_tok_s"), ">= 5", value("ours-int8", "decode_tok_s")),
        ("ours-int8 TTFT / hf-fp32 TTFT", ratio("ours-int8", "hf-fp32", "ttft_warm_s"), "<= 0.5",
         ratio("ours-int8", "hf-fp32", "ttft_s")),
        ("ours-int8 peak RSS GB", value("ours-int8", "b4_peak_rss_GB"), "<= 4"),
    ]
    for m in ("ours-int8-a16", "ours-bf16-a16"):
        checks.append((f"{m} decode / hf-bf16 decode", ratio(m, "hf-bf16", "decode_warm_tok_s"), ">= 1.2",
                       ratio(m, "hf-bf16", "decode_tok_s")))
        checks.append((f"{m} TTFT / hf-fp32 TTFT", ratio(m, "hf-fp32", "ttft_warm_s"), "<= 0.8",
                       ratio(m, "hf-fp32", "ttft_s")))
    if resolution != 224:  # issue 14: the long prompts keep the 224 px bounds plus the activations' KV cache
        checks = [c for c in checks if "TTFT" in c[0] or "logits" in c[0]]
        kv = {m: numbers["kv_elems_per_token"] * (numbers["prompt_len"] + r.get("new_tokens", 0))
              * (2 if m.endswith("-a16") else 4) for m, r in by.items()}  # [bytes] each mode's single-row cache

        def rss_less_kv(mode, weight_bytes):  # (peak RSS - KV cache) / weight bytes, or GB without them
            if mode not in by:
                return None
            rest = by[mode]["peak_rss_GB"] * 1e9 - kv[mode]
            return rest / weight_bytes if weight_bytes else rest / 1e9

        checks += [
            ("ours-fp32 (peak RSS - KV cache) / fp32 weight bytes", rss_less_kv("ours-fp32", fp32_bytes), "<= 1.1"),
            ("ours-default (peak RSS - KV cache) / bf16 weight bytes", rss_less_kv("ours-default", fp32_bytes / 2),
             "<= 1.1"),
            ("ours-int8 peak RSS - KV cache, GB", rss_less_kv("ours-int8", None), "<= 4"),
        ]
        ours = [(m, r) for m, r in by.items() if m.startswith("ours") and "rss_after_load_GB" in r]
        if ours:
            lines.insert(-2, "activations of the prompt: KV cache " + ", ".join(
                f"{m} {kv[m] / 1e9:.2f} GB (peak - loaded {r['peak_rss_GB'] - r['rss_after_load_GB']:.2f} GB)"
                for m, r in ours))
    checks += [  # issue 14: the exact mode must not fall behind transformers fp32
        ("ours-fp32 TTFT / hf-fp32 TTFT (exact mode, not behind)", ratio("ours-fp32", "hf-fp32", "ttft_warm_s"),
         "<= 1.05"),
        ("ours-fp32 peak RSS / hf-fp32 peak RSS", ratio("ours-fp32", "hf-fp32", "b4_peak_rss_GB"), "<= 0.7"),
    ]
    if resolution == 224:
        checks += [("ours-fp32 decode / hf-fp32 decode (exact mode, not behind)",
                    ratio("ours-fp32", "hf-fp32", "decode_warm_tok_s"), ">= 0.952",
                    ratio("ours-fp32", "hf-fp32", "decode_tok_s")),
                   ("ours-fp32 load / hf-fp32 load (exact mode)", ratio("ours-fp32", "hf-fp32", "load_s"), "<= 0.5")]
    for m in OURS:
        if m in by and _b4_warm_over_1(by[m]) == _b4_warm_over_1(by[m]):  # not NaN: batch 4 was run
            checks.append((f"{m} batch-4 / single decode tok/s", _b4_warm_over_1(by[m]), ">= 3",
                           by[m]["b4_decode_tok_s"] / by[m]["decode_tok_s"]))
    differ = [m for m, r in by.items() if r.get("warm_tokens_same") is False]
    if differ:
        lines.append(f"- warm calls gave other tokens than the first call: {', '.join(differ)} (NOT deterministic)")
    for name, v, target, *first in checks:
        if v is None:
            continue
        op, bound = target.split()
        met = v >= float(bound) if op == ">=" else v <= float(bound)
        extra = f" (first {'call' if 'decode' in name else 'request'} {first[0]:.3g})" \
            if first and first[0] is not None else ""
        lines.append(f"- {name}: {v:.3g}{extra} [{target}] {'met' if met else 'MISSED'}")
    return "\n".join(rows + lines)


def growth_table(per_res: dict[int, list[dict]]) -> str:
    """Warm TTFT of each mode at each resolution, and its growth over the smallest one."""
    res = sorted(per_res)
    modes = [r["mode"] for r in per_res[res[0]]]
    ttft = {n: {r["mode"]: r.get("ttft_warm_s") for r in per_res[n] if "error" not in r} for n in res}
    rows = ["| mode | " + " | ".join(f"TTFT s {n} px" for n in res) + " | " +
            " | ".join(f"{n}/{res[0]}" for n in res[1:]) + " |", "|---" * (1 + 2 * len(res) - 1) + "|"]
    for m in modes:
        t = [ttft[n].get(m) for n in res]
        cells = [f"{v:.2f}" if v else "-" for v in t] + [f"{v / t[0]:.1f}x" if v and t[0] else "-" for v in t[1:]]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(["", "time to first token (warm) by resolution:", *rows])


FASTEST = ("load_s", "vision_s", "ttft_s", "ttft_warm_s", "b4_ttft_s")  # seconds: the best round's
RATES = ("decode_tok_s", "decode_warm_tok_s", "b4_decode_tok_s", "b4_decode_warm_tok_s")  # tokens/s: the best round's
MEMORY = ("rss_after_load_GB", "peak_rss_GB", "b4_peak_rss_GB")  # GB: the worst round's


def merge_rounds(rounds: list[dict]) -> dict:
    """One mode's results over `--rounds` processes: each time the best round's, each memory figure the worst
    round's; an error in any round is the mode's result; the rounds must give the same tokens."""
    bad = [r for r in rounds if "error" in r]
    if bad or len(rounds) == 1:
        return bad[0] if bad else rounds[0]
    out = dict(rounds[0], rounds=len(rounds))
    for keys, pick in ((FASTEST, min), (RATES, max), (MEMORY, max)):
        for k in keys:
            values = [r[k] for r in rounds if k in r and r[k] == r[k]]  # NaN: not measured (batch 4 at 448 px)
            if values:
                out[k] = pick(values)
    out["warm_tokens_same"] = all(r.get("warm_tokens_same", True) and r["first_tokens"] == rounds[0]["first_tokens"]
                                  for r in rounds)
    return out


def run_resolution(args, ckpt: Path, which: str, machine: dict, batches: str) -> list[dict]:
    if not (ckpt / "config.json").is_file():  # in a child, so that this driver stays small
        subprocess.run([sys.executable, __file__, "--child", "write", "--ckpt", str(ckpt), "--size", args.size,
                        "--layout", which], check=True)
    args = argparse.Namespace(**{**vars(args), "ckpt": ckpt, "batches": batches,
                                 "logits_dir": args.logits_dir or ckpt.with_name(ckpt.name + "-logits")})
    args.logits_dir.mkdir(parents=True, exist_ok=True)
    from paligemma.config import PaliGemmaConfig

    cfg = PaliGemmaConfig.from_file(ckpt)
    numbers = model_numbers(cfg)
    with torch.device("meta"):
        from paligemma.modeling_paligemma import PaliGemmaForConditionalGeneration

        n_params = sum(p.numel() for p in PaliGemmaForConditionalGeneration(cfg).parameters())
    print(f"\n== {which} ({args.size}): {n_params / 1e9:.3f} B parameters, {cfg.num_image_tokens} image tokens, "
          f"batches {batches}, {args.threads} threads, torch {torch.__version__}", flush=True)
    modes = [m for m in args.modes.split(",") if m]
    try:
        import transformers  # noqa: F401
    except ImportError:
        modes = [m for m in modes if not m.startswith("hf")]
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):  # interleaved: a, b, c, a, b, c (this machine's speed drifts between processes)
        for mode in modes:
            warm_page_cache(ckpt)
            r = child(args, mode, args.timeout)
            print(json.dumps(r), flush=True)
            rounds[mode].append(r)
    results = [merge_rounds(rounds[m]) for m in modes]
    add_accuracy(results, args.logits_dir)
    resolution = int(which.split("-")[1])
    print(f"\n### {which}\n")
    print(report(machine, results, numbers, 4 * n_params, resolution))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["full", "small", "tiny"], default="small")
    ap.add_argument("--ckpt", type=Path, required=True,
                    help="checkpoint directory (written once if absent); with several resolutions, DIR-448 etc.")
    ap.add_argument("--resolutions", default="224", help="comma-separated of 224,448,896 (448/896: PaliGemma 2 3B "
                    "layouts, and 224 too when several are given)")
    from paligemma.cpu import features

    emulate = features.EMULATE
    ap.add_argument("--emulate", choices=sorted(emulate), help="run every mode (ours and transformers) as on an "
                    "AVX2-only CPU (avx2: " + " ".join(f"{k}={v}" for k, v in emulate["avx2"].items()) + ") or one "
                    "with AVX-VNNI too (avx2-vnni: ONEDNN_MAX_CPU_ISA=AVX2_VNNI PALIGEMMA_CPU_ISA=avx2-vnni)")
    ap.add_argument("--emulate-avx2", dest="emulate", action="store_const", const="avx2", help="= --emulate avx2")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {ALL_MODES}")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, same for every mode")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mode")
    ap.add_argument("--rounds", type=int, default=1, help="run the modes this many times, interleaved, and keep "
                    "each time's best and each memory figure's worst (for machines whose speed drifts)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--logits-dir", type=Path, help="where modes leave their logits (default: next to --ckpt)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="pg1-224", help=argparse.SUPPRESS)
    ap.add_argument("--batches", default="1,4", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emulate == "avx2-vnni" and "avx_vnni" not in features._cpuinfo()[1]:
        ap.error("--emulate avx2-vnni needs a CPU with AVX-VNNI (flag avx_vnni); this one has none: use --emulate avx2")

    if args.child == "probe":
        print(json.dumps(probe_machine(args.threads)))
        return
    if args.child == "write":
        ensure_checkpoint(args.ckpt, args.size, args.layout)
        return
    if args.child:
        print(json.dumps(run_mode(args.child, args.ckpt, args.threads, args.new_tokens,
                                  args.logits_dir / f"{args.child}.pt",
                                  tuple(int(b) for b in args.batches.split(",")))))
        return

    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: run the modes at least once")
    resolutions = [int(r) for r in args.resolutions.split(",")]
    if any(r not in (224, 448, 896) for r in resolutions):
        ap.error(f"--resolutions {args.resolutions}: each must be 224, 448 or 896")
    args.batches = "1,4"
    machine = child(args, "probe", 300)
    print(f"machine: {machine}", flush=True)
    per_res = {}
    for n in resolutions:
        ckpt = args.ckpt if len(resolutions) == 1 else args.ckpt.with_name(f"{args.ckpt.name}-{n}")
        # batch 4 at 224 px only: at 448 / 896 the targets are the first token and memory
        per_res[n] = run_resolution(args, ckpt, layout(resolutions, n), machine, "1,4" if n == 224 else "1")
    if len(resolutions) > 1:
        print(growth_table(per_res))
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "threads": args.threads, "machine": machine,
                                         "emulate_avx2": args.emulate == "avx2", "emulate": args.emulate,
                                         "results": {str(n): r for n, r in per_res.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
