"""Replay reproduces a recorded run bit for bit; perturbations are found where they first show;
every actor's work, the loss actor's included, goes by the replay's hook in the recorded order."""

from __future__ import annotations

import copy
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._math._pytree import tree_map
from asyncnn._runtime._recorder import Recorder

from _reference import assert_params_equal
from _replay_cases import _data, _equal, _graph, _plain_graph, _rewrite, _routed


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


def _spy_on_pools(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The arguments of every pool the runtime opens from now on (for a replay's, say)."""
    from asyncnn._runtime import _lifecycle
    from asyncnn.backends import open_device_pool

    opened: list[dict] = []

    def spy(**kwargs):
        opened.append(kwargs)
        return open_device_pool(**kwargs)

    monkeypatch.setattr(_lifecycle, "open_device_pool", spy)
    return opened


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
    assert header["pool"] == {
        "cpu_workers": 3, "part_flops": 5000, "split": True, "inline_flops": 5_000_000
    }  # fmt: skip
    opened = _spy_on_pools(monkeypatch)
    assert ann.replay(path).identical
    assert [(o["cpu_workers"], o["part_flops"], o["split"]) for o in opened] == [(3, 5000, True)]
    # a trace written before pools were recorded: this host's, as before
    _rewrite(path, old, lambda r: {k: v for k, v in r.items() if k != "pool"})
    assert ann.replay(old).identical
    assert opened[1]["cpu_workers"] == _lifecycle.host_cores()
    assert opened[1]["part_flops"] == _lifecycle.RUN_PART_FLOPS


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_replay_opens_the_pool_with_the_runs_inline_flops(tmp_path, monkeypatch, backend):
    # inline_flops decides which work runs on the loop's thread, where products stay whole, and
    # which goes to a worker, where they are cut: the trace did not record it, and a replay of
    # a run whose pool ran everything inline cut its products and reported a divergence
    from asyncnn.backends import DEFAULT_INLINE_FLOPS, open_device_pool

    path, old = tmp_path / "r.trace", tmp_path / "old.trace"
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((128, 256)).astype(np.float32),
             "y": rng.integers(0, 10, 128)}  # fmt: skip
    graph = ann.Graph.sequential(
        [nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)],
        loss=nn.CrossEntropyLoss(), stages=1, input_shape=(None, 256),
    )  # fmt: skip

    async def record():
        async with open_device_pool(
            cpu_workers=2, part_flops=4_000_000, inline_flops=1e12
        ) as pool, ann.open_run(
            graph, optim.SGD(lr=0.1), policies.Sync(), pool=pool, trace=str(path)
        ) as run:  # fmt: skip
            for _ in range(2):
                await run.step(batch)

    anyio.run(record, backend=backend)
    assert ann.trace.read(path).header["pool"]["inline_flops"] == 1e12
    opened = _spy_on_pools(monkeypatch)
    assert ann.replay(path).identical
    assert opened[0]["inline_flops"] == 1e12
    # a trace written before inline_flops was recorded: the default, as before
    _rewrite(path, old, lambda r: {
        **r, "pool": {k: v for k, v in r["pool"].items() if k != "inline_flops"}
    } if "pool" in r else r)  # fmt: skip
    ann.replay(old)
    assert opened[1]["inline_flops"] == DEFAULT_INLINE_FLOPS


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_replay_plans_products_as_the_run_did_on_fewer_threads(tmp_path, monkeypatch, backend):
    # A cluster's processes plan their products for one process's team on the host, on fewer
    # threads (plan_workers): the trace records the plan, the replay's pool plans alike
    from asyncnn._errors import TraceFormatError
    from asyncnn.backends import open_device_pool

    path, old, bad = tmp_path / "r.trace", tmp_path / "old.trace", tmp_path / "bad.trace"
    data = _data(16)

    async def record():
        async with open_device_pool(
            cpu_workers=1, blas_threads=1, part_flops=5000, plan_workers=3
        ) as pool, ann.open_run(
            _plain_graph(), optim.SGD(lr=0.1), policies.GPipe(2), trace=str(path), pool=pool
        ) as run:  # fmt: skip
            assert pool.team.plan_workers == 3 and pool.workers == 1
            await run.step(data)

    anyio.run(record, backend=backend)
    assert ann.trace.read(path).header["pool"] == {
        "cpu_workers": 1, "plan_workers": 3, "part_flops": 5000, "split": True,
        "inline_flops": 5_000_000,
    }  # fmt: skip
    opened = _spy_on_pools(monkeypatch)
    assert ann.replay(path).identical
    assert [(o["cpu_workers"], o["plan_workers"]) for o in opened] == [(1, 3)]
    # a trace without it planned for its cpu_workers, as before
    _rewrite(path, old, lambda r: {
        **r, "pool": {k: v for k, v in r["pool"].items() if k != "plan_workers"}
    } if "pool" in r else r)  # fmt: skip
    ann.replay(old)
    assert opened[1]["plan_workers"] is None
    _rewrite(path, bad, lambda r: {**r, "pool": {**r["pool"], "plan_workers": 0}}
             if "pool" in r else r)  # fmt: skip
    with pytest.raises(TraceFormatError, match=r"pool\['plan_workers'\] is 0, expected an int"):
        ann.replay(bad)


