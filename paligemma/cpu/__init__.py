"""Fast CPU inference: weight formats swapped in while loading (`formats.py`) and the compiled kernels
they call (`kernels.py`). The exact model (`modeling_*.py`) knows nothing of them."""
