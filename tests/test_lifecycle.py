"""The life of a run (``asyncnn/_runtime/_lifecycle.py``): the trio loop a synchronous call
(``Trainer.fit``, ``replay``) runs on."""

from __future__ import annotations

from typing import Any

import pytest

from asyncnn import Graph, LayerActor, open_run


def test_ctrl_c_reaches_a_trio_call_at_a_checkpoint_of_its_main_task():
    # Trainer.fit and replay start trio through run_trio: a Ctrl-C landing in a child task's
    # code (a cluster driver's read loop, inside an anyio cancel scope) was raised right there,
    # and when that was the scope's exit trio failed with "Cancel scope stack corrupted"
    # instead of stopping the fit; now the child goes on and the main task gets it
    import signal

    import anyio

    from asyncnn._runtime._lifecycle import error_leaves, run_trio

    seen: list[str] = []

    async def main() -> None:
        async def child() -> None:
            with anyio.CancelScope():
                signal.raise_signal(signal.SIGINT)
                seen.append("the child went on")
                await anyio.lowlevel.checkpoint()  # the child's: not where the interrupt goes

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            await anyio.sleep(5)  # the main task's checkpoint: the interrupt comes here
        seen.append("the call went on")

    with pytest.raises(BaseException) as info:
        run_trio(main)
    assert seen == ["the child went on"]
    # (raised inside the task group: anyio hands it on in a group, as the run's own do)
    assert [type(e) for e in error_leaves(info.value)] == [KeyboardInterrupt]


MainActor = type("MainActor", (LayerActor,), {"__module__": "__main__"})


@pytest.mark.anyio
async def test_the_warning_of_a_trace_naming_a_class_from_main_points_at_the_users_line(tmp_path):
    # it pointed at contextlib.py (the open_run the user entered): say where the user opened it
    import numpy as np

    from asyncnn import nn, optim, policies

    g = Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(5, 3), x, actor=MainActor), y)
    data = {"x": np.ones((4, 5), np.float32), "y": np.zeros(4, np.int64)}
    with pytest.warns(UserWarning, match=r"\['MainActor'\], defined in __main__") as caught:
        async with open_run(g, optim.SGD(lr=0.1), policies.Sync(), trace=str(tmp_path / "t")) as r:
            await r.step(data)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, _line_of("async with open_run"))]


def _line_of(text: str) -> int:
    """The line of this file that holds ``text`` (its first)."""
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if text in line and "_line_of" not in line)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_an_exception_group_the_block_raises_comes_out_as_raised():
    # open_run picked one leaf of the user's own group (ValueError('a')): TypeError('b') was
    # lost and an `except* TypeError` no longer matched
    import anyio

    from _run_cases import _data, _sync_run

    raised = ExceptionGroup("validation failed", [ValueError("a"), TypeError("b")])
    with anyio.fail_after(20), pytest.raises(ExceptionGroup) as info:
        async with _sync_run() as run:
            await run.step(_data())
            raise raised
    assert info.value is raised
    assert [repr(e) for e in info.value.exceptions] == ["ValueError('a')", "TypeError('b')"]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_the_errors_of_a_task_group_in_the_block_all_come_out():
    import anyio

    from _run_cases import _data, _sync_run

    async def fail(exc: BaseException) -> None:
        with anyio.CancelScope(shield=True):  # both fail, whichever fails first
            await anyio.sleep(0.01)
        raise exc

    caught: list[BaseException] = []
    with anyio.fail_after(20):
        try:
            async with _sync_run() as run:
                await run.step(_data())
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fail, ValueError("first"))
                    tg.start_soon(fail, KeyError("second"))
        except* KeyError as group:
            caught.extend(group.exceptions)
        except* ValueError as group:
            caught.extend(group.exceptions)
    assert sorted(repr(e) for e in caught) == ["KeyError('second')", "ValueError('first')"]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_a_plain_exception_of_the_block_comes_out_unchanged():
    import anyio

    from _run_cases import _data, _sync_run

    raised = KeyError("mine")
    with anyio.fail_after(20), pytest.raises(KeyError) as info:
        async with _sync_run() as run:
            await run.step(_data())
            raise raised
    assert info.value is raised


def _mlp_graph(stages: int) -> Graph:
    from asyncnn import nn

    return Graph.sequential(
        [nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)],
        loss=nn.CrossEntropyLoss(), stages=stages, input_shape=(None, 64),
    )  # fmt: skip


def _run_as_a_script(runner: str, main: Any) -> None:
    """``main()`` as a script runs it, with its runner's own SIGINT handler: asyncio's
    (``asyncio.run``, ``anyio.run``) cancels the main task on the first Ctrl-C."""
    import asyncio

    import anyio

    if runner == "asyncio.run":
        asyncio.run(main())
    else:
        anyio.run(main, backend="asyncio" if runner == "anyio-asyncio" else "trio")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["ctrl-c", "cancel scope"])
