"""Tests for paligemma/batch: inputs (folder, JSONL, Parquet), per-row failures, resume, a real SIGKILL
mid-run then resume, the Ray engine against the local one, the COCO export and the CLI's errors.
All on the shipped model and a handful of synthetic scenes; answers are checked against the same model
run one image at a time through `paligemma.api` (a batched row must equal its solo run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import paligemma
from paligemma import api, cli
from paligemma.batch import Columns, run_batch
from paligemma.batch.labeller import collate
from paligemma.batch.sinks import ParquetSink, open_sink
from paligemma.batch.sources import open_source
from paligemma.shapes.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]
N_SCENES = 4


@pytest.fixture(scope="module")
def shipped():
    return paligemma.load(paligemma.SHAPES_TINY, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """4 scenes (two in a subfolder), one file that is not an image, one text file (not an image extension)."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "sub").mkdir()
    for i in range(N_SCENES):
        make_scene(20_000_000 + i).image.save(root / ("sub" if i < 2 else ".") / f"s{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def solo(shipped, path, task, **kw):
    model, processor = shipped
    return api.run_task(model, processor, str(path), task, **kw)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_folder_to_jsonl_matches_solo_runs_and_records_failures(shipped, folder, tmp_path):
    model, processor = shipped
    out = tmp_path / "out.jsonl"
    summary = run_batch(folder, out, model, processor, task="detect", objects="circle ; square", batch_size=4,
                        progress=False)
    rows = read_jsonl(out)
    ids = [r["id"] for r in rows]
    assert ids == ["broken.png", "s2.png", "s3.png", "sub/s0.png", "sub/s1.png"]  # sorted, recursive
    assert (summary.done, summary.skipped, summary.failed) == (N_SCENES + 1, 0, 1)
    broken = rows[0]
    assert "broken.png" in broken["error"] and "not an image" in broken["error"] and broken["text"] is None
    for row in rows[1:]:
        want = solo(shipped, folder / row["id"], "detect", objects="circle ; square")
        assert row["error"] is None and row["prompt"] == "detect circle ; square" and row["task"] == "detect"
        assert row["text"] == want.text
        assert [o["box"] for o in row["objects"]] == [[round(v, 3) for v in d.box] for d in want.objects]
        assert (row["width"], row["height"]) == (64, 64) and row["timings"]["batch_rows"] >= 1
    assert sum(len(r["objects"]) for r in rows[1:]) > 0  # the shipped model does find shapes


def test_jsonl_input_per_row_prompts_and_bad_lines(shipped, folder, tmp_path):
    model, processor = shipped
    src = tmp_path / "rows.jsonl"
    lines = [
        json.dumps({"image": str(folder / "s2.png")}),                                   # the default prompt
        json.dumps({"image": "../" + folder.name + "/s3.png", "task": "answer", "question": "how many shapes?"}),
        "{not json",                                                                       # line 3
        json.dumps({"prompt": "caption en"}),                                              # line 4: no image
        "",
        json.dumps({"image": str(folder / "sub" / "s0.png"), "task": "detect", "objects": "triangle", "id": "k4"}),
        json.dumps({"image": str(folder / "sub" / "s1.png"), "id": "k4"}),                         # line 7: duplicate id
        json.dumps({"image": str(folder / "missing.png")}),
        json.dumps({"image": str(folder / "s2.png"), "prompt": "caption en " + "word " * 300}),  # over-long prompt
    ]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    run_batch(src, out, model, processor, task="caption", batch_size=3, progress=False)
    rows = {r["id"]: r for r in ParquetSink(out).rows()}
    assert len(rows) == 8 and not out.with_name("out.parquet.parts").exists()  # assembled, shards gone
    first = rows[str(folder / "s2.png")]
    assert first["error"] is None and first["text"] == solo(shipped, folder / "s2.png", "caption").text
    answer = rows["../" + folder.name + "/s3.png"]  # relative to the JSONL's folder
    assert answer["prompt"] == "answer en how many shapes?"
    assert answer["text"] == solo(shipped, folder / "s3.png", "answer", text="how many shapes?").text
    assert rows["k4"]["task"] == "detect" and rows["k4"]["error"] is None
    assert "line 3" in rows["line-3"]["error"] and "JSON" in rows["line-3"]["error"]
    assert "line 4" in rows["line-4"]["error"] and "no image" in rows["line-4"]["error"]
    assert "line 7" in rows["k4#2"]["error"] and "duplicate id" in rows["k4#2"]["error"]
    assert "does not exist" in rows[str(folder / "missing.png")]["error"]
    long = rows[str(folder / "s2.png") + "#2"]
    assert "context" in long["error"] and long["text"] is None


def test_parquet_input_with_bytes_and_configured_columns(shipped, folder, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    model, processor = shipped
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "key": ["a", "b", None],
        "img": [(folder / "s2.png").read_bytes(), (folder / "s3.png").read_bytes(), b"\x89PNG truncated"],
        "q": ["caption en", "answer en how many shapes?", "caption en"],
    }), src)
    out = tmp_path / "out.jsonl"
    run_batch(src, out, model, processor, columns=Columns(image="img", prompt="q", id="key"), progress=False)
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"a", "b", "row-2"}
    assert rows["a"]["text"] == solo(shipped, folder / "s2.png", "caption").text
    assert rows["b"]["text"] == solo(shipped, folder / "s3.png", "answer", text="how many shapes?").text
    assert "could not be decoded" in rows["row-2"]["error"] or "not an image" in rows["row-2"]["error"]


