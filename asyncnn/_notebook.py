"""Synchronous calls inside a running event loop (a Jupyter notebook, an async server).

``Trainer.fit`` and ``replay`` start their own trio loop; Python allows one running loop per
thread, so where one already runs (a notebook's asyncio loop) they run on a worker thread of
their own and the caller waits for them. Ctrl-C (a notebook's "interrupt kernel") while waiting
asks the call to stop at its next step and then raises ``KeyboardInterrupt`` as it would have.
The modules trusted around the call (``asyncnn.trace.trusted_modules(...)``, a context variable)
are trusted on the worker thread too. (Not the whole context: the caller's would tell the event
loop started there that one runs already.)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ._math._imports import trusted_modules, trusted_now

__all__ = ["in_event_loop", "replay", "run_outside_loop"]

T = TypeVar("T")


def in_event_loop() -> bool:
    """Whether this thread is running an asyncio or trio event loop right now."""
    import asyncio

    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    import trio

    try:
        trio.lowlevel.current_trio_token()
        return True
    except RuntimeError:
        return False


def run_outside_loop(fn: Callable[[], T], on_interrupt: Callable[[], None] | None = None) -> T:
    """``fn()`` here, or on a worker thread when this thread runs an event loop.

    Args:
        fn: the call; it may start its own event loop. On a worker thread it runs with the
            modules trusted here (the rest of this thread's context would say that an event
            loop runs already).
        on_interrupt: called when ``KeyboardInterrupt`` reaches the waiting thread, to ask
            ``fn`` to stop soon; the interrupt is raised once ``fn`` has returned or failed.
    """
    if not in_event_loop():
        return fn()
    result: list[T] = []
    error: list[BaseException] = []
    trusted = trusted_now()  # a new thread starts in an empty context

    def target() -> None:
        try:
            with trusted_modules(trusted or None):
                result.append(fn())
        except BaseException as exc:  # handed to the waiting thread
            error.append(exc)

    worker = threading.Thread(target=target, name="asyncnn-call", daemon=True)
    worker.start()
    interrupted = False
    while True:
        # the interrupt lands at whatever this thread runs, the loop's own test included: all
        # of the wait is inside the try, or a Ctrl-C there would leave ``fn`` running unasked
        try:
            while worker.is_alive():
                worker.join(0.1)
            break
        except KeyboardInterrupt:
            interrupted = True
            if on_interrupt is not None:
                on_interrupt()
    if error:
        raise error[0]
    if interrupted:
        raise KeyboardInterrupt
    return result[0]


def _wrap_replay() -> Callable[..., Any]:
    from ._tracing._replay import replay as inner

    @functools.wraps(inner)
    def replay(*args: Any, **kwargs: Any) -> Any:
        return run_outside_loop(lambda: inner(*args, **kwargs))

    replay.__doc__ = (inner.__doc__ or "") + (
        "\n\n    Inside a running event loop (a notebook) the replay runs on a worker thread and "
        "this call waits for it.\n"
    )
    return replay


replay = _wrap_replay()
