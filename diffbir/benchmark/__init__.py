"""The benchmark: times and counts each part of a restoration with random weights
(:mod:`.parts`), the startup of a fresh process (:mod:`.startup`), and prints the table
(:mod:`.cli`, ``python scripts/benchmark.py``)."""
