"""The compute team: split products equal uncut ones and repeat bit for bit; concurrent and
nested callers; errors; closing; the backend's ``matmul`` dispatch and the autodiff rules on it.

Small shapes with a tiny ``part_flops`` so that everything splits, and fast on 2 cores; no
timing is asserted.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import asyncnn as ann
from asyncnn import nn
from asyncnn._math._pytree import tree_leaves, tree_map
from asyncnn.backends import (
    ComputeTeam,
    TeamStatistics,
    current_team,
    elementwise,
    matmul,
    split_bounds,
    using_team,
)

SHAPES = [(64, 48, 80), (80, 48, 64), (33, 17, 50), (7, 5, 300), (300, 9, 7), (1, 64, 64)]


def _blas_threads() -> int:
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    return int(blas[0]["num_threads"])


def _team_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-team")]


@pytest.fixture
def team() -> Any:
    with ComputeTeam(2, part_flops=1_000, part_elements=64, name="test-team") as t:
        yield t
    assert _team_threads() == []


def _operands(m: int, k: int, n: int, dtype: Any, seed: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)


def test_split_bounds_cover_the_range_in_aligned_pieces() -> None:
    assert split_bounds(100, 4, 16) == (0, 16, 48, 80, 100)
    assert split_bounds(10, 4, 16) == (0, 10)  # one block: no cut
    assert split_bounds(7, 3) == (0, 2, 4, 7)
    for length, parts, align in [(1000, 16, 16), (37, 5, 1), (64, 64, 16)]:
        b = split_bounds(length, parts, align)
        assert b[0] == 0 and b[-1] == length and list(b) == sorted(set(b))
        assert all(x % align == 0 for x in b[:-1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_split_product_equals_the_uncut_one(team: ComputeTeam, shape: Any, dtype: Any) -> None:
    m, k, n = shape
    a, b = _operands(m, k, n, dtype, seed=m + n)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    for x, y in [(a, b), (np.asfortranarray(a), b), (a, np.ascontiguousarray(b.T).T)]:
        out = team.matmul(x, y)
        assert out.dtype == dtype and out.shape == (m, n)
        np.testing.assert_allclose(out, a @ b, rtol=tol, atol=tol)
        assert np.array_equal(out, team.matmul(x, y))  # bit-identical on a second call
    axis, bounds = team.product_plan(m, n, k)
    assert axis == (0 if m >= n else 1)
    if max(m, n) > 16 and min(m, n) > 1:
        assert len(bounds) == 3  # cut in two, one part per worker
    elif min(m, n) == 1:
        assert len(bounds) == 2  # numpy's matrix-vector product: a cut would round otherwise


def test_results_repeat_bit_for_bit_across_teams_and_under_load() -> None:
    a, b = _operands(96, 40, 72, np.float32, seed=1)
    with ComputeTeam(2, part_flops=1_000) as t1:
        first = t1.matmul(a, b)
        assert t1.statistics().splits == 1
    busy = np.ones((128, 128))
    stop = threading.Event()

    def load() -> None:  # another thread competing for the cores and the team
        while not stop.is_set():
            busy @ busy

    with ComputeTeam(2, part_flops=1_000) as t2:
        loaders = [threading.Thread(target=load) for _ in range(2)]
        for t in loaders:
            t.start()
        try:
            for _ in range(20):
                assert np.array_equal(t2.matmul(a, b), first)
        finally:
            stop.set()
            for t in loaders:
                t.join()


def test_concurrent_callers_share_the_workers(team: ComputeTeam) -> None:
    inputs = [_operands(64, 32, 48, np.float64, seed=s) for s in range(6)]
    results: list[Any] = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def caller(i: int) -> None:
        barrier.wait(5)
        for _ in range(5):
            results[i] = team.matmul(*inputs[i])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for (a, b), r in zip(inputs, results, strict=True):
        np.testing.assert_allclose(r, a @ b, rtol=1e-12)
    stats = team.statistics()
    assert isinstance(stats, TeamStatistics)
    assert stats.splits == 30 and stats.parts == 60


def test_nested_splits_from_workers_do_not_deadlock(team: ComputeTeam) -> None:
    # Every worker busy with an outer part that splits again: the callers do the inner parts.
    out = np.zeros((4, 4))
    done = threading.Event()

    def outer(i: int) -> None:
        assert current_team() is team or threading.current_thread() is main
        team.run_parts(lambda j: out.__setitem__((i, j), i * 10 + j), 4)

    main = threading.current_thread()
    result: list[Any] = []

    def task() -> None:  # a whole task on a worker, splitting as an actor's vjp would
        team.run_parts(outer, 4)
        result.append(matmul(*_operands(40, 8, 40, np.float64, seed=0)))
        done.set()

    team.submit(task)
    assert done.wait(10)
    assert np.array_equal(out, np.add.outer(np.arange(4) * 10, np.arange(4)))
    a, b = _operands(40, 8, 40, np.float64, seed=0)
    np.testing.assert_allclose(result[0], a @ b, rtol=1e-12)
    assert team.statistics().tasks == 1


def test_errors_propagate_lowest_part_first_and_the_team_survives(team: ComputeTeam) -> None:
    ran: list[int] = []

    def part(i: int) -> None:
        ran.append(i)
        if i >= 2:
            raise ValueError(f"part {i} failed")

    with pytest.raises(ValueError, match="part 2 failed"):
        team.run_parts(part, 5)
    assert sorted(ran) == [0, 1, 2, 3, 4]  # every part ran to its end first
    a, b = _operands(32, 8, 32, np.float64, seed=2)
    np.testing.assert_allclose(team.matmul(a, b), a @ b, rtol=1e-12)
    with pytest.raises(ValueError, match="matmul"):  # numpy's own error for bad shapes
        team.matmul(a, a[:3])


def test_closing_restores_blas_and_later_work_runs_on_the_caller() -> None:
    before = _blas_threads()
    t = ComputeTeam(2, part_flops=1_000, name="test-team").start()
    assert _blas_threads() == 1 and len(_team_threads()) == 2
    with pytest.raises(RuntimeError, match="started already"):
        t.start()
    queued = threading.Event()
    t.submit(queued.set)
    t.close()
    assert queued.is_set()  # queued tasks ran before the workers left
    assert _team_threads() == [] and _blas_threads() == before and not t.is_open
    t.close()  # twice: nothing
    with pytest.raises(RuntimeError, match="closed"):
        t.submit(print)
    a, b = _operands(64, 8, 64, np.float64, seed=3)
    np.testing.assert_allclose(t.matmul(a, b), a @ b, rtol=1e-12)
    assert t.statistics().splits == 0


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="at least 1 worker"):
        ComputeTeam(0)
    with pytest.raises(ValueError, match="blas_threads"):
        ComputeTeam(2, blas_threads=0)
    with pytest.raises(ValueError, match="part_flops"):
        ComputeTeam(2, part_flops=0)
    # wrong types name the field too (bool("false") is True: a string is no flag)
    for kwargs, field in [({"blas_threads": "1"}, "blas_threads"), ({"part_flops": None},
                          "part_flops"), ({"part_elements": "64"}, "part_elements"),
                          ({"split": "false"}, "split")]:  # fmt: skip
        with pytest.raises(TypeError, match=field):
            ComputeTeam(2, **kwargs)


def test_split_false_runs_work_whole(team: ComputeTeam) -> None:
    with ComputeTeam(2, part_flops=1_000, split=False, blas_threads=None) as whole:
        a, b = _operands(64, 8, 64, np.float64, seed=4)
        assert np.array_equal(whole.matmul(a, b), a @ b)
        assert whole.row_bounds(1000, 10**9) == (0, 1000)
        assert whole.statistics().splits == 0 and not whole.splits_work


def test_map_rows_splits_elementwise_work(team: ComputeTeam) -> None:
    x = np.random.default_rng(5).standard_normal((300, 7))
    out = np.empty_like(x)

    def relu_rows(lo: int, hi: int) -> None:
        np.maximum(x[lo:hi], 0, out=out[lo:hi])

    team.map_rows(relu_rows, len(x), x.size)
    assert np.array_equal(out, np.maximum(x, 0))
    assert team.row_bounds(300, x.size) == (0, 150, 300)
    assert team.row_bounds(300, 10) == (0, 300)  # too small: one piece
    # two parts must each touch twice the minimum (64 here): a hand-over costs about that
    assert team.row_bounds(300, 4 * 64 - 1) == (0, 300)
    assert team.row_bounds(300, 4 * 64) == (0, 150, 300)
    with ComputeTeam(3, part_elements=64) as three:
        assert three.row_bounds(300, 3 * 64) == (0, 100, 200, 300)  # three parts: as before
        assert three.row_bounds(300, 3 * 64 - 1) == (0, 300)


def test_a_pass_under_twice_part_elements_is_never_cut() -> None:
    # the optimizer's one-pass update relies on it to skip the team's question for small leaves
    for workers in (2, 3, 8):
        with ComputeTeam(workers, part_elements=64) as t:
            assert t.part_elements == 64
            assert all(len(t.row_bounds(300, n)) == 2 for n in range(2 * 64))
            assert len(t.row_bounds(300, 10**6)) > 2


def test_matmul_dispatch_follows_the_thread(team: ComputeTeam) -> None:
    a, b = _operands(64, 8, 64, np.float64, seed=6)
    assert current_team() is None
    matmul(a, b)
    assert team.statistics().splits == 0
    with using_team(team):
        assert current_team() is team
        np.testing.assert_allclose(matmul(a, b), a @ b, rtol=1e-12)
        with using_team(None):
            matmul(a, b)
    assert current_team() is None
    assert team.statistics().splits == 1
    assert matmul(a[0], b).shape == (64,)  # vectors: plain numpy


def test_autodiff_on_a_team_equals_the_plain_gradients(team: ComputeTeam) -> None:
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
    params = tree_map(lambda p: p.astype(np.float64), model.init(0))
    x = np.random.default_rng(7).standard_normal((48, 24))

    def loss(p: Any) -> Any:
        return (model(p, x) ** 2).mean()

    plain = ann.value_and_grad(loss)(params)
    with using_team(team):
        split = ann.value_and_grad(loss)(params)
        again = ann.value_and_grad(loss)(params)
    assert team.statistics().splits > 0
    np.testing.assert_allclose(split[0], plain[0], rtol=1e-10)
    for s, p, r in zip(
        tree_leaves(split[1]), tree_leaves(plain[1]), tree_leaves(again[1]), strict=True
    ):
        np.testing.assert_allclose(s, p, rtol=1e-10, atol=1e-12)
        assert np.array_equal(s, r)


def test_elementwise_splits_by_rows_bit_for_bit(team: ComputeTeam) -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((100, 30)).astype(np.float32)
    bias = rng.standard_normal(30).astype(np.float32)
    col = rng.standard_normal((1, 30))
    cases = [(np.add, (x, bias)), (np.maximum, (x, 0)), (lambda u, v: u * (v > 0), (x, x)),
             (np.multiply, (x, col)), (np.add, (bias, bias))]  # fmt: skip
    for fn, args in cases:
        before = team.statistics().splits
        out = team.elementwise(fn, *args)
        ref = fn(*args)
        assert out.dtype == ref.dtype and np.array_equal(out, ref)
        assert team.statistics().splits == before + (args[0].ndim == 2)
    with pytest.raises(ValueError, match="broadcast"):
        team.elementwise(np.add, x, x[:7])
    with using_team(team):
        assert np.array_equal(elementwise(np.add, x, bias), x + bias)
    assert np.array_equal(elementwise(np.add, x, bias), x + bias)  # no team: plain numpy


def test_bias_gradient_sums_split_by_columns_bit_for_bit(team: ComputeTeam) -> None:
    from asyncnn.backends import acc_sum

    for dtype in (np.float32, np.float64):
        g = np.random.default_rng(9).standard_normal((50, 300)).astype(dtype)
        assert np.array_equal(team.sum_rows(g), g.sum(axis=0))
        with using_team(team):
            before = team.statistics().splits
            assert np.array_equal(acc_sum(g, (0,)), g.sum(axis=0))
            assert np.array_equal(acc_sum(g, 0, keepdims=True), g.sum(axis=0, keepdims=True))
            assert np.array_equal(acc_sum(g, 1), g.sum(axis=1))  # other axes: plain numpy
            assert team.statistics().splits == before + 2


def test_a_capture_in_progress_takes_the_products_before_the_team(team: ComputeTeam) -> None:
    from asyncnn.backends._dispatch import capturing

    calls: list[tuple[int, ...]] = []

    def captured(a: Any, b: Any) -> Any:
        calls.append(a.shape)
        return a @ b

    a, b = _operands(64, 8, 64, np.float64, seed=10)
    with using_team(team), capturing(captured):
        matmul(a, b)
    assert calls == [(64, 8)] and team.statistics().splits == 0
    matmul(a, b)  # the capture ended: plain numpy again
    assert len(calls) == 1


def test_shutdown_returns_at_once_and_each_worker_reports_its_exit() -> None:
    exits: list[str] = []
    release = threading.Event()
    team = ComputeTeam(2, name="test-team", on_exit=lambda: exits.append("x")).start()
    team.submit(lambda: release.wait(5))
    team.shutdown()  # a task is still running: returns anyway
    assert not team.is_open
    with pytest.raises(RuntimeError, match="closing"):
        team.submit(print)
    release.set()
    team.close()
    assert exits == ["x", "x"] and _team_threads() == []


def test_products_numpy_computes_another_way_are_not_cut(team: ComputeTeam) -> None:
    # numpy computes a one-row (or one-column) product as a matrix-vector product and a @ a.T
    # with BLAS's symmetric product: a cut that made such a part would round differently
    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        for m, k, n in [(17, 300, 16), (16, 500, 17), (33, 64, 20), (1, 64, 300), (300, 64, 1)]:
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            axis, bounds = team.product_plan(m, n, k)
            assert len(bounds) == 2 or min(np.diff(bounds)) > 1
            for x, y in [(a, b), (np.asfortranarray(a), np.asfortranarray(b))]:
                got, want = team.matmul(x, y), x @ y  # one BLAS thread while open
                if len(bounds) == 2:  # not cut: numpy's own product
                    assert np.array_equal(got, want)
                    continue
                # each part is numpy's product of that part, bit for bit; OpenBLAS may take
                # another kernel for a part this small (well under a megaflop) than for the
                # whole: in some processes of a full run on a 16-core host it did (rows of the
                # second part 16..33 of (33, 64) @ (64, 20) differed by 5e-6, the same at
                # every call), so the whole is compared within rounding
                cuts = list(zip(bounds, bounds[1:], strict=False))
                if axis == 0:
                    parts = np.concatenate([x[lo:hi] @ y for lo, hi in cuts])
                else:
                    parts = np.concatenate([x @ y[:, lo:hi] for lo, hi in cuts], axis=1)
                assert np.array_equal(got, parts)
                f32 = dtype == np.float32
                np.testing.assert_allclose(
                    got, want, rtol=1e-5 if f32 else 1e-12, atol=1e-4 if f32 else 1e-10
                )
        a = rng.standard_normal((100, 33)).astype(dtype)
        assert np.array_equal(team.matmul(a, a.T), a @ a.T)
    assert team.product_plan(1, 300, 64)[1] == (0, 300)  # a vector-matrix product stays whole


def test_bias_sums_with_a_one_column_tail_equal_numpy(team: ComputeTeam) -> None:
    # numpy sums one column pairwise, and a whole array row after row
    for dtype in (np.float32, np.float64):
        g = np.random.default_rng(12).standard_normal((100, 17)).astype(dtype)  # 16 + 1 columns
        assert np.array_equal(team.sum_rows(g), g.sum(axis=0))


def test_integer_and_bool_sums_on_a_team_keep_numpys_dtype(team: ComputeTeam) -> None:
    from asyncnn.backends import acc_sum

    mask = np.random.default_rng(13).standard_normal((100, 300)) > 0
    small = np.full((100, 300), 100, dtype=np.int8)
    with using_team(team):
        for x in (mask, small, small.astype(np.int32)):
            out = acc_sum(x, (0,))
            assert out.dtype == x.sum(axis=0).dtype and np.array_equal(out, x.sum(axis=0))
    assert acc_sum(mask, (0,))[0] == mask[:, 0].sum()  # a count, not a logical or


def test_a_task_that_raises_is_reported_and_the_worker_carries_on(monkeypatch: Any) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", reported.append)
    ran = threading.Event()
    with ComputeTeam(1, name="test-team") as one:

        def fail() -> None:
            raise KeyError("task failed")

        one.submit(fail, then=fail)
        one.submit(ran.set)
        assert ran.wait(10)  # the only worker is still there
        assert one.statistics().tasks == 2
    assert [type(r.exc_value) for r in reported] == [KeyError, KeyError]
    assert reported[0].exc_traceback is not None


def test_parts_run_by_workers_see_the_callers_numpy_error_state(team: ComputeTeam) -> None:
    # Both parts wait for each other, so one runs on a worker while the caller runs the other.
    together = threading.Barrier(2, timeout=10)
    seen: dict[int, str] = {}

    def part(i: int) -> None:
        together.wait()
        seen[i] = np.geterr()["divide"]

    with np.errstate(divide="raise"):
        team.run_parts(part, 2)
    assert seen == {0: "raise", 1: "raise"} and team.statistics().parts_helped == 1
    x = np.ones((400, 300))
    y = np.ones((400, 300))
    y[300] = 0  # a division by zero in the second half only
    with np.errstate(divide="raise"), pytest.raises(FloatingPointError):
        team.elementwise(np.divide, x, y)


def test_blas_threads_return_when_the_last_team_closes_in_any_order() -> None:
    # OpenBLAS keeps one count per process: a team that restored the count it found on opening
    # gave the other team, still open, a multi-threaded BLAS, and left one thread behind
    before = _blas_threads()
    first = ComputeTeam(1, name="test-team").start()
    second = ComputeTeam(1, name="test-team").start()
    first.close()
    assert _blas_threads() == 1  # the second team is still open
    second.close()
    assert _blas_threads() == before
    first.close()  # closing again changes nothing
    assert _blas_threads() == before


def test_a_team_whose_threads_cannot_all_start_leaves_nothing_behind(monkeypatch: Any) -> None:
    before = _blas_threads()
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start_two(thread: threading.Thread) -> None:
        if len(started) == 2:
            raise RuntimeError("can't start new thread")
        started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_two)
    team = ComputeTeam(3, name="test-team")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        team.start()
    monkeypatch.undo()
    assert _team_threads() == [] and _blas_threads() == before and not team.is_open


def test_worker_counts_and_part_sizes_must_be_whole_finite_numbers() -> None:
    for workers in (2.5, "2", True, None, [2]):  # int() took the first three, silently
        with pytest.raises(TypeError, match="workers must be an int"):
            ComputeTeam(workers)
    with pytest.raises(ValueError, match="workers=-1"):
        ComputeTeam(-1)
    assert ComputeTeam(np.int64(2)).workers == 2
    with pytest.raises(RuntimeError, match=r"not started: .* team.start\(\)"):
        ComputeTeam(2).submit(print)  # was "this compute team is new: it takes no new tasks"
    for field in ("part_flops", "part_elements"):
        for value in (float("inf"), float("nan")):  # int() raised OverflowError or a bare one
            with pytest.raises(ValueError, match=f"{field} must be a finite number"):
                ComputeTeam(2, **{field: value})


def test_elementwise_leaves_lists_and_other_arrays_whole(team: ComputeTeam) -> None:
    # a nested list went whole to every part, where its rows did not broadcast
    x = np.arange(3000.0).reshape(100, 30)
    for other in (x.tolist(), [x.tolist(), x.tolist()], np.ma.masked_array(x)):
        before = team.statistics().splits
        out = team.elementwise(np.add, x, other)
        ref = np.add(x, other)
        assert type(out) is type(ref) and np.array_equal(out, ref)
        assert team.statistics().splits == before
    assert np.array_equal(team.elementwise(np.add, x, np.float32(2)), x + np.float32(2))


def test_a_part_that_multiplies_an_array_by_its_own_transpose_stays_whole(
    team: ComputeTeam,
) -> None:
    # x @ x[:32].T is a general product, but its first part of 32 rows would be
    # x[:32] @ x[:32].T, which numpy computes with BLAS's symmetric product (other rounding)
    for dtype in (np.float32, np.float64):
        x: Any = np.random.default_rng(14).standard_normal((64, 50)).astype(dtype)
        assert team.product_plan(64, 32, 50) == (0, (0, 32, 64))
        assert np.array_equal(team.matmul(x, x[:32].T), x @ x[:32].T)
        assert np.array_equal(team.matmul(x[:32], x.T), x[:32] @ x.T)  # columns: the same
    assert team.statistics().splits == 0


def test_byte_swapped_arrays_come_back_in_numpys_native_dtype(team: ComputeTeam) -> None:
    x = np.random.default_rng(15).standard_normal((64, 48)).astype(">f8")
    y = np.ascontiguousarray(x.T)
    cases = [
        (team.matmul(x, y), x @ y),
        (team.sum_rows(x), x.sum(axis=0)),
        (team.elementwise(np.add, x, x), x + x),
    ]
    with using_team(team):
        cases.append((matmul(x, y), x @ y))
    cases.append((matmul(x, y), x @ y))  # no team: the dispatch alone
    for out, ref in cases:
        assert out.dtype == ref.dtype and out.dtype.isnative
        np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_part_flops_is_a_read_only_property() -> None:
    # the part size was private: a run's trace header read team._part_flops to record it
    assert ComputeTeam(2, part_flops=1_500.7).part_flops == 1_500
    from asyncnn.backends._parallel import DEFAULT_PART_FLOPS

    assert ComputeTeam(2).part_flops == DEFAULT_PART_FLOPS
    team = ComputeTeam(2, part_flops=1_000)
    with pytest.raises(AttributeError):
        team.part_flops = 5  # type: ignore[misc]


def test_a_failing_excepthook_does_not_end_the_worker(monkeypatch: Any) -> None:
    # The hook's error ended the worker: the team, still open, took tasks that no thread ran
    def failing_hook(args: Any) -> None:
        raise RuntimeError("the hook failed")

    reported: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", failing_hook)
    monkeypatch.setattr(sys, "excepthook", lambda kind, exc, tb: reported.append(exc))
    ran = threading.Event()
    with ComputeTeam(1, name="test-team") as one:
        one.submit(lambda: 1 / 0)
        one.submit(ran.set)
        assert ran.wait(5)
    assert [str(e) for e in reported] == ["the hook failed"]


def test_a_team_of_more_workers_than_the_limit_is_refused_naming_workers() -> None:
    # ComputeTeam(10**9) failed with an empty MemoryError (its counters, one per worker)
    from asyncnn.backends import MAX_POOL_WORKERS

    for n in (MAX_POOL_WORKERS + 1, 10**9):
        with pytest.raises(ValueError, match=rf"workers must be at most {MAX_POOL_WORKERS}"):
            ComputeTeam(n)
    assert ComputeTeam(MAX_POOL_WORKERS).workers == MAX_POOL_WORKERS  # made, not started


@pytest.mark.parametrize(
    ("args", "error", "said"),
    [
        ((10, 3, -4), ValueError, "align must be at least 1, got -4"),  # was (0, 8): rows lost
        ((10, 3, 0), ValueError, "align must be at least 1, got 0"),  # was ZeroDivisionError
        ((10, 3, 1.5), TypeError, "align must be an int, got 1.5"),
        ((-1, 3), ValueError, "length must be at least 0, got -1"),
        ((10, 0), ValueError, "parts must be at least 1, got 0"),
        (("10", 3), TypeError, "length must be an int, got '10'"),
    ],
)
def test_split_bounds_refuses_bad_arguments_naming_them(
    args: tuple[Any, ...], error: type[Exception], said: str
) -> None:
    with pytest.raises(error, match=rf"^split_bounds: {said}"):
        split_bounds(*args)
    assert split_bounds(0, 3) == (0, 0)  # an empty range: one empty piece


def test_a_team_planning_for_more_workers_than_its_threads_gives_that_teams_bits() -> None:
    # A product was cut into one part per thread: a cluster's worker with fewer threads than
    # one process cut it otherwise, and its sums differed in the last bits. A team now plans
    # for plan_workers, whatever its threads; the parts beyond them run one after another.
    a, b = _operands(96, 300, 130, np.float32, seed=21)
    with ComputeTeam(4, part_flops=1_000) as four:
        want = four.matmul(a, b)
        assert len(four.product_plan(96, 130, 300)[1]) == 5  # four parts
    for threads in (1, 2, 3):
        with ComputeTeam(threads, part_flops=1_000, plan_workers=4) as planned:
            assert planned.workers == threads and planned.plan_workers == 4
            assert planned.product_plan(96, 130, 300) == four.product_plan(96, 130, 300)
            got = planned.matmul(a, b)
            with using_team(planned):
                dispatched = matmul(a, b)
            stats = planned.statistics()
        assert got.tobytes() == want.tobytes() and dispatched.tobytes() == want.tobytes()
        assert stats.splits == 2 and stats.parts == 8  # every part ran, on `threads` threads
        assert "products planned for 4" in repr(planned)
    # by default a team plans for its threads
    with ComputeTeam(2, part_flops=1_000) as two:
        assert two.plan_workers == 2 and len(two.product_plan(96, 130, 300)[1]) == 3
    for wrong, error in ((0, ValueError), (2.5, TypeError), (10**9, ValueError)):
        with pytest.raises(error, match="plan_workers must be"):
            ComputeTeam(2, plan_workers=wrong)  # type: ignore[arg-type]


def test_the_passes_cut_by_threads_give_the_same_bits_for_any_team_size() -> None:
    # Elementwise passes, bias-gradient sums and elementwise optimizer updates are cut by the
    # team's threads, not by plan_workers: what the runtime cuts this way (adds, a broadcast
    # bias add, ReLU and its gradient, column sums, SGD/Adam/AdamW updates) must give the
    # same bits whatever the team's size, or a cluster's worker would round otherwise.
    from asyncnn import optim
    from asyncnn._math._rules_elementwise import _relu_grad
    from asyncnn.backends._dtypes import acc_sum

    rng = np.random.default_rng(22)
    for dtype in (np.float32, np.float64):
        x, g = (rng.standard_normal((203, 67)).astype(dtype) for _ in range(2))
        bias = rng.standard_normal(67).astype(dtype)
        results = []
        for n in (1, 2, 3, 5):
            with ComputeTeam(n, part_elements=500) as t, using_team(t):
                out = [
                    elementwise(np.add, x, g), elementwise(np.add, x, bias),
                    elementwise(np.maximum, x, 0), elementwise(_relu_grad, g, np.maximum(x, 0)),
                    acc_sum(x, axis=0),
                ]  # fmt: skip
                for opt in (
                    optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                    optim.Adam(lr=1e-3, weight_decay=0.01), optim.AdamW(lr=1e-3),
                ):  # fmt: skip
                    buffers = tuple(np.abs(g) + 0.5 for _ in opt.buffer_names())
                    p, new = opt._update_leaf(x, g, buffers, 3, 1e-3)
                    out += [p, *new]
                assert (t.statistics().splits > 0) == (n > 1)
            results.append([o.tobytes() for o in out])
        assert all(r == results[0] for r in results[1:]), dtype
