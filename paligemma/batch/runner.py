"""The local engine of `paligemma batch` and the Python API, `run_batch`.

    from paligemma.batch import run_batch
    summary = run_batch("photos/", "labels.jsonl", task="detect", objects="car ; person", batch_size=8)
    print(summary)          # done 1200, skipped 0, failed 3 in 412.0 s (2.9 images/s) -> labels.jsonl

A background thread reads the input, opens each image and runs the processor (`Labeller.prepare`)
while the main thread generates; rows are taken in windows of `WINDOW_BATCHES * batch_size`, labelled
(`Labeller.label`: batched by token budget and prompt length), appended to the output and checkpointed
(flush + fsync, or a shard renamed into place), so a kill loses at most the window in flight and a rerun
skips every id already written. `engine="ray"` runs the same `Labeller` on Ray actors (ray_engine.py).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import SHAPES_TINY
from ..errors import InputError, PaliGemmaError
from ..tasks import TASKS, get_task
from .labeller import Labeller, PromptSpec, resolve_prompt
from .sinks import open_sink, write_coco
from .sources import Columns, Source, open_source

WINDOW_BATCHES = 4  # batches per window: the unit of reordering by length and of checkpointing
QUEUE_WINDOWS = 2  # prepared rows the reader may run ahead, in windows
COCO_TASKS = (TASKS["detect"], TASKS["segment"])  # tasks whose rows go into the COCO export


@dataclass
class BatchSummary:
    """What a run did: rows labelled now (`done`, of which `failed` have an error), already in the output
    (`skipped`), wall time."""

    done: int
    skipped: int
    failed: int
    seconds: float
    output: Path
    coco: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        coco = f" (COCO: {self.coco})" if self.coco else ""
        return (f"done {self.done}, skipped {self.skipped}, failed {self.failed} in {self.seconds:.1f} s "
                f"({self.images_per_s:.2f} images/s) -> {self.output}{coco}")


def run_batch(input: str | os.PathLike, output: str | os.PathLike, model: Any = SHAPES_TINY, processor: Any = None,
              *, prompt: str | None = None, task: str | None = None, objects: str | None = None,
              question: str | None = None, lang: str = "en", batch_size: int = 8, max_tokens: int | None = None,
              vae: Any = None, columns: Columns | None = None, coco: bool = False, progress: bool = True,
              engine: str = "local", dtype: Any = None, device: Any = None, quantize: str | None = "auto",
              adapter: str | os.PathLike | None = None, ray_address: str | None = None, concurrency: int = 1, num_cpus: float | None = None,
              num_gpus: float = 0) -> BatchSummary:
    """Label every image of `input` (folder, .jsonl, .parquet) into `output` (.jsonl or .parquet), resuming
    from what `output` already holds. `model`: a checkpoint directory, or a loaded model with its `processor`
    (local engine only). The prompt for rows that bring none: `prompt`, or `task` with `objects`/`question`.
    `adapter`: a LoRA adapter directory applied over `model` (`paligemma.load(adapter=)`).
    `vae`: mask decoder weights for segmentation. `coco`: also write OUTPUT.coco.json. `engine="ray"` with
    `ray_address`/`concurrency`/`num_cpus`/`num_gpus` (per actor) runs on Ray Data."""
    spec = PromptSpec(prompt=prompt, task=task, objects=objects, question=question, lang=lang)
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise InputError(f"batch_size and max_tokens must be at least 1, got {batch_size} and {max_tokens}")
    if engine not in ("local", "ray"):
        raise InputError(f"engine must be 'local' or 'ray', got {engine!r}")
    if concurrency < 1 or (num_cpus is not None and num_cpus <= 0) or num_gpus < 0:
        raise InputError(f"concurrency must be at least 1, num_cpus above 0 and num_gpus at least 0, got "
                         f"{concurrency}, {num_cpus} and {num_gpus}")
    source = open_source(input, columns)
    check_default_prompt(spec, per_row=source.kind != "folder")
    if coco and source.kind == "folder" and resolve_prompt({}, spec)[0] not in COCO_TASKS:
        raise InputError("the COCO export (--format coco) needs --task detect or segment: a folder's rows "
                         f"all use the prompt {resolve_prompt({}, spec)[1]!r}, which gives no boxes")
    sink = open_sink(output)
    try:
        counts = _run(engine, source, sink, spec, model, processor, batch_size, max_tokens, vae, dtype, device,
                      quantize, adapter, progress, dict(ray_address=ray_address, concurrency=concurrency,
                                               num_cpus=num_cpus, num_gpus=num_gpus))
    except BaseException:
        with contextlib.suppress(OSError):  # keep what was checkpointed; the first error is the one to see
            sink.close()
        raise
    _close(sink)
    summary = BatchSummary(counts["done"], counts["skipped"], counts["failed"], counts["seconds"],
                           Path(output))
    if coco:
        summary.coco = Path(output).with_suffix(".coco.json")
        write_coco(sink.rows(), summary.coco)
    return summary


def _run(engine, source, sink, spec, model, processor, batch_size, max_tokens, vae, dtype, device, quantize,
         adapter, progress, ray_options) -> dict[str, Any]:
    """Label what `sink` does not hold yet with the chosen engine: counts done/skipped/failed and seconds."""
    start = time.perf_counter()
    if engine == "ray":
        from .ray_engine import ray_rows

        if not isinstance(model, (str, os.PathLike)):
            raise InputError("engine='ray' loads the model on each actor: pass model as a checkpoint directory")
        options = dict(model=str(model), dtype=dtype, device=device, quantize=quantize, spec=spec, adapter=adapter,
                       batch_size=batch_size, max_tokens=max_tokens, vae=None if vae is None else str(vae))
        skipped, todo = _split_done(source, sink, spec)
        rows = ray_rows(todo, options, window=WINDOW_BATCHES * batch_size, **ray_options)
        counts = _drain(rows, sink, _bar(len(todo), progress))
        counts["skipped"] = skipped
    else:
        labeller = _local_labeller(model, processor, spec, batch_size, max_tokens, vae, dtype, device, quantize,
                                   adapter)
        counts = _run_local(source, sink, labeller, progress)
    counts["seconds"] = time.perf_counter() - start
    return counts


def check_default_prompt(spec: PromptSpec, per_row: bool) -> None:
    """A bad default prompt fails now, not on every row: conflicting or ignored fields (a prompt with
    objects, objects for a caption), a bad task. With per-row fields (JSONL, Parquet), a task's objects or
    question may come from the rows."""
    fields = spec.as_fields()
    try:
        resolve_prompt(fields, PromptSpec())
    except InputError:
        if not per_row or spec.prompt is not None:
            raise
        task = get_task(spec.task or "caption")
        missing = {"objects": {"objects": "x"}, "text": {"question": "x"}}.get(task.input or "", {})
        resolve_prompt({**missing, **fields}, PromptSpec())


def _local_labeller(model, processor, spec, batch_size, max_tokens, vae, dtype, device, quantize,
                    adapter=None) -> Labeller:
    from ..api import get_mask_decoder

    decoder = get_mask_decoder(vae) if vae is not None else None  # a missing file fails before the model loads
    if isinstance(model, (str, os.PathLike)):
        from ..loading import load

        model, processor = load(model, dtype=dtype, device=device, quantize=quantize, adapter=adapter)
    elif adapter is not None:
        raise InputError("adapter= goes with a checkpoint directory; apply it to a loaded model with "
                         "paligemma.lora.load_adapter(model, dir)")
    elif processor is None:
        raise InputError("a loaded model needs its processor: run_batch(..., model=model, processor=processor)")
    return Labeller(model, processor, spec, batch_size, max_tokens, decoder)


def _split_done(source: Source, sink, spec: PromptSpec) -> tuple[int, list]:
    """(rows already in the output, the items still to do)."""
    todo = [item for item in source if not already_done(item, sink, spec)]
    return len(source) - len(todo), todo


def already_done(item, sink, spec: PromptSpec) -> bool:
    """Whether the output holds the item's row. Raises InputError when that row was made with another
    prompt than this run would use (a rerun with another task into the same output would mix them)."""
    if item.id not in sink.done:
        return False
    written = sink.done[item.id]
    if written is not None and item.error is None:
        try:
            _, prompt = resolve_prompt(item.fields, spec)
        except InputError:
            return True
        if prompt != written:
            raise InputError(f"output {sink.path} already has row {item.id!r} made with the prompt {written!r}, "
                             f"but this run asks {prompt!r}: rerun with the same prompt to resume, or use a "
                             "new output file")
    return True


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool):
    """tqdm's bar (images/s, ETA) on stderr; nothing when off or when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="img", desc="batch", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)


