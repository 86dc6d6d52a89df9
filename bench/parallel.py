"""Benchmark: ``python bench/parallel.py [--out out] [--quick] ...``.

The same as ``steerdiff bench parallel ...`` (the logic lives in :mod:`steerdiff.bench.parallel`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "parallel", *sys.argv[1:]]))
