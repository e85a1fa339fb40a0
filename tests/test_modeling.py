"""Parity of the model with transformers 5.x on the same files, and the attention mask's contract."""

import pytest
import torch

import paligemma
from paligemma.generation import decode_one_token, prefill
from paligemma.masks import make_attn_mask, sliding_window_mask

from .conftest import hf_model, rel_diff

VARIANTS = ["pg1_dir", "pg2_dir"]


def _inputs(model, prompt_len=6, suffix_len=3, seed=0):
    """<image>xN <bos> prompt "\\n" [suffix], token types 0 then 1, and random pixels."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    text = torch.randint(5, 1000, (1, prompt_len), generator=g)
    suffix = torch.randint(5, 1000, (1, suffix_len), generator=g)
    img = torch.full((1, c.num_image_tokens), c.image_token_index)
    ids = torch.cat([img, torch.tensor([[2]]), text, torch.tensor([[108]]), suffix], 1)
    tt = torch.zeros_like(ids)
    tt[:, ids.shape[1] - suffix_len:] = 1
    pix = torch.randn(1, 3, c.vision.image_size, c.vision.image_size, generator=g)
    return ids, tt, pix


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_logits_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, ref = paligemma.load_model(path), hf_model(path)
    ids, tt, pix = _inputs(ours)
    with torch.no_grad():
        a = ours(ids, pix, token_type_ids=tt).logits
        b = ref(input_ids=ids, pixel_values=pix, token_type_ids=tt, attention_mask=torch.ones_like(ids)).logits
    assert a.shape == b.shape == (1, ids.shape[1], ours.config.vocab_size)
    assert rel_diff(a, b) <= 1e-4


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_padded_batch_logits_and_loss_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, ref = paligemma.load_model(path), hf_model(path)
    rows = [_inputs(ours, prompt_len=n, suffix_len=s, seed=n) for n, s in ((3, 2), (7, 4))]
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


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_greedy_tokens_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, ref = paligemma.load_model(path), hf_model(path)
    ids, _, pix = _inputs(ours, suffix_len=0)
    ours_ids = ours.generate(ids, pix, max_new_tokens=20, eos_token_ids=(-1,))
    ref_ids = ref.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                           token_type_ids=torch.zeros_like(ids), max_new_tokens=20, min_new_tokens=20,
                           do_sample=False)[:, ids.shape[1]:]
    assert ours_ids.shape == (1, 20)
    assert ours_ids.tolist() == ref_ids.tolist()
    assert len(set(ours_ids[0].tolist())) > 1  # the sequence is not one repeated token


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_cached_decoding_equals_full_recomputation(ckpt, request):
    model = paligemma.load_model(request.getfixturevalue(ckpt))
    ids, _, pix = _inputs(model, prompt_len=5, suffix_len=0)
    T, steps = ids.shape[1], 10
    caches = model.make_caches(1, T + steps)
    valid = torch.ones(1, T + steps, dtype=torch.bool)
    step_logits = [prefill(model, ids, pix, torch.ones_like(ids), torch.zeros_like(ids), caches)]
    toks = []
    for s in range(steps):
        toks.append(step_logits[-1].argmax(-1))
        if s < steps - 1:
            step_logits.append(decode_one_token(model, toks[-1], torch.tensor([T + 1 + s]), valid, T + s, caches))
    full_ids = torch.cat([ids, torch.stack(toks, 1)], 1)
    tt = torch.cat([torch.zeros_like(ids), torch.ones(1, steps, dtype=torch.long)], 1)  # generated = causal
    with torch.no_grad():
        full = model(full_ids, pix, token_type_ids=tt).logits[0, T - 1:T - 1 + steps]  # [steps, V]
    cached = torch.cat(step_logits)  # [steps, V]
    assert rel_diff(cached, full) <= 1e-5
    assert cached.argmax(-1).tolist() == full.argmax(-1).tolist()


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_ragged_batch_gives_each_row_its_own_tokens(ckpt, request):
    model, processor = paligemma.load(request.getfixturevalue(ckpt))
    g = torch.Generator().manual_seed(3)
    from PIL import Image

    images = [Image.fromarray((torch.rand(30 + 7 * i, 40, 3, generator=g) * 255).byte().numpy()) for i in range(3)]
    prompts = ["caption en", "answer en what is the colour of the big car on the left?", "detect cat ; dog"]
    batch = processor(text=prompts, images=images)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    together = model.generate(**batch, max_new_tokens=16, eos_token_ids=(-1,))
    for i in range(3):
        alone = model.generate(**processor(text=[prompts[i]], images=[images[i]]), max_new_tokens=16,
                               eos_token_ids=(-1,))
        assert together[i].tolist() == alone[0].tolist()


def test_generation_stops_per_row_at_eos(pg1_dir):
    model = paligemma.load_model(pg1_dir)
    ids, _, pix = _inputs(model, suffix_len=0)
    free = model.generate(ids, pix, max_new_tokens=12, eos_token_ids=(-1,))[0].tolist()
    stop = free[4]  # pretend the 5th generated token is the end of sequence
    out = model.generate(ids, pix, max_new_tokens=12, eos_token_ids=(stop,))[0].tolist()
    assert out == free[:free.index(stop) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(pg2_dir):
    model = paligemma.load_model(pg2_dir)
    ids, _, pix = _inputs(model, suffix_len=0)
    kw = dict(max_new_tokens=12, eos_token_ids=(-1,), do_sample=True, temperature=1.5)
    a, b = model.generate(ids, pix, seed=7, **kw), model.generate(ids, pix, seed=7, **kw)
    assert a.tolist() == b.tolist()
    assert a.tolist() != model.generate(ids, pix, seed=8, **kw).tolist()
    greedy = model.generate(ids, pix, max_new_tokens=12, eos_token_ids=(-1,))
    assert model.generate(ids, pix, seed=1, top_k=1, **kw).tolist() == greedy.tolist()
    assert model.generate(ids, pix, seed=1, top_p=1e-6, **kw).tolist() == greedy.tolist()


def test_token_type_ids_omitted_means_all_prefix(pg1_dir):
    model = paligemma.load_model(pg1_dir)
    ids, tt, pix = _inputs(model)
    with torch.no_grad():
        none = model(ids, pix).logits
        zeros = model(ids, pix, token_type_ids=torch.zeros_like(ids)).logits
        causal_suffix = model(ids, pix, token_type_ids=tt).logits
    assert torch.equal(none, zeros)
    assert not torch.allclose(none[:, -4:], causal_suffix[:, -4:])  # the suffix mask matters


def test_sliding_window_changes_the_result(pg2_dir):
    """The tiny PG2 window (6) is shorter than the prompt, so parity above covers the sliding path."""
    model = paligemma.load_model(pg2_dir)
    ids, tt, pix = _inputs(model, prompt_len=6, suffix_len=8)
    with torch.no_grad():
        windowed = model(ids, pix, token_type_ids=tt).logits
        model.config.text.sliding_window = 10_000
        unwindowed = model(ids, pix, token_type_ids=tt).logits
    assert not torch.allclose(windowed[:, -8:], unwindowed[:, -8:])
    assert torch.allclose(windowed[:, :-8], unwindowed[:, :-8], atol=1e-6)  # prefix overrides the window


# --------------------------------------------------------------------------------- masks (big_vision)
def _mask(ar):
    ar = torch.tensor([ar])
    return make_attn_mask(torch.ones_like(ar, dtype=torch.bool), ar)[0].int().tolist()


def test_mask_pure_causal():
    assert _mask([1, 1, 1, 1]) == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_mask_prefix_lm():
    # the first 3 tokens attend among themselves, the last 3 causally; a leading 1 changes nothing
    expected = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert _mask([0, 0, 0, 1, 1, 1]) == expected
    assert _mask([1, 0, 0, 1, 1, 1]) == expected


def test_mask_causal_blocks():
    m = _mask([1, 0, 1, 0, 1, 0, 0, 1, 0, 0])
    blocks = [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]  # a token sees its own block and all earlier blocks
    assert m == [[int(bj <= bi) for bj in blocks] for bi in blocks]


def test_mask_padding_is_never_attended():
    ar = torch.tensor([[0, 0, 0, 0, 1, 1]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    m = make_attn_mask(valid, ar)[0]
    assert not m[:, 0].any() and not m[0].any()
    assert m[1:4, 1:4].all() and m[4, :5].sum() == 4 and not m[4, 5]


def test_sliding_window_keeps_the_prefix_whole():
    ar = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    full = make_attn_mask(torch.ones_like(ar, dtype=torch.bool), ar)
    m = sliding_window_mask(full, ar, window=2)[0].int()
    assert m[:4, :4].all()  # prefix: bidirectional despite the window
    assert m[4].tolist() == [0, 0, 0, 1, 1, 0, 0]  # suffix: itself and one back
    assert m[6].tolist() == [0, 0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ckpt", VARIANTS)
def test_bit_identical_to_transformers_default_attention(ckpt, dtype, request):
    """With the kernels transformers picks by default (SDPA for PG1 and the vision tower, eager for
    Gemma 2's softcapped attention) the logits are equal to the last bit, in fp32 and in bf16."""
    import transformers

    path = request.getfixturevalue(ckpt)
    ours = paligemma.load_model(path, dtype=dtype)
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    ids, tt, pix = _inputs(ours)
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
