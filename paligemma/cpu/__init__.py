"""CPU weight formats and kernels (the fast inference path) and their training support."""
