"""The serving engine in-process: continuous batching gives every request its solo answer (Gemma and
Gemma 2 with a sliding window shorter than the answers), per-row sampling, stop strings, budgets, the
context check, cancellation, the queue bound, and the vision-feature cache."""

import queue
import time

import pytest
import torch

import paligemma
from paligemma.errors import InputError
from paligemma.serve.engine import (Cancelled, ContextLengthExceeded, Delta, Engine, Failed, Finished, QueueFull,
                                    SamplingParams, SlotCache, make_request)
from paligemma.shapes.synthetic import make_scene

PROMPTS = ["caption en", "answer en how many shapes?", "detect square", "detect circle ; triangle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run ~20x faster without intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped():
    return paligemma.load(paligemma.SHAPES_TINY)


@pytest.fixture(scope="module")
def pg2(pg2_dir):
    return paligemma.load(pg2_dir)


def reference(model, proc, prompt, image, n):
    """The project's own `generate` (parity-tested against transformers) on one request alone."""
    batch = proc(text=[prompt], images=[image])
    ids = model.generate(**batch, max_new_tokens=n)[0].tolist()
    eos = set(model.config.eos_token_ids)
    return ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]


def run_batched(engine, requests):
    """Submit everything before the engine thread starts, so all rows really share decode steps."""
    boxes = [queue.Queue() for _ in requests]
    for r, box in zip(requests, boxes):
        engine.submit(r, box.put)
    engine.start()
    out = []
    for box in boxes:
        while not isinstance(ev := box.get(timeout=60), (Finished, Failed)):
            pass
        out.append(ev)
    return out


def test_eight_concurrent_requests_each_get_their_solo_answer(shipped):
    model, proc = shipped
    cases = [(PROMPTS[i % 4], make_scene(100 + i).image) for i in range(8)]
    solo = [reference(model, proc, p, img, 40) for p, img in cases]
    engine = Engine(model, proc, max_batch=8)
    out = run_batched(engine, [make_request(proc, p, img, SamplingParams(max_tokens=40)) for p, img in cases])
    engine.stop(grace=1)
    assert [f.token_ids for f in out] == solo
    assert len({len(s) for s in solo}) > 1  # rows of different lengths left the batch at different steps


def test_sliding_window_model_batched_equals_solo(pg2):
    """Gemma 2 tiny: window 6, answers of 24 tokens; 5 requests on 3 slots, so slots are reused mid-run."""
    model, proc = pg2
    cases = [(t, make_scene(i, size=42).image) for i, t in
             enumerate(["caption en", "a", "what is this picture about", "red blue", "count the shapes please"])]
    solo = [reference(model, proc, p, img, 24) for p, img in cases]
    engine = Engine(model, proc, max_batch=3)
    out = run_batched(engine, [make_request(proc, p, img, SamplingParams(max_tokens=24)) for p, img in cases])
    engine.stop(grace=1)
    assert [f.token_ids for f in out] == solo
    assert max(len(s) for s in solo) > model.config.text.sliding_window + 2


def test_seeded_sampling_is_per_row(pg2):
    model, proc = pg2
    img = make_scene(3, size=42).image
    params = [SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=s) for s in (1, 2, 3)]
    solo = []
    for p in params:
        e = Engine(model, proc, max_batch=1).start()
        solo.append(e.generate(make_request(proc, "caption en", img, p)).token_ids)
        e.stop(grace=1)
    engine = Engine(model, proc, max_batch=3)
    out = run_batched(engine, [make_request(proc, "caption en", img, p) for p in params])
    engine.stop(grace=1)
    assert [f.token_ids for f in out] == solo
    assert len({tuple(s) for s in solo}) > 1  # the seeds matter


