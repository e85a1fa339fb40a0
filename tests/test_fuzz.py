"""Property-based fuzzing (Hypothesis) of every input boundary: any input gives a result or a
`PaliGemmaError`, never another exception, within a time bound per example.

Covered: the config parser, the safetensors header reader, the shard index, the image loader (arrays,
tensors and files of random bytes), the processor (text with lone surrogates, suffixes), the sampling
arguments, the JSONL reader and the answer parsers (which must never raise at all).

CI runs a fixed seed (`derandomize=True`) and a small example count (the file takes well under a
minute). A long run, with a fresh random seed per run:

    PALIGEMMA_FUZZ_EXAMPLES=5000 PALIGEMMA_FUZZ_RANDOM=1 python -m pytest -q tests/test_fuzz.py
"""

import json
import math
import os
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from paligemma import loading
from paligemma.config import PaliGemmaConfig
from paligemma.errors import PaliGemmaError
from paligemma.generation import SamplingConfig, sample
from paligemma.images import as_image, load_image, to_rgb
from paligemma.tasks import TASKS, parse_output
from paligemma.testing import tiny_config
from paligemma.train import load_jsonl

EXAMPLES = int(os.environ.get("PALIGEMMA_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=not os.environ.get("PALIGEMMA_FUZZ_RANDOM"), database=None,
                deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])

# JSON-like values, the hostile ones included: huge and negative ints, NaN / inf, wrong types
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 10**9, 10**12]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=8)
TEXT = st.text(alphabet=st.characters(blacklist_categories=()), max_size=40)  # lone surrogates included
TEXT_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
             "query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
             "layer_types", "rope_scaling", "rope_parameters", "eos_token_id", "model_type", "hidden_activation"]
VISION_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size", "layer_norm_eps", "hidden_act"]
TOP_KEYS = ["projection_dim", "image_token_index", "bos_token_id", "eos_token_id", "pad_token_id",
            "tie_word_embeddings", "text_config", "vision_config", "model_type", "quantization_config", "dtype"]


def _accepts_or_refuses(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except PaliGemmaError:
        return None


# ------------------------------------------------------------------------------------------ config
@FUZZ
@given(variant=st.sampled_from(["pg1", "pg2"]),
       changes=st.lists(st.tuples(st.sampled_from(["text", "vision", "top"]), st.integers(0, 100), VALUES),
                        min_size=1, max_size=4))
def test_config_parser(variant, changes):
    d = tiny_config(variant)
    for where, i, value in changes:
        if where == "text" and isinstance(d.get("text_config"), dict):
            d["text_config"][TEXT_KEYS[i % len(TEXT_KEYS)]] = value
        elif where == "vision" and isinstance(d.get("vision_config"), dict):
            d["vision_config"][VISION_KEYS[i % len(VISION_KEYS)]] = value
        else:
            d[TOP_KEYS[i % len(TOP_KEYS)]] = value
    config = _accepts_or_refuses(PaliGemmaConfig.from_dict, d)
    if config is not None:  # what is accepted is sane: bounded, finite, consistent
        t = config.text
        assert config.num_parameters() <= 200_000_000_000
        assert math.isfinite(t.rms_norm_eps) and t.rms_norm_eps > 0 and t.rope_theta > 0
        assert config.eos_token_ids and all(0 <= e < t.vocab_size for e in config.eos_token_ids)
        assert len(t.layer_types) == t.num_hidden_layers <= 1000


# ------------------------------------------------------------------------------------------ safetensors header
def _valid_file() -> bytes:
    from safetensors.torch import save

    return save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)})


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       header=st.one_of(st.none(), VALUES, st.dictionaries(
           st.text(max_size=4), st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "X"]),
                                                       "shape": st.lists(st.integers(-2, 5), max_size=3),
                                                       "data_offsets": st.lists(VALUES | st.integers(-9, 40),
                                                                                max_size=3)}), max_size=3)),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), tail=st.binary(max_size=40))
def test_safetensors_header_reader(flips, header, length, tail):
    data = bytearray(_valid_file())
    if header is not None:
        h = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(h)) + h + tail)
    for pos, byte in flips:
        if pos < len(data):
            data[pos] = byte
    if length is not None:
        data[:8] = struct.pack("<Q", length)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(bytes(data))
        f = _accepts_or_refuses(loading._open, path)
        if f is not None:
            with f:
                for key in f.entries:  # every tensor an accepted header describes lies inside the file
                    t = f.read(key)
                    assert t.numel() == math.prod(f.shape(key))


# ------------------------------------------------------------------------------------------ shard index
@FUZZ
@given(doc=st.one_of(VALUES, st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=5), st.one_of(st.sampled_from(["model.safetensors", "../x", "/etc/passwd", ".", ""]), VALUES),
    max_size=3)})), raw=st.one_of(st.none(), st.binary(max_size=30)))
