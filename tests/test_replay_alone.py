"""Replay of one actor alone from the messages it received, and replays stopped by a hook or at
a key."""

from __future__ import annotations

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_equal
from _replay_cases import _data, _graph, _routed


def test_replay_one_actor_alone_and_stop_at_a_key(tmp_path):
    path = tmp_path / "r.trace"
    tr = ann.Trainer(
        _graph(),
        optimizer=optim.Adam(lr=0.01),
        policy=policies.Async(3),
        trace=str(path),
        trace_payloads="all",
    )
    tr.fit(_data(24), epochs=1, batch_size=4)
    rep = ann.replay(path, actor="stage1")
    # 6 keys: a forward and a backward each, and an update after each backward
    assert rep.identical and rep.events_checked == 18
    assert_params_equal({"stage1": rep.params["stage1"]}, {"stage1": tr.params["stage1"]})
    seen = []
    rep = ann.replay(
        path,
        actor="stage1",
        hook=lambda a, seq, kind, key, p: seen.append((a, seq, kind, key)) and False,
        stop_at_key=2,
    )
    assert rep.stopped_at[3] == 2 and seen[-1][3] == 2
    with pytest.raises(ValueError, match="trace_payloads='all'"):
        ann.Trainer(
            _graph(),
            optimizer=optim.SGD(lr=0.1),
            policy=policies.Sync(),
            trace=str(tmp_path / "i.trace"),
        ).fit(_data(8), batch_size=8)
        ann.replay(tmp_path / "i.trace", actor="stage1")


def test_replay_the_loss_actor_alone_and_stop_at_a_key(tmp_path):
    # refused as "no layer named 'loss'"; let through, its loss reports found no minibatch
    # (KeyError: 0), and its hook was never called
    path = tmp_path / "r.trace"
    ann.Trainer(
        _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Async(3), trace=str(path),
        trace_payloads="all",
    ).fit(_data(24), epochs=1, batch_size=4)  # fmt: skip
    seen = []
    rep = ann.replay(path, actor="loss", hook=lambda *op: seen.append(op) and False)
    # 6 keys: one backward sent to stage2 each, and one loss each (checked bit for bit)
    assert rep.identical and rep.events_checked == 12
    assert sorted(rep.losses["loss"]) == list(range(6))
    assert seen == [("loss", key, "forward", key, {}) for key in range(6)]
    rep = ann.replay(path, actor="loss", stop_at_key=2)
    assert rep.identical and rep.stopped_at == ("loss", 2, "forward", 2)
    with pytest.raises(ValueError, match=r"no actor named 'lost'.*losses: \['loss'\]"):
        ann.replay(path, actor="lost")


def test_replay_alone_of_a_one_layer_graph_and_a_second_reader_of_the_data(tmp_path):
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    a = g.layer("a", nn.Linear(5, 3), x)
    b = g.layer("b", nn.Linear(5, 3), x)  # the second reader of x
    g.loss("la", nn.CrossEntropyLoss(), a, y)
    g.loss("lb", nn.CrossEntropyLoss(), b, y)
    path = tmp_path / "r.trace"
    ann.Trainer(
        g,
        optimizer=optim.SGD(lr=0.1),
        policy=policies.Async(2),
        trace=str(path),
        trace_payloads="all",
    ).fit(_data(16), batch_size=4)
    for name in ("a", "b"):
        rep = ann.replay(path, actor=name)
        # 4 forwards and 4 updates; backwards send nothing
        assert rep.identical and rep.events_checked == 8
    one = ann.Graph.sequential([nn.Linear(5, 3)], loss=nn.CrossEntropyLoss(), input_shape=(None, 5))
    path1 = tmp_path / "one.trace"
    ann.Trainer(
        one,
        optimizer=optim.SGD(lr=0.1),
        policy=policies.Sync(),
        trace=str(path1),
        trace_payloads="all",
    ).fit(_data(8), batch_size=4)
    assert ann.replay(path1, actor="stage0").identical


def test_stopped_replay_keeps_the_weights_where_it_stopped(tmp_path):
    path = tmp_path / "r.trace"
    ann.Trainer(
        _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(path)
    ).fit(_data(16), batch_size=8)
    rep = ann.replay(path, stop_at_key=2)
    assert rep.stopped_at is not None and rep.stopped_at[3] == 2
    assert set(rep.params) == {"stage0", "stage1", "stage2"} and rep.events_checked > 0
    assert rep.identical


def test_a_stop_at_key_that_is_no_key_of_the_run_is_refused(tmp_path):
    # (a key the run never processed, -1, '3' or 2.5 replayed the whole run and called it
    # identical, never stopping)
    path = tmp_path / "r.trace"
    ann.Trainer(
        _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(path),
        trace_payloads="all",
    ).fit(_data(16), batch_size=8)  # fmt: skip
    for key in (99, -1):
        with pytest.raises(
            ValueError,
            match=rf"^replay: stop_at_key={key}, but no actor of this run processed any work "
            rf"of key {key} \(its actors processed work of keys 0 to 3\)",
        ):
            ann.replay(path, stop_at_key=key)
    with pytest.raises(ValueError, match=r"^replay: stop_at_key=99, but actor 'stage0' "):
        ann.replay(path, actor="stage0", stop_at_key=99)
    for key in ("3", 2.5, True):
        with pytest.raises(TypeError, match=r"^replay: stop_at_key must be a key \(an int\), "):
            ann.replay(path, stop_at_key=key)
    assert ann.replay(path, stop_at_key=np.int64(3)).stopped_at[3] == 3  # (a numpy int is one)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", [policies.GPipe(2), policies.Async(3)], ids=repr)
