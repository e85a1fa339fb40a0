"""`paligemma serve` live: a real server process on 127.0.0.1 (a free port) with the shipped model, spoken to
with the official `openai` client and with httpx (vLLM's test layout), plus a second, one-row server for the
full queue and SIGTERM. Every bad input gets its status and a message naming it, and the server stays up."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

import paligemma
from paligemma.shapes.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
MODEL = "shapes-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PALIGEMMA_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "paligemma.cli", "serve", "--port", str(port), "--threads", "1",
                             "--log-level", "warning", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 90) -> None:
    """Poll GET /health: 503 while loading, 200 when ready."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return
            assert r.status_code == 503 and r.json()["status"] == "loading"
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "scene.png").write_bytes(png(make_scene(3).image))
    main = start_server("--api-key", KEY, "--max-batch", "8", "--allowed-local-media-path", str(media),
                        "--max-body-bytes", "300000", "--max-image-pixels", "1000000")
    small = start_server("--max-batch", "1", "--max-queue", "1", "--shutdown-grace", "5")
    try:
        for proc, url in (main, small):
            wait_ready(proc, url)
        yield {"main": main[1], "small": small[1], "media": media, "small_proc": small[0]}
    finally:
        assert stop(main[0]) == 0
        stop(small[0])


@pytest.fixture(scope="module")
def url(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def library():
    return paligemma.load(paligemma.SHAPES_TINY)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def solo_text(library, prompt: str, image: Image.Image) -> str:
    model, proc = library
    return proc.batch_decode(model.generate(**proc(text=[prompt], images=[image]), max_new_tokens=64))[0]


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_health_and_metrics(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").json()["status"] == "ok"
    text = http.get("/metrics").text
    for name in ("paligemma_requests_total", "paligemma_queue_depth", "paligemma_running_rows",
                 "paligemma_time_to_first_token_seconds_bucket", "paligemma_generated_tokens_total"):
        assert name in text


def test_chat_answers_as_the_library_does_with_usage(client, library):
    image = make_scene(11).image
    r = client.chat.completions.create(model=MODEL, messages=user("caption en", data_uri(image)))
    assert r.choices[0].message.content == solo_text(library, "caption en", image)
    assert r.choices[0].finish_reason == "stop"
    n_out = len(library[1].tokenizer.encode(r.choices[0].message.content))
    assert r.usage.prompt_tokens == 20 and r.usage.prompt_tokens_details.image_tokens == 16
    assert r.usage.completion_tokens >= n_out  # the text's tokens and <eos>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_same_text_then_usage(client):
    msgs = user("caption en", data_uri(make_scene(12).image))
    whole = client.chat.completions.create(model=MODEL, messages=msgs)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_stop_and_seed(client):
    msgs = user("caption en", data_uri(make_scene(13).image))
    full = client.chat.completions.create(model=MODEL, messages=msgs).choices[0].message.content
    short = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=2)
    assert short.choices[0].finish_reason == "length" and full.startswith(short.choices[0].message.content)
    stop = full.split(" ")[2]
    cut = client.chat.completions.create(model=MODEL, messages=msgs, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    draws = [client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.5, seed=s, max_tokens=12)
             .choices[0].message.content for s in (7, 7, 8)]
    assert draws[0] == draws[1]


def test_completions_endpoint_with_images_field(http, library):
    image = make_scene(14).image
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "answer en how many shapes?",
                                           "images": [data_uri(image)], "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == solo_text(library, "answer en how many shapes?", image)


def test_local_file_inside_the_allowed_folder(client, servers, library):
    r = client.chat.completions.create(model=MODEL, messages=user("caption en", f"file://{servers['media']}/scene.png"))
    assert r.choices[0].message.content == solo_text(library, "caption en", make_scene(3).image)


def test_task_endpoint_and_chat_extension_give_pixel_boxes(client, http):
    image = Image.open(ROOT / "images" / "shapes.png")
    r = http.post("/v1/tasks/detect", json={"image": data_uri(image), "objects": ["square"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt"] == "detect square" and body["problems"] == []
    assert [o["label"] for o in body["objects"]] == ["square", "square"]
    assert body["objects"][0]["box"] == pytest.approx([24.0, 135.9, 92.1, 203.9], abs=0.1)  # README's figures
    chat = client.chat.completions.create(model=MODEL, messages=user("square", data_uri(image)),
                                          extra_body={"paligemma": {"task": "detect"}})
    assert chat.model_extra["paligemma"]["objects"] == body["objects"]
    assert chat.choices[0].message.content == body["text"]
    r = http.post("/v1/tasks/segment", json={"image": data_uri(image), "objects": "square"})
    assert r.status_code == 400 and "--vae" in r.json()["error"]["message"]
    r = http.post("/v1/tasks/answer", json={"image": data_uri(image), "question": "how many shapes?"}).json()
    assert (r["prompt"], r["text"], r["objects"]) == ("answer en how many shapes?", "3", None)  # README's answer
    assert http.post("/v1/tasks/count", json={"image": data_uri(image)}).status_code == 404
    with pytest.raises(openai.BadRequestError, match="takes no text"):
        client.chat.completions.create(model=MODEL, messages=user("hello", data_uri(image)),
                                       extra_body={"paligemma": {"task": "caption"}})


# ---------------------------------------------------------------------------------------------- bad inputs
GOOD = data_uri(make_scene(1).image)


def body(**over):
    b = {"model": MODEL, "messages": user("caption en", GOOD)}
    b.update(over)
    return b


def bomb() -> str:
    buf = io.BytesIO()
    Image.new("1", (1001, 1000)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


BAD = [  # name, request body (dict, or raw bytes), status, message fragment
    ("malformed JSON", b'{"model": "shapes-tiny", "messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("wrong type", body(messages="caption en"), 400, "messages"),
    ("wrong type temperature", body(temperature="hot"), 400, "temperature"),
    ("unknown field", body(frobnicate=True), 400, "frobnicate"),
    ("unknown model", body(model="gpt-4o"), 404, "'gpt-4o' is not served here"),
    ("no image", body(messages=[{"role": "user", "content": "caption en"}]), 400, "has no image"),
    ("two images", body(messages=user("caption en", GOOD, GOOD)), 400, "has 2 images"),
    ("bad base64", body(messages=user("caption en", "data:image/png;base64,@@@@")), 400, "base64 is malformed"),
    ("not an image", body(messages=user("caption en", "data:image/png;base64," + base64.b64encode(b"hello").decode())),
     400, "not a PNG, JPEG, WebP or GIF"),
    ("pixel bomb", body(messages=user("caption en", bomb())), 400, "over the server's limit of 1000000"),
    ("remote URL, remote off", body(messages=user("caption en", "http://127.0.0.1:1/x.png")), 400,
     "remote image URLs are disabled"),
    ("path outside the allowed folder", body(messages=user("caption en", "file:///etc/hostname")), 400,
     "outside the allowed folder"),
    ("traversal", body(messages=user("caption en", "file:///{media}/../x.png")), 400, "does not exist"),
    ("prompt past the context", body(max_tokens=1000), 400, "context of 256 tokens"),
    ("long prompt past the context", body(messages=user("caption en " * 200, GOOD)), 400, "context"),
    ("n=2", body(n=2), 400, "n=2"),
    ("system message", body(messages=[{"role": "system", "content": "be nice"}] + user("caption en", GOOD)), 400,
     "no system prompt"),
    ("earlier turn", body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
                          + user("caption en", GOOD)), 400, "earlier user turn"),
    ("last message not user", body(messages=[{"role": "assistant", "content": "yo"}]), 400, "must be the user's"),
    ("logprobs", body(logprobs=True), 400, "logprobs"),
    ("too many stops", body(stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop strings"),
    ("body too large", body(pad="x" * 400_000), 413, "over the server's limit"),
    # strict JSON types: a string, a bool or a float is not an int, nor a string a bool (found live: 200s)
    ("max_tokens as a string", body(max_tokens="8"), 400, "max_tokens"),
    ("max_tokens as a bool", body(max_tokens=True), 400, "max_tokens"),
    ("stream as a string", body(stream="yes"), 400, "stream"),
    ("seed past 64 bits", body(seed=2**70), 400, "seed"),  # was a 500 from torch.Generator.manual_seed
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "caption \\ud800 en"}]}', 400,
     "unpaired UTF-16 surrogate"),  # was a 500 from the tokenizer
    ("nested too deeply", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),  # was a 500
]


@pytest.mark.parametrize("payload,status,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_get_their_status_and_message(http, servers, payload, status, fragment):
    if isinstance(payload, dict):
        payload = json.dumps(payload).replace("{media}", str(servers["media"]).lstrip("/")).encode()
    r = http.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(url, headers):
    r = httpx.post(url + "/v1/chat/completions", json=body(), headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/health").status_code == 200  # /health needs no key


def test_errors_surface_as_openai_exceptions(client, url):
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model=MODEL, messages=user("caption en", GOOD), n=2)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=user("caption en", GOOD))
    bad_key = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_server_stays_up_after_bad_inputs(client):
    r = client.chat.completions.create(model=MODEL, messages=user("caption en", GOOD))
    assert r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- concurrency
def test_eight_concurrent_clients_each_get_their_solo_answer(client):
    cases = [(p, data_uri(make_scene(40 + i).image)) for i, p in
             enumerate(["caption en", "answer en how many shapes?", "detect square", "detect circle ; triangle"] * 2)]
    ask = lambda p, img: client.chat.completions.create(model=MODEL, messages=user(p, img)).choices[0].message.content
    solo = [ask(p, img) for p, img in cases]
    together = [None] * len(cases)

    def go(i):
        together[i] = ask(*cases[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert together == solo


def generated_total(http) -> float:
    line = next(l for l in http.get("/metrics").text.splitlines() if l.startswith("paligemma_generated_tokens_total "))
    return float(line.split()[1])


LONG = {"ignore_eos": True, "max_tokens": 230}  # runs the whole budget


def test_disconnecting_client_frees_its_row(http):
    msgs = user("caption en", GOOD)
    full = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, **LONG}).json()
    assert full["usage"]["completion_tokens"] == 230
    before = generated_total(http)
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "stream": True, **LONG}) as r:
        next(r.iter_lines())
    deadline = time.time() + 10
    while http.get("/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert http.get("/health").json()["running"] == 0
    assert generated_total(http) - before < 230  # it stopped early: the row was freed


def test_full_queue_is_429_with_retry_after(servers):
    """The one-row server with a one-place queue: two long requests fill both, the third is refused."""
    url = servers["small"]
    long = {"model": MODEL, "messages": user("caption en", GOOD), **LONG}
    statuses = []

    def hold():
        statuses.append(httpx.post(url + "/v1/chat/completions", json=long, timeout=60).status_code)

    def health():
        return httpx.get(url + "/health", timeout=10).json()

    def until(ready):  # poll, not sleep: 230 tokens of the shipped model take ~0.4 s, so a fixed pause
        deadline = time.time() + 30  # could outlast the first holder (the intermittent 200 of this test)
        while not ready(health()) and time.time() < deadline:
            time.sleep(0.005)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    holders[0].start()
    until(lambda h: h["running"] == 1)
    holders[1].start()
    until(lambda h: h["waiting"] == 1)
    try:
        r = httpx.post(url + "/v1/chat/completions", json=long, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "queue is full" in r.json()["error"]["message"]
        small = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            small.chat.completions.create(model=MODEL, messages=long["messages"], max_tokens=230,
                                          extra_body={"ignore_eos": True})
    finally:
        for t in holders:
            t.join(timeout=60)
    assert statuses == [200, 200]


def test_sigterm_finishes_running_requests_and_exits_cleanly(servers):
    url, proc = servers["small"], servers["small_proc"]
    out = {}

    def go():
        out["r"] = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": user("caption en", GOOD),
                                                                  **LONG}, timeout=60)

    t = threading.Thread(target=go)
    t.start()
    deadline = time.time() + 30  # the signal must find the request running (polled: its 230 tokens take ~0.4 s)
    while httpx.get(url + "/health", timeout=10).json()["running"] != 1 and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=30)
    assert proc.wait(timeout=30) == 0
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 230  # finished, not cut


