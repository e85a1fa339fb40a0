"""The compiled CPU kernels (cpu/kernels.py, cpu/csrc/*.cpp) against plain PyTorch.

Every test compares the kernel with the plain computation, so it skips, with the reason, where the
extension cannot be built (no compiler, or PALIGEMMA_NO_KERNELS=1): the fallbacks are plain PyTorch, and
comparing them with themselves would prove nothing.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paligemma
from paligemma.cpu import formats, kernels
from paligemma.testing import tiny_config, write_random_checkpoint


@pytest.fixture(scope="module")
def ext():
    built = kernels.extension()
    if built is None:
        pytest.skip(f"CPU kernels not built: {kernels.unavailable_reason()}")
    return built


def test_the_kernels_build_where_a_compiler_is_present():
    """The kernel tests skip where the extension cannot be built, so a compile error in csrc/ would otherwise
    pass as skips: with a C++ compiler and ninja on the machine (CI has both), the build must succeed."""
    if os.environ.get("PALIGEMMA_NO_KERNELS") == "1" or not shutil.which(os.environ.get("CXX", "c++")) \
            or not shutil.which("ninja"):  # on PATH, where torch's build looks for it
        pytest.skip("no C++ compiler or ninja (or PALIGEMMA_NO_KERNELS=1): the plain-PyTorch fallbacks run instead")
    assert kernels.extension() is not None, kernels.unavailable_reason()


def test_sources_ship_with_the_package():
    assert kernels.SOURCES and all(s.is_file() and s.suffix == ".cpp" for s in kernels.SOURCES)
    assert all(s.parent.name == "csrc" and s.parent.parent == kernels.CSRC.parent for s in kernels.SOURCES)


@pytest.mark.parametrize("M", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
def test_gemv_kernel_matches_torch(ext, M, wdtype):
    g = torch.Generator().manual_seed(M)
    w = torch.randn(67, 100, generator=g)  # odd sizes: vector tails and an output-channel tail
    x = torch.randn(M, 100, generator=g)
    bias = torch.randn(67, generator=g)
    if wdtype == torch.int8:
        q, s = formats.quantize_rows_torch(w)
        out = ext.gemv(x, q, s, bias, True)
        if _has_avx2():  # the integer route: exactly its reference, and within its bound of the fp32 product
            ref = _int8_gemv_reference(x, q, s, bias)
            torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
            bound = _int8_gemv_bound(x, q, s)
            assert torch.all((out - torch.nn.functional.linear(x, q.float() * s[:, None], bias)).abs() <= bound)
            return
        ref = torch.nn.functional.linear(x, q.float() * s[:, None], bias)
    else:
        wq = w.to(wdtype)
        ref = torch.nn.functional.linear(x, wq.float(), bias)
        out = ext.gemv(x, wq, torch.empty(0), bias, True)  # int_acts: int8 weights only
    assert out.dtype == torch.float32 and out.shape == (M, 67)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gemv_refuses_a_scale_or_bias_that_does_not_fit_the_weight(ext):
    """A scale or bias of the wrong length, dtype or layout would be read past its end (or as the wrong
    type) by the kernel: it is refused by name instead."""
    x, w = torch.randn(2, 16), torch.randn(5, 16)
    q, s = formats.quantize_rows_torch(w)
    E = torch.empty(0)
    bad = {"4 values": torch.ones(4), "6 values": torch.ones(6), "float64": torch.ones(5, dtype=torch.float64),
           "strided": torch.ones(10)[::2]}
    for what in ("scale", "bias"):
        for why, t in bad.items():
            args = (t, E) if what == "scale" else (E, t)
            with pytest.raises(RuntimeError, match=f"gemv: {what} must be empty or a contiguous float32"):
                ext.gemv(x, w, *args, False)
    for scale, bias in ((s, E), (E, torch.ones(5)), (s, torch.ones(5))):  # the fitting ones still work
        torch.testing.assert_close(ext.gemv(x, w, scale, bias, False),
                                   torch.nn.functional.linear(x, w) * (scale if scale.numel() else 1)
                                   + (bias if bias.numel() else 0), rtol=1e-5, atol=1e-5)


def _has_avx2() -> bool:
    from paligemma.cpu import features

    return "avx2" in features._cpuinfo()[1]


def _int8_gemv_reference(x, q, s, bias=None):
    """The decode kernel's int8 route (csrc/kernels.cpp, `gemv_i8`) in float64: each row of x quantized to
    int16 levels (step max|x| / 32767 in fp32, round half to even), exact integer products, then the row's
    step and the channel's scale."""
    step = x.abs().amax(dim=1, keepdim=True) / 32767  # [M, 1], fp32 as in the kernel
    step = torch.where(step > 0, step, torch.ones_like(step))
    levels = torch.round(x / step).clamp_(-32767, 32767)  # [M, K]
    y = (levels.double() @ q.double().T) * step.double() * s.double()  # [M, N]
    return y if bias is None else y + bias.double()


