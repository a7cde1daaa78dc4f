"""The trace recorder (``asyncnn/_runtime/_recorder.py``): what a device is still writing is read
only once it has landed, and device clocks land on the trace's clock."""

from __future__ import annotations

import os
import threading
import types
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._runtime import _recorder
from asyncnn._runtime._recorder import (
    Later,
    Recorder,
    decode_tree,
    describe_arrays,
    digest,
    when_done,
)

from _reference import assert_params_equal
from _replay_cases import assert_same_tree


def _events(path: Path) -> list[Any]:
    """The run's events (without the closing event every whole trace ends with)."""
    return [e for e in ann.trace.read(path).events if e.what != "close"]


def test_a_pending_copy_is_read_after_it_lands_and_a_later_value_resolved(tmp_path: Path) -> None:
    # a device copy that lands only when waited for: before the wait, the host array holds
    # zeros; the digest must be that of the landed bytes
    landed = np.arange(6, dtype=np.float32).reshape(2, 3)
    host = np.zeros_like(landed)
    waited = threading.Event()

    def wait() -> None:
        host[...] = landed
        waited.set()

    rec = Recorder(str(tmp_path / "t.trace"), {"graph": {}})
    copies = when_done(types.SimpleNamespace(synchronize=wait), lambda: (host, None))
    rec.event("stage0", "send", "forward", 0, 0, "loss", 0, copies, True)
    rec.event("loss", "end", "forward", 0, 0, "", 0, meta={"loss": Later(lambda: 0.25)})
    rec.close()
    assert waited.is_set()
    send, end = _events(tmp_path / "t.trace")
    assert send["x"][0]["h"] == digest(landed) and send["x"][1] is None
    assert ann.trace.payload_array(send).tolist() == landed.tolist()
    assert end.meta == {"loss": 0.25}


class _ClockedDevice:
    """A device whose clock runs 100 s ahead of the host's and whose events are clock
    readings."""

    device = "cuda:7"

    def __init__(self) -> None:
        self.now = 100.0
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1

    def timing_event(self, stream: Any = None) -> float:
        return self.now

    def elapsed(self, start: float, end: float) -> float:
        return end - start


def test_device_spans_are_placed_on_the_trace_clock_from_one_reading(tmp_path: Path) -> None:
    dev = _ClockedDevice()
    rec = Recorder(str(tmp_path / "t.trace"), {"graph": {}})
    first = rec.device_spans(dev, [(100.0, 100.5), (100.5, 101.0)])
    at = rec._clocks["cuda:7"][1]  # the trace time at which the device read 100.0
    second = rec.device_spans(dev, [(102.0, 102.25)])
    rec.event("stage0", "device", "forward", 0, -1, "", 0, meta={"spans": first})
    rec.event("stage0", "device", "backward", 0, -1, "", 1, meta={"spans": second})
    rec.close()
    assert dev.synchronized == 1  # the clocks are matched once per device
    a, b = _events(tmp_path / "t.trace")
    assert a.meta["spans"] == [[at, at + 0.5], [at + 0.5, at + 1.0]]
    assert b.meta["spans"] == [[at + 2.0, at + 2.25]]


def test_a_second_recorder_of_a_path_being_written_is_refused(tmp_path: Path) -> None:
    # the second would empty the file and write over the first's records: both runs' events
    # silently lost or mixed
    path = str(tmp_path / "t.trace")
    first = Recorder(path, {"graph": {}})
    first.event("stage0", "start", "forward", 0, 0, "", 0)
    with pytest.raises(OSError, match="being written by another run.*its own trace path"):
        Recorder(path, {"graph": {}})
    first.event("stage0", "end", "forward", 0, 0, "", 0)
    first.close()
    t = ann.trace.read(path)
    assert [e.what for e in t.events] == ["start", "end", "close"] and not t.truncated
    Recorder(path, {"graph": {}}).close()  # once closed, the path may be written again
    assert [e.what for e in ann.trace.read(path).events] == ["close"]


