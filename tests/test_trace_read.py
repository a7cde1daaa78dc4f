"""Recording and reading message traces: the header and initial state, the events and their
digests, payload modes, files cut off at every byte, damaged files, files that are not traces,
a writer that never makes actors wait, and the trace of a run that fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._math._pytree import tree_leaves
from asyncnn._runtime import _recorder
from asyncnn._runtime._lifecycle import RUN_PART_FLOPS, host_cores
from asyncnn._runtime._recorder import Recorder, decode_tree, digest

PREFIX = 12  # u32 length, u32 ~length, u32 crc32


def _graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)],
        loss=nn.CrossEntropyLoss(),
        stages=2,
        input_shape=(None, 4),
    )


def _data(n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32), "y": rng.integers(0, 2, n)}


def _record(
    path: Path, payloads: str = "inputs", policy: Any = None, n: int = 8, batch: int = 4
) -> tuple[ann.Trainer, dict[str, Any], Any, dict[str, np.ndarray]]:
    """Trains the tiny 2-stage graph with a trace; returns the trainer, its initial params, the
    history and the data."""
    tr = ann.Trainer(
        _graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policy or policies.Sync(),
        seed=3,
        trace=str(path),
        trace_payloads=payloads,
    )
    p0 = tr.params
    d = _data(n)
    hist = tr.fit(d, epochs=1, batch_size=batch)
    return tr, p0, hist, d


def _boundaries(raw: bytes) -> list[int]:
    """The byte offsets where records start, and the file's end."""
    out = [0]
    while out[-1] < len(raw):
        (n,) = struct.unpack_from("<I", raw, out[-1])
        out.append(out[-1] + PREFIX + n)
    assert out[-1] == len(raw)
    return out


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip_header_state_and_events(tmp_path: Path) -> None:
    path = tmp_path / "run.trace"
    tr, p0, hist, d = _record(path)
    assert tr.traces == [str(path)]
    t = ann.trace.read(path)
    assert not t.truncated
    h = t.header
    assert h["format"] == "asyncnn-trace" and h["version"] == 1
    assert h["graph"] == tr.graph.to_spec()
    assert ann.Graph.from_spec(h["graph"]).to_spec() == h["graph"]
    assert h["policy"] == policies.Sync().to_spec()
    assert h["optimizer"] == optim.SGD(lr=0.1).to_spec()
    assert h["seed"] == 3 and h["dtype"] == "float32"
    assert h["packages"]["asyncnn"] == ann.__version__
    assert h["packages"]["numpy"] == np.__version__
    # the pool the run's products were cut over (a replay opens the same)
    assert h["pool"] == {"cpu_workers": host_cores(), "part_flops": RUN_PART_FLOPS, "split": True}

    # the state record holds the weights the run started from, bit for bit
    assert t.state is not None
    start = decode_tree(t.state["params"])
    assert sorted(start) == sorted(p0) == ["stage0", "stage1"]
    for name in p0:
        a, b = tree_leaves(start[name]), tree_leaves(p0[name])
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype == np.float32
            np.testing.assert_array_equal(x, y)

    ev = t.events
    kinds = Counter(e["ev"] for e in ev)
    assert kinds["admit"] == 2 and kinds["flush"] >= 1 and "error" not in kinds
    # every start has its end, per actor and sequence number, in order
    for actor in ("stage0", "stage1", "loss"):
        starts = [
            (e["seq"], e["k"], e["key"]) for e in ev if e["a"] == actor and e["ev"] == "start"
        ]
        ends = [(e["seq"], e["k"], e["key"]) for e in ev if e["a"] == actor and e["ev"] == "end"]
        assert starts == ends and [s[0] for s in starts] == list(range(len(starts)))
        assert len(starts) == (2 if actor == "loss" else 4)  # 2 keys: F, B each (loss: F only)
    for actor in ("stage0", "stage1"):  # Sync: one update per minibatch and layer
        updates = [e for e in ev if e["a"] == actor and e["ev"] == "update"]
        assert [e["v"] for e in updates] == [1, 2]
        # made in the backward of each minibatch's last key (its seq, its key), with the
        # digests of the weights it made: the leaves of the tree, dict keys sorted
        assert [(e["seq"], e["key"]) for e in updates] == [(1, 0), (3, 1)]
        leaves = tree_leaves(tr.params[actor])
        assert updates[-1]["x"] == [
            {"s": list(a.shape), "d": "<f4", "n": a.nbytes, "h": digest(a)} for a in leaves
        ]
        assert "pl" not in updates[-1]
    # every receive is the arrival of a recorded send
    sends = Counter((e["a"], e["p"], e["k"], e["key"]) for e in ev if e["ev"] == "send")
    receives = Counter((e["p"], e["a"], e["k"], e["key"]) for e in ev if e["ev"] == "receive")
    assert sends == receives and sum(sends.values()) == 2 * (2 + 2 + 2)  # x, y, 2 fwd, 2 bwd
    # timestamps are monotonic
    stamps = [e["t"] for e in ev]
    assert stamps == sorted(stamps) and stamps[0] >= 0
    # the loss the loss actor recorded is the minibatch loss the trainer reports
    losses = [e["m"]["loss"] for e in ev if e["a"] == "loss" and e["ev"] == "end"]
    assert losses == pytest.approx(hist.losses, rel=1e-6)

    # digests: the data fed in, as float32 / int64 rows
    for key, (lo, hi) in enumerate(((0, 4), (4, 8))):
        (xs,) = [e for e in ev if e["ev"] == "send" and e["a"] == "x" and e["key"] == key]
        (ys,) = [e for e in ev if e["ev"] == "send" and e["a"] == "y" and e["key"] == key]
        assert xs["x"][0] == {
            "s": [4, 4],
            "d": "<f4",
            "n": 64,
            "h": digest(d["x"][lo:hi].astype(np.float32)),
        }
        assert ys["x"][0]["h"] == digest(d["y"][lo:hi].astype(np.int64))
        assert xs["p"] == "stage0" and ys["p"] == "loss"
    # ... and an activation: stage0's forward output for key 0, computed here at the initial weights
    (f0,) = [e for e in ev if e["ev"] == "send" and e["a"] == "stage0" and e["k"] == "forward"
             and e["key"] == 0]  # fmt: skip
    out = np.asarray(tr.graph.nodes["stage0"].module(p0["stage0"], d["x"][0:4]))
    assert f0["x"][0]["s"] == [4, 3] and f0["x"][0]["h"] == digest(out)


