"""Recording and reading message traces: the header and initial state, the events and their
digests, payload modes, a writer that never makes actors wait, the summary's numbers, and the
trace of a run that fails (files cut off, damaged or not traces: test_trace_read_damage.py)."""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._math._pytree import tree_leaves
from asyncnn._runtime import _recorder
from asyncnn._runtime._lifecycle import ONE_WORKER_CORES, RUN_PART_FLOPS, host_cores
from asyncnn._runtime._recorder import Recorder, decode_tree, digest
from asyncnn.backends import DEFAULT_INLINE_FLOPS

from _trace_read_cases import _boundaries, _data, _graph, _record


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    """A 2-stage Sync run of 2 tiny minibatches: its bytes and its reading."""
    path = tmp_path_factory.mktemp("small") / "small.trace"
    _record(path)
    return path.read_bytes(), ann.trace.read(path)


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
    if host_cores() <= ONE_WORKER_CORES:  # (Sync on a small host: products whole on BLAS's threads)
        assert h["pool"] == {
            "cpu_workers": 1, "part_flops": RUN_PART_FLOPS, "split": False,
            "inline_flops": DEFAULT_INLINE_FLOPS, "blas_threads": host_cores(),
        }  # fmt: skip
    else:
        assert h["pool"] == {
            "cpu_workers": host_cores(), "part_flops": RUN_PART_FLOPS, "split": True,
            "inline_flops": DEFAULT_INLINE_FLOPS,
        }  # fmt: skip

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
    assert [e["key"] for e in t.events[:-1]] == list(range(n)) and rec.events == n
    assert t.events[-2]["x"][0]["h"] == digest(big) and t.events[-1].what == "close"


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
    assert s["in_flight"]["mean"] == pytest.approx(area / s["run_seconds"])


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
    assert not t.truncated and t.state is not None and t.closed is True
    close, last = t.events[-1], t.events[-2]
    assert close.what == "close"  # (written as the trace closed, after the run's error)
    assert last["ev"] == "error" and last["a"] == "middle" and last["k"] == "forward"
    assert "boom in the layer" in last["m"]["error"]
    starts = [e for e in t.events if e["a"] == "middle" and e["ev"] == "start"]
    assert starts and not any(e["a"] == "middle" and e["ev"] == "end" for e in t.events)
    assert os.path.getsize(path) == _boundaries(path.read_bytes())[-1]


def test_the_header_records_the_pools_part_flops_through_the_teams_property() -> None:
    # pool_spec read the team's private _part_flops, and dropped it silently where that failed
    from asyncnn._runtime._lifecycle import pool_spec

    class Team:
        splits_work = True
        part_flops = 123_456

    class Pool:
        workers = 3
        inline_flops = 1e12
        team = Team()

    assert pool_spec(Pool()) == {  # type: ignore[arg-type]
        "cpu_workers": 3, "inline_flops": 1e12, "split": True, "part_flops": 123_456
    }  # fmt: skip