def _close(sink) -> None:
    """Close the sink (a Parquet output is assembled now) and release the output's lock."""
    try:
        sink.close()
    except OSError as e:
        raise PaliGemmaError(f"finishing {sink.path} failed: {e.strerror or e}; fix that and rerun the same "
                             "command to finish") from None


def _drain(windows: Iterable[list[dict[str, Any]]], sink, bar) -> dict[str, int]:
    """Write each window of output rows and checkpoint it (the caller closes the sink)."""
    counts = {"done": 0, "failed": 0, "skipped": 0}
    try:
        for rows in windows:
            try:
                sink.write(rows)
                sink.checkpoint()
            except OSError as e:  # a full disk, a removed folder: what was checkpointed stays
                raise PaliGemmaError(f"writing {sink.path} failed: {e.strerror or e}; fix that and rerun the "
                                     "same command to resume") from None
            counts["done"] += len(rows)
            counts["failed"] += sum(r["error"] is not None for r in rows)
            bar.update(len(rows))
    finally:
        bar.close()
    return counts


def _run_local(source: Source, sink, labeller: Labeller, progress: bool) -> dict[str, int]:
    window = WINDOW_BATCHES * labeller.batch_size
    reader = _Reader(source, sink, labeller, window * QUEUE_WINDOWS)
    reader.start()
    try:
        bar = _bar(max(0, len(source) - len(sink.done)), progress)
        counts = _drain((labeller.label(rows) for rows in reader.windows(window)), sink, bar)
    finally:
        reader.stop()
    counts["skipped"] = reader.skipped
    return counts


