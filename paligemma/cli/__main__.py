"""`python -m paligemma.cli ...`: the `paligemma` command."""

import sys

from . import main

sys.exit(main())
