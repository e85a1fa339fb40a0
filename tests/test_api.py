"""Tests for paligemma/api.py with a fake model and processor that follow the INTERFACES.md calls."""

import json

import pytest
import torch
from PIL import Image

from paligemma import api
from paligemma.errors import InputError
from paligemma.segmentation import MaskDecoder

W, H = 640, 480  # non-square on purpose: x scales with W, y with H
SEGS = list(range(3, 19))
SEG_STR = "".join(f"<seg{s:03d}>" for s in SEGS)


class FakeProcessor:
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, text, images):
        self.calls.append((list(text), [im.size for im in images]))
        return {"input_ids": torch.tensor([[2, 5, 6]]), "pixel_values": torch.zeros(1, 3, 4, 4)}

    def batch_decode(self, ids):
        assert ids.shape == (1, 3)
        return [self.answer]


class FakeModel:
    def __init__(self):
        self.kwargs = None

    def generate(self, input_ids, pixel_values, max_new_tokens, do_sample):
        self.kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        return torch.tensor([[7, 8, 1]])


@pytest.fixture
def image():
    return Image.new("RGB", (W, H), (10, 20, 30))


def test_caption_answer_ocr(image):
    m, p = FakeModel(), FakeProcessor(" a red car \n")
    assert api.caption(m, p, image) == "a red car"
    assert p.calls[-1] == (["caption en"], [(W, H)]) and m.kwargs == {"max_new_tokens": 64, "do_sample": False}
    assert api.answer(m, p, image, "what colour?", lang="es", max_new_tokens=5) == "a red car"
    assert p.calls[-1][0] == ["answer es what colour?"] and m.kwargs["max_new_tokens"] == 5
    api.ocr(m, p, image)
    assert p.calls[-1][0] == ["ocr"]


def test_detect_with_fakes(image, tmp_path):
    p = FakeProcessor("<loc0000><loc0341><loc0682><loc1023> car ; <loc0100> dog")
    r = api.detect(FakeModel(), p, image, ["car", "dog"])
    assert p.calls[-1][0] == ["detect car ; dog"]
    assert len(r) == 1 and r[0].label == "car"
    assert r[0].box == pytest.approx((640 / 3, 0.0, 640.0, 320.0))
    assert any("only 1 of 4" in s for s in r.problems)
    path = tmp_path / "img.png"
    image.save(path)
    res = api.run_task(FakeModel(), p, path, "detect", objects="car")
    assert res.prompt == "detect car" and json.dumps(res.to_json())


def test_segment_with_fakes_uses_decoder(image):
    dec = MaskDecoder(dim=4)  # all-zero weights: output = decoder.12 bias everywhere
    with torch.no_grad():
        dec.decoder[12].bias.fill_(1.0)
    p = FakeProcessor(f"<loc0000><loc0000><loc0341><loc0682>{SEG_STR} cat")
    r = api.segment(FakeModel(), p, image, ["cat"], vae=dec)
    assert r.ok, r.problems
    m = r[0].mask
    assert m.shape == (H, W) and m.dtype == bool
    # box = (0, 0, 682/1023*640, 341/1023*480) = (426.67, 0, ..., 160.0) -> int pixels 426 x 160
    assert m[:160, :426].all() and not m[160:, :].any() and not m[:, 426:].any()


def test_segment_without_vae_fails_before_generating(image):
    m = FakeModel()
    with pytest.raises(FileNotFoundError, match="--vae"):
        api.segment(m, FakeProcessor(""), image, ["cat"], vae=None)
    assert m.kwargs is None


def test_missing_image_file_is_clear():
    with pytest.raises(InputError, match="does not exist"):
        api.caption(FakeModel(), FakeProcessor("x"), "/nonexistent/cat.jpg")
