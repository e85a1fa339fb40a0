"""Tests for paligemma/tasks.py: prompts, the loc convention, parsers, JSON."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.errors import InputError
from paligemma.tasks import (
    TASKS, build_prompt, decode_box, encode_box, encode_seg, mask_to_rle, parse_detections,
    parse_segmentations, results_to_json,
)

W, H = 640, 480  # non-square on purpose: x scales with W, y with H
SEGS = list(range(3, 19))
SEG_STR = "".join(f"<seg{s:03d}>" for s in SEGS)


# ---------------------------------------------------------------- prompts

@pytest.mark.parametrize("task,kw,want", [
    ("caption", {}, "caption en"),
    ("caption", {"lang": "de"}, "caption de"),
    ("describe", {}, "describe en"),
    ("ocr", {}, "ocr"),
    ("answer", {"text": "what colour is the car?"}, "answer en what colour is the car?"),
    ("answer", {"lang": "fr", "text": " quoi? "}, "answer fr quoi?"),
    ("question", {"text": "red"}, "question en red"),
    ("detect", {"objects": ["car"]}, "detect car"),
    ("detect", {"objects": ["car", " dog "]}, "detect car ; dog"),
    ("detect", {"objects": "car ; dog"}, "detect car ; dog"),
    ("segment", {"objects": ["cat", "traffic light"]}, "segment cat ; traffic light"),
])
def test_build_prompt_exact(task, kw, want):
    assert build_prompt(task, **kw) == want


def test_registry_has_the_seven_tasks():
    assert set(TASKS) == {"caption", "describe", "ocr", "answer", "question", "detect", "segment"}


@pytest.mark.parametrize("task,kw,fragment", [
    ("captions", {}, "unknown task 'captions'"),
    ("answer", {}, "needs text="),
    ("answer", {"text": "  "}, "needs text="),
    ("question", {}, "needs text="),
    ("detect", {}, "needs objects="),
    ("detect", {"objects": []}, "non-empty list"),
    ("segment", {"objects": ["cat", ""]}, "non-empty"),
    ("detect", {"objects": ["a<loc0001>"]}, "may not contain"),
    ("caption", {"text": "hi"}, "takes no text"),
    ("caption", {"objects": ["car"]}, "takes no objects"),
    ("caption", {"lang": "en us"}, "language code"),
])
def test_build_prompt_errors(task, kw, fragment):
    with pytest.raises(InputError, match=fragment) as e:
        build_prompt(task, **kw)
    assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------- loc convention

def test_decode_box_by_hand_non_square():
    # tokens are ymin, xmin, ymax, xmax; bins decode with /1023 (341 = 1023/3, 682 = 2*1023/3)
    box = decode_box((341, 341, 682, 1023), W, H)
    assert box == pytest.approx((341 / 1023 * 640, 341 / 1023 * 480, 640.0, 682 / 1023 * 480))
    assert box == pytest.approx((640 / 3, 160.0, 640.0, 320.0))


def test_encode_box_matches_big_vision_binning():
    # round(c * 1023): y0 = 50/480*1023 = 106.56 -> 107; x0 = 100/640*1023 = 159.84 -> 160;
    # y1 = 390/480*1023 = 831.19 -> 831; x1 = 300/640*1023 = 479.53 -> 480
    assert encode_box((100, 50, 300, 390), W, H) == (
        f"<loc{round(50 / 480 * 1023):04d}><loc{round(100 / 640 * 1023):04d}>"
        f"<loc{round(390 / 480 * 1023):04d}><loc{round(300 / 640 * 1023):04d}>")
    assert encode_box((100, 50, 300, 390), W, H) == "<loc0107><loc0160><loc0831><loc0480>"
    # outside the image clamps to the border
    assert encode_box((-20, -1, 700, 999), W, H) == "<loc0000><loc0000><loc1023><loc1023>"


def test_encode_decode_is_identity_on_every_bin():
    for w, h in [(640, 480), (224, 224), (37, 1001)]:
        for b in range(1024):
            loc = (b, 1023 - b, b, 1023 - b)
            assert encode_box(decode_box(loc, w, h), w, h) == "".join(f"<loc{v:04d}>" for v in loc)


def test_encode_seg():
    assert encode_seg(SEGS) == SEG_STR
    with pytest.raises(InputError):
        encode_seg([128] * 16)


# ---------------------------------------------------------------- parsing

def test_parse_single_detection_by_hand():
    r = parse_detections("<loc0120><loc0256><loc0900><loc0768> car", W, H)
    assert r.ok and len(r) == 1
    d = r[0]
    assert d.label == "car" and d.loc == (120, 256, 900, 768)
    assert d.box == pytest.approx((256 / 1023 * 640, 120 / 1023 * 480, 768 / 1023 * 640, 900 / 1023 * 480))
    assert d.score is None and d.seg_tokens is None and d.mask is None


def test_parse_multiple_detections_and_multiword_labels():
    text = "<loc0000><loc0000><loc1023><loc1023> traffic light ; <loc0341><loc0682><loc0682><loc1023> dog"
    r = parse_detections(text, W, H)
    assert r.ok, r.problems
    assert [d.label for d in r] == ["traffic light", "dog"]
    assert r[0].box == pytest.approx((0.0, 0.0, 640.0, 480.0))
    assert r[1].box == pytest.approx((2 * 640 / 3, 480 / 3, 640.0, 2 * 480 / 3))


def test_parse_objects_without_separator():
    r = parse_detections("<loc0001><loc0002><loc0003><loc0004> a <loc0005><loc0006><loc0007><loc0008> b", W, H)
    assert [d.loc for d in r] == [(1, 2, 3, 4), (5, 6, 7, 8)] and [d.label for d in r] == ["a", "b"]


def test_parse_segmentation():
    text = f"<loc0100><loc0200><loc0300><loc0400>{SEG_STR} cat ; <loc0000><loc0000><loc0500><loc0500>{SEG_STR} dog"
    r = parse_segmentations(text, W, H)
    assert r.ok, r.problems
    assert [d.label for d in r] == ["cat", "dog"] and all(d.seg_tokens == SEGS for d in r)
    assert r[0].box == pytest.approx((200 / 1023 * 640, 100 / 1023 * 480, 400 / 1023 * 640, 300 / 1023 * 480))


def test_segmentation_without_segs_keeps_box_and_reports():
    r = parse_segmentations("<loc0100><loc0200><loc0300><loc0400> cat", W, H)
    assert len(r) == 1 and r[0].seg_tokens is None
    assert any("no <seg> tokens" in p for p in r.problems)


@pytest.mark.parametrize("text,n_objects,fragment", [
    ("<loc0100><loc0200><loc0300> cat", 0, "only 3 of 4"),
    ("<loc0100><loc0200> cat ; <loc0001><loc0002><loc0003><loc0004> dog", 1, "only 2 of 4"),
    ("<loc1500><loc0200><loc0300><loc0400> cat", 1, "out of range"),
    ("<loc0300><loc0400><loc0100><loc0200> cat", 1, "swapped"),
    ("<loc0100><loc0200><loc0300><loc0400>", 1, "no label"),
    ("there is no car here", 0, "text without a box"),
    ("there is no car here", 0, "no <loc> tokens"),
    ("<loc0100><loc0200><loc0300><loc0400><seg001><seg002> cat", 1, "2 of 16 <seg>"),
    (f"<loc0100><loc0200><loc0300><loc0400>{SEG_STR[:-8]}<seg200> cat", 1, "out of range"),
    ("<loc0100><loc0200><loc0300><loc0400> cat <unk> ;;", 1, "unexpected '<unk>'"),
    ("<loc0100><loc0200><loc03", 0, "only 2 of 4"),  # truncated generation
    ("<seg001> cat", 0, "stray <seg001>"),
    ("", 0, None),
    ("\x00<<>>;;<loc><locx>", 0, "unexpected"),
])
def test_malformed_outputs_never_raise_and_are_reported(text, n_objects, fragment):
    r = parse_segmentations(text, W, H) if "<seg" in text else parse_detections(text, W, H)
    assert len(r) == n_objects
    if fragment is None:
        assert r.ok
    else:
        assert any(fragment in p for p in r.problems), r.problems


def test_out_of_range_is_clamped_to_the_image():
    r = parse_detections("<loc1500><loc9999><loc1023><loc1023> cat", W, H)
    assert r[0].loc == (1023, 1023, 1023, 1023) and r[0].box == pytest.approx((640.0, 480.0, 640.0, 480.0))


def test_inverted_box_is_repaired():
    d = parse_detections("<loc0300><loc0400><loc0100><loc0200> cat", W, H)[0]
    assert d.loc == (100, 200, 300, 400) and d.box[0] < d.box[2] and d.box[1] < d.box[3]


# ---------------------------------------------------------------- JSON

def test_results_to_json_and_rle():
    r = parse_segmentations(f"<loc0100><loc0200><loc0300><loc0400>{SEG_STR} cat", W, H)
    r[0].mask = np.zeros((3, 2), bool)
    r[0].mask[1:, 1] = True  # column-major: col0 = 0,0,0; col1 = 0,1,1
    rows = json.loads(json.dumps(results_to_json(r)))
    assert rows[0]["label"] == "cat" and rows[0]["loc"] == [100, 200, 300, 400] and rows[0]["seg_tokens"] == SEGS
    assert rows[0]["box"] == pytest.approx([200 / 1023 * 640, 100 / 1023 * 480, 400 / 1023 * 640, 300 / 1023 * 480], abs=1e-3)
    assert rows[0]["mask"] == {"size": [3, 2], "counts": [4, 2]}
    assert mask_to_rle(np.ones((2, 2), bool))["counts"] == [0, 4]
    assert results_to_json(r, include_masks=False)[0]["mask"] is None
