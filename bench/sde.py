"""Benchmark: ``python bench/sde.py [--out out] [--quick] ...``.

The same as ``steerdiff bench sde ...`` (the logic lives in :mod:`steerdiff.bench.sde`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sde", *sys.argv[1:]]))
