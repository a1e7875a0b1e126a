"""Time and count the DiffBIR pipeline; see ``python scripts/benchmark.py --help``."""

import sys

from diffbir.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
