"""The errors asyncnn raises, each naming what went wrong and where."""

from __future__ import annotations

__all__ = [
    "ActorError",
    "GraphError",
    "RemoteError",
    "StallError",
    "TraceFormatError",
    "WorkerError",
]


class GraphError(ValueError):
    """A graph is wired wrongly: unknown inputs, duplicate names, cycles, shape mismatches.

    Raised when the graph is built or validated, before any training compute.
    """


class ActorError(RuntimeError):
    """An actor failed while processing a message; the original exception is ``__cause__``.

    Attributes:
        actor: the name of the node whose actor failed.
        kind: the kind of message it was processing (``"forward"``, ``"backward"``, ...).
        key: the key (unit of work) of that message.
    """

    def __init__(self, actor: str, kind: str, key: int | None, message: str) -> None:
        super().__init__(message)
        self.actor = actor
        self.kind = kind
        self.key = key


class StallError(RuntimeError):
    """No progress for longer than the stall timeout while keys were in flight.

    The message lists what every actor was waiting for at that moment.
    """


class TraceFormatError(ValueError):
    """A trace file is damaged or not a trace; the message says where."""


class WorkerError(RuntimeError):
    """A worker process of a cluster died, hung, broke the protocol or could not start.

    Attributes:
        worker: the worker's index.
        actors: the nodes it hosted.
    """

    def __init__(self, worker: int, actors: list[str], message: str) -> None:
        super().__init__(message)
        self.worker = worker
        self.actors = actors


class RemoteError(RuntimeError):
    """The original failure inside a worker process, as text (it cannot travel as an object):
    the ``__cause__`` of the :class:`ActorError` the driver raises. ``traceback`` holds the
    worker's traceback."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback
