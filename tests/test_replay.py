"""Replay reproduces a recorded run bit for bit; perturbations are found where they first show;
diff names the first reordered message of two differently timed runs."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._runtime._recorder import Recorder
from asyncnn._runtime._traceformat import encode_record, iter_frames

from _reference import assert_params_equal


@dataclass(frozen=True)
class Jittery(nn.Linear):
    """A Linear that sleeps a random while: two runs under Async then differ in timing."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        time.sleep(float(np.random.default_rng().uniform(0, 0.002)))
        return super().__call__(params, x)


def _graph() -> ann.Graph:
    return ann.Graph.sequential(
        [Jittery(5, 8), nn.Tanh(), Jittery(8, 8), nn.Tanh(), Jittery(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=[2, 2, 1],
        input_shape=(None, 5),
    )


def _data(n: int = 48):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 5)), "y": rng.integers(0, 3, n)}


def _async_run(path, payloads="inputs"):
    tr = ann.Trainer(
        _graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.Async(max_active_keys=4, min_update_frequency=2),
        trace=str(path),
        trace_payloads=payloads,
        # cost-free work runs inline; make it go through the threads so timing varies
    )
    tr.fit(_data(), epochs=2, batch_size=4)
    return tr


def _two_different_runs(tmp_path):
    for attempt in range(10):
        a, b = tmp_path / f"a{attempt}.trace", tmp_path / f"b{attempt}.trace"
        ta, tb = _async_run(a), _async_run(b)
        if not _equal(ta.params, tb.params):
            return (a, ta), (b, tb)
    pytest.skip("ten pairs of Async runs all took the same order")


def _equal(p, q):
    try:
        assert_params_equal(p, q)
        return True
    except AssertionError:
        return False


@pytest.mark.timeout(120)
def test_async_runs_that_differ_each_replay_bit_identically(tmp_path):
    (a, ta), (b, tb) = _two_different_runs(tmp_path)
    for path, tr in ((a, ta), (b, tb)):
        rep = ann.replay(path)
        assert rep.identical and rep.first_divergence is None
        assert rep.events_checked > 100
        assert_params_equal(rep.params, tr.params)
    d = ann.trace.diff(a, b)
    assert d is not None and "processing order differs" in d.reason
    assert d.actor in {"stage0", "stage1", "stage2", "loss"}
    assert ann.trace.diff(a, a) is None


def test_changed_learning_rate_shows_at_the_first_update(tmp_path):
    path, old = tmp_path / "r.trace", tmp_path / "old.trace"
    tr = ann.Trainer(
        _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2), trace=str(path)
    )
    tr.fit(_data(16), epochs=1, batch_size=8)
    rep = ann.replay(path, optimizer=optim.SGD(lr=0.2))
    assert not rep.identical
    d = rep.first_divergence
    # the last stage ends minibatch 0 first: its update, in its backward of key 1
    assert (d.actor, d.kind, d.key, d.seq) == ("stage2", "update", 1, 3)
    assert "the weights of version 1 differ: parameter array 0 of 2" in str(d)

    # a trace written before updates carried digests: found where a forward uses the weights
    _rewrite(path, old, lambda r: {k: v for k, v in r.items() if r.get("ev") != "update" or k
                                   not in ("x", "key", "seq")})  # fmt: skip
    rep = ann.replay(old, optimizer=optim.SGD(lr=0.2))
    d = rep.first_divergence
    # the first update is applied after minibatch 0; the first forward after it is stage0's F(2)
    assert (d.actor, d.kind, d.key, d.seq) == ("stage0", "forward", 2, 4)
    assert "digest differs" in str(d)
    same, same_old = ann.replay(path), ann.replay(old)
    assert same.identical and same_old.identical
    updates = sum(1 for e in ann.trace.read(path).events if e.what == "update")
    assert updates == 6 and same.events_checked == same_old.events_checked + updates


def test_a_change_of_the_last_update_alone_is_a_divergence(tmp_path):
    # a run's last update is used by no later send: replay said identical, with other weights
    path = tmp_path / "r.trace"
    tr = ann.Trainer(_plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
                     trace=str(path))  # fmt: skip
    tr.fit(_data(8), batch_size=8)
    rep = ann.replay(path, optimizer=optim.SGD(lr=0.5))
    assert not _equal(rep.params, tr.params)
    assert not rep.identical
    d = rep.first_divergence
    assert (d.actor, d.kind, d.key, d.seq) == ("stage1", "update", 0, 1)
    assert d.peer == "" and d.expected != d.got and len(d.expected) == 2
    t = ann.trace.read(path)
    for e in (e for e in t.events if e.what == "update"):  # digests only, never the bytes
        assert "pl" not in e and [x["s"] for x in e.tensors] in ([[3], [8, 3]], [[8], [5, 8]])
    rep = ann.replay(path)
    assert rep.identical and rep.first_divergence is None
    assert_params_equal(rep.params, tr.params)


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


