"""PaliGemma processor: prompts + images -> model inputs (ids, masks, token types, labels, pixels).

Mirrors `transformers` 5.24 `PaliGemmaProcessor` with the PIL backend of `SiglipImageProcessor`
(docs/DESIGN.md, processor):
    text:   "<image>" * num_image_tokens * n_images + "<bos>" + prompt + "\n"  [+ suffix + "<eos>"]
            token_type 0 on the prefix, 1 on suffix+eos; labels = ids there, -100 elsewhere;
            batches are LEFT-padded with <pad> (attention 0, token type 0, label -100).
    images: RGB (alpha composited onto white) -> PIL bicubic resize to (S, S) -> uint8 as float64 * 1/255
            -> float32 -> (x - mean) / std in float32 -> float32 [3, S, S]; bit-identical to HF's PIL path.
One deliberate difference: one trailing "\n" is stripped from each prompt, so "prompt\n" does not
become "\n\n" (DESIGN.md). HF also returns all -100 `labels` without a suffix; we return labels only with one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_files
from .checks import finite_number, read_json_file, valid_text, whole_number
from .config import PaliGemmaConfig
from .errors import CheckpointError, InputError
from .images import as_image, load_image, to_rgb  # noqa: F401 (load_image: re-exported)
from .tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, TOKENIZER_FILE, GemmaTokenizer

IGNORE_INDEX = -100


class BatchFeature(dict):
    """A dict of tensors with `.to(device, dtype)`; dtype applies to floating tensors only (pixel_values)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "BatchFeature":
        if isinstance(device, torch.dtype):  # batch.to(torch.bfloat16), as with HF's BatchFeature
            device, dtype = None, device
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                self[key] = value.to(device=device, dtype=cast)
        return self


