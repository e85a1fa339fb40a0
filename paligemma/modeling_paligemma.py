"""PaliGemma: the SigLIP vision tower, the linear projector and the Gemma decoder, with the LM head.

Mirrors transformers 5.x `modeling_paligemma.py` (the numbers we test against) and big_vision's
`paligemma.py`. The data path: pixels -> `modeling_siglip` -> projector -> written over the `<image>`
tokens of the text embeddings -> `modeling_gemma` with the prefix-LM masks of `masks.py` -> logits
(Gemma 2: final softcap). Fast CPU weight formats are swapped in from outside (`cpu/formats.py`);
nothing here knows about them.

Shapes: B batch, T tokens, H hidden, V vocab, Bi images, N image tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import PaliGemmaConfig
from .errors import InputError
from .generation import generate
from .masks import default_position_ids, prefill_masks
from .modeling_gemma import GemmaModel, GemmaRMSNorm, KVCache
from .modeling_siglip import SiglipVisionModel


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
        """hidden [..., H] -> logits [..., V], with Gemma 2's final softcap. A tied head multiplies by the
        token embedding (`attend`), whichever format the embedding module stores it in."""
        if self.lm_head is not None:
            logits = self.lm_head(h)  # [..., V]
        else:
            logits = self.language_model.embed_tokens.attend(h)  # [..., V]
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
        """Full and sliding-window masks bool[B, T, K] for a forward over all of the inputs (`masks.py`)."""
        return prefill_masks(attention_mask, token_type_ids, self.config.text.sliding_window, q_offset)

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
        kwargs.pop("labels", None)
        return generate(self, input_ids, pixel_values, attention_mask, token_type_ids, **kwargs)