def test_sigterm_answers_queued_and_overdue_requests_503_in_the_openai_shape():
    """Past --shutdown-grace nothing is cut off by uvicorn (a plain-text 500, found live): the queued requests get
    503 at once, the running one 503 when its grace ends, each as an OpenAI error; the process exits 0."""
    proc, url = start_server("--max-batch", "1", "--shutdown-grace", "0.2")
    wait_ready(proc, url)
    out = []

    def go():
        out.append(httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": user("caption en", GOOD), **LONG}))

    threads = [threading.Thread(target=go) for _ in range(6)]  # one running, the others queued
    for t in threads:
        t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=30)
    assert proc.wait(timeout=30) == 0
    # a fast machine finishes a request or two of 230 tokens before the signal (2 in 0.5 s on a Zen 5): those are
    # whole answers; every later one, queued or running at the signal, is refused
    statuses = sorted(r.status_code for r in out)
    done = [r for r in out if r.status_code == 200]
    assert len(out) == 6 and statuses == [200] * len(done) + [503] * (6 - len(done)), [r.text for r in out]
    assert len(done) <= 4, "the machine finished nearly every request before the signal: nothing was tested"
    assert all(r.json()["usage"]["completion_tokens"] == 230 for r in done)  # finished, never cut short
    refused = [r for r in out if r.status_code == 503]
    assert all(r.json()["error"]["type"] == "service_unavailable" for r in refused)
    cut = sum("shut down before this request finished" in r.json()["error"]["message"] for r in refused)
    assert cut == 1 if not done else cut <= 1  # the one running at the signal was cut (if any was running)


# ---------------------------------------------------------------------------------------------- in-process
def test_segment_answers_come_back_with_coco_rle_masks():
    """The translation behind /v1/tasks/segment with --vae (the shipped model knows no seg tokens)."""
    from paligemma.segmentation import MaskDecoder
    from paligemma.serve.translate import task_result_json
    from paligemma.tasks import decode_box, get_task
    from tests.test_segmentation import random_state

    decoder = MaskDecoder.from_state_dict(random_state())
    text = "<loc0100><loc0200><loc0600><loc0700>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " square"
    out = task_result_json(get_task("segment"), "segment square", text, Image.new("RGB", (100, 80)), decoder)
    obj = out["objects"][0]
    assert obj["label"] == "square" and obj["box"] == pytest.approx(list(decode_box([100, 200, 600, 700], 100, 80)),
                                                                   abs=1e-3)
    assert obj["mask"]["size"] == [80, 100] and sum(obj["mask"]["counts"]) == 80 * 100
    assert obj["seg_tokens"] == list(range(16))


def test_a_bug_is_a_500_without_internals():
    from paligemma.serve.app import as_api_error

    e = as_api_error(RuntimeError("CUDA error at /home/secret/model.py:12"))
    assert e.status == 500 and e.type == "server_error" and "secret" not in e.message


