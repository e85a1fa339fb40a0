"""Text generation with a preallocated KV cache: `prefill`, `decode_one_token`, `sample`, `generate`.

Follows gpt-fast's shape: the prompt (image + prefix) runs once through the decoder filling the cache
and computing logits only at the last position; each decode step feeds one token per row. A ragged
batch is left-padded, so every row writes the same cache slot at each step; pads are masked as keys and
positions are padding-aware, so a row gets the same tokens in a batch as alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .errors import InputError
from .modeling_gemma import PaliGemmaForConditionalGeneration, default_position_ids


@torch.no_grad()
def prefill(model: PaliGemmaForConditionalGeneration, input_ids, pixel_values, attention_mask, token_type_ids, caches):
    """Run the prompt int[B, T] through the model, filling cache slots [0, T). Returns last logits [B, V]."""
    x = model.embed(input_ids, pixel_values)  # [B, T, H]
    pos = default_position_ids(attention_mask)  # [B, T]
    h = model.language_model(x, pos, model.masks(attention_mask, token_type_ids), caches, start=0)  # [B, T, H]
    return model.logits(h[:, -1])  # [B, V]


@torch.no_grad()
def decode_one_token(model: PaliGemmaForConditionalGeneration, tok, pos, valid, slot: int, caches):
    """One step: tok int[B] at cache slot `slot`, positions int[B]; valid bool[B, >slot] marks non-pad slots."""
    x = model.language_model.embed(tok[:, None])  # [B, 1, H]
    keys = valid[:, None, : slot + 1]  # [B, 1, K]: the new token sees every earlier non-pad token
    masks = {False: keys, True: keys}
    window = model.config.text.sliding_window
    if window is not None:
        near = torch.arange(slot + 1, device=tok.device) > slot - window  # window includes self
        masks[True] = keys & near
    h = model.language_model(x, pos[:, None], masks, caches, start=slot)  # [B, 1, H]
    return model.logits(h[:, -1])  # [B, V]


def sample(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids int[B]. Greedy unless `do_sample`; then temperature, top-k, top-p (nucleus)."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)  # [B, V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check(model, input_ids, max_new_tokens, temperature, top_p, top_k) -> None:
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0, got {top_k}")
    limit = model.config.text.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"the prompt is {input_ids.shape[1]} tokens (image tokens included) and max_new_tokens is "
            f"{max_new_tokens}: together more than the model's context of {limit} tokens; shorten the prompt "
            "or ask for fewer new tokens"
        )


@torch.no_grad()
def stream_tokens(model: PaliGemmaForConditionalGeneration, input_ids, pixel_values=None, attention_mask=None,
                  token_type_ids=None, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  eos_token_ids: tuple[int, ...] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, int[B], step by step; finished rows yield the pad id."""
    _check(model, input_ids, max_new_tokens, temperature, top_p, top_k)
    device = model.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    eos = torch.tensor(eos_token_ids or model.config.eos_token_ids, device=device)
    pad = model.config.pad_token_id
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)

    caches = model.make_caches(B, T + max_new_tokens)
    valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)  # [B, slots]
    valid[:, :T] = attention_mask.bool()
    pos = attention_mask.long().sum(-1) + 1  # [B]: position of the first generated token
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits = prefill(model, input_ids, pixel_values, attention_mask, token_type_ids, caches)
    for step in range(max_new_tokens):
        tok = sample(logits, do_sample, temperature, top_k, top_p, gen)  # [B]
        tok = tok.masked_fill(done, pad)
        yield tok
        done |= torch.isin(tok, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = decode_one_token(model, tok, pos, valid, T + step, caches)
        pos = pos + 1


@torch.no_grad()
def generate(model: PaliGemmaForConditionalGeneration, input_ids, pixel_values=None, attention_mask=None,
             token_type_ids=None, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             eos_token_ids: tuple[int, ...] | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` per row; returns the new tokens only, int[B, n], each row's eos
    included and pad ids after it. `streamer(tokens int[B])` is called at every step."""
    out = []
    for tok in stream_tokens(model, input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens,
                             do_sample, temperature, top_p, top_k, seed, eos_token_ids):
        out.append(tok)
        if streamer is not None:
            streamer(tok)
    return torch.stack(out, dim=1)  # [B, n]


class TextStreamer:
    """Streamer for one row: decodes everything generated so far and passes on the new text only, so
    multi-token characters and words appear whole. `on_text(str)` defaults to printing without newline."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None] | None = None):
        self.decode = decode
        self.on_text = on_text or (lambda s: print(s, end="", flush=True))
        self.ids: list[int] = []
        self.emitted = ""

    def __call__(self, tok: torch.Tensor) -> None:
        self.ids.append(int(tok.reshape(-1)[0]))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        if text.startswith(self.emitted):
            new, self.emitted = text[len(self.emitted):], text
            if new:
                self.on_text(new)
