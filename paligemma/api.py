"""High-level task functions: caption, describe, ocr, answer, detect, segment, and `run_task`.

They use only the public core API (docs/INTERFACES.md), the way transformers users call PaliGemma:
    batch = processor(text=[prompt], images=[image])
    ids = model.generate(**batch, max_new_tokens=n, do_sample=False)   # generated ids only
    text = processor.batch_decode(ids)[0]      # keeps <locNNNN>/<segNNN> (docs/DESIGN.md, tokenizer)
then parse the answer with `tasks.parse_*` and, for `segment`, decode masks with the VQ-VAE decoder.
Detections come back as a `tasks.ParseResult`: a list of `Detection` plus `.problems`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .errors import InputError
from .images import ImageLike, as_image
from .segmentation import MaskDecoder, load_mask_decoder, paste_mask
from .tasks import Detection, ParseResult, Task, build_prompt, get_task, parse_output, results_to_json

VaeLike = MaskDecoder | str | os.PathLike | None


@dataclass
class TaskResult:
    """What one task run produced: the prompt, the raw decoded text, parsed objects (detect/segment)."""

    task: str
    prompt: str
    text: str  # decoded generation, loc/seg tokens kept, surrounding whitespace stripped
    objects: list[Detection] | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self, include_masks: bool = True) -> dict[str, Any]:
        return {
            "task": self.task,
            "prompt": self.prompt,
            "text": self.text,
            "objects": None if self.objects is None else results_to_json(self.objects, include_masks),
            "problems": list(self.problems),
        }


def _model_device(model: Any):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def token_budget(model: Any, prompt_len: int, wanted: int) -> int:
    """`wanted` new tokens, or what the model's context leaves after the prompt when that is less (at
    least 1: a prompt that fills the context still gets generate()'s error naming the problem)."""
    limit = getattr(getattr(getattr(model, "config", None), "text", None), "max_position_embeddings", None)
    return wanted if not isinstance(limit, int) else max(1, min(wanted, limit - prompt_len))


def generate_text(model: Any, processor: Any, image: Image.Image, prompt: str, max_new_tokens: int | None,
                  default_budget: int = 64) -> str:
    """One greedy generation for one image; returns the decoded new text (loc/seg tokens kept).
    max_new_tokens None: `default_budget`, capped to the context (an explicit value is never capped)."""
    batch = processor(text=[prompt], images=[image])
    device = _model_device(model)
    if device is not None and hasattr(batch, "to"):
        batch = batch.to(device)
    if max_new_tokens is None:
        max_new_tokens = token_budget(model, batch["input_ids"].shape[1], default_budget)
    ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)  # [1, n]
    return processor.batch_decode(ids)[0]


@functools.lru_cache(maxsize=4)
def _cached_decoder(path: str) -> MaskDecoder:
    return load_mask_decoder(path)


def get_mask_decoder(vae: VaeLike) -> MaskDecoder:
    """A ready `MaskDecoder`, or a path to vae-oid.npz / a safetensors copy (loaded once, cached)."""
    if isinstance(vae, MaskDecoder):
        return vae
    if vae is None or str(vae) == "":
        return load_mask_decoder(None)  # raises, saying where to get the file
    return _cached_decoder(str(Path(vae).resolve()))


def attach_masks(objects: ParseResult, decoder: MaskDecoder, image_w: int, image_h: int) -> ParseResult:
    """Decode every object's seg tokens and set `.mask` to a bool [image_h, image_w] mask (in place)."""
    with_segs = [d for d in objects if d.seg_tokens is not None]
    if not with_segs:
        return objects
    maps = decoder.decode_masks([d.seg_tokens for d in with_segs])  # [N, 64, 64]
    for d, m in zip(with_segs, maps):
        d.mask = paste_mask(m, d.box, image_w, image_h)
        if not d.mask.any():
            objects.problems.append(f"{d.label!r}: mask is empty inside box {tuple(round(v) for v in d.box)}")
    return objects


def run_task(
    model: Any,
    processor: Any,
    image: ImageLike,
    task: str | Task,
    *,
    lang: str = "en",
    text: str | None = None,
    objects: str | Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    vae: VaeLike = None,
) -> TaskResult:
    """Build the prompt, generate greedily, decode and parse. `vae` is needed only for `segment`
    (a path or a loaded `MaskDecoder`); checked before generating so a missing file fails fast."""
    t = get_task(task)
    prompt = build_prompt(t, lang=lang, text=text, objects=objects)
    decoder = get_mask_decoder(vae) if t.output == "segmentations" else None
    img = as_image(image)
    if max_new_tokens is not None and int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    out = generate_text(model, processor, img, prompt, max_new_tokens, t.max_new_tokens).strip()
    parsed = parse_output(t, out, img.width, img.height)
    if parsed is None:
        return TaskResult(t.name, prompt, out)
    if decoder is not None:
        attach_masks(parsed, decoder, img.width, img.height)
    return TaskResult(t.name, prompt, out, parsed.objects, parsed.problems)


def caption(model: Any, processor: Any, image: ImageLike, lang: str = "en", max_new_tokens: int | None = None) -> str:
    """Short caption (`caption {lang}`)."""
    return run_task(model, processor, image, "caption", lang=lang, max_new_tokens=max_new_tokens).text


def describe(model: Any, processor: Any, image: ImageLike, lang: str = "en", max_new_tokens: int | None = None) -> str:
    """Longer caption (`describe {lang}`, pt checkpoints)."""
    return run_task(model, processor, image, "describe", lang=lang, max_new_tokens=max_new_tokens).text


def ocr(model: Any, processor: Any, image: ImageLike, max_new_tokens: int | None = None) -> str:
    """Text in the image (`ocr`)."""
    return run_task(model, processor, image, "ocr", max_new_tokens=max_new_tokens).text


def answer(
    model: Any, processor: Any, image: ImageLike, question: str, lang: str = "en", max_new_tokens: int | None = None
) -> str:
    """Answer a question about the image (`answer {lang} {question}`)."""
    return run_task(model, processor, image, "answer", lang=lang, text=question, max_new_tokens=max_new_tokens).text


def detect(
    model: Any, processor: Any, image: ImageLike, objects: str | Sequence[str], max_new_tokens: int | None = None
) -> ParseResult:
    """Boxes for the named objects (`detect a ; b`), in pixels of `image`; `.problems` lists what
    did not parse."""
    r = run_task(model, processor, image, "detect", objects=objects, max_new_tokens=max_new_tokens)
    return ParseResult(r.objects or [], r.problems)


def segment(
    model: Any,
    processor: Any,
    image: ImageLike,
    objects: str | Sequence[str],
    vae: VaeLike,
    max_new_tokens: int | None = None,
) -> ParseResult:
    """Boxes and bool [H, W] masks for the named objects (`segment a ; b`); `vae` is the path to
    vae-oid.npz (or a safetensors copy) or a loaded `MaskDecoder`."""
    r = run_task(model, processor, image, "segment", objects=objects, max_new_tokens=max_new_tokens, vae=vae)
    return ParseResult(r.objects or [], r.problems)