def test_digest_is_of_the_bytes_in_c_order() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert digest(a) == digest(np.ascontiguousarray(a.T).T.copy(order="C"))
    assert digest(a.T) == digest(np.ascontiguousarray(a.T))
    assert digest(a) != digest(a.astype(np.float64))
    b = a.copy()
    b[2, 3] = np.nextafter(b[2, 3], np.float32(20))  # one ulp
    assert digest(a) != digest(b)


def test_a_bfloat16_trace_reads_without_ml_dtypes_and_its_payload_says_what_it_needs(
    tmp_path: Path,
) -> None:
    # a trace of bfloat16 tensors was refused whole ("its dtype 'd' is 'bfloat16', not a
    # numeric numpy dtype"), with ml_dtypes installed or not
    from asyncnn._runtime._traceformat import FORMAT, VERSION, encode_record
    from asyncnn.backends import BFLOAT16

    bits = np.array([0x3F80, 0x7FC1, 0xFF81, 0x0001, 0x8000, 0x7F80], dtype=np.uint16)
    tensor = {"s": [2, 3], "d": "bfloat16", "n": 12, "h": digest(bits)}
    send = {"t": 0.5, "a": "x", "ev": "send", "key": 0, "x": [tensor], "pl": [bits.tobytes()]}
    path = tmp_path / "t.trace"
    path.write_bytes(encode_record({"format": FORMAT, "version": VERSION}) + encode_record(send))
    (event,) = ann.trace.read(path).events
    assert ann.trace.summary(path)["events"] == 1
    if BFLOAT16 is not None:  # ml_dtypes installed: the payload reads back bit for bit
        got = ann.trace.payload_array(event)
        assert got.dtype == BFLOAT16 and got.view(np.uint16).tolist() == bits.reshape(2, 3).tolist()
        return
    with pytest.raises(ann.TraceFormatError, match=r"'bfloat16'.*pip install ml_dtypes"):
        ann.trace.payload_array(event)