def test_a_trace_path_that_cannot_be_written_is_named_before_the_run_trains(
    tmp_path: Path,
) -> None:
    # (a bare "[Errno 2] No such file or directory", which did not say it was the trace)
    graph, batch = _two_stages()
    folder = tmp_path / "no"
    folder.mkdir()  # (the Trainer refuses a missing folder itself: this one goes before the fit)
    tr = ann.Trainer(graph, optim.SGD(lr=0.1), policies.Sync(), trace=str(folder / "t"))
    folder.rmdir()
    before = tr.params
    with pytest.raises(FileNotFoundError, match=r"the trace '.*t': its folder '.*no' does not"):
        tr.fit(batch, batch_size=8)
    assert all(
        np.array_equal(a[k], b[k])
        for name in before
        for a, b in zip(before[name], tr.params[name], strict=True)
        for k in a
    )
    with pytest.raises(IsADirectoryError, match="the trace '.*': it is a folder. Pass trace="):
        Recorder(str(tmp_path), {"graph": {}})


@pytest.mark.skipif(not os.path.exists(os.devnull), reason="needs a null device")
def test_recorders_to_the_null_device_are_neither_locked_nor_emptied() -> None:
    # a trace thrown away (to time the recording itself): any number of writers, no truncation
    first = Recorder(os.devnull, {"graph": {}})
    second = Recorder(os.devnull, {"graph": {}})
    first.event("stage0", "start", "forward", 0, 0, "", 0)
    second.close()
    first.close()


def _two_stages() -> tuple[ann.Graph, dict[str, np.ndarray]]:
    """A two-stage classifier and a batch of 8 rows for it."""
    graph = ann.Graph.sequential(
        [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=2,
        input_shape=(None, 4),
    )
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((8, 4)).astype(np.float32), "y": rng.integers(0, 3, 8)}
    return graph, batch


@pytest.mark.anyio
async def test_two_runs_recording_to_one_path_keep_the_first_runs_trace(tmp_path: Path) -> None:
    graph, batch = _two_stages()
    path = str(tmp_path / "run.trace")
    async with ann.open_run(graph, optim.SGD(lr=0.1), policies.Sync(), trace=path) as run:
        await run.step(batch)
        with pytest.raises(OSError, match="being written by another run"):
            async with ann.open_run(graph, optim.SGD(lr=0.1), policies.Sync(), trace=path):
                pass
        await run.step(batch)
    t = ann.trace.read(path)
    assert not t.truncated and t.state is not None
    assert [e.key for e in t.events if e.what == "admit"] == [0, 1]


@pytest.mark.anyio
async def test_a_run_cancelled_from_outside_says_so_in_its_trace(tmp_path: Path) -> None:
    # before, its trace looked like a run that ended cleanly (and a replay of it waited for the
    # work it left undone)
    graph, batch = _two_stages()
    path = str(tmp_path / "run.trace")
    with anyio.CancelScope() as scope:
        policy = policies.Async(max_active_keys=4)
        async with ann.open_run(graph, optim.SGD(lr=0.1), policy, trace=path) as run:
            for _ in range(3):
                await run.step(batch)
            scope.cancel()
            await run.step(batch)
    assert scope.cancelled_caught
    t = ann.trace.read(path)
    errors = [e for e in t.events if e.what == "error"]
    assert [(e.actor, e.meta["error"]) for e in errors] == [
        ("scheduler", "the run was cancelled from outside (a cancel scope or a timeout around it)")
    ]
    with pytest.raises(ann.TraceFormatError, match="ended with the error 'the run was cancelled"):
        ann.replay(path)


def test_an_error_without_a_message_is_recorded_by_its_kind(tmp_path: Path) -> None:
    # (a KeyboardInterrupt's text is empty: the trace said the run "ended with the error ''")
    from asyncnn._runtime._lifecycle import record_error

    path = str(tmp_path / "t.trace")
    rec = Recorder(path, {"graph": {}})
    record_error(rec, KeyboardInterrupt())
    record_error(rec, ann.ActorError("stage0", "forward", 3, ""))
    rec.close()
    assert [e.meta["error"] for e in ann.trace.read(path).events if e.what == "error"] == [
        "the run was interrupted (KeyboardInterrupt)",
        "ActorError",
    ]


