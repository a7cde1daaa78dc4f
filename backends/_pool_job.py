"""A CPU task of the :class:`~asyncnn.backends.DevicePool` as the team's worker runs it (in the
caller's context, its result or error kept for the awaiting task, skipped when its caller was
cancelled before it started), and the non-blocking "run this on the loop thread" through which
the worker then wakes that task's event loop (:func:`_notify`). Apart from ``_pool.py``, the
pool's counters and lifetime, because these are the hand-over between one worker thread and one
event loop.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import anyio

__all__ = ["_Job", "_call_soon_threadsafe", "_notify"]


class _Job:
    """A CPU task of the pool; a worker calls it (the team's queue holds it, so that the pool
    can tell a cancelled caller's queued job from a live one)."""

    __slots__ = (
        "fn", "args", "context", "done", "result", "error", "abandoned", "skipped", "finished"
    )  # fmt: skip

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        # The caller's context, as inline work and the team's split parts see it (numpy's error
        # state is a context variable): without it, np.errstate(divide="raise") raised inline
        # and returned -inf on a worker. A copy (O(1)), so the task's own changes stay its own.
        self.context = contextvars.copy_context()
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.skipped = False  # abandoned before it started: never run
        self.finished = False  # the worker is done with it (run or skipped); under the lock

    def __call__(self) -> None:
        """On a worker: the result or error is kept for the awaiting task."""
        if self.abandoned:  # a cancelled caller's job that has not started is skipped
            self.skipped = True
            return
        try:
            self.result = self.context.run(self.fn, *self.args)
        except BaseException as exc:  # handed to the awaiting task, with its traceback
            self.error = exc


def _call_soon_threadsafe(native_token: Any) -> Callable[[Callable[[], object]], None]:
    """A non-blocking 'run this on the loop thread' for the running event loop."""
    if hasattr(native_token, "run_sync_soon"):  # a trio.lowlevel.TrioToken
        return native_token.run_sync_soon
    if hasattr(native_token, "call_soon_threadsafe"):  # an asyncio event loop
        return native_token.call_soon_threadsafe
    raise RuntimeError(f"unsupported event loop token {native_token!r}")  # pragma: no cover


def _notify(call_soon: Callable[[Callable[[], object]], None], fn: Callable[[], object]) -> None:
    """``fn`` run soon on the loop of ``call_soon``, or nothing where that loop is gone."""
    try:
        call_soon(fn)
    except RuntimeError:
        # The loop is gone (the pool was never closed, and its run ended): nobody is waiting.
        pass