def test_shard_index(doc, raw):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "model.safetensors").write_bytes(_valid_file())
        (d / loading.INDEX_NAME).write_bytes(raw if raw is not None else json.dumps(doc).encode())
        files = _accepts_or_refuses(loading.weight_files, d)
        if files is not None:
            assert all(f.parent == d and f.is_file() for f in files)


# ------------------------------------------------------------------------------------------ images
DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]


@FUZZ
@given(shape=st.lists(st.integers(0, 6), max_size=4), dtype=st.sampled_from(DTYPES), scale=st.sampled_from(
    [0, 1, 255, 65535, 1e9, -1, float("nan")]), torch_tensor=st.booleans())
def test_image_loader_arrays_and_tensors(shape, dtype, scale, torch_tensor):
    rng = np.random.default_rng(len(shape))
    with np.errstate(invalid="ignore", over="ignore"):
        array = np.asarray((rng.random(shape) * scale).astype(dtype))
    obj = torch.from_numpy(array) if torch_tensor and dtype not in (np.uint16, np.complex64) else array
    image = _accepts_or_refuses(as_image, obj)
    if image is not None:
        assert image.width > 0 and image.height > 0 and to_rgb(image).mode == "RGB"


@FUZZ
@given(data=st.binary(max_size=300), png_prefix=st.booleans())
def test_image_loader_files(data, png_prefix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.png"
        path.write_bytes((b"\x89PNG\r\n\x1a\n" if png_prefix else b"") + data)
        image = _accepts_or_refuses(load_image, path)
        if image is not None:
            assert to_rgb(image).size == image.size


# ------------------------------------------------------------------------------------------ processor
@pytest.fixture(scope="module")
def processor(pg1_dir):
    from paligemma.processing_paligemma import PaliGemmaProcessor

    return PaliGemmaProcessor.from_pretrained(pg1_dir)


@FUZZ
@given(text=st.one_of(TEXT, st.lists(TEXT, max_size=3), SCALARS), suffix=st.one_of(st.none(), TEXT, SCALARS),
       n_images=st.integers(0, 3))
def test_processor(processor, text, suffix, n_images):
    images = [Image.new("RGB", (5 + i, 7)) for i in range(n_images)]
    out = _accepts_or_refuses(processor, text=text, images=images if n_images != 1 else images[0], suffix=suffix)
    if out is not None:
        assert out["input_ids"].shape == out["attention_mask"].shape
        assert out["pixel_values"].shape[1:] == (3, 28, 28) and torch.isfinite(out["pixel_values"]).all()


# ------------------------------------------------------------------------------------------ sampling
@FUZZ
@given(kwargs=st.dictionaries(st.sampled_from(["max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                               "seed", "eos_token_ids", "bogus"]), VALUES, max_size=5))
def test_sampling_arguments(kwargs):
    cfg = _accepts_or_refuses(SamplingConfig.of, None, **kwargs)
    if cfg is not None:
        logits = torch.randn(2, 50)
        gen = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed)
        tok = sample(logits, cfg, gen)
        assert tok.shape == (2,) and ((tok >= 0) & (tok < 50)).all()


# ------------------------------------------------------------------------------------------ JSONL
@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=40), VALUES.map(lambda v: json.dumps(v).encode()),
                                st.fixed_dictionaries({"image": st.sampled_from(["a.png", "", "nope.png"]) | VALUES,
                                                       "prefix": TEXT | VALUES, "suffix": TEXT | VALUES})
                                .map(lambda v: json.dumps(v).encode())), max_size=4))
def test_jsonl_reader(lines):
    with tempfile.TemporaryDirectory() as d:
        Image.new("RGB", (6, 6)).save(Path(d) / "a.png")
        path = Path(d) / "data.jsonl"
        path.write_bytes(b"\n".join(lines))
        rows = _accepts_or_refuses(load_jsonl, str(path))
        if rows is not None:
            assert all(isinstance(r.prefix, str) and isinstance(r.suffix, str) for r in rows)


# ------------------------------------------------------------------------------------------ answer parsers
TOKENS = st.sampled_from(["<loc0000>", "<loc1023>", "<loc0512>", "<loc9999>", "<seg000>", "<seg127>", "<seg128>",
                          " ; ", ";", " ", "car", "<eos>", "<loc", ">", "\n"])


@FUZZ
@given(parts=st.lists(TOKENS | TEXT, max_size=40), task=st.sampled_from(sorted(TASKS)),
       w=st.integers(1, 5000), h=st.integers(1, 5000))
def test_answer_parsers_never_raise(parts, task, w, h):
    result = parse_output(task, "".join(parts), w, h)
    for obj in (result or []):
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
