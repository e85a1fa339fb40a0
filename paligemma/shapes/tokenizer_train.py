"""Train a small tokenizer in the Gemma/PaliGemma layout (for tests and the shipped small model).

Layout, mirroring the official vocabulary (DESIGN.md, tokenizer):
    0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>
    5..260          <0x00>..<0xFF> byte-fallback tokens
    261..V-1        BPE pieces learned from the texts ("▁" marks a space, no prefix space)
    ...             <unusedN> fillers when the texts yield fewer pieces than asked
    V..V+1023       <loc0000>..<loc1023>   ordinary added tokens (kept by decode)
    V+1024..V+1151  <seg000>..<seg127>     ordinary added tokens
    V+1152          <image>                special added token (last id, as in HF's conversion)
V is `vocab_size`. The runtime pipeline is HF 5.24 GemmaTokenizer's (see paligemma.tokenizer), so
transformers loads these files and tokenises exactly as we do.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers

from ..tokenizer import (
    EXTRA_TOKENS,
    IMAGE_TOKEN,
    GemmaTokenizer,
    apply_gemma_pipeline,
)

BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
NUM_RESERVED = len(BASE_SPECIALS) + len(BYTE_TOKENS)  # 261 ids before the learned pieces

# A fixed corpus: PaliGemma task prompts plus plain English about simple scenes. Small on purpose.
_TEST_CORPUS = """\
caption en
caption es
describe en
detect cat ; dog
detect circle ; square ; triangle
segment cat
answer en what is in the image?
answer en how many circles are there?
question en where is the red square?
ocr
a photo of a cat sitting on a bench.
a dog is running in the park with a ball.
the red circle is to the left of the blue square.
there are 3 green triangles and 2 yellow circles.
a small white square above a large black circle.
an orange triangle below a purple square on a gray background.
two people are walking down the street in the rain.
a bowl of fruit on a wooden table next to the window.
the quick brown fox jumps over the lazy dog.
what color is the shape in the top right corner?
how many objects are in the picture? there are 4 objects.
is there a circle in the image? yes. is there a star? no.
the image shows a city at night with bright lights.
a man is riding a bicycle on a road near the sea.
one, two, three, four, five, six, seven, eight, nine, ten.
red, green, blue, yellow, orange, purple, white, black, gray, pink.
left, right, top, bottom, center, above, below, next to, between.
"""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a Gemma-layout BPE tokenizer on `texts`.

    `vocab_size` counts the base vocabulary: the 5 specials, 256 bytes and the learned pieces
    (at least 389: 261 reserved + 96 printable-ASCII/"▁" characters + 32). loc/seg/image tokens come on
    top (see module docstring). Deterministic for the same texts.
    """
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c") | {"▁"})
    budget = vocab_size - NUM_RESERVED
    if budget < len(alphabet) + 32:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {NUM_RESERVED + len(alphabet) + 32}")
    trainer = trainers.BpeTrainer(
        vocab_size=budget,
        initial_alphabet=alphabet,
        limit_alphabet=max(len(alphabet), budget // 2),  # rarer characters go to byte fallback
        show_progress=False,
    )
    learner = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    learner.normalizer = normalizers.Replace(" ", "▁")
    # Training-time word boundaries like SentencePiece's: pieces may start with "▁" but never span it,
    # "\n" stands alone, digits are single. At runtime the Gemma pipeline does no splitting.
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    learner.train_from_iterator(texts, trainer=trainer)

    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [p for p, _ in learned if p not in BASE_SPECIALS and p not in BYTE_TOKENS]
    # Pad a short corpus's vocab (like Gemma's <unusedN>) so loc/seg/image ids depend on vocab_size only.
    pieces += [f"<unused{i}>" for i in range(budget - len(pieces))]
    vocab = {tok: i for i, tok in enumerate(BASE_SPECIALS + BYTE_TOKENS + pieces + EXTRA_TOKENS)}
    merges = [tuple(m) for m in _merges(learner)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True))
    apply_gemma_pipeline(tokenizer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in EXTRA_TOKENS])
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return tokenizer


def _merges(tokenizer: Tokenizer) -> list[list[str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [m.split(" ") if isinstance(m, str) else m for m in merges]


def save_tokenizer_files(
    tokenizer: Tokenizer | GemmaTokenizer,
    directory: str | os.PathLike,
    image_size: int = 224,
    num_image_tokens: int | None = None,
) -> Path:
    """Write tokenizer + processor files (HF layout) for `tokenizer` into `directory`; returns it."""
    from ..processing_paligemma import PaliGemmaProcessor

    if not isinstance(tokenizer, GemmaTokenizer):
        tokenizer = GemmaTokenizer(tokenizer)
    if num_image_tokens is None:
        num_image_tokens = (image_size // 14) ** 2
    processor = PaliGemmaProcessor(tokenizer, image_size=image_size, num_image_tokens=num_image_tokens)
    processor.save_pretrained(directory)
    return Path(directory)


def make_test_tokenizer(
    directory: str | os.PathLike,
    image_size: int = 28,
    num_image_tokens: int = 4,
    vocab_size: int = 512,
) -> GemmaTokenizer:
    """Train on a fixed built-in English corpus (~0.1 s), write the files to `directory`, return the tokenizer.

    Defaults suit tiny test checkpoints: 28x28 images, 4 image tokens (patch 14).
    With vocab_size=512: len(tokenizer) == 1665 and image_id == 1664.
    """
    tokenizer = GemmaTokenizer(train_tokenizer(_TEST_CORPUS.splitlines(keepends=True), vocab_size))
    save_tokenizer_files(tokenizer, directory, image_size=image_size, num_image_tokens=num_image_tokens)
    return tokenizer
