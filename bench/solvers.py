"""Solver benchmark: ``python bench/solvers.py [--out out] [--quick] ...``.

The same as ``steerdiff bench solvers ...`` (the logic lives in :mod:`steerdiff.bench.solvers`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "solvers", *sys.argv[1:]]))
