"""Memory that a CPU process's activations leave behind in glibc's malloc, handed back to the OS, so that peak
RSS is the live tensors and not the allocator's fragments: in training by a fixed mmap threshold, in a long
prompt's inference by a trim every few layers.

glibc serves a request above its mmap threshold with its own mapping, returned on free, and after such a
free raises the threshold to that size (up to 32 MB). From then on, a training step's transient
activations (a few MB each: MLP intermediates, attention scores, widened weight blocks) come from the
heap, where the small tensors kept across layers (each checkpointed layer's input) pin the freed space
in between: measured on the 3B with LoRA and gradient checkpointing, RSS grew ~100 MB per decoder layer
through the first forward (bf16 base, batch 1: peak 8.61 GB; with a fixed 1 MB threshold 6.56 GB, for
~5% more time in page faults). Inference keeps glibc's default: its peak barely moved (6.41 vs 6.35 GB)
and its first token took 2-4% longer.

`return_freed_memory()` fixes the threshold (process-wide, from then on); `train()` calls it on a CPU.
PALIGEMMA_MMAP_THRESHOLD=BYTES picks another threshold, 0 leaves the allocator alone.

Inference keeps glibc's threshold but, for a long prompt, hands the heap's free pages back every 4 layers
(`released_per_layer`, glibc's `malloc_trim(0)`; `generation.prefill` uses it). A 448 px prompt's layers
(1036 tokens) grow the heap by ~13 MB each while the memory in use stays flat: on the 3B int8 model (AVX2),
0.83 GB of the heap was free at the end of the prefill. Peak RSS there, interleaved processes: 4.01-4.53 GB
without trims, 3.74-3.77 GB trimming every 4 layers (first token +2-7%), 3.61-3.69 GB after every layer
(+6-10%: each trim also returns the freed transients that the next layer faults in again); the default mode
6.69-7.23 -> 6.62-6.63 GB (benchmarks/RESULTS.md, "Heap trims"). Prompts under PALIGEMMA_TRIM_ROWS tokens
(1024 by default; 0 turns trims off) skip it: their layers' transients are small.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterable, Iterator

import torch

from .errors import InputError

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 1 << 20  # bytes: above this, an allocation is its own mapping and goes back on free
DEFAULT_TRIM_ROWS = 1024  # tokens per forward from which its layers hand the heap's free pages back
TRIM_EVERY = 4  # layers per trim: each trim also gives back the freed transients the next layer reuses
MAX_THRESHOLD = 32 << 20  # glibc's upper bound for the parameter on 64-bit


def threshold() -> int:
    """The threshold in force for `return_freed_memory`: PALIGEMMA_MMAP_THRESHOLD, else 1 MB (0 = off)."""
    raw = os.environ.get("PALIGEMMA_MMAP_THRESHOLD", "").strip()
    if not raw:
        return DEFAULT_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_THRESHOLD:
        raise InputError(f"PALIGEMMA_MMAP_THRESHOLD={raw!r} is not a byte count in 0..{MAX_THRESHOLD}; "
                         "unset it, set 0 to leave the allocator alone, or e.g. 1048576")
    return value


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's C library when it is glibc (mallopt, malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and others lack it)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def return_freed_memory() -> int:
    """Fix glibc's mmap threshold (see the module docstring). Returns the threshold set, 0 when nothing
    was changed (turned off, or not glibc)."""
    value, libc = threshold(), _glibc()
    if value == 0 or libc is None:
        return 0
    if libc.mallopt(M_MMAP_THRESHOLD, value) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {value})")
    return value


def trim_rows() -> int:
    """PALIGEMMA_TRIM_ROWS: the tokens per forward from which `released_per_layer` trims (default 1024; 0 = never)."""
    raw = os.environ.get("PALIGEMMA_TRIM_ROWS", "").strip()
    if not raw:
        return DEFAULT_TRIM_ROWS
    if not raw.isdigit():
        raise InputError(f"PALIGEMMA_TRIM_ROWS={raw!r} is not a token count; unset it (1024), set 0 to never hand "
                         "the heap back between layers, or e.g. 512")
    return int(raw)


def release_heap() -> bool:
    """glibc's `malloc_trim(0)`: the heap's free pages go back to the OS (the heap keeps its addresses; a page
    used again is faulted in anew). False when not glibc or nothing was released."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


@contextlib.contextmanager
def released_per_layer(layers: Iterable[torch.nn.Module], rows: int) -> Iterator[int]:
    """While the block runs, `release_heap()` after every TRIM_EVERY-th layer forward of `layers`, when a forward of
    `rows` tokens is long enough (`trim_rows()`) and the allocator is glibc's. Yields how many layers are watched."""
    limit = trim_rows()
    watch = [] if _glibc() is None or not limit or rows < limit else list(layers)
    done = [0]

    def after(module, args, output) -> None:  # returns None: anything else would replace the layer's output
        done[0] += 1
        if done[0] % TRIM_EVERY == 0:
            release_heap()

    handles = [layer.register_forward_hook(after) for layer in watch]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
