"""The Ray Data engine of `paligemma batch` (`--engine ray`, `pip install 'paligemma[ray]'`).

The pipeline is Ray Data's batch-inference shape:
    ray.data.from_items(rows to do)                        # id, image reference, path or bytes, prompt fields
      .map_batches(RayLabeller, concurrency=N, num_cpus=C, num_gpus=G, batch_size=W)   # model loaded once per actor
      .iter_batches() on the driver -> the same crash-safe writer as the local engine (sinks.py)
`RayLabeller` wraps the local engine's `Labeller`, so a row gets exactly the local engine's result.
The rows are listed on the driver (so ids and resume work as locally) and the output is written by the
driver (one resumable file, no shared storage needed for it); the images are opened on the actors, so
their paths must resolve there (see docs/BATCH.md for clusters). Parquet image bytes travel through Ray's
object store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ..errors import InputError
from .sources import Item


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--engine ray needs Ray Data: pip install 'paligemma[ray]'") from None
    return ray


class RayLabeller:
    """Ray Data callable class: `__init__` loads the model once per actor; `__call__` maps a pyarrow batch
    of {"item": JSON, "data": image bytes} to {"row": JSON output row}."""

    def __init__(self, options: dict[str, Any], threads: int = 1):
        import torch

        from ..api import get_mask_decoder
        from ..loading import load
        from .labeller import Labeller

        torch.set_num_threads(max(1, threads))
        model, processor = load(options["model"], dtype=options["dtype"], device=options["device"],
                                quantize=options["quantize"])
        decoder = get_mask_decoder(options["vae"]) if options["vae"] else None
        self.labeller = Labeller(model, processor, options["spec"], options["batch_size"], options["max_tokens"],
                                 decoder)

    def __call__(self, batch):
        import pyarrow as pa

        items = [Item(**json.loads(meta), data=data or None)
                 for meta, data in zip(batch.column("item").to_pylist(), batch.column("data").to_pylist())]
        rows = self.labeller.label([self.labeller.prepare(item) for item in items])
        return pa.table({"row": [json.dumps(r, ensure_ascii=False) for r in rows]})


def per_actor_cpus(num_cpus: float | None, concurrency: int) -> float:
    """CPUs per actor: as given, else this machine's cores shared among the actors."""
    return num_cpus if num_cpus else max(1, (os.cpu_count() or 1) // concurrency)


def ray_rows(items: list[Item], options: dict[str, Any], *, ray_address: str | None, concurrency: int,
             num_cpus: float | None, num_gpus: float, window: int) -> Iterator[list[dict[str, Any]]]:
    """Windows of output rows for `items`, computed by `concurrency` Ray actors. Connects to `ray_address`,
    or to the Ray already running in this process, or starts a local one sized for the actors."""
    ray = import_ray()
    cpus = per_actor_cpus(num_cpus, concurrency)
    started = not ray.is_initialized()
    if started:
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=int(max(1, cpus * concurrency)), num_gpus=int(num_gpus * concurrency) or None,
                     include_dashboard=False)
    try:
        if items:
            yield from _pipeline(ray, items, options, concurrency, cpus, num_gpus, window)
    finally:
        if started:
            ray.shutdown()


def _pipeline(ray, items, options, concurrency, cpus, num_gpus, window) -> Iterator[list[dict[str, Any]]]:
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts the rows
    records = [{"item": json.dumps(item.to_dict()), "data": item.data or b""} for item in items]
    ds = ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // window)))
    ds = ds.map_batches(RayLabeller, fn_constructor_kwargs={"options": options, "threads": int(cpus)},
                        batch_size=window, batch_format="pyarrow", concurrency=concurrency, num_cpus=cpus,
                        num_gpus=num_gpus or None)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield [json.loads(s) for s in batch.column("row").to_pylist()]
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e
        raise InputError(f"the Ray pipeline failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}") \
            from None