@pytest.mark.parametrize("runner", ["asyncio.run", "anyio-asyncio", "trio"])
def test_a_run_stopped_by_ctrl_c_says_it_was_interrupted_on_either_loop(
    tmp_path: Any, runner: str, how: str
) -> None:
    # asyncio's runner takes Ctrl-C as a cancellation of its main task: the trace said "the run
    # was cancelled from outside (a cancel scope or a timeout around it)", where there was none
    import signal

    import anyio

    import asyncnn as ann
    from asyncnn import optim, policies

    from _run_cases import _data

    path = str(tmp_path / "run.trace")

    async def main() -> None:
        with anyio.CancelScope() as scope:
            async with open_run(_mlp_graph(2), optim.SGD(lr=0.1), policies.GPipe(2),
                                trace=path) as run:  # fmt: skip
                for i in range(100):
                    await run.step(_data(features=64, classes=4))
                    if i == 2 and how == "ctrl-c":
                        signal.raise_signal(signal.SIGINT)
                    elif i == 2:
                        scope.cancel()

    if how == "ctrl-c":
        with pytest.raises(KeyboardInterrupt):
            _run_as_a_script(runner, main)
        said = "the run was interrupted (KeyboardInterrupt)"
    else:
        _run_as_a_script(runner, main)
        said = "the run was cancelled from outside (a cancel scope or a timeout around it)"
    assert ann.trace.summary(path)["errors"] == [said]


def test_a_ctrl_c_held_while_a_run_stops_goes_to_the_handler_it_was_meant_for_after():
    # (the cluster tests press it for real; here a program's own handler gets it, once)
    import signal

    from asyncnn._runtime._lifecycle import _HeldCtrlC

    got: list[int] = []

    def own(signum: int, frame: Any) -> None:
        got.append(signum)

    before = signal.signal(signal.SIGINT, own)
    try:
        held = _HeldCtrlC()
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        assert got == []
        held.restore()
        assert signal.getsignal(signal.SIGINT) is own
        held.deliver()
        assert got == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        held = _HeldCtrlC()
        signal.raise_signal(signal.SIGINT)  # held: no KeyboardInterrupt here
        held.restore()
        with pytest.raises(KeyboardInterrupt):
            held.deliver()
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.anyio
@pytest.mark.parametrize("cores", [2, 4])
async def test_a_runs_own_pool_follows_the_policy_on_a_small_host(monkeypatch, cores):
    # on 2 cores one computing actor at a time (Sync, GPipe(1), OneFOneB(1)) gets one worker
    # with its products whole on BLAS's 2 threads; several keys in flight, or more cores, the
    # team of one single-threaded worker per core
    from asyncnn import optim, policies
    from asyncnn._runtime import _lifecycle

    monkeypatch.setattr(_lifecycle, "host_cores", lambda: cores)
    small = cores <= _lifecycle.ONE_WORKER_CORES
    for policy, alone in [
        (policies.Sync(), True), (policies.GPipe(1), True), (policies.OneFOneB(1), True),
        (policies.GPipe(2), False), (policies.PipeDream(2), False), (policies.Async(2), False),
    ]:  # fmt: skip
        async with open_run(_mlp_graph(2), optim.SGD(lr=0.1), policy) as run:
            team = run.pool.team
            layout = (run.pool.workers, team.blas_threads, team.splits_work)
        want = (1, cores, False) if small and alone else (cores, 1, True)
        assert layout == want, (policy, layout)


def test_a_replay_opens_the_pool_its_run_recorded_whatever_this_hosts_cores(tmp_path, monkeypatch):
    # a Sync run on 2 cores multiplies on BLAS's 2 threads, whose float32 sums round otherwise
    # than one thread's: its replay, on a host of 16 cores too, sets the same
    import numpy as np

    import asyncnn as ann
    from asyncnn import optim, policies
    from asyncnn._runtime import _lifecycle

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 64), dtype=np.float32), "y": rng.integers(0, 4, 64)}
    path = str(tmp_path / "run.trace")
    monkeypatch.setattr(_lifecycle, "host_cores", lambda: 2)
    ann.Trainer(_mlp_graph(2), optim.SGD(lr=0.1), policies.Sync(), trace=path).fit(
        data, batch_size=32
    )
    assert ann.trace.read(path).header["pool"]["blas_threads"] == 2
    opened = []
    real = _lifecycle.open_device_pool

    def spy(**kw):
        opened.append(kw)
        return real(**kw)

    monkeypatch.setattr(_lifecycle, "host_cores", lambda: 16)
    monkeypatch.setattr(_lifecycle, "open_device_pool", spy)
    result = ann.replay(path)
    assert result.identical, result.first_divergence
    assert [(o["cpu_workers"], o["blas_threads"], o["split"]) for o in opened] == [(1, 2, False)]
