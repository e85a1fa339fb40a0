"""Continuous-batching engine: one thread owns the model; requests join and leave the decode batch at step
boundaries.

A request is prefilled alone (B=1) straight into a free slot of a per-row KV cache (`SlotCache`), its
first token is sampled, and its row enters the running decode batch at the next step. Each decode step
feeds one token for every running row; rows sit at different lengths, so the cache writes row b at its own
index and the mask marks each row's valid keys (and, for Gemma 2's sliding layers, its own window). A row
leaves when it meets `<eos>`, a stop string, its token budget, the context, its deadline or a cancel
(a disconnected client), and its slot is reused. Each row has its own sampling settings and generator,
so a greedy answer is the one the request gets alone. The vision tower's output for recent images is kept
in a small LRU keyed by the pixels' hash: a second question about one image skips the tower.

Not changed for this: the model. The decoder already takes masks {sliding?: bool[B, Q, K]}, position ids,
a list of per-layer caches with `update(start, k, v)` and `start`; `SlotCache` is such a cache.
Shapes: S slots, A running rows, L cache length, K keys attended, nkv heads, hd head dim, V vocab.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InputError, PaliGemmaError
from ..generation import SamplingConfig, sample

log = logging.getLogger("paligemma.serve")


# ---------------------------------------------------------------------------------------------- errors
class ContextLengthExceeded(InputError):
    """The prompt and the requested tokens do not fit the context (HTTP 400, code context_length_exceeded)."""


class QueueFull(PaliGemmaError):
    """The waiting queue is at --max-queue: retry later (HTTP 429)."""


class EngineStopped(PaliGemmaError):
    """The server is shutting down or the engine is not running (HTTP 503)."""


class RequestTimeout(PaliGemmaError):
    """The request ran past its deadline (HTTP 504)."""


class Cancelled(PaliGemmaError):
    """The client went away or the request was cancelled."""


# ---------------------------------------------------------------------------------------------- requests
@dataclass(kw_only=True)
class SamplingParams:
    """Per-request settings. temperature 0 = greedy; max_tokens None = what the context allows, at most
    the engine's `default_max_tokens`."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run the whole budget (benchmarks, tests)


@dataclass(kw_only=True)
class GenRequest:
    """One prompt: input_ids (image tokens, <bos>, prompt, "\\n"), its image's pixel values float[1, 3, S, S]."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    params: SamplingParams = field(default_factory=SamplingParams)
    image_key: str | None = None  # the pixels' hash (`pixels_key`); computed by the engine when missing
    timeout: float | None = None  # seconds from submission


@dataclass
class Delta:
    """New text of a running request (never splits a UTF-8 character or a possible stop string); the first
    token always gives a Delta, possibly empty, so a stream's first chunk marks the time to first token."""

    text: str


@dataclass
class Finished:
    text: str  # the whole answer, stop string excluded
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length" (budget or context)
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    ttft: float  # seconds from submission to the first token
    image_cached: bool


@dataclass
class Failed:
    error: Exception


Event = Delta | Finished | Failed


class RequestHandle:
    """What `Engine.submit` returns: `cancel()` frees the row at the next step; events go to `sink`."""

    def __init__(self, request: GenRequest, sink: Callable[[Event], None], max_tokens: int):
        self.request = request
        self.sink = sink
        self.max_tokens = max_tokens
        self.submitted = time.perf_counter()
        self.deadline = None if request.timeout is None else self.submitted + request.timeout
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


