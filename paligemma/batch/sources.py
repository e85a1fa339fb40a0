"""Inputs of `paligemma batch`: a folder of images, a JSONL file or a Parquet file, as a stream of `Item`s.

Every source yields items in a stable order (a folder: sorted relative paths; a file: its line / row
order), each with an `id` that keys it in the output (so a rerun can skip it):
    folder   id = the image's path relative to the folder (posix), e.g. "cats/001.jpg"
    JSONL    {"image": "imgs/a.png", "prompt": "caption en"} or {"image": ..., "task": "detect",
             "objects": "car ; dog"} (or "question"), optional "id"; relative paths resolve against the
             JSONL file's folder; default id = the image path as written
    Parquet  an image column holding bytes, a path, or a {"bytes", "path"} struct (the Hugging Face
             `datasets` Image layout); optional prompt/task/objects/question/id columns; default id =
             the path, or "row-N" for bytes
A default id seen again gets "#2", "#3", ... (the same image with two prompts). A bad line or row (not
JSON, no image, a duplicate explicit id) becomes an item with `error` set, naming the line, so it fails
its own row and never the run. Images are not opened here: that happens in the runner's background worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PROMPT_FIELDS = ("prompt", "task", "objects", "question", "text", "lang")  # per-row prompt fields


@dataclass
class Item:
    """One input row. `path` or `data` (encoded image bytes) says where the image is; `fields` holds the
    row's own prompt fields (see PROMPT_FIELDS); `error` is set when the row itself is unusable."""

    index: int  # position in the source (0-based)
    id: str
    image: str  # the reference shown in the output: relative path as given, or "row N of FILE"
    path: str | None = None
    data: bytes | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (no bytes), for shipping items to Ray workers."""
        return {"index": self.index, "id": self.id, "image": self.image, "path": self.path,
                "fields": self.fields, "error": self.error}


@dataclass
class Columns:
    """Column (JSONL key) names for the image, the per-row prompt and the id."""

    image: str = "image"
    prompt: str = "prompt"
    id: str = "id"


class Source:
    """An input: `len(source)` rows, iterated as `Item`s in a stable order."""

    def __init__(self, path: Path, kind: str, count: int):
        self.path, self.kind, self._count = path, kind, count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Item]:
        raise NotImplementedError


def open_source(path: str | os.PathLike, columns: Columns | None = None) -> Source:
    """The source at `path`: a directory, a `.jsonl`/`.json` file or a `.parquet` file."""
    path = Path(path).expanduser()
    columns = columns or Columns()
    if not path.exists():
        raise InputError(f"input {path} does not exist; pass a folder of images, a .jsonl or a .parquet file")
    if path.is_dir():
        return FolderSource(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return JsonlSource(path, columns)
    if suffix in (".parquet", ".pq"):
        return ParquetSource(path, columns)
    raise InputError(f"input {path}: unknown kind {suffix!r}; pass a folder of images, a .jsonl or a .parquet file")


class _Ids:
    """Makes default ids unique ("a.png", "a.png#2", ...) and reports duplicate explicit ids."""

    def __init__(self):
        self.seen: dict[str, int] = {}

    def default(self, key: str) -> str:
        n = self.seen.get(key, 0) + 1
        self.seen[key] = n
        return key if n == 1 else f"{key}#{n}"

    def explicit(self, key: str, where: str) -> tuple[str, str | None]:
        """(id, error): a repeated explicit id keeps its row (failed) under "id#N"."""
        n = self.seen.get(key, 0) + 1
        self.seen[key] = n
        if n == 1:
            return key, None
        return f"{key}#{n}", f"{where}: duplicate id {key!r}; give every row its own id"


# ------------------------------------------------------------------------------------------- folder
class FolderSource(Source):
    def __init__(self, root: Path):
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise InputError(f"input folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
        super().__init__(root, "folder", len(files))
        self.files = files

    def __iter__(self) -> Iterator[Item]:
        for i, rel in enumerate(self.files):
            yield Item(i, rel, rel, path=str(self.path / rel))


# -------------------------------------------------------------------------------------------- JSONL
def _row_item(index: int, row: dict, columns: Columns, root: Path, ids: _Ids, where: str,
              default_id: str | None = None) -> Item:
    """An Item from one JSON object / Parquet row (image as a path, bytes or {"bytes", "path"})."""
    image = row.get(columns.image)
    data = None
    if isinstance(image, dict):  # Hugging Face datasets' Image feature
        data, image = image.get("bytes"), image.get("path")
    if isinstance(image, (bytes, bytearray)):
        data, image = bytes(image), None
    fields = {k: row[k] for k in PROMPT_FIELDS if row.get(k) is not None}
    if columns.prompt != "prompt":
        fields.pop("prompt", None)
        if row.get(columns.prompt) is not None:
            fields["prompt"] = row[columns.prompt]
    ref = str(image) if image else (default_id or where)
    explicit = row.get(columns.id)
    error = None
    if explicit is not None and str(explicit) != "":
        item_id, error = ids.explicit(str(explicit), where)
    else:
        item_id = ids.default(ref)
    if image is None and not data:
        error = error or f"{where}: no image (expected a path or image bytes under {columns.image!r})"
        return Item(index, item_id, ref, fields=fields, error=error)
    if image is not None and not isinstance(image, str):
        return Item(index, item_id, ref, fields=fields,
                    error=f"{where}: {columns.image!r} is a {type(image).__name__}, expected a path or bytes")
    path = None if data else str(image if os.path.isabs(image) else root / image)
    return Item(index, item_id, ref, path=path, data=data, fields=fields, error=error)


class JsonlSource(Source):
    def __init__(self, path: Path, columns: Columns):
        with open(path, "rb") as f:
            count = sum(1 for line in f if line.strip())
        if count == 0:
            raise InputError(f"input {path} has no lines; each line is a JSON object with an {columns.image!r} path")
        super().__init__(path, "jsonl", count)
        self.columns = columns

    def __iter__(self) -> Iterator[Item]:
        ids, root, index = _Ids(), self.path.parent, 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.path.name} line {number}"
                yield self._item(index, line, root, ids, where, number)
                index += 1

    def _item(self, index: int, line: str, root: Path, ids: _Ids, where: str, number: int) -> Item:
        try:
            row = json.loads(line)
        except ValueError as e:
            return Item(index, ids.default(f"line-{number}"), f"line {number}",
                        error=f"{where}: not valid JSON ({e})")
        if not isinstance(row, dict):
            return Item(index, ids.default(f"line-{number}"), f"line {number}",
                        error=f"{where}: expected a JSON object, got {type(row).__name__}")
        return _row_item(index, row, self.columns, root, ids, where, default_id=f"line-{number}")


# ------------------------------------------------------------------------------------------ Parquet
def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet input needs pyarrow: pip install 'paligemma[parquet]'") from None
    return pq


class ParquetSource(Source):
    BATCH_ROWS = 256  # rows read at a time: image bytes are never all in memory

    def __init__(self, path: Path, columns: Columns):
        pq = _pyarrow_parquet()
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a broken file
            raise InputError(f"input {path} is not a readable Parquet file: {e}") from None
        names = self.file.schema_arrow.names
        if columns.image not in names:
            raise InputError(f"input {path} has no image column {columns.image!r} (columns: {', '.join(names)}); "
                             "name it with --image-column")
        self.wanted = [c for c in {columns.image, columns.prompt, columns.id, *PROMPT_FIELDS} if c in names]
        super().__init__(path, "parquet", self.file.metadata.num_rows)
        self.columns = columns

    def __iter__(self) -> Iterator[Item]:
        ids, index = _Ids(), 0
        for batch in self.file.iter_batches(batch_size=self.BATCH_ROWS, columns=self.wanted):
            for row in batch.to_pylist():
                where = f"{self.path.name} row {index}"
                yield _row_item(index, row, self.columns, self.path.parent, ids, where, default_id=f"row-{index}")
                index += 1
