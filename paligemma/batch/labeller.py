"""The per-row work of `paligemma batch`, shared by the local engine and the Ray actors.

    labeller = Labeller(model, processor, PromptSpec(task="detect", objects="car"), batch_size=8)
    ready = [labeller.prepare(item) for item in items]      # decode + preprocess (thread-safe, no model)
    rows = labeller.label(ready)                              # output rows, in the order given

`label` groups the rows by token budget, sorts each group by prompt length and generates each chunk of
`batch_size` as one left-padded batch (`collate`); generation gives every row of a ragged batch the
tokens it gets alone (generation.py), so a row's result does not depend on its neighbours. Anything
wrong with one row (unreadable image, bad prompt, a prompt longer than the context) becomes that row's
`error`; a batch whose generation raises is retried row by row, so only the guilty row fails.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..api import attach_masks, token_budget
from ..errors import InputError, PaliGemmaError
from ..images import as_image, load_image
from ..tasks import TASKS, Task, build_prompt, get_task, parse_output, results_to_json
from .sources import Item

FALLBACK_MAX_TOKENS = 64  # a free-form prompt that names no task (as `paligemma run`)


@dataclass(frozen=True)
class PromptSpec:
    """The prompt for rows that bring none: a literal `prompt`, or a `task` with `objects`/`question`.
    A row's own fields (sources.PROMPT_FIELDS) override these."""

    prompt: str | None = None
    task: str | None = None
    objects: str | None = None
    question: str | None = None
    lang: str = "en"

    def as_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def resolve_prompt(row: dict[str, Any], default: PromptSpec) -> tuple[Task | None, str]:
    """(task to parse the answer with, prompt). A row's `prompt` or `task` replaces the default's; its
    `objects`/`question` fill in the default task. A prompt whose first word names a task is parsed as it."""
    spec = default.as_fields()
    if "prompt" in row or "task" in row:
        spec.pop("prompt", None)
        spec.pop("task", None)
    spec.update(row)
    if spec.get("prompt") is not None:
        prompt = spec["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt must be a non-empty string, got {prompt!r}")
        return TASKS.get(prompt.split(maxsplit=1)[0]), prompt
    task = get_task(spec.get("task") or "caption")
    text = spec.get("question", spec.get("text")) if task.input == "text" else None
    objects = spec.get("objects") if task.input == "objects" else None
    return task, build_prompt(task, lang=spec.get("lang") or "en", text=text, objects=objects)


def open_image(item: Item) -> Image.Image:
    """The item's image, through the package's image loader (paths) or PIL on the bytes; InputError if unusable."""
    if item.path is not None:
        return load_image(item.path)
    try:
        image = as_image(Image.open(io.BytesIO(item.data or b"")))  # the loader's checks, then the decode
        image.load()
    except UnidentifiedImageError:
        raise InputError(f"{item.image}: the bytes are not an image PIL can read (png, jpeg, webp, ...)") from None
    except InputError as e:
        raise InputError(f"{item.image}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{item.image}: image bytes could not be decoded (truncated or corrupt?): {e}") from None
    return ImageOps.exif_transpose(image)


@dataclass
class Prepared:
    """A row ready for the model: its features (batch of one) or the error that stops it."""

    item: Item
    prompt: str | None = None
    task: Task | None = None
    features: dict[str, torch.Tensor] | None = None  # input_ids/attention_mask/token_type_ids [1, T], pixel_values [1, 3, S, S]
    width: int | None = None
    height: int | None = None
    budget: int = 0  # new tokens for this row
    load_s: float = 0.0
    error: str | None = None

    @property
    def length(self) -> int:
        return int(self.features["input_ids"].shape[1]) if self.features is not None else 0


