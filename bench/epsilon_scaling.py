"""Benchmark: ``python bench/epsilon_scaling.py [--out out] [--quick] ...``.

The same as ``steerdiff bench epsilon ...`` (the logic lives in :mod:`steerdiff.bench.epsilon`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "epsilon", *sys.argv[1:]]))
