"""CPU kernels for the decode fast path: a few-row matrix-vector product over fp32, bf16 or int8 weights.

Decoding one token multiplies a handful of activation rows (one per batch row) by every weight matrix,
so it is bound by how fast the weights stream from memory, not by arithmetic. PyTorch's CPU kernels
for that shape reach the memory bandwidth in fp32 with one row only; with bf16 or int8 weights, or 2-8
rows, they fall well short (measured in `benchmarks/bench_cpu.py`). `gemv` here reads each weight once
for all rows, widens it to fp32 in registers (bf16: a 16-bit shift; int8: sign-extend and convert, then
one per-output-channel scale) and accumulates in fp32, like gpt-fast's int8 path and llama.cpp's
`ggml_vec_dot`; for int8 weights at inference it multiplies int16 activation levels instead
(`int_acts`, docs/DESIGN.md "Decoding over int8 weights"). `int8_to_bf16` widens int8 weights exactly
(|q| <= 127 fits bf16's 8-bit significand) for the prefill GEMM. `gemm_int8` (csrc/gemm_int8.cpp) is the int8 prefill path's many-row product: int8
weights as stored times activations quantized per token, int32 accumulation. `gemm_int16`
(csrc/gemm_int16.cpp) is the int16 path's (bf16 weights on AVX2): 12-bit weights and activations,
`vpmaddwd`, exact int32 sums per K block.

The C++ sources, `csrc/*.cpp`, are compiled on first use with `torch.utils.cpp_extension.load` for
the host's vector width (AVX-512, AVX2 or plain C++; AVX2 under PALIGEMMA_CPU_ISA=avx2, AVX2 and
AVX-VNNI under avx2-vnni, see `features.py`) and cached under torch's extension directory; builds take about a minute once. When no
compiler is available, or PALIGEMMA_NO_KERNELS=1, every function falls back to plain PyTorch with the
same results up to summation order, except `gemm_int8`, which returns None (the int8 path then takes torch's
quantized engines, whose activation quantization differs).
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import features

MAX_ROWS = 8  # rows handled by one pass over the weights; more rows go to the GEMM path

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "kernels.cpp", CSRC / "gemm_int8.cpp", CSRC / "gemm_int16.cpp"]

_ext = None
_ext_error: str | None = None


def extension():
    """The compiled kernels, built on first call; None when they cannot be built (the fallbacks are used)."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    if os.environ.get("PALIGEMMA_NO_KERNELS") == "1":
        _ext_error = "disabled by PALIGEMMA_NO_KERNELS=1"
        return None
    cflags = features.kernel_cflags()
    # -march=native code only runs on this CPU kind: the build name carries the flags it was built for.
    text = "".join(s.read_text() for s in SOURCES)
    tag = hashlib.sha1((text + " ".join(cflags) + str(sorted(features._cpuinfo()[1])) + torch.__version__).encode())
    name = f"paligemma_kernels_{tag.hexdigest()[:10]}"
    try:
        from torch.utils.cpp_extension import load

        if not _is_built(name):
            print("paligemma: compiling the CPU kernels for this machine (once; about a minute)...",
                  file=sys.stderr, flush=True)
        _ext = load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=["-O3", *cflags, "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform: plain PyTorch instead
        _ext_error = f"{type(e).__name__}: {e}"
        warnings.warn(f"paligemma: CPU kernels unavailable, using plain PyTorch ({_ext_error.splitlines()[0]})")
    return _ext


def unavailable_reason() -> str | None:
    """Why `extension()` is None (after a call), or None when the kernels are built."""
    extension()
    return _ext_error


def _is_built(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, False)).glob(f"{name}*.so"))
    except Exception:  # a private helper of torch: if it moves, only the notice is lost
        return True


