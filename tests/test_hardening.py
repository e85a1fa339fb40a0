"""Issue 10, files: atomic saves, config / index / generation / preprocessor / tokenizer / VQ-VAE checks,
safetensors headers checked as the official library checks them, non-regular files, non-finite weights.

Every bad file is built here from the tiny random checkpoints of conftest.py. Each case expects a
`PaliGemmaError` whose message names the file or field; saves are checked by the promise that matters:
after any failed save the old checkpoint loads and gives the same logits."""

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import paligemma
from paligemma import atomic, loading
from paligemma.config import PaliGemmaConfig
from paligemma.errors import CheckpointError, InputError, PaliGemmaError
from paligemma.safetensors_stream import SafetensorsStream
from paligemma.segmentation import load_state
from paligemma.testing import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _logits(model) -> torch.Tensor:
    cfg = model.config
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_image_tokens + [2, 40, 50, 108]])
    pix = torch.linspace(-1, 1, 3 * cfg.vision.image_size ** 2).reshape(1, 3, cfg.vision.image_size, -1)
    with torch.no_grad():
        return model(ids, pix).logits


@pytest.fixture(scope="module")
def pg1(pg1_dir):
    return paligemma.load(pg1_dir)


def _no_leftovers(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(atomic.PREFIX)]


# ------------------------------------------------------------------------------------------ saves
def _saved(pg1, tmp_path, **kw) -> tuple[Path, torch.Tensor]:
    model, processor = pg1
    out = tmp_path / "ckpt"
    paligemma.save_pretrained(model, processor, out, **kw)
    return out, _logits(paligemma.load_model(out))


