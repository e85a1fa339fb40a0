"""`paligemma train ...`: fine-tuning; the flags and the loop live in `paligemma.train`."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str], prog: str = "paligemma train") -> int:
    from ..train import train_main

    return int(train_main(list(argv)) or 0)