def test_a_pinned_forward_records_the_version_it_computed_with(tmp_path: Path) -> None:
    # the start of a forward said the stage's latest version, not the one PipeDream2BW pins
    graph = ann.Graph.sequential(
        [nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=[2, 2, 1],
        input_shape=(None, 4),
    )
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((48, 4)), "y": rng.integers(0, 3, 48)}
    path = tmp_path / "run.trace"
    tr = ann.Trainer(graph, optim.SGD(lr=0.1), policies.PipeDream2BW(2), trace=str(path))
    tr.fit(data, batch_size=8)
    events = _events(path)
    minibatch = {e.key: e.meta["minibatch"] for e in events if e.what == "admit"}
    starts = [e for e in events if e.what == "start" and e.kind == "forward" and e.actor != "loss"]
    assert len(starts) == 3 * 12
    # every forward of minibatch b uses the version from before minibatch b - 1's update
    assert [e.version for e in starts] == [max(minibatch[e.key] - 1, 0) for e in starts]
    assert ann.replay(path).identical


def test_a_flushing_run_records_one_flush_per_minibatch(tmp_path: Path) -> None:
    # the drain that ends a fit and the one on leaving the run both recorded the last flush,
    # and a step after a drain recorded the drained minibatch's flush again
    graph, batch = _two_stages()
    tr = ann.Trainer(graph, optim.SGD(lr=0.1), policies.GPipe(2), trace=str(tmp_path / "f"))
    data = {k: np.concatenate([v] * 3) for k, v in batch.items()}
    tr.fit(data, batch_size=8)
    tr.fit(data, batch_size=8)  # resumed: minibatches 3..5, in its own trace

    def flushes(path: Path) -> list[int]:
        return [e.meta["minibatch"] for e in _events(path) if e.what == "flush"]

    assert flushes(tmp_path / "f") == [0, 1, 2]
    assert flushes(tmp_path / "f.1") == [3, 4, 5]

    async def main() -> None:
        path = str(tmp_path / "run.trace")
        async with ann.open_run(graph, optim.SGD(lr=0.1), policies.GPipe(2), trace=path) as run:
            await run.step(batch)
            await run.drain()
            await run.step(batch)

    anyio.run(main)
    assert flushes(tmp_path / "run.trace") == [0, 1]


