"""The errors asyncnn raises, each naming what went wrong and where."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorError",
    "GraphError",
    "RemoteError",
    "StallError",
    "TraceFormatError",
    "TraceWriteError",
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


class TraceWriteError(OSError, RuntimeError):
    """Writing a run's trace file failed: the disk refused it (a full disk). The message names
    the trace and what to do; the disk's ``OSError`` is ``__cause__``.

    An ``OSError`` (a file the disk refused, as ``Trainer.save``'s is) and a ``RuntimeError``
    (what it was raised as before it had its own class), so that code catching either still
    does.

    Attributes:
        errno: the disk's (``errno.ENOSPC`` for a full disk), or None where it gave none.
        strerror: the system's words for it ("No space left on device"), or None.
        filename: the trace file.
    """

    def __init__(
        self,
        message: str,
        filename: str,
        errno: int | None = None,
        strerror: str | None = None,
    ) -> None:
        super().__init__(errno, strerror, filename)
        self.message = message
        self.args = (message,)  # (its repr, and a worker's report of it, give the message)

    def __str__(self) -> str:
        # (OSError's own would say "[Errno 28] No space left on device: 'PATH'", losing the
        # message that says what was lost and what to do)
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # (OSError's would rebuild it from (errno, strerror, filename), another signature)
        return type(self), (self.message, self.filename, self.errno, self.strerror)


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
    """The original failure inside a worker process: the ``__cause__`` of the
    :class:`ActorError` the driver raises. Where the driver can name the original exception's
    class (a built-in one, asyncnn's, or one of a module the driver has imported), the cause is
    an exception of that class rebuilt from its message, and a ``RemoteError`` too (its own
    attributes, beyond the message, do not travel); otherwise a plain ``RemoteError`` whose
    message is the original's class and message. ``traceback`` holds the worker's traceback,
    as text."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


#: the class of each original exception class rebuilt in the driver, once made
_REMOTE_CLASSES: dict[type[BaseException], type[RemoteError]] = {}


def _remote_str(self: RemoteError) -> str:
    # the message as the worker's str() gave it (a KeyError's or an OSError's own __str__
    # would quote or format it again)
    return str(self.args[0]) if self.args else ""


def remote_error(
    message: str, traceback: str, original: type[BaseException] | None, fallback: str = ""
) -> RemoteError:
    """A worker's failure in the driver: an exception of the ``original`` class (which the
    worker's ``str()`` gave ``message``) that is also a :class:`RemoteError` holding
    ``traceback``; a plain ``RemoteError`` of ``fallback`` (else ``message``) where there is no
    such class, or one that cannot be rebuilt without running its own code (its ``__init__`` is
    not called; a class whose ``__new__``, metaclass or ``__init_subclass__`` refuses, and any
    that is not an ``Exception``: ``KeyboardInterrupt``, an exception group, stay text).
    """
    cls = _remote_class(original)
    if cls is not None:
        try:
            err = cls.__new__(cls, message)
            BaseException.__init__(err, message)
        except Exception:  # noqa: BLE001 - a __new__ of its own: a plain RemoteError
            pass
        else:
            err.traceback = traceback
            return err
    return RemoteError(fallback or message, traceback)


def _remote_class(original: type[BaseException] | None) -> type[RemoteError] | None:
    """The class of :func:`remote_error` for ``original`` (made once), or None."""
    if (
        original is None
        or not issubclass(original, Exception)
        or issubclass(original, (RemoteError, BaseExceptionGroup))
    ):
        return None
    cls = _REMOTE_CLASSES.get(original)
    if cls is not None:
        return cls

    def __reduce__(self: RemoteError) -> tuple[Any, ...]:
        # (pickle would look the class up by its name and find the original, another class)
        return remote_error, (_remote_str(self), self.traceback, original)

    try:
        cls = type(
            original.__name__,
            (original, RemoteError),
            {
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                "__str__": _remote_str,
                "__reduce__": __reduce__,
            },
        )
    except Exception:  # noqa: BLE001 - a layout, metaclass or __init_subclass__ of its own
        return None
    if len(_REMOTE_CLASSES) < 256:
        _REMOTE_CLASSES[original] = cls
    return cls
