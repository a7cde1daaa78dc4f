"""The BLAS thread count that open compute teams share (``backends/_blas.py``): whichever
threads open and close the teams and start their workers, the count of the newest open team
applies, and the count from before returns once the last one closes.

The tests hold a team's worker threads before they start, so that each order of events is
played out exactly; none takes more than a fraction of a second.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from threadpoolctl import threadpool_info

from asyncnn.backends import ComputeTeam


def _blas_threads() -> int:
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    return int(blas[0]["num_threads"])


def _team_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-team")]


def _clear_blas_controller() -> None:
    # threadpoolctl (3.8) lets only one "controlling" thread set a pthreads OpenBLAS's count
    import threadpoolctl

    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@pytest.fixture
def hold_threads(monkeypatch: Any) -> Any:
    """``hold_threads(prefix)``: an event that threads named ``prefix...`` wait for before they
    run (then the test decides when a team's workers start)."""
    events: dict[str, threading.Event] = {}
    real_run = threading.Thread.run

    def run(thread: threading.Thread) -> None:
        for prefix, event in events.items():
            if thread.name.startswith(prefix):
                event.wait(10)
        real_run(thread)

    monkeypatch.setattr(threading.Thread, "run", run)
    yield lambda prefix: events.setdefault(prefix, threading.Event())
    for event in events.values():
        event.set()


def _on_a_thread_that_ends(fn: Any) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join()


@pytest.mark.filterwarnings("ignore:BLAS set to:RuntimeWarning")  # (2, then 1: said)
def test_a_worker_that_starts_late_keeps_the_newest_teams_blas_count(hold_threads: Any) -> None:
    # The older team's worker set its own team's count as it started: after the newer team's,
    # overriding it (and, taking threadpoolctl's control, turned the newer team's release into
    # a no-op)
    before = _blas_threads()
    if before < 2:
        pytest.skip("needs a BLAS that may take 2 threads")
    _clear_blas_controller()
    old_go, new_go = hold_threads("test-team-old"), hold_threads("test-team-new")
    teams: list[ComputeTeam] = []
    for count, name in [(2, "test-team-old"), (1, "test-team-new")]:
        team = ComputeTeam(1, blas_threads=count, name=name)
        teams.append(team)
        _on_a_thread_that_ends(team.start)  # as from a run's own thread (its control lapses)
    old, new = teams
    assert _blas_threads() == 1
    old_go.set()
    started = threading.Event()
    old.submit(started.set)  # runs once the old team's worker has started
    assert started.wait(10)
    assert _blas_threads() == 1  # the newer team's count
    new_go.set()
    new.close()
    assert _blas_threads() == 2  # the older team's, which is still open
    old.close()
    assert _blas_threads() == before and _team_threads() == []


def test_a_worker_left_behind_sets_no_blas_count_once_its_team_closed(hold_threads: Any) -> None:
    # (a pool's close leaves a hung task's thread behind) the worker set its count as it
    # started, after its team had given the count back: the process stayed at one thread
    before = _blas_threads()
    if before < 2:
        pytest.skip("needs a BLAS that may take 2 threads")
    _clear_blas_controller()
    go = hold_threads("test-team-old")
    stale = ComputeTeam(1, name="test-team-old")
    _on_a_thread_that_ends(lambda: stale.start().close(wait=False))
    assert _blas_threads() == before
    go.set()
    for t in _team_threads():
        t.join(10)
    assert _blas_threads() == before


def test_a_team_opened_on_any_thread_limits_blas() -> None:
    # threadpoolctl (3.8) silently ignored the count a team set from a thread other than the
    # one that set BLAS's count first: the team's workers ran with multi-threaded BLAS
    from threadpoolctl import threadpool_limits

    before = _blas_threads()
    if before < 2:
        pytest.skip("needs a BLAS that may take 2 threads")
    seen: list[int] = []

    def use_a_team() -> None:
        with ComputeTeam(1, name="test-team"):
            seen.append(_blas_threads())
        seen.append(_blas_threads())

    threadpool_limits(limits=before, user_api="blas")  # this thread sets the count first
    try:
        _on_a_thread_that_ends(use_a_team)
    finally:
        _clear_blas_controller()
    assert seen == [1, before]


def _count_in_a_worker(team: ComputeTeam) -> int:
    seen: list[int] = []
    done = threading.Event()
    team.submit(lambda: seen.append(_blas_threads()), done.set)
    assert done.wait(10)
    return seen[0]


@pytest.mark.parametrize("older", [1, 2])
@pytest.mark.parametrize("end", ["close", "drop"])
def test_an_older_team_closed_or_dropped_leaves_the_open_teams_count(end: str, older: int) -> None:
    # (a test's team saw products differ as if BLAS were multi-threaded: an earlier test's team
    # or pool, closed late or dropped unclosed and collected, must not change the count of a
    # team opened after it, in its workers or in its caller)
    import gc
    import weakref

    before = _blas_threads()
    _clear_blas_controller()
    old = ComputeTeam(1, blas_threads=older, name="test-team-old").start()
    if older == 1:
        new = ComputeTeam(1, blas_threads=1, name="test-team-new").start()
    else:  # (another count than the open team's: said, see the test below)
        with pytest.warns(RuntimeWarning, match="OpenBLAS keeps one count"):
            new = ComputeTeam(1, blas_threads=1, name="test-team-new").start()
    old_ref = weakref.ref(old)
    assert (_blas_threads(), _count_in_a_worker(new)) == (1, 1)
    if end == "close":
        _on_a_thread_that_ends(old.close)  # from another thread, as a late close may be
    del old
    gc.collect()
    assert (_blas_threads(), _count_in_a_worker(new)) == (1, 1)
    new.close()
    if end == "drop":
        left = old_ref()  # collection does not close a team: its workers keep it alive
        assert left is not None
        assert _blas_threads() == older  # still open, it holds its count
        left.close()
        del left
    assert _blas_threads() == before and _team_threads() == []


def test_the_libraries_are_looked_up_once_as_the_first_team_opens(monkeypatch: Any) -> None:
    # every worker looked the loaded libraries up again as it started (25 ms each with cupy and
    # torch loaded: 16 workers slowed a run's first steps by about 0.4 s)
    import threadpoolctl

    real = threadpoolctl.ThreadpoolController()  # the test's own reads: no look-up each
    blas = [lib for lib in real.info() if lib["user_api"] == "blas"]
    monkeypatch.setattr(
        sys.modules[__name__], "_blas_threads",
        lambda: int([lib for lib in real.info() if lib["user_api"] == "blas"][0]["num_threads"]),
    )  # fmt: skip
    looked_up: list[int] = []
    load = threadpoolctl.ThreadpoolController._load_libraries

    def counting(self: Any) -> Any:
        looked_up.append(1)
        return load(self)

    monkeypatch.setattr(threadpoolctl.ThreadpoolController, "_load_libraries", counting)
    before = int(blas[0]["num_threads"])
    with ComputeTeam(4, name="test-team") as team:
        for _ in range(8):  # every worker has started and set its count
            assert _count_in_a_worker(team) == 1
        with ComputeTeam(2, name="test-team-second") as second:
            assert _count_in_a_worker(second) == 1
        assert len(looked_up) == 1
    assert _blas_threads() == before
    with ComputeTeam(2, name="test-team"):  # a library loaded meanwhile is found now
        assert len(looked_up) == 2


def test_a_team_opened_beside_one_of_another_blas_count_warns_that_both_change() -> None:
    # OpenBLAS keeps one count per process: two runs open at once, one on BLAS's 2 threads and
    # one on a team of 1, multiplied on the newest count, and their float32 products (and the
    # replays of their traces) differed in the last bits from each run alone, without a word
    import warnings

    _clear_blas_controller()
    with ComputeTeam(1, blas_threads=2, name="test-team-a"):
        with pytest.warns(RuntimeWarning, match=r"BLAS set to 1 thread.*holds 2.*one pool"):
            with ComputeTeam(1, blas_threads=1, name="test-team-b"):
                pass
    with ComputeTeam(1, blas_threads=1, name="test-team-a"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same count: nothing to say
            with ComputeTeam(2, blas_threads=1, name="test-team-b"):
                pass
    assert _team_threads() == []


@pytest.mark.anyio
async def test_a_run_beside_an_open_team_takes_the_team_not_blas_threads(monkeypatch: Any) -> None:
    # on 2 cores a Sync run alone gets one worker on BLAS's 2 threads; beside another run's
    # team (a sweep's fits in threads, or two runs in one task group) it takes a team of its
    # own, whose count is the open one's: neither run's products change under the other
    from asyncnn import open_run, optim, policies
    from asyncnn._runtime import _lifecycle

    from _reference import chain_graph

    monkeypatch.setattr(_lifecycle, "host_cores", lambda: 2)
    graph = chain_graph(1)
    async with open_run(graph, optim.SGD(lr=0.1), policies.Sync()) as run:
        alone = (run.pool.workers, run.pool.team.blas_threads)
    assert alone == (1, 2)
    with ComputeTeam(2, name="test-team-other"):
        async with open_run(graph, optim.SGD(lr=0.1), policies.Sync()) as run:
            beside = (run.pool.workers, run.pool.team.blas_threads)
    assert beside == (2, 1)