def _rewrite(path, out, change):
    """Copies a trace, letting ``change(record)`` edit records (re-framed with valid checksums)."""
    with open(path, "rb") as f:
        records = [r for _, r in iter_frames(f)]
    with open(out, "wb") as f:
        for r in records:
            f.write(encode_record(change(r)))


def test_flipped_bit_in_recorded_input_is_found_where_it_shows(tmp_path):
    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    tr = ann.Trainer(
        _graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.GPipe(2),
        trace=str(path),
        trace_payloads="all",
    )
    tr.fit(_data(16), epochs=1, batch_size=8)

    def flip(r):
        if r.get("ev") == "send" and r.get("a") == "x" and r.get("key") == 3 and "pl" in r:
            raw = bytearray(r["pl"][0])
            raw[5] ^= 0x01  # one bit of one float of key 3's data
            r["pl"] = [bytes(raw)]
        return r

    _rewrite(path, bad, flip)
    rep = ann.replay(bad)
    d = rep.first_divergence
    assert (d.actor, d.kind, d.key) == ("stage0", "forward", 3)
    assert d.max_abs_diff is not None and 0 < d.max_abs_diff < 1


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
    # 6 keys: one backward sent to stage2 each
    assert rep.identical and rep.events_checked == 6
    assert seen == [("loss", key, "forward", key, {}) for key in range(6)]
    rep = ann.replay(path, actor="loss", stop_at_key=2)
    assert rep.identical and rep.stopped_at == ("loss", 2, "forward", 2)
    with pytest.raises(ValueError, match=r"no actor named 'lost'.*losses: \['loss'\]"):
        ann.replay(path, actor="lost")


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


def test_replay_of_a_trace_without_state_or_inputs_says_why(tmp_path):
    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    ann.Trainer(
        _graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.Sync(),
        trace=str(path),
        trace_payloads="none",
    ).fit(_data(8), batch_size=8)
    with pytest.raises(ValueError, match="no recorded data"):
        ann.replay(path)
    _rewrite(path, bad, lambda r: {"ev": "noop", "t": 0, "a": "x"} if "state" in r else r)
    with pytest.raises(ValueError, match="no initial state"):
        ann.replay(bad)
    _ = msgpack


def test_replay_of_a_second_fit_with_pending_gradients(tmp_path):
    path = tmp_path / "r.trace"
    tr = ann.Trainer(
        _graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.Async(3, min_update_frequency=2),
        trace=str(path),
    )
    tr.fit(_data(12), batch_size=4)  # 3 keys: one gradient left pending per layer
    assert tr.state.pending_grads
    tr.fit(_data(12), batch_size=4)
    assert tr.traces == [str(path), str(tmp_path / "r.1.trace")]
    rep = ann.replay(tr.traces[1])
    assert rep.identical
    assert_params_equal(rep.params, tr.params)


def test_checkpoint_keeps_pending_gradients(tmp_path):
    def trainer():
        return ann.Trainer(
            _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Async(1, min_update_frequency=2)
        )

    straight = trainer()
    straight.fit(_data(12), batch_size=4)
    straight.fit(_data(12), batch_size=4)
    first = trainer()
    first.fit(_data(12), batch_size=4)
    first.save(str(tmp_path / "c"))
    resumed = ann.Trainer.load(str(tmp_path / "c"))
    assert {k: v[1] for k, v in resumed.state.pending_grads.items()} == {
        "stage0": 1,
        "stage1": 1,
        "stage2": 1,
    }
    resumed.fit(_data(12), batch_size=4)
    assert_params_equal(resumed.params, straight.params)


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


def test_backward_messages_carry_the_version_they_were_computed_with(tmp_path):
    path = tmp_path / "r.trace"
    ann.Trainer(
        _graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.PipeDream(2, stash=True),
        trace=str(path),
    ).fit(_data(16), batch_size=8)
    t = ann.trace.read(path)
    fwd = {
        (e["a"], e["key"]): e["v"] for e in t.events if e["ev"] == "start" and e["k"] == "forward"
    }
    for e in t.events:
        if e["ev"] == "send" and e["k"] == "backward" and e["a"].startswith("stage"):
            assert e["v"] == fwd[(e["a"], e["key"])]  # stashed: the forward's version


