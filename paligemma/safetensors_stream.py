"""Read tensors from a safetensors file with plain `pread`, a row block at a time, without mapping the file.

`safetensors.safe_open` maps the whole file; every page a tensor read touches stays mapped, and so
counts in the process's resident memory, until the file is closed. Loading a 3B checkpoint shard by
shard then peaks at the model plus a whole shard (up to 5 GB). Reading with `pread` into a buffer
that is converted and dropped at once keeps the peak at the model plus one block. The format is
8 bytes of little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
raw little-endian data (github.com/huggingface/safetensors, "Format").
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
BLOCK_BYTES = 32 * 2**20  # one read (two are staged): small next to any model, large enough for full speed


class SafetensorsStream:
    """`with SafetensorsStream(path) as f: f.read(key)` or `for row0, block in f.blocks(key): ...`.

    Raises ValueError on a malformed header or a tensor that runs past the end of the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._pool: ThreadPoolExecutor | None = None
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            if size < 8:
                raise ValueError(f"{size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes runs past the end of the file ({size} bytes)")
            header = json.loads(os.pread(self.fd, n, 8))
            header.pop("__metadata__", None)
            self.start = 8 + n
            self.entries = header
            for key, e in header.items():
                if e["dtype"] not in DTYPES:
                    raise ValueError(f"tensor {key} has unsupported dtype {e['dtype']}")
                begin, end = e["data_offsets"]
                if self.start + end > size:
                    raise ValueError(f"tensor {key} runs past the end of the file")
                if end - begin != torch.Size(e["shape"]).numel() * DTYPES[e["dtype"]].itemsize:
                    raise ValueError(f"tensor {key}: {end - begin} bytes do not hold shape {e['shape']} {e['dtype']}")
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> "SafetensorsStream":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._bufs = [None, None]
        os.close(self.fd)

    def _staging(self, i: int, nbytes: int) -> torch.Tensor:
        """Staging buffer i (0 or 1), kept for the whole file: allocating and freeing one per tensor fragments
        the C heap, which then keeps hundreds of MB it cannot return to the system."""
        if self._bufs[i] is None or self._bufs[i].numel() < nbytes:
            self._bufs[i] = torch.empty(max(nbytes, min(BLOCK_BYTES, self._largest())), dtype=torch.uint8)
        return self._bufs[i][:nbytes]

    def _largest(self) -> int:
        return max((e["data_offsets"][1] - e["data_offsets"][0] for e in self.entries.values()), default=0)

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def _read_into(self, out: torch.Tensor, offset: int) -> None:
        buf = out.view(-1).view(torch.uint8).numpy()  # a view: the bytes land in `out` directly
        done = 0
        while done < buf.nbytes:
            n = os.preadv(self.fd, [memoryview(buf)[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"unexpected end of file at byte {offset + done}")
            done += n

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        e = self.entries[key]
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        if out.numel():
            self._read_into(out, self.start + e["data_offsets"][0])
        return out

    def read_as(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor converted to `dtype`, block by block (no second full-size copy)."""
        if self.dtype(key) == dtype or len(self.shape(key)) < 2:
            return self.read(key).to(dtype)
        out = torch.empty(self.shape(key), dtype=dtype)
        for r0, block in self.blocks(key):
            out[r0:r0 + block.shape[0]] = block
        return out

    def blocks(self, key: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows [r0, r0 + n) of the tensor) in blocks of about `block_bytes`, in the stored dtype;
        0-d and 1-d tensors come whole. Blocks live in two staging buffers: the next block is read (a
        thread, outside the GIL) while the caller converts this one, so use each block before taking the
        next one after it."""
        shape = self.shape(key)
        if len(shape) < 2 or not shape[0]:
            yield 0, self.read(key)
            return
        row_bytes = torch.Size(shape[1:]).numel() * self.dtype(key).itemsize
        rows = min(shape[0], max(1, block_bytes // max(1, row_bytes)))
        base = self.start + self.entries[key]["data_offsets"][0]
        starts = list(range(0, shape[0], rows))
        bufs = [self._staging(i, rows * row_bytes).view(self.dtype(key)).view(rows, *shape[1:])
                for i in range(min(2, len(starts)))]

        def fetch(i: int) -> torch.Tensor:
            block = bufs[i % 2][: min(rows, shape[0] - starts[i])]
            self._read_into(block, base + starts[i] * row_bytes)
            return block

        if len(starts) == 1:
            yield 0, fetch(0)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-read")
        pending = self._pool.submit(fetch, 0)
        for i, r0 in enumerate(starts):
            block = pending.result()
            if i + 1 < len(starts):
                pending = self._pool.submit(fetch, i + 1)  # the other buffer
            yield r0, block
