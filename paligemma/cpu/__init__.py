"""Fast CPU inference: weight formats swapped in while loading (`formats.py`) and the compiled kernels
they call (`kernels.py`). The exact model (`modeling_*.py`) knows nothing of them. `autograd.py` passes
gradients through their frozen weights to their inputs (LoRA training over a bf16 / int8 base)."""
