"""Tests for paligemma/draw.py: annotated image size, pixels changed in boxes and masks only,
stable colours per label, saving."""

import zlib

import numpy as np
import pytest
from PIL import Image

from paligemma.draw import PALETTE, annotate, label_color, save
from paligemma.errors import InputError
from paligemma.tasks import Detection, parse_detections

W, H = 640, 480
GREY = (128, 128, 128)


@pytest.fixture
def image():
    return Image.new("RGB", (W, H), GREY)


def det(label, box, mask=None):
    return Detection(label, box, (0, 0, 0, 0), mask=mask)


def test_boxes_drawn_far_pixels_untouched(image):
    objs = parse_detections("<loc0000><loc0000><loc0341><loc0341> car ; <loc0682><loc0682><loc1023><loc1023> dog", W, H)
    out = annotate(image, objs, line_width=3)
    assert out.size == (W, H) and out.mode == "RGB" and out is not image
    assert image.getpixel((5, 5)) == GREY  # input unchanged
    a = np.asarray(out)
    # car box (0, 0, 213.3, 160): its right edge at x=213, dog box starts at (426.7, 320)
    assert tuple(a[80, 213]) == label_color("car") and tuple(a[400, 427]) == label_color("dog")
    assert (a[200:300, 250:400] == GREY).all()  # between the boxes
    assert (a[100:150, 50:200] == GREY).all()  # inside the car box, away from edges and label tag


def test_mask_overlay_inside_only(image):
    mask = np.zeros((H, W), bool)
    mask[100:200, 300:400] = True
    out = np.asarray(annotate(image, [det("cat", (300, 100, 400, 200), mask)], mask_alpha=0.5, show_labels=False))
    c = np.array(label_color("cat"))
    want = np.rint(np.array(GREY) * 0.5 + c * 0.5)
    assert (out[120:180, 320:380] == want).all()  # inside the mask, away from the outline
    assert (out[300:, :] == GREY).all() and (out[:, :250] == GREY).all()


def test_soft_mask_and_label_tag(image):
    soft = np.zeros((H, W), np.float32)
    soft[10:20, 10:20] = 0.5
    out = np.asarray(annotate(image, [det("x", (5, 5, 30, 30), soft)], mask_alpha=1.0, show_labels=False))
    assert (out[12, 12] == np.rint(np.array(GREY) * 0.5 + np.array(label_color("x")) * 0.5)).all()
    tagged = np.asarray(annotate(image, [det("person", (100, 100, 300, 300))]))
    assert (tagged[80:99, 100:140] != GREY).any()  # label tag above the box


def test_colours_stable_per_label():
    assert label_color("car") == label_color("car") and label_color("car") in PALETTE
    assert len({label_color(s) for s in ["car", "dog", "cat", "person", "bus", "tree"]}) > 1
    # pinned values: crc32("car") % 20 == 17, crc32("dog") % 20 == 5, the same in every process
    # (Python's str hash is salted per process and would not be)
    assert label_color("car") == PALETTE[zlib.crc32(b"car") % len(PALETTE)] == PALETTE[17]
    assert label_color("dog") == PALETTE[5]


def test_bad_mask_shape_and_non_image():
    img = Image.new("L", (W, H))
    with pytest.raises(InputError, match="mask is \\[10, 10\\]"):
        annotate(img, [det("a", (0, 0, 5, 5), np.ones((10, 10), bool))])
    with pytest.raises(InputError, match="PIL image"):
        annotate(np.zeros((4, 4, 3)), [])


def test_grayscale_input_and_empty_objects():
    img = Image.new("L", (50, 30), 7)
    out = annotate(img, [])
    assert out.size == (50, 30) and out.mode == "RGB" and (np.asarray(out) == 7).all()


def test_save(tmp_path, image):
    p = save(annotate(image, []), tmp_path / "sub" / "out.jpg")
    assert p.exists() and Image.open(p).size == (W, H)
    with pytest.raises(InputError, match="unknown image format"):
        save(image, tmp_path / "out.nosuchformat")
