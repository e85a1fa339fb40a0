"""Text generation with a preallocated KV cache: `prefill`, `decode_one_token`, `sample`, `generate`.

Follows gpt-fast's shape: the prompt (image + prefix) runs once through the decoder filling the cache
and computing logits only at the last position; each decode step feeds one token per row. A ragged
batch is left-padded, so every row writes the same cache slot at each step; pads are masked as keys and
positions are padding-aware, so a row gets the same tokens in a batch as alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .masks import decode_masks, default_position_ids

if TYPE_CHECKING:  # the model is only called here; importing it would make a cycle
    from .modeling_paligemma import PaliGemmaForConditionalGeneration


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick tokens; shared by `generate`, `stream_tokens`, the CLI and the server.

    Greedy unless `do_sample`; then `temperature` (0 = greedy), `top_k` (0 = off), `top_p` (1 = off),
    with `seed` for a reproducible draw. `eos_token_ids` default to the model's."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def of(cls, sampling: SamplingConfig | None = None, **fields_: object) -> SamplingConfig:
        """`sampling` with `fields_` replaced (a fresh default config when None); unknown names are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(fields_) - names)
        if unknown:
            raise InputError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return replace(sampling, **fields_) if sampling is not None else cls(**fields_)


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
    masks = decode_masks(valid, slot, model.config.text.sliding_window)
    h = model.language_model(x, pos[:, None], masks, caches, start=slot)  # [B, 1, H]
    return model.logits(h[:, -1])  # [B, V]


def sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids int[B]. Greedy unless sampling; then temperature, top-k, top-p (nucleus)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)  # [B, V]
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_context(model, input_ids, max_new_tokens: int) -> None:
    limit = model.config.text.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"the prompt is {input_ids.shape[1]} tokens (image tokens included) and max_new_tokens is "
            f"{max_new_tokens}: together more than the model's context of {limit} tokens; shorten the prompt "
            "or ask for fewer new tokens"
        )


@torch.no_grad()
def stream_tokens(model: PaliGemmaForConditionalGeneration, input_ids, pixel_values=None, attention_mask=None,
                  token_type_ids=None, *, sampling: SamplingConfig | None = None,
                  **sampling_fields) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, int[B], step by step; finished rows yield the pad id.
    Sampling options come as `sampling=SamplingConfig(...)` and/or its fields as keywords."""
    cfg = SamplingConfig.of(sampling, **sampling_fields)
    _check_context(model, input_ids, cfg.max_new_tokens)
    device = model.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    eos = torch.tensor(cfg.eos_token_ids or model.config.eos_token_ids, device=device)
    pad = model.config.pad_token_id
    gen = None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)

    n = cfg.max_new_tokens
    caches = model.make_caches(B, T + n)
    valid = torch.ones(B, T + n, dtype=torch.bool, device=device)  # [B, slots]
    valid[:, :T] = attention_mask.bool()
    pos = attention_mask.long().sum(-1) + 1  # [B]: position of the first generated token
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits = prefill(model, input_ids, pixel_values, attention_mask, token_type_ids, caches)
    for step in range(n):
        tok = sample(logits, cfg, gen).masked_fill(done, pad)  # [B]
        yield tok
        done |= torch.isin(tok, eos)
        if bool(done.all()) or step == n - 1:
            return
        logits = decode_one_token(model, tok, pos, valid, T + step, caches)
        pos = pos + 1


@torch.no_grad()
def generate(model: PaliGemmaForConditionalGeneration, input_ids, pixel_values=None, attention_mask=None,
             token_type_ids=None, *, sampling: SamplingConfig | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None, **sampling_fields) -> torch.Tensor:
    """Generate up to `max_new_tokens` per row; returns the new tokens only, int[B, n], each row's eos
    included and pad ids after it. `streamer(tokens int[B])` is called at every step."""
    out = []
    for tok in stream_tokens(model, input_ids, pixel_values, attention_mask, token_type_ids, sampling=sampling,
                             **sampling_fields):
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
