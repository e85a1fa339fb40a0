"""Gemma tokenizer for PaliGemma, over the `tokenizers` library (no `transformers` at runtime).

Mirrors `transformers` 5.24 `GemmaTokenizer` (models/gemma/tokenization_gemma.py): that class keeps only
the vocab and merges of `tokenizer.json` and rebuilds the rest of the pipeline (BPE with byte
fallback, " " -> "▁" normaliser, no prefix space). We apply the same pipeline, so ids match HF for any
Gemma `tokenizer.json`, then register the tokens HF's `PaliGemmaProcessor` adds at construction:
`<image>` as a special token, `<locNNNN>`/`<segNNN>` as ordinary ones (DESIGN.md, tokenizer), so
`decode(skip_special_tokens=True)` keeps detection/segmentation output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers

from .checks import read_text_file
from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
IMAGE_TOKEN = "<image>"
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
EXTRA_TOKENS = LOC_TOKENS + SEG_TOKENS  # same order as HF's PaliGemmaProcessor.EXTRA_TOKENS
SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}


def apply_gemma_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Set the normaliser / pre-tokeniser / decoder / BPE flags exactly as HF's GemmaTokenizer builds them.

    The pre-tokeniser splits on " ", which the normaliser has already replaced: it is a no-op kept
    for fidelity. No post-processor: bos/eos are never added implicitly (the processor writes them).
    """
    model = tokenizer.model
    if type(model).__name__ != "BPE":
        raise CheckpointError(
            f"tokenizer model is {type(model).__name__}, expected BPE (Gemma tokenizer.json); "
            "use the tokenizer.json shipped with a PaliGemma checkpoint"
        )
    model.byte_fallback = True
    model.fuse_unk = True
    model.dropout = None
    model.unk_token = SPECIAL_TOKENS["unk"]
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def add_paligemma_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """Register `<image>` (special) then loc/seg (ordinary) as added tokens, in HF's order.

    Tokens already in the vocabulary keep their ids; missing ones are appended, as
    `transformers.PaliGemmaProcessor.__init__` does.
    """
    added = {tok.content: tok for tok in tokenizer.get_added_tokens_decoder().values()}
    image = added.get(IMAGE_TOKEN)
    if image is None or not image.special:
        tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    missing = [t for t in EXTRA_TOKENS if t not in added]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in missing])
    return tokenizer


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """Return the tokenizer.json for `path` (the file itself or a directory holding it)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / TOKENIZER_FILE
        if not candidate.exists():
            hint = ""
            if (path / "tokenizer.model").is_file():
                hint = " It has a SentencePiece tokenizer.model, which this package does not read."
            raise CheckpointError(
                f"no {TOKENIZER_FILE} in {path}.{hint} Copy {TOKENIZER_FILE} from the original checkpoint "
                "(every hub PaliGemma repo has one) or build one with paligemma.shapes.tokenizer_train."
            )
        return candidate
    if not path.exists():
        raise CheckpointError(
            f"tokenizer file {path} does not exist; pass a {TOKENIZER_FILE} or the checkpoint directory holding it"
        )
    return path


class GemmaTokenizer:
    """Text <-> ids for PaliGemma. `encode` adds no bos/eos; the processor places them."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = add_paligemma_tokens(apply_gemma_pipeline(tokenizer))
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS.values() if t not in self._vocab]
        if missing:
            raise CheckpointError(
                f"tokenizer lacks the Gemma special tokens {missing}; it is not a Gemma tokenizer. "
                "Use the tokenizer.json of a PaliGemma checkpoint or one built by paligemma.shapes.tokenizer_train."
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GemmaTokenizer":
        """Load from a `tokenizer.json` file or a directory containing one."""
        file = resolve_tokenizer_file(path)
        text = read_text_file(file, "tokenizer file", max_bytes=256 * 2**20)  # regular, bounded, UTF-8
        try:
            json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{file} is not valid JSON (truncated download?): {exc}. Re-download or re-copy "
                                  f"{TOKENIZER_FILE} from the checkpoint.") from None
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as exc:  # the Rust loader raises a bare Exception on a bad schema
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"{file} is valid JSON but not a `tokenizers` serialization: {detail}. "
                f"Re-download or re-copy {TOKENIZER_FILE} from the checkpoint."
            ) from None
        return cls(tokenizer)

    from_pretrained = from_file

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (already carrying the Gemma pipeline)."""
        return self._tok

    @property
    def bos_id(self) -> int:
        return self._vocab[SPECIAL_TOKENS["bos"]]

    @property
    def eos_id(self) -> int:
        return self._vocab[SPECIAL_TOKENS["eos"]]

    @property
    def pad_id(self) -> int:
        return self._vocab[SPECIAL_TOKENS["pad"]]

    @property
    def unk_id(self) -> int:
        return self._vocab[SPECIAL_TOKENS["unk"]]

    @property
    def image_id(self) -> int:
        return self._vocab[IMAGE_TOKEN]

    @property
    def bos_token(self) -> str:
        return SPECIAL_TOKENS["bos"]

    @property
    def eos_token(self) -> str:
        return SPECIAL_TOKENS["eos"]

    @property
    def image_token(self) -> str:
        return IMAGE_TOKEN

    def __len__(self) -> int:
        """Number of ids, added tokens included (`<image>` is the last one for official checkpoints)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no bos/eos. Special-token strings in `text` become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (list or 1-D tensor). Skipping drops bos/eos/pad/image but keeps loc/seg tokens."""
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(seq, skip_special_tokens) for seq in sequences]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` to `path` (a file path)."""
        self._tok.save(str(path))


def _as_int_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]
