"""`paligemma run` (the default subcommand): generate for one or more images.

The flags follow mlx-vlm's CLI (`--model --image --prompt --max-tokens --temperature --top-p`), plus the
task prompts of `tasks.py` (`--task detect --objects "car ; dog"`), `--json` and `--output` for drawn
boxes and masks. Several images share one prompt and are generated as one left-padded batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from .. import __version__
from ..checks import valid_text
from ..errors import InputError
from ..generation import SamplingConfig
from ..tasks import TASKS, Task, build_prompt, get_task, parse_output
from .common import (CliParser, UsageError, add_model_flags, check_device, find_vae, load_checkpoint,
                     model_dir, positive_int)

FALLBACK_MAX_TOKENS = 64  # a free-form --prompt that names no task


def build_parser(prog: str = "paligemma") -> CliParser:
    tasks = "\n".join(f"  {t.name:9s} {t.template!r:26s} {t.doc}" for t in TASKS.values())
    p = CliParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run PaliGemma on images (subcommand `run`, the default). "
                    "Fine-tune with `paligemma train --help`.",
        epilog=f"tasks (--task):\n{tasks}\n\nexamples:\n"
               f"  {prog} --image cat.png --prompt 'caption en'\n"
               f"  {prog} --model DIR --image a.jpg b.jpg --task detect --objects 'car ; dog' --output boxes.png\n"
               f"  {prog} --image a.jpg --task answer --question 'how many shapes?' --json")
    p.add_argument("images", nargs="*", metavar="IMG", help="image file(s), as with --image")
    p.add_argument("--image", metavar="IMG", nargs="+", action="extend", default=[],
                   help="image file(s); several are batched with the same prompt")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="the prompt as the model sees it, e.g. 'caption en' (default: caption)")
    what.add_argument("--task", choices=list(TASKS), help="build the prompt for a task (see below)")
    p.add_argument("--lang", default="en", help="language code for caption/describe/answer/question (default en)")
    p.add_argument("--question", "--text", dest="text", help="the question (answer) or the answer (question)")
    p.add_argument("--objects", help="objects to detect/segment, separated by ';', e.g. 'car ; dog'")
    p.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="most new tokens (default: the task's budget, capped to the model's context)")
    p.add_argument("--temperature", "--temp", type=float, metavar="T",
                   help="sampling temperature; > 0 turns sampling on (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--do-sample", action="store_true", help="sample (at --temperature, default 1.0)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    add_model_flags(p)
    p.add_argument("--vae", metavar="PATH", help="segmentation mask decoder weights (vae-oid.npz); "
                                                 "default: vae-oid.npz in the model directory")
    p.add_argument("--json", action="store_true", help="print structured results (text, boxes, RLE masks) as JSON")
    p.add_argument("--output", metavar="PATH", help="write the image with boxes/masks drawn (PATH-1.png, "
                                                    "PATH-2.png, ... for several images)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="images generated together (default 8)")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end, not as it is generated")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def make_prompt(args: argparse.Namespace) -> tuple[Task | None, str]:
    """(task used to parse the answer, prompt). A free-form prompt whose first word names a task is parsed
    as that task, so `--prompt 'detect car'` gives boxes too."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        if args.text is not None or args.objects is not None:
            raise UsageError("--question/--objects go with --task; with --prompt write them into the prompt")
        first = args.prompt.split(maxsplit=1)[0]
        return (TASKS.get(first), args.prompt)
    task = get_task(args.task or "caption")
    if task.input == "objects" and not (args.objects and args.objects.strip(" ;")):
        raise UsageError(f"--task {task.name} needs --objects, e.g. --objects 'car ; dog'")
    if task.input == "text" and not (args.text and args.text.strip()):
        flag = "--question" if task.name == "answer" else "--text"
        raise UsageError(f"--task {task.name} needs {flag}, e.g. {flag} 'what is in the image?'")
    try:
        return task, build_prompt(task, lang=args.lang, text=args.text, objects=args.objects)
    except InputError as e:
        raise UsageError(str(e)) from None


def output_paths(output: str | None, n: int) -> list[Path | None]:
    """PATH for one image; PATH-1.ext, PATH-2.ext, ... for several. The format must be one PIL writes."""
    if output is None:
        return [None] * n
    from PIL import Image

    path = Path(output)
    Image.init()
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:  # formats PIL can write
        raise UsageError(f"--output {output}: unknown image format {path.suffix!r}; use .png or .jpg")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n + 1)]


class LineStream:
    """Writes streamed text to `out` without leading or trailing whitespace, so the streamed line equals
    the printed `text.strip()`: trailing whitespace is held back until more text follows."""

    def __init__(self, out: TextIO):
        self.out = out
        self.shown = ""
        self.pending = ""

    def __call__(self, piece: str) -> None:
        text = self.pending + piece
        if not self.shown:
            text = text.lstrip()
        body = text.rstrip()
        self.pending = text[len(body):]
        if body:
            self.out.write(body)
            self.out.flush()
            self.shown += body

    def finish(self, final: str) -> None:
        """Write what the streamer held back (an incomplete character at the end) and end the line."""
        rest = final[len(self.shown):] if final.startswith(self.shown) else "\n" + final
        self.out.write(rest + "\n")
        self.out.flush()


