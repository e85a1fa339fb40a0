"""Draw detections and segmentation masks on the original image (PIL), as the Google demos do.

`annotate(image, objects)` returns a new RGB image of the same size: masks as translucent colour
overlays, boxes as outlines, labels on a filled tag. A label always gets the same colour (a CRC32
of the label picks from a fixed palette; Python's `hash` is salted per process, so not used).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

# Tableau-20-like palette: distinct, readable under white text.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (57, 59, 121), (173, 73, 74), (82, 84, 163), (140, 162, 82), (189, 158, 57),
    (132, 60, 57), (123, 65, 115), (165, 81, 148), (49, 130, 189), (230, 85, 13),
)


def label_color(label: str) -> tuple[int, int, int]:
    """Stable colour for a label (same across runs and processes)."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def _overlay_mask(rgb: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float) -> None:
    """Blend `color` into float32 `rgb` [H, W, 3] in place, weighted by the mask (bool or [0, 1])."""
    m = mask.astype(np.float32) if mask.dtype == bool else np.clip(mask.astype(np.float32), 0.0, 1.0)
    a = (alpha * m)[..., None]  # [H, W, 1]
    rgb *= 1.0 - a
    rgb += a * np.asarray(color, dtype=np.float32)


def annotate(
    image: Image.Image,
    objects: Iterable,
    *,
    mask_alpha: float = 0.45,
    line_width: int | None = None,
    show_labels: bool = True,
) -> Image.Image:
    """Return a new RGB image with each object's mask (if any), box and label drawn on `image`.

    `objects` are `tasks.Detection`s (or anything with `.label`, `.box` = (x0, y0, x1, y1) pixels,
    `.mask` = None or [H, W] bool/float, optional `.score`). The input image is not modified.
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"annotate needs a PIL image, got {type(image).__name__}")
    w, h = image.size
    objects = list(objects)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32).copy()  # [H, W, 3]
    for i, obj in enumerate(objects):
        if getattr(obj, "mask", None) is None:
            continue
        mask = np.asarray(obj.mask)
        if mask.shape != (h, w):
            raise InputError(f"object {i} ({obj.label!r}): mask is {list(mask.shape)}, image is [{h}, {w}]")
        _overlay_mask(rgb, mask, label_color(obj.label), mask_alpha)
    out = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(out)
    lw = line_width or max(2, round(min(w, h) / 200))
    font = _font(max(10, round(min(w, h) / 40)))
    for obj in objects:
        color = label_color(obj.label)
        x0, y0, x1, y1 = (float(v) for v in obj.box)
        x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
        y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
        draw.rectangle((round(x0), round(y0), round(x1), round(y1)), outline=color, width=lw)
        if not show_labels:
            continue
        text = obj.label if getattr(obj, "score", None) is None else f"{obj.label} {obj.score:.2f}"
        if not text:
            continue
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 4, b - t + 4
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the top edge
        tx = min(x0, max(0, w - tw))
        draw.rectangle((round(tx), round(ty), round(tx + tw), round(ty + th)), fill=color)
        draw.text((round(tx) + 2 - l, round(ty) + 2 - t), text, fill=(255, 255, 255), font=font)
    return out


def save(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save (creating parent folders); the format comes from the extension (.png, .jpg, ...)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() in (".jpg", ".jpeg") and image.mode != "RGB":
        image = image.convert("RGB")
    try:
        image.save(p)
    except (KeyError, ValueError) as e:  # unknown extension
        raise InputError(f"cannot save {p}: unknown image format {p.suffix!r}; use .png or .jpg") from e
    return p
