"""The seed's command line, kept flag for flag (the tutorial ran it through `fire`; this is argparse):

    python run_inference.py --model_path DIR --prompt "caption en" --image_file_path IMG \
        --max_tokens_to_generate 100 [--temperature 0.8 --top_p 0.9 --do_sample False --only_cpu False]

Booleans are written `True` / `False` as with fire. `--only_cpu False` uses CUDA or MPS when present.
Everything else is `paligemma run` (paligemma/cli/): the flags are translated and handed to it, so
errors are the same one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from paligemma.cli import DEFAULT_MODEL, CliParser, UsageError, main as cli_main, positive_int

PROG = "python run_inference.py"


def str2bool(value: str) -> bool:
    """fire-style booleans: True/False (also true/false, 1/0, yes/no)."""
    v = value.strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser() -> CliParser:
    p = CliParser(prog=PROG, description="Generate text for one image with PaliGemma (the seed's interface).")
    p.add_argument("--model_path", default=None, help=f"checkpoint directory (default: the shipped "
                                                      f"{DEFAULT_MODEL.name})")
    p.add_argument("--prompt", default="caption en")
    p.add_argument("--image_file_path", required=True, help="the image")
    p.add_argument("--max_tokens_to_generate", type=positive_int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="used with --do_sample True")
    p.add_argument("--top_p", type=float, default=0.9, help="used with --do_sample True")
    p.add_argument("--do_sample", type=str2bool, default=False, metavar="{True,False}")
    p.add_argument("--only_cpu", type=str2bool, default=False, metavar="{True,False}")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    return p


def to_cli_args(args: argparse.Namespace) -> list[str]:
    """The `paligemma run` arguments that do the same thing."""
    argv = ["--image", args.image_file_path, "--prompt", args.prompt,
            "--max-tokens", str(args.max_tokens_to_generate), "--device", "cpu" if args.only_cpu else "auto"]
    if args.model_path is not None:
        argv += ["--model", args.model_path]
    if args.do_sample:
        argv += ["--do-sample", "--temperature", str(args.temperature), "--top-p", str(args.top_p)]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {e} (see `{PROG} --help`)", file=sys.stderr)
        return 2
    return cli_main(to_cli_args(args), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