def test_a_deferred_header_takes_the_fields_the_run_knows_later(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    rec = Recorder(str(path), {"graph": {}}, defer_header=True)
    rec.event("stage0", "start", "forward", 0, 0, "", 0)  # queued behind the header
    assert rec.header_pending
    rec.complete_header(pool={"cpu_workers": 3})
    assert not rec.header_pending
    with pytest.raises(RuntimeError, match=r"complete already: fields \['seed'\]"):
        rec.complete_header(seed=1)
    rec.close()
    trace = ann.trace.read(path)
    assert trace.header["pool"] == {"cpu_workers": 3} and "seed" not in trace.header
    assert [e.what for e in trace.events] == ["start", "close"]
    # one that nothing completed is written as it stands when the recorder closes
    rec = Recorder(str(path), {"graph": {}}, defer_header=True)
    rec.close()
    assert ann.trace.read(path).header["graph"] == {}


def test_bfloat16_tensors_and_state_read_back_bit_for_bit(tmp_path: Path) -> None:
    # the writer failed on them ("cannot include dtype 'E' in a buffer"), and the state record
    # named bfloat16 by its str "<V2": it read back as raw bytes
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.array([0x3F80, 0x7FC1, 0xFF81, 0x0001, 0x8000, 0x7F80], dtype=np.uint16)
    bf16 = bits.view(ml_dtypes.bfloat16).reshape(2, 3)  # NaNs of two payloads, a subnormal, -0
    e5m2 = np.arange(4, dtype=np.uint8).view(ml_dtypes.float8_e5m2)  # its str "<f1" is unknown
    path = tmp_path / "t.trace"
    rec = Recorder(str(path), {"graph": {}})
    rec.state({"a": {"w": bf16}}, {"a": {}}, {"a": 0})
    rec.event("a", "send", "forward", 0, 0, "b", 0, (bf16, e5m2, bf16[0, 0]), True)
    rec.close()
    t = ann.trace.read(path)
    (send,) = _events(path)
    assert [x["d"] for x in send.tensors] == ["bfloat16", "float8_e5m2", "bfloat16"]
    assert [x["s"] for x in send.tensors] == [[2, 3], [4], []]
    # the digest is still of the bytes: the same as of their 16-bit integers
    assert send.tensors[0]["h"] == digest(bits) == digest(bf16)
    for i, want in enumerate((bf16, e5m2, bf16[0, 0])):
        got = ann.trace.payload_array(send, i)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == np.asarray(want).tobytes()
    assert t.header["packages"]["ml_dtypes"] == ml_dtypes.__version__
    w = decode_tree(t.state["params"])["a"]["w"]
    assert w.dtype == bf16.dtype and w.view(np.uint16).tolist() == bits.reshape(2, 3).tolist()


def test_a_bfloat16_run_records_its_trace_and_replays_identically(tmp_path: Path) -> None:
    pytest.importorskip("ml_dtypes")
    graph, batch = _two_stages()
    path = tmp_path / "run.trace"
    tr = ann.Trainer(
        graph, optim.SGD(lr=0.1), policies.GPipe(2), dtype="bfloat16", trace=str(path),
        trace_payloads="all",
    )  # fmt: skip
    tr.fit(batch, batch_size=8)
    sent = {x["d"] for e in _events(path) if e.what == "send" for x in e.tensors if x}
    assert "bfloat16" in sent
    for actor in (None, "stage1"):
        rep = ann.replay(path, actor=actor)
        assert rep.identical and rep.events_checked > 0
        for name, params in rep.params.items():
            if actor in (None, name):
                assert_params_equal({name: params}, {name: tr.params[name]})


def test_a_0d_tensor_is_recorded_of_shape_empty(tmp_path: Path) -> None:
    # np.ascontiguousarray made it 1-d: the trace said shape [1] (the digest was right)
    scalar = np.asarray(np.float32(2.5))
    info, payloads = describe_arrays([scalar], True)
    assert info[0] is not None and info[0]["s"] == [] and info[0]["n"] == 4
    assert info[0]["h"] == digest(scalar) == digest(scalar.reshape(1))
    paths = [tmp_path / "a.trace", tmp_path / "b.trace"]
    for path, value in zip(paths, (2.5, 3.5), strict=True):
        rec = Recorder(str(path), {"graph": {}})
        rec.event("a", "start", "forward", 0, 0, "", 0)
        rec.event("a", "send", "forward", 0, 0, "b", 0, (np.asarray(np.float32(value)),), True)
        rec.event("a", "end", "forward", 0, 0, "", 0)
        rec.close()
    (send,) = [e for e in _events(paths[0]) if e.what == "send"]
    assert send.tensors[0]["s"] == [] and ann.trace.payload_array(send).shape == ()
    assert ann.trace.diff(paths[0], paths[0]) is None
    d = ann.trace.diff(paths[0], paths[1])
    assert d is not None and d.actor == "a" and d.max_abs_diff == 1.0
    assert ann.trace.summary(paths[0])["events"] == 4  # (its closing event too)
    ann.trace.to_chrome(paths[0], tmp_path / "a.json")


def _state_tree() -> dict[Any, Any]:
    """A custom actor's state of every kind of leaf and key the trace keeps as it is."""
    return {
        "count": np.int64(3),
        "lr": np.float32(1.5),
        "half": np.float16(0.5),
        "flag": np.bool_(True),
        "zero_d": np.asarray(2.0),  # a 0-d array stays one
        "plain": [1, 2.5, "text", None, True, b"raw", (np.uint8(7), np.zeros((2, 0)))],
        # keys of each type msgpack keeps, mixed, in an order that is not sorted
        "by_step": {7: np.float64(0.25), "7": "seven as text", 0: 1, 2.5: None, None: 1, True: 2},
    }


def test_a_state_tree_reads_back_with_its_numpy_scalars_and_key_types(tmp_path: Path) -> None:
    # the trace kept every dict key as its str and a numpy scalar as a 0-d array: a replay
    # gave an actor {'7': array(0.25), ...} where the run had {7: np.float64(0.25), ...} (and
    # the keys 7 and "7" were one), which the cluster's wire keeps
    path = tmp_path / "t.trace"
    state = _state_tree()
    opt_state = {"step": 2, "by_group": {0: np.float32(0.1), 1: np.ones(2, np.float32)}}
    rec = Recorder(str(path), {"graph": {}})
    rec.state({"a": {"w": np.ones(2, np.float32)}}, {"a": opt_state}, {"a": 0},
              actor_states={"a": state})  # fmt: skip
    rec.close()
    t = ann.trace.read(path)
    assert_same_tree(decode_tree(t.state["actor_states"])["a"], state, "actor_states['a']")
    assert_same_tree(decode_tree(t.state["opt_states"])["a"], opt_state, "opt_states['a']")


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ((1, 2), r"the dict at \['seen'\] has the key \(1, 2\) of type tuple"),
        (
            np.int64(3),
            r"the dict at \['seen'\] has the key np\.int64\(3\) of type int64.*int\(key\)",
        ),
    ],
    ids=["tuple", "numpy int"],
)
def test_a_state_key_the_trace_cannot_keep_as_it_is_is_refused_naming_it(
    tmp_path: Path, key: Any, said: str
) -> None:
    # it was written as its str ("(1, 2)", "3"), and read back as that
    rec = Recorder(str(tmp_path / "t.trace"), {"graph": {}})
    try:
        with pytest.raises(TypeError, match=r"cannot hold the actor state of layer 'a'.*" + said):
            rec.state({}, {}, {}, actor_states={"a": {"seen": {key: 1}}})
    finally:
        rec.close()


@pytest.mark.parametrize("field", ["opt_states", "pending", "earlier"])
def test_a_key_the_trace_cannot_keep_in_the_runs_state_is_refused_before_it_starts(
    tmp_path: Path, field: str
) -> None:
    # these trees are encoded on the writer's thread after the run began: a custom optimizer's
    # state keyed by a tuple failed the trace at the run's end ("writing the trace failed")
    rec = Recorder(str(tmp_path / "t.trace"), {"graph": {}})
    trees: dict[str, Any] = {"opt_states": {}, "pending": {}, "earlier": {}}
    trees[field] = {"a": {(1, 2): np.ones(2)}}
    try:
        with pytest.raises(TypeError, match=rf"initial {field}: the dict at \['a'\] has the key"):
            rec.state({}, trees["opt_states"], {}, trees["pending"], None, trees["earlier"])
    finally:
        rec.close()


def test_a_state_tree_of_the_earlier_encoding_reads_as_it_was_written() -> None:
    # a tree written before numpy scalars and dict keys were kept as they are (keys as their
    # str, numpy scalars as 0-d arrays) reads as it did (test_replay_state replays a trace)
    earlier = {
        "dict": {
            "3": {"s": [], "d": "<i8", "b": np.int64(3).tobytes()},
            "w": {"s": [2], "d": "<f4", "b": np.ones(2, np.float32).tobytes()},
            "n": {"value": 1},
        }
    }
    got = decode_tree(earlier)
    assert_same_tree(got, {"3": np.asarray(np.int64(3)), "w": np.ones(2, np.float32), "n": 1})


# -- a writer that fails, a trace closed, a run stopped outside its actors ---------------------


def test_a_writer_that_fails_drops_every_later_event_and_close_names_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the events after the failure stayed queued, with their tensors, until the run's end; and
    # close() raised the bare OSError of its own flush instead of the error naming the trace
    import errno
    import time

    def full(self: Recorder, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Recorder, "_write", full)
    path = str(tmp_path / "t.trace")
    rec = Recorder(path, {"graph": {}})
    deadline = time.monotonic() + 30
    while rec.failure() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    failure = rec.failure()
    assert isinstance(failure, RuntimeError) and isinstance(failure.__cause__, OSError)
    assert f"writing the trace {path!r} failed (OSError" in str(failure)
    big = np.ones(1 << 16, np.float32)
    for i in range(100):
        rec.event("stage0", "send", "forward", i, 0, "loss", i, (big,), True)
    assert rec._queue.qsize() == 0  # dropped, not held for a writer that is gone
    with pytest.raises(RuntimeError, match="writing the trace .* failed") as info:
        rec.close()
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_trace_whose_last_flush_fails_fails_the_fit_naming_the_trace() -> None:
    # the close's flush raised the bare "[Errno 28] No space left on device"
    graph, batch = _two_stages()
    tr = ann.Trainer(graph, optim.SGD(lr=0.1), policies.Sync(), trace="/dev/full")
    with pytest.raises(RuntimeError, match="writing the trace '/dev/full' failed") as info:
        tr.fit(batch, batch_size=4)
    assert isinstance(info.value.__cause__, OSError)
    # as on any failure after the run's updates, the trainer keeps them and the history
    assert tr.epochs_done == 1 and len(tr.history.losses) == 2
    assert [e["epoch"] for e in tr.history.epochs] == [0]


