"""Write a synthetic LQ benchmark from HQ images (see diffbir.data.make_benchmark)."""

from diffbir.data.make_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
