"""The `paligemma` command: `paligemma [run] --image IMG --prompt "caption en"` and `paligemma train ...`.

Subcommands are plain functions (litgpt's layout): `run` (the default when no subcommand is named)
generates for one or more images, `train` hands its arguments to `paligemma.train.train_main`. The run
flags follow mlx-vlm's CLI (`--model --image --prompt --max-tokens --temperature --top-p`), plus the
task prompts of `tasks.py` (`--task detect --objects "car ; dog"`), `--json` and `--output` for drawn
boxes and masks. Several images share one prompt and are generated as one left-padded batch.

Bad input ends in one `error: ...` line on stderr and exit status 2 (usage) or 1 (anything else the
package raises on purpose, `PaliGemmaError`); real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch

from . import SHAPES_TINY, __version__
from .errors import InputError, PaliGemmaError
from .tasks import TASKS, Task, build_prompt, get_task, parse_output

DEFAULT_MODEL = SHAPES_TINY
FALLBACK_MAX_TOKENS = 64  # a free-form --prompt that names no task
SHOW_PROGRESS_BYTES = 1 << 30  # print the loading line for checkpoints this large even without a TTY


class UsageError(Exception):
    """A command-line mistake: exit status 2."""


class CliParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (one line, caught in `main`) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message)


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _quantize_formats() -> tuple[str, ...]:
    """Weight formats `paligemma.load(quantize=...)` accepts; empty when this build has no quantization."""
    from .loading import load

    if "quantize" not in inspect.signature(load).parameters:
        return ()
    try:
        from .quantize import FORMATS
    except ImportError:
        return ()
    return tuple(FORMATS)


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
    p.add_argument("--model", metavar="DIR", help=f"checkpoint directory in the hub layout (default: the shipped "
                                                  f"model {DEFAULT_MODEL.name})")
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
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights/activations dtype (default: float32 on CPU, bfloat16 on CUDA/MPS)")
    formats = _quantize_formats()
    if formats:
        p.add_argument("--quantize", choices=("auto", "none", *formats), default="auto",
                       help="CPU weight format: int8 (~1/4 of fp32 memory), bf16, fp32; none = plain modules "
                            "(transformers' exact computation); auto (default) = bf16 for a bf16 checkpoint "
                            "on CPU, else none")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT layout: adapter_config.json + "
                                                    "adapter_model.safetensors) applied over --model")
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


# ------------------------------------------------------------------------------------ checks and setup
def model_dir(arg: str | None) -> Path:
    """The checkpoint directory to load; the shipped model when --model is not given."""
    if arg is not None and Path(arg).expanduser().resolve() != DEFAULT_MODEL:
        path = Path(arg).expanduser()
        if not path.exists():
            raise InputError(f"model directory {path} does not exist")
        if not path.is_dir():
            raise InputError(f"--model {path} is a file; pass the checkpoint directory (with config.json)")
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {path} has no config.json; is it a PaliGemma checkpoint?")
        return path
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise InputError(f"the shipped model is not installed at {DEFAULT_MODEL} (build it with "
                         "`python -m paligemma.train_shapes`); pass a checkpoint directory with --model DIR "
                         "(run_inference.py: --model_path DIR)")
    return DEFAULT_MODEL


def check_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return name


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


def find_vae(arg: str | None, directory: Path) -> Path | None:
    if arg is not None:
        return Path(arg).expanduser()
    for name in ("vae-oid.npz", "vae-oid.safetensors"):
        if (directory / name).is_file():
            return directory / name
    return None


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def load_checkpoint(directory: Path, dtype: str | None, device: str, quantize: str | None = None,
                    progress: bool | None = None, adapter: str | None = None):
    """`paligemma.load` with one stderr line "loading DIR (N.N GB)... done in X.X s" when stderr is a
    terminal or the checkpoint is large."""
    from .loading import load

    size = checkpoint_bytes(directory)
    if progress is None:
        progress = size >= SHOW_PROGRESS_BYTES or sys.stderr.isatty()
    if progress:
        shown = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        print(f"loading {directory} ({shown})... ", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    kwargs = {"quantize": None if quantize == "none" else quantize} if quantize else {}
    if adapter is not None:
        kwargs["adapter"] = adapter
    try:
        model, processor = load(directory, dtype=dtype, device=device, **kwargs)
    except BaseException:
        if progress:
            print("failed", file=sys.stderr, flush=True)
        raise
    if progress:
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model, processor


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
                   max_tokens: int | None = None, sampling: dict | None = None, vae=None,
                   on_text: Callable[[str], None] | None = None) -> list:
    """One prompt for each image, generated as one batch; returns an `api.TaskResult` per image.
    `on_text` streams the text of a single image as it is produced."""
    from .api import TaskResult, attach_masks, get_mask_decoder, token_budget
    from .generation import TextStreamer

    batch = processor(text=[prompt] * len(images), images=list(images)).to(model.device)
    if max_tokens is None:  # the task's budget, capped to what the context leaves
        budget = task.max_new_tokens if task is not None else FALLBACK_MAX_TOKENS
        max_tokens = token_budget(model, batch["input_ids"].shape[1], budget)
    streamer = TextStreamer(processor.decode, on_text) if on_text is not None and len(images) == 1 else None
    ids = model.generate(**batch, max_new_tokens=max_tokens, streamer=streamer, **(sampling or {}))  # [B, n]
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


def sampling_options(args: argparse.Namespace) -> dict:
    """Greedy unless --do-sample or a --temperature above 0 is given."""
    temperature = 1.0 if args.temperature is None else args.temperature
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    do_sample = args.do_sample or (args.temperature is not None and args.temperature > 0)
    if not do_sample:
        return {"do_sample": False, "seed": args.seed}
    return {"do_sample": True, "temperature": temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": args.seed}


def run(argv: Sequence[str] | None = None, prog: str = "paligemma") -> int:
    """`paligemma run`: check everything cheap first (flags, images, output path, VAE), then load and generate."""
    from .api import get_mask_decoder
    from .draw import annotate, save
    from .processing_paligemma import load_image

    args = build_parser(prog).parse_args(argv)
    args.image = args.image + args.images
    if not args.image:
        raise UsageError("no image given; pass --image IMG (several are batched)")
    task, prompt = make_prompt(args)
    sampling = sampling_options(args)
    outputs = output_paths(args.output, len(args.image))
    directory = model_dir(args.model)
    device = check_device(args.device)
    if args.adapter is not None:
        from .lora import read_adapter

        read_adapter(args.adapter)  # a wrong directory fails now, before the model loads
    images = [load_image(p) for p in args.image]
    decoder = None
    if task is not None and task.output == "segmentations":
        vae = find_vae(args.vae, directory)
        if vae is not None or args.prompt is None:  # --task segment needs masks; a free-form prompt may do without
            decoder = get_mask_decoder(vae)  # fails now, before the model loads, saying where to get the file

    model, processor = load_checkpoint(directory, args.dtype, device, getattr(args, "quantize", None),
                                       adapter=args.adapter)
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


def train(argv: Sequence[str]) -> int:
    """`paligemma train ...`: fine-tuning, owned by `paligemma.train`."""
    try:
        from .train import train_main
    except ImportError as e:
        raise InputError(f"training is not available in this installation ({e})") from None
    return int(train_main(list(argv)) or 0)


def demo(argv: Sequence[str]) -> int:
    """`paligemma demo`: the shipped model on a sample scene (caption, count, detections drawn)."""
    from .demo import demo_main

    return demo_main(argv)


COMMANDS = {"run": run, "train": train, "demo": demo}


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or type(message).__name__


def main(argv: Sequence[str] | None = None, prog: str = "paligemma") -> int:
    """Entry point of the `paligemma` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):  # a model may emit characters the terminal's encoding lacks
        sys.stdout.reconfigure(errors="replace")
    command = run
    if argv and argv[0] in COMMANDS:
        command = COMMANDS[argv.pop(0)]
    try:
        return command(argv, prog) if command is run else command(argv)
    except UsageError as e:
        print(f"error: {_one_line(e)} (see `{prog} --help`)", file=sys.stderr)
        return 2
    except PaliGemmaError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `paligemma ... | head`: the reader left; say nothing
        sys.stdout = open(os.devnull, "w")
        return 1


if __name__ == "__main__":
    sys.exit(main())