def test_a_whole_replay_shows_the_loss_actors_work_to_its_hook_in_the_recorded_order(tmp_path):
    # the loss actor followed no recorded order: the hook of a whole replay never saw its work,
    # and a hook's stop there was never taken
    path = tmp_path / "r.trace"
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(path)
    ).fit(_data(16), batch_size=8)
    recorded = [
        ("loss", e.seq, e.kind, e.key)
        for e in ann.trace.read(path).events
        if e.what == "start" and e.actor == "loss"
    ]
    seen = []
    rep = ann.replay(path, hook=lambda *op: seen.append(op[:4]) and False)
    assert rep.identical and len(recorded) == 4
    assert [op for op in seen if op[0] == "loss"] == recorded
    # each key's loss comes after the forwards that fed it and before its backwards
    assert seen.index(("loss", 1, "forward", 1)) < seen.index(("stage1", 3, "backward", 1))
    rep = ann.replay(path, hook=lambda a, seq, kind, key, params: a == "loss" and key == 2)
    assert rep.identical and rep.stopped_at == ("loss", 2, "forward", 2)


def test_a_replay_that_diverges_at_the_loss_is_named_there_and_stops_there(tmp_path):
    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(path)
    ).fit(_data(16), batch_size=8)

    def relabel(r):  # key 1's first label, another class: only the loss's gradient changes
        if r.get("ev") == "send" and r.get("a") == "y" and r.get("key") == 1:
            labels = np.frombuffer(r["pl"][0], np.int64).copy()
            labels[0] = (labels[0] + 1) % 3
            r["pl"] = [labels.tobytes()]
        return r

    _rewrite(path, bad, relabel)
    for hook in (None, lambda a, seq, kind, key, params: a == "loss" and key == 1):
        rep = ann.replay(bad, hook=hook)
        d = rep.first_divergence
        assert (d.actor, d.seq, d.kind, d.key, d.peer) == ("loss", 1, "backward", 1, "stage1")
        assert rep.stopped_at == (None if hook is None else ("loss", 1, "forward", 1))


def test_a_hooks_stop_is_final_and_the_params_are_those_at_the_stop(tmp_path):
    # after the hook returned True the other actors' work went on: the hook was called again
    # (stage0's backward of key 0) and each further True took the weights again, so the params
    # held stage0's update, made after the stop at stage1's backward
    path = tmp_path / "r.trace"
    tr = ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)
    )
    initial = copy.deepcopy(tr.params)
    tr.fit(_data(16), batch_size=8)
    stops = []
    for _ in range(2):  # a second replay, stopped the same way with a fresh hook: the same
        calls, at_stop = [], {}

        def first_backward(actor, seq, kind, key, params, calls=calls, at_stop=at_stop):
            calls.append((actor, seq, kind, key))
            if kind == "backward" and not at_stop:
                at_stop[actor] = tree_map(np.array, params)
            return kind == "backward"

        rep = ann.replay(path, hook=first_backward)
        assert rep.stopped_at == ("stage1", 1, "backward", 0)
        assert calls[-1] == rep.stopped_at  # no call after the stop
        assert rep.identical  # as far as it went

        # stage1's weights as its hook saw them (its update of key 0 made); stage0's not
        # updated yet: the initial ones
        def of(params, name):
            return {name: params[name]}

        assert_params_equal(of(rep.params, "stage1"), at_stop)
        assert not _equal(of(rep.params, "stage1"), of(initial, "stage1"))
        assert_params_equal(of(rep.params, "stage0"), of(initial, "stage0"))
        stops.append(rep.params)
    assert_params_equal(stops[0], stops[1])


