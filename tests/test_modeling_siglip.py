"""modeling_siglip.py: the vision tower's features and the projected image features equal transformers'."""

import pytest
import torch

import paligemma

from .conftest import hf_model, rel_diff


@pytest.mark.parametrize("ckpt", ["pg1_dir", "pg2_dir"])
def test_image_features_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, ref = paligemma.load_model(path, quantize=None), hf_model(path)
    size = ours.config.vision.image_size
    pix = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tower = ours.vision_tower(pix)  # [2, N, Hv]
        ref_tower = ref.model.vision_tower(pixel_values=pix).last_hidden_state
        feats = ours.get_image_features(pix)  # [2, N, H]
        ref_feats = ref.model.get_image_features(pix)
    ref_feats = getattr(ref_feats, "pooler_output", ref_feats)
    assert tower.shape == (2, ours.config.num_image_tokens, ours.config.vision.hidden_size)
    assert rel_diff(tower, ref_tower) <= 1e-5
    assert rel_diff(feats, ref_feats.reshape(feats.shape)) <= 1e-5
