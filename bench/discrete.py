"""Masked diffusion benchmark: ``python bench/discrete.py [--out out] [--quick] ...``.

The same as ``steerdiff bench discrete ...`` (the logic lives in :mod:`steerdiff.bench.discrete`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "discrete", *sys.argv[1:]]))
