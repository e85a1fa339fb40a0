"""Configuration of PaliGemma 1 and 2, read from the `config.json` files Google published on the hub.

The published files are sparse: they rely on the defaults of the `transformers` classes they were
written with (DESIGN.md, config). `from_dict` fills the same defaults, by `model_type`, so a sparse file means
here exactly what it means to `transformers` 5.x. Every text dimension comes from `text_config`: the
top-level `hidden_size` of PaliGemma 2 files is stale (DESIGN.md, config) and is ignored.

Every value is checked before anything is built from it (`_TEXT_SCHEMA`, `_VISION_SCHEMA`): types,
ranges, finite numbers, non-zero divisors, divisibility, special ids inside the vocabulary, and sanity
bounds on sizes, so a corrupt file fails with the field, its value and what is expected, never with a
traceback or a model that allocates gigabytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checks import finite_number, read_json_file, whole_number
from .errors import CheckpointError

# Defaults of transformers' GemmaConfig / Gemma2Config / SiglipVisionConfig (5.x): what a missing key means.
_GEMMA_DEFAULTS = dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=16, head_dim=256,
)
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
)
_SIGLIP_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
)
# What PaliGemmaConfig builds when a whole sub-config is absent (its `sub_configs_defaults`).
_PALIGEMMA_VISION_WHEN_ABSENT = dict(
    intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224,
    num_hidden_layers=27, num_attention_heads=16,
)
_PALIGEMMA_TEXT_WHEN_ABSENT = dict(
    model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
    num_attention_heads=8, num_key_value_heads=1, vocab_size=257152,
)
_TANH_GELU = {"gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast"}  # legacy "gelu" means tanh GELU (DESIGN.md, config)


@dataclass
class VisionConfig:
    """SigLIP vision tower. PaliGemma always uses So400m/14: width 1152, 27 layers, MLP 4304."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 224/14 -> 256 image tokens


