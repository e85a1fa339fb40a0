"""`paligemma batch`: label a folder or a dataset with a PaliGemma model, resumable, locally or on Ray Data.

    from paligemma.batch import run_batch
    run_batch("photos/", "labels.jsonl", task="caption")                      # the shipped model by default
    run_batch("data.parquet", "boxes.parquet", model="ckpt/", task="detect", objects="car", engine="ray")

Modules: sources.py (folder / JSONL / Parquet inputs with stable ids), labeller.py (prompts, preprocessing,
batching by prompt length, generation, parsing: the per-row work both engines share), sinks.py (crash-safe
JSONL / Parquet writers, COCO export), runner.py (the local engine, `run_batch`), ray_engine.py (Ray Data),
cli.py (the `batch` subcommand). docs/BATCH.md has the output format and the multi-node recipe.
"""

from .labeller import Labeller, PromptSpec
from .runner import BatchSummary, run_batch
from .sources import Columns, open_source

__all__ = ["run_batch", "BatchSummary", "Labeller", "PromptSpec", "Columns", "open_source"]
