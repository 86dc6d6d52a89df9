"""Guided-solver benchmark: ``python bench/guided.py [--out out] [--quick] ...``.

The same as ``steerdiff bench guided ...`` (the logic lives in :mod:`steerdiff.bench.guided`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "guided", *sys.argv[1:]]))
