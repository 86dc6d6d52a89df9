"""Benchmark: ``python bench/distributed.py [--out out] [--quick] ...``.

The same as ``steerdiff bench distributed ...`` (the logic lives in :mod:`steerdiff.bench.distributed`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "distributed", *sys.argv[1:]]))
