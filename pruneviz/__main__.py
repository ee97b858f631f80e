"""``python -m pruneviz``: the command line (see :mod:`pruneviz.cli`).

The threading policy (:mod:`pruneviz.threads`) is applied first, before anything imports torch."""
from .threads import apply_env

apply_env()

import sys  # noqa: E402

from .cli import main  # noqa: E402
from .threads import configure  # noqa: E402

configure()
sys.exit(main())
