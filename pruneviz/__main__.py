"""``python -m pruneviz``: the command line (see :mod:`pruneviz.cli`)."""
import sys

from .cli import main

sys.exit(main())
