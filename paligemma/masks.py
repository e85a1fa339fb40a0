"""Attention masks and positions: the one place prefill, decode and training get them from.

PaliGemma's attention (big_vision's `make_attn_mask`, docs/DESIGN.md): every token of the prefix (image
tokens, `<bos>`, prompt, "\\n") sees the whole prefix; suffix and generated tokens see the prefix and
earlier suffix tokens; padding is never attended. Gemma 2's even layers add a sliding window, which
the bidirectional prefix overrides (transformers 5.x). Positions are 1-based and skip padding.

Masks are bool, True where query i may attend key j: [B, Q, K]. The decoder takes a dict
{sliding?: mask} so windowed and global layers each get theirs.
"""

from __future__ import annotations

import torch


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
    bidirectional prefix, which transformers 5.x lets see the whole prefix (docs/DESIGN.md, sliding window). `mask_ar` covers the keys."""
    Q, K = attn.shape[-2:]
    qi = torch.arange(q_offset, q_offset + Q, device=attn.device)[:, None]
    ki = torch.arange(K, device=attn.device)[None, :]
    near = (qi - ki) < window  # [Q, K]
    prefix = mask_ar == 0  # [B, K]
    both_prefix = prefix[:, q_offset:q_offset + Q, None] & prefix[:, None, :]  # [B, Q, K]
    return attn & (near | both_prefix)


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-based, padding-aware positions int[B, T], as transformers' generate() computes them (docs/DESIGN.md, positions)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0) + 1


def prefill_masks(attention_mask: torch.Tensor, token_type_ids: torch.Tensor, window: int | None,
                  q_offset: int = 0) -> dict[bool, torch.Tensor]:
    """Full and sliding-window masks bool[B, T, K] for a forward over all of the inputs int[B, T]."""
    full = make_attn_mask(attention_mask.bool(), token_type_ids)
    full = full | ~full.any(-1, keepdim=True)  # padding queries: attend anywhere, never NaN (outputs unused)
    sliding = full if window is None else sliding_window_mask(full, token_type_ids, window, q_offset)
    return {False: full, True: sliding}


def decode_masks(valid: torch.Tensor, slot: int, window: int | None) -> dict[bool, torch.Tensor]:
    """Masks bool[B, 1, slot + 1] for one new token per row at cache slot `slot`; valid bool[B, >slot] marks
    the non-pad slots. Generated tokens are past the prefix, so the window applies to every key."""
    keys = valid[:, None, : slot + 1]  # [B, 1, K]: the new token sees every earlier non-pad token
    if window is None:
        return {False: keys, True: keys}
    near = torch.arange(slot + 1, device=valid.device) > slot - window  # [K]: the window includes self
    return {False: keys, True: keys & near}
