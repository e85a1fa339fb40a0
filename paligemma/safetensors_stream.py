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
import math
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from .checks import regular_file
from .errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
BLOCK_BYTES = 32 * 2**20  # one mapping: small next to any model, large enough for full speed
MAX_HEADER_BYTES = 100_000_000  # the official library's cap (safetensors::tensor::MAX_HEADER_SIZE)


class HeaderError(CheckpointError, ValueError):
    """A safetensors file whose header the official library would refuse (or that is not a regular file)."""


class SafetensorsStream:
    """`with SafetensorsStream(path) as f: f.read(key)` or `for row0, block in f.blocks(key): ...`.

    The header is checked as the official library checks it (`Metadata::validate`): at most 100 MB of
    JSON object; per tensor a known dtype, a shape of non-negative ints, integer `data_offsets`
    [begin, end] with begin <= end and end - begin == numel * itemsize; the tensors, in offset order,
    tile the data section exactly (contiguous, non-overlapping, from byte 0 to the end of the file).
    Raises `HeaderError` (a CheckpointError and a ValueError) naming the file, tensor, field and value.
    Non-regular files (FIFO, device, directory) are refused before they are opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        regular_file(self.path, "safetensors file", HeaderError)
        # O_NONBLOCK: had the path been swapped for a FIFO since the check, open() must still not block
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise HeaderError(f"{self.path} is not a regular file")
            self.entries, self.start = self._read_header(st.st_size)
        except BaseException:
            os.close(self.fd)
            raise

    def _fail(self, message: str) -> HeaderError:
        return HeaderError(f"{self.path}: {message}; the file is truncated or corrupt (download it again)")

    def _read_header(self, size: int) -> tuple[dict, int]:
        if size < 8:
            raise self._fail(f"{size} bytes is too short for a safetensors file (8-byte header length first)")
        (n,) = struct.unpack("<Q", self._pread(8, 0))
        if n > MAX_HEADER_BYTES:
            raise self._fail(f"header length {n:,} bytes; the format allows at most {MAX_HEADER_BYTES:,}")
        if n > size - 8:
            raise self._fail(f"header of {n:,} bytes runs past the end of the file ({size:,} bytes)")
        try:
            header = json.loads(self._pread(n, 8).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._fail(f"the header is not UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail(f"the header is a JSON {type(header).__name__}, expected an object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise self._fail(f"__metadata__ is a {type(meta).__name__}, expected an object of strings")
        data_bytes = size - 8 - n
        spans = sorted((self._check_entry(key, e, data_bytes), key) for key, e in header.items())
        covered = 0
        for (begin, end), key in spans:
            if begin != covered:
                what = "overlaps the previous tensor" if begin < covered else "leaves a gap after the previous tensor"
                raise self._fail(f"tensor {key!r}: data_offsets begin at {begin}, expected {covered} ({what}); "
                                 "tensors must be contiguous and non-overlapping")
            covered = end
        if covered != data_bytes:
            raise self._fail(f"the tensors cover {covered:,} bytes of a {data_bytes:,}-byte data section; "
                             "expected the data section to be covered exactly")
        return header, 8 + n

    def _check_entry(self, key: str, e, data_bytes: int) -> tuple[int, int]:
        if not isinstance(e, dict):
            raise self._fail(f"tensor {key!r}: entry is a {type(e).__name__}, expected an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"tensor {key!r}: dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._fail(f"tensor {key!r}: shape={str(shape)[:80]}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise self._fail(f"tensor {key!r}: data_offsets={str(offsets)[:80]}; expected two integers "
                             "0 <= begin <= end")
        if offsets[1] > data_bytes:
            raise self._fail(f"tensor {key!r} runs past the end of the file: data_offsets end at {offsets[1]:,}, "
                             f"the data section holds {data_bytes:,} bytes")
        numel = math.prod(shape)
        if numel * DTYPES[dtype].itemsize != offsets[1] - offsets[0]:
            raise self._fail(f"tensor {key!r}: data_offsets span {offsets[1] - offsets[0]:,} bytes, but shape "
                             f"{shape} of {dtype} needs {numel * DTYPES[dtype].itemsize:,}")
        return offsets[0], offsets[1]

    def __enter__(self) -> "SafetensorsStream":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # mappings still referenced by tensors stay valid until those are freed

    def _pread(self, n: int, offset: int) -> bytes:
        os.lseek(self.fd, offset, os.SEEK_SET)
        data = os.read(self.fd, n)
        if len(data) != n:
            raise self._fail(f"unexpected end of file at byte {offset + len(data)}")
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
