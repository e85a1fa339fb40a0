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
