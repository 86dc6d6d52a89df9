"""Long-step benchmark: ``python bench/longstep.py [--out out] [--quick] ...``.

The same as ``steerdiff bench longstep ...`` (the logic lives in :mod:`steerdiff.bench.longstep`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "longstep", *sys.argv[1:]]))
