"""diff names where two recorded runs parted: the first reordered message, the first differing
tensor or update, with its size and shapes; a trace cut off says so."""

from __future__ import annotations

import io

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._runtime._recorder import Recorder
from asyncnn._runtime._traceformat import iter_frames
from asyncnn._tracing._diff import _ABSENT

from _replay_cases import _data, _plain_graph, _rewrite


def test_diff_of_two_runs_that_differ_in_the_last_update_alone_is_a_divergence(tmp_path):
    # (diff compared sends only: two runs whose last updates differed read as agreeing)
    paths = [tmp_path / "a.trace", tmp_path / "b.trace"]
    for path, lr in zip(paths, (0.1, 0.5), strict=True):
        tr = ann.Trainer(_plain_graph(), optimizer=optim.SGD(lr=lr), policy=policies.Sync(),
                         trace=str(path))  # fmt: skip
        tr.fit(_data(8), batch_size=8)
    d = ann.trace.diff(*paths)
    assert d is not None and (d.actor, d.kind, d.key, d.seq) == ("stage1", "update", 0, 1)
    assert "differ" in d.reason and "replay" not in d.reason
    assert ann.trace.diff(paths[0], paths[0]) is None


def test_a_diff_of_runs_that_differ_only_in_a_loss_value_says_so(tmp_path):
    # (diff compared sends and updates only: a loss whose value alone differed read as agreeing)
    path, other = tmp_path / "a.trace", tmp_path / "b.trace"
    ann.Trainer(_plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                trace=str(path)).fit(_data(16), batch_size=8)  # fmt: skip
    _rewrite(path, other, lambda r: {**r, "m": {"loss": r["m"]["loss"] + 1.0}}
             if r.get("ev") == "end" and r.get("a") == "loss" and r.get("key") == 2 else r)  # fmt: skip
    losses = {e.key: e.meta["loss"] for e in ann.trace.read(path).events
              if e.what == "end" and e.actor == "loss"}  # fmt: skip
    d = ann.trace.diff(path, other)
    assert d is not None and (d.actor, d.kind, d.key) == ("loss", "loss", 2)
    assert (d.expected, d.got) == (losses[2], losses[2] + 1.0)
    assert f"the first run's loss was {d.expected!r}, the second's {d.got!r}" in d.reason
    assert "replay" not in d.reason
    assert ann.trace.diff(path, path) is None


def test_the_size_of_a_difference_is_that_of_the_tensor_that_differs(tmp_path):
    # it was always the first tensor's: 0.0 where the second differed, a ValueError where the
    # first was empty, and a ComplexWarning (an error here; else the real parts' difference)
    paths = [tmp_path / "a.trace", tmp_path / "b.trace"]
    empty = np.zeros((0, 3), np.float32)
    for first, second, size in [
        (np.ones(2, np.float32), (np.zeros(2), np.full(2, 4.0)), 4.0),
        (empty, (np.zeros(2), np.full(2, 4.0)), 4.0),
        (None, (np.array([1 + 1j], np.complex64), np.array([1 + 4j], np.complex64)), 3.0),
    ]:
        for path, tensor in zip(paths, second, strict=True):
            rec = Recorder(str(path), {"graph": {}})
            rec.event("a", "start", "forward", 0, 0, "", 0)
            rec.event("a", "send", "forward", 0, 0, "b", 0, (first, tensor), True)
            rec.event("a", "end", "forward", 0, 0, "", 0)
            rec.close()
        d = ann.trace.diff(*paths)
        assert d is not None and d.max_abs_diff == size


def test_a_diff_of_runs_of_other_widths_names_the_shapes(tmp_path):
    # (it said only that a digest differed)
    paths = []
    for width in (8, 6):
        graph = ann.Graph.sequential(
            [nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)],
            loss=nn.CrossEntropyLoss(),
            stages=2,
            input_shape=(None, 5),
        )
        paths.append(tmp_path / f"{width}.trace")
        ann.Trainer(
            graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(paths[-1])
        ).fit(_data(8), batch_size=8)
    d = ann.trace.diff(*paths)
    assert (d.actor, d.kind, d.key) == ("stage0", "forward", 0)
    assert "tensor 0 has shape (8, 8) <f4 in the first run and (8, 6) <f4 in the second" in d.reason