def test_stop_at_key_stops_the_hook_at_the_first_work_of_the_key(tmp_path):
    # other actors went on after the first work of the key, each call to the hook after it
    # (up to a dozen) taking the weights again
    path = tmp_path / "a.trace"
    ann.Trainer(
        _plain_graph(),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.Async(max_active_keys=3),
        trace=str(path),
    ).fit(_data(32), epochs=2, batch_size=4)
    for _ in range(3):
        calls = []
        rep = ann.replay(
            path, hook=lambda *op, calls=calls: calls.append(op[:4]) and False, stop_at_key=5
        )
        assert rep.stopped_at is not None and rep.stopped_at[3] == 5
        assert calls[-1] == rep.stopped_at and [op[3] for op in calls].count(5) == 1
        assert rep.identical


@dataclass(frozen=True)
class OffsetCrossEntropy(nn.Module):
    """Cross-entropy plus ``_LOSS_OFFSET``: an edit of the loss's code that changes its value,
    never its gradient."""

    def init_params(self, init: Any) -> dict[str, Any]:
        return {}

    def __call__(self, params: Any, logits: Any, labels: Any, *, rng: Any = None) -> Any:
        return ops.cross_entropy(logits, labels) + _LOSS_OFFSET


_LOSS_OFFSET = 0.0


def _offset_loss_run(path, offset: float = 0.0, payloads: str = "inputs") -> None:
    graph = ann.Graph.sequential(
        [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)], loss=OffsetCrossEntropy(), stages=2,
        input_shape=(None, 5),
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys.modules[__name__], "_LOSS_OFFSET", offset)
        ann.Trainer(
            graph, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), trace=str(path),
            trace_payloads=payloads,
        ).fit(_data(16), batch_size=8)  # fmt: skip


def _recorded_losses(path) -> dict[int, float]:
    return {
        e.key: e.meta["loss"]
        for e in ann.trace.read(path).events
        if e.what == "end" and e.actor == "loss"
    }


def test_a_loss_that_changed_value_but_not_gradient_is_a_divergence(tmp_path, monkeypatch):
    # replay compared sends and updates only: a loss whose value changed and whose gradient
    # did not (a constant added since the run) replayed as identical, and its values were
    # nowhere in the result
    path = tmp_path / "r.trace"
    _offset_loss_run(path, payloads="all")
    recorded = _recorded_losses(path)
    assert len(recorded) == 4
    rep = ann.replay(path)
    assert rep.identical
    assert rep.losses == {"loss": recorded}  # bit for bit (NaN included, below)
    assert all(type(v) is float for v in rep.losses["loss"].values())
    monkeypatch.setattr(sys.modules[__name__], "_LOSS_OFFSET", 5.0)
    for actor in (None, "loss"):  # the whole run, and the loss actor alone
        rep = ann.replay(path, actor=actor)
        assert not rep.identical
        d = rep.first_divergence
        assert (d.actor, d.seq, d.kind, d.key, d.peer) == ("loss", 0, "loss", 0, "")
        # (float32 losses: 5 more, as near as a float32 says it)
        assert (d.expected, d.got) == (recorded[0], rep.losses["loss"][0])
        assert d.max_abs_diff == pytest.approx(5.0, abs=1e-5)
        assert f"the run's loss was {d.expected!r}, the replay's {d.got!r}" in str(d)
    # a layer replayed alone computes no loss
    rep = ann.replay(path, actor="stage1")
    assert rep.identical and rep.losses == {}