def _int8_gemv_bound(x, q, s):
    """What quantizing the activations may cost against the fp32 product: half a step per element, times
    sum_k |w[n, k]|, plus fp32 rounding."""
    step = x.abs().amax(dim=1, keepdim=True) / 32767  # [M, 1]
    exact = (x.abs() @ (q.float().abs() * s[:, None]).T)  # [M, N]
    return step / 2 * (q.float().abs() * s[:, None]).sum(1) + 1e-6 * exact + 1e-6


@pytest.mark.parametrize("K", [16, 2304, 3 * 4096 + 16 + 5])
def test_int8_gemv_integer_sums_are_exact(ext, K):
    """Decoding over int8 weights: every level at its largest (32767 x -128 over whole int32 blocks, the
    worst case for their overflow), a block tail and a scalar tail; rows independent of each other."""
    if not _has_avx2():
        pytest.skip("the integer route is the AVX2 / AVX-512 build's; this CPU has neither")
    g = torch.Generator().manual_seed(K)
    q = torch.randint(-128, 128, (9, K), dtype=torch.int8, generator=g)
    q[0] = -128
    q[1] = 127
    s = torch.rand(9, generator=g) + 0.5
    x = torch.randn(6, K, generator=g)
    x[0] = 3.0  # every level 32767
    x[1] = -3.0
    x[2] = 0.0  # an all-zero row: step 1, results 0
    out = ext.gemv(x, q, s, torch.empty(0), True)
    ref = _int8_gemv_reference(x, q, s)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert float(out[0, 0]) == pytest.approx(3.0 * -128 * K * float(s[0]), rel=1e-6)
    assert torch.all(out[2] == 0)
    for M in (1, 2, 3, 5):  # a row's result does not depend on the rows beside it
        for i in range(0, 6 - M + 1):
            assert torch.equal(ext.gemv(x[i:i + M].contiguous(), q, s, torch.empty(0), True), out[i:i + M])
    fp32 = ext.gemv(x, q, s, torch.empty(0), False)  # the fp32 route, when asked
    dense = torch.nn.functional.linear(x.double(), q.double() * s.double()[:, None])
    torch.testing.assert_close(fp32.double(), dense, rtol=1e-5, atol=1e-6 * float(dense.abs().max()))


