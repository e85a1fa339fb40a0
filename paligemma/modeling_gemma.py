"""Gemma / Gemma 2 decoder: RMSNorm, RoPE, attention with a preallocated KV cache, GeGLU, the layer stack.

Mirrors transformers 5.x `modeling_gemma.py` and `modeling_gemma2.py` (the numbers we test against).
Computation (docs/DESIGN.md): text embeddings x sqrt(H) cast to the weight dtype; RMSNorm in fp32 with
(1 + w); split-half RoPE with cos/sin cast to the activation dtype; the attention mask comes from
`masks.py` (full over the prefix, causal after it); Gemma 2 adds sandwich norms, the attention softcap,
`query_pre_attn_scalar` and a sliding window on even layers. The decoder has no head: the top model
(`modeling_paligemma.py`) owns the logits.

Shapes: B batch, T new tokens, K keys attended, H hidden, nh/nkv heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


# ---------------------------------------------------------------------------------------------- cache
class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer.

    Protocol: `update(start, k, v)` writes k, v float[B, nkv, T, hd] at positions [start, start + T) and
    returns views of everything written so far, [B, nkv, start + T, hd]. Positions are cache slots, shared
    by all rows (a ragged batch is left-padded, so slot = pad offset + token index).
    """

    def __init__(self, batch: int, nkv: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, nkv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# ---------------------------------------------------------------------------------------------- layers
class GemmaRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), all in fp32, then cast back (weights are stored zero-centred)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, T, hd] for 1-based positions int[B, T], computed in fp32 and cast to `dtype` (as HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim))
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-half rotation (not interleaved pairs). x [B, h, T, hd]; cos, sin [B, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class GemmaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping
        self.sliding = cfg.is_sliding(layer_idx)
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, nkv, K, hd]
        y = self._attend(q, k, v, mask)  # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))  # [B, T, H]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        """q [B, nh, T, hd], k, v [B, nkv, K, hd], mask bool [B, T, K] -> [B, nh, T, hd]."""
        if self.softcap is not None:
            return self._softcapped(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale,
                                              enable_gqa=self.nkv != self.nh)

    def _softcapped(self, q, k, v, mask) -> torch.Tensor:
        """Gemma 2: scores * scale -> tanh softcap -> mask -> fp32 softmax (SDPA cannot softcap)."""
        g = self.nh // self.nkv
        if g > 1:
            k = k.repeat_interleave(g, dim=1)  # [B, nh, K, hd]
            v = v.repeat_interleave(g, dim=1)
        s = torch.matmul(q, k.transpose(2, 3)) * self.scale  # [B, nh, T, K]
        s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~mask[:, None], torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)  # [B, nh, T, hd]


class GemmaMLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """Gemma 1 (PaliGemma 1): `post_attention_layernorm` is the norm *before the MLP* (docs/DESIGN.md, norms)."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Gemma2DecoderLayer(nn.Module):
    """Gemma 2 (PaliGemma 2): sandwich norms; `post_attention_layernorm` normalises the attention output."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(H, eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(H, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(H, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(H, eps)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaEmbedding(nn.Embedding):
    """Token embedding that is also the tied LM head: `attend(h)` = h @ weight.T (PaliGemma ties them)."""

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)  # [..., V]


class GemmaModel(nn.Module):
    """Token embeddings, decoder layers and the final norm (no head)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = GemmaEmbedding(cfg.vocab_size, cfg.hidden_size)
        layer_cls = Gemma2DecoderLayer if cfg.is_gemma2 else GemmaDecoderLayer
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [B, T, H]
        scale = torch.tensor(self.config.embed_scale).to(x.dtype)  # sqrt(H) rounded to the weight dtype, as HF
        return x * scale  # [B, T, H]

    def forward(self, x, position_ids, masks: dict[bool, torch.Tensor], caches=None, start: int = 0) -> torch.Tensor:
        """x [B, T, H] embeddings; masks {sliding?: bool[B, T, K]} -> hidden states [B, T, H] after the final norm."""
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            mask = masks[layer.self_attn.sliding]
            cache = caches[i] if caches is not None else None
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, start)
        return self.norm(x)
