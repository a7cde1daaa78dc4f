"""Synchronous calls inside a running event loop (a Jupyter notebook, an async server).

``Trainer.fit`` and ``replay`` start their own trio loop; Python allows one running loop per
thread, so where one already runs (a notebook's asyncio loop) they run on a worker thread of
their own and the caller waits for them. Ctrl-C (a notebook's "interrupt kernel") while waiting
asks the call to stop at its next step, waits until it has stopped, and then raises
``KeyboardInterrupt`` as it would have (or the error the call ended with). Pressed again while
the call stops, Ctrl-C asks again and goes on waiting (saying so on stderr): returning before the
call has stopped would leave it changing the weights after the cell got control back, and a
next ``fit`` could start beside it. A ``replay``, which cannot be asked to stop and changes
none of the caller's state, is left to end on its thread (its ``hook``, if any, still called
until then) and the interrupt raised at once, so that a long replay does not hold the cell.
While it waits on the main thread, Python's own SIGINT handler stands in for the one the loop's
runner installed: ``asyncio.run`` (and ``anyio.run``) only cancel their main task on the first
Ctrl-C, which, blocked in the call, saw nothing until the call had run to its end; trio, told to
raise Ctrl-C at checkpoints only, waits for one that the blocked task never reaches. The
runner's handler is put back once the call has ended.
The modules trusted around the call (``asyncnn.trace.trusted_modules(...)``, a context variable)
are trusted on the worker thread too. (Not the whole context: the caller's would tell the event
loop started there that one runs already.)
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def _interrupts_raised_here() -> Iterator[None]:
    """Python's own SIGINT handler (``KeyboardInterrupt`` raised in the main thread) for the
    block, where this is the main thread and the running loop's runner installed one of its own
    (asyncio's cancels its main task, blocked here; trio's may wait for a checkpoint); the
    runner's is put back after, however the block ends. Elsewhere SIGINT is left as it is: a
    signal's handler runs on the main thread only, and one ignored stays so."""
    previous: Any = None
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            previous = handler
        except ValueError:  # not the main thread (or one that takes no signals): left as it is
            pass
    try:
        yield
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)


def run_outside_loop(fn: Callable[[], T], on_interrupt: Callable[[], None] | None = None) -> T:
    """``fn()`` here, or on a worker thread when this thread runs an event loop.

    Args:
        fn: the call; it may start its own event loop. On a worker thread it runs with the
            modules trusted here (the rest of this thread's context would say that an event
            loop runs already).
        on_interrupt: called each time ``KeyboardInterrupt`` reaches the waiting thread (on
            the main thread Ctrl-C does, whatever SIGINT handler the loop's runner installed),
            to ask ``fn`` to stop soon (so it may be called more than once). The interrupt is
            raised once ``fn`` has returned or failed, never while it still runs: further
            interrupts meanwhile ask again and wait on. If ``fn`` fails, its error is raised
            instead. None: ``fn`` cannot be asked to stop and changes nothing the caller
            holds (``replay``), so the interrupt is raised at once, ``fn`` left to end on its
            (daemon) thread and its result dropped; waiting could hang the cell for as long
            as ``fn`` runs.
    """
    if not in_event_loop():
        return fn()
    result: list[T] = []
    error: list[BaseException] = []
    finished: list[bool] = []  # the truth: set by the worker before it releases ``wake``
    wake = threading.Lock()  # held until the call ends, so the waiting thread wakes at once
    wake.acquire()
    trusted = trusted_now()  # a new thread starts in an empty context

    def target() -> None:
        try:
            with trusted_modules(trusted or None):
                result.append(fn())
        except BaseException as exc:  # handed to the waiting thread
            error.append(exc)
        finally:
            finished.append(True)
            wake.release()

    with _interrupts_raised_here():
        return _wait_for(target, on_interrupt, finished, wake, error, result)


def _wait_for(
    target: Callable[[], None],
    on_interrupt: Callable[[], None] | None,
    finished: list[bool],
    wake: Any,
    error: list[BaseException],
    result: list[T],
) -> T:
    """Runs ``target`` on a worker thread and waits for it (see :func:`run_outside_loop`)."""
    worker = threading.Thread(target=target, name="asyncnn-call", daemon=True)
    try:
        worker.start()
    except KeyboardInterrupt:
        # (landing inside start(), the thread may or may not run already: ask it to stop,
        # which a fit does before its first step, rather than wait for a thread that may
        # never start)
        if on_interrupt is not None:
            on_interrupt()
        raise
    interrupts = 0
    ask = False
    while True:
        # the interrupt lands at whatever this thread runs, the loop's own test and the call
        # to on_interrupt included: all of the wait is inside the try, or a Ctrl-C there
        # would leave ``fn`` running unasked. Not ``worker.join``/``is_alive``: on CPython
        # 3.11 an interrupt landing in join marks the thread stopped while it runs on
        # (threading's bpo-45274 branch), and the interrupt came back before ``fn`` ended.
        try:
            if ask:
                ask = False
                if interrupts > 1:
                    print(
                        "asyncnn: interrupted again; the call stops at its next step; "
                        "waiting for it",
                        file=sys.stderr,
                    )
                assert on_interrupt is not None  # (without one the interrupt is raised)
                on_interrupt()
            while not finished:
                # a lock, not an Event: an interrupt landing in an Event's Python code could
                # leave its inner lock held, and the worker's set() would then block forever
                if wake.acquire(timeout=0.1):
                    wake.release()
            break
        except KeyboardInterrupt:
            if on_interrupt is None:
                raise
            interrupts += 1
            ask = True
    if error:
        raise error[0]
    if interrupts:
        raise KeyboardInterrupt
    return result[0]


def _wrap_replay() -> Callable[..., Any]:
    from ._tracing._replay import replay as inner

    @functools.wraps(inner)
    def replay(*args: Any, **kwargs: Any) -> Any:
        return run_outside_loop(lambda: inner(*args, **kwargs))

    replay.__doc__ = (inner.__doc__ or "") + (
        "\n\n    Inside a running event loop (a notebook) the replay runs on a worker thread and "
        "this call waits for it. Ctrl-C there raises ``KeyboardInterrupt`` at once; the replay "
        "cannot be stopped midway and ends on its thread (its ``hook`` still called until "
        "then), its result dropped.\n"
    )
    return replay


replay = _wrap_replay()
