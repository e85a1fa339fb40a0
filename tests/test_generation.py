"""generation.py: greedy tokens equal transformers', cached decoding equals full recomputation, ragged
batches, per-row EOS, seeded sampling, and `SamplingConfig`'s contract."""

import dataclasses

import pytest
import torch

import paligemma
from paligemma.errors import InputError
from paligemma.generation import SamplingConfig, decode_one_token, prefill, sample

from .conftest import hf_model, make_inputs, rel_diff

VARIANTS = ["pg1_dir", "pg2_dir"]


@pytest.mark.parametrize("ckpt", VARIANTS)
def test_greedy_tokens_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, ref = paligemma.load_model(path), hf_model(path)
    ids, _, pix = make_inputs(ours, suffix_len=0)
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
    ids, _, pix = make_inputs(model, prompt_len=5, suffix_len=0)
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
    ids, _, pix = make_inputs(model, suffix_len=0)
    free = model.generate(ids, pix, max_new_tokens=12, eos_token_ids=(-1,))[0].tolist()
    stop = free[4]  # pretend the 5th generated token is the end of sequence
    out = model.generate(ids, pix, max_new_tokens=12, eos_token_ids=(stop,))[0].tolist()
    assert out == free[:free.index(stop) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(pg2_dir):
    model = paligemma.load_model(pg2_dir)
    ids, _, pix = make_inputs(model, suffix_len=0)
    kw = dict(max_new_tokens=12, eos_token_ids=(-1,), do_sample=True, temperature=1.5)
    a, b = model.generate(ids, pix, seed=7, **kw), model.generate(ids, pix, seed=7, **kw)
    assert a.tolist() == b.tolist()
    assert a.tolist() != model.generate(ids, pix, seed=8, **kw).tolist()
    greedy = model.generate(ids, pix, max_new_tokens=12, eos_token_ids=(-1,))
    assert model.generate(ids, pix, seed=1, top_k=1, **kw).tolist() == greedy.tolist()
    assert model.generate(ids, pix, seed=1, top_p=1e-6, **kw).tolist() == greedy.tolist()


def test_sampling_config_is_keyword_only_frozen_and_checked():
    with pytest.raises(TypeError):
        SamplingConfig(8)  # keyword-only: no positional mix-ups between top_k and top_p
    cfg = SamplingConfig(max_new_tokens=8, do_sample=True, top_k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 4
    assert SamplingConfig.of(cfg, top_p=0.5) == SamplingConfig(max_new_tokens=8, do_sample=True, top_k=3, top_p=0.5)
    for bad, field in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                       (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(InputError, match=field):
            SamplingConfig(**bad)
    with pytest.raises(InputError, match="unknown generation option.*top_q"):
        SamplingConfig.of(None, top_q=0.9)


def test_generate_takes_a_config_or_its_fields_alike(pg1_dir):
    model = paligemma.load_model(pg1_dir)
    ids, _, pix = make_inputs(model, suffix_len=0)
    cfg = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, seed=3, eos_token_ids=(-1,))
    a = model.generate(ids, pix, sampling=cfg)
    b = model.generate(ids, pix, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, seed=3,
                       eos_token_ids=(-1,))
    c = model.generate(ids, pix, sampling=cfg, max_new_tokens=4)  # a field given as a keyword wins
    assert a.tolist() == b.tolist() and c.tolist() == a[:, :4].tolist()


def test_greedy_sample_is_argmax_and_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, SamplingConfig()).tolist() == [1, 0]
    assert sample(logits, SamplingConfig(do_sample=True, temperature=0)).tolist() == [1, 0]
