"""Strict loading of the three key spellings, shards, dtype conversion, and errors that name the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import paligemma
from paligemma.errors import CheckpointError

from .conftest import hf_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_keys(path, fn):
    """Rewrite every safetensors file of `path` (and its index) with keys mapped by fn (None drops a key)."""
    index = path / "model.safetensors.index.json"
    for f in path.glob("*.safetensors"):
        sd = {fn(k): v for k, v in load_file(f).items() if fn(k) is not None}
        save_file(sd, f, metadata={"format": "pt"})
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"] = {fn(k): v for k, v in d["weight_map"].items() if fn(k) is not None}
        index.write_text(json.dumps(d))


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_hub_spelling_sharded_with_index(pg2_dir):
    assert len(list(pg2_dir.glob("model-*.safetensors"))) > 1
    model = paligemma.load_model(pg2_dir)
    assert not any(p.is_meta for p in model.parameters())
    assert model.config.text.is_gemma2


def test_transformers_saved_and_in_memory_spellings_load_identically(pg1_dir, tmp_path):
    reference = _params(paligemma.load_model(pg1_dir))
    saved = tmp_path / "hf"
    hf_model(pg1_dir).save_pretrained(saved)
    for k, v in _params(paligemma.load_model(saved)).items():
        assert torch.equal(v, reference[k]), k
    v5 = _copy(pg1_dir, tmp_path / "v5")  # some 5.x releases save the tower without `vision_model.`
    _rewrite_keys(v5, lambda k: k.replace("vision_tower.vision_model.", "vision_tower."))
    assert any(k.startswith("vision_tower.embeddings") for k in load_file(v5 / "model.safetensors"))
    for k, v in _params(paligemma.load_model(v5)).items():
        assert torch.equal(v, reference[k]), k
    mem = _copy(pg1_dir, tmp_path / "mem")
    _rewrite_keys(mem, lambda k: "model." + k.replace("vision_model.", "").replace("language_model.model.", "language_model."))
    for k, v in _params(paligemma.load_model(mem)).items():
        assert torch.equal(v, reference[k]), k


def test_loads_in_bfloat16_without_changing_values_beyond_rounding(pg1_dir):
    fp32 = paligemma.load_model(pg1_dir)
    bf16 = paligemma.load_model(pg1_dir, dtype=torch.bfloat16)
    w32 = fp32.language_model.layers[0].mlp.up_proj.weight
    w16 = bf16.language_model.layers[0].mlp.up_proj.weight
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, w32.to(torch.bfloat16))


def test_lm_head_equal_to_embeddings_is_accepted_and_a_different_one_is_refused(pg1_dir, tmp_path):
    ok = _copy(pg1_dir, tmp_path / "ok")
    f = ok / "model.safetensors"
    sd = load_file(f)
    sd["language_model.lm_head.weight"] = sd["language_model.model.embed_tokens.weight"].clone()
    save_file(sd, f, metadata={"format": "pt"})
    paligemma.load_model(ok)
    sd["language_model.lm_head.weight"] += 1.0
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.*differs"):
        paligemma.load_model(ok)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("language_model.model.layers.1.mlp.down_proj.weight"),
     "missing tensors: language_model.model.layers.1.mlp.down_proj.weight"),
    (lambda sd: sd.update({"language_model.model.layers.9.mlp.extra.weight": torch.zeros(2)}),
     "unexpected tensors: language_model.model.layers.9.mlp.extra.weight"),
    (lambda sd: sd.update({"multi_modal_projector.linear.bias": torch.zeros(3)}),
     r"wrong shapes: multi_modal_projector.linear.bias: stored \[3\], model expects \[64\]"),
])
def test_strictness_names_the_tensor(pg1_dir, tmp_path, edit, message):
    bad = _copy(pg1_dir, tmp_path / "bad")
    f = bad / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        paligemma.load_model(bad)


def test_truncated_file_and_missing_pieces_are_reported(pg1_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        paligemma.load_model(tmp_path / "nowhere")
    trunc = _copy(pg1_dir, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|corrupt)"):
        paligemma.load_model(trunc)
    noconf = _copy(pg1_dir, tmp_path / "noconf")
    (noconf / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        paligemma.load_model(noconf)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(pg1_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="never loaded"):
        paligemma.load_model(pickled)


def test_save_pretrained_roundtrip_and_transformers_reads_it(pg2_dir, tmp_path):
    model, processor = paligemma.load(pg2_dir)
    paligemma.save_pretrained(model, processor, tmp_path / "out", max_shard_bytes=300_000)
    again, _ = paligemma.load(tmp_path / "out")
    ids = torch.tensor([[model.config.image_token_index] * model.config.num_image_tokens + [2, 40, 50, 108]])
    pix = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        a, b = model(ids, pix).logits, again(ids, pix).logits
        ref = hf_model(tmp_path / "out")(input_ids=ids, pixel_values=pix, token_type_ids=torch.zeros_like(ids)).logits
    assert torch.equal(a, b)
    assert ((a - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_float16_is_refused_for_paligemma2(pg2_dir):
    with pytest.raises(CheckpointError, match="float16.*bfloat16 or float32"):
        paligemma.load_model(pg2_dir, dtype=torch.float16)
