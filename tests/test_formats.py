"""The fast CPU weight formats (cpu/formats.py) and the prefill GEMM paths (cpu/features.py) against the
plain fp32 model.

Each weight format is loaded from the same tiny checkpoints and compared with `quantize=None` in fp32:
full-forward logits (relative error bounded per format), and greedy tokens. "fp32" must reproduce
the plain model (only summation order differs), tokens included. bf16 GEMMs (used for prefill on CPUs
with bf16 units) round activations to bf16, and int8 weights carry up to half a step (absmax/254) of
rounding per weight; random tiny models have near ties a trained model rarely has, so one flipped
token would derail a free-running comparison. For those formats the token check is teacher-forced:
along the fp32 model's own 16 greedy tokens, the share of steps where the fast model picks the same
token is bounded below.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paligemma
import paligemma.cpu
from paligemma.cpu import features, kernels
from paligemma.cpu import formats as quantize
from paligemma.errors import CheckpointError, InputError
from paligemma.modeling_gemma import GemmaAttention
from paligemma.safetensors_stream import SafetensorsStream
from paligemma.testing import tiny_config, write_random_checkpoint

from .conftest import rel_diff

# logits error bounds, max |fast - fp32| / max |fp32| (measured ~1e-6, ~1.3e-2, ~3e-2 on these models)
TOL = {"fp32": 1e-5, "bf16": 3e-2, "int8": 6e-2,  # "int8": int8 weights, or int8 activations on the int8 path
       "int16": 1e-2}  # bf16 weights on the int16 path (12-bit weights and activations): the default mode's bound
# The int8 path without VNNI (AVX2-only CPUs) quantizes activations to 7 bits (`reduce_range`: AVX2's
# vpmaddubsw would saturate otherwise), half the resolution: measured 6.6e-2 / 9.3e-2 on the test models.
TOL_INT8_PATH = TOL["int8"] if features.has_vnni() else 2 * TOL["int8"]
AGREE = {"bf16": 0.9, "int8": 0.8, "int16": 0.9}  # teacher-forced greedy agreement over 2 x 16 steps (measured: see -s)


def _force_path(monkeypatch, path: str) -> None:
    if path == "int8" and features.int8_gemm_engine() is None:
        pytest.skip("this torch build has no quantized engine (onednn / fbgemm): no int8 prefill path")
    if path == "int16" and kernels.extension() is None:
        pytest.skip(f"CPU kernels not built ({kernels.unavailable_reason()}): no int16 prefill path")
    monkeypatch.setattr(features, "_override", path)


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    """bf16 on disk, as the hub's PaliGemma 2 weights: bf16 storage is then exact."""
    return {v: write_random_checkpoint(tmp_path_factory.mktemp(f"q{v}"), tiny_config(v), seed=5, dtype=torch.bfloat16,
                                       tokenizer=False) for v in ("pg1", "pg2")}


def _inputs(cfg, batch=2):
    ids = [cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 50, 60, 108]
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    return torch.tensor([ids] * batch), torch.rand(batch, 3, s, s, generator=g) * 2 - 1


@pytest.mark.parametrize("variant", ["pg1", "pg2"])
@pytest.mark.parametrize("fmt, path", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("bf16", "int8"),
                                       ("bf16", "int16"), ("int8", "fp32"), ("int8", "bf16"), ("int8", "int8"),
                                       ("int8", "int16")])
def test_fast_path_matches_fp32(bf16_dirs, variant, fmt, path, monkeypatch):
    """path "fp32": many-row products widen the weights to fp32, so bf16 storage of a bf16 checkpoint is exact.
    "bf16": bf16 GEMMs (CPUs with bf16 units). "int8": int8 x int8 GEMMs with per-token activation scales
    (int8 weights on AVX2 CPUs without bf16 units). "int16": 12-bit weights and activations (bf16 weights on
    AVX2 CPUs without AVX-512; int8 weights keep their levels)."""
    _force_path(monkeypatch, path)
    exact = fmt == "fp32" or (fmt == "bf16" and path == "fp32")
    fmt_key = "fp32" if exact else "int8" if path == "int8" else "int16" if fmt == "bf16" and path == "int16" else fmt
    ref = paligemma.load_model(bf16_dirs[variant], quantize=None)
    fast = paligemma.load_model(bf16_dirs[variant], quantize=fmt)
    ids, pix = _inputs(ref.config)
    with torch.no_grad():
        lr, lf = ref(ids, pix).logits, fast(ids, pix).logits
    err = rel_diff(lf, lr)
    print(f"{variant} {fmt} prefill path {path}: logits relative error {err:.2e}")
    assert err < (TOL_INT8_PATH if path == "int8" else TOL[fmt_key])
    gen = ref.generate(ids, pix, max_new_tokens=16, eos_token_ids=(-1,))  # [B, 16]
    if exact:
        assert torch.equal(fast.generate(ids, pix, max_new_tokens=16, eos_token_ids=(-1,)), gen)
        return
    full = torch.cat([ids, gen], dim=1)
    tt = torch.cat([torch.zeros_like(ids), torch.ones_like(gen)], dim=1)
    with torch.no_grad():
        lr, lf = ref(full, pix, token_type_ids=tt).logits[:, ids.shape[1] - 1:-1], \
            fast(full, pix, token_type_ids=tt).logits[:, ids.shape[1] - 1:-1]  # [B, 16, V]
    agree = (lr.argmax(-1) == lf.argmax(-1)).float().mean().item()
    print(f"{variant} {fmt} {path}: teacher-forced greedy agreement {agree:.2f}")
    assert agree >= AGREE[fmt_key]
    assert torch.equal(lr.argmax(-1), gen)  # teacher forcing reproduces the cached greedy run


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_bf16_activations_with_fast_weights(bf16_dirs, fmt, monkeypatch):
    """dtype=torch.bfloat16 + quantize: bf16 activations end to end (as transformers in bf16)."""
    _force_path(monkeypatch, "bf16")
    ref = paligemma.load_model(bf16_dirs["pg2"], quantize=None)
    fast = paligemma.load_model(bf16_dirs["pg2"], dtype=torch.bfloat16, quantize=fmt)
    assert fast.dtype == torch.bfloat16
    ids, pix = _inputs(ref.config)
    with torch.no_grad():
        err = rel_diff(fast(ids, pix).logits, ref(ids, pix).logits)
    print(f"bf16 activations, {fmt} weights: logits relative error {err:.2e}")
    assert err < 2 * TOL[fmt]
    gen = fast.generate(ids, pix, max_new_tokens=8, eos_token_ids=(-1,))
    assert gen.shape == (2, 8)


