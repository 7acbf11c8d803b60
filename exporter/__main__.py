"""`python -m exporter`: the same as the `jobstats-exporter` command."""

import sys

from .cli import main

sys.exit(main())