def test_a_failing_trace_file_the_user_did_not_name_says_what_it_is() -> None:
    # (a worker's part or a replay's own trace, temporary files: the error told the user to
    # pass trace= another path, which would not help, and replay takes no trace=)
    rec = Recorder("/dev/full", {"graph": {}})
    rec.advice = "it is the replay's own trace, a temporary file: free space in /tmp"
    rec.event("a", "admit", "", 0)
    with pytest.raises(
        RuntimeError, match=r"failed \(OSError: .*\); the events after the failure were not "
        r"recorded: it is the replay's own trace, a temporary file: free space in /tmp$",
    ):  # fmt: skip
        rec.close()


def test_a_trace_writer_that_fails_mid_fit_stops_the_fit_naming_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the fit trained on to its end (its events piling up in memory), then raised a bare
    # OSError without the history of the epochs it had done
    import errno
    import time

    real = Recorder._write
    written: list[int] = []

    def fills(self: Recorder, data: bytes) -> None:
        if len(written) >= 40:  # (the header, the state, then some events)
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        real(self, data)

    monkeypatch.setattr(Recorder, "_write", fills)

    class Slow(ann.callbacks.Callback):
        def on_epoch_end(self, trainer: Any, epoch: int, logs: Any) -> None:
            if epoch == 0:
                time.sleep(0.5)  # the writer has failed by now: the run's watch sees it

    graph, batch = _two_stages()
    path = str(tmp_path / "run.trace")
    tr = ann.Trainer(graph, optim.SGD(lr=0.1), policies.GPipe(2), trace=path)
    with pytest.raises(RuntimeError, match=f"writing the trace {path!r} failed") as info:
        tr.fit(batch, epochs=50, batch_size=4, callbacks=[Slow()])
    assert isinstance(info.value.__cause__, OSError)
    assert 1 <= tr.epochs_done < 50  # stopped, not trained on unrecorded
    assert tr.history.epochs[0]["epoch"] == 0  # the history of what it did is kept
    t = ann.trace.read(path)
    assert t.truncated and t.closed is False  # (what it holds reads; it never closed)


def test_a_whole_trace_ends_with_its_closing_event(tmp_path: Path) -> None:
    path = str(tmp_path / "t.trace")
    rec = Recorder(path, {"graph": {}})
    rec.event("stage0", "start", "forward", 0, 0, "", 0)
    rec.close()
    t = ann.trace.read(path)
    assert t.header["writes_close"] is True
    assert [e.what for e in t.events] == ["start", "close"] and t.events[-1].actor == "scheduler"
    assert t.closed is True and not t.truncated


@pytest.mark.parametrize(
    ("error", "said"),
    [(ValueError("callback boom"), "the run stopped on ValueError: callback boom"),
     (KeyboardInterrupt(), "the run was interrupted (KeyboardInterrupt)")],
    ids=["error", "ctrl-c"],
)  # fmt: skip
def test_a_run_stopped_by_a_callback_says_so_in_its_trace(
    tmp_path: Path, error: BaseException, said: str
) -> None:
    # the error event held only the bare text ('callback boom'; 'KeyboardInterrupt'): not
    # that the run stopped outside its actors, nor on what
    class Stops(ann.callbacks.Callback):
        def on_step_end(self, trainer: Any, step: int, logs: Any) -> None:
            if step == 1:
                raise error

    graph, batch = _two_stages()
    data = {k: np.concatenate([v] * 4) for k, v in batch.items()}
    path = str(tmp_path / "run.trace")
    tr = ann.Trainer(graph, optim.SGD(lr=0.1), policies.GPipe(2), trace=path)
    with pytest.raises(type(error)):
        tr.fit(data, batch_size=4, callbacks=[Stops()])
    errors = [e for e in ann.trace.read(path).events if e.what == "error"]
    assert [(e.actor, e.meta["error"]) for e in errors] == [("scheduler", said)]


class _RefusingFile:
    """A trace file whose writes the disk refuses (a full disk: no file named), its close fine."""

    def write(self, data: bytes) -> int:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