def test_hf_datasets_image_struct(folder, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": [{"bytes": None, "path": "s2.png"},
                                       {"bytes": (folder / "s3.png").read_bytes(), "path": "x.png"}]}), src)
    items = list(open_source(src))
    assert [(i.id, i.path is not None, i.data is not None) for i in items] == [("s2.png", True, False),
                                                                              ("x.png", False, True)]


def test_resume_skips_done_rows_and_cuts_a_torn_line(shipped, folder, tmp_path):
    model, processor = shipped
    out = tmp_path / "out.jsonl"
    run_batch(folder, out, model, processor, batch_size=2, progress=False)  # captions: short answers
    full = out.read_text().splitlines(keepends=True)
    out.write_text("".join(full[:3]) + full[3][:25])  # three whole rows, then a row torn mid-write
    summary = run_batch(folder, out, model, processor, batch_size=2, progress=False)
    assert (summary.skipped, summary.done) == (3, len(full) - 3)
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(json.loads(line)["id"] for line in full)  # each exactly once
    assert {r["id"]: r["text"] for r in rows} == {json.loads(x)["id"]: json.loads(x)["text"] for x in full}
    again = run_batch(folder, out, model, processor, progress=False)
    assert (again.done, again.skipped) == (0, len(full))


def test_parquet_resume_ignores_an_interrupted_shard(shipped, folder, tmp_path):
    model, processor = shipped
    out = tmp_path / "out.parquet"
    sink = open_sink(out)
    sink.write([{"id": "s2.png", "image": "s2.png", "prompt": "caption en", "task": "caption", "text": "x",
                 "objects": None, "problems": [], "width": 64, "height": 64, "error": None,
                 "timings": {"load_s": 0.0, "generate_s": 0.0, "batch_rows": 1, "new_tokens": 2}}])
    sink.checkpoint()  # a shard renamed into place; the run is then "killed" before assembling
    (out.with_name("out.parquet.parts") / "part-000001.parquet.tmp").write_bytes(b"half a shard")
    summary = run_batch(folder, out, model, processor, progress=False)
    assert (summary.skipped, summary.done) == (1, N_SCENES)
    rows = list(ParquetSink(out).rows())
    assert sorted(r["id"] for r in rows) == sorted(["broken.png"] + [p.relative_to(folder).as_posix()
                                                                     for p in folder.rglob("s*.png")])
    assert not out.with_name("out.parquet.parts").exists()


def test_sigkill_mid_run_then_resume_gives_each_input_once(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(8):
        make_scene(20_000_100 + i).image.save(images / f"{i:02d}.png")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "paligemma.cli", "batch", "--input", str(images), "--output", str(out),
           "--batch-size", "1", "--task", "detect", "--objects", "circle ; square ; triangle"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.stat().st_size > 0):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the first checkpoint could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes().count(b"\n")
    assert 1 <= written < 8, "the kill should land mid-run"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == [f"{i:02d}.png" for i in range(8)]
    assert all(r["error"] is None for r in rows)
    assert f"skipped {written}" in done.stdout


def test_ray_engine_gives_the_local_rows(folder, tmp_path):
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Ray cannot be imported here ({e}); install with pip install '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        ray_out, local_out = tmp_path / "ray.parquet", tmp_path / "local.jsonl"
        kw = dict(task="detect", objects="circle ; square", batch_size=2, progress=False)
        summary = run_batch(folder, ray_out, engine="ray", concurrency=1, num_cpus=2, **kw)
        assert ray.is_initialized()  # a Ray the caller started is left running
    finally:
        ray.shutdown()
    run_batch(folder, local_out, **kw)
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    got = sorted((strip(r) for r in ParquetSink(ray_out).rows()), key=lambda r: r["id"])
    want = sorted((strip(r) for r in read_jsonl(local_out)), key=lambda r: r["id"])
    assert summary.done == N_SCENES + 1 and got == want