def test_fast_path_batch_decode_equals_single_rows(bf16_dirs):
    model = paligemma.load_model(bf16_dirs["pg2"], quantize="int8")
    ids, pix = _inputs(model.config, batch=3)
    pix[1] = -pix[1]
    both = model.generate(ids, pix, max_new_tokens=8, eos_token_ids=(-1,))
    for i in range(3):
        one = model.generate(ids[i:i + 1], pix[i:i + 1], max_new_tokens=8, eos_token_ids=(-1,))
        assert torch.equal(one[0], both[i])


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_mlp_row_chunks_give_the_unchunked_result(bf16_dirs, fmt, monkeypatch):
    """Fast-path models run prefill MLPs in row chunks (peak memory); a chunk boundary inside a prompt and a
    ragged last chunk must not change the result, and plain modules never chunk (bit parity). Products in
    fp32 throughout: a chunk of <= kernels.MAX_ROWS rows takes the fp32 decode kernel, not the bf16 GEMM."""
    from paligemma.modeling_gemma import GemmaMLP

    _force_path(monkeypatch, "fp32")
    plain = paligemma.load_model(bf16_dirs["pg1"], quantize=None)
    assert not any(isinstance(m, quantize.RowChunkedMLP) for m in plain.modules())
    model = paligemma.load_model(bf16_dirs["pg2"], quantize=fmt)
    mlps = [m for m in model.modules() if isinstance(m, GemmaMLP)]
    assert mlps and all(type(m) is quantize.RowChunkedMLP for m in mlps)
    ids, pix = _inputs(model.config, batch=3)  # 3 x T rows: not a multiple of 5
    with torch.no_grad():
        whole = model(ids, pix).logits
        monkeypatch.setattr(quantize, "MLP_ROW_CHUNK", 5)
        monkeypatch.setattr(quantize, "MLP_ROW_CHUNK_FP32_PATH", 5)
        chunked = model(ids, pix).logits
    assert ids.numel() > 5 and ids.numel() % 5
    assert rel_diff(chunked, whole) < 1e-5