@dataclass
class Labeller:
    """Model + processor + run options; `prepare` one row, `label` a list of prepared rows."""

    model: Any
    processor: Any
    default: PromptSpec = field(default_factory=PromptSpec)
    batch_size: int = 8
    max_tokens: int | None = None  # None: each task's budget, capped to the context
    decoder: Any = None  # segmentation MaskDecoder, or None

    @property
    def context(self) -> int:
        return int(self.model.config.text.max_position_embeddings)

    def prepare(self, item: Item) -> Prepared:
        """Resolve the prompt, open the image, run the processor; never raises on a bad row."""
        start = time.perf_counter()
        row = Prepared(item)
        if item.error is not None:
            row.error = item.error
            return row
        try:
            row.task, row.prompt = resolve_prompt(item.fields, self.default)
            image = open_image(item)
            row.width, row.height = image.size
            row.features = dict(self.processor(text=[row.prompt], images=[image]))
            row.budget = self._budget(row)
        except PaliGemmaError as e:
            row.error, row.features = str(e), None
        row.load_s = time.perf_counter() - start
        return row

    def _budget(self, row: Prepared) -> int:
        wanted = self.max_tokens or (row.task.max_new_tokens if row.task is not None else FALLBACK_MAX_TOKENS)
        length = row.length
        if length + (self.max_tokens or 1) > self.context:
            raise InputError(f"the prompt is {length} tokens (image tokens included) and the model's context is "
                             f"{self.context}" + (f"; with max_tokens={self.max_tokens}" if self.max_tokens else "")
                             + ": shorten the prompt" + (" or ask for fewer tokens" if self.max_tokens else ""))
        return token_budget(self.model, length, wanted)

    # ------------------------------------------------------------------------------ generation
    def label(self, rows: list[Prepared]) -> list[dict[str, Any]]:
        """Output rows (see `output_row`) for `rows`, in the same order."""
        out: dict[int, dict[str, Any]] = {}
        for i, row in enumerate(rows):
            if row.error is not None:
                out[i] = output_row(row)
        for batch in plan_batches([i for i in range(len(rows)) if i not in out], rows, self.batch_size):
            out.update(self._generate(batch, rows))
        return [out[i] for i in range(len(rows))]

    def _generate(self, batch: list[int], rows: list[Prepared]) -> dict[int, dict[str, Any]]:
        chosen = [rows[i] for i in batch]
        start = time.perf_counter()
        try:
            inputs = collate([r.features for r in chosen], self.processor.tokenizer.pad_id)
            ids = self.model.generate(**{k: v.to(self.model.device) for k, v in inputs.items()},
                                      max_new_tokens=chosen[0].budget, do_sample=False)  # [B, n]
        except (PaliGemmaError, RuntimeError) as e:
            if len(batch) > 1:  # find the guilty row: the others still get their answer
                return {i: r for j in batch for i, r in self._generate([j], rows).items()}
            rows[batch[0]].error = f"generation failed: {e}"
            return {batch[0]: output_row(rows[batch[0]])}
        share = (time.perf_counter() - start) / len(batch)
        texts = self.processor.batch_decode(ids)
        counts = new_token_counts(ids, self.model.config.eos_token_ids)
        return {i: self._finish(rows[i], text.strip(), share, len(batch), n)
                for i, text, n in zip(batch, texts, counts)}

    def _finish(self, row: Prepared, text: str, generate_s: float, batch_rows: int, new_tokens: int
                ) -> dict[str, Any]:
        objects, problems = None, []
        parsed = parse_output(row.task, text, row.width, row.height) if row.task is not None else None
        if parsed is not None:
            if self.decoder is not None and row.task.output == "segmentations":
                attach_masks(parsed, self.decoder, row.width, row.height)
            elif row.task.output == "segmentations" and len(parsed):
                parsed.problems.append("masks not decoded: no VQ-VAE weights (pass --vae vae-oid.npz)")
            objects, problems = results_to_json(parsed.objects), list(parsed.problems)
        return output_row(row, text, objects, problems, generate_s, batch_rows, new_tokens)


def new_token_counts(ids: torch.Tensor, eos_ids) -> list[int]:
    """Tokens each row generated, its <eos> included: ids int[B, n] is padded after a row's <eos>."""
    is_eos = torch.isin(ids, torch.tensor(list(eos_ids), device=ids.device))  # [B, n]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(ids[:, 0], ids.shape[1]))  # [B]
    return first.tolist()


def plan_batches(indices: list[int], rows: list[Prepared], batch_size: int) -> list[list[int]]:
    """Chunks of at most `batch_size` rows with the same token budget and neighbouring prompt lengths
    (least padding), in a deterministic order."""
    by_budget: dict[int, list[int]] = {}
    for i in indices:
        by_budget.setdefault(rows[i].budget, []).append(i)
    batches = []
    for budget in sorted(by_budget):
        group = sorted(by_budget[budget], key=lambda i: (rows[i].length, i))
        batches += [group[lo:lo + batch_size] for lo in range(0, len(group), batch_size)]
    return batches


def collate(features: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batches of one -> one left-padded batch, exactly as the processor pads a list of prompts."""
    width = max(int(f["input_ids"].shape[1]) for f in features)
    out = {"input_ids": torch.full((len(features), width), pad_id, dtype=torch.long),  # [B, T]
           "attention_mask": torch.zeros(len(features), width, dtype=torch.long),  # [B, T]
           "token_type_ids": torch.zeros(len(features), width, dtype=torch.long)}  # [B, T]
    for b, f in enumerate(features):
        n = int(f["input_ids"].shape[1])
        for key in out:
            out[key][b, width - n:] = f[key][0]
    out["pixel_values"] = torch.cat([f["pixel_values"] for f in features])  # [B, 3, S, S]
    return out


def output_row(row: Prepared, text: str | None = None, objects: list | None = None, problems: list | None = None,
               generate_s: float | None = None, batch_rows: int | None = None, new_tokens: int | None = None,
               ) -> dict[str, Any]:
    """The output record of one input (the same keys in JSONL and Parquet)."""
    return {
        "id": row.item.id,
        "image": row.item.image,
        "prompt": row.prompt,
        "task": row.task.name if row.task is not None else None,
        "text": text,
        "objects": objects,
        "problems": problems or [],
        "width": row.width,
        "height": row.height,
        "error": row.error,
        "timings": {"load_s": round(row.load_s, 6),
                    "generate_s": None if generate_s is None else round(generate_s, 6),
                    "batch_rows": batch_rows, "new_tokens": new_tokens},
    }
