"""Benchmark: ``python bench/posterior.py [--out out] [--quick] ...``.

The same as ``steerdiff bench posterior ...`` (the logic lives in :mod:`steerdiff.bench.posterior`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "posterior", *sys.argv[1:]]))