def test_quantized_weights_are_small_and_the_head_is_shared(bf16_dirs):
    model = paligemma.load_model(bf16_dirs["pg1"], quantize="int8")
    emb = model.language_model.embed_tokens
    assert isinstance(emb, quantize.QuantEmbedding) and emb.weight.dtype == torch.int8
    assert model.lm_head is None and model.dtype == torch.float32
    linears = [m for m in model.modules() if isinstance(m, quantize.QuantLinear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    kv = model.make_caches(1, 4)[0].k
    assert kv.dtype == torch.float32


def test_auto_is_bf16_storage_for_bf16_checkpoints_on_cpu(bf16_dirs, pg1_dir, monkeypatch):
    """The default CPU mode: a bf16 checkpoint in fp32 compute keeps bf16 weights (lossless); an fp32
    checkpoint, bf16 compute, or no kernels give plain modules."""
    def formats(model):
        return {m.fmt for m in model.modules() if isinstance(m, quantize.QuantLinear)} or {None}

    expected = "bf16" if kernels.extension() is not None else None
    assert formats(paligemma.load_model(bf16_dirs["pg2"])) == {expected}
    assert formats(paligemma.load_model(bf16_dirs["pg2"], quantize="auto")) == {expected}
    assert formats(paligemma.load_model(pg1_dir)) == {None}  # stored in fp32
    assert formats(paligemma.load_model(bf16_dirs["pg2"], dtype=torch.bfloat16)) == {None}
    assert formats(paligemma.load_model(bf16_dirs["pg2"], quantize=None)) == {None}
    monkeypatch.setattr(kernels, "extension", lambda: None)
    assert formats(paligemma.load_model(bf16_dirs["pg2"])) == {None}


def test_bad_format_is_refused(bf16_dirs):
    with pytest.raises(InputError, match="int8"):
        paligemma.load_model(bf16_dirs["pg1"], quantize="int4")


def test_stored_lm_head_is_checked_in_the_quantized_format(bf16_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = Path(shutil.copytree(bf16_dirs["pg1"], tmp_path / "head"))
    sd = load_file(d / "model.safetensors")
    sd["language_model.lm_head.weight"] = sd["language_model.model.embed_tokens.weight"].clone()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    paligemma.load_model(d, quantize="int8")
    sd["language_model.lm_head.weight"][0, 0] += 1.0
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="differs"):
        paligemma.load_model(d, quantize="int8")


def test_benchmark_tiny_runs(tmp_path):
    """The benchmark script cannot rot: its tiny size runs end to end (our modes only, 4 tokens, 2 interleaved
    rounds)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
    out = subprocess.run([sys.executable, str(script), "--size", "tiny", "--ckpt", str(tmp_path / "ck"),
                          "--threads", "1", "--new-tokens", "4", "--modes", "ours-default,ours-fp32,ours-int8",
                          "--rounds", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"error"' not in out.stdout  # no mode failed
    assert "| ours-int8 | int8 |" in out.stdout and "| ours-fp32 | plain |" in out.stdout
    default_format = "bf16" if kernels.extension() is not None else "plain"  # the tiny checkpoint is bf16
    assert f"| ours-default | {default_format} |" in out.stdout
    b4 = next(line for line in out.stdout.splitlines() if line.startswith("- ours-int8 batch-4 / single decode tok/s:"))
    assert "(first call " in b4  # the target line, met or MISSED: warm rates, then the first calls'''
    assert "| b4/1 (first / warm) |" in out.stdout
    assert "- ours-int8 decode tok/s: " in out.stdout and "(first call " in out.stdout  # warm, then the first call
    assert "NOT deterministic" not in out.stdout  # the warm calls gave the first call's tokens
    assert out.stdout.count('"mode": "ours-int8"') == 2 and "best of 2 interleaved rounds" in out.stdout
    assert "| prefill GEMM |" in out.stdout and "\ncpu: " in out.stdout  # the path each mode took, the CPU



def test_benchmark_rounds_keep_each_figures_best_and_memorys_worst():
    """bench_cpu.py --rounds: per mode, the fastest time and highest rate of any round, the largest memory, an
    error in any round as the result, and rounds that disagree on the tokens flagged."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = {"mode": "m", "ttft_warm_s": 5.0, "decode_warm_tok_s": 4.0, "b4_decode_tok_s": float("nan"),
         "peak_rss_GB": 6.5, "first_tokens": [1, 2], "warm_tokens_same": True}
    b = dict(a, ttft_warm_s=4.0, decode_warm_tok_s=3.0, peak_rss_GB=6.1, b4_decode_warm_tok_s=11.0)
    m = bench.merge_rounds([a, b])
    assert (m["ttft_warm_s"], m["decode_warm_tok_s"], m["peak_rss_GB"], m["rounds"]) == (4.0, 4.0, 6.5, 2)
    assert m["b4_decode_warm_tok_s"] == 11.0 and bench._b4_warm_over_1(m) == 11.0 / 4.0  # the merged rates
    assert m["b4_decode_tok_s"] != m["b4_decode_tok_s"] and m["warm_tokens_same"]  # NaN: not measured, kept
    assert bench.merge_rounds([a, dict(b, first_tokens=[1, 3])])["warm_tokens_same"] is False
    assert bench.merge_rounds([a, {"mode": "m", "error": "timed out"}]) == {"mode": "m", "error": "timed out"}
    assert bench.merge_rounds([a]) is a


def test_benchmark_accuracy_needs_the_reference_of_the_same_run(tmp_path):
    """bench_cpu.py's accuracy columns compare with ours-fp32 of the same run: a logits file that an earlier run
    left (another CPU, other code) is not used when ours-fp32 is not among this run's modes, or failed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.save(torch.tensor([1.0, 2.0, 4.0]), tmp_path / "ours-fp32.pt")  # left by an earlier run
    torch.save(torch.tensor([1.0, 2.0, 4.5]), tmp_path / "ours-int8.pt")
    int8 = {"mode": "ours-int8", "first_tokens": [5, 6]}
    bench.add_accuracy([int8], tmp_path)
    assert "logits_rel_err" not in int8 and "tokens_agree" not in int8
    bench.add_accuracy([int8, {"mode": "ours-fp32", "error": "timed out"}], tmp_path)
    assert "logits_rel_err" not in int8
    fp32 = {"mode": "ours-fp32", "first_tokens": [5, 7]}
    bench.add_accuracy([int8, fp32], tmp_path)
    assert int8["logits_rel_err"] == 0.5 / 4.0 and int8["tokens_agree"] is False
    assert fp32["logits_rel_err"] == 0.0 and fp32["tokens_agree"] is True


def test_paths_benchmark_tiny_runs(tmp_path, monkeypatch):
    """bench_paths.py cannot rot: a tiny int8 model under two forced prefill paths, one round, prints each path
    taken and the ratios; a missing checkpoint is a one-line error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.ensure_checkpoint(tmp_path / "ck", "tiny")
    monkeypatch.delenv("PALIGEMMA_PREFILL", raising=False)
    monkeypatch.setattr(features, "_override", None)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_paths.py"
    out = subprocess.run([sys.executable, str(script), "--ckpt", str(tmp_path / "ck"), "--quantize", "int8",
                          "--paths", "fp32,auto", "--rounds", "1", "--calls", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "round 1 PALIGEMMA_PREFILL=fp32: took fp32," in out.stdout
    with torch.no_grad():
        auto = quantize.prefill_path(torch.int8)  # this CPU's own choice for int8 weights (no override here)
    assert f"round 1 PALIGEMMA_PREFILL=auto: took {auto}," in out.stdout
    assert "(1.00x)" in out.stdout and "x fp32)" in out.stdout and "\ncpu: " in "\n" + out.stdout
    missing = subprocess.run([sys.executable, str(script), "--ckpt", str(tmp_path / "none")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr and "Traceback" not in missing.stderr


def test_gemm_benchmark_tiny_runs():
    """bench_gemm.py cannot rot: one small shape runs every variant and prints its ratio to MKL; bad shapes
    are refused with a usage error."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gemm.py"
    out = subprocess.run([sys.executable, str(script), "--threads", "1", "--rows", "20", "--shapes", "64x96",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("20 x 64 x 96:"))
    assert "mkl " in line and "(1.00x)" in line and "ours-fp32 " in line
    assert f"fp32 path engine {features.fp32_gemm_engine()}" in out.stdout
    bad = subprocess.run([sys.executable, str(script), "--shapes", "64by96"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--shapes" in bad.stderr and "Traceback" not in bad.stderr

SHIPPED = Path(paligemma.__file__).parent / "assets" / "shapes-tiny"


@pytest.fixture(scope="module")
def shipped_figures():
    from paligemma.shapes.evaluate import evaluate

    figures = {}
    for fmt, path in ((None, None), ("int8", None), ("bf16", None), ("bf16", "int8"), ("bf16", "int16")):
        # path None: as chosen here
        if (path == "int8" and features.int8_gemm_engine() is None) or (path == "int16" and kernels.extension() is None):
            continue
        previous = features._override
        features.set_prefill_path(path)
        try:
            model, proc = paligemma.load(SHIPPED, quantize=fmt)
            figures[fmt, path] = evaluate(model, proc, n=30, split="test")
        finally:
            features._override = previous
    return figures


@pytest.mark.parametrize("fmt, path", [("int8", None), ("bf16", None), ("bf16", "int8"), ("bf16", "int16")])
def test_fast_formats_keep_the_shipped_models_task_figures(shipped_figures, fmt, path):
    """The issue's accuracy check on a trained model: task figures within 1 point of fp32 (here on 30 scenes:
    at most one scene's worth; measured on 500 with `eval_shapes --quantize`: equal to 4 digits), with the
    prefill path this CPU takes, and the default mode (bf16 weights) with the int8 and int16 paths forced
    (PALIGEMMA_PREFILL=int8 / int16; int16 is the default mode's own on AVX2 CPUs)."""
    if (fmt, path) not in shipped_figures:
        pytest.skip("no quantized engine (onednn / fbgemm) for the int8 path, or no kernels for the int16 path")
    ref, fast = shipped_figures[None, None], shipped_figures[fmt, path]
    for key in ("caption_exact", "count_acc", "detect_count_acc"):
        assert abs(fast[key] - ref[key]) <= 1 / 30 + 1e-9, (key, ref, fast)
    assert abs(fast["detect_miou"] - ref["detect_miou"]) <= 0.01, (ref, fast)


@pytest.mark.parametrize("path", ["bf16", "int16", "int8"])
def test_default_cpu_mode_gives_the_exact_modes_greedy_tokens(tmp_path, path, monkeypatch):
    """The default CPU mode (quantize="auto") on a bf16 checkpoint of a trained model: the same greedy tokens
    as plain modules computing in fp32 on the same weights, over several scenes and tasks, with the prefill
    path of CPUs with bf16 units ("bf16"), that of AVX2 CPUs ("int16") and the int8 path on request ("int8")."""
    _force_path(monkeypatch, path)
    from paligemma.shapes import synthetic
    from paligemma.loading import save_pretrained

    model, proc = paligemma.load(SHIPPED, quantize=None)
    save_pretrained(model.to(torch.bfloat16), proc, tmp_path)
    default, proc = paligemma.load(tmp_path)
    exact, _ = paligemma.load(tmp_path, quantize=None)
    assert default.dtype == exact.dtype == torch.float32
    if kernels.extension() is not None:
        assert isinstance(default.language_model.layers[0].mlp.up_proj, quantize.QuantLinear)
    scenes = [synthetic.make_scene(s) for s in synthetic.split_seeds("test", 12)]
    prompts = [synthetic.CAPTION_PROMPT, synthetic.COUNT_PROMPT, "detect circle"] * 4
    batch = proc(text=prompts, images=[s.image for s in scenes])
    with torch.no_grad():
        a = default.generate(**batch, max_new_tokens=12)
        b = exact.generate(**batch, max_new_tokens=12)
        la, lb = default(**batch).logits, exact(**batch).logits
    assert torch.equal(a, b)
    print(f"default mode, {path} prefill: next-token logits error {rel_diff(la[:, -1], lb[:, -1]):.1e}, "
          f"all positions {rel_diff(la, lb):.1e}")
    keep = batch["attention_mask"].bool()  # [B, T]: the positions that are read (see the int8 case)
    print(f"positions read: {rel_diff(la[keep], lb[keep]):.1e}")
    if path == "int16":  # 12-bit products (within INT16_TOLERANCE each), the head's GEMM too; measured 1.1e-3
        # next-token, 2.4e-3 at the positions read (the bf16 path: 3.9e-3 / 8.8e-3), AVX-512 and AVX2 builds alike
        assert rel_diff(la[:, -1], lb[:, -1]) < 1e-2
        assert rel_diff(la[keep], lb[keep]) < 1e-2
    elif path == "bf16":
        # next-token logits (what generation uses; measured 3.6e-3, transformers in bf16: 6.4e-3) within the
        # issue's 1e-2; logits at every position come from a bf16 GEMM head (bf16-rounded outputs: measured 1.8e-2)
        assert rel_diff(la[:, -1], lb[:, -1]) < 1e-2
        assert rel_diff(la, lb) < 3e-2
    else:  # int8 weights and activations in every prefill product: int8-level error (see TOL), at the positions
        # that are read (a left-padded row's pad positions attend to nothing real: their logits are noise that
        # int8 moves by up to 0.44 of the max on AVX2, and no generation reads them)
        assert rel_diff(la[keep], lb[keep]) < TOL_INT8_PATH


def test_int8_model_saves_and_reloads_as_is(bf16_dirs, tmp_path):
    """A quantize="int8" model is saved in int8 (half of bf16 on disk) and loads back bit for bit without
    requantizing; asking for another format, or a stray int8 tensor in a float checkpoint, is an error."""
    model = paligemma.load_model(bf16_dirs["pg2"], quantize="int8")
    paligemma.save_pretrained(model, None, tmp_path / "q")
    again = paligemma.load_model(tmp_path / "q")  # the default reads the int8 format as saved
    theirs = again.state_dict()
    assert model.state_dict().keys() == theirs.keys()
    assert all(torch.equal(t, theirs[k]) and t.dtype == theirs[k].dtype for k, t in model.state_dict().items())
    ids, pix = _inputs(model.config, batch=1)
    assert torch.equal(model.generate(ids, pix, max_new_tokens=6), again.generate(ids, pix, max_new_tokens=6))
    with SafetensorsStream(tmp_path / "q" / "model.safetensors") as f:  # stored as held: 1 byte per weight
        assert f.dtype("language_model.model.layers.0.mlp.up_proj.weight") == torch.int8
        assert f.dtype("language_model.model.layers.0.mlp.up_proj.weight_scale") == torch.float32
    for fmt in (None, "bf16"):
        with pytest.raises(CheckpointError, match="saved with int8 weights"):
            paligemma.load_model(tmp_path / "q", quantize=fmt)
    # the int8 tensors without the config that says what they are: refused, not read as numbers
    cfg = (tmp_path / "q" / "config.json")
    cfg.write_text(cfg.read_text().replace('"quantization_config"', '"unused_quantization_config"'))
    with pytest.raises(CheckpointError, match="stored as torch.int8"):
        paligemma.load_model(tmp_path / "q")


def test_foreign_quantization_config_is_refused(bf16_dirs, tmp_path):
    import json
    import shutil

    d = tmp_path / "bnb"
    shutil.copytree(bf16_dirs["pg1"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'bitsandbytes', which this library does not read"):
        paligemma.load_model(d)
def test_stream_reader_reads_blocks_and_refuses_truncation(bf16_dirs, tmp_path):
    from safetensors.torch import load_file

    f = bf16_dirs["pg1"] / "model.safetensors"
    ref = load_file(f)
    with SafetensorsStream(f) as s:
        assert set(s.entries) == set(ref)
        for key, t in ref.items():
            assert s.dtype(key) == t.dtype and s.shape(key) == tuple(t.shape)
            assert torch.equal(s.read(key), t)
            assert torch.equal(s.read_as(key, torch.float32), t.float())
            if t.dim() == 2:
                three_rows = t.shape[1] * t.element_size() * 3
                assert [r0 for r0, _ in s.blocks(key, three_rows)] == list(range(0, t.shape[0], 3))
                assert torch.equal(torch.cat([b.clone() for _, b in s.blocks(key, three_rows)]), t)  # used in turn
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="past the end"):
        SafetensorsStream(cut)




# ---- the int8 prefill path and the choice of path -------------------------------------------------------
@pytest.mark.parametrize("engine", ["own", "torch"])
def test_int8_gemm_is_within_its_stated_tolerance(engine):
    """One int8 x int8 product (int8 weights as stored, and bf16 weights quantized at call time) against fp32 on
    the same weights, max error relative to max |result| <= INT8_TOLERANCE, with the compiled kernel ("own")
    and with torch's quantized engines (its fallback). A token 100x louder than the others must not cost them
    their precision (per-token activation scales)."""
    if engine == "own" and kernels.extension() is None:
        pytest.skip(f"CPU kernels not built: {kernels.unavailable_reason()}")
    if engine == "torch" and features.int8_gemm_engine() is None:
        pytest.skip("this torch build has no quantized engine (onednn / fbgemm)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 256, generator=g)
    x[7] *= 100.0
    w = (torch.randn(96, 256, generator=g) * 0.05).to(torch.bfloat16)
    q, s = quantize.quantize_rows_torch(w)
    for weight, scale, ref_w in ((q, s, q.float() * s[:, None]), (w, None, w.float())):
        if engine == "own":
            y = quantize.own_int8_gemm(x, weight, scale)
        else:
            y = quantize.int8_gemm(x, quantize.pack_int8(weight, scale))
        ref = x @ ref_w.T
        quiet = torch.arange(40) != 7
        err = ((y - ref).abs().amax(1) / ref.abs().amax(1))  # per token
        print(f"int8 path, {engine} ({weight.dtype} weights): max per-token error {err.max():.2e}")
        assert err.max() <= quantize.INT8_TOLERANCE
        assert err[quiet].max() <= quantize.INT8_TOLERANCE  # also relative to each quiet token's own scale
        assert (y - ref).abs().max() / ref.abs().max() <= quantize.INT8_TOLERANCE


def test_int16_gemm_is_within_its_stated_tolerance():
    """One int16-path product (bf16 weights, 12-bit levels on both sides) against fp32 on the same weights: max
    error relative to max |result| <= INT16_TOLERANCE, also per token for quiet tokens next to one 100x louder
    (per-token steps); int8 weights on this path are exact up to the activations' 12 bits."""
    if kernels.extension() is None:
        pytest.skip(f"CPU kernels not built: {kernels.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 256, generator=g)
    x[7] *= 100.0
    w = (torch.randn(96, 256, generator=g) * 0.05).to(torch.bfloat16)
    q, s = quantize.quantize_rows_torch(w)
    for weight, scale, ref_w in ((w, None, w.float()), (q, s, q.float() * s[:, None])):
        y = quantize.own_int16_gemm(x, weight, scale)
        ref = x @ ref_w.T
        err = ((y - ref).abs().amax(1) / ref.abs().amax(1))  # per token
        print(f"int16 path ({weight.dtype} weights): max per-token error {err.max():.2e}")
        assert err.max() <= quantize.INT16_TOLERANCE
        assert (y - ref).abs().max() / ref.abs().max() <= quantize.INT16_TOLERANCE


@pytest.mark.parametrize("built", [True, False])
def test_int8_path_converts_each_mlp_weight_at_most_once_per_call(bf16_dirs, monkeypatch, built):
    """With the compiled int8 GEMM, which reads int8 weights where they lie, nothing is packed; with torch's
    engines instead, row chunks of one MLP share one packed copy of each weight (conversion per layer, not per
    chunk), and no packed copy outlives the call."""
    _force_path(monkeypatch, "int8")
    if built and kernels.extension() is None:
        pytest.skip(f"CPU kernels not built: {kernels.unavailable_reason()}")
    model = paligemma.load_model(bf16_dirs["pg2"], quantize="int8")
    if not built:
        monkeypatch.setattr(kernels, "extension", lambda: None)
    calls = []
    real = quantize.pack_int8
    monkeypatch.setattr(quantize, "pack_int8", lambda w, s: calls.append(w.shape) or real(w, s))
    monkeypatch.setattr(quantize, "MLP_ROW_CHUNK", 9)
    monkeypatch.setattr(quantize, "MLP_ROW_CHUNK_FP32_PATH", 9)
    mlp = model.language_model.layers[0].mlp
    assert isinstance(mlp, quantize.RowChunkedMLP)
    x = torch.randn(3, 20, model.config.text.hidden_size)  # 60 rows: 7 chunks of 9
    with torch.no_grad():
        y = mlp(x)
    expected = [] if built else [mlp.gate_proj.weight.shape, mlp.up_proj.weight.shape, mlp.down_proj.weight.shape]
    assert sorted(calls) == sorted(expected)
    monkeypatch.setattr(quantize, "MLP_ROW_CHUNK", 128)  # unchunked: per-token scales, so rows barely change
    monkeypatch.setattr(quantize, "MLP_ROW_CHUNK_FP32_PATH", 128)
    with torch.no_grad():
        assert rel_diff(mlp(x), y) < quantize.INT8_TOLERANCE
    assert all(m.packed is None for m in model.modules() if isinstance(m, quantize.QuantLinear))


def test_int8_weights_take_the_int8_gemm_where_fp32_would_be_chosen(monkeypatch):
    """Without bf16 units, inference over int8 weights takes the compiled int8 GEMM (when built), bf16 weights
    the int16 GEMM where the CPU has AVX2 and no AVX-512 (else exact fp32 GEMMs); training stays on fp32 GEMMs;
    a forced path applies to all (a forced int16 without the kernels is fp32). With bf16 units, int8 weights take
    the int8 GEMM only with AVX512-VNNI and no AMX."""
    monkeypatch.delenv("PALIGEMMA_PREFILL", raising=False)
    monkeypatch.setattr(features, "_override", None)
    monkeypatch.setattr(features, "has_bf16_units", lambda flags=None: False)
    built, real_extension = kernels.extension() is not None, kernels.extension
    for avx512, bf16_path in ((False, "int16" if built else "fp32"), (True, "fp32")):
        flags = frozenset({"avx2", "fma"} | ({"avx512f"} if avx512 else set()))
        monkeypatch.setattr(features, "cpu_flags", lambda flags=flags: flags)
        with torch.no_grad():
            assert quantize.prefill_path(torch.int8) == ("int8" if built else "fp32")
            assert quantize.prefill_path(torch.bfloat16) == bf16_path
        with torch.enable_grad():  # training: fp32 forward, as its backward
            assert quantize.prefill_path(torch.int8) == quantize.prefill_path(torch.bfloat16) == "fp32"
    assert features.int16_gemm_pays(frozenset({"avx2", "fma"}))
    assert not features.int16_gemm_pays(frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert not features.int16_gemm_pays(frozenset({"sse4_2"}))
    monkeypatch.setenv("PALIGEMMA_PREFILL", "fp32")
    assert quantize.prefill_path(torch.int8) == quantize.prefill_path(torch.bfloat16) == "fp32"
    monkeypatch.setenv("PALIGEMMA_PREFILL", "int16")
    with torch.no_grad():
        assert quantize.prefill_path(torch.bfloat16) == ("int16" if built else "fp32")
        monkeypatch.setattr(kernels, "extension", lambda: None)
        assert quantize.prefill_path(torch.bfloat16) == "fp32"
    monkeypatch.setattr(features, "has_bf16_units", lambda flags=None: True)
    monkeypatch.delenv("PALIGEMMA_PREFILL")
    assert quantize.prefill_path(torch.int8) == quantize.prefill_path(torch.bfloat16) == "bf16"
    # bf16 units with AVX512-VNNI and no AMX (Zen 4 / 5): int8 weights take our 512-bit int8 GEMM, bf16 stay bf16
    zen = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"})
    monkeypatch.setattr(kernels, "extension", real_extension)
    for flags, int8_path in ((zen, "int8" if built else "bf16"), (zen | {"amx_bf16", "amx_int8"}, "bf16")):
        monkeypatch.setattr(features, "cpu_flags", lambda flags=flags: flags)
        assert features.int8_gemm_beats_bf16() == ("amx_bf16" not in flags)
        with torch.no_grad():
            assert quantize.prefill_path(torch.int8) == int8_path
            assert quantize.prefill_path(torch.bfloat16) == "bf16"
        with torch.enable_grad():
            assert quantize.prefill_path(torch.int8) == "bf16"
    monkeypatch.setattr(features, "cpu_flags", lambda: zen)
    with torch.no_grad():
        assert quantize.prefill_path(torch.int8) == ("int8" if built else "bf16")
        monkeypatch.setenv("PALIGEMMA_PREFILL", "bf16")  # forced: int8 weights stay widened to bf16
        assert quantize.prefill_path(torch.int8) == "bf16"
        monkeypatch.delenv("PALIGEMMA_PREFILL")
        monkeypatch.setattr(kernels, "extension", lambda: None)  # no kernels: no int8 GEMM of ours
        assert quantize.prefill_path(torch.int8) == "bf16"


def test_path_follows_the_cpus_features():
    assert features.auto_prefill_path(frozenset({"avx2", "fma", "amx_bf16"})) == "bf16"
    assert features.auto_prefill_path(frozenset({"avx2", "avx512f", "avx512_bf16"})) == "bf16"
    # without bf16 units: fp32 GEMMs on widened weights; the int8 path lost to them end to end on AVX2 (issue 14)
    assert features.auto_prefill_path(frozenset({"avx2", "fma"})) == "fp32"
    assert features.auto_prefill_path(frozenset({"avx2", "avx512_vnni"})) == "fp32"
    assert features.auto_prefill_path(frozenset({"sse4_2"})) == "fp32"
    assert features.has_vnni(frozenset({"avx_vnni"})) and not features.has_vnni(frozenset({"avx2"}))


def test_path_overrides_and_description(monkeypatch):
    monkeypatch.delenv("PALIGEMMA_PREFILL", raising=False)
    monkeypatch.setattr(features, "_override", None)
    assert features.prefill_path() == features.auto_prefill_path()
    assert features.describe()["prefill_path_source"] == "auto"
    monkeypatch.setenv("PALIGEMMA_PREFILL", "fp32")
    assert features.prefill_path() == "fp32" and features.prefill_path_source() == "PALIGEMMA_PREFILL"
    features.set_prefill_path("bf16")
    try:
        assert features.prefill_path() == "bf16" and features.prefill_path_source() == "set_prefill_path"
    finally:
        features.set_prefill_path(None)
    assert features.prefill_path() == "fp32"
    with pytest.raises(InputError, match="int4"):
        features.set_prefill_path("int4")
    monkeypatch.setenv("PALIGEMMA_PREFILL", "fast")
    with pytest.raises(InputError, match="PALIGEMMA_PREFILL='fast'"):
        features.prefill_path()
    monkeypatch.delenv("PALIGEMMA_PREFILL")
    monkeypatch.setenv("PALIGEMMA_PREFILL_BF16", "1")  # the old switch: refused with the new name, not ignored
    with pytest.raises(InputError, match="PALIGEMMA_PREFILL=bf16"):
        features.prefill_path()
    monkeypatch.delenv("PALIGEMMA_PREFILL_BF16")
    info = paligemma.cpu.describe()
    assert {"cpu", "flags", "prefill_path", "prefill_path_source", "isa", "kernels"} <= set(info)


def test_avx2_emulation_hides_wider_units(monkeypatch):
    monkeypatch.setattr(features, "_cpuinfo", lambda: ("Test CPU", frozenset(
        {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"})))
    monkeypatch.delenv("PALIGEMMA_PREFILL", raising=False)
    monkeypatch.setattr(features, "_override", None)
    monkeypatch.setenv("PALIGEMMA_CPU_ISA", "native")
    assert features.has_bf16_units() and features.cpu_model() == "Test CPU"
    monkeypatch.setenv("PALIGEMMA_CPU_ISA", "avx2")
    assert features.cpu_flags() == {"avx2", "fma"} and not features.has_bf16_units() and not features.has_vnni()
    assert features.kernel_cflags() == ["-mavx2", "-mfma", "-mf16c"]
    assert features.prefill_path() == "fp32"
    monkeypatch.setenv("PALIGEMMA_CPU_ISA", "avx2-vnni")  # Alder Lake and later: AVX2 and AVX-VNNI
    assert features.cpu_flags() == {"avx2", "fma", "avx_vnni"} and features.has_vnni() and not features.has_bf16_units()
    assert features.kernel_cflags() == ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"]
    assert features.int16_gemm_pays() and features.prefill_path() == "fp32"
    monkeypatch.setenv("PALIGEMMA_CPU_ISA", "sse")
    with pytest.raises(InputError, match="PALIGEMMA_CPU_ISA"):
        features.cpu_flags()


def test_a_refused_cpu_setting_is_not_called_a_corrupt_checkpoint(bf16_dirs, monkeypatch):
    """A bad PALIGEMMA_CPU_ISA met while the weights load is the setting's error, as it is, not "cannot read
    tensor ...: the file is corrupt"."""
    monkeypatch.setenv("PALIGEMMA_CPU_ISA", "bogus")
    monkeypatch.setattr(kernels, "_ext", None)  # as in a fresh process: the kernels' build reads the setting
    monkeypatch.setattr(kernels, "_ext_error", None)
    with pytest.raises(InputError, match="PALIGEMMA_CPU_ISA='bogus'") as e:
        paligemma.load_model(bf16_dirs["pg1"], quantize="int8")
    assert not isinstance(e.value, CheckpointError) and "corrupt" not in str(e.value)


def test_avx2_vnni_emulation_is_refused_without_avx_vnni(monkeypatch):
    """A build with AVX-VNNI would die of an illegal instruction on a CPU without it (AMD's Zen 4 has AVX512-VNNI
    only): the setting is refused with what to use instead."""
    monkeypatch.setattr(features, "_cpuinfo", lambda: ("Test CPU", frozenset({"avx2", "fma", "avx512f", "avx512_vnni"})))
    monkeypatch.setenv("PALIGEMMA_CPU_ISA", "avx2-vnni")
    with pytest.raises(InputError, match="avx_vnni.*PALIGEMMA_CPU_ISA=avx2"):
        features.kernel_cflags()


@pytest.mark.parametrize("gemm_rows", [1, 10**9])
def test_query_chunked_attention_gives_the_unchunked_result(bf16_dirs, monkeypatch, gemm_rows):
    """Fast formats run Gemma 2's softcapped attention by query chunks (long 448 / 896 px prompts), with the
    heads of a kv head stacked, by one GEMM per (batch row, kv head) or by one batched product (decoding); a
    chunk boundary inside the prompt and a ragged last chunk leave the logits as they are; plain modules keep
    the exact attention."""
    _force_path(monkeypatch, "fp32")
    monkeypatch.setattr(quantize, "ATTN_GEMM_ROWS", gemm_rows)
    plain = paligemma.load_model(bf16_dirs["pg2"], quantize=None)
    assert not any(isinstance(m, quantize.QueryChunkedAttention) for m in plain.modules())
    model = paligemma.load_model(bf16_dirs["pg2"], quantize="bf16")
    assert sum(isinstance(m, quantize.QueryChunkedAttention) for m in model.modules()) == \
        model.config.text.num_hidden_layers
    ids, pix = _inputs(model.config, batch=2)
    ids = torch.cat([torch.tensor([[40, 41, 42], [0, 0, 0]]), ids], dim=1)  # row 1 left-padded: masked keys
    am = (ids != 0).long()
    with torch.no_grad():
        whole = model(ids, pix, attention_mask=am).logits
        monkeypatch.setattr(quantize, "ATTN_QUERY_CHUNK", 3)
        chunked = model(ids, pix, attention_mask=am).logits
        ref = plain(ids, pix, attention_mask=am).logits
    assert ids.shape[1] > 3 and ids.shape[1] % 3
    assert rel_diff(chunked, whole) < 1e-6
    assert rel_diff(chunked, ref) < TOL["fp32"]


@pytest.mark.parametrize("gemm_rows", [1, 10**9])
def test_query_chunked_attention_broadcasts_a_shared_mask(bf16_dirs, monkeypatch, gemm_rows):
    """A mask [1, T, K] serves every batch row, in both branches, as it does in transformers' computation."""
    model = paligemma.load_model(bf16_dirs["pg2"], quantize="bf16")
    attn = next(m for m in model.modules() if isinstance(m, quantize.QueryChunkedAttention))
    monkeypatch.setattr(quantize, "ATTN_GEMM_ROWS", gemm_rows)
    g = torch.Generator().manual_seed(0)
    B, T = 2, 11
    q = torch.randn(B, attn.nh, T, attn.hd, generator=g)
    k, v = (torch.randn(B, attn.nkv, T, attn.hd, generator=g) for _ in range(2))
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None]  # [1, T, T], causal
    with torch.no_grad():
        got = attn._softcapped(q, k, v, mask)
        ref = GemmaAttention._softcapped(attn, q, k, v, mask)
    assert (got - ref).abs().max() < 1e-5


def test_stacked_decode_attention_gives_sdpas_result(bf16_dirs):
    """Fast formats decode PaliGemma 1 with the heads of each kv head stacked as the rows of one product: SDPA's
    result within fp32 rounding, masked keys (a left-padded row) included; prefill rows and autograd keep SDPA
    itself; plain modules keep the exact attention."""
    plain = paligemma.load_model(bf16_dirs["pg1"], quantize=None)
    assert not any(isinstance(m, quantize.StackedDecodeAttention) for m in plain.modules())
    model = paligemma.load_model(bf16_dirs["pg1"], quantize="fp32")
    layers = [m for m in model.modules() if isinstance(m, quantize.StackedDecodeAttention)]
    assert len(layers) == model.config.text.num_hidden_layers
    attn = layers[0]
    g = torch.Generator().manual_seed(0)
    B, K = 3, 13
    q = torch.randn(B, attn.nh, 1, attn.hd, generator=g)
    k, v = (torch.randn(B, attn.nkv, K, attn.hd, generator=g) for _ in range(2))
    mask = torch.ones(B, 1, K, dtype=torch.bool)
    mask[1, :, :4] = False  # row 1 left-padded
    with torch.no_grad():
        got = attn._attend(q, k, v, mask)
        ref = GemmaAttention._attend(attn, q, k, v, mask)
        assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5
        moved = mask.clone()
        moved[1, :, :4], moved[1, :, 4:8] = True, False  # other keys masked: another result
        assert (attn._attend(q, k, v, moved) - got)[1].abs().max() > 1e-3
        q2, mask2 = torch.cat([q, q], dim=2), torch.cat([mask, mask], dim=1)  # 2 query rows: SDPA
        assert torch.equal(attn._attend(q2, k, v, mask2), GemmaAttention._attend(attn, q2, k, v, mask2))
    assert torch.equal(attn._attend(q, k, v, mask), ref)  # autograd on: SDPA
    ids, pix = _inputs(model.config, batch=2)
    ids = torch.cat([torch.tensor([[40, 41, 42], [0, 0, 0]]), ids], dim=1)  # row 1 left-padded
    am = (ids != 0).long()
    with torch.no_grad():
        fast = model.generate(ids, pix, attention_mask=am, max_new_tokens=6, eos_token_ids=(-1,))
        exact = plain.generate(ids, pix, attention_mask=am, max_new_tokens=6, eos_token_ids=(-1,))
    assert torch.equal(fast, exact)


@pytest.mark.parametrize("v", ["pg1", "pg2"])
def test_rope_in_place_gives_the_plain_rotation(bf16_dirs, v):
    """Fast formats rotate queries and keys with fewer temporaries: apply_rope's values bit for bit on the
    projections' transposed layout (positions past 1 and a left-padded row), the input untouched, the plain
    rotation itself under autograd; plain models keep apply_rope."""
    from paligemma.modeling_gemma import apply_rope, rope_cos_sin

    plain = paligemma.load_model(bf16_dirs[v], quantize=None)
    assert all(type(m) is GemmaAttention for m in plain.modules() if isinstance(m, GemmaAttention))
    model = paligemma.load_model(bf16_dirs[v], quantize="fp32")
    attn = next(m for m in model.modules() if isinstance(m, GemmaAttention))
    assert type(attn) is not GemmaAttention
    g = torch.Generator().manual_seed(0)
    B, T = 2, 7
    x = torch.randn(B, T, attn.nh, attn.hd, generator=g).transpose(1, 2) * 10  # [B, nh, T, hd] as q
    pos = torch.stack([torch.arange(1, T + 1), torch.arange(T) - 2]).clamp_min(1)  # row 1 left-padded
    cos, sin = rope_cos_sin(pos, attn.hd, 10000.0, torch.float32)
    before = x.clone()
    ref = apply_rope(x, cos, sin)
    with torch.no_grad():
        got = attn._rope(x, cos, sin)
    assert torch.equal(x, before) and torch.equal(got, ref) and (got - x).abs().max() > 1  # a real rotation
    assert torch.equal(attn._rope(x, cos, sin), ref)  # autograd on: apply_rope itself
    assert torch.equal(quantize.rope_in_place(x, cos, sin), got)


def test_fused_rms_norm_gives_the_plain_norms_result(bf16_dirs):
    """Fast formats run the decoder's RMSNorms through torch's fused kernel with the scale in place: the plain
    module's values within fp32 rounding (rows of very different sizes, a zero row, batch dims), the input
    untouched; autograd and bf16 activations take the plain computation itself; plain models keep the plain
    module."""
    from paligemma.modeling_gemma import GemmaRMSNorm

    plain = paligemma.load_model(bf16_dirs["pg2"], quantize=None)
    assert not any(isinstance(m, quantize.FusedRMSNorm) for m in plain.modules())
    model = paligemma.load_model(bf16_dirs["pg2"], quantize="fp32")
    norms = [m for m in model.language_model.modules() if isinstance(m, GemmaRMSNorm)]
    assert norms and all(type(m) is quantize.FusedRMSNorm for m in norms)  # 4 per layer and the final one
    assert len(norms) == 4 * model.config.text.num_hidden_layers + 1
    norm = norms[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.5)
        x = torch.randn(3, 7, norm.weight.shape[0], generator=g) * torch.logspace(-6, 6, 7)[None, :, None]
        x[1, 2] = 0.0
        before = x.clone()
        got = norm(x)
        ref = GemmaRMSNorm.forward(norm, x)
        assert torch.equal(x, before) and got.shape == ref.shape
        assert ((got - ref).abs() <= 1e-6 * ref.abs().amax(-1, keepdim=True)).all()
        assert torch.equal(got[1, 2], torch.zeros_like(got[1, 2]))
        xb = x.to(torch.bfloat16)
        assert torch.equal(norm(xb), GemmaRMSNorm.forward(norm, xb))
    assert torch.equal(norm(x), ref)  # autograd on: the plain computation
    ids, pix = _inputs(model.config)
    with torch.no_grad():
        fused = model(ids, pix).logits
    for m in norms:
        m.forward = GemmaRMSNorm.forward.__get__(m)
    with torch.no_grad():
        assert rel_diff(fused, model(ids, pix).logits) < 1e-5


@pytest.mark.parametrize("path", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("wdtype", [torch.int8, torch.bfloat16])
def test_large_weights_multiply_by_row_blocks_as_whole(monkeypatch, path, wdtype):
    """A weight above WIDEN_BLOCK_BYTES (the tied head of a 3B model: 257k rows) is multiplied a block of output
    rows at a time, so its widened or packed copy never exists whole; each output column is the product the
    unblocked call computes (scales are per output row), a ragged last block included."""
    if path == "int8" and features.int8_gemm_engine() is None:
        pytest.skip("this torch build has no quantized engine (onednn / fbgemm): no int8 prefill path")
    _force_path(monkeypatch, path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(kernels.MAX_ROWS + 9, 64, generator=g)  # more rows than the decode kernel takes: the GEMM path
    w = (torch.randn(50, 64, generator=g) * 0.05).to(torch.bfloat16)
    weight, scale = quantize.quantize_rows_torch(w) if wdtype == torch.int8 else (w, None)
    whole = quantize._matmul(x, weight, scale)
    calls = []
    real = quantize._matmul_by_blocks
    monkeypatch.setattr(quantize, "_matmul_by_blocks", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(quantize, "WIDEN_BLOCK_BYTES", 4 * 64 * 16)  # 16 rows a block: 16, 16, 16, 2
    blocked = quantize._matmul(x, weight, scale)
    assert calls == [16]
    assert blocked.shape == whole.shape and blocked.dtype == whole.dtype
    assert rel_diff(blocked, whole) < 1e-6


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_frozen_grad_input_by_blocks_matches_whole(monkeypatch, dtype):
    """LoRA's backward through a frozen weight: widened a block of rows at a time into the reused scratch
    buffer (4 rows a block here: 4, 4, 2), it gives grad_y @ (w * scale) as the whole product does."""
    from paligemma.cpu import autograd

    g = torch.Generator().manual_seed(0)
    w = (torch.randint(-127, 128, (10, 6), generator=g, dtype=torch.int8) if dtype == torch.int8
         else torch.randn(10, 6, generator=g).to(dtype))
    scale = torch.rand(10, generator=g) + 0.5 if dtype == torch.int8 else None
    gy = torch.randn(3, 10, generator=g)
    expected = (gy * (1 if scale is None else scale)) @ w.float()  # [3, 6]
    monkeypatch.setattr(autograd, "BACKWARD_BLOCK_BYTES", 4 * 6 * 4)
    got = autograd.frozen_grad_input(gy, w, scale)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    kernels.widen(torch.zeros(10, 6, dtype=dtype), torch.float32)  # the scratch reused by others in between
    torch.testing.assert_close(autograd.frozen_grad_input(gy, w, scale), got, rtol=0, atol=0)


def test_fast_gelu_gradient_matches_torchs():
    """The fast formats' GELU (the compiled kernel forward) differentiates as torch's tanh GELU does."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 300, generator=g) * 3).requires_grad_()
    up = torch.randn(4, 300, generator=g)
    (quantize.gelu_tanh(x) * up).sum().backward()
    mine = x.grad.clone()
    x.grad = None
    (torch.nn.functional.gelu(x, approximate="tanh") * up).sum().backward()
    torch.testing.assert_close(mine, x.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(quantize.gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"),
                                   rtol=2e-6, atol=2e-6)
