"""A notebook run headless in a Jupyter kernel (nbclient): ``fit(progress=True)``,
``evaluate``, ``replay`` and ``open_run`` with top-level ``await`` inside the kernel's running
event loop. Skipped where nbclient or a Python kernel is not available."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import trio

import asyncnn as ann
from asyncnn import nn, optim, policies

NOTEBOOK = Path(__file__).parent / "notebooks" / "workflow.ipynb"


def _setup():
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((32, 5)), "y": rng.integers(0, 3, 32)}
    graph = ann.Graph.sequential(
        [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 5),
    )  # fmt: skip
    return data, ann.Trainer(graph, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2))


def _fit_and_replay(tmp_path: Path) -> tuple[int, bool]:
    data, tr = _setup()
    tr.trace = str(tmp_path / "run.trace")
    hist = tr.fit(data, epochs=2, batch_size=8)
    return len(hist.losses), ann.replay(tr.traces[0]).identical


def test_fit_and_replay_inside_a_running_asyncio_loop(tmp_path):
    async def main():
        asyncio.get_running_loop()
        return _fit_and_replay(tmp_path)

    assert asyncio.run(main()) == (8, True)


def test_fit_inside_a_running_trio_loop(tmp_path):
    async def main():
        return _fit_and_replay(tmp_path)

    assert trio.run(main) == (8, True)


def test_a_notebook_runs_headless(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    started = False
    try:
        with client.setup_kernel():
            started = True
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
    except nbclient.exceptions.CellExecutionError:
        raise
    except Exception as exc:
        if started:
            raise
        pytest.skip(f"no Jupyter kernel could start here: {type(exc).__name__}: {exc}")
    fit_cell = nb.cells[2]
    text = "".join(o.get("text", "") for o in fit_cell.outputs if o.output_type == "stream")
    # no ipywidgets in the test environment: plain text progress lines, not rich's warning
    assert "train 12/12  loss" in text and "ipywidgets" not in text
    shown = fit_cell.outputs[-1]["data"]["text/plain"]
    assert shown.startswith("History(12 minibatches, 3 epochs")
    assert nb.cells[4].outputs[-1]["data"]["text/plain"].isdigit()  # events checked


class _CtrlCAtStep1(ann.callbacks.Callback):
    """Ctrl-C in the main (waiting) thread at step 1, as SIGINT would; the later steps slowed
    a little: the waiting thread sees the interrupt when its join(0.1) returns, and the 200 tiny
    steps once all ended before that on a fast host."""

    def on_step_end(self, trainer, step, logs):
        import _thread

        if step == 1:
            _thread.interrupt_main()
        elif step > 1:
            time.sleep(0.01)


def test_interrupting_the_waiting_thread_stops_the_fit_and_keeps_what_finished():
    """A notebook's "interrupt kernel" raises KeyboardInterrupt in the thread that waits for the
    fit's worker thread: the fit stops at its next step and keeps what finished."""
    data, tr = _setup()

    async def cell():
        tr.fit(data, epochs=50, batch_size=8, callbacks=[_CtrlCAtStep1()])

    loop = asyncio.new_event_loop()  # like a kernel's loop: no SIGINT handler of its own
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        loop.close()
    done = tr.state.minibatches
    assert 2 <= done < 50 * 4 and set(tr.versions.values()) == {done}
    assert len(tr.history.losses) == done


