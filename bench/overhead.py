"""Sampler overhead benchmark: ``python bench/overhead.py [--device cuda] [--shape 256x64] ...``.

The same as ``steerdiff bench overhead ...`` (the logic lives in :mod:`steerdiff.bench.overhead`).
"""

import sys

from steerdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "overhead", *sys.argv[1:]]))
