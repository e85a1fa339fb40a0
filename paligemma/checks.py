"""Checks shared by every boundary: files that must be regular, JSON files, numbers, integers, text.

Each check raises the error class its caller names (`CheckpointError` for files of a checkpoint,
`InputError` for the caller's arguments) with a message naming the source, the field, the value and
what is expected. Files are refused before they are opened when they are not regular files (a FIFO
would block a reader forever; a device or a directory is never a checkpoint file), and JSON files are
read only up to a size no real config reaches.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import stat
from pathlib import Path
from typing import Any

from .errors import CheckpointError, PaliGemmaError

MAX_JSON_BYTES = 64 * 2**20  # the largest tokenizer.json published is ~35 MB; configs are a few KB


def regular_file(path: str | os.PathLike, what: str = "file", error: type[PaliGemmaError] = CheckpointError,
                 hint: str = "") -> os.stat_result:
    """stat() of `path` after checking it is a regular file (symlinks followed), before anything opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist" + (f"; {hint}" if hint else "")) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what} {path} is a symlink loop; point it at a real file") from None
        raise error(f"cannot access {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a directory, expected a file" + (f"; {hint}" if hint else ""))
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise error(f"{what} {path} is {kind}, not a regular file; pass a regular file")
    return st


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for an existing regular file (a symlink to one included); never blocks, never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_text_file(path: str | os.PathLike, what: str = "file", error: type[PaliGemmaError] = CheckpointError,
                   max_bytes: int = MAX_JSON_BYTES, hint: str = "") -> str:
    """The UTF-8 text of a regular file of at most `max_bytes`; errors name the file (and the bad byte)."""
    st = regular_file(path, what, error, hint)
    if st.st_size > max_bytes:
        raise error(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} expected of it")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{what} {path} is not valid UTF-8 (byte {e.start}, line {line}); re-copy it") from None


def read_json_file(path: str | os.PathLike, hint: str = "", what: str | None = None,
                   error: type[PaliGemmaError] = CheckpointError) -> Any:
    """Parse a JSON file (regular, bounded, UTF-8); errors name the file, the line and what is wrong."""
    what = what or Path(path).name
    text = read_text_file(path, what, error, hint=hint)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); re-copy it") from None
    except ValueError as e:  # NaN / Infinity literals
        raise error(f"{path}: {e}") from None
    except RecursionError:
        raise error(f"{path} nests JSON too deeply to be a config file") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; write a finite number")


def whole_number(where: str, value: Any, lo: int, hi: int, error: type[PaliGemmaError] = CheckpointError) -> int:
    """`value` as an int in [lo, hi]; booleans, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{where}={value!r} ({type(value).__name__}); expected a whole number in [{lo}, {hi}]")
    if not lo <= value <= hi:
        raise error(f"{where}={value}; expected a whole number in [{lo}, {hi}]")
    return int(value)


def finite_number(where: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                  error: type[PaliGemmaError] = CheckpointError) -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] with `lo_open`); booleans and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{where}={value!r} ({type(value).__name__}); expected a number")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise error(f"{where}={value!r}; expected a finite number")
    if x < lo or x > hi or (lo_open and x == lo):
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        bound = low if hi == math.inf else f"{low} and <= {hi:g}"
        raise error(f"{where}={value!r}; expected a number {bound}")
    return x


def valid_text(where: str, value: str, error: type[Exception]) -> str:
    """`value` when it encodes to UTF-8; lone surrogates (from bad bytes or JSON escapes) are refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{where} holds invalid Unicode ({value[e.start]!r} at character {e.start}: "
                    "a lone surrogate); pass valid UTF-8 text") from None
    return value
