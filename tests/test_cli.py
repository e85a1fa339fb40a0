"""Tests for paligemma/cli/ and run_inference.py: `main([...])` in-process on a tiny random checkpoint
(conftest's `pg1_dir`), plus one subprocess run of the real entry points to show that no traceback
reaches the user. The random model's text is gibberish; the tests check plumbing, not answers."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_inference
from paligemma import cli
from paligemma.cli import common, run
from paligemma.segmentation import CODEBOOK_KEY, expected_shapes, save_safetensors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 30), (50, 50)]):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def variant(src: Path, dst: Path, **text_config) -> Path:
    """A copy of a checkpoint with text_config fields changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"].update(text_config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def call(capsys, *argv, entry=cli.main):
    rc = entry([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_caption_end_to_end(pg1_dir, images, capsys):
    rc, out, err = call(capsys, "--model", pg1_dir, "--image", images[0], "--prompt", "caption en",
                        "--max-tokens", 5, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["prompt"] == "caption en" and doc["task"] == "caption" and doc["model"] == str(pg1_dir)
    (row,) = doc["results"]
    assert set(row) == {"image", "task", "prompt", "text", "objects", "problems", "output"}
    assert row["image"] == images[0] and isinstance(row["text"], str) and row["objects"] is None


def test_json_detect_gives_parse_result_not_crash(pg1_dir, images, capsys):
    rc, out, err = call(capsys, "--model", pg1_dir, "--image", images[0], "--task", "detect",
                        "--objects", "car ; dog", "--max-tokens", 12, "--json")
    assert rc == 0, err
    row = json.loads(out)["results"][0]
    assert row["prompt"] == "detect car ; dog"
    assert isinstance(row["objects"], list) and isinstance(row["problems"], list)
    assert row["objects"] or row["problems"]  # gibberish from a random model is reported, not raised
    for obj in row["objects"]:
        assert set(obj) >= {"label", "box", "loc", "mask"} and len(obj["box"]) == 4


def test_segment_with_vae_file(pg1_dir, images, tmp_path, capsys):
    vae = tmp_path / "vae.safetensors"
    save_safetensors({k: np.zeros(s, np.float32) for k, s in expected_shapes(4).items()}, vae)
    assert CODEBOOK_KEY in expected_shapes(4)
    rc, out, err = call(capsys, "--model", pg1_dir, "--image", images[0], "--task", "segment",
                        "--objects", "cat", "--vae", vae, "--max-tokens", 8, "--json")
    assert rc == 0, err
    assert json.loads(out)["results"][0]["task"] == "segment"


def test_several_images_batched(pg1_dir, images, capsys):
    rc, out, err = call(capsys, "--model", pg1_dir, "--image", *images, "--prompt", "caption en",
                        "--max-tokens", 6)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(images[0] + ": ") and lines[1].startswith(images[1] + ": ")
    for path, line in zip(images, lines):  # each row as if run alone
        _, alone, _ = call(capsys, "--model", pg1_dir, "--image", path, "--prompt", "caption en",
                           "--max-tokens", 6, "--no-stream")
        assert line == f"{path}: {alone.rstrip(chr(10))}"
    _, one_by_one, _ = call(capsys, "--model", pg1_dir, "--image", *images, "--prompt", "caption en",
                            "--max-tokens", 6, "--batch-size", 1)
    assert one_by_one == out


def test_output_png_has_original_size(pg1_dir, images, tmp_path, capsys):
    out = tmp_path / "drawn.png"
    rc, _, err = call(capsys, "--model", pg1_dir, "--image", images[0], "--task", "detect", "--objects", "car",
                      "--max-tokens", 8, "--output", out)
    assert rc == 0, err
    assert Image.open(out).size == Image.open(images[0]).size
    rc, _, err = call(capsys, "--model", pg1_dir, "--image", *images, "--task", "detect", "--objects", "car",
                      "--max-tokens", 4, "--output", out)
    assert rc == 0, err
    for i, src in enumerate(images, 1):
        assert Image.open(tmp_path / f"drawn-{i}.png").size == Image.open(src).size


def test_streaming_equals_non_streaming(pg1_dir, images, capsys):
    args = ["--model", pg1_dir, "--image", images[1], "--prompt", "caption en", "--max-tokens", 12]
    rc1, streamed, _ = call(capsys, *args)
    rc2, printed, _ = call(capsys, *args, "--no-stream")
    assert rc1 == rc2 == 0 and streamed == printed and streamed.endswith("\n")


def test_line_stream_strips_like_the_printed_text():
    out = io.StringIO()
    s = run.LineStream(out)
    for piece in ["  a", " b ", " ", "c  "]:
        s(piece)
    assert out.getvalue() == "a b  c"  # the trailing "  " is held back
    s.finish("a b  c")
    assert out.getvalue() == "a b  c\n"


def test_temp_alias_and_seeded_sampling(pg1_dir, images, capsys):
    base = ["--model", pg1_dir, "--image", images[0], "--prompt", "caption en", "--max-tokens", 8, "--seed", 3]
    _, a, _ = call(capsys, *base, "--temp", 1.5)
    _, b, _ = call(capsys, *base, "--temperature", 1.5)
    assert a == b and a.strip()
    assert run.sampling_options(run.build_parser().parse_args(["--temp", "0.7"])).do_sample
    assert run.sampling_options(run.build_parser().parse_args([])).greedy  # greedy by default


def bad_cases(ckpt: Path, img: str, tmp: Path) -> dict:
    """name -> (argv, exit status, text the one error line must contain)."""
    empty = tmp / "empty"
    empty.mkdir()
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, no_weights / f.name)
    truncated = tmp / "truncated"
    shutil.copytree(ckpt, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    short = variant(ckpt, tmp / "short", max_position_embeddings=16)
    not_image = tmp / "notes.png"
    not_image.write_text("not a picture")
    m = ["--model", ckpt, "--image", img]
    return {
        "missing model": (["--model", tmp / "nope", "--image", img], 1, "does not exist"),
        "no config": (["--model", empty, "--image", img], 1, "config.json"),
        "no weights": (["--model", no_weights, "--image", img], 1, "model.safetensors"),
        "truncated weights": (["--model", truncated, "--image", img], 1, "truncated"),
        "missing image": (["--model", ckpt, "--image", tmp / "none.png"], 1, "does not exist"),
        "not an image": (["--model", ckpt, "--image", not_image], 1, "not an image"),
        "prompt too long": (["--model", short, "--image", img, "--prompt", "caption " + "en " * 40], 1, "context"),
        "max tokens too many": (["--model", short, "--image", img, "--max-tokens", 50], 1, "context"),
        "max tokens zero": ([*m, "--max-tokens", 0], 2, "--max-tokens"),
        "unknown task": ([*m, "--task", "dance"], 2, "invalid choice"),
        "detect without objects": ([*m, "--task", "detect"], 2, "--objects"),
        "answer without question": ([*m, "--task", "answer"], 2, "--question"),
        "prompt and task": ([*m, "--task", "ocr", "--prompt", "ocr"], 2, "not allowed"),
        "no image": (["--model", ckpt, "--prompt", "caption en"], 2, "--image"),
        "segment without vae": ([*m, "--task", "segment", "--objects", "cat"], 1, "vae-oid.npz"),
        "bad output format": ([*m, "--output", tmp / "out.xyz"], 2, "unknown image format"),
        "bad top-p": ([*m, "--temp", 1, "--top-p", 0], 2, "--top-p"),
    }


def test_bad_input_gives_one_line_and_exit_status(pg1_dir, images, tmp_path, capsys):
    for name, (argv, status, needle) in bad_cases(pg1_dir, images[0], tmp_path).items():
        rc, out, err = call(capsys, *argv)
        assert rc == status, (name, rc, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, (name, err)
        assert "Traceback" not in err and out == "", name


def test_default_model_missing_says_pass_model(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_MODEL", tmp_path / "shapes-tiny")
    rc, _, err = call(capsys, "--image", images[0])
    assert rc == 1 and "shipped model" in err and "--model" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_unavailable_device(pg1_dir, images, capsys):
    rc, _, err = call(capsys, "--model", pg1_dir, "--image", images[0], "--device", "cuda")
    assert rc == 1 and "CUDA is not available" in err


def test_interrupt_is_quiet_and_bugs_keep_their_traceback(pg1_dir, images, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "load_checkpoint", interrupted)
    rc, _, err = call(capsys, "--model", pg1_dir, "--image", images[0])
    assert rc == 130 and err == "interrupted\n"

    def bug(*a, **k):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(run, "load_checkpoint", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["--model", str(pg1_dir), "--image", images[0]])


def test_train_subcommand_delegates(monkeypatch):
    import paligemma.train

    seen = []
    monkeypatch.setattr(paligemma.train, "train_main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["train", "--data", "x.jsonl"]) == 0 and seen == [["--data", "x.jsonl"]]


def test_run_inference_flags(pg1_dir, images, capsys):
    seed_style = ["--model_path", pg1_dir, "--prompt", "caption en", "--image_file_path", images[0],
                  "--max_tokens_to_generate", 7]
    rc, out, err = call(capsys, *seed_style, "--temperature", 0.8, "--top_p", 0.9, "--do_sample", "False",
                        "--only_cpu", "True", entry=run_inference.main)
    assert rc == 0, err
    _, greedy, _ = call(capsys, "--model", pg1_dir, "--image", images[0], "--prompt", "caption en",
                        "--max-tokens", 7)
    assert out == greedy
    rc, out, _ = call(capsys, *seed_style, "--do_sample", "True", "--seed", 1, entry=run_inference.main)
    assert rc == 0 and out.strip()
    rc, _, err = call(capsys, *seed_style, "--do_sample", "maybe", entry=run_inference.main)
    assert rc == 2 and err.count("\n") == 1 and "True or False" in err
    args = run_inference.build_parser().parse_args(["--image_file_path", "x.png", "--only_cpu", "False"])
    assert "auto" in run_inference.to_cli_args(args) and "--do-sample" not in run_inference.to_cli_args(args)


def test_entry_points_in_a_subprocess(pg1_dir, images, tmp_path):
    """The real `python run_inference.py` and `paligemma` console script: an answer, and a clean error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "run_inference.py", "--model_path", str(pg1_dir), "--prompt", "caption en",
                         "--image_file_path", images[0], "--max_tokens_to_generate", "4", "--only_cpu", "True"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.endswith("\n") and ok.stderr == "", ok.stderr
    script = Path(sys.executable).parent / "paligemma"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "paligemma.cli"]
    bad = subprocess.run([*cmd, "--model", str(pg1_dir), "--image", str(tmp_path / "missing.png")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: image file") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_progress_line_positional_images_and_quantize(pg1_dir, images, capsys):
    model, processor = common.load_checkpoint(Path(pg1_dir), None, "cpu", progress=True)
    err = capsys.readouterr().err
    assert err.startswith(f"loading {pg1_dir} (") and " MB)... done in " in err and err.count("\n") == 1
    rc, out, err = call(capsys, "--model", pg1_dir, images[0], "--max-tokens", 4)  # positional image, caption
    _, flagged, _ = call(capsys, "--model", pg1_dir, "--image", images[0], "--prompt", "caption en",
                         "--max-tokens", 4)
    assert rc == 0 and out == flagged, err
    assert common.quantize_formats() == ("int8", "bf16", "fp32")
    rc, out, err = call(capsys, "--model", pg1_dir, images[0], "--max-tokens", 4, "--quantize", "int8")
    assert rc == 0 and out.endswith("\n"), err
    # auto (the default) on an fp32 checkpoint is the plain model, as `none` asks explicitly
    rc, plain, err = call(capsys, "--model", pg1_dir, images[0], "--max-tokens", 4, "--quantize", "none")
    assert rc == 0 and plain == flagged, err


def test_demo_captions_counts_and_draws(pg1_dir, images, tmp_path, capsys):
    out = tmp_path / "demo.png"
    code, stdout, _ = call(capsys, "demo", "--model", str(pg1_dir), "--image", images[0], "--output", str(out))
    assert code == 0
    assert [line.split(":")[0] for line in stdout.splitlines()[:3]] == ["image", "caption", "count"]
    from PIL import Image

    assert Image.open(out).size == Image.open(images[0]).size


def test_shipped_model_from_the_cli_on_an_unseen_scene(tmp_path, capsys):
    """The default model, through `paligemma --json`, on a held-out scene upscaled 4x: the caption and
    the boxes (in the picture's own pixels) agree with the scene generator's ground truth."""
    from paligemma.shapes import synthetic
    from paligemma.shapes.evaluate import box_iou

    scene = synthetic.make_scene(synthetic.split_seeds("test", 1, start=123)[0])
    path = tmp_path / "scene.png"
    scene.image.resize((256, 256), Image.Resampling.NEAREST).save(path)
    code, out, _ = call(capsys, "--image", path, "--task", "caption", "--json")
    assert code == 0 and json.loads(out)["results"][0]["text"] == synthetic.caption(scene)
    for kind in sorted({s.kind for s in scene.shapes}):
        code, out, _ = call(capsys, "--image", path, "--task", "detect", "--objects", kind, "--json")
        found = [o["box"] for o in json.loads(out)["results"][0]["objects"]]
        truth = [[4 * v for v in s.box] for s in scene.shapes if s.kind == kind]
        assert code == 0 and len(found) == len(truth)
        assert all(box_iou(f, t) > 0.5 for f, t in zip(found, truth))  # the usual detection match threshold
