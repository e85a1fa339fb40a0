"""Gemma / Gemma 2 decoder with prefix-LM attention, and the PaliGemma model around it.

Mirrors transformers 5.x `modeling_gemma.py`, `modeling_gemma2.py` and `modeling_paligemma.py` (the
numbers we test against) and big_vision's `paligemma.py` (the attention mask). Computation (spec §2):
text embeddings x sqrt(H) cast to the weight dtype; image features inserted unscaled at `<image>`;
RMSNorm in fp32 with (1 + w); split-half RoPE with cos/sin cast to the activation dtype; attention
full over the prefix (image + prompt) and causal after it; Gemma 2 adds sandwich norms, the attention
and final-logit softcaps, `query_pre_attn_scalar` and a sliding window on even layers.

Shapes: B batch, T new tokens, K keys attended, H hidden, nh/nkv heads, hd head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import PaliGemmaConfig, TextConfig
from .errors import InputError
from .modeling_siglip import SiglipVisionModel


# ---------------------------------------------------------------------------------------------- masks
def make_attn_mask(input_mask: torch.Tensor, mask_ar: torch.Tensor) -> torch.Tensor:
    """Prefix-LM attention mask, as big_vision's `make_attn_mask`.

    input_mask: bool[B, T], False for padding. mask_ar: int[B, T], 1 where a token may not be attended
    by tokens before it (PaliGemma: 0 for image + bos + prompt + "\\n", 1 for suffix and generated tokens,
    which is exactly `token_type_ids`). Returns bool[B, T, T], True where query i may attend key j.

      [[1 1 1 1 1 1]]: pure causal attention.
      [[0 0 0 1 1 1]]: prefix-LM: the first 3 tokens attend among themselves, the last 3 causally.
      [[1 0 1 0 1 0 0 1 0 0]]: causal attention between 4 blocks; a token sees its own block and earlier ones.
    """
    cumsum = torch.cumsum(mask_ar, dim=1)  # [B, T]
    attn = cumsum[:, None, :] <= cumsum[:, :, None]  # [B, Tq, Tk]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return attn & valid


def sliding_window_mask(attn: torch.Tensor, mask_ar: torch.Tensor, window: int, q_offset: int = 0) -> torch.Tensor:
    """Restrict bool[B, Q, K] to keys less than `window` positions back (self included), except inside the
    bidirectional prefix, which transformers 5.x lets see the whole prefix (spec P17). `mask_ar` covers the keys."""
    Q, K = attn.shape[-2:]
    qi = torch.arange(q_offset, q_offset + Q, device=attn.device)[:, None]
    ki = torch.arange(K, device=attn.device)[None, :]
    near = (qi - ki) < window  # [Q, K]
    prefix = mask_ar == 0  # [B, K]
    both_prefix = prefix[:, q_offset:q_offset + Q, None] & prefix[:, None, :]  # [B, Q, K]
    return attn & (near | both_prefix)


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
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, nkv, K, hd]
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale,
                                               enable_gqa=self.nkv != self.nh)  # [B, nh, T, hd]
        else:
            y = self._softcapped(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))  # [B, T, H]

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
    """GeGLU feed-forward. Its [rows, intermediate] activations are the largest tensors of an inference
    forward (a batch of 4 prompts: ~70 MB each, several alive at once); with `row_chunk` set, inference
    (no grad) runs them `row_chunk` rows at a time. Plain modules leave it None: MKL's results depend on
    the number of rows, and the plain path matches transformers bit for bit. `quantize.swap_modules` sets it."""

    row_chunk: int | None = None

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.row_chunk is None or rows <= self.row_chunk or torch.is_grad_enabled():
            return self._geglu(x)
        flat = x.reshape(rows, x.shape[-1])  # [M, H]
        out = torch.empty_like(flat)
        for r0 in range(0, rows, self.row_chunk):
            out[r0:r0 + self.row_chunk] = self._geglu(flat[r0:r0 + self.row_chunk])
        return out.view_as(x)

    def _geglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """Gemma 1 (PaliGemma 1): `post_attention_layernorm` is the norm *before the MLP* (spec P15)."""

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


class GemmaModel(nn.Module):
    """Token embeddings, decoder layers and the final norm (no head)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
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