# refused at once: before the check, the replay waited out its stall timeout
@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [None, "user code broke"])
def test_replay_of_a_run_stopped_with_work_unprocessed_is_refused_at_once(tmp_path, error):
    """A run cancelled (no error recorded), or failed outside the actors, leaves messages that
    no actor processed: a whole replay would wait for that work forever."""
    path, cut = tmp_path / "r.trace", tmp_path / "cut.trace"
    ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)).fit(
        _data(8), batch_size=8
    )
    with open(path, "rb") as f:
        head, state, *events = [r for _, r in iter_frames(f)]

    def at(ev, actor):
        return next(
            i
            for i, e in enumerate(events)
            if (e["ev"], e["a"], e.get("k")) == (ev, actor, "backward")
        )

    # the run stopped once stage1 had sent key 0's backward on, before stage0 received it
    sent, ended = at("send", "stage1"), at("end", "stage1")
    kept = events[: sent + 1] + [e for e in events[sent + 1 : ended + 1] if e["a"] == "stage1"]
    if error is not None:
        kept.append({"t": kept[-1]["t"], "a": "scheduler", "ev": "error", "m": {"error": error}})
    with open(cut, "wb") as f:
        for r in (head, state, *kept):
            f.write(encode_record(r))
    with pytest.raises(
        ann.TraceFormatError, match="stopped before 'stage0' processed the backward of key 0"
    ) as info:
        ann.replay(cut)
    assert ("user code broke" if error else "cancelled or interrupted") in str(info.value)
    # what it did can still be replayed one actor at a time, or up to a key
    assert ann.replay(cut, stop_at_key=0).identical


def test_replay_with_an_optimizer_that_cannot_continue_the_recorded_state_says_why(tmp_path):
    path = tmp_path / "r.trace"
    ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)).fit(
        _data(8), batch_size=8
    )
    for other in (optim.Adam(lr=0.1), optim.SGD(lr=0.1, momentum=0.9)):
        with pytest.raises(ValueError, match=r"layer 'stage0' has \[.*'step'\], that of the "):
            ann.replay(path, optimizer=other)
    with pytest.raises(TypeError, match="must be an asyncnn.optim optimizer.*'sgd'"):
        ann.replay(path, optimizer="sgd")
    assert ann.replay(path, optimizer=optim.SGD(lr=0.1)).identical


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


def _routed() -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    r = g.router("gate", nn.Linear(5, 3), x, experts=3, k=2, capacity=3)
    experts = [g.layer(f"e{i}", nn.Sequential(nn.Linear(5, 4), nn.Tanh()), r) for i in range(3)]
    head = g.layer("head", nn.Linear(4, 3), g.merge("merge", r, *experts))
    g.loss("loss", nn.CrossEntropyLoss(), head, y)
    return g


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


@pytest.mark.timeout(20)  # the replay used to stall for 30 s (StallError)
def test_a_run_that_check_finite_stopped_replays_up_to_the_same_failure(tmp_path):
    path = tmp_path / "nan.trace"
    tr = ann.Trainer(_routed(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                     trace=str(path), check_finite=True)  # fmt: skip
    tr.state.params["e1"][0]["weight"][:] = np.nan
    with pytest.raises(ann.ActorError, match="'e1' produced NaN or Inf") as run_err:
        tr.fit(_data(24), epochs=1, batch_size=8)
    with pytest.raises(ann.ActorError, match="'e1' produced NaN or Inf") as replay_err:
        ann.replay(path)
    run, rep = run_err.value, replay_err.value
    assert (rep.actor, rep.key) == (run.actor, run.key)


def test_a_diff_with_a_trace_cut_off_says_so(tmp_path):
    # the cut showed only as "one run did more work here than the other" (the CLI added a
    # note of its own), and a cut that lost only the last record said the runs agreed
    whole = tmp_path / "whole.trace"
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(whole)
    ).fit(_data(16), batch_size=8)
    data = whole.read_bytes()
    recorded = ann.trace.read(whole).events
    assert recorded[-1]["ev"] == "flush"  # compared by neither check
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
    assert ann.trace.diff(whole, whole) is None


def _plain_graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=2,
        input_shape=(None, 5),
    )


def _update_digests(path) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for e in ann.trace.read(path).events:
        if e.what == "update":
            out.setdefault(e.actor, []).append([x["h"] for x in e.tensors])
    return out