def test_a_trace_write_the_disk_refuses_raises_trace_write_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a plain RuntimeError, which the command line could tell from a bug only by its message
    import errno
    import time

    from asyncnn._errors import TraceWriteError

    monkeypatch.setattr(_recorder, "_open_alone", lambda path: _RefusingFile())
    path = str(tmp_path / "t.trace")
    rec = Recorder(path, {"graph": {}})
    deadline = time.monotonic() + 30
    while rec.failure() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for failure in (rec.failure(), pytest.raises(TraceWriteError, rec.close).value):
        assert isinstance(failure, TraceWriteError)
        # an OSError (the disk's errno, the trace file) and a RuntimeError (as it was before)
        assert isinstance(failure, OSError) and isinstance(failure, RuntimeError)
        assert failure.errno == errno.ENOSPC and failure.filename == path
        assert failure.strerror == "No space left on device"
        assert str(failure).startswith(
            f"writing the trace {path!r} failed (OSError: [Errno 28] No space left on device); "
            "the events after the failure were not recorded: free space"
        )
        assert isinstance(failure.__cause__, OSError) and failure.__suppress_context__
    # it pickles (an error sent on between processes) with what it holds
    import pickle

    back = pickle.loads(pickle.dumps(rec.failure()))
    assert type(back) is TraceWriteError and str(back) == str(rec.failure())
    assert (back.errno, back.filename) == (errno.ENOSPC, path)


def test_a_trace_writer_that_fails_on_no_disk_is_no_trace_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a writer's own bug, or a device's, is not a file the disk refused: a RuntimeError still)
    from asyncnn._errors import TraceWriteError

    def broken(arrays: Any, with_payload: bool) -> Any:
        raise ValueError("a bug")

    monkeypatch.setattr(_recorder, "describe_arrays", broken)
    rec = Recorder(str(tmp_path / "t.trace"), {}, payloads="none")
    rec.event("a", "send", tensors=(np.ones(2),))
    with pytest.raises(RuntimeError, match="writing the trace") as info:
        rec.close()
    assert not isinstance(info.value, TraceWriteError | OSError)
    assert isinstance(info.value.__cause__, ValueError)


# -- the writer's queue is bounded by the bytes it holds ---------------------------------------

#: an event's tensor in the tests of the bound: 64 KiB
_ROWS = 1 << 14


def _send(rec: Recorder, i: int, tensors: Any = None) -> None:
    """Queues event ``i``, its payload 64 KiB of ``i`` (the writer's view: ``(array,)``)."""
    if tensors is None:
        tensors = (np.full(_ROWS, i, np.float32),)
    rec.event("stage0", "send", "forward", i, 0, "loss", i, tensors, True)


def _assert_all_in_order(path: Path, n: int) -> None:
    sends = _events(path)
    assert [e.key for e in sends] == list(range(n))
    assert all(ann.trace.payload_array(e)[0] == e.key for e in sends)


@pytest.mark.timeout(60)
@pytest.mark.anyio
async def test_events_never_wait_and_wait_for_room_waits_for_a_writer_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the queue was unbounded: a run with trace_payloads="all" faster than its disk kept every
    # message's tensors in memory, without limit, until the writer reached them. The actors'
    # events still go in at once (an actor never waits on the disk); the run waits to admit
    gate = threading.Event()
    write = Recorder._write

    def gated(self: Recorder, data: bytes) -> None:
        gate.wait()  # a disk that takes nothing until the test lets it
        write(self, data)

    monkeypatch.setattr(Recorder, "_write", gated)
    path = tmp_path / "t.trace"
    bound = 1 << 20  # 16 events of 64 KiB (and their share of the per-event cost)
    rec = Recorder(str(path), {"graph": {}}, payloads="all", max_queued_bytes=bound)
    assert rec.max_queued_bytes == bound
    n = 64
    for i in range(8):
        _send(rec, i)
    assert not rec.backlogged()
    for i in range(8, n):  # past the bound, and the writer drains nothing: none of these waits
        _send(rec, i)
    assert rec.backlogged() and rec._queued_bytes > bound
    with anyio.move_on_after(0.05):
        await rec.wait_for_room()
        pytest.fail("wait_for_room returned while the writer held four times the bound")
    gate.set()
    with anyio.fail_after(30):
        await rec.wait_for_room()  # (the writer has written the queue down to the bound)
    assert rec._queued_bytes <= bound and not rec.backlogged()
    rec.close()
    assert rec._queued_bytes == 0
    _assert_all_in_order(path, n)


