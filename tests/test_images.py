"""images.py: the one image loader (files, errors naming the file, modes kept) as the processor uses it."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.errors import InputError
from paligemma.images import as_image, load_image
from paligemma.processing_paligemma import PaliGemmaProcessor
from paligemma.shapes.tokenizer_train import make_test_tokenizer


def random_image(height: int, width: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    directory = tmp_path_factory.mktemp("proc")
    make_test_tokenizer(directory, image_size=28, num_image_tokens=4)
    return PaliGemmaProcessor.from_pretrained(directory)


def test_undecodable_images(ours, tmp_path):
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(InputError, match="could not be decoded"):
        ours(text="x", images=Image.open(truncated))
    with pytest.raises(InputError, match="truncated.png"):
        load_image(truncated)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    with pytest.raises(InputError, match="notes.txt is not an image"):
        ours(text="x", images=str(not_image))
    with pytest.raises(InputError, match="missing.jpg does not exist"):
        load_image(tmp_path / "missing.jpg")


def test_image_paths(ours, tmp_path):
    path = tmp_path / "img.png"
    image = random_image(20, 24, "RGBA")
    image.save(path)
    assert torch.equal(ours(text="x", images=str(path))["pixel_values"], ours(text="x", images=image)["pixel_values"])
    assert load_image(path).mode == "RGBA"


def test_as_image_passes_pil_images_through(tmp_path):
    image = random_image(5, 6)
    assert as_image(image) is image
    image.save(tmp_path / "a.png")
    assert as_image(tmp_path / "a.png").size == (6, 5)
