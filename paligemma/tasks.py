"""Task prompts and output parsers: caption, describe, ocr, answer, question, detect, segment.

Mirrors the prompt system of the PaliGemma docs (ai.google.dev .../prompt-system-instructions) and the
output formats of big_vision (`pp/proj/paligemma/segmentation.py`, `evaluators/.../segmentation.py`);
see docs/DESIGN.md (location bins, segmentation).

Detection output is `<locY0><locX0><locY1><locX1> label`, segmentation output is the same with 16
`<segNNN>` tokens before the label; objects are joined with " ; ".

Location convention (DESIGN.md, location bins): **bins are decoded with /1023**, the inverse of how big_vision
encodes training targets (`round(coord * 1023)` clipped to [0, 1023]) and how its evaluator decodes.
Hence `encode_box(decode(loc)) == loc` for every bin. Google's HF demo divides by 1024 instead; the
difference is under 0.1% of the image size.

Parsers never raise on model output: they return a `ParseResult` (a sequence of `Detection`) whose
`problems` list says, in words, everything that was dropped, clamped or repaired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .checks import valid_text
from .errors import InputError

NUM_LOC_BINS = 1024  # <loc0000> .. <loc1023>
NUM_SEG_CODES = 128  # <seg000> .. <seg127>
NUM_SEG_TOKENS = 16  # one 4x4 grid of VQ-VAE codes per mask


# --------------------------------------------------------------------------------------------------
# Task registry and prompts


@dataclass(frozen=True)
class Task:
    """One task prompt: `template` is formatted with `lang`, `text` or `objects`."""

    name: str
    template: str  # e.g. "answer {lang} {text}"
    input: str | None  # None, "text" (question/answer) or "objects" (list of names)
    output: str  # "text", "detections" or "segmentations"
    max_new_tokens: int  # default generation budget; generation stops earlier at <eos>
    doc: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("caption", "caption {lang}", None, "text", 64, "short caption"),
        Task("describe", "describe {lang}", None, "text", 256, "longer caption (pt checkpoints)"),
        Task("ocr", "ocr", None, "text", 256, "text in the image, raster order (pt checkpoints)"),
        Task("answer", "answer {lang} {text}", "text", "text", 64, "answer a question (VQA)"),
        Task("question", "question {lang} {text}", "text", "text", 64, "ask a question whose answer is `text`"),
        Task("detect", "detect {objects}", "objects", "detections", 256, "boxes for each named object"),
        Task("segment", "segment {objects}", "objects", "segmentations", 512, "boxes and masks"),
    )
}


def get_task(task: str | Task) -> Task:
    """Look a task up by name; raises InputError listing the known names."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except (KeyError, TypeError):
        raise InputError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


def _clean_objects(objects: str | Sequence[str] | None, task: str) -> list[str]:
    if objects is None:
        raise InputError(f"task {task!r} needs objects=[...], e.g. objects=['car', 'dog']")
    if isinstance(objects, str):  # "car ; dog" or "car": never iterate a string letter by letter
        objects = objects.split(";")
    if not isinstance(objects, (list, tuple)) or not all(isinstance(o, str) for o in objects):
        raise InputError(f"objects={objects!r} ({type(objects).__name__}); expected a string 'car ; dog' or a "
                         "list of strings")
    names = [valid_text("object name", o, InputError).strip() for o in objects]
    if not names or any(not n for n in names):
        raise InputError(f"task {task!r} needs a non-empty list of non-empty object names, got {objects!r}")
    for n in names:
        if any(ch in n for ch in ";<>\n"):
            raise InputError(f"object name {n!r} may not contain ';', '<', '>' or a newline")
    return names


def build_prompt(
    task: str | Task,
    lang: str = "en",
    text: str | None = None,
    objects: str | Sequence[str] | None = None,
) -> str:
    """Exact prompt string for a task, without the trailing newline (the processor adds it).

    >>> build_prompt("caption", "en")            -> "caption en"
    >>> build_prompt("answer", text="what color?") -> "answer en what color?"
    >>> build_prompt("detect", objects=["a", "b"]) -> "detect a ; b"
    """
    t = get_task(task)
    if lang is not None and not isinstance(lang, str):
        raise InputError(f"lang={lang!r} ({type(lang).__name__}); expected a language code such as 'en'")
    if text is not None and not isinstance(text, str):
        raise InputError(f"text={text!r} ({type(text).__name__}); expected a string")
    lang = valid_text("lang", lang or "", InputError).strip()
    if text is not None:
        valid_text("text", text, InputError)
    if "{lang}" in t.template and (not lang or any(c.isspace() for c in lang)):
        raise InputError(f"lang must be a language code such as 'en', got {lang!r}")
    if t.input == "text":
        what = "the question" if t.name == "answer" else "the answer"
        if text is None or not str(text).strip():
            raise InputError(f"task {t.name!r} needs text= ({what}), e.g. text='what is in the image?'")
        text = str(text).strip()
    elif text is not None:
        raise InputError(f"task {t.name!r} takes no text (got text={text!r})")
    if t.input == "objects":
        return t.template.format(objects=" ; ".join(_clean_objects(objects, t.name)))
    if objects is not None:
        raise InputError(f"task {t.name!r} takes no objects (got objects={objects!r})")
    return t.template.format(lang=lang, text=text)


