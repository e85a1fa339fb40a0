"""Tests for paligemma/synthetic.py: determinism, split disjointness, tight boxes, task targets."""

import json
import re

import numpy as np
import pytest

from paligemma.shapes import synthetic
from paligemma.shapes.synthetic import (COLORS, SHAPES, caption, detection, encode_box, examples,
                                 make_scene, read_jsonl, split_seeds, write_jsonl)


def test_same_seed_same_scene():
    for seed in (0, 7, 12345):
        a, b = make_scene(seed), make_scene(seed)
        assert a.shapes == b.shapes
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert examples(a) == examples(b)


def test_different_seeds_differ():
    images = {np.asarray(make_scene(s).image).tobytes() for s in range(50)}
    assert len(images) == 50


def test_splits_are_disjoint():
    n = 1000
    train, val, test = (set(split_seeds(s, n)) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    # ranges, not just the first n: the largest legal index of one split stays below the next
    assert max(split_seeds("train", 1, synthetic.SPLIT_SIZE - 1)) < min(split_seeds("val", 1))
    with pytest.raises(ValueError, match="split"):
        split_seeds("dev", 1)
    with pytest.raises(ValueError, match="holds"):
        split_seeds("train", 2, synthetic.SPLIT_SIZE - 1)


@pytest.mark.parametrize("size", [64, 96])
def test_boxes_are_tight_and_disjoint(size):
    """On plain backgrounds, the non-background pixels are exactly the union of the boxes' shapes,
    and each box is the tight extent of its own shape's pixels."""
    checked = 0
    for seed in range(300):
        scene = make_scene(seed, size=size, noise_prob=0.0)
        img = np.asarray(scene.image).astype(int)
        bg = img[0, 0]
        fg = (img != bg).any(-1)                                     # [H, W]
        assert 1 <= len(scene.shapes) <= 3
        covered = np.zeros_like(fg)
        for sh in scene.shapes:
            x0, y0, x1, y1 = sh.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            inside = fg[y0:y1, x0:x1]
            # tight: every edge row / column of the box holds at least one shape pixel
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            colour = np.array(COLORS[sh.color])
            assert ((img[y0:y1, x0:x1] == colour).all(-1) == inside).all()
            covered[y0:y1, x0:x1] |= inside
        assert (covered == fg).all(), "a drawn pixel lies outside every box"
        for i, a in enumerate(scene.shapes):                        # boxes do not touch
            for b in scene.shapes[i + 1:]:
                ix = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                iy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                assert ix <= 0 or iy <= 0
        checked += 1
    assert checked == 300


def test_left_to_right_order_and_caption():
    for seed in range(100):
        scene = make_scene(seed)
        centres = [sh.box[0] + sh.box[2] for sh in scene.shapes]
        assert centres == sorted(centres)
        cap = caption(scene)
        names = re.findall(r"an? (\w+) (\w+)", cap)
        assert names == [(sh.color, sh.kind) for sh in scene.shapes]


def test_encode_box_matches_big_vision():
    # ymin, xmin, ymax, xmax; round(c * 1023)
    assert encode_box((0, 0, 64, 64), 64, 64) == "<loc0000><loc0000><loc1023><loc1023>"
    assert encode_box((16, 32, 48, 40), 64, 64) == "<loc0512><loc0256><loc0639><loc0767>"


def test_examples_cover_all_tasks():
    scene = make_scene(3)
    pairs = dict(examples(scene, absent_detect=False))
    assert pairs["caption en"] == caption(scene)
    assert pairs["answer en how many shapes?"] == str(len(scene.shapes))
    for sh in scene.shapes:
        target = pairs[f"detect {sh.kind}"]
        assert f"{encode_box(sh.box, scene.size, scene.size)} {sh.kind}" in target
        n = sum(o.kind == sh.kind for o in scene.shapes)
        assert target.count(" ; ") == n - 1
    absent = [k for k in SHAPES if all(sh.kind != k for sh in scene.shapes)]
    for k in absent:
        assert detection(scene, k) == ""


def test_jsonl_roundtrip(tmp_path):
    path = write_jsonl(str(tmp_path), "val", 4)
    lines = [json.loads(x) for x in open(path)]
    assert all(set(x) == {"image", "prefix", "suffix"} for x in lines)
    assert not lines[0]["image"].startswith("/")                   # relative to the JSONL
    rows = read_jsonl(path)
    assert len(rows) == len(lines)
    from PIL import Image
    first = make_scene(split_seeds("val", 1)[0])
    assert np.array_equal(np.asarray(Image.open(rows[0]["image"]).convert("RGB")),
                          np.asarray(first.image))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "prefix": "caption en"}\n')
    with pytest.raises(ValueError, match="suffix"):
        read_jsonl(str(bad))