def test_a_recorded_loss_value_altered_is_a_divergence_and_nan_equals_nan(tmp_path):
    path, bad, nan = tmp_path / "r.trace", tmp_path / "bad.trace", tmp_path / "nan.trace"
    _offset_loss_run(path)
    recorded = _recorded_losses(path)
    _rewrite(path, bad, lambda r: {**r, "m": {"loss": r["m"]["loss"] + 1.0}}
             if r.get("ev") == "end" and r.get("a") == "loss" and r.get("key") == 2 else r)  # fmt: skip
    rep = ann.replay(bad)
    d = rep.first_divergence
    assert not rep.identical and (d.actor, d.seq, d.kind, d.key) == ("loss", 2, "loss", 2)
    assert (d.expected, d.got) == (recorded[2] + 1.0, recorded[2])
    # a replay stopped by a hook compares the losses it got to
    rep = ann.replay(path, stop_at_key=3)
    assert rep.identical and rep.stopped_at[3] == 3
    assert 0 in rep.losses["loss"] and rep.losses["loss"].items() <= recorded.items()
    # a run whose losses were NaN (its gradients finite) replays as identical
    _offset_loss_run(nan, offset=float("nan"))
    assert all(np.isnan(v) for v in _recorded_losses(nan).values())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys.modules[__name__], "_LOSS_OFFSET", float("nan"))
        rep = ann.replay(nan)
    assert rep.identical and all(np.isnan(v) for v in rep.losses["loss"].values())
    # ... and a finite loss where the run's was NaN is a divergence
    rep = ann.replay(nan)
    d = rep.first_divergence
    assert not rep.identical and d.kind == "loss" and np.isnan(d.expected)
    assert d.got == recorded[0] and d.max_abs_diff is None


def _one_key_at_a_time(path, frequency: int) -> None:
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1),
        policy=policies.Async(max_active_keys=1, min_update_frequency=frequency), trace=str(path),
    ).fit(_data(16), batch_size=4)  # fmt: skip


@pytest.mark.parametrize(("run", "replayed"), [(2, 1), (1, 2)])
def test_an_update_the_replay_made_at_another_compute_says_where_each_came(tmp_path, run, replayed):
    # the i-th updates were paired and their digests compared: a replay that updated a
    # compute earlier (or later) than the run was said to make other weights of version 1
    path, other = tmp_path / "r.trace", tmp_path / "other.trace"
    _one_key_at_a_time(path, run)
    _rewrite(path, other, lambda r: {**r, "policy": {**r["policy"], "args": {
        **r["policy"]["args"], "min_update_frequency": replayed}}} if "policy" in r else r)  # fmt: skip
    rep = ann.replay(other)
    d = rep.first_divergence
    # one key at a time: stage1 (the last layer) does its forward and backward of key 0
    # (computes 0, 1), then of key 1 (2, 3): its first backward ends before any other
    # layer's, and the first update is made in it (every gradient) or in key 1's (every other)
    assert (d.actor, d.kind, d.seq, d.key) == ("stage1", "update", 1, 0)
    if run == 2:
        assert d.reason.startswith(
            "the replay's update to version 1 came in the backward of key 0 (seq 1), "
            "before the run's, in the backward of key 1 (seq 3)"
        )
    else:
        assert d.reason.startswith(
            "the run's update to version 1 came in the backward of key 0 (seq 1), the "
            "replay's update later, in the backward of key 1 (seq 3)"
        )
    assert (d.expected, d.got) == (
        (run * 2 - 1, "backward", run - 1), (replayed * 2 - 1, "backward", replayed - 1)
    )  # fmt: skip
    # two runs that updated at other computes: diff says it of two runs
    _one_key_at_a_time(other, replayed)
    d = ann.trace.diff(path, other)
    assert d is not None and "weights of version" not in d.reason
    assert "the second run's update" in d.reason and "the replay" not in d.reason


MainActor = type("MainActor", (ann.LayerActor,), {"__module__": "__main__"})


def test_a_replay_of_a_trace_naming_a_class_from_main_does_not_warn_of_its_own_trace(
    tmp_path, monkeypatch
):
    # every replay warned that its own temporary trace named a class of __main__, pointing at
    # contextlib.py
    monkeypatch.setattr(sys.modules["__main__"], "MainActor", MainActor, raising=False)
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(5, 3), x, actor=MainActor), y)
    path = tmp_path / "r.trace"
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path))
    with pytest.warns(UserWarning, match="defined in __main__") as caught:
        tr.fit(_data(8), batch_size=8)
    assert [w.filename for w in caught] == [__file__]  # the line that ran the fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ann.replay(path).identical


def _gpipe_trace(path) -> None:
    """Two minibatches of two keys under GPipe: each stage forwards keys 0 and 1, then takes
    their backwards (stage1's computes 0-3: F0 F1 B0 B1)."""
    tr = ann.Trainer(_plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                     trace=str(path))  # fmt: skip
    tr.fit(_data(16), epochs=1, batch_size=8)


def _backward_first(r):  # stage1's backward of key 0 before its forward of key 0
    if r.get("ev") == "start" and r.get("a") == "stage1" and r.get("seq") in (0, 2):
        return dict(r, k="backward" if r["seq"] == 0 else "forward")
    return r