class PaliGemmaProcessor:
    """Turns prompts (+ optional suffixes for training) and images into a `BatchFeature`."""

    def __init__(
        self,
        tokenizer: GemmaTokenizer,
        image_size: int = 224,
        num_image_tokens: int = 256,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        self.tokenizer = tokenizer
        self.image_size = whole_number("image_size", image_size, 1, 8192, InputError)
        self.num_image_tokens = whole_number("num_image_tokens", num_image_tokens, 1, 1 << 16, InputError)
        self.image_mean = _triple(image_mean, "image_mean", error=InputError)
        self.image_std = _triple(image_std, "image_std", nonzero=True, error=InputError)
        self.rescale_factor = 1 / 255

    # ----------------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PaliGemmaProcessor":
        """Read tokenizer.json and preprocessor_config.json (or v5 processor_config.json), with config.json
        supplying the image size / token count when those are missing."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        tokenizer = GemmaTokenizer.from_file(directory)
        file = directory / "preprocessor_config.json"
        image_cfg = _read_json(file)
        if image_cfg is None:
            file = directory / "processor_config.json"
            image_cfg = (_read_json(file) or {}).get("image_processor")
        vision = PaliGemmaConfig.from_file(directory).vision if (directory / "config.json").exists() else None
        cfg_size = vision.image_size if vision else 224
        cfg_tokens = vision.num_patches if vision else 256
        if image_cfg is None:
            return cls(tokenizer, image_size=cfg_size, num_image_tokens=cfg_tokens)
        if not isinstance(image_cfg, dict):
            raise CheckpointError(f"{file}: expected a JSON object, got {type(image_cfg).__name__}; re-copy it")
        size = _square_size(image_cfg.get("size", cfg_size), file)
        patch = vision.patch_size if vision else 14
        tokens = whole_number(f"{file}: image_seq_length", image_cfg.get("image_seq_length", (size // patch) ** 2),
                              1, 1 << 16)
        if vision and tokens != cfg_tokens:
            raise CheckpointError(
                f"{directory}: preprocessor image_seq_length={tokens} but config.json vision_config gives "
                f"({cfg_size}//patch)**2={cfg_tokens} image features; fix one of the two files"
            )
        return cls(
            tokenizer,
            image_size=size,
            num_image_tokens=tokens,
            image_mean=_triple(image_cfg.get("image_mean", 0.5), f"{file}: image_mean"),
            image_std=_triple(image_cfg.get("image_std", 0.5), f"{file}: image_std", nonzero=True),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the hub layout (as written by transformers 4.4x, loadable by 5.x):
        tokenizer.json, tokenizer_config.json, special_tokens_map.json, preprocessor_config.json; all four
        swapped in at once (`atomic.atomic_files`): a failed save leaves the previous files as they were."""
        with atomic_files(directory) as stage:
            self._write(stage)

    def _write(self, directory: Path) -> None:
        self.tokenizer.save(directory / TOKENIZER_FILE)
        backend = self.tokenizer.backend
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(backend.get_added_tokens_decoder().items())
        }
        named = {f"{role}_token": tok for role, tok in SPECIAL_TOKENS.items()}
        tokenizer_config = {
            "add_bos_token": True,  # as the official files; the processor writes <bos> itself anyway
            "add_eos_token": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [IMAGE_TOKEN],
            **{k: named[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
            "padding_side": "left",
            "processor_class": "PaliGemmaProcessor",
            "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer",
        }

        def token_entry(content: str) -> dict:
            return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

        special_tokens_map = {
            "additional_special_tokens": [token_entry(IMAGE_TOKEN)],
            **{k: token_entry(named[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        }
        preprocessor_config = {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_processor_type": "SiglipImageProcessor",
            "image_seq_length": self.num_image_tokens,
            "image_std": list(self.image_std),
            "processor_class": "PaliGemmaProcessor",
            "resample": 3,  # PIL bicubic
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.image_size, "width": self.image_size},
        }
        for name, content in [("tokenizer_config.json", tokenizer_config),
                              ("special_tokens_map.json", special_tokens_map),
                              ("preprocessor_config.json", preprocessor_config)]:
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---------------------------------------------------------------------------------- images
    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 [3, S, S], reproducing HF 5.24's PIL backend arithmetic exactly."""
        size = (self.image_size, self.image_size)
        pixels = np.asarray(to_rgb(image).resize(size, resample=Image.Resampling.BICUBIC))  # [S, S, 3] uint8
        pixels = pixels.transpose(2, 0, 1)  # [3, S, S]
        scaled = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)  # HF upcasts, then downcasts
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        return (scaled - mean) / std  # [3, S, S] float32

    def _load(self, image, where: str) -> Image.Image:
        return as_image(image, where)

    def _images_per_prompt(self, images, n_prompts: int) -> list[list[Image.Image]]:
        """Accept one image, one image per prompt, or a list of images per prompt."""
        if images is None:
            raise InputError("PaliGemma needs an image for every prompt; pass images=")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != n_prompts:
            raise InputError(
                f"got {len(images)} image entries for {n_prompts} prompts; pass one image (or one list of "
                "images) per prompt"
            )
        groups = []
        for i, entry in enumerate(images):
            group = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if not group:
                raise InputError(f"prompt {i} has an empty image list; every prompt needs at least one image")
            groups.append([self._load(img, f"image {j} of prompt {i}") for j, img in enumerate(group)])
        return groups

    # ------------------------------------------------------------------------------------ text
    def build_prompt(self, prompt: str, n_images: int) -> str:
        """The prefix string: image placeholders, <bos>, prompt, "\\n" (DESIGN.md, processor)."""
        if prompt.endswith("\n"):
            prompt = prompt[:-1]
        if IMAGE_TOKEN not in prompt:
            prompt = IMAGE_TOKEN * n_images + SPECIAL_TOKENS["bos"] + prompt
        else:
            found = prompt.count(IMAGE_TOKEN)
            if found != n_images:
                raise InputError(f"prompt {prompt[:60]!r} has {found} {IMAGE_TOKEN} tokens for {n_images} images")
            end = prompt.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN)  # HF: <bos> right after the last image
            prompt = prompt[:end] + SPECIAL_TOKENS["bos"] + prompt[end:]
        return prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens) + "\n"

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        suffix: str | Sequence[str] | None = None,
        padding: str | bool = "longest",
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Encode a batch. `images`: a PIL image / path, a list with one per prompt, or a list of lists.

        Returns input_ids, attention_mask, token_type_ids (int64 [B, T]), pixel_values (float32
        [n_images, 3, S, S], images flattened in prompt order) and, with `suffix`, labels (int64 [B, T]).
        """
        if text is None:
            text = [""] * (len(images) if isinstance(images, (list, tuple)) else 1)
        if not isinstance(text, (str, list, tuple)):
            raise InputError(f"text is a {type(text).__name__}; expected a prompt string or a list of them")
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts:
            raise InputError("empty batch: pass at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompt {i} is a {type(prompt).__name__}, expected str "
                                 "(call processor(text=..., images=...) with keywords)")
            valid_text(f"prompt {i}", prompt, InputError)
        groups = self._images_per_prompt(images, len(prompts))
        if suffix is not None:
            if not isinstance(suffix, (str, list, tuple)):
                raise InputError(f"suffix is a {type(suffix).__name__}; expected a string or one per prompt")
            suffixes = [suffix] if isinstance(suffix, str) else list(suffix)
            if len(suffixes) != len(prompts) or not all(isinstance(s, str) for s in suffixes):
                raise InputError(f"suffix must be one string per prompt: got {len(suffixes)} for {len(prompts)}")
            for i, text in enumerate(suffixes):
                valid_text(f"suffix {i}", text, InputError)

        tok = self.tokenizer
        rows, types = [], []
        for i, (prompt, group) in enumerate(zip(prompts, groups)):
            ids = tok.encode(self.build_prompt(prompt, len(group)))
            kinds = [0] * len(ids)
            if suffix is not None:
                target = tok.encode(suffixes[i]) + [tok.eos_id]  # always supervise <eos> (DESIGN.md, processor)
                ids, kinds = ids + target, kinds + [1] * len(target)
            rows.append(ids)
            types.append(kinds)

        lengths = [len(r) for r in rows]
        if padding in ("longest", True):
            width = max(lengths)
        elif padding in (False, "do_not_pad", None) and (return_tensors is None or len(set(lengths)) == 1):
            width = None
        else:
            raise InputError(f"padding={padding!r} is not supported with ragged rows; use 'longest'")
        batch = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        for ids, kinds in zip(rows, types):
            pad = 0 if width is None else width - len(ids)  # left padding, as Gemma's tokenizer
            batch["input_ids"].append([tok.pad_id] * pad + ids)
            batch["attention_mask"].append([0] * pad + [1] * len(ids))
            batch["token_type_ids"].append([0] * pad + kinds)
        if suffix is not None:
            batch["labels"] = [[t if k == 1 else IGNORE_INDEX for t, k in zip(ids, kinds)]
                               for ids, kinds in zip(batch["input_ids"], batch["token_type_ids"])]
        pixels = [self.preprocess_image(img) for group in groups for img in group]

        if return_tensors == "pt":
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
            out["pixel_values"] = torch.from_numpy(np.stack(pixels))  # [n_images, 3, S, S]
            return BatchFeature(out)
        if return_tensors is None:
            return BatchFeature({**batch, "pixel_values": pixels})
        raise InputError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")

    # ---------------------------------------------------------------------------------- decode
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict | None:
    return read_json_file(path) if path.exists() else None


def _square_size(size, file: Path) -> int:
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
        if height is None or height != width:
            raise CheckpointError(f"{file}: size={size}; expected a square {{\"height\": S, \"width\": S}}")
        size = height
    return whole_number(f"{file}: size", size, 1, 8192)


def _triple(value, where: str, nonzero: bool = False, error=CheckpointError) -> tuple[float, float, float]:
    """One number or three (per RGB channel), finite; > 0 for a std (pixels are divided by it)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = list(values) * 3
    if len(values) != 3:
        raise error(f"{where}={value!r}; expected one number or three (R, G, B)")
    return tuple(finite_number(where, v, 0.0 if nonzero else -1e6, 1e6, lo_open=nonzero, error=error) for v in values)