class _Done:
    """A copy of what the output held at the start, for the reader thread (the sink's `done` grows meanwhile)."""

    def __init__(self, sink):
        self.path, self.done = sink.path, dict(sink.done)


class _Reader(threading.Thread):
    """Background worker: items not yet done -> `labeller.prepare` (image decode + processor) -> a bounded queue."""

    _END = object()

    def __init__(self, source: Source, sink, labeller: Labeller, ahead: int):
        super().__init__(daemon=True, name="batch-reader")
        self.source, self.done, self.labeller = source, _Done(sink), labeller
        self.queue: queue.Queue = queue.Queue(maxsize=ahead)
        self.halt = threading.Event()
        self.skipped = 0

    def run(self) -> None:
        try:
            for item in self.source:
                if already_done(item, self.done, self.labeller.default):
                    self.skipped += 1
                    continue
                if not self._put(self.labeller.prepare(item)):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the main thread, which raises it
            self._put(e)

    def _put(self, value) -> bool:
        while not self.halt.is_set():
            try:
                self.queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def windows(self, size: int) -> Iterator[list]:
        rows: list = []
        while True:
            value = self.queue.get()
            if isinstance(value, BaseException):
                raise value
            if value is self._END:
                break
            rows.append(value)
            if len(rows) == size:
                yield rows
                rows = []
        if rows:
            yield rows

    def stop(self) -> None:
        self.halt.set()
