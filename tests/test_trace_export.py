"""Exporting traces to Chrome trace JSON, and summarising them."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn._tracing._summary import format_summary

from _reference import chain_graph


def _record(path: Path, policy: Any, seed: int = 0) -> ann.History:
    g = chain_graph(3)
    rng = np.random.default_rng(0)
    data = {
        "x": rng.normal(size=(64, 5)).astype(np.float32),
        "y": rng.integers(0, 3, 64),
    }
    trainer = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, seed=seed, trace=str(path))
    return trainer.fit(data, epochs=2, batch_size=16)


@pytest.fixture(scope="module")
def async_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ann.History]:
    path = tmp_path_factory.mktemp("trace") / "async.trace"
    return path, _record(path, policies.Async(3))


@pytest.fixture(scope="module")
def gpipe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ann.History]:
    path = tmp_path_factory.mktemp("trace") / "gpipe.trace"
    return path, _record(path, policies.GPipe(4))


def _export(trace: Path, tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    out = tmp_path / "out.json"
    counts = ann.trace.to_chrome(trace, out)
    doc = json.loads(out.read_text())  # valid JSON, or this raises
    return counts, doc["traceEvents"]


def _rows(events: list[dict[str, Any]]) -> dict[int, str]:
    return {
        e["tid"]: e["args"]["name"].split(" ")[0]
        for e in events
        if e["ph"] == "M" and e["name"] == "thread_name"
    }


def _check_flows(events: list[dict[str, Any]], one_clock: bool = True) -> int:
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = [e for e in events if e["ph"] == "f"]
    assert len(ends) == len(starts)
    assert sorted(e["id"] for e in ends) == sorted(starts)  # each id once at each side
    rows = _rows(events)
    slices = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            slices[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for f in ends:
        s = starts[f["id"]]
        assert s["ts"] <= f["ts"] or not one_clock  # (processes' clocks differ a little)
        assert rows[s["tid"]] == s["args"]["from"] and rows[f["tid"]] == s["args"]["to"]
        # both ends lie in a slice of their row, so viewers can bind the arrow to it
        for ev in (s, f):
            assert any(a <= ev["ts"] <= b for a, b in slices[ev["tid"]]), ev
    return len(ends)


def _check_nesting(events: list[dict[str, Any]]) -> None:
    by_row = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] >= 0
            by_row[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_row.values():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple[float, float]] = []
        for a, b in spans:
            while stack and stack[-1][1] <= a:
                stack.pop()
            if stack:
                assert b <= stack[-1][1], f"slice {a, b} overlaps {stack[-1]} partially"
            stack.append((a, b))


@pytest.mark.parametrize("run", ["async_run", "gpipe_run"])
def test_chrome_export_is_consistent_with_the_trace(
    run: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path, hist = request.getfixturevalue(run)
    trace = ann.trace.read(path)
    counts, events = _export(path, tmp_path)

    rows = _rows(events)
    assert set(rows.values()) == {"scheduler", "x", "y", "stage0", "stage1", "stage2", "loss"}
    _check_nesting(events)
    assert _check_flows(events) == counts["flows"]

    # one compute slice per start/end pair, named by kind and key, with the key's seq
    starts = [e for e in trace.events if e["ev"] == "start"]
    computes = [e for e in events if e["ph"] == "X" and e["cat"] == "compute"]
    assert len(computes) == len(starts) == counts["slices"]
    want = Counter((e["a"], f"{e['k']} k{e['key']}", e["seq"]) for e in starts)
    got = Counter((rows[e["tid"]], e["name"], e["args"]["seq"]) for e in computes)
    assert got == want
    # every send got an arrow: the run finished, so every message was received
    sends = [e for e in trace.events if e["ev"] == "send"]
    assert counts["flows"] == len(sends) and counts["unmatched_sends"] == 0

    # in flight: +1 per admit, back to 0 at the end, never above what the policy admits
    flight = [e["args"]["keys"] for e in events if e["ph"] == "C" and e["name"] == "keys in flight"]
    admits = sum(1 for e in trace.events if e["ev"] == "admit")
    assert sum(1 for a, b in zip([0, *flight], flight, strict=False) if b > a) == admits
    assert flight[-1] == 0 and 1 <= max(flight) <= (3 if run == "async_run" else 4)
    # stored activations per layer peak where the runtime's own statistics did
    for layer in ("stage0", "stage1", "stage2"):
        stored = [
            e["args"]["activations"]
            for e in events
            if e["ph"] == "C" and e["name"] == f"{layer} stored"
        ]
        assert max(stored) == hist.statistics[layer].peak_stored
        assert stored[-1] == 0
    updates = [e for e in events if e["ph"] == "i" and e["cat"] == "update"]
    assert len(updates) == sum(st.updates for st in hist.statistics.values())


def test_chrome_export_of_a_truncated_trace(async_run: Any, tmp_path: Path) -> None:
    path, _ = async_run
    data = path.read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) * 2 // 3 + 5])  # mid-record
    trace = ann.trace.read(cut)
    assert trace.truncated
    counts, events = _export(cut, tmp_path)
    _check_nesting(events)
    assert _check_flows(events) == counts["flows"]
    assert counts["slices"] == sum(1 for e in trace.events if e["ev"] == "start")
    sends = sum(1 for e in trace.events if e["ev"] == "send")
    receives = sum(1 for e in trace.events if e["ev"] == "receive")
    assert counts["flows"] == receives and counts["unmatched_sends"] == sends - receives
    assert ann.trace.summary(cut)["truncated"] is True


def test_chrome_export_to_a_folder_or_a_missing_folder_names_the_path_given(
    async_run: Any, tmp_path: Path
) -> None:
    # (the errors named the temporary file beside it, a name the user never gave)
    path, _ = async_run
    with pytest.raises(IsADirectoryError, match=r"to_chrome: '.*' is a folder; name the JSON"):
        ann.trace.to_chrome(path, tmp_path)
    missing = tmp_path / "no" / "out.json"
    with pytest.raises(FileNotFoundError, match=r"the folder of '.*out\.json' \(.*no\) does not"):
        ann.trace.to_chrome(path, missing)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []


@pytest.mark.parametrize("end", ["/", "/."])
def test_chrome_export_to_a_folders_name_not_made_yet_says_it_names_a_folder(
    async_run: Any, tmp_path: Path, end: str
) -> None:
    # "[Errno 2] No such file or directory: '.../new/.1234.tmp'": the temporary file beside it,
    # as the folder of ".../new/" was taken to be its parent
    path, _ = async_run
    out = f"{tmp_path}/new{end}"
    with pytest.raises(
        IsADirectoryError,
        match=rf"to_chrome: '{re.escape(out)}' ends in '{re.escape(end)}', so it names a folder; "
        "name the JSON file to write",
    ):
        ann.trace.to_chrome(path, out)
    assert sorted(tmp_path.iterdir()) == []


def test_chrome_export_refuses_to_write_over_its_trace(async_run: Any, tmp_path: Path) -> None:
    # the JSON replaced the trace (by its own name, or another name for the same file)
    path, _ = async_run
    trace = tmp_path / "run.trace"
    trace.write_bytes(path.read_bytes())
    (tmp_path / "link.trace").hardlink_to(trace)
    for out in (trace, tmp_path / "link.trace"):
        with pytest.raises(ValueError, match=r"to_chrome: '.*' is the trace itself: name another"):
            ann.trace.to_chrome(trace, out)
    assert trace.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.trace", "run.trace"]


def test_chrome_export_under_a_file_says_it_is_a_file(async_run: Any, tmp_path: Path) -> None:
    # "the folder of 'a-file/x.json' (.../a-file) does not exist", of a file that exists
    path, _ = async_run
    (tmp_path / "a-file").write_text("")
    for under in ("a-file/x.json", "a-file/more/x.json"):
        with pytest.raises(NotADirectoryError, match=r"a-file is a file, not a folder, so '"):
            ann.trace.to_chrome(path, tmp_path / under)


def _with_skewed_clocks(path: Path, out: Path) -> Path:
    """The trace at ``path`` as a cluster run's whose workers' clocks (here: the layers' and
    the loss's) ran behind the driver's (the scheduler's and the inputs'), merged by time as
    the driver merges them: a worker's receive of a message from the driver comes before its
    send, and layers end the backwards of a key before the driver's admit of it."""
    from asyncnn._runtime._traceformat import encode_record

    trace = ann.trace.read(path)
    driver = ("scheduler", "x", "y")
    admitted = {e["key"]: e["t"] for e in trace.events if e["ev"] == "admit"}
    ends = defaultdict(list)
    for e in trace.events:
        if e["ev"] == "end" and e.get("k") == "backward":
            ends[e["key"]].append(e["t"])
    # behind by less than any key takes to go through, by more than its first backward's end
    skew = min(max(ts) - admitted[k] for k, ts in ends.items()) * 0.99
    assert any(min(ts) < admitted[k] + skew for k, ts in ends.items())
    events = [{**e, "t": e["t"] + skew} if e["a"] in driver else dict(e) for e in trace.events]
    events.sort(key=lambda e: e["t"])  # stable: each process's events keep their order
    records = [trace.header, {"state": trace.state}, *events]
    out.write_bytes(b"".join(encode_record(r) for r in records))
    return out


def test_a_cluster_trace_whose_clocks_differ_keeps_its_keys_and_messages(
    gpipe_run: Any, tmp_path: Path
) -> None:
    # keys whose first backwards ended before their admit never left flight (asyncnn trace
    # summary said "max 33" of a GPipe(4) run), and a receive before its send was dropped (the
    # message was counted never received and had no arrow)
    path, _ = gpipe_run
    skewed = _with_skewed_clocks(path, tmp_path / "skewed.trace")
    s = ann.trace.summary(skewed)
    assert 1 <= s["in_flight"]["max"] <= 4
    counts, events = _export(skewed, tmp_path)
    flight = [e["args"]["keys"] for e in events if e["ph"] == "C" and e["name"] == "keys in flight"]
    assert max(flight) <= 4 and flight[-1] == 0
    sends = sum(1 for e in ann.trace.read(path).events if e["ev"] == "send")
    assert counts["unmatched_sends"] == 0 and counts["flows"] == sends
    assert _check_flows(events, one_clock=False) == sends
    _check_nesting(events)


def _staleness(trace: ann.trace.Trace) -> dict[str, list[int]]:
    fwd: dict[tuple[str, int], int] = {}
    out: dict[str, list[int]] = defaultdict(list)
    for e in trace.events:
        if e["ev"] == "start" and e["k"] == "forward":
            fwd[(e["a"], e["key"])] = e["v"]
        elif e["ev"] == "start" and e["k"] == "backward":
            out[e["a"]].append(e["v"] - fwd[(e["a"], e["key"])])
    return out


@pytest.mark.parametrize("run", ["async_run", "gpipe_run"])
def test_summary_counts(run: str, request: pytest.FixtureRequest) -> None:
    path, hist = request.getfixturevalue(run)
    trace = ann.trace.read(path)
    s = ann.trace.summary(path)
    assert s["truncated"] is False and s["events"] == len(trace.events)
    assert s["keys"] == sum(1 for e in trace.events if e["ev"] == "admit")
    assert s["bytes_moved"] == sum(
        x["n"] for e in trace.events if e["ev"] == "send" for x in e["x"] if x is not None
    )
    stale = _staleness(trace)
    for name in ("stage0", "stage1", "stage2", "loss"):
        a, st = s["actors"][name], hist.statistics[name]
        assert (a["forwards"], a["backwards"], a["updates"]) == (
            st.forwards,
            st.backwards,
            st.updates,
        )
        assert a["messages_out"] == st.messages_out
        assert a["messages_in"] == sum(
            1 for e in trace.events if e["ev"] == "receive" and e["a"] == name
        )
        assert 0 < a["busy_seconds"] <= s["seconds"]
        assert a["busy_seconds"] + a["idle_seconds"] == pytest.approx(s["run_seconds"])
        assert a["busy_fraction"] == pytest.approx(a["busy_seconds"] / s["run_seconds"])
        if name != "loss":
            assert a["staleness_max"] == max(stale[name])
            assert a["staleness_mean"] == pytest.approx(np.mean(stale[name]))
            assert a["peak_stored"] == st.peak_stored
    if run == "gpipe_run":
        # GPipe updates after the whole minibatch: every gradient is fresh
        assert all(s["actors"][n]["staleness_max"] == 0 for n in ("stage0", "stage1", "stage2"))
        assert s["minibatches"] == 8 and s["keys"] == 32
    else:
        # Async updates after every key: the first stage's backwards lag its forwards
        assert s["actors"]["stage0"]["staleness_max"] >= 1
    assert s["actors"]["x"]["messages_out"] == s["keys"]
    assert 1 <= s["in_flight"]["max"] and 0 < s["in_flight"]["mean"] <= s["in_flight"]["max"]
    assert s["losses"]["count"] == s["keys"]


def test_summary_plots(async_run: Any, tmp_path: Path) -> None:
    path, _ = async_run
    s = ann.trace.summary(path, plots=tmp_path / "plots")
    assert sorted(Path(p).name for p in s["plots"]) == ["busy.png", "in_flight.png"]
    for p in s["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_events_become_a_row_under_each_gpu_actor(gpipe_run: Any, tmp_path: Path) -> None:
    # a traced GPU actor writes "device" events (when its work ran on the device's clock);
    # here added to a CPU run's trace, as well-framed records
    from asyncnn._runtime._traceformat import encode_record

    path, _ = gpipe_run
    spans = {"stage0": [[0.010, 0.012], [0.0125, 0.013]], "stage1": [[0.011, 0.014]]}
    extra = [
        {"t": 0.02, "a": a, "ev": "device", "k": "forward", "key": 0, "seq": 0, "m": {"spans": sp}}
        for a, sp in spans.items()
    ]
    crafted = tmp_path / "with_device.trace"
    crafted.write_bytes(path.read_bytes() + b"".join(encode_record(r) for r in extra))
    counts, events = _export(crafted, tmp_path)
    assert counts["device_slices"] == 3
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    order = {
        e["tid"]: e["args"]["sort_index"] for e in events if e.get("name") == "thread_sort_index"
    }
    rows = {name: tid for tid, name in names.items()}
    for actor, sp in spans.items():
        row = rows[f"{actor} (device)"]
        own = next(tid for tid, name in names.items() if name.split(" ")[0] == actor and tid != row)
        assert order[row] == order[own] + 1  # right under the actor's own row
        got = [(e["ts"], e["dur"]) for e in events if e["ph"] == "X" and e["tid"] == row]
        assert got == [(round(a * 1e6, 3), round((b - a) * 1e6, 3)) for a, b in sp]
    # the other rows keep their order: the scheduler first, then the graph's nodes
    assert sorted(order.values()) == sorted(set(order.values()))
    assert counts["slices"] == ann.trace.to_chrome(path, tmp_path / "plain.json")["slices"]


def test_summary_measures_the_overlap_of_device_work(gpipe_run: Any, tmp_path: Path) -> None:
    from asyncnn._runtime._traceformat import encode_record

    path, _ = gpipe_run
    spans = {"stage0": [[0.0, 2.0], [3.0, 4.0]], "stage1": [[1.0, 3.5]], "stage2": [[5.0, 6.0]]}
    extra = [
        {"t": 0.02, "a": a, "ev": "device", "k": "forward", "key": 0, "seq": 0, "m": {"spans": sp}}
        for a, sp in spans.items()
    ]
    crafted = tmp_path / "with_device.trace"
    crafted.write_bytes(path.read_bytes() + b"".join(encode_record(r) for r in extra))
    s = ann.trace.summary(crafted)
    assert s["actors"]["stage0"]["device_busy_seconds"] == 3.0
    assert s["actors"]["stage1"]["device_busy_seconds"] == 2.5
    # the chain's nodes are on "cpu" in its header: one device; busy 6.5 s over 5 s covered
    ((device, use),) = s["devices"].items()
    assert use == {"busy_seconds": 6.5, "active_seconds": 5.0, "overlap": 1.3}
    assert f"{device}: actors' work ran 5.000 s" in format_summary(s)
    assert ann.trace.summary(path)["devices"] == {}


def test_overlap_is_never_below_one_when_spans_meet_end_to_end(
    gpipe_run: Any, tmp_path: Path
) -> None:
    # three spans of two actors, end to end: the actors' sums added up round below the union's
    from asyncnn._runtime._traceformat import encode_record

    path, _ = gpipe_run
    spans = {"stage0": [[0.031, 0.229], [0.901, 0.945]], "stage1": [[0.229, 0.901]]}
    busy = ((0.229 - 0.031) + (0.945 - 0.901)) + (0.901 - 0.229)
    assert busy < (0.229 - 0.031) + (0.901 - 0.229) + (0.945 - 0.901)
    extra = [
        {"t": 0.02, "a": a, "ev": "device", "k": "forward", "key": 0, "seq": 0, "m": {"spans": sp}}
        for a, sp in spans.items()
    ]
    crafted = tmp_path / "touching.trace"
    crafted.write_bytes(path.read_bytes() + b"".join(encode_record(r) for r in extra))
    ((_, use),) = ann.trace.summary(crafted)["devices"].items()
    assert use["busy_seconds"] == busy and use["overlap"] == 1.0


def test_chrome_export_of_a_run_whose_loss_went_nan_is_strict_json(tmp_path: Path) -> None:
    # json.dumps wrote bare NaN tokens ("loss":NaN), which JSON.parse (Perfetto,
    # chrome://tracing) rejects
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(16, 5)).astype(np.float32), "y": rng.integers(0, 3, 16)}
    data["x"][12, 0] = np.nan  # the last minibatch's loss is NaN (check_data=False lets it in)
    path, out = tmp_path / "nan.trace", tmp_path / "nan.json"
    trainer = ann.Trainer(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(path)
    )
    trainer.fit(data, epochs=1, batch_size=8, check_data=False)
    recorded = [e.meta["loss"] for e in ann.trace.read(path).events if "loss" in e.meta]
    assert any(np.isnan(loss) for loss in recorded)

    def strict(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    ann.trace.to_chrome(path, out)
    doc = json.loads(out.read_text(), parse_constant=strict)
    losses = [e["args"]["loss"] for e in doc["traceEvents"] if "loss" in e.get("args", {})]
    assert None in losses and all(x is None or np.isfinite(x) for x in losses)


def test_versions_held_count_the_version_a_pinned_forward_computed_with(tmp_path: Path) -> None:
    # under PipeDream2BW a forward computes with a pinned version (its start event's) below the
    # stage's latest (its end's): the summary and the export counted the end's, and said 1
    # version held where ActorStatistics says 2
    path = tmp_path / "2bw.trace"
    hist = _record(path, policies.PipeDream2BW(3))
    trace = ann.trace.read(path)
    starts = {
        (e.actor, e.key): e.version
        for e in trace.events
        if e.what == "start" and e.kind == "forward"
    }
    pinned = [
        e for e in trace.events
        if e.what == "end" and e.kind == "forward" and starts[(e.actor, e.key)] != e.version
    ]  # fmt: skip
    assert pinned  # (forwards whose end says a later version than they computed with)
    s = ann.trace.summary(path)
    for name in ("stage0", "stage1", "stage2"):
        want = hist.statistics[name].peak_versions_held
        assert s["actors"][name]["peak_versions_held"] == want, name
    _, events = _export(path, tmp_path)
    for name in ("stage0", "stage1", "stage2"):
        held = [
            e["args"]["versions"] for e in events
            if e["ph"] == "C" and e["name"] == f"{name} versions held"
        ]  # fmt: skip
        assert max(held) == hist.statistics[name].peak_versions_held, name


def test_idle_time_starts_at_the_runs_first_admit(async_run: Any, tmp_path: Path) -> None:
    # the summary counted an actor idle from the start of the recording, so the set-up before
    # the first admit (about 26 ms for a process's first run) was idle time: a Sync stage read
    # 31.8 ms idle where ActorStatistics said 6.4 ms, and the busy fraction and the mean of
    # the keys in flight fell with it. A set-up 5 s longer must change none of them.
    from _replay_cases import _rewrite

    path, _ = async_run
    late = tmp_path / "late.trace"
    _rewrite(path, late, lambda r: {**r, "t": r["t"] + 5.0} if "t" in r else r)
    s, slow = ann.trace.summary(path), ann.trace.summary(late)
    events = ann.trace.read(path).events
    first = min(e.time for e in events if e.what == "admit")
    last = max(e.time for e in events if e.what != "close")
    assert slow["seconds"] == pytest.approx(s["seconds"] + 5.0)
    for name in ("stage0", "stage1", "stage2", "loss"):
        a, b = s["actors"][name], slow["actors"][name]
        assert b["idle_seconds"] == pytest.approx(a["idle_seconds"], abs=1e-9), name
        assert b["busy_fraction"] == pytest.approx(a["busy_fraction"]), name
        assert a["busy_seconds"] + a["idle_seconds"] == pytest.approx(last - first), name
    assert slow["in_flight"]["mean"] == pytest.approx(s["in_flight"]["mean"])
    assert s["run_seconds"] == slow["run_seconds"] == pytest.approx(last - first)
    assert "from its first admit" in format_summary(slow)


def test_chrome_export_the_disk_refuses_names_the_file_given(
    async_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "[Errno 30] Read-only file system: '.../out.json.1234.tmp'": the temporary file beside it
    import builtins
    import errno

    from asyncnn._tracing import _chrome

    path, _ = async_run
    out = tmp_path / "out.json"
    out.write_text("before")

    def read_only(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", file)
        return builtins.open(file, mode, *args, **kwargs)

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.f.close()

    def full(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    for opened, number, why in (
        (read_only, errno.EROFS, "Read-only file system"),
        (full, errno.ENOSPC, "No space left on device"),
    ):
        monkeypatch.setattr(_chrome, "open", opened, raising=False)
        with pytest.raises(OSError) as info:
            ann.trace.to_chrome(path, out)
        said = str(info.value)
        assert info.value.errno == number
        assert f"to_chrome: writing {str(out)!r} failed ({why})" in said, said
        assert ".tmp" not in said
        assert out.read_text() == "before"  # left as it was, and no temporary file beside it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    # the rename into place that the folder refuses: said of the file given too
    monkeypatch.undo()

    def refused(src: Any, dst: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", src, None, dst)

    monkeypatch.setattr(_chrome.os, "replace", refused)
    with pytest.raises(OSError, match=r"to_chrome: writing '.*out\.json' failed \(Read-only"):
        ann.trace.to_chrome(path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
