"""What this CPU can do, and which GEMM the fast formats' prefill takes: decided from the features the CPU
reports (never from a timing race), overridable, and recorded so that a run can state it.

Prefill paths (many-row products of bf16 / int8 weights; decoding always uses `kernels.gemv`):
  "bf16"  bf16 GEMMs (activations rounded to bf16), on CPUs with bf16 units (AMX-BF16 or AVX512-BF16).
  "fp32"  fp32 GEMMs on weights widened per layer: on CPUs without bf16 units (AVX2 laptops and servers),
          where a bf16 GEMM is emulated (~3x slower than fp32). Exact for bf16 weights. oneDNN's fp32 matmul
          where torch has it (`fp32_gemm_engine`: ~1.5x MKL's speed on the MLP shapes with AVX2).
  "int8"  int8 x int8 GEMMs with int32 accumulation: our compiled kernel (`kernels.gemm_int8`: AVX2
          `vpmaddubsw` with 7-bit activations, VNNI `vpdpbusd` with 8-bit), or torch's quantized engines
          where it is not built. The weight is quantized per output channel (int8 weights as stored; bf16
          weights once per layer per call), the activations per token, dynamically. Chosen here on
          request only (PALIGEMMA_PREFILL=int8); `formats.prefill_path` also takes it for inference over
          int8 weights where this module picks "fp32" (~0.6x the fp32 GEMM's time with AVX2), and where it picks
          "bf16" on AVX512-VNNI without AMX (`int8_gemm_beats_bf16`). For bf16
          weights it would move the default mode's logits past its 1e-2 bound (7.6e-2 measured).
  "int16" 12-bit weights x 12-bit activations in int16 with exact int32 sums (`kernels.gemm_int16`, AVX2
          `vpmaddwd`): `formats.prefill_path` takes it for inference over bf16 weights (the default mode)
          where this module picks "fp32" and the CPU has AVX2 without AVX-512 (`int16_gemm_pays`): 0.56-1.0x
          MKL's fp32 time on the 3B's shapes, products within ~1e-3 of fp32. Or on request (PALIGEMMA_PREFILL=int16).

Overrides: PALIGEMMA_PREFILL=bf16|int8|int16|fp32|auto or `set_prefill_path(...)`.
PALIGEMMA_CPU_ISA=avx2 makes this module, and the kernels' build, treat the CPU as an AVX2-only one
(no AVX-512, VNNI, bf16 or AMX): with MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2,
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=avx2 (`EMULATE_AVX2`) a whole process behaves
as on such a CPU (`benchmarks/bench_cpu.py --emulate avx2`). PALIGEMMA_CPU_ISA=avx2-vnni keeps AVX-VNNI
too, as Intel's laptop and desktop CPUs since Alder Lake have it (AVX2 + AVX-VNNI, no AVX-512), on a CPU
that reports `avx_vnni` (`EMULATE_AVX2_VNNI`, `--emulate avx2-vnni`).
"""

from __future__ import annotations

import functools
import os
import platform
import warnings

import torch

from ..errors import InputError

PATHS = ("bf16", "int8", "int16", "fp32")
ISAS = ("native", "avx2", "avx2-vnni")
# environment for a process that should behave as on an AVX2-only CPU (set before torch is imported)
EMULATE_AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                "ATEN_CPU_CAPABILITY": "avx2", "PALIGEMMA_CPU_ISA": "avx2"}
# the same for an AVX2 CPU with AVX-VNNI (Alder Lake and later): oneDNN may use it; MKL's fp32 GEMM has no use for it
EMULATE_AVX2_VNNI = dict(EMULATE_AVX2, ONEDNN_MAX_CPU_ISA="AVX2_VNNI", PALIGEMMA_CPU_ISA="avx2-vnni")
EMULATE = {"avx2": EMULATE_AVX2, "avx2-vnni": EMULATE_AVX2_VNNI}
_BEYOND_AVX2 = ("avx512", "amx", "avx_vnni", "avx_vnni_int8", "avx_ne_convert", "avx_ifma")


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise InputError(f"{what}={value!r} is not one of {', '.join(allowed)}; unset it or pick one of those")
    return value