def test_replay_of_a_bfloat16_run_without_ml_dtypes_says_to_install_it(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    # it said only "the header's specs cannot be rebuilt: data type 'bfloat16' not understood"
    from asyncnn._runtime._traceformat import encode_record
    from asyncnn.backends import BFLOAT16

    if BFLOAT16 is not None:
        pytest.skip("ml_dtypes is installed: numpy knows bfloat16")
    raw, whole = small_trace
    path = tmp_path / "bf16.trace"
    header = {**whole.header, "dtype": "bfloat16"}
    path.write_bytes(encode_record(header) + raw[_boundaries(raw)[1] :])
    with pytest.raises(ann.TraceFormatError, match=r"dtype 'bfloat16'.*pip install ml_dtypes"):
        ann.replay(path)


def test_streaming_reader_gives_the_same_trace(tmp_path: Path) -> None:
    path = tmp_path / "run.trace"
    _record(path)
    whole = ann.trace.read(path)
    with ann.trace.open_trace(path) as reader:
        assert reader.header == whole.header and reader.state == whole.state
        assert list(reader) == whole.events
        assert reader.truncated is False
    assert "events" in repr(whole)


def test_a_second_fit_writes_a_second_trace(tmp_path: Path) -> None:
    tr, _, _, d = _record(tmp_path / "run.trace")
    tr.fit(d, batch_size=4)
    assert tr.traces == [str(tmp_path / "run.trace"), str(tmp_path / "run.1.trace")]
    second = ann.trace.read(tmp_path / "run.1.trace")
    assert second.header["start"] == {"minibatches": 2, "keys": 2}
    assert [e["key"] for e in second.events if e["ev"] == "admit"] == [2, 3]


# -- payload modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inputs", "all", "none"])
def test_payload_modes(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"{mode}.trace"
    _, _, _, d = _record(path, payloads=mode)
    t = ann.trace.read(path)
    sends = [e for e in t.events if e["ev"] == "send"]
    assert len(sends) == 12
    assert not any("pl" in e for e in t.events if e["ev"] != "send")
    for e in sends:
        is_input = e["a"] in ("x", "y")
        kept = mode == "all" or (mode == "inputs" and is_input)
        assert ("pl" in e) == kept, (mode, e["a"], e["k"])
        if not kept:
            assert ann.trace.payload_array(e) is None
            continue
        arr = ann.trace.payload_array(e)
        assert arr is not None
        meta = e["x"][0]
        assert list(arr.shape) == meta["s"] and arr.dtype.str == meta["d"]
        assert digest(arr) == meta["h"]  # the payload is the tensor the digest was taken of
        if is_input:
            lo = 4 * e["key"]
            np.testing.assert_array_equal(arr, d[e["a"]][lo : lo + 4])
    assert ann.trace.payload_array(sends[0], 5) is None  # no such tensor


def test_payloads_stay_aligned_with_missing_tensors() -> None:
    a, b = np.ones((2, 2), np.float32), np.arange(3)
    info, pl = _recorder.describe_arrays((a, None, b), True)
    assert info[1] is None and pl[1] is None and len(pl) == 3
    event = {"x": info, "pl": pl}
    np.testing.assert_array_equal(ann.trace.payload_array(event, 2), b)
    assert ann.trace.payload_array(event, 1) is None
    info, pl = _recorder.describe_arrays((a, None), False)
    assert pl == [] and info[0] is not None and info[0]["h"] == digest(a)


def test_unknown_payload_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trace_payloads must be one of .*'some'"):
        ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
                    trace=str(tmp_path / "t"), trace_payloads="some")  # fmt: skip


# -- files cut off, damaged, or not traces ------------------------------------------------------


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    """A 2-stage Sync run of 2 tiny minibatches: its bytes and its reading."""
    path = tmp_path_factory.mktemp("small") / "small.trace"
    _record(path)
    return path.read_bytes(), ann.trace.read(path)


def test_cut_at_every_byte(small_trace: tuple[bytes, Any], tmp_path: Path) -> None:
    raw, whole = small_trace
    bounds = _boundaries(raw)
    records = [whole.header, {"state": whole.state}, *whole.events]
    assert len(bounds) == len(records) + 1
    path = tmp_path / "cut.trace"
    for cut in range(len(raw) + 1):
        path.write_bytes(raw[:cut])
        if cut < bounds[1]:  # inside the header
            with pytest.raises(ann.TraceFormatError, match="not an asyncnn trace"):
                ann.trace.read(path)
            continue
        t = ann.trace.read(path)
        whole_records = sum(1 for b in bounds[1:] if b <= cut)
        assert t.truncated == (cut not in bounds), cut
        assert t.header == whole.header
        assert t.state == (whole.state if whole_records >= 2 else None), cut
        assert t.events == whole.events[: max(0, whole_records - 2)], cut


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
@given(
    changes=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4
    ),
)
@pytest.mark.timeout(60)  # reading is a loop that advances through the file or stops
def test_damage_anywhere_is_refused_naming_the_record(
    small_trace: tuple[bytes, Any], tmp_path: Path, changes: list[tuple[float, int]]
) -> None:
    """Any changed byte is detected: a prefix byte breaks ``length == ~check`` (both would have to
    change together) or the checksum (the CRC field itself); a payload byte breaks the CRC-32,
    which detects every error within 32 consecutive bits, so every change of a single byte. Several
    scattered changes escape it with probability 2**-32 only. A length changed together with its
    complement so that it runs past the end is told by a whole record after it, except in the
    last record, where it is what a cut-off write leaves. So ``read`` never succeeds here but in
    that one case, which reads as truncated."""
    raw, _ = small_trace
    bounds = _boundaries(raw)
    data = bytearray(raw)
    offsets = []
    for where, xor in changes:
        i = int(where * len(raw))
        data[i] ^= xor  # xor with a nonzero mask: the byte always changes
        offsets.append(i)
    if bytes(data) == raw:  # two changes of the same byte cancelled out
        return
    first = min(i for i in offsets if data[i] != raw[i])
    record = max(r for r, b in enumerate(bounds[:-1]) if b <= first)
    path = tmp_path / "damaged.trace"
    path.write_bytes(bytes(data))
    last = bounds[-2]
    n, check = struct.unpack_from("<II", data, last)
    if first >= last and n ^ 0xFFFFFFFF == check and n > len(data) - last - 12:
        # the last record's length and complement changed alike, past the end: exactly what a
        # cut-off write leaves (see test_a_length_damaged_with_its_complement_...)
        assert ann.trace.read(path).truncated
        return
    with pytest.raises(ann.TraceFormatError) as info:
        ann.trace.read(path)
    msg = str(info.value)
    assert str(path) in msg
    if record == 0:
        assert "not an asyncnn trace" in msg
    assert f"record {record} at byte {bounds[record]}" in msg, msg


