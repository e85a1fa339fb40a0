"""Request and response bodies of the OpenAI-compatible server, as pydantic models (vLLM's protocol file idea).

Requests follow the OpenAI schema for chat completions and completions; fields this server cannot honour
are either absent (unknown fields are refused: `extra="forbid"`, so nothing is silently ignored) or checked
for their neutral value. Extensions: `paligemma` (a task whose parsed result comes back as JSON) on chat,
`images` on completions. See docs/SERVING.md for how messages become a PaliGemma prompt.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TASK_NAMES = ("caption", "describe", "ocr", "answer", "question", "detect", "segment")
MAX_STOP = 4  # as OpenAI


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- requests
class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; PaliGemma sees one fixed resolution


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class TaskOptions(Strict):
    """Extension: run a PaliGemma task; the message text is its argument (objects or question)."""

    task: Literal["caption", "describe", "ocr", "answer", "question", "detect", "segment"]
    lang: str = "en"


class SamplingFields(Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # extension, as vLLM
    ignore_eos: bool = False  # extension, as vLLM: generate max_tokens tokens whatever the model says
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs; not used
    # OpenAI fields accepted only at their neutral value (checked in `unsupported`)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a field set to something this server cannot do, else None."""
        if self.n != 1:
            return "n", f"n={self.n}: this server returns one choice per request; send n=1 (or omit it)"
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported; omit it or send 0"
        if self.logprobs not in (None, False, 0):
            return "logprobs", "logprobs are not supported; omit logprobs"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported; omit it"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options goes with stream=true"
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    paligemma: TaskOptions | None = None  # extension

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    images: list[str] = Field(min_length=1)  # extension: one image (data: URI, http(s) URL or file:// URL)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TaskRequest(Strict):
    """POST /v1/tasks/{task}: one image and the task's argument."""

    model: str | None = None
    image: str  # data: URI, http(s) URL (when allowed) or file:// URL (when allowed)
    objects: str | list[str] | None = None  # detect, segment
    question: str | None = None  # answer, question
    lang: str = "en"
    max_tokens: int | None = Field(default=None, ge=1)


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    image_tokens: int = 0  # extension: the image's share of prompt_tokens
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    paligemma: dict[str, Any] | None = None  # extension: the parsed task result


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "paligemma"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """An error answered as-is: status, message, OpenAI type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers
