"""PaliGemmaProcessor parity with transformers 5.24 PaliGemmaProcessor (PIL backend), plus input errors."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.errors import CheckpointError, InputError
from paligemma.processing_paligemma import BatchFeature, PaliGemmaProcessor
from paligemma.shapes.tokenizer_train import make_test_tokenizer

import transformers  # noqa: E402  (the reference: a required test dependency, never skipped)
transformers.logging.set_verbosity_error()  # HF warns on every call without explicit <image> tokens
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy copy= warning inside HF

RNG = np.random.default_rng(0)


def random_image(height: int, width: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 3)
    pixels = RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA" if channels == 4 else "RGB")
    return image if mode in ("RGB", "RGBA") else image.convert(mode)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("proc")
    make_test_tokenizer(directory, image_size=28, num_image_tokens=4)
    return directory


@pytest.fixture(scope="module")
def ours(tok_dir):
    return PaliGemmaProcessor.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoProcessor.from_pretrained(tok_dir)


def assert_same(ours_out, hf_out, labels: bool):
    keys = ["input_ids", "attention_mask", "token_type_ids", "pixel_values"] + (["labels"] if labels else [])
    assert sorted(ours_out) == sorted(keys)
    for key in keys:
        assert ours_out[key].dtype == (torch.float32 if key == "pixel_values" else torch.long), key
        assert torch.equal(ours_out[key], hf_out[key].to(ours_out[key].dtype)), key  # pixels bit-identical


def test_hf_reads_our_files(ours, hf):
    assert type(hf.image_processor).__name__ == "SiglipImageProcessorPil"  # torchvision absent: PIL backend
    assert hf.image_seq_length == ours.num_image_tokens == 4
    assert hf.image_token_id == ours.tokenizer.image_id
    assert hf.image_processor.size == {"height": 28, "width": 28}


def test_single(ours, hf):
    image = random_image(37, 53)
    out = ours(text="caption en", images=image)
    assert_same(out, hf(text="caption en", images=image, return_tensors="pt"), labels=False)
    tok = ours.tokenizer
    assert out["input_ids"][0].tolist() == [tok.image_id] * 4 + [tok.bos_id] + tok.encode("caption en\n")


def test_batch_ragged_left_padded(ours, hf):
    images = [random_image(30, 30), random_image(17, 64)]
    texts = ["caption en", "answer en how many circles are there in the picture?"]
    out = ours(text=texts, images=images)
    assert_same(out, hf(text=texts, images=images, return_tensors="pt", padding="longest"), labels=False)
    assert out["input_ids"][0, 0] == ours.tokenizer.pad_id and out["attention_mask"][0, 0] == 0


def test_suffix_labels(ours, hf):
    images = [random_image(29, 31), random_image(40, 12)]
    texts, suffixes = ["detect circle", "caption en"], ["<loc0010><loc0020><loc0500><loc0900> circle", "a red cat"]
    out = ours(text=texts, images=images, suffix=suffixes)
    assert_same(out, hf(text=texts, images=images, suffix=suffixes, return_tensors="pt", padding="longest"),
                labels=True)
    kept = out["labels"] != -100
    assert torch.equal(kept, out["token_type_ids"] == 1)
    assert (out["labels"][:, -1] == ours.tokenizer.eos_id).all()  # <eos> always supervised (DESIGN.md, processor)
    assert ours.decode(out["labels"][0][kept[0]]) == suffixes[0]


def test_single_suffix_string(ours, hf):
    image = random_image(28, 28)
    out = ours(text="caption en", images=image, suffix="a cat")
    assert_same(out, hf(text="caption en", images=image, suffix="a cat", return_tensors="pt"), labels=True)


def test_several_images_per_prompt(ours, hf):
    images = [[random_image(20, 30), random_image(33, 21)], [random_image(28, 28)]]
    texts = ["compare", "caption en"]
    out = ours(text=texts, images=images)
    assert_same(out, hf(text=texts, images=images, return_tensors="pt", padding="longest"), labels=False)
    assert out["pixel_values"].shape == (3, 3, 28, 28)
    assert (out["input_ids"][0] == ours.tokenizer.image_id).sum() == 8


def test_explicit_image_tokens(ours, hf):
    images = [[random_image(20, 30), random_image(33, 21)], [random_image(28, 28), random_image(9, 9)]]
    texts = ["<image><image>compare these", "<image>one <image>two"]
    out = ours(text=texts, images=images, suffix=["same", "different"])
    expected = hf(text=texts, images=images, suffix=["same", "different"], return_tensors="pt", padding="longest")
    assert_same(out, expected, labels=True)


def test_trailing_newline_is_stripped(ours, hf):
    """DESIGN.md, processor: "prompt\\n" must not become "prompt\\n\\n" (HF would produce the double newline)."""
    image = random_image(28, 28)
    out = ours(text="caption en\n", images=image)
    assert_same(out, hf(text="caption en", images=image, return_tensors="pt"), labels=False)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "1", "I;16", "F"])
def test_pixel_parity_modes(ours, hf, mode):
    if mode == "I;16":
        image = Image.fromarray(RNG.integers(0, 65536, (23, 41), dtype=np.uint16))
    elif mode == "P+transparency":
        image = random_image(23, 41, "P")
        image.info["transparency"] = 7
    else:
        image = random_image(23, 41, "RGBA").convert(mode)
    ours_pixels = ours(text="x", images=image)["pixel_values"]
    if mode == "I;16":  # transformers clips 16-bit values to 255 (all white); we scale them to 8 bit first
        image = Image.fromarray(np.rint(np.asarray(image) * (255 / 65535)).astype(np.uint8))
    hf_pixels = hf(text="x", images=image, return_tensors="pt")["pixel_values"]
    assert ours_pixels.shape == (1, 3, 28, 28) and ours_pixels.dtype == torch.float32
    assert torch.equal(ours_pixels, hf_pixels), (ours_pixels - hf_pixels).abs().max()


@pytest.mark.parametrize("size", [(9, 13), (28, 28), (97, 61)])
def test_pixel_parity_sizes(ours, hf, size):
    image = random_image(*size)
    assert torch.equal(ours(text="x", images=image)["pixel_values"],
                       hf(text="x", images=image, return_tensors="pt")["pixel_values"])


def test_rgba_composited_on_white(ours):
    clear = Image.new("RGBA", (5, 5), (255, 0, 0, 0))
    assert (ours(text="", images=clear)["pixel_values"] == 1.0).all()


def test_batchfeature_to(ours):
    out = ours(text="x", images=random_image(8, 8)).to("cpu", dtype=torch.bfloat16)
    assert isinstance(out, BatchFeature)
    assert out.pixel_values.dtype == torch.bfloat16 and out.input_ids.dtype == torch.long
    assert out.to(torch.float16)["pixel_values"].dtype == torch.float16


def test_batch_decode(ours, hf):
    out = ours(text=["caption en", "detect cat"], images=[random_image(8, 8)] * 2, suffix=["a dog", "<loc0001> cat"])
    assert ours.batch_decode(out["input_ids"]) == ["caption en\na dog", "detect cat\n<loc0001> cat"]
    assert ours.batch_decode(out["input_ids"]) == hf.batch_decode(out["input_ids"], skip_special_tokens=True)
    assert ours.decode(out["input_ids"][1], skip_special_tokens=False).startswith("<image>")


def test_save_and_reload(ours, hf, tmp_path):
    ours.save_pretrained(tmp_path)
    again = PaliGemmaProcessor.from_pretrained(tmp_path)
    assert (again.image_size, again.num_image_tokens, again.image_mean) == (28, 4, (0.5, 0.5, 0.5))
    hf.save_pretrained(tmp_path / "hf")  # transformers v5 writes processor_config.json instead
    from_hf = PaliGemmaProcessor.from_pretrained(tmp_path / "hf")
    assert (from_hf.image_size, from_hf.num_image_tokens) == (28, 4)
    assert len(from_hf.tokenizer) == len(ours.tokenizer)


def test_sizes_from_config_json(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 56, "patch_size": 14}}))
    proc = PaliGemmaProcessor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.num_image_tokens) == (56, 16)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 56, "width": 56},
                                                                  "image_seq_length": 64}))
    with pytest.raises(CheckpointError, match="image_seq_length"):
        PaliGemmaProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        PaliGemmaProcessor.from_pretrained(tmp_path)


def test_input_errors(ours, tmp_path):
    image = random_image(8, 8)
    with pytest.raises(InputError, match="2 image entries for 1 prompts"):
        ours(text="x", images=[image, image])
    with pytest.raises(InputError, match="1 image entries for 2 prompts"):
        ours(text=["a", "b"], images=image)
    with pytest.raises(InputError, match="int64 array"):  # uint8 / uint16 / float arrays are accepted (images.py)
        ours(text="x", images=np.zeros((8, 8, 3), np.int64))
    with pytest.raises(InputError, match="empty batch"):
        ours(text=[], images=[])
    with pytest.raises(InputError, match="needs an image"):
        ours(text="x")
    with pytest.raises(InputError, match="empty image list"):
        ours(text=["x"], images=[[]])
    with pytest.raises(InputError, match="suffix"):
        ours(text=["a", "b"], images=[image, image], suffix="c")
    with pytest.raises(InputError, match="2 <image> tokens for 1 images"):
        ours(text="<image><image>x", images=image)
    with pytest.raises(ValueError):  # InputError is a ValueError
        ours(text=[3], images=[image])