def test_a_length_damaged_with_its_complement_is_refused_naming_the_record(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    # hypothesis found it: the same bits flipped in a length and in its complement keep the
    # prefix consistent while the length runs past the file's end, which alone would read as a
    # cut-off write; a whole record after it tells the damage
    raw, whole = small_trace
    bounds = _boundaries(raw)
    path = tmp_path / "damaged.trace"
    for record, at in enumerate(bounds[:-1]):
        data = bytearray(raw)
        data[at + 1] ^= 24
        data[at + 5] ^= 24
        path.write_bytes(bytes(data))
        if record == len(bounds) - 2:  # the last: nothing follows, as after a cut-off write
            t = ann.trace.read(path)
            assert t.truncated and t.events == whole.events[:-1]
            continue
        with pytest.raises(ann.TraceFormatError) as info:
            ann.trace.read(path)
        msg = str(info.value)
        assert f"record {record} at byte {at}" in msg and "whole record follows" in msg, msg
        if record == 0:
            assert "not an asyncnn trace" in msg


def test_damaged_state_record_closes_the_file(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    raw, _ = small_trace
    bounds = _boundaries(raw)
    data = bytearray(raw)
    data[bounds[1] + PREFIX + 5] ^= 0xFF
    path = tmp_path / "damaged.trace"
    path.write_bytes(bytes(data))
    # filterwarnings=error turns a leaked file (ResourceWarning) into a failure
    with pytest.raises(ann.TraceFormatError, match=rf"record 1 at byte {bounds[1]} is damaged"):
        ann.trace.open_trace(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00",
        b'{"format": "asyncnn-trace"}',
        json.dumps({"format": "asyncnn-trace", "version": 1, "events": list(range(50))}).encode(),
        bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        bytes(12),  # a zero-length record: the length check fails
    ],
    ids=["empty", "one-byte", "short-json", "json", "random", "zeros"],
)
def test_a_file_that_is_not_a_trace(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not.trace"
    path.write_bytes(content)
    with pytest.raises(ann.TraceFormatError, match="is not an asyncnn trace"):
        ann.trace.read(path)


def test_a_framed_record_of_another_format_is_not_a_trace(tmp_path: Path) -> None:
    from asyncnn._runtime._traceformat import encode_record

    path = tmp_path / "other.trace"
    path.write_bytes(encode_record({"format": "something-else", "version": 1}))
    with pytest.raises(ann.TraceFormatError, match="not an asyncnn trace.*'something-else'"):
        ann.trace.read(path)
    path.write_bytes(encode_record({"format": "asyncnn-trace", "version": 99}))
    with pytest.raises(
        ann.TraceFormatError, match="format version 99; this asyncnn reads version 1"
    ):
        ann.trace.read(path)


# -- the writer never makes actors wait ---------------------------------------------------------


def test_event_is_a_queue_put_the_writer_does_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the writer thread held up, thousands of events (with tensors to digest and keep) are
    still accepted at once by the calling thread; the digesting and writing all happen on the
    writer thread, and nothing is lost or reordered."""
    gate = threading.Event()
    threads: set[str] = set()
    real = _recorder.describe_arrays

    def held(arrays: Any, with_payload: bool) -> Any:
        threads.add(threading.current_thread().name)
        assert gate.wait(30), "the test never released the writer"
        return real(arrays, with_payload)

    monkeypatch.setattr(_recorder, "describe_arrays", held)
    path = tmp_path / "hot.trace"
    rec = Recorder(str(path), {"seed": 0}, payloads="all")
    big = np.arange(2048, dtype=np.float32)  # 8 kB each: digests and payloads cost
    n = 3000
    for i in range(n):
        rec.event("a", "send", "forward", i, 0, "b", i, (big,), True)
    # every event returned while the writer was stuck on the first one
    assert rec.events == 0 and rec._queue.qsize() >= n - 1
    assert threading.current_thread().name not in threads
    gate.set()
    rec.close()
    assert threads == {"asyncnn-trace-writer"}
    t = ann.trace.read(path)
    assert [e["key"] for e in t.events] == list(range(n)) and rec.events == n
    assert t.events[-1]["x"][0]["h"] == digest(big)


def test_writer_failure_is_reported_by_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(arrays: Any, with_payload: bool) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(_recorder, "describe_arrays", broken)
    rec = Recorder(str(tmp_path / "t.trace"), {}, payloads="none")
    rec.event("a", "send", tensors=(np.ones(2),))
    with pytest.raises(RuntimeError, match="writing the trace") as info:
        rec.close()
    assert isinstance(info.value.__cause__, OSError)


# -- the summary's numbers ----------------------------------------------------------------------


def test_summary_counts_a_split_backward_once_and_its_key_until_its_weight_half(
    tmp_path: Path,
) -> None:
    # ZeroBubbleH1 splits each backward in two computes (input half, weight half): the summary
    # counted 16 backwards for 8 keys, let a key out of flight once as many halves had ended
    # as there are layers (a chain of four: mean 1.79 keys in flight where 2.20 were), and
    # dropped a stored activation at the input half (its stage1: peak 3 where it held 4)
    graph = ann.Graph.sequential(
        [nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)],
        loss=nn.CrossEntropyLoss(),
        stages=[1, 2, 2],
        input_shape=(None, 4),
    )
    path = tmp_path / "zb.trace"
    tr = ann.Trainer(graph, optim.SGD(lr=0.1), policies.ZeroBubbleH1(4, virtual=1), trace=str(path))
    hist = tr.fit(_data(32), batch_size=16)
    s = ann.trace.summary(path)
    for name in tr.graph.layers:
        assert s["actors"][name]["backwards"] == s["actors"][name]["forwards"] == 8
        assert s["actors"][name]["peak_stored"] == hist.statistics[name].peak_stored, name
    # by hand: a key is in flight from its admit to the end of the last backward compute
    events = ann.trace.read(path).events
    admit = {e.key: e.time for e in events if e.what == "admit"}
    done = {e.key: e.time for e in events if e.what == "end" and e.kind == "backward"}
    changes = sorted([(admit[k], 1) for k in admit] + [(done[k], -1) for k in admit])
    area, n, last = 0.0, 0, 0.0
    for t, d in changes:
        area, n, last = area + n * (t - last), n + d, t
    assert s["in_flight"]["mean"] == pytest.approx(area / s["seconds"])


def test_summary_staleness_is_the_delays_the_layers_record(tmp_path: Path) -> None:
    # PipeDream-2BW's forwards use a pinned version, older than the one a start event records:
    # the summary gave stage0 a mean staleness of 0.125 where the layer recorded 0.5 (and the
    # last stage of a longer chain 0 where every gradient was one update late)
    path = tmp_path / "2bw.trace"
    tr = ann.Trainer(
        _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream2BW(4), trace=str(path)
    )
    hist = tr.fit(_data(32), batch_size=16)
    s = ann.trace.summary(path)["actors"]
    for name in tr.graph.layers:
        st = hist.statistics[name]
        assert (s[name]["staleness_mean"], s[name]["staleness_max"]) == (
            pytest.approx(st.mean_delay),
            st.max_delay,
        ), name
    assert hist.statistics["stage1"].max_delay == 1


# -- the trace of a run that fails --------------------------------------------------------------


@dataclass(frozen=True)
class Exploding(nn.Module):
    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        raise FloatingPointError("boom in the layer")


def test_failed_run_trace_ends_with_the_error(tmp_path: Path) -> None:
    g = ann.Graph()
    x = g.input("x", shape=(None, 4))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("first", nn.Linear(4, 3), x)
    h = g.layer("middle", nn.Identity(), h)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    path = tmp_path / "failed.trace"
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path))
    g.nodes["middle"].module = Exploding()  # after validation: it fails at run time
    with pytest.raises(ann.ActorError):
        tr.fit(_data(), batch_size=4)
    # the writer thread was joined: the trace is closed, not abandoned mid-write
    assert not any(t.name == "asyncnn-trace-writer" for t in threading.enumerate())
    t = ann.trace.read(path)
    assert not t.truncated and t.state is not None
    last = t.events[-1]
    assert last["ev"] == "error" and last["a"] == "middle" and last["k"] == "forward"
    assert "boom in the layer" in last["m"]["error"]
    starts = [e for e in t.events if e["a"] == "middle" and e["ev"] == "start"]
    assert starts and not any(e["a"] == "middle" and e["ev"] == "end" for e in t.events)
    assert os.path.getsize(path) == _boundaries(path.read_bytes())[-1]


# -- CRC-valid records with wrong fields, a second header, lengths past the end ----------------
def _with_records(raw: bytes, records: list[dict[str, Any]], at: int | None = None) -> bytes:
    """``raw`` with well-framed (CRC-valid) ``records`` inserted before record ``at`` (an event
    index; the end by default)."""
    from asyncnn._runtime._traceformat import encode_record

    bounds = _boundaries(raw)
    cut = bounds[-1] if at is None else bounds[min(len(bounds) - 1, 2 + at)]
    return raw[:cut] + b"".join(encode_record(r) for r in records) + raw[cut:]


_BAD_RECORDS = [
    {"ev": "start"},  # no time, no actor
    {"t": "soon", "a": "stage0", "ev": "start"},
    {"t": 1.0, "a": 7, "ev": "send"},
    {"t": 1.0, "a": "stage0", "ev": "start", "key": "k3", "k": "forward", "seq": 0},
    {"t": 1.0, "a": "stage0", "ev": "start", "key": 0, "k": "forward", "seq": [0]},
    {"t": 1.0, "a": "stage0", "ev": "end", "m": {"loss": "low"}},
    {"t": 1.0, "a": "scheduler", "ev": "admit", "key": 0, "m": {"minibatch": "first"}},
    {"t": 1.0, "a": "scheduler", "ev": "admit", "key": 0, "m": ["minibatch", 0]},
    {"t": 1.0, "a": "x", "ev": "send", "key": 0, "x": [{"s": [2, 4], "d": "<f4"}]},
    {"t": 1.0, "a": "x", "ev": "send", "key": 0, "x": [{"s": [2], "d": "O", "n": 16, "h": 1}]},
    {"t": 1.0, "a": "x", "ev": "send", "key": 0, "x": [{"s": [2], "d": "<V2", "n": 4, "h": 1}]},
    {
        "t": 1.0,
        "a": "x",
        "ev": "send",
        "key": 0,
        "x": [{"s": [2], "d": "bfloat16", "n": 2, "h": 1}],
    },
    {
        "t": 1.0,
        "a": "x",
        "ev": "send",
        "key": 0,
        "x": [{"s": [2], "d": "<f4", "n": 8, "h": 1}],
        "pl": [b"\x00" * 3],
    },  # fmt: skip
    {"t": 1.0, "a": "x", "ev": "send", "key": 0, "x": "tensor"},
    {"t": 1.0, "a": "stage0", "ev": "device", "key": 0, "m": {"spans": [[0.2, 0.1]]}},
    {"t": 1.0, "a": "stage0", "ev": "device", "key": 0, "m": {"spans": [[0.1, "later"]]}},
    {"t": 1.0, "a": "stage0", "ev": "device", "key": 0, "m": {"spans": 0.1}},
    {"t": float("nan"), "a": "x", "ev": "send"},
    {"format": "asyncnn-trace", "version": 1},  # a second header
    {"state": {}},  # a second state record
]


@pytest.mark.parametrize("record", _BAD_RECORDS, ids=range(len(_BAD_RECORDS)))
def test_a_crc_valid_record_with_wrong_fields_is_a_trace_format_error_everywhere(
    small_trace: tuple[bytes, Any], tmp_path: Path, record: dict[str, Any]
) -> None:
    raw, _ = small_trace
    path = tmp_path / "crafted.trace"
    path.write_bytes(_with_records(raw, [record], at=3))
    with pytest.raises(ann.TraceFormatError, match=r"record 5 at byte \d+"):
        ann.trace.read(path)
    with pytest.raises(ann.TraceFormatError):
        ann.trace.summary(path)
    out = tmp_path / "out.json"
    with pytest.raises(ann.TraceFormatError):
        ann.trace.to_chrome(path, out)
    assert not out.exists() and os.listdir(tmp_path) == ["crafted.trace"]  # nothing half-written
    with pytest.raises(ann.TraceFormatError):
        ann.replay(path)


def test_a_record_claiming_more_bytes_than_the_file_holds_allocates_nothing(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    import tracemalloc

    raw, whole = small_trace
    n = (1 << 31) - 1  # the largest length the format allows
    path = tmp_path / "claims.trace"
    path.write_bytes(raw + struct.pack("<III", n, n ^ 0xFFFFFFFF, 0) + bytes(100))
    tracemalloc.start()
    try:
        t = ann.trace.read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t.truncated and t.events == whole.events
    assert peak < 16 << 20  # nothing near the claimed 2 GiB


def test_a_truncated_trace_is_refused_by_replay_at_once(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    import time

    raw, _ = small_trace
    bounds = _boundaries(raw)
    path = tmp_path / "cut.trace"
    # cut inside the state, inside events, 5 bytes short of the end
    for cut in [bounds[2] - 3, bounds[2] + 7, bounds[len(bounds) // 2] + 20, len(raw) - 5]:
        path.write_bytes(raw[:cut])
        start = time.perf_counter()
        with pytest.raises(ann.TraceFormatError, match="is truncated") as info:
            ann.replay(path)
        assert "trace_payloads" not in str(info.value)
        assert time.perf_counter() - start < 10  # refused before anything runs, never a stall
        assert ann.trace.summary(path)["truncated"]


@pytest.mark.parametrize(
    ("pool", "said"),
    [([3], "'pool' is list"), ({"cpu_workers": "3"}, "pool['cpu_workers'] is '3'"),
     ({"part_flops": 0}, "pool['part_flops'] is 0"), ({"split": 1}, "pool['split'] is 1")],
)  # fmt: skip
def test_a_header_whose_pool_a_replay_cannot_open_is_refused_naming_it(
    small_trace: tuple[bytes, Any], tmp_path: Path, pool: Any, said: str
) -> None:
    from asyncnn._runtime._traceformat import encode_record

    raw, whole = small_trace
    path = tmp_path / "pool.trace"
    path.write_bytes(encode_record({**whole.header, "pool": pool}) + raw[_boundaries(raw)[1] :])
    with pytest.raises(ann.TraceFormatError, match=rf"the header's {re.escape(said)}"):
        ann.trace.read(path)


def test_a_class_path_in_a_trace_header_imports_nothing(
    small_trace: tuple[bytes, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from asyncnn._math._imports import UntrustedModuleError
    from asyncnn._runtime._traceformat import encode_record

    raw, whole = small_trace
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "evilmod.py").write_text("import pathlib\npathlib.Path('ran').touch()\n")
    bounds = _boundaries(raw)
    for target in ["evilmod:X", "unittest.__main__:X"]:
        header = {**whole.header, "optimizer": {"name": target, "lr": 0.1}}
        path = tmp_path / "evil.trace"
        path.write_bytes(encode_record(header) + raw[bounds[1] :])
        assert ann.trace.read(path).header["optimizer"]["name"] == target  # reading is harmless
        ann.trace.summary(path)
        with pytest.raises(UntrustedModuleError, match=f"evil.trace.*{target}.*trusted_modules"):
            ann.replay(path)
    assert not (tmp_path / "ran").exists()
    assert "evilmod" not in sys.modules and "unittest.__main__" not in sys.modules


# -- random CRC-valid records: only TraceFormatError ever escapes ------------------------------
_names = st.sampled_from(["stage0", "stage1", "loss", "x", "y", "scheduler", "?"])
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True),
    st.text(max_size=5), st.binary(max_size=8), st.lists(st.integers(-1, 4), max_size=3),
)  # fmt: skip
_tensor = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "s": st.lists(st.integers(0, 3), max_size=2),
            "d": st.sampled_from(["<f4", "<i8", "O", 3]),
            "n": st.integers(0, 64),
            "h": st.integers(0, 2**63),
        }  # fmt: skip
    ),
    _values,
)
_record_strategy = st.fixed_dictionaries(
    {},
    optional={
        "t": st.one_of(st.floats(0, 100), _values),
        "a": st.one_of(_names, _values),
        "ev": st.one_of(
            st.sampled_from(
                [
                    "admit",
                    "send",
                    "receive",
                    "start",
                    "end",
                    "update",
                    "flush",
                    "error",
                    "route",
                    "loop",
                    "missing",
                    "other",
                ]
            ),  # fmt: skip
            _values,
        ),
        "k": st.one_of(st.sampled_from(["forward", "backward"]), _values),
        "key": st.one_of(st.integers(-1, 3), _values),
        "v": st.one_of(st.integers(0, 3), _values),
        "p": st.one_of(_names, _values),
        "seq": st.one_of(st.integers(0, 12), _values),
        "x": st.one_of(st.lists(_tensor, max_size=2), _values),
        "pl": st.one_of(
            st.lists(st.one_of(st.none(), st.binary(max_size=16)), max_size=2), _values
        ),
        "m": st.one_of(
            st.dictionaries(
                st.sampled_from(
                    ["minibatch", "mb_keys", "rows", "loss", "error", "slot", "workers", "other"]
                ),  # fmt: skip
                _values,
                max_size=3,
            ),
            _values,
        ),
        "format": st.just("asyncnn-trace"),
        "state": _values,
    },
)


# records of the right types with arbitrary values: these pass the field checks and test what
# summary, to_chrome and replay make of events that contradict the run
_typed_tensor = st.builds(
    lambda s, d, h: {"s": s, "d": d, "n": int(np.prod(s)) * np.dtype(d).itemsize, "h": h},
    st.lists(st.integers(0, 3), max_size=2), st.sampled_from(["<f4", "<i8", "|u1"]),
    st.integers(0, 2**64 - 1),
)  # fmt: skip
_typed_record = st.fixed_dictionaries(
    {
        "t": st.floats(-1, 100, allow_nan=False),
        "a": _names,
        "ev": st.sampled_from(
            [
                "admit",
                "send",
                "receive",
                "start",
                "end",
                "update",
                "flush",
                "error",
                "route",
                "loop",
                "missing",
            ]
        ),  # fmt: skip
    },
    optional={
        "k": st.sampled_from(["forward", "backward", "end"]),
        "key": st.integers(-1, 4),
        "v": st.integers(0, 4),
        "p": _names,
        "seq": st.integers(0, 12),
        "x": st.lists(st.one_of(st.none(), _typed_tensor), max_size=2),
        "m": st.fixed_dictionaries(
            {},
            optional={
                "minibatch": st.integers(-1, 3),
                "mb_keys": st.integers(-1, 3),
                "rows": st.integers(0, 5),
                "mb_rows": st.integers(0, 5),
                "slot": st.integers(0, 2),
                "loss": st.floats(allow_nan=True),
                "error": st.text(max_size=5),
                "workers": st.lists(st.integers(-1, 3)),
            },
        ),  # fmt: skip
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
@given(
    record=st.one_of(_typed_record, _record_strategy), at=st.integers(0, 40), replay=st.booleans()
)
@pytest.mark.timeout(120)
def test_random_crc_valid_records_only_ever_raise_trace_format_error(
    small_trace: tuple[bytes, Any], tmp_path: Path, record: dict[str, Any], at: int, replay: bool
) -> None:
    raw, _ = small_trace
    path = tmp_path / "random.trace"
    path.write_bytes(_with_records(raw, [record], at=at))
    out = tmp_path / "random.json"
    if out.exists():
        out.unlink()
    from asyncnn._tracing._summary import format_summary

    with contextlib.suppress(ann.TraceFormatError):
        ann.trace.read(path)
    with contextlib.suppress(ann.TraceFormatError):
        format_summary(ann.trace.summary(path))
    try:
        ann.trace.to_chrome(path, out)
        json.loads(out.read_text())  # what is written is whole JSON
    except ann.TraceFormatError:
        assert not out.exists()
    with contextlib.suppress(ann.TraceFormatError):
        ann.trace.diff(path, path)
    if replay:  # a replay runs the graph: half of the examples
        try:
            result = ann.replay(path)
        except ann.TraceFormatError:
            pass
        else:
            assert isinstance(result.identical, bool)


_BAD_STATE_FIELDS = [
    ("actor_states", {"list": []}, "a list, not a map of layers"),
    ("actor_states", {"dict": {"nope": {"value": 1}}}, r"no layer 'nope' in the graph"),
    ("actor_states", {"dict": {"stage0": {"value": 1}}}, r"'stage0' has a state, but its actor"),
    ("actor_states", {"zzz": 1}, r"not a tree as the trace encodes one"),
    ("pending", {"dict": {"nope": {"tuple": [{"value": 0}, {"value": 1}]}}}, r"no layer 'nope'"),
    ("pending", {"dict": {"stage0": {"value": 3}}}, r"'stage0' has 3, not a \(sum, count\) pair"),
]


@pytest.mark.parametrize(
    ("field", "value", "said"),
    _BAD_STATE_FIELDS,
    ids=["states-list", "states-unknown", "states-unkept", "states-no-tree", "pending-unknown",
         "pending-no-pair"],
)  # fmt: skip
def test_a_malformed_optional_state_field_is_refused_before_replay_naming_it(
    small_trace: tuple[bytes, Any], tmp_path: Path, field: str, value: Any, said: str
) -> None:
    # check_replayable passed these: the replay then failed at its start with a bare KeyError
    # or TypeError (pending), or, for actor_states, once the run had started (LayerActor was
    # given actor state but keeps none)
    from asyncnn._runtime._traceformat import encode_record
    from asyncnn._tracing._replayable import check_replayable

    raw, whole = small_trace
    bounds = _boundaries(raw)
    path = tmp_path / "state.trace"
    state = {**whole.state, field: value}
    path.write_bytes(raw[: bounds[1]] + encode_record({"state": state}) + raw[bounds[2] :])
    match = rf"state\.trace: the initial state record's '{field}' is malformed: .*{said}"
    with pytest.raises(ann.TraceFormatError, match=match):
        check_replayable(ann.trace.read(path))
    with pytest.raises(ann.TraceFormatError, match=match):
        ann.replay(path)


def test_the_header_records_the_pools_part_flops_through_the_teams_property() -> None:
    # pool_spec read the team's private _part_flops, and dropped it silently where that failed
    from asyncnn._runtime._lifecycle import pool_spec

    class Team:
        splits_work = True
        part_flops = 123_456

    class Pool:
        workers = 3
        team = Team()

    assert pool_spec(Pool()) == {"cpu_workers": 3, "split": True, "part_flops": 123_456}  # type: ignore[arg-type]
