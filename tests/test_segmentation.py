"""Tests for paligemma/segmentation.py: the VQ-VAE mask decoder on weights built here with the
published names and shapes, file loading (npz without pickle, safetensors copy), strict key checks,
and pasting a 64x64 map into a box of a non-square image."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paligemma.errors import CheckpointError, InputError
from paligemma.segmentation import (
    CODEBOOK_KEY, ENCODER_KEYS, MaskDecoder, VAEWeightsNotFound, expected_shapes, load_mask_decoder,
    load_state, paste_mask, save_safetensors,
)

D = 8  # code width; the real file's is read from it


def random_state(dim=D, seed=0, with_encoder=True):
    rng = np.random.default_rng(seed)
    state = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in expected_shapes(dim).items()}
    if with_encoder:  # present in vae-oid.npz, ignored by the decoder
        state.update({k: np.zeros(3, np.float32) for k in ENCODER_KEYS})
    return state


def test_published_names_and_shapes():
    s = expected_shapes(512)
    assert s[CODEBOOK_KEY] == (128, 512)
    assert s["decoder.0.weight"] == (128, 512, 1, 1)
    for b in (2, 3):  # resblocks: 128->128 3x3, 128->128 3x3, 128->128 1x1
        assert [s[f"decoder.{b}.net.{i}.weight"] for i in (0, 2, 4)] == [(128, 128, 3, 3), (128, 128, 3, 3), (128, 128, 1, 1)]
    # ConvTranspose weights are [in, out, k, k]: 128->128->64->32->16
    assert [s[f"decoder.{i}.weight"] for i in (4, 6, 8, 10)] == [
        (128, 128, 4, 4), (128, 64, 4, 4), (64, 32, 4, 4), (32, 16, 4, 4)]
    assert s["decoder.12.weight"] == (1, 16, 1, 1) and s["decoder.12.bias"] == (1,)
    assert len(s) == 1 + 2 * (1 + 2 * 3 + 4 + 1)  # codebook + weight/bias of 12 conv layers
    # the module's own parameter names are exactly the published ones
    names = set(MaskDecoder(512).state_dict()) - {"codebook"}
    assert names == set(s) - {CODEBOOK_KEY}


def test_output_shape_and_range_check():
    dec = MaskDecoder.from_state_dict(random_state())
    out = dec.decode_masks(np.random.default_rng(1).integers(0, 128, (3, 16)))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    assert dec.decode_masks(np.zeros((0, 16), np.int64)).shape == (0, 64, 64)
    with pytest.raises(InputError, match="in \\[0, 127\\]"):
        dec.decode_masks([[128] * 16])
    with pytest.raises(InputError, match="\\[N, 16\\]"):
        dec.decode_masks([[1] * 15])


def test_constant_map_from_biases_only():
    # every conv weight zero: the map is decoder.12's bias everywhere, whatever the codes
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(D).items()}
    state["decoder.12.bias"][:] = -0.75
    state["decoder.10.bias"][:] = 5.0  # killed by the zero final weight
    out = MaskDecoder.from_state_dict(state).decode_masks([[0] * 16, list(range(16))])
    assert np.array_equal(out, np.full((2, 64, 64), -0.75, np.float32))


def test_identity_path_shows_row_major_layout_and_upsampling():
    # channel 0 carries code k's value k through: conv1x1 weight 1, resblocks zero (pure residual),
    # each ConvTranspose(k4, s2, p1) with taps [0, 1, 1, 0] per axis is exact nearest 2x upsampling
    # (output o reads input o // 2 through taps 1 and 2), final conv weight 1, bias -0.5 (no ReLU).
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(D).items()}
    state[CODEBOOK_KEY][:, 0] = np.arange(128)
    state["decoder.0.weight"][0, 0] = 1.0
    taps = np.array([0, 1, 1, 0], np.float32)
    for i in (4, 6, 8, 10):
        state[f"decoder.{i}.weight"][0, 0] = np.outer(taps, taps)
    state["decoder.12.weight"][0, 0] = 1.0
    state["decoder.12.bias"][0] = -0.5
    codes = [5 * i + 1 for i in range(16)]
    out = MaskDecoder.from_state_dict(state).decode_masks([codes])[0]
    want = np.kron(np.array(codes, np.float32).reshape(4, 4), np.ones((16, 16), np.float32)) - 0.5
    assert np.array_equal(out, want)  # code i fills the 16x16 block at row i // 4, column i % 4


def reference_decode(state, codes):
    """The big_vision Flax decoder written with plain convolutions: each ConvTranspose is a conv of
    the spatially flipped, in/out-swapped kernel (transpose_kernel=True) over the stride-dilated input
    padded by 2 (Flax padding=2) - an independent check of ConvTranspose2d(k4, s2, p1)."""
    t = {k: torch.from_numpy(v) for k, v in state.items()}
    x = t[CODEBOOK_KEY][torch.as_tensor(codes).reshape(-1)].reshape(len(codes), 4, 4, -1).permute(0, 3, 1, 2)
    x = F.relu(F.conv2d(x, t["decoder.0.weight"], t["decoder.0.bias"]))
    for b in (2, 3):
        p = f"decoder.{b}.net."
        y = F.relu(F.conv2d(x, t[p + "0.weight"], t[p + "0.bias"], padding=1))
        y = F.relu(F.conv2d(y, t[p + "2.weight"], t[p + "2.bias"], padding=1))
        x = x + F.conv2d(y, t[p + "4.weight"], t[p + "4.bias"])
    for i in (4, 6, 8, 10):
        n, c, h, w = x.shape
        dil = torch.zeros(n, c, 2 * h - 1, 2 * w - 1)
        dil[:, :, ::2, ::2] = x
        kernel = t[f"decoder.{i}.weight"].flip(2, 3).transpose(0, 1)  # [out, in, 4, 4]
        x = F.relu(F.conv2d(F.pad(dil, (2, 2, 2, 2)), kernel, t[f"decoder.{i}.bias"]))
    return F.conv2d(x, t["decoder.12.weight"], t["decoder.12.bias"])[:, 0].numpy()


def test_matches_flax_style_reference_on_random_weights():
    state = random_state(with_encoder=False)
    codes = np.random.default_rng(2).integers(0, 128, (2, 16))
    out = MaskDecoder.from_state_dict(state).decode_masks(codes)
    np.testing.assert_allclose(out, reference_decode(state, codes), rtol=1e-4, atol=1e-5)


def test_npz_and_safetensors_load_the_same(tmp_path):
    state = random_state()
    np.savez(tmp_path / "vae-oid.npz", **state)
    save_safetensors(state, tmp_path / "vae-oid.safetensors")
    codes = [list(range(16)), list(range(112, 128))]
    a = load_mask_decoder(tmp_path / "vae-oid.npz").decode_masks(codes)
    b = load_mask_decoder(tmp_path / "vae-oid.safetensors").decode_masks(codes)
    assert np.array_equal(a, b)
    assert np.array_equal(a, MaskDecoder.from_state_dict(state).decode_masks(codes))


def test_npz_is_read_without_pickle(tmp_path):
    np.savez(tmp_path / "bad.npz", **{CODEBOOK_KEY: np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="bad.npz"):
        load_state(tmp_path / "bad.npz")


def test_missing_file_says_where_to_get_it(tmp_path):
    for path in (tmp_path / "nope.npz", None):
        with pytest.raises(VAEWeightsNotFound) as e:
            load_mask_decoder(path)
        msg = str(e.value)
        assert "gs://big_vision/paligemma/vae-oid.npz" in msg and "--vae PATH" in msg
        assert "huggingface.co/spaces/google/paligemma-hf/resolve/main/vae-oid.npz" in msg
        assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("key", ["decoder.3.net.2.weight", "decoder.12.bias", CODEBOOK_KEY])
def test_missing_key_is_named(key):
    state = random_state()
    del state[key]
    with pytest.raises(CheckpointError, match=f"missing.*{key.replace('.', '[.]')}"):
        MaskDecoder.from_state_dict(state)


def test_wrong_shape_is_named():
    state = random_state()
    state["decoder.6.weight"] = np.zeros((64, 128, 4, 4), np.float32)  # Conv layout instead of ConvTranspose
    with pytest.raises(CheckpointError, match=r"'decoder.6.weight' has shape \[64, 128, 4, 4\], expected \[128, 64, 4, 4\]"):
        MaskDecoder.from_state_dict(state)


def test_unexpected_keys():
    state = random_state()
    state["decoder.14.weight"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError, match="decoder.14.weight"):
        MaskDecoder.from_state_dict(state)
    state = random_state()
    state["something_else"] = np.zeros(1, np.float32)
    with pytest.warns(UserWarning, match="something_else"):
        MaskDecoder.from_state_dict(state)


# ---------------------------------------------------------------- pasting

def test_paste_mask_into_box_non_square():
    W, H = 640, 480
    box = (100.7, 50.2, 300.9, 250.5)  # pixels truncated like big_vision's int(): x 100..300, y 50..250
    m = paste_mask(np.ones((64, 64), np.float32), box, W, H)
    assert m.shape == (H, W) and m.dtype == bool
    assert m[50:250, 100:300].all() and m.sum() == (300 - 100) * (250 - 50)


def test_paste_mask_resizes_bilinear_and_thresholds_at_zero():
    W, H = 640, 480
    m64 = -np.ones((64, 64), np.float32)
    m64[:, 32:] = 1.0  # right half inside the object
    m = paste_mask(m64, (0, 0, 128, 32), W, H)  # box 128 x 32 px: 2x wide, half as tall
    assert m[:32, 64:128].all() and not m[:32, :64].any() and not m[32:].any() and not m[:, 128:].any()
    soft = paste_mask(m64, (0, 0, 128, 32), W, H, threshold=None)
    assert soft.dtype == np.float32 and soft[0, 0] == pytest.approx(-1.0) and soft[0, 127] == pytest.approx(1.0)
    assert soft[0, 63] < 0 < soft[0, 64]


def test_paste_mask_degenerate_and_clipped_boxes():
    ones = np.ones((64, 64), np.float32)
    assert not paste_mask(ones, (10, 10, 10, 50), 64, 48).any()  # zero width
    m = paste_mask(ones, (-5, -5, 1000, 1000), 64, 48)  # clipped to the image
    assert m.all() and m.shape == (48, 64)