# --------------------------------------------------------------------------------------------------
# Location tokens <-> pixel boxes


def loc_to_unit(loc: int) -> float:
    """Bin index in [0, 1023] -> normalised coordinate in [0, 1] (big_vision: bin / 1023)."""
    return min(max(loc, 0), NUM_LOC_BINS - 1) / (NUM_LOC_BINS - 1)


def decode_box(loc: Sequence[int], image_width: int, image_height: int) -> tuple[float, float, float, float]:
    """(ymin, xmin, ymax, xmax) bins -> (x0, y0, x1, y1) float pixels in the original image.

    The model sees a squashed square image, so y scales with the height and x with the width.
    """
    ymin, xmin, ymax, xmax = (loc_to_unit(int(v)) for v in loc)
    return (xmin * image_width, ymin * image_height, xmax * image_width, ymax * image_height)


def encode_box(box: Sequence[float], image_width: int, image_height: int) -> str:
    """(x0, y0, x1, y1) pixels -> "<locY0><locX0><locY1><locX1>", as big_vision builds targets.

    Each coordinate is normalised by the image size, clamped to [0, 1] and binned with
    round(c * 1023); `decode_box` inverts it exactly on bin centres.
    """
    if image_width <= 0 or image_height <= 0:
        raise InputError(f"image size must be positive, got {image_width}x{image_height}")
    x0, y0, x1, y1 = (float(v) for v in box)
    units = (y0 / image_height, x0 / image_width, y1 / image_height, x1 / image_width)
    bins = (int(round(min(max(u, 0.0), 1.0) * (NUM_LOC_BINS - 1))) for u in units)
    return "".join(f"<loc{b:04d}>" for b in bins)


def encode_seg(seg_tokens: Sequence[int]) -> str:
    """16 VQ-VAE codes -> "<seg012><seg127>...", for segmentation training targets."""
    if len(seg_tokens) != NUM_SEG_TOKENS or not all(0 <= int(s) < NUM_SEG_CODES for s in seg_tokens):
        raise InputError(f"need {NUM_SEG_TOKENS} seg codes in [0, {NUM_SEG_CODES - 1}], got {list(seg_tokens)}")
    return "".join(f"<seg{int(s):03d}>" for s in seg_tokens)


# --------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class Detection:
    """One parsed object. `box` is (x0, y0, x1, y1) in float pixels of the original image; `loc` the
    raw bins (ymin, xmin, ymax, xmax); `seg_tokens` the 16 codes of a segmentation answer; `mask` a
    bool [H, W] image mask once decoded (see `api.attach_masks`)."""

    label: str
    box: tuple[float, float, float, float]
    loc: tuple[int, int, int, int]
    score: float | None = None
    seg_tokens: list[int] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)


@dataclass
class ParseResult:
    """Objects that parsed, plus a readable note for everything that did not. Iterates like a list."""

    objects: list[Detection] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Detection]:
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, i):
        return self.objects[i]

    @property
    def ok(self) -> bool:
        return not self.problems


# a loc/seg token, a separator, another <tag>, plain text, or a lone '<'
_TOKEN_RE = re.compile(r"<loc(\d+)>|<seg(\d+)>|(;)|(<[^<>;]*>)|([^<;]+)|(<)")


@dataclass
class _Partial:
    locs: list[int] = field(default_factory=list)
    segs: list[int] = field(default_factory=list)
    words: list[str] = field(default_factory=list)


def _finish(p: _Partial, n: int, w: int, h: int, want_masks: bool, out: ParseResult) -> None:
    label = " ".join(p.words).strip()
    name = f"object {n}" + (f" ({label!r})" if label else "")
    if len(p.locs) < 4:
        out.problems.append(f"{name}: only {len(p.locs)} of 4 <loc> tokens; dropped")
        return
    loc = list(p.locs)
    for i, v in enumerate(loc):
        if v >= NUM_LOC_BINS:
            out.problems.append(f"{name}: <loc{v}> is out of range [0, {NUM_LOC_BINS - 1}]; clamped")
            loc[i] = NUM_LOC_BINS - 1
    if loc[0] > loc[2] or loc[1] > loc[3]:
        out.problems.append(f"{name}: min corner after max corner {tuple(p.locs)}; coordinates swapped")
        loc = [min(loc[0], loc[2]), min(loc[1], loc[3]), max(loc[0], loc[2]), max(loc[1], loc[3])]
    if not label:
        out.problems.append(f"{name}: no label")
    segs: list[int] | None = None
    if p.segs:
        bad = [s for s in p.segs if s >= NUM_SEG_CODES]
        if len(p.segs) != NUM_SEG_TOKENS:
            out.problems.append(f"{name}: {len(p.segs)} of {NUM_SEG_TOKENS} <seg> tokens; mask dropped")
        elif bad:
            out.problems.append(f"{name}: <seg> codes {bad} out of range [0, {NUM_SEG_CODES - 1}]; mask dropped")
        else:
            segs = list(p.segs)
    elif want_masks:
        out.problems.append(f"{name}: no <seg> tokens; box kept without a mask")
    lt = tuple(loc)
    out.objects.append(Detection(label, decode_box(lt, w, h), lt, None, segs))  # type: ignore[arg-type]


