"""The runtime's path for a device with streams (a GPU's), on the CPU, with a numpy stand-in for
a CUDA device: its actors compute through streams and events, a loss value and a trace's copies
reach the host asynchronously, and a traced run writes when each op's work ran on the device.

The stand-in computes at launch (the arrays a launch returns are filled at once), but a copy to
the host lands only when an event recorded after it is waited for or found done, as a real
device's copy lands later: a host read that skips the wait sees zeros. Its clock advances by one
microsecond per timing event. Races between streams are not modelled (``tests/test_gpu_*.py``
run the real device).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn.backends import _registry
from asyncnn.backends._base import Backend, Device

from _reference import assert_params_equal


class _Stream:
    """Copies queued to the host, landed in order up to an event."""

    def __init__(self) -> None:
        self.queued: list[tuple[int, Any]] = []  # (position, copy)
        self.position = 0
        self.lock = threading.Lock()

    def land(self, upto: int) -> None:
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
        s = self._stream()
        snapshot = np.array(x)  # what the device holds when the copy's turn comes
        with s.lock:
            s.position += 1
            s.queued.append((s.position, lambda: np.copyto(host, snapshot)))
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
        return _Stream()

    def record_event(self, stream: Any = None) -> Any:
        return _Event(self._stream(stream))

    def timing_event(self, stream: Any = None) -> Any:
        return _Event(self._stream(stream), at=next(self.clock) * 1e-6)

    def elapsed(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(end.at - start.at)

    def synchronize(self) -> None:
        self.default.land(1 << 60)


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> _FakeDevice:
    fake = _FakeDevice()
    for key in ("cuda:0", "cuda", fake.device):
        monkeypatch.setitem(_registry._by_key, key, fake)
    monkeypatch.setitem(_registry._backends, fake.device, fake)
    return fake


def _graph(devices: list[str]) -> ann.Graph:
    modules = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    return ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=[2, 2, 1], devices=devices
    )


def _train(devices: list[str], policy: Any, trace: str | None = None) -> Any:
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((96, 6)), "y": rng.integers(0, 3, 96)}
    tr = ann.Trainer(
        _graph(devices), optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", seed=1,
        trace=trace,
    )  # fmt: skip
    history = tr.fit(data, epochs=2, batch_size=16)
    return tr, history


@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(4), policies.PipeDream(4)], ids=str
)
def test_device_actors_compute_what_cpu_actors_do(device: _FakeDevice, policy: Any) -> None:
    cpu, cpu_hist = _train(["cpu"] * 3, policy)
    dev, dev_hist = _train(["cuda:0"] * 3, policy)
    assert device.copies > 0  # the losses came back through asynchronous copies
    assert dev_hist.losses == cpu_hist.losses  # read after they landed, not before
    assert_params_equal(dev.params, cpu.params)


def test_a_traced_device_run_records_what_the_cpu_run_does_and_when_it_ran(
    device: _FakeDevice, tmp_path: Path
) -> None:
    cpu_trace, dev_trace = tmp_path / "cpu.trace", tmp_path / "dev.trace"
    _train(["cpu"] * 3, policies.PipeDream(4), str(cpu_trace))
    copies = device.copies
    _train(["cuda:0"] * 3, policies.PipeDream(4), str(dev_trace))
    assert device.copies > copies
    # the digests of the copies as they landed, the losses too
    assert ann.trace.diff(cpu_trace, dev_trace) is None
    trace = ann.trace.read(dev_trace)

    def losses(path: Path) -> list[Any]:
        ends = [e for e in ann.trace.read(path).events if e.actor == "loss" and e.what == "end"]
        return [(e.key, e.meta["loss"]) for e in ends]

    assert losses(dev_trace) == losses(cpu_trace)
    # a "device" event after each op's end, on the same actor and seq, with its spans in order
    ends = [(e.actor, e.seq) for e in trace.events if e.what == "end"]
    device_events = [e for e in trace.events if e.what == "device"]
    assert [(e.actor, e.seq) for e in device_events] == ends
    for e in device_events:
        flat = [t for span in e.meta["spans"] for t in span]
        assert flat == sorted(flat) and len(flat) >= 2
    assert not any(e.what == "device" for e in ann.trace.read(cpu_trace).events)
    assert ann.trace.to_chrome(dev_trace, tmp_path / "dev.json")["device_slices"] == sum(
        len(e.meta["spans"]) for e in device_events
    )
    use = ann.trace.summary(dev_trace)["devices"]["cuda:0"]
    assert use["busy_seconds"] > 0 and use["overlap"] >= 1.0
    replayed = ann.replay(dev_trace)
    assert replayed.identical