def test_a_captured_device_run_records_the_digests_of_its_updates_as_the_cpu_run(
    fake_cuda, emulated, tmp_path, monkeypatch
):
    # the graphs write their weights again at the next update: the digests must be those of
    # the weights each update made, copied behind it on the actor's stream, read by the
    # trace's writer once there (a Later: the actor never waits)
    handed: list[str] = []
    event = Recorder.event

    def spy(self, actor, ev, *args, **kwargs):
        if ev == "update":
            handed.append(type(args[5]).__name__)
        return event(self, actor, ev, *args, **kwargs)

    monkeypatch.setattr(Recorder, "event", spy)
    data = _data(32)
    for where, graphs in (("cpu", False), ("cuda:0", True)):

        async def main(where=where, graphs=graphs):
            graph = ann.Graph.sequential(
                [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)], loss=nn.CrossEntropyLoss(),
                stages=2, input_shape=(None, 5), devices=[where] * 2,
            )  # fmt: skip
            async with ann.open_run(
                graph, optim.SGD(lr=0.1), policies.Sync(), dtype="float64", seed=1,
                cuda_graphs=graphs, trace=str(tmp_path / f"{where}.trace"),
            ) as run:  # fmt: skip
                for i in range(4):
                    await run.step({k: v[i * 8 : (i + 1) * 8] for k, v in data.items()})

        anyio.run(main)
    cpu, dev = _update_digests(tmp_path / "cpu.trace"), _update_digests(tmp_path / "cuda:0.trace")
    assert cpu == dev and [len(v) for v in cpu.values()] == [4, 4]
    assert handed == ["tuple"] * 8 + ["Later"] * 8
    assert ann.replay(tmp_path / "cuda:0.trace").identical


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_replay_opens_the_pool_the_run_recorded(tmp_path, monkeypatch, backend):
    # replay opened a pool of this host's cores, whose products may be cut otherwise
    from asyncnn._runtime import _lifecycle
    from asyncnn.backends import open_device_pool

    path, old = tmp_path / "r.trace", tmp_path / "old.trace"
    data = _data(16)

    async def record():
        async with open_device_pool(cpu_workers=3, blas_threads=1, part_flops=5000) as pool:
            async with ann.open_run(
                _plain_graph(), optim.SGD(lr=0.1), policies.GPipe(2), trace=str(path), pool=pool
            ) as run:
                await run.step(data)

    anyio.run(record, backend=backend)
    header = ann.trace.read(path).header
    assert header["pool"] == {"cpu_workers": 3, "part_flops": 5000, "split": True}
    opened: list[dict] = []

    def spy(**kwargs):
        opened.append(kwargs)
        return open_device_pool(**kwargs)

    monkeypatch.setattr(_lifecycle, "open_device_pool", spy)
    assert ann.replay(path).identical
    assert [(o["cpu_workers"], o["part_flops"], o["split"]) for o in opened] == [(3, 5000, True)]
    # a trace written before pools were recorded: this host's, as before
    _rewrite(path, old, lambda r: {k: v for k, v in r.items() if k != "pool"})
    assert ann.replay(old).identical
    assert opened[1]["cpu_workers"] == _lifecycle.host_cores()
    assert opened[1]["part_flops"] == _lifecycle.RUN_PART_FLOPS


class HalvingGradient(ann.LayerActor):
    """Scales its input gradient by a factor that halves after each backward (its own state,
    a 0-d array)."""

    def setup(self) -> None:
        self.factor = 1.0

    def actor_state(self) -> Any:
        return {"factor": np.asarray(self.factor)}

    def load_actor_state(self, state: Any) -> None:
        self.factor = float(state["factor"])

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        grads = await super().on_backward(key, grad, meta)
        self.factor *= 0.5
        return [None if g is None else g * self.factor for g in grads or []]


def _stateful_graph(actor: type[ann.LayerActor] = HalvingGradient) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(5, 8), x)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(8, 3), h, actor=actor), y)
    return g


def test_replay_of_a_second_fit_starts_from_the_actors_own_state(tmp_path):
    # the trace's initial state lacked actor_states: the replay's actor started from setup's
    # factor 1.0 and diverged at 'b' ("the backward of key 4 to 'a'")
    path = tmp_path / "r.trace"
    tr = ann.Trainer(
        _stateful_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
        dtype="float64", trace=str(path),
    )  # fmt: skip
    tr.fit(_data(16), batch_size=8)
    tr.fit(_data(16), batch_size=8)
    first, second = (ann.trace.read(p).state for p in tr.traces)
    assert "actor_states" not in first  # no actor kept a state yet: the record as before
    assert second["actor_states"]["dict"]["b"]["dict"]["factor"]["s"] == []  # 0-d stays 0-d
    for p in tr.traces:  # a trace without actor states replays as before
        assert ann.replay(p).identical
    rep = ann.replay(tr.traces[1])
    assert rep.first_divergence is None
    assert_params_equal(rep.params, tr.params)


class UnrecordableState(ann.LayerActor):
    def actor_state(self) -> Any:
        return {"seen": {1, 2}}

    def load_actor_state(self, state: Any) -> None:
        pass


def test_an_actor_state_a_trace_cannot_hold_is_refused_before_the_run(tmp_path):
    tr = ann.Trainer(
        _stateful_graph(UnrecordableState), optimizer=optim.SGD(lr=0.1),
        policy=policies.Sync(), dtype="float64",
    )  # fmt: skip
    tr.fit(_data(8), batch_size=8)
    tr.trace = str(tmp_path / "r.trace")
    with pytest.raises(TypeError, match=r"cannot hold the actor state of layer 'b'.*dict"):
        tr.fit(_data(8), batch_size=8)
