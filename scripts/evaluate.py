"""Score result folders / rebuild the paper's tables (see ``diffbir-eval --help``)."""

import sys

from diffbir.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
