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


def test_interrupting_the_waiting_thread_stops_the_fit_and_keeps_what_finished():
    """A notebook's "interrupt kernel" raises KeyboardInterrupt in the thread that waits for the
    fit's worker thread: the fit stops at its next step and keeps what finished."""
    import _thread

    data, tr = _setup()

    class InterruptKernel(ann.callbacks.Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 1:
                _thread.interrupt_main()  # as SIGINT would, in the main (waiting) thread
            elif step > 1:
                # the waiting thread sees the interrupt when its join(0.1) returns: keep the
                # 200 tiny steps from all ending before that (they did, once, on a fast host)
                time.sleep(0.01)

    async def cell():
        tr.fit(data, epochs=50, batch_size=8, callbacks=[InterruptKernel()])

    loop = asyncio.new_event_loop()  # like a kernel's loop: no SIGINT handler of its own
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        loop.close()
    done = tr.state.minibatches
    assert 2 <= done < 50 * 4 and set(tr.versions.values()) == {done}
    assert len(tr.history.losses) == done


def test_an_interrupt_that_lands_outside_the_join_still_stops_the_call_and_waits(monkeypatch):
    """The interrupt lands at whatever the waiting thread runs: here in the loop's test of
    whether the call is still running (``is_alive``), not in ``join``. The call must still be
    asked to stop and be waited for, not left running behind the raised KeyboardInterrupt."""
    import threading

    from asyncnn._notebook import run_outside_loop

    stop = threading.Event()
    finished = []

    def call():
        stop.wait(5.0)
        finished.append(stop.is_set())
        return 1

    real = threading.Thread.is_alive
    seen = []

    def is_alive(self):
        if self.name == "asyncnn-call":
            seen.append(1)
            if len(seen) == 2:
                raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(threading.Thread, "is_alive", is_alive)

    async def cell():
        run_outside_loop(call, on_interrupt=stop.set)

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
