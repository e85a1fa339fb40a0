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

from .allocator import released_per_layer
from .checks import finite_number, whole_number
from .errors import InputError, PaliGemmaError
from .masks import decode_masks, default_position_ids

if TYPE_CHECKING:  # the model is only called here; importing it would make a cycle
    from .modeling_paligemma import PaliGemmaForConditionalGeneration


MAX_NEW_TOKENS = 1 << 20  # far above any context; the model's own context is checked per call


class NonFiniteLogitsError(PaliGemmaError):
    """The model produced NaN or infinite logits: its weights or inputs are broken; no answer is given."""


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
        """Types and ranges checked once, here, for every caller (API, CLI, server); a seed of any size is
        reduced modulo 2**64 into the generator's range. An eos id outside the vocabulary (e.g. -1) is
        allowed here on purpose: it never matches, so generation runs to max_new_tokens."""
        whole_number("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS, InputError)
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample={self.do_sample!r} ({type(self.do_sample).__name__}); expected True or False")
        finite_number("temperature", self.temperature, 0.0, error=InputError)
        whole_number("top_k", self.top_k, 0, 1 << 31, InputError)
        finite_number("top_p", self.top_p, 0.0, 1.0, lo_open=True, error=InputError)
        if self.seed is not None:
            object.__setattr__(self, "seed", whole_number("seed", self.seed, -(1 << 4096), 1 << 4096, InputError)
                               % 2**64)
        if self.eos_token_ids is not None:
            ids = self.eos_token_ids if isinstance(self.eos_token_ids, (list, tuple)) else [self.eos_token_ids]
            if not ids:
                raise InputError("eos_token_ids=(); expected at least one id (or None for the model's)")
            object.__setattr__(self, "eos_token_ids",
                               tuple(whole_number("eos_token_ids", i, -(1 << 31), 1 << 31, InputError) for i in ids))

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
    """Run the prompt int[B, T] through the model, filling cache slots [0, T). Returns last logits [B, V].
    A long prompt on a CPU hands the heap's free pages back every few layers (allocator.py)."""
    layers = [*model.vision_tower.encoder.layers, *model.language_model.layers] if model.device.type == "cpu" else []
    with released_per_layer(layers, rows=input_ids.numel()):
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
    try:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    except RuntimeError:  # NaN / inf in the logits make the probabilities invalid
        raise NonFiniteLogitsError("the model produced non-finite logits (NaN or inf) while sampling; its weights "
                                   "or inputs are broken, so no answer is given") from None


def _check_finite(logits: torch.Tensor, tok: torch.Tensor, step: int) -> None:
    """Stop on NaN / inf logits. Only the chosen token's logit of each row is read (B values, not B x V):
    argmax returns a NaN's index when there is one, and a row of -inf or NaN makes softmax NaN, which
    multinomial refuses; an inf logit is chosen by argmax and sampling alike."""
    picked = logits.gather(-1, tok[:, None])  # [B, 1]
    if not bool(torch.isfinite(picked).all()):
        raise NonFiniteLogitsError(
            f"the model produced non-finite logits (NaN or inf) at generation step {step}; its weights or "
            "inputs are broken (non-finite pixel_values? a corrupt checkpoint?), so no answer is given")
    if step == 0:  # once per call: an overflow inside a norm (x**2 -> inf) gives all-equal, finite logits
        lo, hi = torch.aminmax(logits, dim=-1)  # [B], [B]
        if bool((lo == hi).any()):
            raise NonFiniteLogitsError(
                "every logit of a row is equal: the model overflowed inside (weights far out of range, e.g. "
                "embeddings scaled by 1e30?), so no answer is given; check the checkpoint")


def _check_inputs(model, input_ids, pixel_values, attention_mask) -> None:
    """The model boundary: token ids inside the vocabulary (the <image> id too), pixels shaped and finite."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise InputError(f"input_ids must be an integer tensor [B, T], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {list(getattr(input_ids, 'shape', []))}")
    if input_ids.numel() == 0:
        raise InputError(f"input_ids is empty ({list(input_ids.shape)}); pass at least one token per row")
    vocab, image = model.config.vocab_size, model.config.image_token_index
    bad = (input_ids < 0) | ((input_ids >= vocab) & (input_ids != image))
    if bool(bad.any()):
        raise InputError(f"input_ids hold {int(bad.sum())} id(s) outside the vocabulary [0, {vocab}) (e.g. "
                         f"{int(input_ids[bad][0])}); build inputs with this checkpoint's processor")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask is {list(attention_mask.shape)} for input_ids {list(input_ids.shape)}")
    if pixel_values is None:
        return
    size = model.config.vision.image_size
    if (not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4
            or tuple(pixel_values.shape[1:]) != (3, size, size) or not pixel_values.is_floating_point()):
        raise InputError(f"pixel_values must be a float tensor [n_images, 3, {size}, {size}], got "
                         f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)} "
                         f"{list(getattr(pixel_values, 'shape', []))}; use this checkpoint's processor")
    if not bool(torch.isfinite(pixel_values).all()):
        raise InputError("pixel_values hold NaN or infinite values; pass finite pixels")


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
    _check_inputs(model, input_ids, pixel_values, attention_mask)
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
        tok = sample(logits, cfg, gen)  # [B]
        _check_finite(logits, tok, step)
        tok = tok.masked_fill(done, pad)
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