@pytest.mark.parametrize("where", ["before taking the lock", "after taking the lock"])
def test_an_interrupt_anywhere_in_the_wait_still_stops_the_call_and_waits(monkeypatch, where):
    """The interrupt lands at whatever the waiting thread runs: here inside the wait's timed
    lock acquire, before it took the lock (the call still runs: it must be asked to stop and
    waited for, not left running behind the raised KeyboardInterrupt) or just after it took it
    once the call had ended (the lock then stays held: the wait must not hang on it)."""
    import threading
    import types

    from asyncnn import _notebook

    stop = threading.Event()
    finished = []

    def call():
        time.sleep(0.1)  # the caller is waiting by now
        stop.wait(5.0)
        finished.append(stop.is_set())
        return 1

    class Lock:
        """threading.Lock, with Ctrl-C landing in the first timed acquire of the wait (or,
        "after taking the lock", in the first one that got it)."""

        def __init__(self):
            self._lock, self.fired = threading.Lock(), False

        def acquire(self, blocking=True, timeout=-1):
            if timeout < 0:  # the caller's, before the call starts
                return self._lock.acquire(blocking)
            if where == "before taking the lock" and not self.fired:
                self.fired = True
                time.sleep(0.05)
                raise KeyboardInterrupt
            if where == "after taking the lock" and not self.fired:
                self.fired = True
                self._lock.acquire()  # (no timeout: the interrupt comes once it has the lock)
                raise KeyboardInterrupt  # the lock stays held by the waiting thread
            return self._lock.acquire(blocking, timeout)

        def release(self):
            self._lock.release()

    if where == "after taking the lock":
        stop.set()  # the call ends by itself; the interrupt comes as it does
    fake = types.SimpleNamespace(Thread=threading.Thread, Lock=Lock)
    monkeypatch.setattr(_notebook, "threading", fake)

    async def cell():
        _notebook.run_outside_loop(call, on_interrupt=stop.set)

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        loop.close()
    assert finished == [True]


def test_context_variables_set_around_the_call_hold_on_its_worker_thread():
    """``with ann.trace.trusted_modules([...]): ann.replay(...)`` in a notebook: the replay ran on
    a new thread, which starts in an empty context, and refused the module trusted around it
    (``UntrustedModuleError``) where a script's call read it."""
    from asyncnn._math._imports import _trusted
    from asyncnn._notebook import run_outside_loop

    async def cell():
        with ann.trace.trusted_modules(["mylab.layers"]):
            return run_outside_loop(_trusted.get)

    assert "mylab.layers" in asyncio.run(cell())


def _in_a_running_loop(kind, cell):
    """Runs the sync ``cell()`` as a notebook cell would: inside a running event loop whose
    thread gets the interrupts (an asyncio loop with no SIGINT handler of its own, as a
    kernel's, or trio's, whose handler raises in the running code)."""

    async def main():
        return cell()

    if kind == "trio":
        return trio.run(main)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _interrupting_call(asked, log, after_stop=None, interrupts=1):
    """A call that presses Ctrl-C ``interrupts`` times in the waiting thread (as the kernel's
    SIGINT would, without a real signal), each once the previous one was seen (``asked``, the
    list the caller's ``on_interrupt`` appends to), then takes a while to stop, as a fit
    finishing the step in flight does."""
    import _thread

    def call():
        time.sleep(0.05)  # the caller is waiting by now
        for i in range(interrupts):
            _thread.interrupt_main()
            deadline = time.monotonic() + 5.0
            while len(asked) <= i:
                assert time.monotonic() < deadline, "the call was never asked to stop"
                time.sleep(0.01)
        time.sleep(0.3)  # the step in flight
        log.append("stopped")
        if after_stop is not None:
            raise after_stop
        return 1

    return call


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_the_interrupt_comes_only_once_the_call_has_stopped(loop):
    """On Python 3.11 a Ctrl-C landing in ``Thread.join`` marks the thread stopped while it runs
    on (threading's bpo-45274 branch): the interrupt came back while the fit still ran, and its
    weights changed after the cell's ``except KeyboardInterrupt`` had saved them."""
    from asyncnn._notebook import run_outside_loop

    asked, log = [], []

    def cell():
        try:
            run_outside_loop(_interrupting_call(asked, log), on_interrupt=lambda: asked.append(1))
        except KeyboardInterrupt:
            return list(log)  # what the cell sees as the interrupt reaches it
        return "no interrupt"

    assert _in_a_running_loop(loop, cell) == ["stopped"]


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_second_ctrl_c_keeps_waiting_for_the_call_to_stop(loop, capsys):
    """Ctrl-C pressed again while the call stops asks again and waits on: returning then would
    leave the call changing the weights (and a next fit could start beside it)."""
    from asyncnn._notebook import run_outside_loop

    asked, log = [], []
    call = _interrupting_call(asked, log, interrupts=3)

    def cell():
        try:
            run_outside_loop(call, on_interrupt=lambda: asked.append(1))
        except KeyboardInterrupt:
            return list(log)
        return "no interrupt"

    assert _in_a_running_loop(loop, cell) == ["stopped"]
    assert len(asked) == 3
    assert "stops at its next step; waiting for it" in capsys.readouterr().err


