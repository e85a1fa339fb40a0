"""Random-weight checkpoints in the official hub layout, for tests and benchmarks.

Official weights cannot be downloaded everywhere; these checkpoints exercise the same loading code on
the same file layout (sparse `config.json`, hub key spelling, optional shards with an index) at any
size, from tiny test models to a full-size 3B. Weights are drawn per tensor from a generator seeded by
the tensor's name, so a checkpoint is reproducible and is written one tensor at a time.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import PaliGemmaConfig
from .loading import hub_key, write_safetensors
from .modeling_paligemma import PaliGemmaForConditionalGeneration

# Sparse config.json files in the style Google published (DESIGN.md, config): only what differs from defaults.
TINY_PG1 = {
    "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 64,
    "image_token_index": 1664, "projection_dim": 64, "vocab_size": 1728,
    "text_config": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 2, "vocab_size": 1728,
                    "num_image_tokens": 4},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 80,
                      "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14, "image_size": 28,
                      "num_image_tokens": 4, "projection_dim": 64, "projector_hidden_act": "gelu_fast",
                      "vision_use_head": False},
}
TINY_PG2 = {
    "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2048,  # stale, as on the hub (DESIGN.md, config)
    "image_token_index": 1664, "projection_dim": 64, "_vocab_size": 1664,
    "text_config": {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 64,
                    "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "num_hidden_layers": 3, "query_pre_attn_scalar": 24, "sliding_window": 6,
                    "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0, "eos_token_id": [1, 107],
                    "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 1728, "cache_implementation": "hybrid"},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 80,
                      "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14, "image_size": 42,
                      "num_image_tokens": 9, "projection_dim": 64, "vision_use_head": False},
}


def tiny_config(variant: str = "pg1", **text_overrides) -> dict:
    """A sparse tiny config.json dict; `variant` is "pg1" (Gemma, MQA) or "pg2" (Gemma 2, GQA, softcaps,
    a sliding window shorter than the prompt)."""
    d = copy.deepcopy({"pg1": TINY_PG1, "pg2": TINY_PG2}[variant])
    d["text_config"].update(text_overrides)
    return d


def random_tensors(config: PaliGemmaConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub key, tensor) for every parameter, drawn so activations stay O(1) through the layers."""
    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in PaliGemmaForConditionalGeneration(config).named_parameters()]
    for name, shape in shapes:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=g)
        if name.startswith("vision_tower") and "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * t  # LayerNorm scale
        elif name.startswith("language_model") and "norm" in name:
            t = 0.1 * t  # RMSNorm stores w of (1 + w)
        elif name.endswith("bias"):
            t = t * 0.02
        elif "embed_tokens" in name or "position_embedding" in name:
            t = t * (0.2 / config.text.hidden_size**0.5 if "embed_tokens" in name else 0.1)
        else:
            t = t / shape[1:].numel() ** 0.5  # unit-variance outputs for linear and conv weights
        yield hub_key(name), t.to(dtype)


def write_random_checkpoint(directory: str | Path, config_dict: dict, seed: int = 0,
                            dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 2**30,
                            tokenizer: bool = True) -> Path:
    """Write config.json (as given: sparse is fine) + random weights in hub spelling (+ tokenizer files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = PaliGemmaConfig.from_dict(config_dict)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    write_safetensors(random_tensors(config, seed, dtype), directory, max_shard_bytes)
    if tokenizer:
        from .shapes.tokenizer_train import make_test_tokenizer

        tok = make_test_tokenizer(directory, image_size=config.vision.image_size,
                                  num_image_tokens=config.num_image_tokens)
        if tok.image_id != config.image_token_index or len(tok) > config.vocab_size:
            raise ValueError(f"test tokenizer (image id {tok.image_id}, {len(tok)} tokens) does not fit the config")
    return directory
