"""Fast CPU inference: weight formats swapped in while loading (`formats.py`), the compiled kernels they
call (`kernels.py`, C++ in `csrc/`) and the CPU feature detection that picks the prefill GEMM
(`features.py`). The exact model (`modeling_*.py`) knows nothing of them. `autograd.py` passes gradients
through their frozen weights to their inputs (LoRA training over a bf16 / int8 base)."""

from __future__ import annotations


def describe() -> dict:
    """CPU model, the flags that matter, the kernels' build ISA and state, and the prefill GEMM path in force
    (with whether it was chosen from the features or forced): what a run should state."""
    import torch

    from . import features, formats, kernels

    info = features.describe()
    ext = kernels.extension()
    info["kernels"] = "built" if ext is not None else f"unavailable ({kernels.unavailable_reason()})"
    with torch.no_grad():  # inference's paths (training keeps the fp32 / bf16 GEMMs where inference takes int8 or int16)
        info["prefill_path_int8_weights"] = formats.prefill_path(torch.int8)
        info["prefill_path_bf16_weights"] = formats.prefill_path(torch.bfloat16)
    info["int8_gemm"] = (f"ours, {ext.gemm_int8_activation_levels()}-level activations" if ext is not None
                         else info["int8_engine"])
    info["int16_gemm"] = "ours, 12-bit weights and activations" if ext is not None else "unavailable"
    return info
