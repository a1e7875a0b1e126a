"""Download the official weight files; see ``--help`` (= ``diffbir-download``)."""

import sys

from diffbir.weights import main

if __name__ == "__main__":
    sys.exit(main())