@dataclass
class TextConfig:
    """Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    model_type: str = "gemma"  # "gemma" -> Gemma 1 layer; "gemma2" -> pre/post norms, softcaps, sliding window
    vocab_size: int = 257216  # 257152 Gemma+loc+seg, + <image>, padded to a multiple of 64
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1  # 1 = multi-query (PG1); PG2 uses grouped-query
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float | None = None  # Gemma 2: scale is this**-0.5 (144 for 28B, not head_dim)
    attn_logit_softcapping: float | None = None  # Gemma 2: tanh(s/50)*50 on scores, before the mask
    final_logit_softcapping: float | None = None  # Gemma 2: tanh(l/30)*30 on logits
    sliding_window: int | None = None  # Gemma 2: window (including self) on `sliding_attention` layers
    layer_types: list[str] = field(default_factory=list)  # per layer: "full_attention" | "sliding_attention"

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return base**-0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"


QUANT_METHOD = "paligemma-int8"  # config.json's quantization_config of an int8 checkpoint saved by this library


@dataclass
class PaliGemmaConfig:
    """The whole model: vision tower + projector + decoder, and the special token ids."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 2048  # projector output width; equals text.hidden_size in every release
    image_token_index: int = 257152
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)  # generation stops at any of these (PG2 text config lists 1 and 107)
    tie_word_embeddings: bool = True
    dtype: str | None = None  # dtype the weights were stored in, as config.json says ("float32", "bfloat16")
    quantization: str | None = None  # "int8": saved by this library from a quantize="int8" model (QUANT_METHOD)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PaliGemmaConfig":
        """Build from a parsed config.json (hub, transformers-5-saved, or this project's own)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"config.json must hold a JSON object, got {type(d).__name__}")
        mt = d.get("model_type", "paligemma")
        if mt != "paligemma":
            raise CheckpointError(
                f"config.json has model_type={mt!r}; this library loads PaliGemma checkpoints (model_type 'paligemma')"
            )
        vision = _vision_from_dict(_section(d, "vision_config"))
        text = _text_from_dict(_section(d, "text_config"))
        projection_dim = _int("projection_dim", d.get("projection_dim", 2048), 1, MAX_WIDTH)
        if projection_dim != text.hidden_size:
            raise CheckpointError(
                f"config.json: projection_dim={projection_dim} but text_config.hidden_size={text.hidden_size}; "
                "the projector must output the decoder width"
            )
        tc = d.get("text_config") or {}
        vocab = text.vocab_size
        eos_ids = token_ids("eos_token_id", d.get("eos_token_id", tc.get("eos_token_id", 1)), vocab)
        text_eos = tc.get("eos_token_id")
        if isinstance(text_eos, list):  # PG2: [1, 107]; HF generate stops at both
            eos_ids = tuple(dict.fromkeys([*eos_ids, *token_ids("text_config.eos_token_id", text_eos, vocab)]))
        dtype = d.get("dtype", d.get("torch_dtype"))
        quantization = None
        if d.get("quantization_config") is not None:
            q = d["quantization_config"]
            method = q.get("quant_method") if isinstance(q, dict) else q
            if not isinstance(q, dict) or method != QUANT_METHOD or q.get("format") != "int8":
                raise CheckpointError(
                    f"config.json: the weights are quantized with {method!r}, which this library does not read; "
                    f"use the original bf16/fp32 checkpoint (and quantize='int8' when loading, if you want int8)")
            quantization = "int8"
        tie = d.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            raise CheckpointError(f"config.json: tie_word_embeddings={tie!r}; expected true or false")
        config = cls(
            vision=vision,
            text=text,
            projection_dim=projection_dim,
            image_token_index=_int("image_token_index", d.get("image_token_index", d.get("image_token_id", 256000)),
                                   0, MAX_VOCAB),
            bos_token_id=_special("bos_token_id", d.get("bos_token_id"), 2, vocab),
            eos_token_id=eos_ids[0],
            pad_token_id=_special("pad_token_id", d.get("pad_token_id"), 0, vocab),
            eos_token_ids=eos_ids,
            tie_word_embeddings=tie,
            dtype=dtype if isinstance(dtype, str) else None,
            quantization=quantization,
        )
        n = config.num_parameters()
        if n > MAX_PARAMETERS:
            raise CheckpointError(f"config.json implies {n:,} parameters, more than {MAX_PARAMETERS:,} "
                                  "(the largest PaliGemma has 28 billion); the sizes in the file are wrong")
        return config

    def num_parameters(self) -> int:
        """The parameter count this config builds (the tied lm_head counted once), computed without building."""
        v, t = self.vision, self.text
        hv, iv = v.hidden_size, v.intermediate_size
        vision = (v.num_channels * v.patch_size**2 * hv + hv + v.num_patches * hv
                  + v.num_hidden_layers * (4 * (hv * hv + hv) + 4 * hv + 2 * hv * iv + iv + hv) + 2 * hv)
        h, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        norms = 4 if t.is_gemma2 else 2
        layer = 2 * h * q + 2 * h * kv + 3 * h * t.intermediate_size + norms * h
        text = t.vocab_size * h + t.num_hidden_layers * layer + h
        head = 0 if self.tie_word_embeddings else t.vocab_size * h
        return vision + hv * self.projection_dim + self.projection_dim + text + head

    @classmethod
    def from_file(cls, path: str | Path) -> "PaliGemmaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_json_file(path, "a checkpoint directory needs the config.json published with it")
        try:
            return cls.from_dict(d)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {str(e).removeprefix('config.json: ')}") from None

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """A complete config.json that both this library and transformers 5.x read back identically."""
        t, v = self.text, self.vision
        text = {
            "model_type": t.model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if t.is_gemma2:
            text.update(
                query_pre_attn_scalar=t.query_pre_attn_scalar,
                attn_logit_softcapping=t.attn_logit_softcapping,
                final_logit_softcapping=t.final_logit_softcapping,
                sliding_window=t.sliding_window,
                layer_types=list(t.layer_types),
            )
        vision = {"model_type": "siglip_vision_model", **asdict(v), "projection_dim": self.projection_dim,
                  "vision_use_head": False, "hidden_act": "gelu_pytorch_tanh"}
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "image_token_index": self.image_token_index,
            "projection_dim": self.projection_dim,
            "hidden_size": t.hidden_size,
            "vocab_size": t.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            **({"dtype": self.dtype} if self.dtype else {}),
            **({"quantization_config": {"quant_method": QUANT_METHOD, "format": self.quantization,
                                        "scheme": "symmetric per output channel: weight = int8 * weight_scale"}}
               if self.quantization else {}),
            "text_config": text,
            "vision_config": vision,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


# Sanity bounds: far above every released PaliGemma (widths <= 4608, 46 layers, 257216 tokens, 896 px),
# far below what would exhaust memory before a weight is read.
MAX_WIDTH = 1 << 16
MAX_LAYERS = 1000
MAX_VOCAB = 1 << 21
MAX_CONTEXT = 1 << 20
MAX_PARAMETERS = 200_000_000_000
_INT = "int"
_POS = "positive"  # finite float > 0
_VISION_SCHEMA = {
    "hidden_size": (_INT, 1, MAX_WIDTH), "intermediate_size": (_INT, 1, 4 * MAX_WIDTH),
    "num_hidden_layers": (_INT, 1, MAX_LAYERS), "num_attention_heads": (_INT, 1, 1024),
    "num_channels": (_INT, 3, 3),  # the processor always gives RGB
    "image_size": (_INT, 1, 8192), "patch_size": (_INT, 1, 8192), "layer_norm_eps": (_POS, 0, 1),
}
_TEXT_SCHEMA = {
    "vocab_size": (_INT, 1, MAX_VOCAB), "hidden_size": (_INT, 1, MAX_WIDTH),
    "intermediate_size": (_INT, 1, 4 * MAX_WIDTH), "num_hidden_layers": (_INT, 1, MAX_LAYERS),
    "num_attention_heads": (_INT, 1, 1024), "num_key_value_heads": (_INT, 1, 1024), "head_dim": (_INT, 1, 4096),
    "rms_norm_eps": (_POS, 0, 1), "rope_theta": (_POS, 0, 1e15),
    "max_position_embeddings": (_INT, 1, MAX_CONTEXT), "query_pre_attn_scalar": (_POS, 0, 1e9),
    "attn_logit_softcapping": (_POS, 0, 1e9), "final_logit_softcapping": (_POS, 0, 1e9),
    "sliding_window": (_INT, 1, MAX_CONTEXT),
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    return whole_number(f"config.json: {where}", value, lo, hi)


def _special(where: str, value: Any, default: int, vocab: int) -> int:
    """A special token id: absent or null means the default; otherwise an id inside the vocabulary."""
    return default if value is None else _int(where, value, 0, vocab - 1)


def token_ids(where: str, value: Any, vocab: int, source: str = "config.json") -> tuple[int, ...]:
    """One id or a non-empty list of ids, each inside the vocabulary (an eos id outside it never stops)."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise CheckpointError(f"{source}: {where}=[]; expected a token id or a non-empty list of ids")
    return tuple(whole_number(f"{source}: {where}", v, 0, vocab - 1) for v in values)