def test_a_merge_replays_alone_from_the_weights_and_route_its_router_sent(tmp_path, policy):
    # the router sends its merge two tensors in one message (gate weights, route); replaying the
    # merge alone fed it the first only, and it failed on the missing route (KeyError)
    path = tmp_path / "moe.trace"
    tr = ann.Trainer(_routed(), optimizer=optim.SGD(lr=0.1), policy=policy, trace=str(path),
                     trace_payloads="all")  # fmt: skip
    tr.fit(_data(24), epochs=1, batch_size=8)
    for actor in ("merge", "gate", "e1", "head"):
        rep = ann.replay(path, actor=actor)
        assert rep.identical and rep.events_checked > 0, (actor, rep.first_divergence)
        assert_params_equal({actor: rep.params[actor]}, {actor: tr.params[actor]})


def _drop_payloads(r):
    return {k: v for k, v in r.items() if k != "pl"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("kind", "edit", "said"),
    [("forward", lambda r: {**r, "m": {**r["m"], "slot": 5}},
      r"\(send of 'stage0'\) sends the forward of key 0 to slot 5 of 'stage1', whose forward "
      r"takes 1 input\(s\), in slots 0 to 0 \(from \['stage0'\]\)"),
     # (taken as a Python index from the end: the replay said identical)
     ("forward", lambda r: {**r, "m": {**r["m"], "slot": -1}}, r".* to slot -1 of 'stage1'"),
     ("backward", lambda r: {**r, "m": {**r["m"], "slot": 1}},
      r"\(send of 'stage2'\) sends the backward of key 0 to slot 1 of 'stage1', whose backward "
      r"takes 1 gradient\(s\)"),
     # (fed to the actor as None)
     ("forward", _drop_payloads,
      r"\(send of 'stage0'\) carries no payload for its tensor 0, which 'stage1' replayed alone "
      r"is fed")],
    ids=["slot-past", "slot-negative", "backward-slot", "no-payload"],
)  # fmt: skip
def test_a_message_an_actor_alone_cannot_take_is_refused_before_the_replay(
    tmp_path, kind, edit, said
):
    from _replay_cases import _rewrite

    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    ann.Trainer(
        _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path),
        trace_payloads="all",
    ).fit(_data(8), batch_size=8)  # fmt: skip
    _rewrite(
        path,
        bad,
        lambda r: (
            edit(r) if (r.get("ev"), r.get("p"), r.get("k")) == ("send", "stage1", kind) else r
        ),
    )
    with pytest.raises(ann.TraceFormatError, match=rf"bad\.trace: event \d+ {said}"):
        ann.replay(bad, actor="stage1")
    assert ann.replay(path, actor="stage1").identical


def _gpipe_trace(path):
    ann.Trainer(
        _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(path),
        trace_payloads="all",
    ).fit(_data(8), batch_size=4)  # fmt: skip


def _the_gradient_to_stage2(r):
    return (r.get("ev"), r.get("a"), r.get("p"), r.get("k"), r.get("key")) == (
        "send", "loss", "stage2", "backward", 0
    )  # fmt: skip


@pytest.mark.parametrize("how", ["deleted", "relabelled"])
def test_an_actor_alone_whose_trace_lacks_a_message_it_processed_is_refused(tmp_path, how):
    # the replay of stage2 alone waited forever for the gradient of key 0 that the file lacks
    # (nothing is admitted, so the stall watchdog, which looks at keys in flight, never fired)
    from _replay_cases import _rewrite

    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    _gpipe_trace(path)
    if how == "deleted":
        from asyncnn._runtime._traceformat import encode_record, iter_frames

        with open(path, "rb") as f:
            records = [r for _, r in iter_frames(f) if not _the_gradient_to_stage2(r)]
        bad.write_bytes(b"".join(encode_record(r) for r in records))
    else:
        _rewrite(path, bad, lambda r: {**r, "ev": "update"} if _the_gradient_to_stage2(r) else r)
    seq = next(
        e.seq for e in ann.trace.read(path).events
        if (e.what, e.actor, e.kind, e.key) == ("start", "stage2", "backward", 0)
    )  # fmt: skip
    with pytest.raises(
        ann.TraceFormatError,
        match=rf"'stage2' replayed alone could not do its compute {seq} \(the backward of key "
        r"0\): a message it received for it \(its receive event\) has no send in the trace",
    ):
        ann.replay(bad, actor="stage2")
    assert ann.replay(path, actor="stage2").identical
    # a whole replay blamed itself ("the replay sent the backward of key 0 ... instead")
    with pytest.raises(
        ann.TraceFormatError,
        match=r"\(receive of 'stage2'\) took the backward of key 0 from 'loss', whose send the "
        "trace does not hold",
    ):
        ann.replay(bad)


def test_an_actor_alone_waiting_for_a_message_never_fed_stops_naming_it(tmp_path, monkeypatch):
    # what the check before the replay does not catch is not waited for forever either
    from asyncnn._tracing import _replay

    from _replay_cases import _rewrite

    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    _gpipe_trace(path)
    _rewrite(path, bad, lambda r: {**r, "ev": "update"} if _the_gradient_to_stage2(r) else r)
    monkeypatch.setattr(_replay, "_check_every_compute_fed", lambda trace, name: None)
    monkeypatch.setattr(_replay, "ALONE_STALL_SECONDS", 0.5)
    with pytest.raises(
        ann.StallError, match=r"replay of 'stage2' alone did nothing for 0.5 s: it waits for its "
        r"compute \d+ \(the backward of key 0\)"
    ):  # fmt: skip
        ann.replay(bad, actor="stage2")
