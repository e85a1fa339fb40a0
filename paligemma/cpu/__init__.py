"""Fast CPU inference: weight formats swapped in while loading (`formats.py`), the compiled kernels they
call (`kernels.py`, C++ in `csrc/`) and the CPU feature detection that picks the prefill GEMM
(`features.py`). The exact model (`modeling_*.py`) knows nothing of them. `autograd.py` passes gradients
through their frozen weights to their inputs (LoRA training over a bf16 / int8 base)."""

from __future__ import annotations


def describe() -> dict:
    """CPU model, the flags that matter, the kernels' build ISA and state, and the prefill GEMM path in force
    (with whether it was chosen from the features or forced): what a run should state."""
    from . import features, kernels

    info = features.describe()
    info["kernels"] = "built" if kernels.extension() is not None else f"unavailable ({kernels.unavailable_reason()})"
    return info
