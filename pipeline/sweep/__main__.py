"""``python -m pipeline.sweep``: the per-run process and the study runner without the CLI."""

import sys

from pipeline.sweep.command import main

if __name__ == "__main__":
    sys.exit(main())
