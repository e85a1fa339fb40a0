"""GemmaTokenizer and the small-tokenizer builder, checked against transformers 5.24's GemmaTokenizer."""

import json

import pytest

from paligemma.errors import CheckpointError
from paligemma.tokenizer import EXTRA_TOKENS, GemmaTokenizer
from paligemma.shapes.tokenizer_train import make_test_tokenizer, train_tokenizer

import transformers  # noqa: E402  (the reference: a required test dependency, never skipped)

STRINGS = [
    "caption en",
    "detect red circle ; blue square",
    "hello  world   with    spaces ",
    " leading space and trailing\n",
    "line one\nline two\n\nline four",
    "tabs\tand\rreturns",
    "unicode: café, naïve, 日本語, Ελληνικά",
    "emoji 🙂🚀 via byte fallback",
    "<loc0000><loc1023><seg000><seg127> x",
    "detect cat\n<loc0123><loc0456><loc0789><loc1000> cat",
    "specials <bos>a<eos>b<pad><image>c<unk>",
    "not a token: <loc99> <seg1000> <image",
    "",
    "   ",
    "123 4567.89",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    make_test_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def ours(tok_dir):
    return GemmaTokenizer.from_file(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_layout(ours):
    assert [ours.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]] == [0, 1, 2, 3, 4]
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
    assert ours.token_to_id("<0x00>") == 5 and ours.token_to_id("<0xFF>") == 260
    assert ours.token_to_id("<loc0000>") == 512 and ours.token_to_id("<seg127>") == 512 + 1024 + 127
    assert ours.image_id == 1664 and len(ours) == 1665
    assert ours.id_to_token(ours.image_id) == "<image>"


def test_hf_loads_same_tokenizer(ours, hf):
    assert type(hf).__name__ == "GemmaTokenizer"
    assert len(hf) == len(ours)
    assert hf.convert_tokens_to_ids(["<image>", "<loc0001>", "<seg005>"]) == [
        ours.image_id, ours.token_to_id("<loc0001>"), ours.token_to_id("<seg005>")]
    assert hf.padding_side == "left"


@pytest.mark.parametrize("text", STRINGS)
def test_encode_parity(ours, hf, text):
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def test_loc_seg_are_single_tokens(ours):
    ids = ours.encode("<loc0042><seg077>")
    assert ids == [ours.token_to_id("<loc0042>"), ours.token_to_id("<seg077>")]


@pytest.mark.parametrize("text", [s for s in STRINGS if "<" not in s])
def test_roundtrip(ours, text):
    assert ours.decode(ours.encode(text)) == text


def test_decode_keeps_loc_seg_drops_specials(ours, hf):
    ids = [ours.image_id, ours.bos_id] + ours.encode("detect cat\n<loc0001><loc0002><seg003> cat") + [
        ours.eos_id, ours.pad_id]
    text = ours.decode(ids)
    assert text == "detect cat\n<loc0001><loc0002><seg003> cat"
    assert ours.decode(ids, skip_special_tokens=False).startswith("<image><bos>detect")
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.batch_decode([ids, ids[2:]]) == [text, text]


def test_decode_accepts_tensor(ours):
    import torch
    ids = ours.encode("caption en")
    assert ours.decode(torch.tensor(ids)) == "caption en"


def test_file_pipeline_is_replaced_like_hf(tok_dir, tmp_path):
    """HF's GemmaTokenizer keeps only vocab/merges of tokenizer.json; so do we (e.g. a stray prefix space)."""
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = GemmaTokenizer.from_file(tmp_path / "tokenizer.json")
    assert type(hf).__name__ == "GemmaTokenizer"
    for text in STRINGS[:6]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def test_reads_tokenizer_saved_by_hf(hf, ours, tmp_path):
    hf.save_pretrained(tmp_path)
    again = GemmaTokenizer.from_file(tmp_path)
    assert len(again) == len(ours) and again.image_id == ours.image_id
    assert all(again.encode(t) == ours.encode(t) for t in STRINGS)


def test_missing_paligemma_tokens_are_appended_in_hf_order(tmp_path):
    """A plain Gemma-style file without <image>/loc/seg: <image> first, then loc/seg (as HF's processor)."""
    from tokenizers import Tokenizer

    data = json.loads(train_tokenizer(["a b c"] * 3, 400).to_str())
    extras = set(EXTRA_TOKENS) | {"<image>"}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in extras]
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k not in extras}
    tok = GemmaTokenizer(Tokenizer.from_str(json.dumps(data)))
    assert tok.image_id == 400
    assert tok.token_to_id("<loc0000>") == 401 and tok.token_to_id("<seg127>") == 400 + 1152
    assert tok.decode([tok.token_to_id("<loc0007>"), tok.image_id]) == "<loc0007>"


def test_training_is_deterministic_and_sized():
    texts = ["the cat sat on the mat\n", "a dog ran"] * 4
    first, second = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert first.to_str() == second.to_str()
    assert first.token_to_id("<loc0000>") == 400  # short corpora are padded with <unusedN>
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(texts, 300)


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GemmaTokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        GemmaTokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="SentencePiece"):
        GemmaTokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        GemmaTokenizer.from_file(bad)
    bad.write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        GemmaTokenizer.from_file(bad)
