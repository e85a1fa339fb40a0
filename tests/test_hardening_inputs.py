"""Issue 10, inputs: images, text and numbers, the model boundary, generation, training data and flags,
and the command line (one `error:` line, non-zero exit, no traceback, for every bad input).

Inputs are built here; the model is conftest's tiny random PaliGemma 1 (or a copy with a short context)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import paligemma
from paligemma import api
from paligemma.cli import main as cli_main
from paligemma.errors import InputError, PaliGemmaError
from paligemma.generation import NonFiniteLogitsError, SamplingConfig
from paligemma.images import as_image, load_image, to_rgb
from paligemma.testing import tiny_config, write_random_checkpoint
from paligemma.train import Example, TrainConfig, TrainingDiverged, check_lengths, load_jsonl, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pg1(pg1_dir):
    return paligemma.load(pg1_dir, quantize=None)


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    """The tiny PG1 with a 24-token context: 4 image tokens leave about 20 for text."""
    return write_random_checkpoint(tmp_path_factory.mktemp("short"), tiny_config("pg1", max_position_embeddings=24))


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(p)
    return p


# ------------------------------------------------------------------------------------------ images
def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    gray = np.full((8, 8), 32768, np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    rgb = np.asarray(to_rgb(load_image(tmp_path / "g16.png")))
    assert rgb.shape == (8, 8, 3) and (rgb == 128).all()  # 32768 * 255 / 65535 = 127.5 -> 128 (was 255)


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert (np.asarray(to_rgb(load_image(tmp_path / "f.tif"))) == 128).all()  # was 0 or 1: near black


def test_32bit_integer_and_wide_float_images_use_their_range():
    a = np.array([[0, 1000], [2000, 4000]], np.int32)
    assert np.asarray(to_rgb(Image.fromarray(a)))[..., 0].tolist() == [[0, 4], [8, 16]]  # as 16-bit: x * 255/65535
    f = np.array([[-1.0, 0.0], [1.0, 3.0]], np.float32)
    assert np.asarray(to_rgb(Image.fromarray(f)))[..., 0].tolist() == [[0, 64], [128, 255]]  # min..max
    with pytest.raises(InputError, match="NaN"):
        to_rgb(Image.fromarray(np.array([[np.nan, 1.0]], np.float32)))


def test_zero_size_and_oversized_images_are_refused(tmp_path):
    with pytest.raises(InputError, match="0x0 pixels"):
        as_image(Image.new("RGB", (0, 0)))
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="20,000 pixels, over the limit of 10,000"):
        load_image(tmp_path / "big.png", max_pixels=10_000)
    assert load_image(tmp_path / "big.png").size == (200, 100)


def test_decompression_bomb_gets_its_own_message(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL now raises DecompressionBombError on open
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png", max_pixels=10**9)
    monkeypatch.undo()
    monkeypatch.setattr("paligemma.images.MAX_PIXELS", 5000)
    with pytest.raises(InputError, match="over the limit of 5,000"):
        load_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("array,size", [
    (np.zeros((5, 7), np.uint8), (7, 5)), (np.zeros((5, 7, 3), np.uint8), (7, 5)),
    (np.zeros((5, 7, 4), np.uint8), (7, 5)), (np.full((5, 7), 65535, np.uint16), (7, 5)),
    (np.full((5, 7, 3), 0.5), (7, 5)), (np.ones((5, 7, 1), bool), (7, 5)),
    (torch.rand(3, 5, 7), (7, 5)), (torch.rand(5, 7), (7, 5)), (torch.rand(3, 5, 7, dtype=torch.float64), (7, 5)),
])
def test_arrays_and_tensors_are_accepted(array, size):
    image = as_image(array)
    assert image.size == size and to_rgb(image).mode == "RGB"


@pytest.mark.parametrize("obj,match", [
    (np.zeros((5, 7), np.int64), "int64 array"), (np.full((5, 7), 2.0), r"in \[0, 1\]"),
    (np.full((5, 7), np.nan), "NaN"), (np.zeros((5, 7, 2), np.uint8), "shape"), (np.zeros((2, 3, 4, 5)), "shape"),
    (np.zeros((0, 7), np.uint8), "empty"), (None, "NoneType"), (5, "int"), (b"\x89PNG", "bytes"),
    (torch.zeros(3, 5, 7, dtype=torch.int32), "int32"),
])
def test_other_image_objects_are_refused_naming_the_type(obj, match):
    with pytest.raises(InputError, match=match):
        as_image(obj)


def test_processor_takes_arrays_and_refuses_bad_ones(pg1):
    _, processor = pg1
    batch = processor(text="caption en", images=np.zeros((10, 10, 3), np.uint8))
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    with pytest.raises(InputError, match="image 0 of prompt 0 is a float array"):
        processor(text="caption en", images=np.full((10, 10), 9.0))


# ------------------------------------------------------------------------------------------ text and numbers
@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1.0), ("temperature", "1"),
    ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 2.5), ("top_k", -1),
    ("max_new_tokens", 2.5), ("max_new_tokens", 0), ("max_new_tokens", True), ("do_sample", "yes"),
    ("seed", "7"), ("seed", 1.5), ("eos_token_ids", ()), ("eos_token_ids", ("1",)),
])
def test_sampling_arguments_are_checked(field, value):
    with pytest.raises(InputError, match=field):
        SamplingConfig(**{field: value})


def test_any_integer_seed_is_reduced_into_the_generator_range(pg1):
    model, processor = pg1
    assert SamplingConfig(seed=2**100 + 5).seed == 5 and SamplingConfig(seed=-1).seed == 2**64 - 1
    batch = processor(text="caption en", images=Image.new("RGB", (20, 20)))
    a = model.generate(**batch, max_new_tokens=3, do_sample=True, seed=2**70)
    b = model.generate(**batch, max_new_tokens=3, do_sample=True, seed=2**70 % 2**64)
    assert torch.equal(a, b)


def test_invalid_unicode_is_refused_naming_the_source(pg1, tmp_path, png):
    _, processor = pg1
    with pytest.raises(InputError, match="prompt 0 holds invalid Unicode"):
        processor(text="caption \ud800", images=Image.new("RGB", (9, 9)))
    with pytest.raises(InputError, match="suffix 0"):
        processor(text="x", images=Image.new("RGB", (9, 9)), suffix="\udcff")
    data = tmp_path / "d.jsonl"
    good = json.dumps({"image": str(png), "prefix": "caption en", "suffix": "ok"})
    data.write_bytes((good + "\n").encode() + b'{"image": "a.png", "prefix": "\xff", "suffix": "x"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:2: not valid UTF-8"):
        load_jsonl(str(data))
    data.write_text(good + "\n\n" + good.replace("ok", "\\ud800") + "\n")
    with pytest.raises(InputError, match=r"d.jsonl:3: suffix holds invalid Unicode"):
        load_jsonl(str(data))
    with pytest.raises(InputError, match="object name holds invalid Unicode"):
        api.detect(pg1[0], processor, png, ["ca\udc80r"])


def test_model_boundary_checks_ids_and_pixels(pg1):
    model, processor = pg1
    batch = dict(processor(text="caption en", images=Image.new("RGB", (20, 20))))
    ids = batch["input_ids"].clone()
    ids[0, -1] = model.config.vocab_size + 5
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.generate(**{**batch, "input_ids": ids}, max_new_tokens=2)
    with pytest.raises(InputError, match=r"pixel_values must be a float tensor \[n_images, 3, 28, 28\]"):
        model.generate(**{**batch, "pixel_values": torch.zeros(1, 3, 30, 30)}, max_new_tokens=2)
    with pytest.raises(InputError, match="NaN"):
        model.generate(**{**batch, "pixel_values": torch.full((1, 3, 28, 28), float("nan"))}, max_new_tokens=2)


@pytest.mark.parametrize("kwargs,match", [
    ({"objects": 5}, "objects=5"), ({"objects": [1, 2]}, "list of strings"), ({"objects": None}, "needs objects"),
])
def test_api_arguments_of_the_wrong_type(pg1, png, kwargs, match):
    with pytest.raises(InputError, match=match):
        api.detect(pg1[0], pg1[1], png, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"device": "tpu"}, "tpu"), ({"dtype": torch.int8}, "int8"), ({"dtype": "int4"}, "int4"),
    *([({"device": "cuda"}, "CUDA is not available")] if not torch.cuda.is_available() else []),
])
def test_load_arguments_are_checked(pg1_dir, kwargs, match):
    with pytest.raises(InputError, match=match):
        paligemma.load(pg1_dir, **kwargs)


def test_api_lets_only_paligemma_errors_escape(pg1, png):
    """A table of bad API inputs: every one must raise a PaliGemmaError subclass and nothing else."""
    model, processor = pg1
    bad_calls = [
        lambda: api.caption(model, processor, None), lambda: api.caption(model, processor, 3.5),
        lambda: api.caption(model, processor, png, max_new_tokens=2.5),
        lambda: api.caption(model, processor, png, lang=7), lambda: api.answer(model, processor, png, 5),
        lambda: api.run_task(model, processor, png, ["detect"]),
        lambda: api.caption(model, processor, np.zeros((3, 3, 3), np.float32) - 1),
        lambda: api.caption(model, processor, torch.zeros(3, 0, 4)),
        lambda: api.segment(model, processor, png, "car", vae=png),
    ]
    for i, call in enumerate(bad_calls):
        try:
            call()
        except PaliGemmaError:
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"bad call {i} raised {type(e).__name__}: {e}")
        pytest.fail(f"bad call {i} was accepted")


# ------------------------------------------------------------------------------------------ non-finite logits
@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.7, "seed": 0}])
def test_non_finite_logits_stop_generation(pg1_dir, sampling):
    model, processor = paligemma.load(pg1_dir, quantize=None)
    batch = processor(text="caption en", images=Image.new("RGB", (20, 20)))
    with torch.no_grad():
        model.language_model.embed_tokens.weight.mul_(1e30)  # the "embeddings x 1e30"
    with pytest.raises(NonFiniteLogitsError, match="overflowed"):
        model.generate(**batch, max_new_tokens=4, **sampling)
    with torch.no_grad():
        model.language_model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        model.generate(**batch, max_new_tokens=4, **sampling)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("field,value", [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("lr", -1e-3), ("weight_decay", 1e30),
    ("weight_decay", -0.1), ("weight_decay", float("nan")), ("eval_batches", -3), ("log_every", 0),
    ("steps", 2.5), ("min_lr_ratio", 2.0), ("max_grad_norm", float("nan")), ("warmup", -1), ("seed", "0"),
    ("betas", (0.9, 1.0)),
])
def test_training_flags_are_refused_up_front(field, value):
    with pytest.raises(InputError, match=field.replace("_", "-") if field != "betas" else "betas"):
        TrainConfig(**{field: value})


def test_training_seed_of_any_size_is_accepted():
    assert TrainConfig(seed=2**80 + 3).seed == 3


@pytest.mark.parametrize("line,match", [
    ("[1, 2]", "a JSON list, expected an object"), ('"text"', "a JSON str"), ("{bad json", "not JSON"),
    ('{"image": "a.png", "prefix": "x"}', "missing"), ('{"image": "a.png", "prefix": 3, "suffix": "y"}', "prefix=3"),
    ('{"image": ["a.png"], "prefix": "x", "suffix": "y"}', "image="), ('{"image": "", "prefix": "x", "suffix": "y"}',
                                                                      "image is empty"),
    ('{"image": "nowhere.png", "prefix": "x", "suffix": "y"}', "does not exist"),
])
def test_jsonl_rows_are_validated_with_their_line_number(tmp_path, png, line, match):
    data = tmp_path / "rows.jsonl"
    good = json.dumps({"image": str(png), "prefix": "caption en", "suffix": "ok"})
    data.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(InputError, match=rf"rows.jsonl:3: .*{match}"):
        load_jsonl(str(data))


def test_over_long_examples_are_refused_with_a_count(short_dir, png):
    _, processor = paligemma.load(short_dir)
    image = Image.open(png)
    examples = [Example(image, "caption en", "short", "f:1"), Example(image, "caption en", "word " * 40, "f:2"),
                Example(image, "caption en " * 30, "x", "f:3")]
    with pytest.raises(InputError, match=r"2 of 3 training examples are longer than the model's context of 24 "
                                         r"tokens .*the longest, f:\d, has \d+"):
        check_lengths(processor, examples, 24)
    check_lengths(processor, examples[:1], 24)


def test_divergence_stops_keeps_the_checkpoint_and_saves_nothing(short_dir, png, tmp_path):
    model, processor = paligemma.load(short_dir, quantize=None)
    examples = [Example(Image.open(png), "caption en", "ok", "f:1")] * 2
    cfg = TrainConfig(steps=1, batch_size=2, warmup=0, progress=False, eval_batches=1)
    out = tmp_path / "out"
    train(model, processor, examples, cfg, out_dir=str(out))
    ckpt = (out / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        model.multi_modal_projector.linear.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"step 1: loss=nan.*checkpoint.pt is kept"):
        train(model, processor, examples, cfg, out_dir=str(out))
    assert (out / "checkpoint.pt").read_bytes() == ckpt


def test_resume_from_another_model_or_a_partial_checkpoint(pg1_dir, short_dir, png, tmp_path):
    model, processor = paligemma.load(short_dir, quantize=None)
    examples = [Example(Image.open(png), "caption en", "ok", "f:1")] * 2
    cfg = TrainConfig(steps=1, batch_size=2, warmup=0, progress=False, eval_batches=1)
    out = tmp_path / "out"
    train(model, processor, examples, cfg, out_dir=str(out))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    del ck["optimizer"]
    torch.save(ck, out / "partial.pt")
    from paligemma.train import load_checkpoint

    with pytest.raises(InputError, match="lacks optimizer"):
        load_checkpoint(str(out / "partial.pt"), model, None, None)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["model"] = {k: v[..., :1] if v.ndim else v for k, v in ck["model"].items()}
    ck["model"]["extra.weight"] = torch.zeros(1)
    torch.save(ck, out / "other.pt")
    with pytest.raises(InputError, match="from another model .*unknown tensor.*another shape"):
        load_checkpoint(str(out / "other.pt"), model, None, None)


# ------------------------------------------------------------------------------------------ command line
def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli_main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return rc, err


def _one_error(rc: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0 and "Traceback" not in err, err
    assert 1 <= len(lines) <= 3 and all(line.startswith("error:") for line in lines), err


def _cli_cases(tmp: Path, model: Path, png: Path, data: Path) -> list[list]:
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "file").write_text("x")
    os.symlink(tmp / "loop2", tmp / "loop1")
    os.symlink(tmp / "loop1", tmp / "loop2")
    m, i = ["--model", model], ["--image", png]
    base = ["train", "--model", model, "--data", data, "--steps", "1", "--no-progress", "--out"]
    train = [*base, tmp / "out"]
    return [
        [*m, *i, "--temperature", "nan"], [*m, *i, "--top-p", "nan"], [*m, *i, "--top-k", "2.5"],
        [*m, *i, "--temperature", "inf", "--do-sample"], [*m, *i, "--max-tokens", "0"],
        [*m, "--image", tmp / "empty.png"], [*m, "--image", tmp], ["--model", tmp / "loop1", *i],
        ["--model", tmp / "file", *i], [*m, *i, "--prompt", "caption \udcff"], [*m, *i, "--objects", "\ud800",
                                                                                  "--task", "detect"],
        [*train, "--lr", "nan"], [*train, "--lr", "inf"], [*train, "--log-every", "0"],
        [*train, "--eval-batches", "-3"], [*train, "--weight-decay", "1e30"],
        [*train, "--freeze", "vision", "projector", "llm"], [*base, tmp / "file"],
        [*train, "--steps", "x"], [*train, "--device", "cuda"] if not torch.cuda.is_available() else [*train, "--bogus"],
    ]


def test_cli_bad_inputs_give_one_error_line(pg1_dir, png, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": str(png), "prefix": "caption en", "suffix": "ok"}) + "\n")
    for argv in _cli_cases(tmp_path, pg1_dir, png, data):
        rc, err = _cli(capsys, *argv)
        try:
            _one_error(rc, err)
        except AssertionError as e:
            raise AssertionError(f"{argv}: {e}") from None


def test_cli_accepts_a_16bit_image_and_a_huge_seed(pg1_dir, tmp_path, capsys):
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(tmp_path / "g16.png")
    rc, err = _cli(capsys, "--model", pg1_dir, "--image", tmp_path / "g16.png", "--max-tokens", "2",
                   "--do-sample", "--seed", str(2**80), "--no-stream")
    assert rc == 0, err


def test_cli_fifo_weights_fail_fast_in_a_subprocess(pg1_dir, tmp_path, png):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(pg1_dir, d)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    out = subprocess.run([sys.executable, "-m", "paligemma.cli", "--model", str(d), "--image", str(png)],
                         capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _one_error(out.returncode, out.stderr)
    assert "FIFO" in out.stderr
