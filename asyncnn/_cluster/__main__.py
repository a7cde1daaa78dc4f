"""``python -m asyncnn._cluster``: the entry point of a worker process (see ``_worker``)."""

from ._worker import main

main()