# ---------------------------------------------------------------------------------------------- cache
class SlotCache:
    """Keys and values of one attention layer for S slots, float[S, nkv, L, hd]; each row has its own length.

    Protocol (the decoder's `update(start, k, v) -> (k_all, v_all)`):
    - prefill: `row(slot)` gives a B=1 view writing positions [start, start + T) of that slot;
    - decode: after `set_step(slots int[A], index int[A], K)`, `update` writes new k, v [A, nkv, 1, hd] of row
      i at slot slots[i], position index[i], and returns keys [A, nkv, K, hd] (positions past a row's own
      length are stale and must be masked by the caller).
    """

    def __init__(self, slots: int, nkv: int, length: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.zeros(slots, nkv, length, head_dim, dtype=dtype, device=device)  # [S, nkv, L, hd]
        self.v = torch.zeros_like(self.k)
        self.slots = self.index = None
        self.K = 0
        self.first = None  # slots are consecutive from here: views, not gathers

    def set_step(self, slots: torch.Tensor, index: torch.Tensor, K: int, consecutive: bool) -> None:
        self.slots, self.index, self.K = slots, index, K
        self.first = int(slots[0]) if consecutive else None

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[self.slots, :, self.index] = k[:, :, 0]  # row i -> [slots[i], :, index[i]]
        self.v[self.slots, :, self.index] = v[:, :, 0]
        if self.first is not None:
            end = self.first + k.shape[0]
            return self.k[self.first:end, :, :self.K], self.v[self.first:end, :, :self.K]  # [A, nkv, K, hd]
        return self.k[self.slots, :, :self.K], self.v[self.slots, :, :self.K]

    def row(self, slot: int) -> "_RowView":
        return _RowView(self, slot)


class _RowView:
    """One slot of a `SlotCache` as a B=1 cache (the prefill writes straight into the slot)."""

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        c, s = self.cache, self.slot
        c.k[s, :, start:end] = k[0]
        c.v[s, :, start:end] = v[0]
        return c.k[s:s + 1, :, :end], c.v[s:s + 1, :, :end]  # [1, nkv, end, hd]


class ImageFeatureCache:
    """LRU of projected vision-tower outputs float[1, N, H], keyed by a hash of the pixel values."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        feats = self.items.get(key)
        if feats is not None:
            self.items.move_to_end(key)
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self.items[key] = feats
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


def pixels_key(pixel_values: torch.Tensor) -> str:
    return hashlib.sha256(pixel_values.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class _Row:
    handle: RequestHandle
    slot: int
    length: int  # tokens in the cache
    eos: frozenset[int]
    generator: torch.Generator | None
    sampling: SamplingConfig
    image_tokens: int
    image_cached: bool
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    ttft: float = 0.0
    last_time: float = 0.0


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could begin a stop string (held back while streaming)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Owns `model` in one thread. `submit(request, sink)` queues a request (QueueFull past `max_queue`; it may
    come before `start()`); events arrive through `sink` from the engine thread: Delta*, then Finished or Failed."""

    def __init__(self, model, processor, *, max_batch: int = 8, max_queue: int = 64, max_model_len: int | None = None,
                 default_max_tokens: int = 256, image_cache: int = 32, metrics=None):
        self.model, self.processor = model, processor
        cfg = model.config
        t = cfg.text
        # cache length per row: a 8192-token context x 8 rows would hold GBs of keys for 300-token requests
        self.context = min(t.max_position_embeddings, max_model_len or cfg.num_image_tokens + 768)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.default_max_tokens = default_max_tokens
        self.window = t.sliding_window
        self.image_id = cfg.image_token_index
        self.eos = frozenset(cfg.eos_token_ids)
        self.caches = [SlotCache(max_batch, t.num_key_value_heads, self.context, t.head_dim, model.dtype, model.device)
                       for _ in range(t.num_hidden_layers)]
        self.image_cache = ImageFeatureCache(image_cache)
        self.metrics = metrics
        self._rows: list[_Row | None] = [None] * max_batch
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="paligemma-engine", daemon=True)

    # ----------------------------------------------------------------------------------- public
    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, request: GenRequest, sink: Callable[[Event], None]) -> RequestHandle:
        """Queue `request`; raises InputError (prompt past the context), QueueFull, EngineStopped."""
        handle = RequestHandle(request, sink, self._budget(request))
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down; retry on another instance or later")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self._pending.append(handle)
            self._cv.notify()
        self._gauges()
        return handle

    def generate(self, request: GenRequest) -> Finished:
        """Blocking helper (tests, benchmarks): submit and wait for the end; raises the request's error."""
        import queue

        events: queue.Queue = queue.Queue()
        self.submit(request, events.put)
        while True:
            ev = events.get()
            if isinstance(ev, Finished):
                return ev
            if isinstance(ev, Failed):
                raise ev.error

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new requests, let running ones finish for up to `grace` seconds, then cancel the rest."""
        with self._cv:
            self._stopping = True
            while self._pending:
                self._pending.popleft().sink(Failed(EngineStopped("the server is shutting down")))
            self._cv.notify()
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        for row in list(self._rows):
            if row is not None:
                row.handle.cancel()
        with self._cv:
            self._cv.notify()
        self._thread.join(timeout=max(1.0, grace))

    # ----------------------------------------------------------------------------------- checks
    def _budget(self, request: GenRequest) -> int:
        n, p = len(request.input_ids), request.params
        if n >= self.context:
            raise ContextLengthExceeded(f"the prompt is {n} tokens (image tokens included), which fills this server's "
                                        f"context of {self.context} tokens; shorten the prompt")
        room = self.context - n
        if p.max_tokens is None:
            return min(room, self.default_max_tokens)
        if p.max_tokens > room:
            raise ContextLengthExceeded(f"the prompt is {n} tokens (image tokens included) and max_tokens is "
                                        f"{p.max_tokens}: together more than this server's context of {self.context} "
                                        f"tokens; ask for at most {room} tokens or shorten the prompt")
        return p.max_tokens

    # ----------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self.running and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self.running:
                    return
                admit = []
                while self._pending and len(admit) < self.max_batch - self.running:
                    admit.append(self._pending.popleft())
            for handle in admit:
                self._admit(handle)
            if self.running:
                self._safe_step()

    def _safe_step(self) -> None:
        """A bug must not take the engine down: fail the running rows (a 500 for their clients), log, go on."""
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - logged, and reported to the clients as a server error
            log.exception("decode step failed")
            for row in list(self._rows):
                if row is not None:
                    self._finish(row, Failed(exc))

    def _admit(self, handle: RequestHandle) -> None:
        slot = self._rows.index(None)
        if handle.cancelled:
            handle.sink(Failed(Cancelled("cancelled before it started")))
            return
        if handle.deadline is not None and time.perf_counter() > handle.deadline:
            handle.sink(Failed(RequestTimeout(f"the request waited past its timeout of {handle.request.timeout:g} s "
                                              "in the queue; the server is busy, retry later")))
            return
        try:
            self._prefill(handle, slot)
        except Exception as exc:  # noqa: BLE001
            log.exception("prefill failed")
            self._rows[slot] = None
            handle.sink(Failed(exc))
            self._gauges()

    @torch.no_grad()
    def _prefill(self, handle: RequestHandle, slot: int) -> None:
        model, req = self.model, handle.request
        device = model.device
        ids = torch.tensor([req.input_ids], device=device)  # [1, T]
        T = ids.shape[1]
        feats, cached = self._image_features(req.pixel_values, req.image_key)  # [1, N, H]
        x = self._embed(ids, feats)  # [1, T, H]
        ones = torch.ones_like(ids)
        masks = model.masks(ones, torch.zeros_like(ids))  # {sliding?: [1, T, T]}
        pos = torch.arange(1, T + 1, device=device)[None]  # [1, T]: 1-based
        h = model.language_model(x, pos, masks, [c.row(slot) for c in self.caches], start=0)  # [1, T, H]
        logits = model.logits(h[:, -1])  # [1, V]
        p = req.params
        gen = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
        n_image = int((ids == self.image_id).sum())
        sampling = SamplingConfig(max_new_tokens=handle.max_tokens, do_sample=p.temperature > 0,
                                  temperature=p.temperature or 1.0, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
        row = _Row(handle, slot, T, self.eos, gen, sampling, n_image, cached)
        self._rows[slot] = row
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(T)
        self._gauges()
        self._accept(row, logits)

    def _image_features(self, pixel_values: torch.Tensor | None, key: str | None) -> tuple[torch.Tensor | None, bool]:
        if pixel_values is None:
            return None, False
        key = key or pixels_key(pixel_values)
        feats = self.image_cache.get(key)
        if self.metrics is not None:
            (self.metrics.image_cache_hits if feats is not None else self.metrics.image_cache_misses).inc()
        if feats is not None:
            return feats, True
        feats = self.model.get_image_features(pixel_values.to(self.model.device))  # [1, N, H]
        self.image_cache.put(key, feats)
        return feats, False

    def _embed(self, ids: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        """As `model.embed`, with the image features given (maybe from the cache)."""
        is_image = ids == self.image_id  # [1, T]
        safe = ids.masked_fill(is_image, 0) if self.image_id >= self.model.config.vocab_size else ids
        x = self.model.language_model.embed(safe)  # [1, T, H]
        n = int(is_image.sum())
        if feats is None:
            if n:
                raise InputError(f"the prompt holds {n} <image> tokens but no image was given")
            return x
        if n != feats.shape[0] * feats.shape[1]:
            raise InputError(f"the prompt holds {n} <image> tokens for one image of {feats.shape[1]} features")
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype))

    @torch.no_grad()
    def _step(self) -> None:
        for row in list(self._rows):
            if row is not None:
                self._expired(row)  # finishes a cancelled or late row
        rows = [r for r in self._rows if r is not None]
        if not rows:
            return
        device = self.model.device
        slots = torch.tensor([r.slot for r in rows], device=device)  # [A]
        index = torch.tensor([r.length for r in rows], device=device)  # [A]: where each new token goes
        K = int(index.max()) + 1
        consecutive = [r.slot for r in rows] == list(range(rows[0].slot, rows[0].slot + len(rows)))
        for c in self.caches:
            c.set_step(slots, index, K, consecutive)
        tok = torch.tensor([r.tokens[-1] for r in rows], device=device)  # [A]
        x = self.model.language_model.embed(tok[:, None])  # [A, 1, H]
        ki = torch.arange(K, device=device)[None, :]  # [1, K]
        keys = ki <= index[:, None]  # [A, K]: each row's own tokens, the new one included
        masks = {False: keys[:, None, :], True: keys[:, None, :]}  # [A, 1, K]
        if self.window is not None:
            masks[True] = (keys & (ki > index[:, None] - self.window))[:, None, :]  # window includes self
        h = self.model.language_model(x, (index + 1)[:, None], masks, self.caches, start=0)  # [A, 1, H]
        logits = self.model.logits(h[:, -1])  # [A, V]
        for i, row in enumerate(rows):
            row.length += 1
            self._accept(row, logits[i:i + 1])

    def _expired(self, row: _Row) -> bool:
        h = row.handle
        if h.cancelled:
            self._finish(row, Failed(Cancelled("the client went away")))
            return True
        if h.deadline is not None and time.perf_counter() > h.deadline:
            self._finish(row, Failed(RequestTimeout(
                f"the request ran past its timeout of {h.request.timeout:g} s; ask for fewer tokens or retry")))
            return True
        return False

    def _accept(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the row's next token from logits [1, V], stream its text, finish it when it is done."""
        p = row.handle.request.params
        tok = int(sample(logits, row.sampling, row.generator)[0])
        now = time.perf_counter()
        if not row.tokens:
            row.ttft = now - row.handle.submitted
            if self.metrics is not None:
                self.metrics.ttft.observe(row.ttft)
        elif self.metrics is not None:
            self.metrics.tpot.observe(now - row.last_time)
        row.last_time = now
        row.tokens.append(tok)
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
        if tok in row.eos and not p.ignore_eos:
            return self._finish(row, "stop")
        text = self.processor.decode(row.tokens)
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish(row, "stop", text[:cut])
        if len(row.tokens) >= row.handle.max_tokens or row.length + 1 >= self.context:
            return self._finish(row, "length", text)
        safe = text[:len(text) - _stop_holdback(text, p.stop)]
        if not safe.endswith("\ufffd") and safe.startswith(row.emitted) and len(safe) > len(row.emitted):
            row.handle.sink(Delta(safe[len(row.emitted):]))
            row.emitted = safe
        elif len(row.tokens) == 1:
            row.handle.sink(Delta(""))  # the first token exists, though its text is held back: streams start now

    def _finish(self, row: _Row, outcome: str | Failed, text: str | None = None) -> None:
        self._rows[row.slot] = None
        self._gauges()
        if isinstance(outcome, Failed):
            row.handle.sink(outcome)
            return
        if text is None:
            text = self.processor.decode(row.tokens)
        if text.startswith(row.emitted) and len(text) > len(row.emitted):
            row.handle.sink(Delta(text[len(row.emitted):]))
        row.handle.sink(Finished(text, list(row.tokens), outcome, len(row.handle.request.input_ids),
                                 len(row.tokens), row.image_tokens, row.ttft, row.image_cached))

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)


def make_request(processor, prompt: str, image, params: SamplingParams | None = None,
                 timeout: float | None = None) -> GenRequest:
    """Tokenize `prompt` for one PIL image with the checkpoint's processor and hash its pixels (run outside the
    engine thread: at 896 px the hash alone takes milliseconds)."""
    batch = processor(text=[prompt], images=[image])
    return GenRequest(input_ids=batch["input_ids"][0].tolist(), pixel_values=batch["pixel_values"],
                      params=params or SamplingParams(), timeout=timeout, image_key=pixels_key(batch["pixel_values"]))
