"""Read tensors from a safetensors file a row block at a time, through short-lived mappings of just that block.

`safetensors.safe_open` maps the whole file; every page a tensor read touches stays mapped, and so
counts in the process's resident memory, until the file is closed. Loading a 3B checkpoint shard by
shard then peaks at the model plus a whole shard (up to 5 GB). Here each block (~32 MB) is mapped on
its own, converted by the caller straight from the page cache (no copy into a staging buffer), and
unmapped when the caller drops it, so the peak is the converted model plus about one block. The format
is 8 bytes of little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw little-endian data (github.com/huggingface/safetensors, "Format").
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
BLOCK_BYTES = 32 * 2**20  # one mapping: small next to any model, large enough for full speed


class SafetensorsStream:
    """`with SafetensorsStream(path) as f: f.read(key)` or `for row0, block in f.blocks(key): ...`.

    Raises ValueError on a malformed header or a tensor that runs past the end of the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            size = os.fstat(self.fd).st_size
            if size < 8:
                raise ValueError(f"{size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", self._pread(8, 0))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes runs past the end of the file ({size} bytes)")
            header = json.loads(self._pread(n, 8))
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
        os.close(self.fd)  # mappings still referenced by tensors stay valid until those are freed

    def _pread(self, n: int, offset: int) -> bytes:
        os.lseek(self.fd, offset, os.SEEK_SET)
        data = os.read(self.fd, n)
        if len(data) != n:
            raise ValueError(f"unexpected end of file at byte {offset + len(data)}")
        return data

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def _map(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the file as a `dtype` tensor of `shape`, backed by a private
        mapping of just those pages (copy-on-write: reading never copies), unmapped once the tensor is freed."""
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self.fd, offset - start + nbytes, access=mmap.ACCESS_COPY, offset=start)
        raw = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset - start)
        if (offset - start) % dtype.itemsize:  # a tensor at an unaligned offset (not written by safetensors)
            raw = raw.clone()
        return raw.view(dtype).view(shape)

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype, in memory of its own."""
        return self.read_as(key, self.dtype(key))

    def mapped(self, key: str) -> torch.Tensor:
        """The whole tensor as a view of the file: its pages count as resident until it is freed."""
        begin, end = self.entries[key]["data_offsets"]
        return self._map(self.start + begin, end - begin, self.dtype(key), self.shape(key))

    def read_as(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor converted to `dtype`, copied block by block (never the whole file view at once)."""
        if len(self.shape(key)) < 2 or not self.shape(key)[0]:
            return self.mapped(key).to(dtype, copy=True)
        out = torch.empty(self.shape(key), dtype=dtype)
        for r0, block in self.blocks(key):
            out[r0:r0 + block.shape[0]] = block
        return out

    def blocks(self, key: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows [r0, r0 + n) of the tensor) in blocks of about `block_bytes`, in the stored dtype,
        as views of the file (read-only in effect: writes stay private); 0-d and 1-d tensors come whole."""
        shape = self.shape(key)
        if len(shape) < 2 or not shape[0]:
            yield 0, self.read(key)
            return
        row_bytes = torch.Size(shape[1:]).numel() * self.dtype(key).itemsize
        rows = min(shape[0], max(1, block_bytes // max(1, row_bytes)))
        base = self.start + self.entries[key]["data_offsets"][0]
        for r0 in range(0, shape[0], rows):
            n = min(rows, shape[0] - r0)
            yield r0, self._map(base + r0 * row_bytes, n * row_bytes, self.dtype(key), (n, *shape[1:]))