def _parse(text: str, image_width: int, image_height: int, want_masks: bool) -> ParseResult:
    out = ParseResult()
    if image_width <= 0 or image_height <= 0:
        raise InputError(f"image size must be positive, got {image_width}x{image_height}")
    cur: _Partial | None = None
    count = 0

    def flush() -> None:
        nonlocal cur, count
        if cur is not None:
            count += 1
            _finish(cur, count, image_width, image_height, want_masks, out)
        cur = None

    for m in _TOKEN_RE.finditer(text or ""):
        loc, seg, sep, tag, words, lone = m.groups()
        if loc is not None:
            if cur is not None and (cur.words or cur.segs or len(cur.locs) == 4):
                flush()  # a new box starts: objects were not separated by " ; "
            cur = cur or _Partial()
            cur.locs.append(int(loc))
        elif seg is not None:
            if cur is None or cur.words:
                out.problems.append(f"stray <seg{seg}> outside an object; ignored")
            else:
                cur.segs.append(int(seg))
        elif sep is not None:
            flush()
        elif words is not None and words.strip():
            if cur is None:
                out.problems.append(f"text without a box: {words.strip()!r}")
            else:
                cur.words.append(words.strip())
        elif tag is not None or lone is not None:
            out.problems.append(f"unexpected {m.group(0)!r}; ignored")
    flush()
    if not out.objects and text and text.strip() and "<loc" not in text:
        out.problems.append("no <loc> tokens in the output: nothing detected, or the decoder dropped "
                            "loc/seg tokens (decode must keep them; only bos/eos/pad/image are special)")
    return out


def parse_detections(text: str, image_width: int, image_height: int) -> ParseResult:
    """Parse a `detect` answer into boxes in pixels of a `image_width` x `image_height` image.

    Never raises on the text: whatever does not parse is listed in `.problems`. Out-of-range bins
    are clamped to 1023, inverted corners swapped, objects with fewer than 4 bins dropped. Seg
    tokens, if present, are kept in `seg_tokens`.
    """
    return _parse(text, image_width, image_height, want_masks=False)


def parse_segmentations(text: str, image_width: int, image_height: int) -> ParseResult:
    """Parse a `segment` answer (`<loc>x4 <seg>x16 label ; ...`). Like `parse_detections`, and an
    object without 16 valid seg codes keeps its box with `seg_tokens=None` and a problem noted."""
    return _parse(text, image_width, image_height, want_masks=True)


def parse_output(task: str | Task, text: str, image_width: int, image_height: int) -> ParseResult | None:
    """Dispatch on the task's output kind; None for text tasks (their answer is the text itself)."""
    kind = get_task(task).output
    if kind == "detections":
        return parse_detections(text, image_width, image_height)
    if kind == "segmentations":
        return parse_segmentations(text, image_width, image_height)
    return None


# --------------------------------------------------------------------------------------------------
# JSON


def mask_to_rle(mask: np.ndarray) -> dict:
    """bool [H, W] -> uncompressed COCO RLE {"size": [H, W], "counts": [...]} (column-major runs,
    starting with a run of zeros), readable by pycocotools `frPyObjects`."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def results_to_json(objects: Sequence[Detection] | ParseResult, include_masks: bool = True) -> list[dict]:
    """JSON-serialisable dicts: label, box [x0, y0, x1, y1] pixels, loc [ymin, xmin, ymax, xmax] bins,
    score, seg_tokens, and mask as COCO RLE (None when absent or include_masks=False)."""
    rows = []
    for d in objects:
        rows.append({
            "label": d.label,
            "box": [round(float(v), 3) for v in d.box],
            "loc": [int(v) for v in d.loc],
            "score": None if d.score is None else float(d.score),
            "seg_tokens": None if d.seg_tokens is None else [int(s) for s in d.seg_tokens],
            "mask": mask_to_rle(d.mask) if include_masks and d.mask is not None else None,
        })
    return rows
