"""``python -m steerdiff``: the ``steerdiff`` command line where its console script is not on the path."""

import sys

from .cli import main

sys.exit(main())
