"""A distributed run's one trace (``asyncnn/_cluster/_traces.py``): the driver's and each
worker's events merged by time, and a worker's part that ends early said to be missing."""

from __future__ import annotations

from pathlib import Path

import asyncnn as ann
from asyncnn._cluster._traces import merge_traces
from asyncnn._runtime._recorder import Recorder
from asyncnn._tracing._summary import format_summary

from _trace_read_cases import _boundaries


def _part(path: Path, header: dict[str, object], times: list[float]) -> None:
    rec = Recorder(str(path), header)
    for i, t in enumerate(times):
        rec.t0 -= t  # (the event's time on the shared clock: merged in order)
        rec.event("scheduler", "admit", "", i, meta={"mb": i})
        rec.t0 += t
    rec.close()


def test_a_worker_part_that_ends_early_is_named_missing_in_the_merged_trace(
    tmp_path: Path,
) -> None:
    # (the other processes' close events made the merged trace read as whole, and a replay
    # then blamed "the file was altered" for the cut worker's sends)
    driver, w0, w1 = tmp_path / "run.trace", tmp_path / "w0.trace", tmp_path / "w1.trace"
    _part(driver, {"graph": {}}, [0.0, 3.0])
    _part(w0, {"worker": 0}, [1.0])
    _part(w1, {"worker": 1}, [2.0, 4.0])
    raw = w1.read_bytes()
    w1.write_bytes(raw[: _boundaries(raw)[-2]])  # worker 1's part without its close record
    merge_traces(str(driver), [str(w0), str(w1)])
    trace = ann.trace.read(driver)
    assert not trace.truncated and trace.closed  # (the driver's part is whole)
    admits = [e for e in trace.events if e.what == "admit"]
    assert len(admits) == 5
    assert ann.trace.summary(driver)["missing_workers"] == [1]
    assert "events of workers [1] are missing" in format_summary(ann.trace.summary(driver))
    # whole parts: nothing said missing
    _part(driver, {"graph": {}}, [0.0])
    _part(w1, {"worker": 1}, [2.0])
    merge_traces(str(driver), [str(w0), str(w1)])
    assert ann.trace.summary(driver)["missing_workers"] == []