_EMPTY = torch.empty(0)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, int_acts: bool = False) -> torch.Tensor:
    """x float32[M, K] (M small) @ w[N, K].T (float32 / bfloat16 / int8), times scale float32[N], plus
    bias float32[N] -> float32[M, N]. Weights are widened to fp32; accumulation is fp32. With `int_acts`,
    int8 weights take the integer route where the build has AVX2: each row of x quantized to int16 levels
    (step max|x| / 32767; rounding errors up to 2^-16 of the row's max |x|, the weights' up to 2^-8), exact int32
    sums (`vpmaddwd`), 1.2-1.3x the fp32 route's speed at 4 rows (benchmarks/RESULTS.md, run 12). A row holding
    a NaN or infinity, or only values below 32767 * FLT_MIN, is computed alone on the fp32 route; no row's
    result depends on the others'."""
    ext = extension() if x.device.type == "cpu" else None
    if ext is not None:
        return ext.gemv(x.contiguous(), w, _EMPTY if scale is None else scale, _EMPTY if bias is None else bias,
                        int_acts)
    if w.dtype == torch.int8:
        y = F.linear(x, w.to(x.dtype)) * scale
    else:
        y = F.linear(x, w.to(x.dtype)) if scale is None else F.linear(x, w.to(x.dtype)) * scale
    return y if bias is None else y + bias


_scratch: dict[torch.dtype, torch.Tensor] = {}


