"""The `paligemma` command: one module per subcommand, each a plain `main(argv) -> int` (litgpt's layout).

    paligemma [run] --image IMG --prompt "caption en"     generate (run.py; the default subcommand)
    paligemma train --data train.jsonl ...               fine-tune (train.py)
    paligemma demo                                       the shipped model on a sample scene (demo.py)
    paligemma serve [--model DIR] [--port 8000]          OpenAI-compatible HTTP server (serve.py)
    paligemma batch --input DIR --output out.jsonl       label a folder / dataset, resumable (batch.py)

Bad input ends in one `error: ...` line on stderr and exit status 2 (usage) or 1 (anything else the
package raises on purpose, `PaliGemmaError`); real bugs keep their traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from ..errors import PaliGemmaError
from .common import DEFAULT_MODEL, CliParser, UsageError, one_line, positive_int

__all__ = ["COMMANDS", "DEFAULT_MODEL", "CliParser", "UsageError", "main", "positive_int"]

# subcommand -> module under paligemma.cli with `main(argv, prog) -> int`; imported when used
COMMANDS = {"run": "run", "train": "train", "demo": "demo", "serve": "serve", "batch": "batch"}


def _command(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}").main


def main(argv: Sequence[str] | None = None, prog: str = "paligemma") -> int:
    """Entry point of the `paligemma` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):  # a model may emit characters the terminal's encoding lacks
        sys.stdout.reconfigure(errors="replace")
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    sub_prog = prog if name == "run" else f"{prog} {name}"
    try:
        return int(_command(name)(argv, sub_prog) or 0)
    except UsageError as e:
        print(f"error: {one_line(e)} (see `{sub_prog} --help`)", file=sys.stderr)
        return 2
    except PaliGemmaError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `paligemma ... | head`: the reader left; say nothing
        sys.stdout = open(os.devnull, "w")
        return 1
