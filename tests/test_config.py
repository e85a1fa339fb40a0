"""Reading the published config.json files: sparse files, defaults, and every variant's dimensions.

Parameter counts are checked against keras-hub's published preset sizes (keras-hub presets), plus the 64 padded
embedding rows of the HF checkpoints; they confirm every dimension the config yields."""

import copy

import pytest
import torch

from paligemma.config import PaliGemmaConfig
from paligemma.errors import CheckpointError
from paligemma.modeling_paligemma import PaliGemmaForConditionalGeneration

VISION = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "projection_dim": 2048,
          "projector_hidden_act": "gelu_fast", "vision_use_head": False}
PG1_224 = {  # google/paligemma-3b-pt-224 as published (DESIGN.md, config)
    "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma", "bos_token_id": 2,
    "eos_token_id": 1, "pad_token_id": 0, "hidden_size": 2048, "ignore_index": -100,
    "image_token_index": 257152, "projection_dim": 2048, "vocab_size": 257216, "torch_dtype": "float32",
    "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": VISION,
}
PG2_3B_224 = {  # google/paligemma2-3b-pt-224 (DESIGN.md, config): stale top-level hidden_size, sparse text config
    "_vocab_size": 257152, "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2,
    "eos_token_id": 1, "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma",
    "num_hidden_layers": 26, "pad_token_id": 0, "projection_dim": 2304, "torch_dtype": "bfloat16",
    "text_config": {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
                    "cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0,
                    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                    "hidden_size": 2304, "intermediate_size": 9216, "model_type": "gemma2",
                    "num_hidden_layers": 26, "num_image_tokens": 256, "num_key_value_heads": 4,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "torch_dtype": "bfloat16",
                    "vocab_size": 257216},
    "vision_config": {**VISION, "projection_dim": 2304},
}


def _variant(base, size=224, **text):
    d = copy.deepcopy(base)
    d["text_config"].update(text)
    if "hidden_size" in text:
        d["projection_dim"] = text["hidden_size"]
    if size != 224:
        d["vision_config"]["image_size"] = size
    return d


PG2_10B = dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8,
               num_hidden_layers=42)
PG2_28B = dict(hidden_size=4608, intermediate_size=36864, num_attention_heads=32, num_key_value_heads=16,
               num_hidden_layers=46, head_dim=128, query_pre_attn_scalar=144)
PAD_ROWS = 64  # HF checkpoints hold 257216 embedding rows; keras-hub counts 257152


@pytest.mark.parametrize("config, size, keras_params", [
    (PG1_224, 224, 2_923_335_408), (PG1_224, 448, 2_924_220_144), (PG1_224, 896, 2_927_759_088),
    (PG2_3B_224, 224, 3_032_094_960), (PG2_3B_224, 896, 3_036_518_640),
    (_variant(PG2_3B_224, **PG2_10B), 224, 9_662_409_456), (_variant(PG2_3B_224, **PG2_10B), 448, 9_663_294_192),
    (_variant(PG2_3B_224, **PG2_28B), 224, 27_650_192_112),
])
def test_parameter_count_matches_published_sizes(config, size, keras_params):
    cfg = PaliGemmaConfig.from_dict(_variant(config, size))
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    assert sum(p.numel() for p in model.parameters()) == keras_params + PAD_ROWS * cfg.text.hidden_size
    assert cfg.num_image_tokens == {224: 256, 448: 1024, 896: 4096}[size]


def test_pg1_defaults_fill_the_sparse_file():
    c = PaliGemmaConfig.from_dict(PG1_224)
    t = c.text
    assert (t.head_dim, t.rms_norm_eps, t.rope_theta, t.max_position_embeddings) == (256, 1e-6, 10000.0, 8192)
    assert t.attn_scale == 256**-0.5 and t.final_logit_softcapping is None and t.sliding_window is None
    assert c.vision.image_size == 224 and c.num_image_tokens == 256 and c.eos_token_ids == (1,)


def test_pg2_reads_text_dims_from_text_config_not_the_stale_top_level():
    c = PaliGemmaConfig.from_dict(PG2_3B_224)
    assert c.text.hidden_size == 2304 and c.projection_dim == 2304
    assert c.text.num_attention_heads == 8 and c.text.head_dim == 256  # Gemma2Config defaults, left out of the file
    assert c.text.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert c.eos_token_ids == (1, 107)
    assert (c.text.attn_logit_softcapping, c.text.final_logit_softcapping) == (50.0, 30.0)


def test_28b_scale_comes_from_query_pre_attn_scalar():
    c = PaliGemmaConfig.from_dict(_variant(PG2_3B_224, **PG2_28B))
    assert c.text.attn_scale == pytest.approx(1 / 12)  # not 128**-0.5 (DESIGN.md, config)


def test_roundtrip_through_to_dict_and_transformers():
    import transformers
    for d in (PG1_224, PG2_3B_224):
        ours = PaliGemmaConfig.from_dict(d)
        assert PaliGemmaConfig.from_dict(ours.to_dict()) == ours
        hf = transformers.PaliGemmaConfig.from_dict(ours.to_dict()).text_config
        ref = transformers.PaliGemmaConfig.from_dict(d).text_config
        for k in ("hidden_size", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size"):
            assert getattr(hf, k) == getattr(ref, k) == getattr(ours.text, k)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llava"}, "model_type"),
    ({"projection_dim": 1000}, "projection_dim"),
    ({"text_config": {"model_type": "gemma3"}}, "gemma3"),
    ({"vision_config": {**VISION, "image_size": 225}}, "image_size"),
])
def test_bad_configs_are_named(change, message):
    with pytest.raises(CheckpointError, match=message):
        PaliGemmaConfig.from_dict({**copy.deepcopy(PG1_224), **change})
