"""The top model (modeling_paligemma.py) against transformers 5.x on the same files: logits, loss, the
token types' meaning, the sliding window, several images per prompt."""

import pytest
import torch

import paligemma

from .conftest import hf_model, make_inputs, rel_diff

VARIANTS = ["pg1_dir", "pg2_dir"]


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_logits_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, ref = paligemma.load_model(path), hf_model(path)
    ids, tt, pix = make_inputs(ours)
    with torch.no_grad():
        a = ours(ids, pix, token_type_ids=tt).logits
        b = ref(input_ids=ids, pixel_values=pix, token_type_ids=tt, attention_mask=torch.ones_like(ids)).logits
    assert a.shape == b.shape == (1, ids.shape[1], ours.config.vocab_size)
    assert rel_diff(a, b) <= 1e-4


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_padded_batch_logits_and_loss_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, ref = paligemma.load_model(path), hf_model(path)
    rows = [make_inputs(ours, prompt_len=n, suffix_len=s, seed=n) for n, s in ((3, 2), (7, 4))]
    T = max(r[0].shape[1] for r in rows)
    ids = torch.zeros(2, T, dtype=torch.long)
    tt, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (r_ids, r_tt, _) in enumerate(rows):  # left padding, pads are token type 0
        n = r_ids.shape[1]
        ids[i, T - n:], tt[i, T - n:], mask[i, T - n:] = r_ids[0], r_tt[0], 1
    pix = torch.cat([r[2] for r in rows])
    labels = ids.masked_fill(tt == 0, -100)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + 1  # what HF's generate() passes
    with torch.no_grad():
        a = ours(ids, pix, mask, tt, labels=labels)
        b = ref(input_ids=ids, pixel_values=pix, attention_mask=mask, token_type_ids=tt, position_ids=pos,
                labels=labels)
    real = mask.bool()
    assert rel_diff(a.logits[real], b.logits[real]) <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-4 * abs(b.loss.item())


def test_token_type_ids_omitted_means_all_prefix(pg1_dir):
    model = paligemma.load_model(pg1_dir)
    ids, tt, pix = make_inputs(model)
    with torch.no_grad():
        none = model(ids, pix).logits
        zeros = model(ids, pix, token_type_ids=torch.zeros_like(ids)).logits
        causal_suffix = model(ids, pix, token_type_ids=tt).logits
    assert torch.equal(none, zeros)
    assert not torch.allclose(none[:, -4:], causal_suffix[:, -4:])  # the suffix mask matters


def test_sliding_window_changes_the_result(pg2_dir):
    """The tiny PG2 window (6) is shorter than the prompt, so parity above covers the sliding path."""
    model = paligemma.load_model(pg2_dir)
    ids, tt, pix = make_inputs(model, prompt_len=6, suffix_len=8)
    with torch.no_grad():
        windowed = model(ids, pix, token_type_ids=tt).logits
        model.config.text.sliding_window = 10_000
        unwindowed = model(ids, pix, token_type_ids=tt).logits
    assert not torch.allclose(windowed[:, -8:], unwindowed[:, -8:])
    assert torch.allclose(windowed[:, :-8], unwindowed[:, :-8], atol=1e-6)  # prefix overrides the window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ckpt", VARIANTS)
def test_bit_identical_to_transformers_default_attention(ckpt, dtype, request):
    """With the kernels transformers picks by default (SDPA for PG1 and the vision tower, eager for
    Gemma 2's softcapped attention) the logits are equal to the last bit, in fp32 and in bf16."""
    import transformers

    path = request.getfixturevalue(ckpt)
    ours = paligemma.load_model(path, dtype=dtype)
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    ids, tt, pix = make_inputs(ours)
    with torch.no_grad():
        a = ours(ids, pix, token_type_ids=tt).logits
        b = ref(input_ids=ids, pixel_values=pix, token_type_ids=tt, attention_mask=torch.ones_like(ids)).logits
    assert a.dtype == b.dtype == dtype
    assert torch.equal(a, b)


def test_several_images_per_prompt_fill_their_runs_in_order(pg1_dir):
    """Two images in one prompt: features fill the two <image> runs in order, as transformers does."""
    from PIL import Image

    model, processor = paligemma.load(pg1_dir)
    g = torch.Generator().manual_seed(5)
    imgs = [Image.fromarray((torch.rand(30, 30, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
    batch = processor(text=["<image><image>compare"], images=[imgs])
    n = model.config.num_image_tokens
    assert batch["pixel_values"].shape[0] == 2 and int((batch["input_ids"] == model.config.image_token_index).sum()) == 2 * n
    ref = hf_model(pg1_dir)
    with torch.no_grad():
        a = model(**batch).logits
        b = ref(**batch).logits
        swapped = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits
    assert rel_diff(a, b) <= 1e-4
    assert not torch.allclose(a, swapped)