def test_int8_gemv_row_with_nan_inf_or_only_tiny_values_comes_out_as_fp32(ext):
    """A row with a NaN or infinity has no int16 levels, nor one whose values are all below 32767 * FLT_MIN (its
    step would be subnormal): that row alone takes the fp32 route, whose NaN / inf are torch's, and the rows
    beside it keep the integer route's bits (found by a cold review: one bad row once moved the whole call)."""
    g = torch.Generator().manual_seed(3)
    q, s = formats.quantize_rows_torch(torch.randn(10, 48, generator=g))
    x = torch.randn(5, 48, generator=g)
    x[0, 5], x[2, 7], x[3, 47] = float("inf"), float("nan"), float("-inf")
    x[4] = torch.rand(48, generator=g) * 1e-38  # the step would be subnormal
    out = ext.gemv(x, q, s, torch.empty(0), True)
    ref = torch.nn.functional.linear(x.double(), q.double() * s.double()[:, None]).float()
    for m in (0, 2, 3):
        torch.testing.assert_close(out[m], ref[m], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(out[4], ext.gemv(x[4:5], q, s, torch.empty(0), False)[0])  # the fp32 route, bit for bit
    assert torch.equal(out[1], ext.gemv(x[1:2], q, s, torch.empty(0), True)[0])  # its integer-route bits
    torch.testing.assert_close(out[1].double(), _int8_gemv_reference(x[1:2], q, s)[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("isa", ["avx2", "avx2-vnni"])
def test_gemv_avx2_build_matches_its_references(ext, isa):
    """The AVX2 build's decode kernels (and with AVX-VNNI: `vpdpwssd`), in a fresh process: int8 weights by
    int16 levels (vpmaddwd) against the integer reference; bf16 weights against the fp64 product; a row's
    result the same bits whatever rows come with it."""
    _run_in_avx2_build(
        "import torch\n"
        "from paligemma.cpu import kernels\n"
        "from tests.test_kernels import _int8_gemv_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for M, K, N in [(1, 16, 5), (4, 100, 7), (3, 9216, 9), (8, 12309, 6)]:\n"
        "    x = torch.randn(M, K, generator=g); x[0] = 2.0\n"
        "    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g); q[0] = -128\n"
        "    s = torch.rand(N, generator=g)\n"
        "    ref = _int8_gemv_reference(x, q, s)\n"
        "    torch.testing.assert_close(kernels.gemv(x, q, s, int_acts=True).double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))\n"
        "    wb = torch.randn(N, K, generator=g).bfloat16(); b = torch.randn(N, generator=g)\n"
        "    y = kernels.gemv(x, wb, None, b)\n"
        "    ref = torch.nn.functional.linear(x.double(), wb.double(), b.double())\n"
        "    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))\n"
        "    assert all(torch.equal(kernels.gemv(x[i:i + 1], wb, None, b), y[i:i + 1]) for i in range(M))\n"
        "print('ok')\n",
        isa,
    )


def test_int8_to_bf16_is_exact(ext):
    q = torch.randint(-127, 128, (33, 70), dtype=torch.int8)
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    ext.int8_to_bf16(q, out)
    assert torch.equal(out, q.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kernel_equals_torch_reference(ext, dtype):
    w = torch.randn(40, 2051)
    w[5] = 0.0
    w[9, :40] = torch.arange(40) * 0.5 - 10  # exact halves: round half to even on both sides
    w = w.to(dtype)
    q, s = torch.empty(w.shape, dtype=torch.int8), torch.empty(40)
    ext.quantize_rows(w, q, s)
    qr, sr = formats.quantize_rows_torch(w)
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_quantize_rows_roundtrip_error_is_half_a_step():
    w = torch.randn(16, 256)
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, s = formats.quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert torch.all((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7)


def test_model_without_kernels_gives_the_kernels_tokens(ext, tmp_path):
    """PALIGEMMA_NO_KERNELS=1 runs plain PyTorch everywhere (a fresh process); greedy tokens are the kernels'."""
    d = write_random_checkpoint(tmp_path / "ck", tiny_config("pg1"), seed=5, dtype=torch.bfloat16, tokenizer=False)
    code = (
        "import torch, paligemma\n"
        "from paligemma.cpu import kernels\n"
        f"m = paligemma.load_model({str(d)!r}, quantize='int8')\n"
        "assert kernels.extension() is None\n"
        "ids = torch.tensor([[1664] * 4 + [2, 40, 50, 60, 108]]); pix = torch.zeros(1, 3, 28, 28)\n"
        "print(m.generate(ids, pix, max_new_tokens=8, eos_token_ids=(-1,)).tolist())\n"
    )
    env = dict(os.environ, PALIGEMMA_NO_KERNELS="1", PALIGEMMA_PREFILL="fp32")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    os.environ["PALIGEMMA_PREFILL"] = "fp32"
    try:
        model = paligemma.load_model(d, quantize="int8")
        ids = torch.tensor([[1664] * 4 + [2, 40, 50, 60, 108]])
        mine = model.generate(ids, torch.zeros(1, 3, 28, 28), max_new_tokens=8, eos_token_ids=(-1,)).tolist()
    finally:
        del os.environ["PALIGEMMA_PREFILL"]
    assert out.strip() == str(mine)


def _int8_gemm_reference(x, q, s, levels):
    """What gemm_int8 computes, in float64: per-row asymmetric activation quantization over [min(x, 0),
    max(x, 0)] in `levels` steps (round half to even), integer products, zero point and scales."""
    lo = x.amin(1, keepdim=True).clamp(max=0.0)  # [M, 1]
    hi = x.amax(1, keepdim=True).clamp(min=0.0)
    step = (hi - lo) / levels  # float32 as the kernel
    step = torch.where(step > 0, step, torch.ones_like(step))
    zp = torch.round(-lo / step)
    a = (torch.round(x / step) + zp).clamp(0, levels)  # [M, K]
    return (((a - zp).double() @ q.double().T) * (step * s).double()).float()  # [M, N]


@pytest.mark.parametrize("M, K, N", [(1, 16, 1), (2, 32, 4), (3, 48, 7), (5, 4112, 9), (13, 2048, 12), (37, 8208, 5),
                                     (301, 4112, 9)])  # 301 x 2080-byte K blocks: 2 passes over the weights
def test_gemm_int8_equals_its_integer_reference(ext, M, K, N):
    """Every tile shape (rows and channels beyond the register tile, K beyond one K block and K % 32 == 16)
    gives the exact integer products times the scales; an all-zero row gives zeros, a loud row its own scale."""
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g)
    x[-1, 1] = 300.0
    if M > 1:
        x[0] = 0.0
    q, s = kernels.quantize_rows(torch.randn(N, K, generator=g))
    y = kernels.gemm_int8(x, q, s)
    ref = _int8_gemm_reference(x, q, s, ext.gemm_int8_activation_levels())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert M == 1 or torch.all(y[0] == 0)
    assert kernels.gemm_int8(x[:, :K - 8].contiguous(), q[:, :K - 8].contiguous(), s) is None  # K % 16 != 0: declined


def test_gemm_int8_sums_stay_exact_at_the_largest_k(ext):
    """K = 65536 (the documented limit) with every activation at the top level and every weight at -128: the
    largest product sum in magnitude, 65536 * levels * 128, still exact in int32 (no wrap, no saturation)."""
    levels = ext.gemm_int8_activation_levels()
    K = 65536
    x = torch.ones(2, K)  # one level per 1/levels: every activation at the top level, zero point 0
    q = torch.full((4, K), -128, dtype=torch.int8)
    y = kernels.gemm_int8(x, q, torch.ones(4))
    assert torch.equal(y, torch.full((2, 4), float(K * -128)))  # (K * levels * -128) * (1 / levels), exactly
    torch.testing.assert_close(y, _int8_gemm_reference(x, q, torch.ones(4), levels), rtol=1e-6, atol=0)


def _run_in_avx2_build(code: str, isa: str = "avx2") -> None:
    """Run `code` (which prints "ok") in a fresh process whose kernels are the AVX2 build
    (PALIGEMMA_CPU_ISA=avx2), or AVX2 with AVX-VNNI (avx2-vnni); skipped where this CPU lacks those or its own
    build is already that one."""
    from paligemma.cpu import features

    flags = features._cpuinfo()[1]
    if "avx2" not in flags or (isa == "avx2-vnni" and "avx_vnni" not in flags):
        pytest.skip(f"this CPU cannot run the {isa} build")
    if features._flags_for(flags, isa) == flags:
        pytest.skip(f"this CPU's own build is the {isa} one: tested above")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PALIGEMMA_CPU_ISA=isa)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.parametrize("isa, levels", [("avx2", 127), ("avx2-vnni", 255)])
def test_gemm_int8_avx2_build_equals_its_integer_reference(ext, isa, levels):
    """The AVX2 build (7-bit activations through vpmaddubsw, the path of most laptops and servers), and AVX2 with
    AVX-VNNI (8-bit through vpdpbusd on 16 registers: Intel's laptops since Alder Lake), in a fresh process with
    PALIGEMMA_CPU_ISA set, when this CPU's own build is a wider one."""
    _run_in_avx2_build(
        "import torch\n"
        "from paligemma.cpu import kernels\n"
        "from tests.test_kernels import _int8_gemm_reference\n"
        f"assert kernels.extension().gemm_int8_activation_levels() == {levels}\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for M, K, N in [(1, 16, 1), (3, 48, 7), (5, 4112, 9), (37, 8208, 13)]:\n"
        "    x = torch.randn(M, K, generator=g); x[-1, 1] = 300.0\n"
        "    q, s = kernels.quantize_rows(torch.randn(N, K, generator=g))\n"
        f"    ref = _int8_gemm_reference(x, q, s, {levels})\n"
        "    torch.testing.assert_close(kernels.gemm_int8(x, q, s), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))\n"
        "print('ok')\n",
        isa,
    )


@pytest.mark.parametrize("n", [1, 7, 8, 4099])
def test_gelu_tanh_in_place_matches_torch(ext, n):
    """The fused GELU (exp-based) against torch's tanh GELU, alone and times `up` (GeGLU), over the range
    where tanh saturates and where it does not; in place, on the tensor given."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g) * 4
    x[0, 0] = -90.0 if n > 1 else x[0, 0]  # exp(-2u) overflows: gelu -> -0
    up = torch.randn(3, n, generator=g)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    a = x.clone()
    assert kernels.gelu_tanh_(a) is a
    torch.testing.assert_close(a, ref, rtol=2e-6, atol=2e-6)
    b = x.clone()
    kernels.gelu_tanh_(b, up)
    torch.testing.assert_close(b, ref * up, rtol=2e-6, atol=2e-6)


def _softcap_softmax_reference(s, mask, pre, cap):
    """Gemma 2's probabilities as transformers computes them (tanh softcap, masked_fill(finfo.min), softmax),
    in float64: s [G, C, K], mask bool [Gm, C, K] for G / Gm groups each, or None."""
    t = torch.tanh(s.double() * pre) * cap
    if mask is not None:
        t = t.view(mask.shape[0], -1, *t.shape[1:]).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    return torch.softmax(t.view(s.shape), dim=-1)


@pytest.mark.parametrize("K", [1, 7, 8, 13, 267, 4108])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("pre", [1 / 16 / 50, 0.1])
def test_softcap_softmax_matches_transformers_ops(ext, K, masked, pre):
    """The one-pass softcapped softmax (polynomial tanh and exp) against transformers' ops in float64, over
    scores below the softcap's bend (pre = Gemma 2's scale / cap) and through and beyond it (pre = 0.1: |pre *
    s| up to ~25, where tanh saturates), vector tails, a mask shared by the heads of a batch row (a view into
    a longer one, as the query chunks take it), a row with every key masked (uniform, as torch) and a tiny
    score (tanh(x) = x there); in place, on the tensor given."""
    g = torch.Generator().manual_seed(K)
    s = torch.randn(6, 5, K, generator=g) * 60  # 3 batch rows x 2 heads, 5 query rows
    s[0, 0, 0] = 3e-5
    mask = None
    if masked:
        mask = (torch.rand(3, 9, K, generator=g) > 0.3)[:, 2:7]  # [3, 5, K]: rows 2..6 of a longer mask
        mask[1, 2] = False  # every key masked for this query row
        mask[0, 0, 0] = True
    ref = _softcap_softmax_reference(s, mask, pre, 50.0)
    a = s.clone()
    assert kernels.softcap_softmax_(a, mask, pre, 50.0) is a
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-7)
    if masked:
        assert torch.equal(a[2:4, 2], torch.full((2, K), 1 / K))


def test_softcap_softmax_nan_and_inf_as_torch(ext):
    """A NaN among the keys a row attends makes that row NaN (torch's softmax); a NaN at a masked key is
    replaced as masked_fill replaces it; infinite scores are softcapped to +-cap like any other."""
    s = torch.randn(2, 3, 20)
    s[0, 1, 5] = float("nan")  # attended: row NaN
    s[1, 2, 4] = float("nan")  # masked: gone
    s[1, 0, 3], s[1, 0, 4] = float("inf"), -float("inf")
    mask = torch.ones(1, 3, 20, dtype=torch.bool)
    mask[0, 2, 4] = False
    ref = _softcap_softmax_reference(s, mask, 0.1, 30.0)
    a = kernels.softcap_softmax_(s.clone(), mask, 0.1, 30.0)
    assert torch.isnan(a[0, 1]).all() and not torch.isnan(a[0, [0, 2]]).any() and not torch.isnan(a[1]).any()
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_softcap_softmax_refuses_a_mask_that_does_not_serve_the_scores(ext):
    """An empty mask (no rows) or one whose rows do not divide the score groups is an error, never "no mask"."""
    s = torch.randn(4, 3, 16)
    for bad in (torch.ones(0, 3, 16, dtype=torch.bool), torch.ones(3, 3, 16, dtype=torch.bool)):
        with pytest.raises(ValueError, match="does not serve"):
            kernels.softcap_softmax_(s.clone(), bad, 0.1, 50.0)
    with pytest.raises(RuntimeError, match="mask"):  # the extension's own check, for direct callers
        ext.softcap_softmax_(s.clone(), torch.ones(0, 3, 16, dtype=torch.bool), 0.1, 50.0)


def test_softcap_softmax_without_the_kernels_is_the_same(ext, monkeypatch):
    """The plain-PyTorch fallback (no compiler) computes the same probabilities, broadcasting the mask the same way."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 3, 37, generator=g) * 20
    mask = torch.rand(2, 3, 37, generator=g) > 0.5
    with_kernel = kernels.softcap_softmax_(s.clone(), mask, 0.02, 50.0)
    monkeypatch.setattr(kernels, "extension", lambda: None)
    plain = kernels.softcap_softmax_(s.clone(), mask, 0.02, 50.0)
    torch.testing.assert_close(plain, with_kernel, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain.double(), _softcap_softmax_reference(s, mask, 0.02, 50.0), rtol=1e-5, atol=1e-7)


def test_softcap_softmax_avx2_build_matches_transformers_ops(ext):
    """The AVX2 build's softcapped softmax (the default mode's attention on most CPUs), in a fresh process."""
    _run_in_avx2_build(
        "import torch\n"
        "from paligemma.cpu import kernels\n"
        "from tests.test_kernels import _softcap_softmax_reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for K in (5, 16, 269):\n"
        "    s = torch.randn(4, 3, K, generator=g) * 60; m = torch.rand(2, 3, K, generator=g) > 0.3\n"
        "    a = kernels.softcap_softmax_(s.clone(), m, 0.02, 50.0)\n"
        "    torch.testing.assert_close(a.double(), ref(s, m, 0.02, 50.0), rtol=1e-5, atol=1e-7)\n"
        "print('ok')\n"
    )


def test_gemm_int8_row_sums_follow_the_weight(ext):
    """The weights' row sums (the zero point's share) are kept with the weight, and summed again after an
    in-place change of it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=g) + 1.0  # a non-zero zero point: the row sums matter
    q, s = kernels.quantize_rows(torch.randn(8, 64, generator=g))
    levels = ext.gemm_int8_activation_levels()
    torch.testing.assert_close(kernels.gemm_int8(x, q, s), _int8_gemm_reference(x, q, s, levels))
    q[:4].mul_(-1)
    torch.testing.assert_close(kernels.gemm_int8(x, q, s), _int8_gemm_reference(x, q, s, levels))


def _int16_levels(v):
    """What gemm_int16 does to a row (activations; bf16 weights): step max|v| / 2047 in float32 (1 for a zero
    row), levels round(v * (1 / step)) (half to even)."""
    step = v.abs().amax(1, keepdim=True) / 2047.0  # [R, 1]
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(v.float() * (1.0 / step)).clamp(-2047, 2047), step


def _int16_gemm_reference(x, w, scale=None):
    """What gemm_int16 computes, in float64: 12-bit levels of both operands (int8 weights: their own levels
    times `scale`), integer products, the two steps."""
    a, step = _int16_levels(x)
    q, sw = (w.float(), scale[:, None]) if w.dtype == torch.int8 else _int16_levels(w.float())
    return ((a.double() @ q.double().T) * (step * sw.T).double()).float()  # [M, N]


@pytest.mark.parametrize("M, K, N", [(1, 16, 1), (2, 32, 4), (3, 48, 7), (5, 1040, 9), (13, 2048, 12),
                                     (333, 528, 5)])
def test_gemm_int16_equals_its_integer_reference(ext, M, K, N):
    """Every tile shape (rows and channels beyond the register tile, K over several K blocks of 512 and a
    16-wide tail, more rows than one pass over the weights) gives the exact integer products times the
    steps, for bf16 weights (quantized in the kernel) and int8 weights (their levels and scale); an all-zero
    row gives zeros, a loud row its own step; K % 16 != 0 is declined."""
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g)
    x[-1, 1] = 300.0
    if M > 1:
        x[0] = 0.0
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    q, s = kernels.quantize_rows(w)
    for weight, scale in ((w, None), (q, s)):
        y = kernels.gemm_int16(x, weight, scale)
        ref = _int16_gemm_reference(x, weight, scale)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        assert M == 1 or torch.all(y[0] == 0)
    assert kernels.gemm_int16(x[:, :K - 8].contiguous(), w[:, :K - 8].contiguous()) is None


def test_gemm_int16_worst_case_sums_stay_exact(ext):
    """Every level at its extreme (2047 x 2047 over a whole K block of 512, the bound the block size is chosen
    for) does not overflow int32: the result is K times the product of the maxima."""
    K = 2048
    x = torch.full((3, K), -2.0)
    w = torch.full((5, K), 0.5, dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.gemm_int16(x, w), torch.full((3, 5), -1.0 * K), rtol=1e-6, atol=0)


def test_gemm_int16_nan_stays_in_its_row_and_channel(ext):
    """A NaN or infinite activation makes its row's results NaN, a NaN weight its channel's, as fp32 would;
    the other results are untouched."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=g)
    w = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    clean = kernels.gemm_int16(x, w)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    w[3, 9] = float("nan")
    y = kernels.gemm_int16(x, w.clone())  # a new tensor: steps not cached
    bad = torch.zeros(4, 6, dtype=torch.bool)
    bad[1:3], bad[:, 3] = True, True
    assert torch.isnan(y[bad]).all() and torch.equal(y[~bad], clean[~bad])


def test_gemm_int16_steps_follow_the_weight(ext):
    """The bf16 weights' steps are kept with the weight, and computed again after an in-place change of it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=g)
    w = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(kernels.gemm_int16(x, w), _int16_gemm_reference(x, w))
    w[:4].mul_(3)
    torch.testing.assert_close(kernels.gemm_int16(x, w), _int16_gemm_reference(x, w))


@pytest.mark.parametrize("isa", ["avx2", "avx2-vnni"])
def test_gemm_int16_avx2_build_equals_its_integer_reference(ext, isa):
    """The AVX2 build (`vpmaddwd` then add; the path the default mode takes on AVX2 CPUs), and AVX2 with AVX-VNNI
    (`vpdpwssd` on 16 registers), in a fresh process, when this CPU's own build is a wider one."""
    _run_in_avx2_build(
        "import torch\n"
        "from paligemma.cpu import kernels\n"
        "from tests.test_kernels import _int16_gemm_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for M, K, N in [(1, 16, 1), (3, 48, 7), (5, 1040, 9), (333, 528, 13)]:\n"
        "    x = torch.randn(M, K, generator=g); x[-1, 1] = 300.0\n"
        "    w = torch.randn(N, K, generator=g).to(torch.bfloat16)\n"
        "    ref = _int16_gemm_reference(x, w)\n"
        "    torch.testing.assert_close(kernels.gemm_int16(x, w), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))\n"
        "x, w = torch.full((3, 2048), -2.0), torch.full((5, 2048), 0.5, dtype=torch.bfloat16)\n"
        "assert torch.equal(kernels.gemm_int16(x, w), torch.full((3, 5), -2048.0))\n"
        "print('ok')\n",
        isa,
    )