def cpu_isa() -> str:
    """"avx2" when PALIGEMMA_CPU_ISA=avx2 asks to treat the CPU as AVX2-only, "avx2-vnni" as AVX2 with
    AVX-VNNI (refused on a CPU that does not report `avx_vnni`: its build would not run), else "native"."""
    isa = _check(os.environ.get("PALIGEMMA_CPU_ISA", "native") or "native", ISAS, "PALIGEMMA_CPU_ISA")
    if isa == "avx2-vnni" and "avx_vnni" not in _cpuinfo()[1]:
        raise InputError("PALIGEMMA_CPU_ISA=avx2-vnni needs a CPU that reports avx_vnni (Intel since Alder Lake "
                         "or Sapphire Rapids); this one does not: use PALIGEMMA_CPU_ISA=avx2 or unset it")
    return isa


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if key == "flags" and model:
                    break
    except OSError:  # not Linux: only torch's capability below is known
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's reported flags (/proc/cpuinfo), without those beyond AVX2 when PALIGEMMA_CPU_ISA=avx2
    (but `avx_vnni` with avx2-vnni)."""
    return _flags_for(_cpuinfo()[1], cpu_isa())


@functools.lru_cache(maxsize=8)
def _flags_for(flags: frozenset[str], isa: str) -> frozenset[str]:
    """`cpu_flags` for the reported flags and ISA setting, worked out once: decoding asks ~130 times a token."""
    if not flags:  # no /proc/cpuinfo: what torch detected for its own kernels
        cap = torch.backends.cpu.get_cpu_capability().lower()
        flags = frozenset({"avx2", "fma"} if cap.startswith("avx2") else
                          {"avx2", "fma", "avx512f", "avx512bw"} if cap.startswith("avx512") else set())
    if isa != "native":
        flags = frozenset(f for f in flags if not f.startswith(_BEYOND_AVX2) or (isa == "avx2-vnni" and f == "avx_vnni"))
    return flags


def has_bf16_units(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags or "avx512_bf16" in flags


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    """u8 x s8 products accumulated in int32 without the int16 saturation of AVX2's `vpmaddubsw`."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


@functools.lru_cache(maxsize=1)
def int8_gemm_engine() -> str | None:
    """The torch quantized engine that runs the int8 prefill ("onednn", else "fbgemm"), None when this torch
    build has neither (the "int8" path is then unavailable)."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("onednn", "fbgemm"):
        if engine in engines and hasattr(torch.ops.quantized, "linear_dynamic"):
            return engine
    return None


@functools.lru_cache(maxsize=1)
def fp32_gemm_engine() -> str:
    """Who multiplies the "fp32" path's widened weights: "onednn" (torch's bundled oneDNN matmul) when this
    torch build has it, else "mkl" (F.linear). Measured with AVX2 (benchmarks/RESULTS.md, issue 14): for
    PaliGemma's MLP shapes (268 x 2048 @ 2048 x 16384) oneDNN ran at 152 GFLOP/s against MKL's 102, and as
    fast or faster on the others (benchmarks/bench_gemm.py); both are fp32 arithmetic (results differ in
    summation order only). The exact mode's plain modules keep F.linear: they must give transformers' bits."""
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        try:
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 2), torch.ones(2, 2), None, "none", [], "")
            return "onednn"
        except RuntimeError:
            pass
    return "mkl"


def int16_gemm_pays(flags: frozenset[str] | None = None) -> bool:
    """Whether the int16 GEMM (`vpmaddwd`: 16 multiply-adds per 256-bit instruction) beats fp32 GEMMs here: AVX2
    without AVX-512, whose fp32 FMA does as many per instruction."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and not any(f.startswith("avx512") for f in flags)


def int8_gemm_beats_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether int8 weights should take our int8 GEMM (`vpdpbusd`, 512 bits) on a CPU whose bf16 units would
    otherwise multiply them widened to bf16: AVX512-VNNI without AMX (Zen 5 measured; Zen 4 and Cooper Lake by the same
    instruction counts, not measured), where `vpdpbusd`
    does twice `vdpbf16ps`'s multiply-adds per instruction and no weight is widened per layer (Zen 5: the int8
    model's warm first token 0.77x the bf16 path's, a process's first call 1.39x: benchmarks/bench_paths.py,
    RESULTS.md runs 29-33). AMX's tiles keep bf16."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_vnni" in flags and "avx512bw" in flags and not any(f.startswith("amx") for f in flags)


