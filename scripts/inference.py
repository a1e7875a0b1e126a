"""Restore images with DiffBIR; see ``python scripts/inference.py --help`` (= ``diffbir-infer``)."""

import sys

from diffbir.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