def scratch(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of `shape`, overwritten by the next call for the same dtype. Widening one layer's
    weight per call into a fresh allocation would spend more time in page faults than in the conversion."""
    n = shape.numel()
    if n * dtype.itemsize > 2**30:  # e.g. a 3B model's embedding as a full-sequence head: not worth keeping
        return torch.empty(shape, dtype=dtype)
    if dtype not in _scratch or _scratch[dtype].numel() < n:
        _scratch[dtype] = torch.empty(n, dtype=dtype)
    return _scratch[dtype][:n].view(shape)


def widen(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 or bfloat16 weights as `dtype` (bfloat16 or float32), exactly (|int8| <= 127 fits bf16's
    significand), in the scratch buffer: use the result before the next call."""
    if w.device.type != "cpu":
        return w.to(dtype)
    out = scratch(w.shape, dtype)
    ext = extension() if (w.dtype, dtype) == (torch.int8, torch.bfloat16) else None
    if ext is not None:
        ext.int8_to_bf16(w.contiguous(), out)
    else:
        out.copy_(w)
    return out


def int8_to_bf16(q: torch.Tensor) -> torch.Tensor:
    """int8[...] -> bfloat16[...] holding the same integers (exact), in the scratch buffer."""
    return widen(q, torch.bfloat16)


def gemm_int8_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemm_int8` takes this product: the kernels are built, CPU tensors, K a multiple of 16 up to 65536."""
    return x.device.type == "cpu" and x.shape[-1] % 16 == 0 and x.shape[-1] <= 65536 and extension() is not None


def gemm_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x float32[M, K] @ w int8[N, K].T * scale float32[N] -> float32[M, N], int8 x int8 products with
    int32 accumulation (csrc/gemm_int8.cpp): the activations are quantized per row (token), asymmetrically,
    to 7 bits on AVX2 (`vpmaddubsw` pairs would saturate at 8) and 8 bits with VNNI. None when not
    `gemm_int8_fits`."""
    if w.dtype != torch.int8 or not gemm_int8_fits(x, w):
        return None
    ext, w = extension(), w.contiguous()
    cached = getattr(w, "_paligemma_row_sums", None)  # (version, sums): a weight modified in place is summed again
    if cached is None or cached[0] != w._version:
        cached = (w._version, ext.int8_row_sums(w))
        w._paligemma_row_sums = cached
    return ext.gemm_int8(x.contiguous(), w, scale.contiguous(), cached[1])


def gemm_int16(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """x float32[M, K] @ w[N, K].T (* scale float32[N]) -> float32[M, N] with 12-bit integers on both sides
    and exact int32 sums over K blocks of 512 (csrc/gemm_int16.cpp). bf16 weights are quantized per output
    channel (step max|w[n]| / 2047, kept with the weight and recomputed after an in-place change) tile by tile
    inside the kernel, so no copy of the weight is made; int8 weights are taken as stored (their levels fit).
    The activations are quantized per row (token), symmetrically. A NaN or infinity in a row or channel
    makes its results NaN. None when not `gemm_int8_fits` or the weights are neither bf16 nor int8."""
    if w.dtype not in (torch.bfloat16, torch.int8) or not gemm_int8_fits(x, w):
        return None
    ext, w = extension(), w.contiguous()
    if w.dtype == torch.int8:
        sw = torch.ones(w.shape[0]) if scale is None else scale.float().contiguous()
        return ext.gemm_int16(x.contiguous(), w, sw)
    cached = getattr(w, "_paligemma_int16_steps", None)  # (version, steps)
    if cached is None or cached[0] != w._version:
        cached = (w._version, ext.int16_row_steps(w))
        w._paligemma_int16_steps = cached
    y = ext.gemm_int16(x.contiguous(), w, cached[1])
    return y if scale is None else y.mul_(scale)


def gelu_tanh_(x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """x = gelu(x, approximate="tanh") (times `up` when given), in place; the compiled kernel (exp-based, within
    ~1e-6 of torch's) for contiguous fp32 CPU tensors, torch's otherwise. Returns x."""
    ext = extension() if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() else None
    if ext is not None and (up is None or (up.dtype == torch.float32 and up.is_contiguous() and up.shape == x.shape)):
        ext.gelu_tanh_(x, _EMPTY if up is None else up)
        return x
    torch.ops.aten.gelu_(x, approximate="tanh")
    return x if up is None else x.mul_(up)


def softcap_softmax_(s: torch.Tensor, mask: torch.Tensor | None, pre: float, cap: float) -> torch.Tensor:
    """Gemma 2's attention probabilities from raw scores, in place: s float32[G, C, K] becomes
    softmax over K of (cap * tanh(pre * s), or finfo.min where mask is False), as transformers computes them
    (pre = scale / cap). mask bool[Gm, C, K] serves G / Gm consecutive groups each (batch rows over heads), or
    None. The compiled kernel does each row in one pass while it is in cache (tanh and exp by polynomials,
    within ~1e-6 of torch's); torch's ops otherwise. A row with every key masked comes out uniform, as torch's.
    Returns s."""
    if mask is not None and (mask.dim() != 3 or mask.shape[0] == 0 or s.shape[0] % mask.shape[0]):
        raise ValueError(f"softcap_softmax_: mask {tuple(mask.shape)} does not serve scores {tuple(s.shape)}")
    ext = extension() if s.device.type == "cpu" and s.dtype == torch.float32 and s.is_contiguous() else None
    if ext is not None and s.dim() == 3 and (mask is None or (mask.dtype == torch.bool and mask.stride(-1) == 1
                                                              and mask.device.type == "cpu")):
        ext.softcap_softmax_(s, _EMPTY if mask is None else mask, pre, cap)
        return s
    t = torch.tanh(s.float() * pre) * cap  # [G, C, K], fp32 as transformers' softmax
    if mask is not None:
        groups = t.view(mask.shape[0], -1, *t.shape[1:])  # [Gm, G / Gm, C, K]
        groups.masked_fill_(~mask[:, None], torch.finfo(t.dtype).min)
    return s.copy_(torch.softmax(t, dim=-1))


def quantize_rows(w: torch.Tensor, q: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32/bfloat16[N, K] -> (int8[N, K], float32 scale[N]) with the compiled kernel, written into `q`
    and `scale` when given (contiguous); None without the kernel."""
    ext = extension() if w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) else None
    if ext is None:
        return None
    q = torch.empty(w.shape, dtype=torch.int8) if q is None else q
    scale = torch.empty(w.shape[0], dtype=torch.float32) if scale is None else scale
    ext.quantize_rows(w.contiguous(), q, scale)
    return q, scale
