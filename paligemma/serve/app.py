"""The FastAPI app: HTTP in, protocol models, engine requests, protocol models out. No model code here.

`create_app(config)` returns an app that loads the model in a background thread when it starts
(GET /health: 503 while loading, 200 when ready) and stops the engine when it shuts down. Endpoints:
POST /v1/chat/completions, POST /v1/completions, POST /v1/tasks/{task}, GET /v1/models, GET /health,
GET /metrics. Every error is the OpenAI body {"error": {"message", "type", "param", "code"}}; bad input
is 400, an unexpected failure 500 with no internals (the traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PaliGemmaError
from . import protocol as P
from .engine import (Cancelled, ContextLengthExceeded, Delta, Engine, EngineStopped, Failed, Finished, QueueFull,
                     RequestTimeout, SamplingParams, make_request)
from .media import MediaPolicy, load_image_url
from .protocol import ApiError
from .translate import chat_prompt, check_supported, sampling, task_result_json, usage
from .metrics import ServeMetrics

log = logging.getLogger("paligemma.serve")


@dataclass(kw_only=True)
class ServerConfig:
    model_dir: Path
    model_name: str | None = None  # served model id; default: the directory's name
    dtype: str | None = None
    device: str | None = None
    quantize: str | None = "auto"
    vae: Path | None = None
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 32 * 2**20
    request_timeout: float = 600.0
    max_model_len: int | None = None
    default_max_tokens: int = 256
    image_cache: int = 32
    shutdown_grace: float = 10.0
    media: MediaPolicy = field(default_factory=MediaPolicy)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).name


class BodyTooLarge(Exception):
    pass


def error_response(e: ApiError) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
    return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


def as_api_error(exc: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineStopped):
        return ApiError(503, str(exc), "service_unavailable", code="shutting_down")
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc), "timeout", code="timeout")
    if isinstance(exc, Cancelled):
        return ApiError(499, str(exc), "cancelled", code="cancelled")
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, PaliGemmaError):
        return ApiError(400, str(exc))
    return ApiError(500, "internal server error; the server log has the details", "server_error")


# ---------------------------------------------------------------------------------------------- state
class ServerState:
    """The loaded model, processor, engine and mask decoder; `ready` once loading finished."""

    def __init__(self, config: ServerConfig, metrics: ServeMetrics):
        self.config, self.metrics = config, metrics
        self.engine: Engine | None = None
        self.processor = None
        self.mask_decoder = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None

    def load(self) -> None:
        from ..loading import load

        c = self.config
        kwargs = {} if c.quantize == "auto" else {"quantize": c.quantize}
        model, self.processor = load(c.model_dir, dtype=c.dtype, device=c.device, **kwargs)
        model.eval()
        if c.vae is not None:
            from ..api import get_mask_decoder

            self.mask_decoder = get_mask_decoder(c.vae)
        self.engine = Engine(model, self.processor, max_batch=c.max_batch, max_queue=c.max_queue,
                             max_model_len=c.max_model_len, default_max_tokens=c.default_max_tokens,
                             image_cache=c.image_cache, metrics=self.metrics).start()
        self.ready.set()


def create_app(config: ServerConfig, on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    metrics = ServeMetrics()
    state = ServerState(config, metrics)

    def load_in_background() -> None:
        try:
            state.load()
            log.info("model %s ready", config.served_name)
        except BaseException as exc:  # noqa: BLE001 - reported to the CLI, which exits non-zero
            state.load_error = exc
            if on_load_failure is not None:
                on_load_failure(exc)
            else:
                log.error("loading the model failed: %s", exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_in_background, name="paligemma-load", daemon=True).start()
        yield
        if state.engine is not None:
            await run_in_threadpool(state.engine.stop, config.shutdown_grace)

    app = FastAPI(title="paligemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(Guard, config=config, metrics=metrics)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


# ---------------------------------------------------------------------------------------------- middleware
def endpoint_label(path: str) -> str:
    if path.startswith("/v1/tasks/"):
        return "/v1/tasks"
    known = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
    return path if path in known else "other"


class Guard:
    """ASGI middleware: request metrics, the API key on /v1/ (constant-time compare), the body cap."""

    def __init__(self, app, config: ServerConfig, metrics: ServeMetrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            self.metrics.requests.inc(1, endpoint_label(scope["path"]), str(status["code"]))

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.key is not None and scope["path"].startswith("/v1/") and not self._authorized(headers):
            e = ApiError(401, "missing or wrong API key; send the header Authorization: Bearer <key>",
                         "authentication_error", code="invalid_api_key")
            return await error_response(e)(scope, receive, send)
        cap = self.config.max_body_bytes
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            return await error_response(_too_large(cap))(scope, receive, send)
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise BodyTooLarge()
            return message

        await self.app(scope, capped_receive, send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        auth = headers.get("authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(token, self.key)


def _too_large(cap: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {cap} bytes; send a smaller image",
                    code="request_too_large")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(BodyTooLarge)
    async def _big(request, exc):
        return error_response(_too_large(request.app.state.serve.config.max_body_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(ApiError(exc.status_code, message, kind))

    @app.exception_handler(PaliGemmaError)
    async def _ours(request, exc: PaliGemmaError):  # refused on purpose: an answer, not a server error
        return error_response(as_api_error(exc))

    @app.exception_handler(Exception)
    async def _any(request, exc: Exception):  # a bug: 500 without internals; uvicorn logs the traceback
        return error_response(as_api_error(exc))


# ---------------------------------------------------------------------------------------------- helpers
async def read_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise ApiError(400, f"invalid request: {problems}", param=param, code="invalid_value") from None


def require_ready(state: ServerState) -> Engine:
    if state.load_error is not None:
        raise ApiError(503, "the model failed to load; see the server log", "service_unavailable")
    if not state.ready.is_set():
        raise ApiError(503, "the model is still loading; poll GET /health", "service_unavailable",
                       code="loading", headers={"Retry-After": "1"})
    return state.engine


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.config.served_name:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {state.config.served_name!r} "
                       "(GET /v1/models)", "not_found_error", "model", "model_not_found")


@dataclass
class Prepared:
    """A request ready for the engine, and what the task parser needs afterwards."""

    gen: Any
    image: Any
    task: Any = None
    prompt: str = ""


# ---------------------------------------------------------------------------------------------- running
class Run:
    """One submitted request: events from the engine thread arrive on an asyncio queue."""

    def __init__(self, engine: Engine, prepared: Prepared):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = engine.submit(prepared.gen, lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev))

    async def events(self, request: Request) -> AsyncIterator[Delta | Finished]:
        """Deltas then Finished; raises the request's error. A disconnected client cancels the row."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.handle.cancel()
                        raise Cancelled("the client went away") from None
                    continue
                if isinstance(ev, Failed):
                    raise ev.error
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            self.handle.cancel()  # no-op once finished; frees the row if the client left

    async def result(self, request: Request) -> Finished:
        async for ev in self.events(request):
            if isinstance(ev, Finished):
                return ev
        raise Cancelled("the request ended without a result")


