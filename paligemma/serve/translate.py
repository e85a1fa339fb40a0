"""How OpenAI-shaped requests become engine inputs, and engine results OpenAI-shaped answers.

The chat mapping of docs/SERVING.md lives here (`chat_prompt`: the last user message's text and its one
image; system messages, earlier turns and extra images refused with a 400 that says why), with the sampling
fields (`sampling`), the usage block (`usage`) and the parsed task results (`task_result_json`).
"""

from __future__ import annotations

from . import protocol as P
from .engine import Finished, SamplingParams
from .protocol import ApiError


def check_supported(req: P.SamplingFields) -> None:
    found = req.unsupported()
    if found is not None:
        raise ApiError(400, found[1], param=found[0], code="unsupported_value")


def sampling(req: P.SamplingFields, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature or 0.0,
                          top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                          stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos)


def message_text(m: P.Message) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    return " ".join(p.text for p in m.content if isinstance(p, P.TextPart))


def chat_prompt(req: P.ChatCompletionRequest) -> tuple[str, str]:
    """(prompt text, image URL) from the messages; the mapping of docs/SERVING.md, 400 for what it refuses."""
    msgs = req.messages
    for i, m in enumerate(msgs[:-1]):
        if m.role in ("system", "developer"):
            if message_text(m).strip():
                raise ApiError(400, f"messages[{i}] is a {m.role} message: PaliGemma has no system prompt; put the "
                               "instruction into the user message (e.g. 'caption en')", param=f"messages[{i}]",
                               code="unsupported_message")
        else:
            raise ApiError(400, f"messages[{i}] is an earlier {m.role} turn: PaliGemma answers one prompt about one "
                           "image, with no conversation history; send only the last user message",
                           param=f"messages[{i}]", code="unsupported_message")
    last = msgs[-1]
    if last.role != "user":
        raise ApiError(400, f"the last message is from the {last.role}; it must be the user's prompt",
                       param=f"messages[{len(msgs) - 1}]")
    images = [p.image_url.url for p in (last.content if isinstance(last.content, list) else [])
              if isinstance(p, P.ImagePart)]
    if not images:
        raise ApiError(400, "the user message has no image; PaliGemma needs exactly one image_url part",
                       param=f"messages[{len(msgs) - 1}].content", code="missing_image")
    if len(images) > 1:
        raise ApiError(400, f"the user message has {len(images)} images; PaliGemma answers about exactly one",
                       param=f"messages[{len(msgs) - 1}].content", code="too_many_images")
    return message_text(last), images[0]


def usage(f: Finished) -> P.Usage:
    return P.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                   total_tokens=f.prompt_tokens + f.completion_tokens,
                   prompt_tokens_details=P.PromptTokensDetails(image_tokens=f.image_tokens))


def task_result_json(task, prompt: str, text: str, image, mask_decoder=None) -> dict:
    """The parsed answer of a task: labels, boxes in `image`'s pixels, masks as COCO RLE (with a decoder),
    the raw text and the parser's problems (`api.TaskResult.to_json`)."""
    from ..api import TaskResult, attach_masks
    from ..tasks import parse_output

    text = text.strip()
    parsed = parse_output(task, text, image.width, image.height)
    if parsed is None:
        return TaskResult(task.name, prompt, text).to_json()
    if mask_decoder is not None and task.output == "segmentations":
        attach_masks(parsed, mask_decoder, image.width, image.height)
    return TaskResult(task.name, prompt, text, parsed.objects, parsed.problems).to_json()
