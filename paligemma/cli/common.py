"""What every `paligemma` subcommand shares: the argparse that raises instead of exiting, flag types,
the checkpoint directory, device checks and the loading line.

Errors: a `UsageError` (a command-line mistake) exits 2 with one `error:` line; a `PaliGemmaError`
(anything the package refuses on purpose) exits 1 with one `error:` line; see `cli/__init__.py`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from .. import SHAPES_TINY
from ..errors import InputError

DEFAULT_MODEL = SHAPES_TINY
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


def quantize_formats() -> tuple[str, ...]:
    """Weight formats `paligemma.load(quantize=...)` accepts."""
    from ..cpu.formats import FORMATS

    return tuple(FORMATS)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --quantize: how to load the checkpoint (shared by run, serve, batch)."""
    p.add_argument("--model", metavar="DIR", help=f"checkpoint directory in the hub layout (default: the shipped "
                                                  f"model {DEFAULT_MODEL.name})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights/activations dtype (default: float32 on CPU, bfloat16 on CUDA/MPS)")
    p.add_argument("--quantize", choices=("auto", "none", *quantize_formats()), default="auto",
                   help="CPU weight format: int8 (~1/4 of fp32 memory), bf16, fp32; none = plain modules "
                        "(transformers' exact computation); auto (default) = bf16 for a bf16 checkpoint "
                        "on CPU, else none")


# ------------------------------------------------------------------------------------ checks and setup
def model_dir(arg: str | None) -> Path:
    """The checkpoint directory to load; the shipped model when --model is not given."""
    if arg is not None:
        try:
            shipped = Path(arg).expanduser().resolve() == DEFAULT_MODEL
        except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
            raise InputError(f"--model {arg} is a symlink loop; point it at a checkpoint directory") from None
    if arg is not None and not shipped:
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
                         "`python -m paligemma.shapes.recipe`); pass a checkpoint directory with --model DIR "
                         "(run_inference.py: --model_path DIR)")
    return DEFAULT_MODEL


def check_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return name


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
    """`paligemma.load` (with a LoRA `adapter` directory when given) with one stderr line "loading DIR (N.N GB)...
    done in X.X s" when stderr is a terminal or the checkpoint is large."""
    from ..loading import load

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




def one_line(message: object) -> str:
    return " ".join(str(message).split()) or type(message).__name__


def finite_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value}")
    return x


def positive_float(value: str) -> float:
    x = finite_float(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return x


def non_negative_float(value: str) -> float:
    """A finite number that may be 0 (durations, GPUs per actor)."""
    x = finite_float(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return x
