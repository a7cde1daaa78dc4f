"""The errors asyncnn raises, each naming what went wrong and where."""

from __future__ import annotations

__all__ = ["ActorError", "GraphError", "StallError", "TraceFormatError"]


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