def _section(d: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = d.get(key)
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"config.json: {key}={value!r}; expected a JSON object (or no {key} for defaults)")
    return value


def _pick(d: dict[str, Any], defaults: dict[str, Any], cls: type, schema: dict, where: str) -> dict[str, Any]:
    """Fields of `cls` from `d`, falling back to `defaults`, each checked against `schema` (keys of `d` that
    `cls` lacks are irrelevant)."""
    names = set(cls.__dataclass_fields__)
    out = {k: v for k, v in defaults.items() if k in names}
    optional = {"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"}
    out.update({k: v for k, v in d.items() if k in names and (v is not None or k in optional)})
    for k, v in out.items():
        if k not in schema or v is None:
            continue
        kind, lo, hi = schema[k]
        if kind == _INT:
            out[k] = _int(f"{where}.{k}", v, lo, hi)
        else:  # checked, kept as written (transformers wants query_pre_attn_scalar as an int)
            finite_number(f"config.json: {where}.{k}", v, lo, hi, lo_open=True)
    return out


def _vision_from_dict(d: dict[str, Any] | None) -> VisionConfig:
    if d is None:
        d, defaults = {}, {**_SIGLIP_DEFAULTS, **_PALIGEMMA_VISION_WHEN_ABSENT}
    else:
        defaults = _SIGLIP_DEFAULTS
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if not isinstance(act, str) or act not in _TANH_GELU:
        raise CheckpointError(f"config.json: vision_config.hidden_act={act!r} is not supported (SigLIP uses tanh GELU)")
    v = VisionConfig(**_pick(d, defaults, VisionConfig, _VISION_SCHEMA, "vision_config"))
    if v.image_size % v.patch_size:
        raise CheckpointError(f"config.json: vision_config.image_size={v.image_size} is not a multiple of "
                              f"vision_config.patch_size={v.patch_size}")
    if v.num_patches > 1 << 16:
        raise CheckpointError(f"config.json: vision_config gives (image_size // patch_size)**2 = {v.num_patches} "
                              "image tokens; expected at most 65536 (PaliGemma uses 256 to 4096)")
    if v.hidden_size % v.num_attention_heads:
        raise CheckpointError(f"config.json: vision_config.hidden_size={v.hidden_size} is not a multiple of "
                              f"vision_config.num_attention_heads={v.num_attention_heads}")
    return v


def _rope_theta(d: dict[str, Any]) -> Any:
    """rope_theta from `rope_parameters` / `rope_scaling` (transformers 5 / 4) or the top level; only
    Gemma's default RoPE is accepted."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise CheckpointError(f"config.json: text_config.{key}={rope!r}; expected an object such as "
                                  '{"rope_type": "default"} or null')
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"config.json: text_config.{key} has rope type {kind!r}, which is not supported "
                                  "(Gemma uses default RoPE)")
        if rope.get("rope_theta") is not None:
            return rope["rope_theta"]
    return 10000.0 if d.get("rope_theta") is None else d["rope_theta"]


def _text_from_dict(d: dict[str, Any] | None) -> TextConfig:
    if d is None:
        d = dict(_PALIGEMMA_TEXT_WHEN_ABSENT)
    mt = d.get("model_type", "gemma")
    if not isinstance(mt, str) or mt not in ("gemma", "gemma2"):
        raise CheckpointError(f"config.json: text_config.model_type={mt!r}; expected 'gemma' (PG1) or 'gemma2' (PG2)")
    defaults = dict(_GEMMA2_DEFAULTS if mt == "gemma2" else _GEMMA_DEFAULTS)
    fields = _pick({**d, "rope_theta": _rope_theta(d)}, defaults, TextConfig, _TEXT_SCHEMA, "text_config")
    fields["model_type"] = mt
    fields["rope_theta"] = float(fields["rope_theta"])
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if not isinstance(act, str) or act not in _TANH_GELU:
        raise CheckpointError(f"config.json: text hidden activation {act!r} is not supported (Gemma uses tanh GELU)")
    if d.get("attention_bias"):
        raise CheckpointError("config.json: attention_bias=true is not a Gemma layout")
    layer_types = fields.get("layer_types", [])
    if not isinstance(layer_types, list) or any(t not in _LAYER_TYPES for t in layer_types):
        raise CheckpointError(f"config.json: text_config.layer_types={str(layer_types)[:80]}; expected a list of "
                              f"{' / '.join(_LAYER_TYPES)}")
    t = TextConfig(**fields)
    if mt == "gemma":  # Gemma 1 has none of these, whatever a file says
        t.query_pre_attn_scalar = t.attn_logit_softcapping = t.final_logit_softcapping = t.sliding_window = None
        t.layer_types = ["full_attention"] * t.num_hidden_layers
    elif not t.layer_types:  # Gemma 2 default: sliding on even layers (0, 2, 4, ...)
        t.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(t.num_hidden_layers)]
    if len(t.layer_types) != t.num_hidden_layers:
        raise CheckpointError(
            f"config.json: text_config.layer_types has {len(t.layer_types)} entries for "
            f"num_hidden_layers={t.num_hidden_layers}; expected one per layer"
        )
    if t.num_attention_heads % t.num_key_value_heads:
        raise CheckpointError(f"config.json: text_config.num_attention_heads={t.num_attention_heads} is not a "
                              f"multiple of text_config.num_key_value_heads={t.num_key_value_heads}")
    return t