def auto_prefill_path(flags: frozenset[str] | None = None) -> str:
    """The path the CPU's features call for: bf16 units -> "bf16", else "fp32" ("int8" only for int8 weights,
    in `formats.prefill_path`: see the module docstring)."""
    flags = cpu_flags() if flags is None else flags
    return "bf16" if has_bf16_units(flags) else "fp32"


def _env_override() -> str | None:
    if "PALIGEMMA_PREFILL_BF16" in os.environ and "PALIGEMMA_PREFILL" not in os.environ:
        raise InputError("PALIGEMMA_PREFILL_BF16 is no longer read; set PALIGEMMA_PREFILL=bf16 (was 1) or "
                         "PALIGEMMA_PREFILL=fp32 (was 0), or int8, and unset PALIGEMMA_PREFILL_BF16")
    value = os.environ.get("PALIGEMMA_PREFILL", "auto") or "auto"
    return None if value == "auto" else _check(value, PATHS, "PALIGEMMA_PREFILL")


_override: str | None = None  # set_prefill_path's; PALIGEMMA_PREFILL is read at each call below


def set_prefill_path(path: str | None) -> None:
    """Force the prefill path ("bf16" / "int8" / "fp32"), or None to follow PALIGEMMA_PREFILL / the CPU's
    features again."""
    global _override
    if path is not None:
        _check(path, PATHS, "prefill path")
        if path == "int8" and int8_gemm_engine() is None:
            raise InputError("prefill path 'int8' needs torch's quantized engines (onednn or fbgemm), which this "
                             "torch build lacks; use 'fp32' or 'bf16'")
    _override = path


def prefill_path() -> str:
    """The prefill path in force: `set_prefill_path`'s, else PALIGEMMA_PREFILL's, else `auto_prefill_path()`."""
    if _override is not None:
        return _override
    forced = _env_override()
    return forced if forced is not None else auto_prefill_path()


def prefill_path_source() -> str:
    """Where `prefill_path()` comes from: "set_prefill_path", "PALIGEMMA_PREFILL" or "auto" (the CPU's features)."""
    return "set_prefill_path" if _override is not None else "PALIGEMMA_PREFILL" if _env_override() else "auto"


def kernel_cflags() -> list[str]:
    """Compiler flags of the kernels' build: this CPU's vector width, or AVX2 + FMA under PALIGEMMA_CPU_ISA=avx2
    (and AVX-VNNI under avx2-vnni)."""
    isa = cpu_isa()
    return ["-march=native"] if isa == "native" else ["-mavx2", "-mfma", "-mf16c"] + (["-mavxvnni"] if isa == "avx2-vnni" else [])


def describe() -> dict:
    """What a run should state: CPU model, the flags that matter here, torch's CPU capability, the ISA the
    kernels are built for and the prefill path (and whether it was chosen or forced)."""
    flags = cpu_flags()
    keep = ("avx", "fma", "f16c", "amx", "vnni")
    return {
        "cpu": cpu_model(),
        "flags": sorted(f for f in flags if f.startswith(keep) or "vnni" in f or "bf16" in f),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": cpu_isa(),
        "bf16_units": has_bf16_units(flags),
        "vnni": has_vnni(flags),
        "int8_engine": int8_gemm_engine(),
        "fp32_gemm_engine": fp32_gemm_engine(),
        "prefill_path": prefill_path(),
        "prefill_path_source": prefill_path_source(),
        "emulation_env": {k: os.environ[k] for k in EMULATE_AVX2 if k in os.environ},  # same keys in both
    }


def silence_quantized_deprecation() -> None:
    """torch 2.13 warns that quantized tensor creation is deprecated; the int8 path relies on it (and is
    feature-detected, so its removal turns the path off, not the program)."""
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