def test_a_diff_with_a_trace_cut_off_says_so(tmp_path):
    # the cut showed only as "one run did more work here than the other" (the CLI added a
    # note of its own), and a cut that lost only the last record said the runs agreed
    whole = tmp_path / "whole.trace"
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(whole)
    ).fit(_data(16), batch_size=8)
    data = whole.read_bytes()
    recorded = ann.trace.read(whole).events
    assert [e["ev"] for e in recorded[-2:]] == ["flush", "close"]  # compared by neither check
    # the byte where each event's record starts, and a compute that sends
    at = [offset for offset, _ in iter_frames(io.BytesIO(data), str(whole))][2:]
    i = next(i for i, e in enumerate(recorded) if e["ev"] == "start" and e["a"] == "stage0")
    assert recorded[i + 1]["ev"] == "send"
    cuts = {"half": len(data) // 2, "start": at[i + 1] + 5, "end": len(data) - 5}
    for name, size in cuts.items():
        cut = tmp_path / f"{name}.trace"
        cut.write_bytes(data[:size])
        trace = ann.trace.read(cut)
        assert trace.truncated
        note = f"{cut} is cut off after {len(trace.events)} events (its run did not finish writing)"
        for pair in ((whole, cut), (cut, whole)):
            d = ann.trace.diff(*pair)
            assert d is not None and note in d.reason and note in str(d)
        if name == "end":
            assert len(trace.events) == len(recorded) - 1
            assert d.reason.startswith("the runs agree as far as the traces go, but ")
        else:
            assert d.reason.endswith(", so a divergence where it ends may be only the cut")
        if name == "start":  # said "the replay sent nothing here", of no replay
            d = ann.trace.diff(whole, cut)
            assert (d.actor, d.seq) == ("stage0", recorded[i]["seq"])
            assert d.reason.startswith("the second run sent nothing here; note: ")
            # the other way round, the same point: the work the cut trace lacks is ranked at
            # its cut, the send of the compute it was cut in first (it named stage1's next
            # compute, ranked by the whole trace's clock)
            d = ann.trace.diff(cut, whole)
            assert (d.actor, d.seq, d.kind, d.key) == ("stage0", recorded[i]["seq"], "forward", 0)
            assert d.reason.startswith("the second run sent more than the first; note: ")
    assert ann.trace.diff(whole, whole) is None
    # a cut trace with itself: its note once, not once for each side
    d = ann.trace.diff(cut, cut)
    note = f"{cut} is cut off after {len(trace.events)} events (its run did not finish writing)"
    assert d is not None and d.reason.count(note) == 1


def test_a_diff_of_runs_that_sent_a_message_elsewhere_speaks_of_two_runs(tmp_path):
    # it said "the replay sent the forward of key 0 to 'stage9' instead", of no replay
    from _replay_cases import _rewrite

    path, other = tmp_path / "a.trace", tmp_path / "b.trace"
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)
    ).fit(_data(8), batch_size=8)
    _rewrite(
        path,
        other,
        lambda r: {**r, "p": "stage9"} if (r.get("ev"), r.get("a")) == ("send", "stage0") else r,
    )
    d = ann.trace.diff(path, other)
    assert d is not None and (d.actor, d.kind, d.key, d.peer) == ("stage0", "forward", 0, "stage1")
    assert d.reason == "the second run sent the forward of key 0 to 'stage9' instead"
    assert "replay" not in str(d)


def _shifted(path, out, seconds):
    """A copy of the trace ``path`` whose clock reads ``seconds`` later (another run's clock)."""
    from _replay_cases import _rewrite

    _rewrite(path, out, lambda r: {**r, "t": r["t"] + seconds} if "t" in r else r)


def test_a_diff_ranks_every_divergence_on_the_first_runs_clock(tmp_path):
    # an op only the second run had was ranked by the second run's clock: Sync against
    # GPipe(2), the first clock reading later, named the loss's forward of key 2 (Sync's run
    # has no key 2) instead of stage0's first send, whose shape differs
    sync, gpipe = tmp_path / "sync.trace", tmp_path / "gpipe.trace"
    for path, policy in ((sync, policies.Sync()), (gpipe, policies.GPipe(2))):
        ann.Trainer(
            _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policy, trace=str(path)
        ).fit(_data(16), batch_size=8)
    late_sync, late_gpipe = tmp_path / "late_sync.trace", tmp_path / "late_gpipe.trace"
    _shifted(sync, late_sync, 1000.0)
    _shifted(gpipe, late_gpipe, 1000.0)
    for a, b in ((sync, gpipe), (late_sync, gpipe), (sync, late_gpipe)):
        d = ann.trace.diff(a, b)
        assert (d.actor, d.seq, d.kind, d.key) == ("stage0", 0, "forward", 0), (a, b, d)
        assert "tensor 0 has shape (8, 8) <f4 in the first run and (4, 8) <f4" in d.reason
    for a, b in ((gpipe, sync), (late_gpipe, sync), (gpipe, late_sync)):
        d = ann.trace.diff(a, b)
        assert (d.actor, d.seq, d.kind, d.key) == ("stage0", 0, "forward", 0), (a, b, d)