def test_stop_strings_budget_and_streamed_text(shipped):
    model, proc = shipped
    img = make_scene(7).image
    engine = Engine(model, proc, max_batch=2).start()
    full = engine.generate(make_request(proc, "caption en", img, SamplingParams(max_tokens=40)))
    assert full.finish_reason == "stop" and " " in full.text
    word = full.text.split(" ")[1]
    events = queue.Queue()
    engine.submit(make_request(proc, "caption en", img, SamplingParams(max_tokens=40, stop=(" " + word,))), events.put)
    deltas, end = [], None
    while end is None:
        ev = events.get(timeout=30)
        deltas.append(ev.text) if isinstance(ev, Delta) else (end := ev)
    assert end.finish_reason == "stop" and end.text == full.text.split(" " + word)[0]
    assert "".join(deltas) == end.text  # the stop string never leaks into the stream
    short = engine.generate(make_request(proc, "caption en", img, SamplingParams(max_tokens=2)))
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:2]
    assert (full.prompt_tokens, full.image_tokens) == (20, 16)
    engine.stop(grace=1)


def test_context_is_checked_before_queueing(shipped):
    model, proc = shipped
    engine = Engine(model, proc)
    req = make_request(proc, "caption en", make_scene(1).image, SamplingParams(max_tokens=1000))
    with pytest.raises(ContextLengthExceeded, match="context of 256 tokens"):
        engine.submit(req, print)
    assert isinstance(ContextLengthExceeded("x"), InputError)


def test_cancel_frees_the_row_at_the_next_step(shipped):
    model, proc = shipped
    engine = Engine(model, proc, max_batch=1).start()
    events = queue.Queue()
    long = SamplingParams(max_tokens=200, temperature=2.0, seed=0)
    handle = engine.submit(make_request(proc, "caption en", make_scene(2).image, long), events.put)
    handle.cancel()
    while not isinstance(ev := events.get(timeout=30), (Finished, Failed)):
        pass
    assert isinstance(ev, Failed) and isinstance(ev.error, Cancelled)
    assert engine.running == 0
    ok = engine.generate(make_request(proc, "caption en", make_scene(2).image, SamplingParams(max_tokens=5)))
    assert ok.completion_tokens >= 1  # the slot is reused
    engine.stop(grace=1)


def test_full_queue_refuses(shipped):
    model, proc = shipped
    engine = Engine(model, proc, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    req = make_request(proc, "caption en", make_scene(1).image)
    engine.submit(req, print)
    engine.submit(req, print)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(req, print)


def test_second_question_about_an_image_skips_the_vision_tower(shipped):
    model, proc = shipped
    engine = Engine(model, proc, image_cache=4).start()
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        img = make_scene(5).image
        first = engine.generate(make_request(proc, "caption en", img))
        second = engine.generate(make_request(proc, "answer en how many shapes?", img))
        again = engine.generate(make_request(proc, "caption en", img))
    finally:
        hook.remove()
        engine.stop(grace=1)
    assert len(calls) == 1 and not first.image_cached and second.image_cached
    assert again.token_ids == first.token_ids


def test_slot_cache_writes_each_row_at_its_own_index():
    c = SlotCache(3, 1, 8, 2, torch.float32, "cpu")
    c.row(1).update(0, torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))  # prefill slot 1: 4 tokens
    c.set_step(torch.tensor([0, 1]), torch.tensor([2, 4]), K=5, consecutive=True)
    k, _ = c.update(0, torch.full((2, 1, 1, 2), 7.0), torch.full((2, 1, 1, 2), 7.0))
    assert k.shape == (2, 1, 5, 2)
    assert k[0, 0, :, 0].tolist() == [0, 0, 7, 0, 0] and k[1, 0, :, 0].tolist() == [1, 1, 1, 1, 7]
    c.set_step(torch.tensor([0, 2]), torch.tensor([3, 0]), K=4, consecutive=False)
    k, _ = c.update(0, torch.full((2, 1, 1, 2), 5.0), torch.full((2, 1, 1, 2), 5.0))
    assert k[0, 0, :, 0].tolist() == [0, 0, 7, 5] and k[1, 0, :, 0].tolist() == [5, 0, 0, 0]


def test_a_request_past_its_timeout_fails_with_timeout(shipped):
    from paligemma.serve.engine import RequestTimeout

    model, proc = shipped
    engine = Engine(model, proc)
    req = make_request(proc, "caption en", make_scene(1).image, timeout=1e-6)
    events = queue.Queue()
    engine.submit(req, events.put)
    time.sleep(0.01)
    engine.start()
    ev = events.get(timeout=30)
    engine.stop(grace=1)
    assert isinstance(ev, Failed) and isinstance(ev.error, RequestTimeout) and "timeout" in str(ev.error)
