"""The interpreter's switch interval while compute teams and pools are open
(``backends/_gil.py``): the interval of the newest open team applies, the one from before
returns once the last one closes, in any order; ``None`` leaves it alone, and ``"auto"`` (the
default) asks for a short one in a team of many workers only."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from asyncnn.backends import ComputeTeam, open_device_pool
from asyncnn.backends._gil import AUTO_SWITCH_INTERVAL, AUTO_SWITCH_WORKERS


@pytest.fixture(autouse=True)
def _python_interval() -> Iterator[float]:
    # (a test that fails half-way must not leave the rest of the suite on another interval)
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield 0.005
    sys.setswitchinterval(before)


def _close_to(value: float) -> Any:
    # (the interpreter keeps the interval in whole microseconds)
    return pytest.approx(value, abs=1e-6)


def test_a_team_sets_its_interval_while_open_and_restores_the_one_before() -> None:
    with ComputeTeam(AUTO_SWITCH_WORKERS, name="test-team", blas_threads=None):
        assert sys.getswitchinterval() == _close_to(AUTO_SWITCH_INTERVAL)  # "auto", many workers
    assert sys.getswitchinterval() == _close_to(0.005)
    with ComputeTeam(AUTO_SWITCH_WORKERS - 1, name="test-team", blas_threads=None):
        assert sys.getswitchinterval() == _close_to(0.005)  # "auto", few: Python's own
    with ComputeTeam(1, name="test-team", switch_interval=2e-4):
        assert sys.getswitchinterval() == _close_to(2e-4)
    assert sys.getswitchinterval() == _close_to(0.005)


def test_none_leaves_the_interval_as_it_is() -> None:
    sys.setswitchinterval(0.003)
    with ComputeTeam(1, name="test-team", switch_interval=None):
        assert sys.getswitchinterval() == _close_to(0.003)
        sys.setswitchinterval(0.002)  # the user's own change stays
    assert sys.getswitchinterval() == _close_to(0.002)


@pytest.mark.parametrize("order", ["first", "last"])
def test_the_interval_before_returns_once_the_last_team_closes_in_any_order(order: str) -> None:
    first = ComputeTeam(1, name="test-team", switch_interval=1e-4).start()
    second = ComputeTeam(1, name="test-team", switch_interval=3e-4).start()
    assert sys.getswitchinterval() == _close_to(3e-4)  # the newest team's
    if order == "first":
        first.close()
        assert sys.getswitchinterval() == _close_to(3e-4)
        second.close()
    else:
        second.close()
        assert sys.getswitchinterval() == _close_to(1e-4)  # the team still open
        first.close()
    assert sys.getswitchinterval() == _close_to(0.005)
    first.close()  # closing again changes nothing
    second.close()
    assert sys.getswitchinterval() == _close_to(0.005)


def test_a_team_whose_threads_cannot_all_start_restores_the_interval(monkeypatch: Any) -> None:
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start_one(thread: threading.Thread) -> None:
        if started:
            raise RuntimeError("can't start new thread")
        started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_one)
    team = ComputeTeam(2, name="test-team", switch_interval=1e-4)
    monkeypatch.setattr(sys, "setswitchinterval", _seen(sys.setswitchinterval, set_to := []))
    with pytest.raises(RuntimeError, match="can't start new thread"):
        team.start()
    monkeypatch.undo()
    assert set_to == [1e-4, 0.005]  # held as the team started, given back as it failed
    assert sys.getswitchinterval() == _close_to(0.005)


def _seen(real: Any, calls: list[float]) -> Any:
    def record(interval: float) -> None:
        calls.append(interval)
        real(interval)

    return record


@pytest.mark.anyio
async def test_a_pool_holds_its_interval_while_open() -> None:
    async with open_device_pool(cpu_workers=1, switch_interval=1e-4):
        assert sys.getswitchinterval() == _close_to(1e-4)
        async with open_device_pool(cpu_workers=1, switch_interval=None):
            assert sys.getswitchinterval() == _close_to(1e-4)
        async with open_device_pool(cpu_workers=AUTO_SWITCH_WORKERS, blas_threads=None):
            assert sys.getswitchinterval() == _close_to(AUTO_SWITCH_INTERVAL)
        assert sys.getswitchinterval() == _close_to(1e-4)
    assert sys.getswitchinterval() == _close_to(0.005)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "at least"),
        (-1e-3, ValueError, "at least"),
        (float("inf"), ValueError, "a finite number"),
        (float("nan"), ValueError, "a finite number"),
        ("5e-5", TypeError, "a number, 'auto' or None"),
        ("Auto", TypeError, "a number, 'auto' or None"),
        (True, TypeError, "a number"),
    ],
)
def test_a_switch_interval_that_is_not_a_positive_number_is_refused(
    value: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=rf"switch_interval must be (?:{message})"):
        ComputeTeam(1, switch_interval=value)

    async def pool() -> None:
        async with open_device_pool(cpu_workers=1, switch_interval=value):
            pass

    with pytest.raises(error, match=rf"switch_interval must be (?:{message})"):
        anyio.run(pool)
    assert sys.getswitchinterval() == _close_to(0.005)


@pytest.mark.parametrize("value", [1.5, 1e300])
def test_a_switch_interval_above_one_second_is_refused(value: float) -> None:
    # 1e300 was taken, and the interpreter's microsecond count overflowed to an interval of 0
    said = rf"switch_interval must be at most 1\.0 s.*got {re.escape(repr(value))};"
    with pytest.raises(ValueError, match=said):
        ComputeTeam(1, switch_interval=value)
    with ComputeTeam(1, name="test-team", switch_interval=1.0):
        assert sys.getswitchinterval() == _close_to(1.0)
    assert sys.getswitchinterval() == _close_to(0.005)
