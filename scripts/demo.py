"""Serve the DiffBIR web demo; see ``python scripts/demo.py --help`` (= ``diffbir-demo``)."""

import sys

from diffbir.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