def test_collate_pads_like_the_processor(shipped, folder):
    model, processor = shipped
    images = [make_scene(20_000_000).image, make_scene(20_000_001).image]
    prompts = ["caption en", "answer en how many shapes are there in this image?"]
    whole = processor(text=prompts, images=images)
    parts = collate([dict(processor(text=[p], images=[im])) for p, im in zip(prompts, images)],
                    processor.tokenizer.pad_id)
    assert set(parts) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}
    for key, value in parts.items():
        assert torch.equal(value, whole[key]), key


def test_coco_export(shipped, folder, tmp_path):
    model, processor = shipped
    out = tmp_path / "boxes.jsonl"
    summary = run_batch(folder, out, model, processor, task="detect", objects="circle", coco=True, progress=False)
    doc = json.loads(summary.coco.read_text())
    rows = [r for r in read_jsonl(out) if r["error"] is None]
    assert summary.coco == tmp_path / "boxes.coco.json" and len(doc["images"]) == len(rows) == N_SCENES
    assert len(doc["annotations"]) == sum(len(r["objects"]) for r in rows) > 0
    names = {c["id"]: c["name"] for c in doc["categories"]}
    first = next(r for r in rows if r["objects"])
    image_id = next(im["id"] for im in doc["images"] if im["paligemma_id"] == first["id"])
    ann = next(a for a in doc["annotations"] if a["image_id"] == image_id)
    x0, y0, x1, y1 = first["objects"][0]["box"]
    assert names[ann["category_id"]] == first["objects"][0]["label"]
    assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--input", "{tmp}/nope", "--output", "{tmp}/o.jsonl"], "does not exist"),
    (["--input", "{folder}", "--output", "{tmp}/o.csv"], "unknown format '.csv'"),
    (["--input", "{folder}", "--output", "{tmp}/o.jsonl", "--task", "detect"], "needs --objects"),
    (["--input", "{folder}", "--output", "{tmp}/o.jsonl", "--concurrency", "2"], "go with --engine ray"),
    (["--input", "{folder}", "--output", "{tmp}/o.jsonl", "--batch-size", "0"], "at least 1"),
    (["--input", "{folder}", "--output", "{tmp}/missing/o.jsonl"], "does not exist"),
    (["--model", "{tmp}", "--input", "{folder}", "--output", "{tmp}/o.jsonl"], "no config.json"),
])
def test_cli_errors_are_one_line(folder, tmp_path, capsys, argv, message):
    rc = cli.main(["batch", *(a.format(tmp=tmp_path, folder=folder) for a in argv)])
    out, err = capsys.readouterr()
    assert rc in (1, 2) and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_cli_end_to_end_prints_the_summary(folder, tmp_path, capsys):
    rc = cli.main(["batch", "--input", str(folder), "--output", str(tmp_path / "o.jsonl"), "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith(f"done {N_SCENES + 1}, skipped 0, failed 1 in ")
    assert len(read_jsonl(tmp_path / "o.jsonl")) == N_SCENES + 1


def test_segment_rows_get_masks_as_coco_rle(shipped, folder, tmp_path):
    """The shipped model emits no <seg> tokens, so the answer is given: the labeller's parse of a segment
    answer decodes the mask with the VQ-VAE weights and writes it as COCO RLE of the image's size."""
    import numpy as np

    from paligemma.api import get_mask_decoder
    from paligemma.batch.labeller import Labeller, PromptSpec
    from paligemma.batch.sources import Item
    from paligemma.segmentation import expected_shapes, save_safetensors

    model, processor = shipped
    vae = tmp_path / "vae.safetensors"
    rng = np.random.default_rng(0)
    save_safetensors({k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in expected_shapes(4).items()}, vae)
    labeller = Labeller(model, processor, PromptSpec(task="segment", objects="circle"), decoder=get_mask_decoder(vae))
    row = labeller.prepare(Item(0, "s2.png", "s2.png", path=str(folder / "s2.png")))
    answer = "<loc0100><loc0200><loc0600><loc0900>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " circle"
    out = labeller._finish(row, answer, 0.0, 1, 20)
    (obj,) = out["objects"]
    assert obj["label"] == "circle" and obj["seg_tokens"] == list(range(16))
    assert obj["mask"]["size"] == [64, 64] and sum(obj["mask"]["counts"]) == 64 * 64
    no_vae = Labeller(model, processor, PromptSpec(task="segment", objects="circle"))._finish(row, answer, 0.0, 1, 20)
    assert no_vae["objects"][0]["mask"] is None and any("--vae" in p for p in no_vae["problems"])
