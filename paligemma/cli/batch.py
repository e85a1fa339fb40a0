"""`paligemma batch`: label a folder, a JSONL or a Parquet file into a resumable JSONL / Parquet output.

    paligemma batch --input photos/ --output labels.jsonl --task detect --objects "car ; person"
    paligemma batch --model DIR --input data.parquet --output out.parquet --engine ray --concurrency 4

`main(argv, prog) -> int` raises `UsageError` / `PaliGemmaError` for the dispatcher (cli/__init__.py) to
print as one `error:` line. The work is `paligemma.batch.run_batch`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..batch.labeller import PromptSpec
from ..batch.runner import check_default_prompt, run_batch
from ..batch.sources import Columns
from ..errors import InputError
from ..tasks import TASKS
from .common import non_negative_float
from .common import CliParser, UsageError, add_model_flags, check_device, find_vae, model_dir, positive_int


def build_parser(prog: str = "paligemma batch") -> CliParser:
    p = CliParser(prog=prog, description="Label every image of a folder, JSONL or Parquet file; resumable: rerun "
                                         "with the same --output to finish an interrupted run.",
                  epilog="examples:\n"
                         f"  {prog} --input photos/ --output captions.jsonl\n"
                         f"  {prog} --input rows.jsonl --output boxes.parquet --task detect --objects car --format coco\n"
                         f"  {prog} --model DIR --input data.parquet --output out.parquet --engine ray --concurrency 2",
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT layout) applied over --model")
    p.add_argument("--input", required=True, metavar="SRC", help="a folder of images (recursive), a .jsonl or a "
                   ".parquet file")
    p.add_argument("--output", required=True, metavar="DST", help="a .jsonl or .parquet file; rows already in it "
                   "are skipped")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="the prompt for rows that bring none, e.g. 'caption en' (default: caption)")
    what.add_argument("--task", choices=list(TASKS), help="build the default prompt for a task")
    p.add_argument("--objects", help="objects for detect/segment, e.g. 'car ; dog'")
    p.add_argument("--question", help="the question for --task answer (the answer for --task question)")
    p.add_argument("--lang", default="en", help="language code for caption/describe/answer (default en)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N", help="most new tokens per row (default: the "
                   "task's budget, capped to the context)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="rows generated together (default 8)")
    p.add_argument("--vae", metavar="PATH", help="mask decoder weights (vae-oid.npz) for segment rows: masks as "
                   "COCO RLE (default: vae-oid.npz in the model directory, if there)")
    p.add_argument("--format", choices=("coco",), help="also write OUTPUT.coco.json (COCO-style annotations of the "
                   "detect/segment rows)")
    p.add_argument("--image-column", default="image", metavar="NAME", help="image path/bytes key (default image)")
    p.add_argument("--prompt-column", default="prompt", metavar="NAME", help="per-row prompt key (default prompt)")
    p.add_argument("--id-column", default="id", metavar="NAME", help="per-row id key (default id; missing: the "
                   "image path)")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray (Ray Data; "
                   "pip install 'paligemma[ray]')")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to connect to, e.g. ray://head:10001 or auto "
                   "(default: start a local Ray)")
    p.add_argument("--concurrency", type=positive_int, default=1, metavar="N", help="Ray actors, one model each "
                   "(default 1)")
    p.add_argument("--num-cpus", type=non_negative_float, metavar="N", help="CPUs per Ray actor (default: this "
                   "machine's cores / --concurrency)")
    p.add_argument("--num-gpus", type=non_negative_float, default=0, metavar="N", help="GPUs per Ray actor (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "paligemma batch") -> int:
    """`paligemma batch ...`; returns the exit status (0 also when some rows failed: see their `error`)."""
    args = build_parser(prog).parse_args(argv)
    spec = PromptSpec(prompt=args.prompt, task=args.task, objects=args.objects, question=args.question,
                      lang=args.lang)
    task = TASKS.get(args.task or "")
    if task is not None and os.path.isdir(args.input) and task.input is not None:  # a folder has no per-row fields
        flag, example = ("--objects", "'car ; dog'") if task.input == "objects" else ("--question", "'what is it?'")
        if not getattr(args, flag[2:]):
            raise UsageError(f"--task {task.name} needs {flag}, e.g. {flag} {example} (or per-row prompts from a "
                             "JSONL/Parquet input)")
    try:
        check_default_prompt(spec, per_row=not os.path.isdir(args.input))
    except InputError as e:
        raise UsageError(str(e)) from None
    if args.engine == "local" and (args.ray_address or args.concurrency > 1 or args.num_cpus or args.num_gpus):
        raise UsageError("--ray-address/--concurrency/--num-cpus/--num-gpus go with --engine ray")
    directory = model_dir(args.model)
    device = check_device(args.device)
    vae = find_vae(args.vae, directory)
    try:
        summary = run_batch(
            args.input, args.output, str(directory), prompt=args.prompt, task=args.task, objects=args.objects,
            question=args.question, lang=args.lang, batch_size=args.batch_size,
            max_tokens=args.max_tokens, vae=vae, coco=args.format == "coco", progress=not args.no_progress and sys.stderr.isatty(),
            columns=Columns(args.image_column, args.prompt_column, args.id_column), engine=args.engine, dtype=args.dtype,
            device=None if device == "auto" else device, quantize=None if args.quantize == "none" else args.quantize,
            adapter=args.adapter, ray_address=args.ray_address, concurrency=args.concurrency, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    except KeyboardInterrupt:
        print(f"interrupted: the rows finished so far are in {args.output}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(summary, flush=True)
    return 0
