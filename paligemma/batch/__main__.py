"""`python -m paligemma.batch ...`: the `batch` subcommand with the CLI's error handling (one `error:` line)."""

import sys

from .cli import run_cli

sys.exit(run_cli())
