"""A distributed run's one trace (``asyncnn/_cluster/_traces.py``): the driver's and each
worker's events merged by time, and a worker's part that ends early said to be missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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


def test_a_merge_the_disk_refuses_raises_trace_write_error_and_keeps_the_drivers_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the bare "[Errno 28] No space left on device", of no file (the merged file's writes)
    import builtins
    import errno

    from asyncnn._cluster import _traces
    from asyncnn._errors import TraceWriteError

    driver, w0 = tmp_path / "run.trace", tmp_path / "w0.trace"
    _part(driver, {"graph": {}}, [0.0, 3.0])
    _part(w0, {"worker": 0}, [1.0])
    before = driver.read_bytes()

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.f.close()

    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(_traces, "open", opened, raising=False)
    with pytest.raises(TraceWriteError) as info:
        merge_traces(str(driver), [str(w0)])
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, RuntimeError)
    assert err.errno == errno.ENOSPC and err.filename == str(driver)
    assert str(err).startswith(f"writing the trace {str(driver)!r} failed (OSError: [Errno 28]")
    assert "the workers' events were not merged into it" in str(err)
    assert driver.read_bytes() == before  # the driver's part as it was, no debris beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trace", "w0.trace"]


def test_worker_parts_the_temporary_folder_refuses_raise_trace_write_error_naming_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the driver writes each worker's part to a temporary file before the merge: a full
    # temporary folder gave the bare "[Errno 28] No space left on device" and left the parts
    # written before it there
    import errno
    import os
    import tempfile

    from asyncnn._cluster import _driver
    from asyncnn._errors import TraceWriteError

    driver, w0 = tmp_path / "run.trace", tmp_path / "w0.trace"
    _part(driver, {"graph": {}}, [0.0])
    _part(w0, {"worker": 0}, [1.0])
    before = driver.read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(parts))
    real = os.fdopen
    opened: list[int] = []

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        opened.append(fd)
        f = real(fd, *args, **kwargs)
        if len(opened) == 2:  # the second part: the folder is full
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    raw = w0.read_bytes()
    with pytest.raises(TraceWriteError) as info:
        _driver._merge(str(driver), [raw, raw])
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(driver)
    assert "temporary folder" in str(info.value)
    assert driver.read_bytes() == before and list(parts.iterdir()) == []