# ------------------------------------------------------------------------------------------ generation
def generate_batch(model, processor, images: Sequence, prompt: str, task: Task | None, *,
                   max_tokens: int | None = None, sampling: SamplingConfig | None = None, vae=None,
                   on_text: Callable[[str], None] | None = None) -> list:
    """One prompt for each image, generated as one batch; returns an `api.TaskResult` per image.
    `on_text` streams the text of a single image as it is produced."""
    from ..api import TaskResult, attach_masks, get_mask_decoder, token_budget
    from ..generation import TextStreamer

    batch = processor(text=[prompt] * len(images), images=list(images)).to(model.device)
    if max_tokens is None:  # the task's budget, capped to what the context leaves
        budget = task.max_new_tokens if task is not None else FALLBACK_MAX_TOKENS
        max_tokens = token_budget(model, batch["input_ids"].shape[1], budget)
    streamer = TextStreamer(processor.decode, on_text) if on_text is not None and len(images) == 1 else None
    sampling = SamplingConfig.of(sampling, max_new_tokens=max_tokens)
    ids = model.generate(**batch, sampling=sampling, streamer=streamer)  # [B, n]
    decoder = None
    if task is not None and task.output == "segmentations" and vae is not None:
        decoder = get_mask_decoder(vae)
    results = []
    for image, text in zip(images, processor.batch_decode(ids)):
        text = text.strip()
        parsed = parse_output(task, text, image.width, image.height) if task is not None else None
        name = task.name if task is not None else None
        if parsed is None:
            results.append(TaskResult(name, prompt, text))
            continue
        if decoder is not None:
            attach_masks(parsed, decoder, image.width, image.height)
        elif task.output == "segmentations" and len(parsed):
            parsed.problems.append("masks not decoded: no VQ-VAE weights (pass --vae vae-oid.npz)")
        results.append(TaskResult(name, prompt, text, parsed.objects, parsed.problems))
    return results


def sampling_options(args: argparse.Namespace) -> SamplingConfig:
    """Greedy unless --do-sample or a --temperature above 0 is given."""
    do_sample = args.do_sample or (args.temperature is not None and args.temperature > 0)
    temperature = 1.0 if args.temperature is None else args.temperature
    try:
        return SamplingConfig(do_sample=do_sample, temperature=temperature, top_p=args.top_p, top_k=args.top_k,
                              seed=args.seed)
    except InputError as e:  # the message names the field; say it with the flag's spelling
        raise UsageError(str(e).replace("top_p", "--top-p").replace("top_k", "--top-k")
                         .replace("temperature", "--temperature")) from None


def main(argv: Sequence[str] | None = None, prog: str = "paligemma") -> int:
    """`paligemma run`: check everything cheap first (flags, images, output path, VAE), then load and generate."""
    from ..api import get_mask_decoder
    from ..draw import annotate, save
    from ..images import load_image

    args = build_parser(prog).parse_args(argv)
    args.image = args.image + args.images
    for flag, value in [("--prompt", args.prompt), ("--question", args.text), ("--objects", args.objects),
                        ("--lang", args.lang)]:
        if value is not None:  # undecodable argv bytes arrive as lone surrogates
            valid_text(f"the {flag} argument", value, UsageError)
    if not args.image:
        raise UsageError("no image given; pass --image IMG (several are batched)")
    task, prompt = make_prompt(args)
    sampling = sampling_options(args)
    outputs = output_paths(args.output, len(args.image))
    directory = model_dir(args.model)
    device = check_device(args.device)
    images = [load_image(p) for p in args.image]
    decoder = None
    if task is not None and task.output == "segmentations":
        vae = find_vae(args.vae, directory)
        if vae is not None or args.prompt is None:  # --task segment needs masks; a free-form prompt may do without
            decoder = get_mask_decoder(vae)  # fails now, before the model loads, saying where to get the file

    model, processor = load_checkpoint(directory, args.dtype, device, args.quantize)
    stream = None
    if len(images) == 1 and not args.json and not args.no_stream:
        stream = LineStream(sys.stdout)
    rows = []
    for lo in range(0, len(images), args.batch_size):  # results are printed batch by batch
        part = slice(lo, lo + args.batch_size)
        results = generate_batch(model, processor, images[part], prompt, task, max_tokens=args.max_tokens,
                                 sampling=sampling, vae=decoder, on_text=stream)
        for path, image, result, out in zip(args.image[part], images[part], results, outputs[part]):
            if out is not None:
                try:
                    save(annotate(image, result.objects or []), out)
                except OSError as e:
                    raise InputError(f"cannot write --output {out}: {e.strerror or e}") from None
            if args.json:
                rows.append({"image": str(path), **result.to_json(), "output": None if out is None else str(out)})
            else:
                report(result, f"{path}: " if len(images) > 1 else "", stream)
    if args.json:
        doc = {"model": str(directory), "task": task.name if task else None, "prompt": prompt, "results": rows}
        print(json.dumps(doc, ensure_ascii=False))
    return 0


def report(result, prefix: str = "", stream: LineStream | None = None) -> None:
    """The answer on stdout (ending the streamed line); parsed objects and parse problems on stderr."""
    if stream is not None:
        stream.finish(result.text)
    else:
        print(prefix + result.text, flush=True)
    for obj in result.objects or []:
        mask = "" if obj.mask is None else f", mask {int(obj.mask.sum())} px"
        box = ", ".join(f"{v:.1f}" for v in obj.box)
        print(f"{prefix}{obj.label or '?'}: box [{box}]{mask}", file=sys.stderr)
    for problem in result.problems:
        print(f"warning: {prefix}{problem}", file=sys.stderr)