def _add_routes(app: FastAPI, state: ServerState) -> None:
    config = state.config

    def prepare(prompt: str, url: str, params: SamplingParams, task_name: str | None = None,
                objects=None, lang: str = "en") -> Prepared:
        """Runs in a worker thread: fetch/decode the image, build the prompt, tokenize."""
        from ..tasks import build_prompt, get_task

        task = None
        if task_name is not None:
            task = get_task(task_name)
            if task.output == "segmentations" and state.mask_decoder is None:
                raise ApiError(400, "segment needs the VQ-VAE mask decoder; start the server with --vae vae-oid.npz",
                               code="no_mask_decoder")
            if task.input is None and prompt.strip():
                raise ApiError(400, f"task {task.name} takes no text; send only the image (the text would be dropped)",
                               param="messages", code="unexpected_text")
            if task.input == "objects" and objects is None:
                objects = prompt  # the chat extension: the message text names the objects
            prompt = build_prompt(task, lang=lang, text=prompt if task.input == "text" else None,
                                  objects=objects if task.input == "objects" else None)
        image = load_image_url(url, config.media)
        gen = make_request(state.processor, prompt, image, params, timeout=config.request_timeout)
        return Prepared(gen, image, task, prompt)

    def task_json(prepared: Prepared, f: Finished) -> dict:
        return task_result_json(prepared.task, prepared.prompt, f.text, prepared.image, state.mask_decoder)

    async def start(prepare_args: tuple, prepare_kwargs: dict | None = None) -> tuple[Run, Prepared]:
        engine = require_ready(state)
        prepared = await run_in_threadpool(prepare, *prepare_args, **(prepare_kwargs or {}))
        return Run(engine, prepared), prepared

    @app.get("/health")
    async def health():
        if state.load_error is not None:
            return JSONResponse({"status": "failed"}, status_code=503)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        e = state.engine
        return {"status": "ok", "model": config.served_name, "running": e.running, "waiting": e.waiting}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=config.served_name, created=P.now())]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: P.ChatCompletionRequest = await read_body(request, P.ChatCompletionRequest)
        check_model(state, req.model)
        check_supported(req)
        if req.top_logprobs:
            raise ApiError(400, "top_logprobs is not supported; omit it", param="top_logprobs")
        text, url = chat_prompt(req)
        task = req.paligemma
        if task is not None and req.stream:
            raise ApiError(400, "paligemma.task results come with stream=false", param="paligemma")
        args = (text, url, sampling(req, req.token_limit()))
        kwargs = {"task_name": task.task, "lang": task.lang} if task else {}
        run, prepared = await start(args, kwargs)
        rid, created, name = P.new_id("chatcmpl"), P.now(), config.served_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(chat_stream(run, request, rid, created, name, include_usage),
                                     media_type="text/event-stream")
        f = await run.result(request)
        extra = task_json(prepared, f) if task else None
        return P.ChatCompletion(id=rid, created=created, model=name, usage=usage(f), paligemma=extra, choices=[
            P.ChatChoice(message=P.AssistantMessage(content=f.text), finish_reason=f.finish_reason)]).model_dump(
            exclude_none=False)

    async def chat_stream(run: Run, request: Request, rid: str, created: int, name: str, include_usage: bool):
        def chunk(delta: P.DeltaMessage, finish=None, use=None, choices=True) -> str:
            ch = [P.ChunkChoice(delta=delta, finish_reason=finish)] if choices else []
            return sse(P.ChatCompletionChunk(id=rid, created=created, model=name, choices=ch, usage=use))

        first = True
        try:
            async for ev in run.events(request):
                if first:  # sent with the first token, so a client's time to first byte is the time to first token
                    yield chunk(P.DeltaMessage(role="assistant", content=""))
                    first = False
                if isinstance(ev, Delta):
                    if ev.text:
                        yield chunk(P.DeltaMessage(content=ev.text))
                else:
                    yield chunk(P.DeltaMessage(), ev.finish_reason)
                    if include_usage:
                        yield chunk(P.DeltaMessage(), use=usage(ev), choices=False)
        except Cancelled:
            return
        except Exception as exc:  # noqa: BLE001 - the status line is gone; the error goes in the stream
            yield sse(P.ErrorResponse(error=_info(as_api_error(exc))))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: P.CompletionRequest = await read_body(request, P.CompletionRequest)
        check_model(state, req.model)
        check_supported(req)
        for name, bad in (("echo", req.echo), ("suffix", req.suffix is not None),
                          ("best_of", req.best_of not in (None, 1))):
            if bad:
                raise ApiError(400, f"{name} is not supported; omit it", param=name, code="unsupported_value")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"got {len(prompts)} prompts; send one prompt per request", param="prompt")
        if len(req.images) != 1:
            raise ApiError(400, f"got {len(req.images)} images; PaliGemma answers about exactly one", param="images",
                           code="too_many_images")
        run, _ = await start((prompts[0], req.images[0], sampling(req, req.max_tokens)))
        rid, created, name = P.new_id("cmpl"), P.now(), config.served_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(completion_stream(run, request, rid, created, name, include_usage),
                                     media_type="text/event-stream")
        f = await run.result(request)
        return P.Completion(id=rid, created=created, model=name, usage=usage(f), choices=[
            P.CompletionChoice(text=f.text, finish_reason=f.finish_reason)]).model_dump()

    async def completion_stream(run: Run, request: Request, rid: str, created: int, name: str, include_usage: bool):
        def chunk(text: str, finish=None, use=None, choices=True) -> str:
            ch = [P.CompletionChoice(text=text, finish_reason=finish)] if choices else []
            return sse(P.Completion(id=rid, created=created, model=name, choices=ch, usage=use))

        try:
            async for ev in run.events(request):
                if isinstance(ev, Delta):
                    yield chunk(ev.text)  # the first may be empty: it marks the first token
                else:
                    yield chunk("", ev.finish_reason)
                    if include_usage:
                        yield chunk("", use=usage(ev), choices=False)
        except Cancelled:
            return
        except Exception as exc:  # noqa: BLE001
            yield sse(P.ErrorResponse(error=_info(as_api_error(exc))))
        yield "data: [DONE]\n\n"

    @app.post("/v1/tasks/{task}")
    async def tasks(task: str, request: Request):
        from ..tasks import TASKS

        if task not in TASKS:
            raise ApiError(404, f"unknown task {task!r}; one of {', '.join(TASKS)}", "not_found_error", "task")
        req: P.TaskRequest = await read_body(request, P.TaskRequest)
        check_model(state, req.model)
        t = TASKS[task]
        if t.input == "objects" and not req.objects:
            raise ApiError(400, f"task {task} needs objects, e.g. \"objects\": [\"car\", \"dog\"]", param="objects")
        if t.input == "text" and not (req.question or "").strip():
            raise ApiError(400, f"task {task} needs a question", param="question")
        params = SamplingParams(max_tokens=req.max_tokens if req.max_tokens is not None else None)
        run, prepared = await start((req.question or "", req.image, params),
                                    {"task_name": task, "objects": req.objects, "lang": req.lang})
        f = await run.result(request)
        out = task_json(prepared, f)
        out["usage"] = usage(f).model_dump()
        out["finish_reason"] = f.finish_reason
        return out


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _info(e: ApiError) -> P.ErrorInfo:
    return P.ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code)
