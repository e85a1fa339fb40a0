"""Shared fixtures: tiny random checkpoints in the official hub layout, and the transformers reference."""

import pytest
import torch

from paligemma.testing import tiny_config, write_random_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def pg1_dir(tmp_path_factory):
    """PaliGemma 1 layout: Gemma decoder, multi-query attention, head_dim != hidden/heads."""
    return write_random_checkpoint(tmp_path_factory.mktemp("pg1"), tiny_config("pg1"), seed=1)


@pytest.fixture(scope="session")
def pg2_dir(tmp_path_factory):
    """PaliGemma 2 layout: Gemma 2, GQA, softcaps, query_pre_attn_scalar != head_dim, sliding window 6
    (shorter than the prompt), stale top-level hidden_size, sharded with an index."""
    return write_random_checkpoint(tmp_path_factory.mktemp("pg2"), tiny_config("pg2"), seed=2,
                                   max_shard_bytes=200_000)


def hf_model(path):
    import transformers

    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def make_inputs(model, prompt_len=6, suffix_len=3, seed=0):
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