def _forward_twice(r):  # stage1's forward of key 1 recorded as a second forward of key 0
    if r.get("ev") == "start" and r.get("a") == "stage1" and r.get("seq") == 1:
        return dict(r, key=0)
    return r


def _loss_swapped(r):  # the loss takes key 1 before key 0: an order a run could have had
    if r.get("ev") == "start" and r.get("a") == "loss" and r.get("seq") in (0, 1):
        return dict(r, key=1 - r["key"])
    return r


@pytest.mark.timeout(20)  # the replay waited out its 30 s stall timeout
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            _backward_first,
            [
                r"event \d+ \(start of 'stage1'\)",
                r"'stage1' compute 0 \(the backward of key 0, "
                r"event \d+\) waits for the backward of key 0 from 'loss'",
                "forward of key 0 from 'stage1'",
                "a cycle",
            ],
        ),
        (
            _forward_twice,
            [
                r"event \d+ \(start of 'stage1'\)",
                r"'stage1' compute 1 \(the forward of key 0, "
                r"event \d+\) is its second forward of key 0, after 'stage1' compute 0",
            ],
        ),
    ],  # fmt: skip
    ids=["backward-before-forward", "forward-twice"],
)
def test_a_trace_reordered_into_an_impossible_order_is_refused_at_once(tmp_path, change, expected):
    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    _gpipe_trace(path)
    _rewrite(path, bad, change)
    with pytest.raises(ann.TraceFormatError) as info:
        ann.replay(bad)
    message = str(info.value)
    for part in expected:
        assert re.search(part if "\\" in part else re.escape(part), message), (part, message)
    assert "altered" in message, message
    # an order that is not the run's but that a run could have had is replayed
    possible = tmp_path / "possible.trace"
    _rewrite(path, possible, _loss_swapped)
    assert ann.replay(possible).events_checked > 0


def _limited(path, policy) -> None:
    tr = ann.Trainer(_plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policy, trace=str(path))
    tr.fit(_data(24), epochs=1, batch_size=12 if isinstance(policy, policies.GPipe) else 4)


@pytest.mark.parametrize(
    ("policy", "field", "altered"),
    [
        (policies.Async(max_active_keys=3), "max_active_keys", 2),
        (policies.GPipe(3), "microbatches", 2),
    ],  # fmt: skip
    ids=["Async", "GPipe"],
)
def test_a_header_whose_in_flight_limit_its_events_exceed_is_refused(
    tmp_path, policy, field, altered
):
    # a trace of 3 keys in flight whose header says 2 replayed as identical
    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    _limited(path, policy)
    assert ann.replay(path).identical

    def lower(r):
        if "policy" in r:
            r["policy"]["args"][field] = altered
        return r

    _rewrite(path, bad, lower)
    for actor in (None, "stage0"):
        with pytest.raises(ann.TraceFormatError) as info:
            ann.replay(bad, actor=actor)
        message = str(info.value)
        assert f"{field}={altered}" in message and "3 keys in flight" in message, message
        assert re.search(r"event \d+ \(admit of key 2\)", message), message


@dataclass(frozen=True)
class Widening64(nn.Module):
    """Parameterless: its input as it is, or (once :attr:`wide` is set: its code changed since
    the run) in float64."""

    wide: ClassVar[bool] = False

    def init_params(self, init: Any) -> Any:
        return {}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.astype(x, "float64") if Widening64.wide else x


def test_a_module_whose_code_now_gives_another_output_dtype_is_refused_naming_it(
    tmp_path, monkeypatch
):
    # the replay ran, and reported a divergence at s0's first send (<f4 in the run, <f8 now)
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Sequential(nn.Linear(5, 8), nn.Tanh(), Widening64()), x)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("s1", nn.Linear(8, 3), h), y)
    path = tmp_path / "r.trace"
    ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path),
                trace_payloads="all").fit(_data(16), batch_size=8)  # fmt: skip
    assert ann.replay(path).identical
    monkeypatch.setattr(Widening64, "wide", True)
    for actor in (None, "s0"):
        with pytest.raises(ann.TraceFormatError) as info:
            ann.replay(path, actor=actor)
        message = str(info.value)
        assert "layer 's0'" in message and "dtype float64" in message, message
        assert "dtype float32" in message and "forward of key 0 to 's1'" in message, message
