"""Benchmark: ``python bench/steer.py [--out out] [--quick] ...``.

The same as ``steerdiff bench steer ...`` (the logic lives in :mod:`steerdiff.bench.steer`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "steer", *sys.argv[1:]]))