def test_a_model_that_fails_to_load_ends_the_server_with_one_error_line(tmp_path):
    (tmp_path / "config.json").write_bytes((paligemma.SHAPES_TINY / "config.json").read_bytes())  # no weights
    proc, _ = start_server("--model", str(tmp_path))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert [line for line in out.splitlines() if line.strip()] == [
        f"error: no model.safetensors or model.safetensors.index.json in {tmp_path}"]


@pytest.mark.parametrize("flag,value,fragment", [
    ("--port", "70000", "0-65535"),  # was a traceback from bind()
    ("--request-timeout", "nan", "finite"),  # was accepted: a deadline that never passes
    ("--shutdown-grace", "-1", "0 or more"),  # was accepted
    ("--image-cache", "-3", "0 or more"),  # was accepted as "disabled"
])
def test_serve_flags_out_of_range_are_usage_errors(flag, value, fragment):
    from paligemma.cli.common import UsageError
    from paligemma.cli.serve import build_parser

    with pytest.raises(UsageError, match=fragment):
        build_parser().parse_args([flag, value])


def test_a_busy_port_is_one_error_line():
    """Was uvicorn's ERROR line and an abort (status 134) while the model loaded in its thread."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-m", "paligemma.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert [line for line in (r.stdout + r.stderr).splitlines() if line.strip()] == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port"]
