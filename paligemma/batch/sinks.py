"""Outputs of `paligemma batch`: crash-safe JSONL and Parquet writers that resume, and the COCO export.

A run may be killed at any moment (SIGKILL included); rerun with the same output, it skips every id
already written and ends with each input exactly once. How each format gets there:

JSONL (`out.jsonl`): rows are appended as whole lines (one write of complete lines per checkpoint),
    then flushed and fsync'ed. The only damage a kill can leave is a torn last line (no newline); on
    resume it is cut off (and said so) and its rows are redone. Any other unreadable line is not ours:
    the run stops and names it.
Parquet (`out.parquet`): each checkpoint writes a shard `out.parquet.parts/part-NNNNNN.parquet` under a
    temporary name, fsyncs it and renames it into place, so a shard is whole or absent. When the run
    ends, the shards and any previous `out.parquet` are assembled into one file the same way (temporary
    name, fsync, rename) and the shard folder is removed. `out.parquet` is therefore always a complete
    file: of the previous finished run until the new one finishes. Until then the rows live in the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def open_sink(path: str | os.PathLike):
    """The writer for `path`, chosen by its extension; it knows the ids already written (`.done`)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise InputError(f"output {path} is a directory; name a .jsonl or .parquet file")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first")
    if suffix in JSONL_SUFFIXES:
        return JsonlSink(path)
    if suffix in PARQUET_SUFFIXES:
        return ParquetSink(path)
    raise InputError(f"output {path}: unknown format {suffix!r}; name a .jsonl or .parquet file")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------- JSONL
class JsonlSink:
    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        self.repaired = 0  # bytes of a torn last line cut off on open
        if path.exists():
            self._recover()
        self.file = open(path, "a", encoding="utf-8")

    def _recover(self) -> None:
        """Read the ids written so far; cut off a torn last line (a kill in the middle of a write)."""
        good_end = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    break
                self.done.add(_row_id(line, self.path, number))
                good_end += len(line)
        size = self.path.stat().st_size
        if size > good_end:
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
            self.repaired = size - good_end
            print(f"note: {self.path}: cut off a torn last line ({self.repaired} bytes) left by an interrupted run; "
                  "its rows are redone", file=sys.stderr)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.done.update(r["id"] for r in rows)

    def checkpoint(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if not self.file.closed:
            self.checkpoint()
            self.file.close()

    def rows(self) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _row_id(line: bytes, path: Path, number: int) -> str:
    try:
        row = json.loads(line)
        return str(row["id"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"output {path} line {number} is not a row written by `paligemma batch`; "
                         "use a new output file or remove that line") from None


# ------------------------------------------------------------------------------------------ Parquet
def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet output needs pyarrow: pip install 'paligemma[parquet]'") from None
    return pa, pq


def row_schema():
    """The Arrow schema of an output row (batch.labeller.output_row)."""
    pa, _ = _arrow()
    ints = pa.list_(pa.int64())
    obj = pa.struct([("label", pa.string()), ("box", pa.list_(pa.float64())), ("loc", ints), ("score", pa.float64()),
                     ("seg_tokens", ints), ("mask", pa.struct([("size", ints), ("counts", ints)]))])
    timings = pa.struct([("load_s", pa.float64()), ("generate_s", pa.float64()), ("batch_rows", pa.int64()),
                         ("new_tokens", pa.int64())])
    return pa.schema([("id", pa.string()), ("image", pa.string()), ("prompt", pa.string()), ("task", pa.string()),
                      ("text", pa.string()), ("objects", pa.list_(obj)), ("problems", pa.list_(pa.string())),
                      ("width", pa.int64()), ("height", pa.int64()), ("error", pa.string()), ("timings", timings)])


class ParquetSink:
    def __init__(self, path: Path):
        _arrow()
        self.path = path
        self.parts = path.with_name(path.name + ".parts")
        self.pending: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self.repaired = 0
        self.next_part = 0
        self._recover()

    def _recover(self) -> None:
        _, pq = _arrow()
        files = ([self.path] if self.path.exists() else []) + self._part_files()
        for f in files:
            try:
                self.done.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
            except Exception as e:  # pyarrow's errors: not a Parquet file, no `id` column
                raise InputError(f"output {f} is not a file written by `paligemma batch` ({e}); "
                                 "use a new output name or remove it") from None
        if self.parts.is_dir():
            for tmp in self.parts.glob("*.tmp"):  # a shard a kill interrupted: its rows are redone
                tmp.unlink()
                self.repaired += 1
        self.next_part = len(self._part_files()) and 1 + max(int(p.stem.split("-")[1]) for p in self._part_files())

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.pending += rows
        self.done.update(r["id"] for r in rows)

    def checkpoint(self) -> None:
        if not self.pending:
            return
        pa, _ = _arrow()
        self.parts.mkdir(exist_ok=True)
        _write_atomic(pa.Table.from_pylist(self.pending, schema=row_schema()),
                      self.parts / f"part-{self.next_part:06d}.parquet")
        self.next_part += 1
        self.pending = []

    def close(self) -> None:
        """Checkpoint, then assemble the previous file and the shards into `path` and drop the shards."""
        self.checkpoint()
        parts = self._part_files()
        if not parts:
            return
        pa, pq = _arrow()
        tables = [pq.read_table(self.path)] if self.path.exists() else []
        seen = set(tables[0].column("id").to_pylist()) if tables else set()
        for part in parts:  # a shard already in `path` (killed between the rename and the cleanup) is skipped
            table = pq.read_table(part)
            if not seen.intersection(table.column("id").to_pylist()):
                tables.append(table)
        _write_atomic(pa.concat_tables([t.cast(row_schema()) for t in tables]), self.path)
        shutil.rmtree(self.parts)

    def rows(self) -> Iterator[dict[str, Any]]:
        _, pq = _arrow()
        for f in ([self.path] if self.path.exists() else []) + self._part_files():
            yield from pq.read_table(f).to_pylist()


def _write_atomic(table, path: Path) -> None:
    """Write to PATH.tmp, fsync, rename over PATH, fsync the folder: readers see the old file or the new one."""
    _, pq = _arrow()
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------- COCO
def write_coco(rows: Iterator[dict[str, Any]], path: str | os.PathLike) -> dict[str, int]:
    """A COCO-style annotations file from output rows with objects (detect/segment): images, categories
    (one per label), annotations with `bbox` [x, y, w, h] in pixels and `segmentation` as uncompressed RLE
    where a mask was decoded. Written atomically. Returns the counts."""
    images, annotations, categories = [], [], {}
    for row in rows:
        if row.get("error") is not None or row.get("objects") is None:  # failed, or a text task
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": row["image"], "width": row["width"], "height": row["height"],
                       "paligemma_id": row["id"]})
        for obj in row.get("objects") or []:
            category = categories.setdefault(obj["label"], len(categories) + 1)
            x0, y0, x1, y1 = obj["box"]
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                   "bbox": [x0, y0, round(x1 - x0, 3), round(y1 - y0, 3)], "area": round((x1 - x0) * (y1 - y0), 3),
                   "iscrowd": 0}
            if obj.get("mask") is not None:
                ann["segmentation"] = obj["mask"]
                ann["area"] = int(sum(obj["mask"]["counts"][1::2]))  # runs alternate 0s and 1s, 0s first
            annotations.append(ann)
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": i, "name": name} for name, i in categories.items()]}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories)}