def _run_as_a_script(runner, main):
    """``main()`` as a script runs it, with the runner's own SIGINT handler installed: asyncio's
    (``asyncio.run``, ``anyio.run``) only cancels the main task on the first Ctrl-C, and trio's,
    told to raise it at checkpoints only, waits for one of the main task."""
    if runner == "asyncio.run":
        return asyncio.run(main())
    if runner == "anyio-asyncio":
        import anyio

        return anyio.run(main, backend="asyncio")
    return trio.run(main, restrict_keyboard_interrupt_to_checkpoints=True)


@pytest.mark.parametrize("runner", ["asyncio.run", "anyio-asyncio", "trio-checkpoints"])
def test_one_ctrl_c_stops_a_call_made_from_a_coroutine_of_a_runner_with_its_own_handler(runner):
    """The runner's handler got the Ctrl-C, not the waiting thread: the call was never asked to
    stop and ran to its end (a whole fit), and only a second Ctrl-C stopped it."""
    import signal

    from asyncnn._notebook import run_outside_loop

    asked, log = [], []
    handler = signal.getsignal(signal.SIGINT)

    async def main():
        try:
            run_outside_loop(_interrupting_call(asked, log), on_interrupt=lambda: asked.append(1))
        except KeyboardInterrupt:
            return list(log)
        return "no interrupt"

    try:
        seen = _run_as_a_script(runner, main)
    except KeyboardInterrupt:  # (the runner's own, once the call had ended unasked)
        seen = "the interrupt came out of the runner, not the call"
    assert seen == ["stopped"]
    assert len(asked) == 1
    assert signal.getsignal(signal.SIGINT) is handler  # the runners' handlers were put back


def test_one_ctrl_c_stops_a_fit_called_from_a_coroutine_under_asyncio_run():
    """(asyncio's runner cancelled the main task, blocked in fit: the fit trained to its end,
    then the cancellation came as KeyboardInterrupt at the coroutine's next await.)"""
    data, tr = _setup()

    async def main():
        tr.fit(data, epochs=50, batch_size=8, callbacks=[_CtrlCAtStep1()])
        await asyncio.sleep(0)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(main())
    done = tr.state.minibatches
    assert 2 <= done < 50 * 4 and set(tr.versions.values()) == {done}
    assert len(tr.history.losses) == done


def test_an_error_the_call_raises_while_it_stops_reaches_the_caller():
    """(It was lost: the interrupt came back before the call had ended.)"""

    from asyncnn._notebook import run_outside_loop

    asked = []
    call = _interrupting_call(asked, [], after_stop=OSError("disk full while saving"))

    def cell():
        return run_outside_loop(call, on_interrupt=lambda: asked.append(1))

    with pytest.raises(OSError, match="disk full while saving"):
        _in_a_running_loop("asyncio", cell)


def test_a_call_that_cannot_be_asked_to_stop_is_left_to_end_and_the_interrupt_raised_at_once():
    """``replay`` passes no ``on_interrupt``: waiting for it would hold the cell for as long as
    it runs (its thread cannot be stopped), and it changes none of the caller's state."""
    import _thread

    from asyncnn._notebook import run_outside_loop

    release, log = [], []

    def call():
        time.sleep(0.05)  # the caller is waiting by now
        _thread.interrupt_main()
        deadline = time.monotonic() + 5.0
        while not release and time.monotonic() < deadline:
            time.sleep(0.01)
        log.append("ended")

    def cell():
        try:
            run_outside_loop(call)
        except KeyboardInterrupt:
            return list(log)
        return "no interrupt"

    try:
        assert _in_a_running_loop("asyncio", cell) == []  # raised while the call runs on
    finally:
        release.append(True)
    deadline = time.monotonic() + 5.0
    while not log and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log == ["ended"]
