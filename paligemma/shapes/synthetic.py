"""Synthetic "shapes" scenes: the toy task the shipped `shapes-tiny` model is trained on.

Each scene is 1-3 coloured shapes (circle, square, triangle) on a plain or noisy light background.
Shapes never overlap (their boxes keep a gap), so every box is unambiguous, and their centres are
apart in x, so "left to right" is a well-defined order. A scene answers three PaliGemma tasks:

    caption en                  -> "a red circle and a blue square"   (left to right)
    answer en how many shapes?  -> "2"
    detect <shape>              -> "<locY0><locX0><locY1><locX1> circle ; ..."   (left to right)

Boxes follow big_vision's detection format (DESIGN.md, location bins): ymin, xmin, ymax, xmax as pixel-edge
coordinates normalised by the image size, each encoded as `<loc{round(c * 1023):04d}>`.

Everything is deterministic by seed: scene `s` is drawn from `random.Random(s)` and
`numpy.random.default_rng(s)` only. Train / val / test use disjoint seed ranges (`SPLIT_SEEDS`).
`write_jsonl` writes the big_vision / HF tutorial layout: one PNG per scene and lines of
`{"image": "images/x.png", "prefix": "...", "suffix": "..."}` (paths relative to the JSONL file).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..tasks import encode_box

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (130, 40, 170),
    "orange": (245, 120, 0),
}
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225), (225, 235, 245))
COUNT_PROMPT = "answer en how many shapes?"
CAPTION_PROMPT = "caption en"

# Disjoint seed ranges: a scene's identity is its seed, so splits can never share a scene.
SPLIT_SEEDS = {"train": 0, "val": 10_000_000, "test": 20_000_000}
SPLIT_SIZE = 10_000_000


@dataclass(frozen=True)
class Shape:
    kind: str                        # one of SHAPES
    color: str                       # key of COLORS
    box: tuple[int, int, int, int]   # tight pixel box (x0, y0, x1, y1), x1/y1 exclusive


@dataclass
class Scene:
    seed: int
    image: Image.Image               # RGB, size x size
    shapes: list[Shape] = field(default_factory=list)   # sorted left to right

    @property
    def size(self) -> int:
        return self.image.size[0]


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Seeds of scenes `start .. start+n-1` of `split` ("train", "val" or "test")."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_SEEDS)}")
    if start + n > SPLIT_SIZE:
        raise ValueError(f"split {split!r} holds {SPLIT_SIZE} scenes; asked for up to {start + n}")
    base = SPLIT_SEEDS[split]
    return list(range(base + start, base + start + n))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, s: int, fill) -> None:
    """Draw `kind` inside the s x s cell whose top-left corner is (x, y)."""
    if kind == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
    elif kind == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
    elif kind == "triangle":    # apex up, base at the bottom of the cell
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; use one of {SHAPES}")


def _mask_box(kind: str, x: int, y: int, s: int, size: int) -> tuple[int, int, int, int]:
    """Tight box of the pixels `_draw_shape` actually sets (PIL rasterisation decides the edges)."""
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), kind, x, y, s, 255)
    x0, y0, x1, y1 = mask.getbbox()
    return (x0, y0, x1, y1)


def make_scene(seed: int, size: int = 64, min_frac: float = 0.22, max_frac: float = 0.42,
               noise_prob: float = 0.5, max_tries: int = 200) -> Scene:
    """Scene number `seed`: 1-3 non-overlapping shapes, left-to-right sorted.

    Shape sizes are `min_frac..max_frac` of the image side. Boxes keep a 2 px gap and centres are
    at least 6% of the image apart in x, so captions and detections have one right answer.
    """
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    min_gap_x = max(2, round(0.06 * size))
    placed: list[tuple[str, str, int, int, int, tuple[int, int, int, int]]] = []
    tries = 0
    while len(placed) < n:
        tries += 1
        if tries > max_tries:   # crowded draw: restart the placement with a fresh shape list
            placed, tries = [], 0
        kind = rng.choice(SHAPES)
        color = rng.choice(sorted(COLORS))
        s = rng.randint(round(min_frac * size), round(max_frac * size))
        x = rng.randint(1, size - s - 1)
        y = rng.randint(1, size - s - 1)
        box = _mask_box(kind, x, y, s, size)
        ok = True
        for *_, other in placed:
            apart = (box[2] + 2 <= other[0] or other[2] + 2 <= box[0]
                     or box[3] + 2 <= other[1] or other[3] + 2 <= box[1])
            cx, ocx = box[0] + box[2], other[0] + other[2]   # 2 x centre
            if not apart or abs(cx - ocx) < 2 * min_gap_x:
                ok = False
                break
        if ok:
            placed.append((kind, color, x, y, s, box))

    bg = rng.choice(BACKGROUNDS)
    noisy = rng.random() < noise_prob
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    for kind, color, x, y, s, _ in placed:
        _draw_shape(draw, kind, x, y, s, COLORS[color])
    if noisy:
        amp = rng.randint(8, 24)
        noise = np.random.default_rng(seed).integers(-amp, amp + 1, size=(size, size, 3))
        pixels = np.asarray(image, dtype=np.int16) + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    shapes = sorted((Shape(kind, color, box) for kind, color, _, _, _, box in placed),
                    key=lambda sh: (sh.box[0] + sh.box[2], sh.box[1]))
    return Scene(seed=seed, image=image, shapes=shapes)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """"a red circle", "a red circle and an orange square", "a red circle, a ... and a ..."."""
    parts = [f"{_article(sh.color)} {sh.color} {sh.kind}" for sh in scene.shapes]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def detection(scene: Scene, kind: str) -> str:
    """Detection target for `detect {kind}`: every `kind` left to right; "" if there is none."""
    return " ; ".join(f"{encode_box(sh.box, scene.size, scene.size)} {kind}"
                      for sh in scene.shapes if sh.kind == kind)


def examples(scene: Scene, absent_detect: bool = True) -> list[tuple[str, str]]:
    """All (prefix, suffix) pairs of a scene: caption, count, one detect per present shape kind,
    and (if `absent_detect`) one detect for a kind that is not in the scene, whose answer is ""."""
    out = [(CAPTION_PROMPT, caption(scene)), (COUNT_PROMPT, str(len(scene.shapes)))]
    present = [k for k in SHAPES if any(sh.kind == k for sh in scene.shapes)]
    out += [(f"detect {k}", detection(scene, k)) for k in present]
    absent = [k for k in SHAPES if k not in present]
    if absent_detect and absent:
        k = absent[scene.seed % len(absent)]
        out.append((f"detect {k}", ""))
    return out


def corpus_texts(n_scenes: int = 300) -> list[str]:
    """The task's text (prompts, answers without loc tokens), for training a small tokenizer."""
    texts = [CAPTION_PROMPT, COUNT_PROMPT, "1", "2", "3"]
    texts += [f"detect {k}" for k in SHAPES] + [f" {k} ; {k}" for k in SHAPES]
    texts += [f"{_article(c)} {c} {k}" for c in COLORS for k in SHAPES]
    texts += [caption(make_scene(seed)) for seed in split_seeds("train", n_scenes)]
    return texts


def write_jsonl(out_dir: str, split: str, n: int, size: int = 64, start: int = 0,
                absent_detect: bool = True) -> str:
    """Write `n` scenes of `split` to `out_dir/images/*.png` and `out_dir/{split}.jsonl`.

    Returns the JSONL path. Each scene contributes every pair of `examples(scene)`.
    """
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        for seed in split_seeds(split, n, start):
            scene = make_scene(seed, size=size)
            rel = f"images/{split}_{seed}.png"
            scene.image.save(os.path.join(out_dir, rel))
            for prefix, suffix in examples(scene, absent_detect):
                f.write(json.dumps({"image": rel, "prefix": prefix, "suffix": suffix}) + "\n")
    return path


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file, with `image` resolved against the file's directory."""
    root = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("image", "prefix", "suffix"):
                if key not in row:
                    raise ValueError(f"{path}:{i + 1}: missing key {key!r}; each line needs "
                                     '{"image": path, "prefix": str, "suffix": str}')
            if not os.path.isabs(row["image"]):
                row["image"] = os.path.join(root, row["image"])
            rows.append(row)
    return rows
