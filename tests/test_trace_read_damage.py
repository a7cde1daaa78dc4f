"""Trace files cut off at every byte, damaged anywhere, not traces at all, or holding CRC-valid
records with wrong fields (fixed and random): each is refused with a TraceFormatError that
names the record, before a replay starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncnn as ann

from _trace_read_cases import PREFIX, _boundaries, _record

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
        # (cut at a record's end, short of the closing event: as a killed process leaves it)
        assert t.truncated == (cut != len(raw)), cut
        assert t.closed == (cut == len(raw)), cut
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


def test_a_folder_given_as_a_trace_is_named_with_the_traces_in_it(tmp_path: Path) -> None:
    # the OS's "[Errno 21] Is a directory" said nothing of what to pass instead
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a trace: pass the file"):
        ann.trace.read(tmp_path)
    (tmp_path / "run.trace").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=r"the traces in it: run\.trace"):
        ann.trace.summary(str(tmp_path) + "/")


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


def _without_closing(raw: bytes) -> bytes:
    """A whole trace's bytes less its closing event: the file of a process killed at its end
    (the writer writes whole records, so the file it leaves ends on one)."""
    bounds = _boundaries(raw)
    return raw[: bounds[-2]]


def test_a_trace_without_its_closing_record_reads_as_cut_off(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    # a process killed (kill -9, the OOM killer) left a trace that read as whole: truncated
    # False, no error, and a replay that blamed "the file was altered" for the work not done
    from asyncnn._tracing._summary import format_summary

    raw, whole = small_trace
    assert whole.closed is True and not whole.truncated and whole.events[-1].what == "close"
    path = tmp_path / "killed.trace"
    path.write_bytes(_without_closing(raw))
    t = ann.trace.read(path)
    assert t.truncated and t.closed is False and t.events == whole.events[:-1]
    s = ann.trace.summary(path)
    assert s["truncated"] is True and s["closed"] is False
    assert "TRUNCATED: it ends without its closing record" in format_summary(s)
    with pytest.raises(
        ann.TraceFormatError,
        match="is truncated: the trace ends without its closing record.*killed",
    ):
        ann.replay(path)


def test_a_trace_cut_inside_a_record_is_said_to_be_so_not_killed(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    # (a writer that stopped mid-write, as on a full disk, leaves a file that ends inside a
    # record: the summary, replay and the CLI said its process was killed)
    from asyncnn._tracing._summary import format_summary

    raw, whole = small_trace
    path = tmp_path / "cut.trace"
    path.write_bytes(raw[: _boundaries(raw)[-3] + 7])  # inside the record before the close
    t = ann.trace.read(path)
    assert t.truncated and t.closed is False and t.cut_mid_record
    assert t.events == whole.events[:-2]
    s = ann.trace.summary(path)
    assert s["cut_mid_record"] is True
    assert "TRUNCATED: the file ends inside a record (its writer stopped" in format_summary(s)
    with pytest.raises(ann.TraceFormatError, match="the file ends inside a record.*full disk"):
        ann.replay(path)
    killed = tmp_path / "killed.trace"
    killed.write_bytes(_without_closing(raw))  # (whole records: the killed process's kind)
    assert not whole.cut_mid_record and not ann.trace.read(killed).cut_mid_record


def test_a_trace_of_a_writer_without_closing_records_reads_as_whole(
    small_trace: tuple[bytes, Any], tmp_path: Path
) -> None:
    # traces written before closing events were: whole without one (and they replay)
    from asyncnn._runtime._traceformat import encode_record, iter_frames

    raw, _ = small_trace
    with open(tmp_path / "in.trace", "wb") as f:
        f.write(_without_closing(raw))
    with open(tmp_path / "in.trace", "rb") as f:
        records = [r for _, r in iter_frames(f)]
    assert records[0].pop("writes_close") is True
    path = tmp_path / "older.trace"
    path.write_bytes(b"".join(encode_record(r) for r in records))
    t = ann.trace.read(path)
    assert not t.truncated and t.closed is None
    assert ann.trace.summary(path)["closed"] is None
    assert ann.replay(path).identical


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
     ({"part_flops": 0}, "pool['part_flops'] is 0"), ({"split": 1}, "pool['split'] is 1"),
     # (an OverflowError where the pool opened; 5000 quietly started 5000 threads)
     ({"cpu_workers": 2**64 - 1}, "pool['cpu_workers'] is 18446744073709551615"),
     ({"cpu_workers": 5000}, "pool['cpu_workers'] is 5000, expected an int from 1 to 4096"),
     # (a replay opens its pool with it: open_device_pool refuses these)
     ({"inline_flops": "5e6"}, "pool['inline_flops'] is '5e6', expected a number (not NaN)"),
     ({"inline_flops": True}, "pool['inline_flops'] is True, expected a number (not NaN)"),
     ({"inline_flops": float("nan")}, "pool['inline_flops'] is nan, expected a number"),
     # (summary and the readers took these; only a replay refused them)
     ({"plan_workers": "4"}, "pool['plan_workers'] is '4', expected an int from 1 to 4096"),
     ({"plan_workers": 0}, "pool['plan_workers'] is 0, expected an int from 1 to 4096"),
     ({"plan_workers": True}, "pool['plan_workers'] is True, expected an int from 1"),
     ({"plan_workers": 5000}, "pool['plan_workers'] is 5000, expected an int from 1")],
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


@pytest.mark.parametrize(
    ("config", "said"),
    [(None, "'config' is NoneType, expected dict"), ("fast", "'config' is str, expected dict"),
     ({"cuda_graphs": 1}, "config['cuda_graphs'] is 1, expected true, false or nil"),
     ({"check_finite": "yes"}, "config['check_finite'] is 'yes', expected true or false"),
     ({"stall_timeout": 0}, "config['stall_timeout'] is 0, expected a number > 0"),
     ({"seed": -1}, "config['seed'] is -1, expected an int >= 0"),
     ({"dtype": 32}, "config['dtype'] is 32, expected text"),
     ({"trace": 1}, "config['trace'] is 1, expected text or nil"),
     ({"trace_payloads": "some"}, "config['trace_payloads'] is 'some', expected one of")],
)  # fmt: skip
def test_a_header_whose_config_is_malformed_is_refused_naming_the_field(
    small_trace: tuple[bytes, Any], tmp_path: Path, config: Any, said: str
) -> None:
    # replay read it with .get(): a bare AttributeError (nil, text) or a TypeError from the run's
    # options that did not name the trace
    from asyncnn._runtime._traceformat import encode_record

    raw, whole = small_trace
    if isinstance(config, dict):
        config = {**whole.header["config"], **config}
    path = tmp_path / "config.trace"
    path.write_bytes(encode_record({**whole.header, "config": config}) + raw[_boundaries(raw)[1] :])
    match = rf"config\.trace: the header's {re.escape(said)}"
    with pytest.raises(ann.TraceFormatError, match=match):
        ann.trace.read(path)
    with pytest.raises(ann.TraceFormatError, match=match):
        ann.replay(path)


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
# the events a trace records, by name
_EVENTS = ["admit", "send", "receive", "start", "end", "update", "flush", "error", "route", "loop",
           "missing"]  # fmt: skip
_record_strategy = st.fixed_dictionaries(
    {},
    optional={
        "t": st.one_of(st.floats(0, 100), _values),
        "a": st.one_of(_names, _values),
        "ev": st.one_of(st.sampled_from([*_EVENTS, "other"]), _values),
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
        "ev": st.sampled_from(_EVENTS),
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
    ("earlier", {"list": []}, "a list, not a map of layers"),
    ("earlier", {"dict": {"nope": {"dict": {}}}}, r"no layer 'nope' in the graph"),
    ("earlier", {"dict": {"stage0": {"value": 1}}}, r"'stage0' has 1, not a map of versions"),
    (
        "earlier",
        {"dict": {"stage0": {"dict": {0: {"value": 1}}}}},
        r"'stage0' holds version 0, not an earlier one \(an int below its version, 0\)",
    ),
    ("pending_delays", {"list": []}, "a list, not a map of layers"),
    ("pending_delays", {"dict": {"nope": {"list": []}}}, r"no layer 'nope' in the graph"),
    ("pending_delays", {"dict": {"stage0": {"value": 1}}}, r"'stage0' has 1, not a list of ints"),
    (
        "pending_delays",
        {"dict": {"stage0": {"list": [{"value": 1}]}}},
        r"'stage0' has 1 delays, more than the 0 gradients its 'pending' entry sums",
    ),
]


@pytest.mark.parametrize(
    ("field", "value", "said"),
    _BAD_STATE_FIELDS,
    ids=["states-list", "states-unknown", "states-unkept", "states-no-tree", "pending-unknown",
         "pending-no-pair", "earlier-list", "earlier-unknown", "earlier-no-map",
         "earlier-not-earlier", "delays-list", "delays-unknown", "delays-no-list",
         "delays-too-many"],
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


def _edited(raw: bytes, path: Path, edit: Any) -> Path:
    """``raw`` re-framed (valid checksums) with ``edit(record)`` applied to every record."""
    import io

    from asyncnn._runtime._traceformat import encode_record, iter_frames

    records = [r for _, r in iter_frames(io.BytesIO(raw))]
    path.write_bytes(b"".join(encode_record(edit(r)) for r in records))
    return path


@pytest.mark.parametrize(
    ("change", "said"),
    [({"rows": None}, "lacks its count of rows ('m': 'rows', 'mb_rows')"),
     ({"mb_rows": None}, "lacks its count of rows ('m': 'rows', 'mb_rows')"),
     ({"rows": 0}, "says it holds 0 of its minibatch's 4 rows"),
     ({"rows": 5}, "says it holds 5 of its minibatch's 4 rows")],
    ids=["no-rows", "no-mb-rows", "no-row", "more-rows"],
)  # fmt: skip
def test_an_admit_without_its_rows_is_refused_before_replay_naming_the_event(
    small_trace: tuple[bytes, Any], tmp_path: Path, change: dict[str, Any], said: str
) -> None:
    # the replay failed inside the loss actor, with a bare KeyError: 'rows'
    raw, _ = small_trace

    def edit(r: dict[str, Any]) -> dict[str, Any]:
        if r.get("ev") == "admit" and r.get("key") == 0:
            m = {**r["m"], **change}
            r = {**r, "m": {k: v for k, v in m.items() if v is not None}}
        return r

    path = _edited(raw, tmp_path / "rows.trace", edit)
    ann.trace.read(path)  # the reader's checks pass it: the fields it has are ints
    with pytest.raises(
        ann.TraceFormatError,
        match=rf"rows\.trace: event \d+ \(admit of 'scheduler'\) {re.escape(said)}",
    ):
        ann.replay(path)