class PaliGemmaMultiModalProjector(nn.Module):
    """A single Linear, no activation (the config's `projector_hidden_act` is unused)."""

    def __init__(self, vision_dim: int, projection_dim: int):
        super().__init__()
        self.linear = nn.Linear(vision_dim, projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@dataclass
class PaliGemmaOutput:
    logits: torch.Tensor | None = None  # [B, T', V] (T' = T, or fewer when `num_logits_to_keep` is set)
    loss: torch.Tensor | None = None  # mean cross-entropy over supervised (label != -100) tokens


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-based, padding-aware positions int[B, T], as transformers' generate() computes them (spec §2.6)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0) + 1


class PaliGemmaForConditionalGeneration(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(config.vision.hidden_size, config.projection_dim)
        self.language_model = GemmaModel(config.text)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.text.hidden_size, config.text.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ----------------------------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of activations and the KV cache); quantized weights may be stored otherwise."""
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def gradient_checkpointing(self) -> bool:
        return self.language_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.language_model.gradient_checkpointing = on
        self.vision_tower.encoder.gradient_checkpointing = on

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch: N(0, std) matrices, zero biases, identity norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, GemmaRMSNorm):
                m.weight.zero_()  # effective scale 1 + w = 1

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V], with Gemma 2's final softcap."""
        emb = self.language_model.embed_tokens
        if self.lm_head is not None:
            logits = self.lm_head(h)  # nn.Linear, or quantize.QuantLinear
        elif hasattr(emb, "attend"):  # quantize.QuantEmbedding: the tied head in its stored format
            logits = emb.attend(h)
        else:
            logits = F.linear(h, emb.weight)
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values float[Bi, 3, S, S] -> projected features [Bi, N, H] (not scaled)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings x sqrt(H) with image features written, in order, over the `<image>` tokens."""
        image_id = self.config.image_token_index
        is_image = input_ids == image_id  # [B, T]
        ids = input_ids.masked_fill(is_image, 0) if image_id >= self.config.vocab_size else input_ids
        x = self.language_model.embed(ids)  # [B, T, H]
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError(f"input_ids hold {n_tokens} <image> tokens but no pixel_values were given")
            return x
        feats = self.get_image_features(pixel_values)  # [Bi, N, H]
        if n_tokens != feats.shape[0] * feats.shape[1]:
            raise InputError(
                f"input_ids hold {n_tokens} <image> tokens but {feats.shape[0]} image(s) give "
                f"{feats.shape[0]} x {feats.shape[1]} = {feats.shape[0] * feats.shape[1]} features; "
                "build inputs with the processor of this checkpoint (it writes one <image> per feature)"
            )
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype))

    def masks(self, attention_mask, token_type_ids, q_offset: int = 0) -> dict[bool, torch.Tensor]:
        """Full and sliding-window masks bool[B, T, K] for a forward over all of the inputs."""
        full = make_attn_mask(attention_mask.bool(), token_type_ids)
        full = full | ~full.any(-1, keepdim=True)  # padding queries: attend anywhere, never NaN (outputs unused)
        masks = {False: full}
        if self.config.text.sliding_window is not None:
            masks[True] = sliding_window_mask(full, token_type_ids, self.config.text.sliding_window, q_offset)
        else:
            masks[True] = full
        return masks

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_logits_to_keep: int = 0,
        return_logits: bool = True,
    ) -> PaliGemmaOutput:
        """Full forward, no cache. int[B, T] inputs -> logits [B, T, V] (and the loss when `labels` is given).

        token_type_ids: 0 = prefix (bidirectional), 1 = suffix (causal); omitted = all prefix.
        labels: int[B, T], -100 where not supervised; the loss predicts labels[:, 1:] from positions [:, :-1].
        num_logits_to_keep: compute logits for the last n positions only (0 = all).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        x = self.embed(input_ids, pixel_values)  # [B, T, H]
        h = self.language_model(x, position_ids, self.masks(attention_mask, token_type_ids))  # [B, T, H]
        out = PaliGemmaOutput()
        if labels is not None:
            target = labels[:, 1:]  # [B, T-1]
            sel = target != -100
            logits_sel = self.logits(h[:, :-1][sel]).float()  # [n_supervised, V]: only where the loss needs them
            out.loss = F.cross_entropy(logits_sel, target[sel]) if sel.any() else h.sum() * 0.0
        if return_logits:
            out.logits = self.logits(h[:, -num_logits_to_keep:] if num_logits_to_keep else h)
        return out

    # ----------------------------------------------------------------------------------- generation
    def make_caches(self, batch: int, max_len: int) -> nn.ModuleList:
        t = self.config.text
        return nn.ModuleList(KVCache(batch, t.num_key_value_heads, max_len, t.head_dim, self.dtype, self.device)
                             for _ in range(t.num_hidden_layers))

    def generate(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None, **kwargs):
        """Generated tokens only, int[B, n]; see `paligemma.generation.generate` for the options."""
        from .generation import generate

        kwargs.pop("labels", None)
        return generate(self, input_ids, pixel_values, attention_mask, token_type_ids, **kwargs)
