"""`python -m rljax <command> ...`: the `rljax` command line (`rljax.cli`)."""

import sys

from rljax.cli import main

sys.exit(main())