def _other_model(pg1_dir):
    """The same architecture with other weights: a save of it must not half-replace the old one."""
    other = paligemma.load_model(pg1_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    return other


@pytest.mark.parametrize("fail", ["enospc_second_shard", "config_unwritable", "swap_rename", "processor_files"])
def test_failed_save_keeps_the_old_checkpoint(pg1, pg1_dir, tmp_path, monkeypatch, fail):
    out, before = _saved(pg1, tmp_path, max_shard_bytes=200_000)  # sharded, with an index
    other = _other_model(pg1_dir)
    calls = {"n": 0}
    if fail == "enospc_second_shard":
        real = loading.save_file

        def save_file(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)
        monkeypatch.setattr(loading, "save_file", save_file)
    elif fail == "config_unwritable":
        monkeypatch.setattr(PaliGemmaConfig, "save", lambda self, p: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied", str(p))))
    elif fail == "swap_rename":
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).parent == out and Path(src).parent.name.startswith(atomic.PREFIX):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise OSError(errno.EIO, "Input/output error")
            return real_replace(src, dst)
        monkeypatch.setattr(atomic.os, "replace", replace)
    else:
        monkeypatch.setattr(pg1[1], "save_pretrained", lambda d: (_ for _ in ()).throw(
            OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(atomic.SaveError, match="unchanged"):
        shard = 150_000 if fail == "enospc_second_shard" else 10**9  # else: one file, the old index must stay
        paligemma.save_pretrained(other, pg1[1], out, max_shard_bytes=shard)
    monkeypatch.undo()
    assert torch.equal(_logits(paligemma.load_model(out)), before)
    _no_leftovers(out)


def test_save_replaces_a_sharded_set_whole_and_gives_ordinary_permissions(pg1, tmp_path):
    out, _ = _saved(pg1, tmp_path, max_shard_bytes=200_000)
    assert (out / loading.INDEX_NAME).exists()
    paligemma.save_pretrained(pg1[0], pg1[1], out)  # one file now: the old shards and index must go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert not (out / loading.INDEX_NAME).exists()
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    assert torch.equal(_logits(paligemma.load_model(out)), _logits(pg1[0]))


def test_non_finite_weights_are_never_saved(pg1, pg1_dir, tmp_path):
    out, before = _saved(pg1, tmp_path)
    bad = _other_model(pg1_dir)
    with torch.no_grad():
        bad.language_model.norm.weight[3] = float("nan")
    with pytest.raises(InputError, match="language_model.norm.weight.*NaN"):
        paligemma.save_pretrained(bad, pg1[1], out)
    assert torch.equal(_logits(paligemma.load_model(out)), before)


def test_concurrent_saves_into_one_directory(pg1_dir, tmp_path):
    """Three processes save into one directory at once: none fails on another's temporary files, and the
    directory holds one complete, loadable set."""
    out = tmp_path / "shared"
    code = textwrap.dedent(f"""
        import sys, torch, paligemma
        model, processor = paligemma.load({str(pg1_dir)!r})
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + int(sys.argv[1]) / 10)
        for _ in range(2):
            paligemma.save_pretrained(model, processor, {str(out)!r}, max_shard_bytes=int(sys.argv[2]))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(s)], env=env, stderr=subprocess.PIPE,
                              text=True) for i, s in enumerate([200_000, 10**9, 300_000])]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    model = paligemma.load_model(out)
    assert torch.isfinite(_logits(model)).all()
    _no_leftovers(out)


def test_training_checkpoint_is_atomic(tmp_path, monkeypatch):
    from paligemma import train as train_mod

    path = str(tmp_path / "checkpoint.pt")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = train_mod.TrainConfig(steps=1, warmup=0)
    train_mod.save_checkpoint(path, model, opt, sched, 1, cfg, [])
    before = Path(path).read_bytes()
    monkeypatch.setattr(train_mod.torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(atomic.SaveError, match="No space left"):
        train_mod.save_checkpoint(path, model, opt, sched, 2, cfg, [])
    assert Path(path).read_bytes() == before
    _no_leftovers(tmp_path)


def test_save_onto_a_file_is_refused(pg1, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(PaliGemmaError, match="is a file"):
        paligemma.save_pretrained(pg1[0], pg1[1], target)


# ------------------------------------------------------------------------------------------ config.json
BAD_CONFIGS = [  # (text_config / vision_config / top-level change, the field the message must name)
    ({"text_config": {"num_hidden_layers": 1e9}}, "num_hidden_layers"),
    ({"text_config": {"num_hidden_layers": 10**9}}, "num_hidden_layers"),
    ({"vision_config": {"num_hidden_layers": 10**9}}, "vision_config.num_hidden_layers"),
    ({"text_config": {"num_attention_heads": 0}}, "num_attention_heads"),
    ({"vision_config": {"patch_size": 0}}, "patch_size"),
    ({"text_config": {"hidden_size": "64"}}, "hidden_size"),
    ({"text_config": {"intermediate_size": 96.5}}, "intermediate_size"),
    ({"text_config": {"rope_scaling": "linear"}}, "rope_scaling"),
    ({"text_config": {"rope_scaling": {"rope_type": "linear", "factor": 2}}}, "rope"),
    ({"text_config": []}, "text_config"),
    ({"vision_config": "siglip"}, "vision_config"),
    ({"text_config": {"rms_norm_eps": float("nan")}}, "rms_norm_eps"),
    ({"text_config": {"rms_norm_eps": -1}}, "rms_norm_eps"),
    ({"text_config": {"rope_theta": 0}}, "rope_theta"),
    ({"text_config": {"max_position_embeddings": 10**12}}, "max_position_embeddings"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"eos_token_id": 10**6}, "eos_token_id"),
    ({"pad_token_id": -3}, "pad_token_id"),
    ({"text_config": {"num_key_value_heads": 3}}, "num_key_value_heads"),
    ({"vision_config": {"hidden_size": 50}}, "num_attention_heads"),
    ({"vision_config": {"image_size": 30}}, "patch_size"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"text_config": {"model_type": "gemma2", "layer_types": ["full_attention"]}}, "layer_types"),
    ({"text_config": {"model_type": "gemma2", "layer_types": "sliding"}}, "layer_types"),
    ({"text_config": {"model_type": "gemma2", "attn_logit_softcapping": float("inf")}}, "attn_logit_softcapping"),
    ({"text_config": {"vocab_size": 1 << 30}}, "vocab_size"),
    ({"text_config": {"head_dim": 0}}, "head_dim"),
    ({"projection_dim": 32}, "projection_dim"),
    ({"text_config": {"hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 1000},
      "projection_dim": 65536}, "parameters"),
]


@pytest.mark.parametrize("change,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_values_are_refused_naming_the_field(change, field):
    d = tiny_config("pg1")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key].update(value)
        else:
            d[key] = value
    with pytest.raises(CheckpointError, match=field):
        PaliGemmaConfig.from_dict(d)


@pytest.mark.parametrize("content,match", [
    (b'{"model_type": "paligemma", "text_config": {"rms_norm_eps": NaN}}', "NaN"),
    (b'{"model_type": "paligemma"', "not valid JSON"),
    (b'["paligemma"]', "JSON object"),
    (b'{"model_type": "pali\xff"}', "UTF-8"),
])
def test_bad_config_files_are_refused(tmp_path, content, match):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        PaliGemmaConfig.from_file(tmp_path)


def test_config_from_another_model_is_refused_before_building(pg1_dir, tmp_path):
    d = _copy(pg1_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"].update(num_hidden_layers=900)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="implies .* parameters but the weight files hold"):
        paligemma.load_model(d)


def test_parameter_count_formula_matches_the_model():
    from paligemma.modeling_paligemma import PaliGemmaForConditionalGeneration

    for variant in ("pg1", "pg2"):
        cfg = PaliGemmaConfig.from_dict(tiny_config(variant))
        with torch.device("meta"):
            model = PaliGemmaForConditionalGeneration(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ other JSON files
@pytest.mark.parametrize("content,match", [
    (b"not json", "not valid JSON"),
    (b"[1, 107]", "JSON object"),
    (b'{"eos_token_id": []}', "eos_token_id"),
    (b'{"eos_token_id": 999999}', "eos_token_id"),
    (b'{"eos_token_id": "1"}', "eos_token_id"),
    (b'{"eos_token_id": 1, "x": "\xfe"}', "UTF-8"),
])
def test_bad_generation_config(pg1_dir, tmp_path, content, match):
    d = _copy(pg1_dir, tmp_path / "g")
    (d / "generation_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        paligemma.load_model(d)


@pytest.mark.parametrize("content,match", [
    (b"{", "not valid JSON"),
    (b"[]", "weight_map"),
    (b'{"weight_map": ["model.safetensors"]}', "weight_map"),
    (b'{"weight_map": {"a": 3}}', "shard file"),
    (b'{"weight_map": {"a": "../model.safetensors"}}', "no path"),
    (b'{"weight_map": {"a": "absent.safetensors"}}', "missing"),
    (b'{"weight_map": {"a": "model-\xff.safetensors"}}', "UTF-8"),
])
def test_bad_shard_index(pg2_dir, tmp_path, content, match):
    d = _copy(pg2_dir, tmp_path / "i")
    (d / loading.INDEX_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        paligemma.load_model(d)


@pytest.mark.parametrize("change,match", [
    ({"image_std": 0}, "image_std"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"size": 0}, "size"),
    ({"size": "28"}, "size"),
    ({"size": {"height": 28, "width": 30}}, "square"),
    ({"image_seq_length": 2.5}, "image_seq_length"),
])
def test_bad_preprocessor_config(pg1_dir, tmp_path, change, match):
    from paligemma.processing_paligemma import PaliGemmaProcessor

    d = _copy(pg1_dir, tmp_path / "p")
    pre = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 28, "width": 28},
           "image_seq_length": 4, **change}
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match=match):
        PaliGemmaProcessor.from_pretrained(d)


@pytest.mark.parametrize("content,match", [(b'{"model": \xff}', "UTF-8"), (b'{"model": ', "not valid JSON"),
                                           (b'{"model": {"type": "Nope"}}', "tokenizers")])
def test_bad_tokenizer_file(pg1_dir, tmp_path, content, match):
    from paligemma.tokenizer import GemmaTokenizer

    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        GemmaTokenizer.from_file(tmp_path)


# ------------------------------------------------------------------------------------------ safetensors headers
def _raw(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


def _t(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CRAFTED = {  # name -> (file bytes, what the message says)
    "header_3GB": (struct.pack("<Q", 3 * 2**30) + b"{}" * 8, "at most 100,000,000"),
    "header_past_end": (struct.pack("<Q", 500) + b"{}", "past the end"),
    "shared_bytes": (_raw({"a": _t([0, 8]), "b": _t([0, 8])}, bytes(8)), "overlaps"),
    "negative_offset": (_raw({"a": _t([-8, 0])}, bytes(8)), "data_offsets"),
    "four_byte_overlap": (_raw({"a": _t([0, 8]), "b": _t([4, 12])}, bytes(12)), "overlaps"),
    "gap": (_raw({"a": _t([0, 8]), "b": _t([12, 20])}, bytes(20)), "gap"),
    "float_offsets": (_raw({"a": _t([0.0, 8.0])}, bytes(8)), "data_offsets"),
    "begin_after_end": (_raw({"a": _t([8, 0])}, bytes(8)), "data_offsets"),
    "trailing_bytes": (_raw({"a": _t([0, 8])}, bytes(16)), "covered exactly"),
    "dtype_shape_mismatch": (_raw({"a": _t([0, 8], shape=(3,))}, bytes(8)), "needs 12"),
    "unknown_dtype": (_raw({"a": _t([0, 8], dtype="F8")}, bytes(8)), "dtype"),
    "bool_shape": (_raw({"a": _t([0, 8], shape=(True, 2))}, bytes(8)), "shape"),
    "header_list": (_raw([1, 2], b""), "expected an object"),
    "header_not_utf8": (struct.pack("<Q", 2) + b"\xff\xfe", "UTF-8"),
    "too_short": (b"abc", "too short"),
    "metadata_list": (_raw({"__metadata__": [1], "a": _t([0, 8])}, bytes(8)), "__metadata__"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_safetensors_headers_are_refused(tmp_path, name):
    data, match = CRAFTED[name]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=match):
        SafetensorsStream(path)


def test_the_official_library_agrees_on_a_valid_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(0), "c": torch.ones(3)}, str(path))
    with SafetensorsStream(path) as f:
        assert torch.equal(f.read("a"), torch.arange(6.0).reshape(2, 3)) and f.shape("b") == (0,)


def test_crafted_checkpoint_shares_bytes_is_refused_by_load(pg1_dir, tmp_path):
    """Two real tensors of the tiny model pointed at the same bytes: answered garbage before, refused now."""
    d = _copy(pg1_dir, tmp_path / "s")
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    keys = [k for k in header if k != "__metadata__" and header[k]["shape"] == [64]][:2]
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]
    h = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    with pytest.raises(CheckpointError, match="overlaps|gap"):
        paligemma.load_model(d)


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_non_regular_files_are_refused_without_blocking(pg1_dir, tmp_path):
    """A FIFO as weights, config, tokenizer, image or JSONL; a directory as weights; symlink loops. Run in a
    subprocess under a timeout so a regression fails instead of hanging the suite."""
    fifo_model = _copy(pg1_dir, tmp_path / "fifo")
    (fifo_model / "model.safetensors").unlink()
    os.mkfifo(fifo_model / "model.safetensors")
    fifo_cfg = _copy(pg1_dir, tmp_path / "fifocfg")
    (fifo_cfg / "config.json").unlink()
    os.mkfifo(fifo_cfg / "config.json")
    fifo_tok = _copy(pg1_dir, tmp_path / "fifotok")
    (fifo_tok / "tokenizer.json").unlink()
    os.mkfifo(fifo_tok / "tokenizer.json")
    dir_model = _copy(pg1_dir, tmp_path / "dir")
    (dir_model / "model.safetensors").unlink()
    (dir_model / "model.safetensors").mkdir()
    loop = _copy(pg1_dir, tmp_path / "loop")
    (loop / "model.safetensors").unlink()
    os.symlink(loop / "l2", loop / "model.safetensors")
    os.symlink(loop / "model.safetensors", loop / "l2")
    os.symlink(tmp_path / "loopdir2", tmp_path / "loopdir")
    os.symlink(tmp_path / "loopdir", tmp_path / "loopdir2")
    os.mkfifo(tmp_path / "image.png")
    os.mkfifo(tmp_path / "data.jsonl")
    code = f"""
        import paligemma
        from paligemma.errors import PaliGemmaError
        from paligemma.images import load_image
        from paligemma.train import load_jsonl
        from paligemma.tokenizer import GemmaTokenizer
        cases = [("fifo weights", lambda: paligemma.load_model({str(fifo_model)!r})),
                 ("fifo config", lambda: paligemma.load_model({str(fifo_cfg)!r})),
                 ("fifo tokenizer", lambda: GemmaTokenizer.from_file({str(fifo_tok)!r})),
                 ("dir weights", lambda: paligemma.load_model({str(dir_model)!r})),
                 ("loop weights", lambda: paligemma.load_model({str(loop)!r})),
                 ("loop dir", lambda: paligemma.load_model({str(tmp_path / "loopdir")!r})),
                 ("fifo image", lambda: load_image({str(tmp_path / "image.png")!r})),
                 ("fifo jsonl", lambda: load_jsonl({str(tmp_path / "data.jsonl")!r}))]
        for name, fn in cases:
            try:
                fn()
                print(name, "ACCEPTED")
            except PaliGemmaError as e:
                print(name, "|", e)
    """
    out = _run(code, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 8, out.stdout
    for line in lines:
        name = line.split(" |")[0]
        expect = {"fifo": "FIFO", "dir": "directory|no model.safetensors", "loop": "symlink loop"}[name.split()[0]]
        assert "ACCEPTED" not in line and any(w in line for w in expect.split("|")), line


def test_refusing_crafted_files_stays_under_1GB(tmp_path):
    """Peak memory (ru_maxrss) of a process that refuses every crafted file: a 3 GB header length, a
    3 GiB .npz member, a config with 1e9 layers and 1e12 positions."""
    (tmp_path / "h.safetensors").write_bytes(CRAFTED["header_3GB"][0])
    _bomb_npz(tmp_path / "vae.npz")
    cfg = tiny_config("pg1")
    cfg["text_config"].update(num_hidden_layers=10**9, max_position_embeddings=10**12)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code = f"""
        import resource
        from paligemma.errors import PaliGemmaError
        from paligemma.config import PaliGemmaConfig
        from paligemma.safetensors_stream import SafetensorsStream
        from paligemma.segmentation import load_state
        for fn in (lambda: SafetensorsStream({str(tmp_path / "h.safetensors")!r}),
                   lambda: load_state({str(tmp_path / "vae.npz")!r}),
                   lambda: PaliGemmaConfig.from_file({str(tmp_path)!r})):
            try:
                fn()
                print("ACCEPTED")
            except PaliGemmaError:
                pass
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
    out = _run(code)
    assert out.returncode == 0 and "ACCEPTED" not in out.stdout, out.stdout + out.stderr
    assert int(out.stdout.split()[-1]) < 1_000_000  # KiB on Linux


# ------------------------------------------------------------------------------------------ VQ-VAE files
def _bomb_npz(path: Path) -> None:
    """A small .npz whose member declares a 3 GiB array (the header says so; the data is absent)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (3 * 2**28,)}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("_vq_vae._embedding.npy", buf.getvalue() + bytes(64))


@pytest.mark.parametrize("kind,match", [("bomb", "declares shape"), ("not_zip", "not a readable"),
                                        ("pickled", "not a readable"), ("truncated", "not a readable")])
def test_bad_vae_files(tmp_path, kind, match):
    path = tmp_path / "vae.npz"
    if kind == "bomb":
        _bomb_npz(path)
    elif kind == "not_zip":
        path.write_bytes(b"PK\x03\x04 nothing")
    elif kind == "pickled":
        np.savez(path, a=np.array([{"x": 1}], dtype=object))
    else:
        np.savez(path, a=np.zeros(1000, np.float32))
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=match):
        load_state(path)


# ------------------------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_single_non_finite_weight_is_refused_naming_the_tensor(pg1_dir, tmp_path, value):
    d = _copy(pg1_dir, tmp_path / "nf")
    from safetensors.torch import load_file

    tensors = load_file(d / "model.safetensors")
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    tensors[key][5, 7] = value
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key}.*non-finite"):
        paligemma.load_model(d, quantize=None)