def _tiny_run_graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)],
        loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 64),
    )  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.anyio
async def test_a_run_traced_faster_than_its_disk_admits_keys_at_the_disk_s_pace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every record takes the disk 2 ms, the run makes them far faster: without the bound the
    # queue held nearly the whole run's events; with it, the bound and the keys in flight
    import time

    write = Recorder._write

    def slow(self: Recorder, data: bytes) -> None:
        time.sleep(0.002)
        write(self, data)

    monkeypatch.setattr(Recorder, "_write", slow)
    bound = 1 << 17
    monkeypatch.setitem(Recorder.__init__.__kwdefaults__, "max_queued_bytes", bound)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((32, 64)), "y": rng.integers(0, 4, 32)}
               for _ in range(24)]  # fmt: skip
    path = tmp_path / "t.trace"
    async with ann.open_run(
        _tiny_run_graph(), optim.SGD(lr=0.1), policies.PipeDream(2), dtype="float64",
        trace=str(path), trace_payloads="all",
    ) as run:  # fmt: skip
        rec = run.recorder
        assert rec is not None and rec.max_queued_bytes == bound
        for b in batches:
            await run.step(b)
        await run.drain()
        put, peak = rec._put_bytes, rec._peak_queued_bytes
    assert put > 20 * bound  # (what an unbounded queue could have held)
    assert peak < 4 * bound, (peak, bound)  # the bound, and the events of the keys in flight
    trace = ann.trace.read(path)
    admits = [e for e in trace.events if e.what == "admit"]
    assert len(admits) == 2 * len(batches)  # (PipeDream(2): two keys a minibatch) every one


@pytest.mark.timeout(60)
def test_a_deferred_header_holds_nothing_back_and_the_bound_counts_after_it(
    tmp_path: Path,
) -> None:
    # the writer writes nothing until the header is complete: a run waiting for it to drain,
    # on the thread that completes the header, would wait forever
    path = tmp_path / "t.trace"
    bound = 1 << 18
    rec = Recorder(str(path), {"graph": {}}, payloads="all", defer_header=True,
                   max_queued_bytes=bound)  # fmt: skip
    n = 40  # 2.5 MiB before the header: ten times the bound
    for i in range(n // 2):
        _send(rec, i)
    assert rec._queued_bytes > bound and not rec.backlogged()
    rec.complete_header(pool={"cpu_workers": 1})
    for i in range(n // 2, n):
        _send(rec, i)
    rec.close()
    assert ann.trace.read(path).header["pool"] == {"cpu_workers": 1}
    _assert_all_in_order(path, n)


@pytest.mark.timeout(60)
@pytest.mark.anyio
async def test_a_run_waiting_for_room_from_a_writer_that_fails_stops_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from asyncnn._errors import TraceWriteError

    gate = threading.Event()

    def full(self: Recorder, data: bytes) -> None:
        gate.wait()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Recorder, "_write", full)
    path = str(tmp_path / "t.trace")
    rec = Recorder(path, {"graph": {}}, payloads="all", max_queued_bytes=1 << 18)
    for i in range(200):
        _send(rec, i)
    assert rec.backlogged()
    gate.set()  # the disk refuses the header: the writer is gone, and the waiter must know
    with anyio.fail_after(30):
        await rec.wait_for_room()
    assert isinstance(rec.failure(), TraceWriteError)
    with pytest.raises(TraceWriteError, match="writing the trace"):
        rec.close()
    # what was queued was dropped, not held; and a later event is dropped at once
    assert rec._queued_bytes == 0
    _send(rec, 200)
    assert rec._queued_bytes == 0


def test_the_default_bound_is_256_mib_and_a_bound_that_is_no_positive_int_is_refused(
    tmp_path: Path,
) -> None:
    rec = Recorder(str(tmp_path / "t.trace"), {"graph": {}})
    assert rec.max_queued_bytes == _recorder.DEFAULT_MAX_QUEUED_BYTES == 256 << 20
    rec.close()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"max_queued_bytes must be a positive int"):
            Recorder(str(tmp_path / "u.trace"), {"graph": {}}, max_queued_bytes=bad)
