"""``python -m asyncnn``: the same as the ``asyncnn`` command."""

import sys

from ._cli import main

sys.exit(main())
