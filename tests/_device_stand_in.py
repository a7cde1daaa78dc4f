"""A numpy stand-in for a CUDA device (the ``fake_cuda`` fixture): ``cuda:0`` as numpy arrays with
streams, events, asynchronous copies to the host and a clock, for tests of the runtime's path
for a device with streams on the CPU.

It computes at launch, but what a launch returns (its float arrays) and a copy to the host land
only when an event recorded after them is waited for or found done, as a real device's results
land later: a host read that skips the wait sees NaN, or zeros for a copy. Its clock advances by
one microsecond per timing event. Other races between streams (two streams writing one buffer)
are not modelled (``tests/test_gpu_*.py`` run the real device).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Any

import numpy as np
import pytest

from asyncnn.backends import _registry
from asyncnn.backends._base import Backend, Device

__all__ = ["fake_cuda"]


class _Stream:
    """Copies queued to the host, landed in order up to an event."""

    def __init__(self) -> None:
        self.queued: list[tuple[int, Any]] = []  # (position, copy)
        self.position = 0
        self.lock = threading.Lock()  # (a copy never lands a stream itself)

    def queue(self, copy: Any) -> None:
        """Queues ``copy`` behind the stream's work so far (it runs when that lands)."""
        with self.lock:
            self.position += 1
            self.queued.append((self.position, copy))

    def land(self, upto: int) -> None:
        # the copies run under the lock: two threads landing one stream at once (the trace's
        # writer asking whether an event is done while the loop launches) must not run a later
        # copy before an earlier one ends, as a stream runs in order (a host copy of a launch's
        # result would read its NaN)
        with self.lock:
            due = [c for p, c in self.queued if p <= upto]
            self.queued = [(p, c) for p, c in self.queued if p > upto]
            for copy in due:
                copy()


class _Event:
    def __init__(self, stream: _Stream | None, at: float = 0.0) -> None:
        self.stream = stream
        self.at = at  # the device clock when reached (timing events)
        self.position = 0 if stream is None else stream.position

    @property
    def done(self) -> bool:
        self.synchronize()  # the device is done by the time it is asked
        return True

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.land(self.position)


class _FakeDevice(Backend):
    """``cuda:0`` as numpy arrays with streams, events and asynchronous copies to the host."""

    name = "cupy"
    xp = np

    def __init__(self) -> None:
        self.device = Device("cuda", 0)
        self.default = _Stream()
        self.current = threading.local()
        self.clock = itertools.count(1)
        self.copies = 0
        self.streams: list[_Stream] = []
        self.host_buffers: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def _stream(self, stream: Any = None) -> _Stream:
        return stream or getattr(self.current, "stream", None) or self.default

    def rng(self, seed: Any) -> Any:
        return np.random.default_rng(seed)

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        return np.asarray(x, dtype=dtype)

    def is_local(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def to_numpy(self, x: Any) -> Any:
        return np.asarray(x)

    def to_host_async(self, x: Any, out: Any = None) -> Any:
        host = np.zeros(np.shape(x), dtype=np.asarray(x).dtype)
        self.host_buffers[id(host)] = host  # a host array already: never made late
        # read when the copy's turn comes: the launches before it on this stream have landed
        # by then (each launch lands its stream first), later ones have not yet written
        self._stream().queue(lambda: np.copyto(host, x))
        self.copies += 1
        return host

    def activate(self, stream: Any = None) -> Any:
        return self._activate(stream)

    @contextlib.contextmanager
    def _activate(self, stream: Any) -> Any:
        before = getattr(self.current, "stream", None)
        self.current.stream = stream or before
        try:
            yield self.current.stream
        finally:
            self.current.stream = before

    def new_stream(self) -> Any:
        stream = _Stream()
        self.streams.append(stream)
        return stream

    def record_event(self, stream: Any = None, blocking: bool = False) -> Any:
        return _Event(self._stream(stream))

    def timing_event(self, stream: Any = None) -> Any:
        return _Event(self._stream(stream), at=next(self.clock) * 1e-6)

    def elapsed(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(end.at - start.at)

    def synchronize(self) -> None:
        for stream in (self.default, *self.streams):  # every stream's work, as a device's
            stream.land(1 << 60)

    # -- results that land late --------------------------------------------------------------------
    # The float arrays a launch returns (itself, or in a tuple or list) hold NaN until an event
    # recorded after the launch is waited for or found done (by the host, or by another stream's
    # wait), as a real device's results are not there before its stream has run: a host read
    # that skips the producer's event sees NaN. (Arrays deeper in what a launch returns, such as
    # updated weights in a dict, are there at once.)
    def launch(self, fn: Any, args: tuple[Any, ...], stream: Any, after: Any) -> Any:
        s = self._stream(stream)
        for event in after:
            self.wait_event(event, stream)
        s.land(s.position)  # a stream runs in order: its earlier work is done by now
        with self.activate(stream):
            result = fn(*args)
        return self._late(result, s), self.record_event(stream)

    def wait_event(self, event: Any, stream: Any = None) -> None:
        if event is not None:
            event.synchronize()  # the waiting stream's later work comes after it

    def _late(self, result: Any, s: _Stream) -> Any:
        if isinstance(result, tuple):
            return tuple(self._late(r, s) for r in result)
        if isinstance(result, list):
            return [self._late(r, s) for r in result]
        if not isinstance(result, np.ndarray) or result.dtype.kind != "f":
            return result
        if self.host_buffers.get(id(result)) is result:
            return result
        early = np.full_like(result, np.nan)
        value = result.copy()
        s.queue(lambda: np.copyto(early, value))
        return early


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> _FakeDevice:
    fake = _FakeDevice()
    for key in ("cuda:0", "cuda", fake.device):
        monkeypatch.setitem(_registry._by_key, key, fake)
    monkeypatch.setitem(_registry._backends, fake.device, fake)
    return fake
