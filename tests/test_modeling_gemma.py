"""modeling_gemma.py pieces: the KV cache's protocol, zero-centred RMSNorm, split-half RoPE, the tied head."""

import torch
import torch.nn.functional as F

from paligemma.modeling_gemma import GemmaEmbedding, GemmaRMSNorm, KVCache, apply_rope, rope_cos_sin


def test_kv_cache_writes_at_start_and_returns_everything_so_far():
    cache = KVCache(batch=2, nkv=1, max_len=6, head_dim=3, dtype=torch.float32, device="cpu")
    k1, v1 = torch.ones(2, 1, 4, 3), 2 * torch.ones(2, 1, 4, 3)
    k, v = cache.update(0, k1, v1)
    assert k.shape == (2, 1, 4, 3) and torch.equal(v, v1)
    k, v = cache.update(4, 3 * torch.ones(2, 1, 1, 3), 4 * torch.ones(2, 1, 1, 3))
    assert k.shape == (2, 1, 5, 3) and k[:, :, 4].eq(3).all() and k[:, :, :4].eq(1).all()
    assert cache.k.data_ptr() == k.data_ptr()  # a view of the preallocated buffer, not a copy


def test_rms_norm_scales_by_one_plus_w_in_fp32():
    norm = GemmaRMSNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = x.pow(2).mean().add(1e-6).rsqrt()
    assert torch.allclose(norm(x), x * rms * torch.tensor([1.0, 2.0, 0.0, 1.5]))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rope_is_split_half_and_position_one_rotates():
    cos, sin = rope_cos_sin(torch.tensor([[0, 1]]), head_dim=4, theta=10000.0, dtype=torch.float32)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 2, 4)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[0, 0, 0], x[0, 0, 0])  # position 0: identity
    # split halves: (x1, x2) = ([1, 2], [3, 4]) rotate pairwise (1, 3) and (2, 4) by angles (1, 1/100)
    c, s = torch.cos(torch.tensor([1.0, 0.01])), torch.sin(torch.tensor([1.0, 0.01]))
    expected = torch.cat([torch.tensor([1.0, 2.0]) * c - torch.tensor([3.0, 4.0]) * s,
                          torch.tensor([3.0, 4.0]) * c + torch.tensor([1.0, 2.0]) * s])
    assert torch.allclose(y[0, 0, 1], expected, atol=1e-6)


def test_tied_head_is_the_embedding_matrix():
    emb = GemmaEmbedding(10, 4)
    h = torch.randn(3, 4)
    assert torch.equal(emb.attend(h), F.linear(h, emb.weight))