def test_a_diff_puts_work_of_a_key_the_first_run_never_admitted_where_the_runs_part(tmp_path):
    # a run of one minibatch against one of two: the work only the second run did was ranked
    # where the first run's events of each actor end, so diff named the actor whose events end
    # first there (under Sync the loss: its gradient goes back to stage1), `loss, sequence 1:
    # the forward of key 1`, not where the runs part: the second run's admit of key 1, whose
    # first work is stage0's forward
    data = {k: v[:16] for k, v in _data(16).items()}
    short, long = tmp_path / "short.trace", tmp_path / "long.trace"
    for path, rows in ((short, 8), (long, 16)):
        ann.Trainer(
            _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)
        ).fit({k: v[:rows] for k, v in data.items()}, batch_size=8, shuffle=False)
    for shift in (0.0, 1000.0, -1000.0):
        a = tmp_path / f"short{shift}.trace"
        _shifted(short, a, shift)
        d = ann.trace.diff(a, long)
        assert (d.actor, d.seq, d.kind, d.key) == ("stage0", 2, "forward", 1), (shift, d)
        assert d.reason == (
            "processing order differs: one run did more work here than the other: the runs "
            "part at the second run's admit of key 1, which the first run never admitted (its "
            "admits end at key 0)"
        )
        d = ann.trace.diff(long, a)  # (the other way round it named stage0 already)
        assert (d.actor, d.seq, d.kind, d.key) == ("stage0", 2, "forward", 1), (shift, d)
        assert d.reason.endswith("the first run admitted key 1, which the second never did")


def _sync_run(path, graph=None, policy=None, seed=0, lr=0.1) -> None:
    ann.Trainer(
        graph if graph is not None else _plain_graph(), optimizer=optim.SGD(lr=lr),
        policy=policy if policy is not None else policies.Sync(), trace=str(path), seed=seed,
    ).fit(_data(16), batch_size=8)  # fmt: skip


def test_a_diff_of_traces_of_two_graphs_is_refused_naming_the_first_difference(tmp_path, capsys):
    # it compared them actor by actor: "first divergence at actor 'stage0', sequence 0: ...
    # processing order differs: one run did more work here than the other"
    from asyncnn._cli import main

    from _replay_cases import _routed

    chain, routed, wired = tmp_path / "chain.trace", tmp_path / "routed.trace", tmp_path / "w.trace"
    _sync_run(chain)
    _sync_run(routed, _routed())
    only = r"only the first has the nodes \['stage0', 'stage1'\]; only the second has the nodes"
    with pytest.raises(ValueError, match=rf"traces of different graphs: {only} \['gate'"):
        ann.trace.diff(chain, routed)
    with pytest.raises(ValueError, match=r"traces of different graphs: .*'gate'"):
        ann.trace.diff(routed, chain)
    # the same nodes wired otherwise: the first node whose inputs differ
    _sync_run(wired)
    _rewrite(wired, rewired := tmp_path / "rewired.trace", _reading_x)
    with pytest.raises(
        ValueError, match=r"node 'stage1' reads \['stage0'\] in the first .*\['x'\]"
    ):
        ann.trace.diff(chain, rewired)
    assert main(["trace", "diff", str(chain), str(routed)]) == 2  # (1: the runs differ)
    assert "traces of different graphs" in capsys.readouterr().err


def _reading_x(record):
    if "graph" in record:
        next(n for n in record["graph"]["nodes"] if n["name"] == "stage1")["inputs"] = ["x"]
    return record


def test_a_diff_of_runs_with_other_seeds_policies_or_modules_says_so_beside_the_divergence(
    tmp_path,
):
    # two runs of one graph under other settings are what diff is for: the divergence is found
    # as before, and the settings that differ are named beside it
    base, other = tmp_path / "base.trace", tmp_path / "other.trace"
    _sync_run(base)
    _sync_run(other, policy=policies.GPipe(2), seed=3, lr=0.5)
    d = ann.trace.diff(base, other)
    assert d is not None and (d.actor, d.seq) == ("stage0", 0)
    assert d.reason.endswith(
        "; the runs' headers differ: policy: type 'Sync' and 'GPipe'; optimizer: lr 0.1 "
        "and 0.5; seed: 0 and 3"
    ), d.reason
    wide = tmp_path / "wide.trace"
    graph = ann.Graph.sequential(
        [nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)], loss=nn.CrossEntropyLoss(), stages=2,
        input_shape=(None, 5),
    )  # fmt: skip
    _sync_run(wide, graph)
    d = ann.trace.diff(base, wide)
    assert d is not None and "has shape (8, 8) <f4 in the first run and (8, 6)" in d.reason
    assert d.reason.endswith(
        "; the runs' headers differ: graph: layer 'stage0''s module: "
        "args.modules[0].args.out_features 8 and 6"
    ), d.reason


def test_a_built_in_module_s_argument_a_spec_lacks_reads_as_its_default_in_the_note():
    # a trace written before AvgPool2d took divisor_override has no such argument: it meant the
    # default, so the headers' note must not name it as a difference; a value given is one
    import copy

    from asyncnn._math._nn._spec import to_spec
    from asyncnn._tracing._diff import _first_difference

    new = to_spec(nn.Sequential(nn.AvgPool2d(2), nn.Flatten()))
    old = copy.deepcopy(new)
    del old["args"]["modules"][0]["args"]["divisor_override"]
    assert _first_difference(old, new) is None and _first_difference(new, old) is None
    given = to_spec(nn.Sequential(nn.AvgPool2d(2, divisor_override=3), nn.Flatten()))
    assert _first_difference(old, given) == ("args.modules[0].args.divisor_override", None, 3)
    # (a key of no built-in module's spec is compared as it is)
    assert _first_difference({"a": 1}, {}) == ("a", 1, _ABSENT)
