"""Where a replay starts from (pending gradients, actors' own states) and the traces it refuses
before anything runs, each with the reason."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._runtime._recorder import decode_tree
from asyncnn._runtime._traceformat import encode_record, iter_frames

from _reference import assert_params_equal, chain_graph, classification_data
from _replay_cases import _data, _graph, _plain_graph, _rewrite, assert_same_tree


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


def test_replay_of_a_second_fit_starts_from_the_pending_gradients_delays(tmp_path):
    # the state record held the carried gradients, not their delays: now that the run's first
    # update counts them (SpikeCompensation corrects with their mean), a replay starting
    # without them would correct that update otherwise
    path = tmp_path / "r.trace"
    tr = ann.Trainer(
        chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.5), dtype="float64",
        policy=policies.SpikeCompensation(policies.Async(2, min_update_frequency=3)),
        trace=str(path),
    )  # fmt: skip
    tr.fit(classification_data(32), batch_size=8)  # 4 keys: one gradient pending, of delay 1
    assert tr.state.pending_delays == dict.fromkeys(tr.graph.layers, [1])
    tr.fit(classification_data(32), batch_size=8)
    second = ann.trace.read(tr.traces[1])
    assert second.state is not None
    assert decode_tree(second.state["pending_delays"]) == {n: [1] for n in tr.graph.layers}
    first_update = next(e for e in second.events if e.what == "update" and e.actor == "stage0")
    assert first_update.meta["delays"] == [1, 0, 0]  # the carried gradient's first
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


# refused at once: before the check, the replay waited out its stall timeout
@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [None, "user code broke"])
def test_replay_of_a_run_stopped_with_work_unprocessed_is_refused_at_once(tmp_path, error):
    """A run cancelled (no error recorded), or failed outside the actors, leaves messages that
    no actor processed: a whole replay would wait for that work forever."""
    cut = _stopped_run(tmp_path, error)
    with pytest.raises(
        ann.TraceFormatError, match="stopped before 'stage0' processed the backward of key 0"
    ) as info:
        ann.replay(cut)
    assert ("user code broke" if error else "cancelled or interrupted") in str(info.value)
    # what it did can still be replayed one actor at a time, or up to a key
    assert ann.replay(cut, stop_at_key=0).identical


# refused at once: the replay waited out its 30 s stall timeout, then blamed "key -1"
@pytest.mark.timeout(60)
def test_replay_of_a_stopped_run_to_a_key_it_never_reached_is_refused_at_once(tmp_path):
    import time

    cut = _stopped_run(tmp_path, None)
    start = time.perf_counter()
    with pytest.raises(
        ann.TraceFormatError,
        match=r"stop_at_key=5, but no actor of this run processed any work of key 5.*"
        r"processed work of keys 0 to 0.*stopped before 'stage0' processed the backward of key 0",
    ):
        ann.replay(cut, stop_at_key=5)
    assert time.perf_counter() - start < 10  # before anything runs, never a stall


def _stopped_run(tmp_path, error):
    """A Sync run of one key whose trace stops once stage1 had sent key 0's backward on, before
    stage0 received it (with the ``error`` event of a failure outside the actors, if given)."""
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
    assert events[-1]["ev"] == "close"  # (its trace closed: the run was stopped, not killed)
    kept.append(events[-1])
    with open(cut, "wb") as f:
        for r in (head, state, *kept):
            f.write(encode_record(r))
    return cut


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


def _optimizer_momentum(r: dict) -> dict:
    return {**r, "optimizer": {**r["optimizer"], "momentum": 0.9}} if "format" in r else r


def _no_opt_state(r: dict) -> dict:
    if "state" not in r:
        return r
    opt_states = r["state"]["opt_states"]
    return {**r, "state": {**r["state"], "opt_states": {"dict": {
        **opt_states["dict"], "stage0": {"dict": {}}}}}}  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "said"),
    [(_no_opt_state, r"layer 'stage0' is \[\], the header's optimizer .*SGD.* keeps \['step'\]"),
     (_optimizer_momentum,
      r"layer 'stage0' is \['step'\], the header's optimizer .*SGD.* keeps "
      r"\['momentum_buffer', 'step'\]")],
    ids=["opt-state-emptied", "header-optimizer-changed"],
)  # fmt: skip
def test_optimizer_states_the_headers_optimizer_cannot_continue_are_refused_before_the_run(
    tmp_path, edit, said
):
    # the replay failed mid-run, in the backward of key 1 (an ActorError of SGD.update)
    from asyncnn._tracing._replayable import check_replayable

    path, bad = tmp_path / "r.trace", tmp_path / "bad.trace"
    ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)).fit(
        _data(8), batch_size=4
    )
    _rewrite(path, bad, edit)
    match = rf"bad\.trace: the initial state record's 'opt_states' does not fit .*{said}"
    with pytest.raises(ann.TraceFormatError, match=match):
        check_replayable(ann.trace.read(bad))
    with pytest.raises(ann.TraceFormatError, match=match):
        ann.replay(bad)


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


class KeepsOrder(HalvingGradient):
    """HalvingGradient whose state's dicts hold their keys in an order that is not sorted;
    what ``load_actor_state`` was given is kept in ``loaded``."""

    loaded: list[Any] = []

    def actor_state(self) -> Any:
        return {"factor": np.asarray(self.factor), "by_name": {"zeta": [1.0], "alpha": (2,)}}

    def load_actor_state(self, state: Any) -> None:
        KeepsOrder.loaded.append(state)
        super().load_actor_state(state)


def test_replay_gives_an_actor_its_state_with_its_keys_in_their_order(tmp_path):
    # the replay moved the state to the layer's device with tree_map, which sorts a dict's
    # keys: its actor was given {'by_name': {'alpha': ..., 'zeta': ...}, 'factor': ...}
    KeepsOrder.loaded.clear()
    tr = ann.Trainer(
        _stateful_graph(KeepsOrder), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
        dtype="float64", trace=str(tmp_path / "r.trace"),
    )  # fmt: skip
    tr.fit(_data(16), batch_size=8)
    tr.fit(_data(16), batch_size=8)
    (live,) = KeepsOrder.loaded  # the second fit's actor, from the first one's state
    assert ann.replay(tr.traces[1]).identical
    assert_same_tree(KeepsOrder.loaded[-1], live, "the replay's actor state")


class CountsByParity(ann.LayerActor):
    """Scales its input gradient by a numpy scalar factor over one plus the backwards it has
    done of minibatches of the same parity, counted under int keys (its own state). What
    ``load_actor_state`` was given is kept in ``loaded``."""

    loaded: list[Any] = []

    def setup(self) -> None:
        self.factor = np.float32(1.0)
        self.counts: dict[Any, Any] = {"total": np.int64(0)}

    def actor_state(self) -> Any:
        return {"factor": self.factor, "counts": dict(self.counts)}

    def load_actor_state(self, state: Any) -> None:
        CountsByParity.loaded.append(state)
        self.factor, self.counts = state["factor"], dict(state["counts"])

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        grads = await super().on_backward(key, grad, meta)
        parity = int(meta["minibatch"]) % 2
        self.counts[parity] = self.counts.get(parity, 0) + 1
        self.counts["total"] += np.int64(1)
        self.factor = self.factor * np.float32(0.75)
        scale = float(self.factor) / (1 + self.counts[parity])
        return [None if g is None else g * scale for g in grads or []]


def test_replay_gives_an_actor_its_state_with_its_numpy_scalars_and_int_keys(tmp_path):
    # the trace kept the counts' int keys as str and the numpy scalars as 0-d arrays: the
    # replay's actor started from {'counts': {'total': array(4), '0': 2, '1': 2}, ...}, found
    # no count under the int parity, and diverged at 'b'
    CountsByParity.loaded.clear()
    path = tmp_path / "r.trace"
    tr = ann.Trainer(
        _stateful_graph(CountsByParity), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
        dtype="float64", trace=str(path),
    )  # fmt: skip
    tr.fit(_data(32), batch_size=8)  # 4 minibatches: both parities counted
    tr.fit(_data(16), batch_size=8)
    (live,) = CountsByParity.loaded  # the second fit's actor, from the first one's state
    assert set(live["counts"]) == {"total", 0, 1}  # mixed int and str keys
    rep = ann.replay(tr.traces[1])
    assert rep.first_divergence is None and rep.identical
    assert_params_equal(rep.params, tr.params)
    replayed = CountsByParity.loaded[-1]
    assert_same_tree(replayed, live, "the replay's actor state")


class ScalarFactor(HalvingGradient):
    """HalvingGradient whose state's factor is a numpy scalar."""

    def actor_state(self) -> Any:
        return {"factor": np.float64(self.factor)}


def _as_written_before(spec: Any) -> Any:
    """An encoded tree as traces were written before numpy scalars and dict keys were kept as
    they are: every key its str, no ``"sc"`` mark (a numpy scalar read as a 0-d array)."""
    if isinstance(spec, dict):
        return {str(k): _as_written_before(v) for k, v in spec.items() if k != "sc"}
    if isinstance(spec, list):
        return [_as_written_before(v) for v in spec]
    return spec


def test_a_trace_written_before_numpy_scalars_were_kept_still_replays(tmp_path):
    path, earlier = tmp_path / "r.trace", tmp_path / "earlier.trace"
    tr = ann.Trainer(
        _stateful_graph(ScalarFactor), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
        dtype="float64", trace=str(path),
    )  # fmt: skip
    tr.fit(_data(16), batch_size=8)
    tr.fit(_data(16), batch_size=8)
    factor = ann.trace.read(tr.traces[1]).state["actor_states"]["dict"]["b"]["dict"]["factor"]
    assert factor["s"] == [] and factor["sc"] is True
    _rewrite(
        tr.traces[1], earlier,
        lambda r: {"state": _as_written_before(r["state"])} if "state" in r else r,
    )  # fmt: skip
    assert ann.trace.read(earlier).header["version"] == ann.trace.read(path).header["version"]
    rep = ann.replay(earlier)  # its factor a 0-d array, which float() takes as the run did
    assert rep.identical
    assert_params_equal(rep.params, tr.params)


def test_replay_continues_optimizer_states_whose_step_is_a_numpy_integer(tmp_path):
    # Adam takes any integer step; the trace wrote np.int64(2) as a 0-d array, which the
    # replay's Adam.update refused ("state['step'] must be an int >= 0, got array(2)")
    tr = ann.Trainer(
        _plain_graph(), optimizer=optim.Adam(lr=0.01), policy=policies.Sync(),
        trace=str(tmp_path / "r.trace"),
    )  # fmt: skip
    tr.fit(_data(16), batch_size=8)
    for state in tr.state.opt_states.values():  # (as a state kept by other code may hold it)
        state["step"] = np.int64(state["step"])
    tr.fit(_data(16), batch_size=8)
    rep = ann.replay(tr.traces[1])
    assert rep.identical
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


def test_a_trace_whose_graph_is_not_the_one_that_ran_is_refused_saying_what_differs(tmp_path):
    # a module whose parameters no longer fit (its class changed since the run) failed at its
    # first forward, as the actor's error; a renamed layer as "the initial state record is
    # malformed: 's1'"; a renamed loss replayed, and read as a divergence at 'stage1'
    path = tmp_path / "r.trace"
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)
    ).fit(_data(8), batch_size=8)

    def node(graph, name):
        return next(n for n in graph["nodes"] if n["name"] == name)

    def wider(graph):  # stage0 Linear(5, 6) and stage1 Linear(6, 3): the run's were 8 wide
        node(graph, "stage0")["module"]["args"]["modules"][0]["args"]["out_features"] = 6
        node(graph, "stage1")["module"]["args"]["modules"][1]["args"]["in_features"] = 6

    def renamed(graph):
        node(graph, "stage1")["name"] = "s1"
        node(graph, "loss")["inputs"][0] = graph["outputs"]["logits"] = "s1"

    def loss_renamed(graph):
        node(graph, "loss")["name"] = "L"

    def in_header(change):
        def edit(record):
            if "graph" in record:
                change(record["graph"])
            return record

        return edit

    for change, message in [
        (wider, r"parameters of layer 'stage0' do not fit its module in the trace's graph, "
                r"Sequential\(Linear\(in_features=5, out_features=6.*: params\['stage0'\]\[0\]"
                r"\['bias'\] has shape \(8,\), the module's \(6,\)\. .*its class has changed"),
        (renamed, r"holds no parameters or optimizer state for the layers \['s1'\] of the "
                  r"trace's graph \(it holds those of \['stage0', 'stage1'\]\)"),
        (loss_renamed, r"\(start of 'loss'\) is the work of an actor the trace's graph lacks "
                       r"\(its layers: \['stage0', 'stage1'\], losses: \['L'\]\)"),
    ]:  # fmt: skip
        other = tmp_path / f"{change.__name__}.trace"
        _rewrite(path, other, in_header(change))
        with pytest.raises(ann.TraceFormatError, match=message):
            ann.replay(other)


def test_a_replay_copies_each_array_of_the_initial_state_out_of_the_trace_once(
    tmp_path, monkeypatch
):
    # check_replayable decoded params, opt_states and pending, then the replay's start decoded
    # them all again: every parameter and optimizer buffer copied twice on the host
    from asyncnn._runtime import _recorder
    from asyncnn._tracing import _replay

    tr = ann.Trainer(
        _plain_graph(), optimizer=optim.Adam(lr=0.01),
        policy=policies.Async(3, min_update_frequency=2), trace=str(tmp_path / "r.trace"),
    )  # fmt: skip
    tr.fit(_data(12), batch_size=4)  # 3 keys: one gradient left pending per layer
    tr.fit(_data(12), batch_size=4)
    state = ann.trace.read(tr.traces[1]).state

    def arrays(spec: Any) -> int:
        if isinstance(spec, dict):
            return int("b" in spec) + sum(arrays(v) for v in spec.values())
        return sum(arrays(v) for v in spec) if isinstance(spec, list | tuple) else 0

    assert all(arrays(state[f]) for f in ("params", "opt_states", "pending"))
    decoded: list[Any] = []
    real = _recorder.decode_tree

    def counting(spec: Any) -> Any:
        if "b" in spec:
            decoded.append(spec)
        return real(spec)

    monkeypatch.setattr(_recorder, "decode_tree", counting)
    monkeypatch.setattr(_replay, "decode_tree", counting, raising=False)
    rep = ann.replay(tr.traces[1])
    assert rep.identical
    assert_params_equal(rep.params, tr.params)
    assert len({id(s) for s in decoded}) == len(decoded) == arrays(state)


@dataclass(frozen=True)
class Widening(nn.Module):
    """Parameterless: its input as it is, or (once :attr:`wide` is set: its code changed since
    the run) the input twice side by side."""

    wide: ClassVar[bool] = False

    def init_params(self, init: Any) -> Any:
        return {}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.concatenate([x, x], axis=1) if Widening.wide else x


@dataclass(frozen=True)
class MeanSquare(nn.Module):
    """A loss of any width: the mean of its input's squares."""

    def init_params(self, init: Any) -> Any:
        return {}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.mean(x * x)


def _widening_run(path, widening_last: bool) -> None:
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    if widening_last:  # (what follows takes any width: the graph's check passes)
        h = g.layer("s0", nn.Linear(5, 4), x)
        g.loss("loss", MeanSquare(), g.layer("s1", Widening(), h))
    else:  # (s1's Linear takes 8 features: the graph's check fails there)
        h = g.layer("s0", nn.Sequential(nn.Linear(5, 8), nn.Tanh(), Widening()), x)
        y = g.input("y", shape=(None,), dtype="int64")
        g.loss("loss", nn.CrossEntropyLoss(), g.layer("s1", nn.Linear(8, 3), h), y)
    data = _data(12) if not widening_last else {"x": _data(12)["x"]}
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.Async(2), trace=str(path),
        trace_payloads="all",
    )  # fmt: skip
    tr.fit(data, batch_size=8)  # (a last short batch of 4 rows)


@pytest.mark.parametrize("widening_last", [False, True], ids=["check-fails-after", "check-passes"])
def test_a_module_whose_code_now_gives_another_output_shape_is_refused_naming_it(
    tmp_path, monkeypatch, widening_last
):
    # the replay ran, and failed at the next layer (ActorError: "actor 's1' failed on forward
    # of key 0: ... Linear(8 -> 3) got input of shape (8, 16)"), or where the graph's check
    # passes, replayed the changed sends as divergences
    path = tmp_path / "r.trace"
    _widening_run(path, widening_last)
    assert ann.replay(path).identical
    monkeypatch.setattr(Widening, "wide", True)
    changed = "s1" if widening_last else "s0"
    width = 4 if widening_last else 8
    for actor in (None, changed):
        with pytest.raises(ann.TraceFormatError) as info:
            ann.replay(path, actor=actor)
        message = str(info.value)
        assert f"layer {changed!r}" in message, message
        assert f"(2, {2 * width})" in message and f"(8, {width})" in message, message
        if not widening_last:  # the check's own error is named too
            assert "layer 's1'" in message and "fails on its inputs" in message, message


def test_a_header_graph_a_trainer_would_refuse_is_refused_before_the_replay(tmp_path):
    # a loss changed in the header (or in its class's code) to one that cannot take the
    # graph's outputs failed mid-run, as the loss actor's error
    path, other = tmp_path / "r.trace", tmp_path / "mse.trace"
    ann.Trainer(
        _plain_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(path)
    ).fit(_data(8), batch_size=8)

    def mse(record):
        if "graph" in record:
            loss = next(n for n in record["graph"]["nodes"] if n["name"] == "loss")
            loss["module"] = {"type": "MSELoss", "args": {"reduction": "mean"}}
        return record

    _rewrite(path, other, mse)
    with pytest.raises(ann.TraceFormatError, match=r"loss 'loss' \(MSELoss.*fails on its inputs"):
        ann.replay(other)


def test_graphs_whose_sends_vary_in_rows_replay_whole_and_alone(tmp_path):
    # the graph's check runs on 2 rows; a run's sends have a key's rows (a last short batch),
    # the rows a router sent each expert (some none), a loop's every step (output="all")
    from asyncnn.dynamic import RNNCell

    from _replay_cases import _routed

    rng = np.random.default_rng(0)
    n = 20
    g = ann.Graph()
    xs, lengths = g.input("xs", shape=(None, 5, 3)), g.input("len", shape=(None,), dtype="int64")
    h = g.loop("rnn", RNNCell(3, 6), g.input("h0", shape=(None, 6)), xs, lengths, output="all")
    g.loss("loss", MeanSquare(), g.layer("head", nn.Linear(6, 2), h))
    looped = {
        "xs": rng.standard_normal((n, 5, 3)), "len": rng.integers(0, 6, n), "h0": np.zeros((n, 6)),
    }  # fmt: skip
    for graph, data, actors in [
        (_routed(), _data(n), ("gate", "e0", "merge", "head")),
        (g, looped, ("rnn", "head")),
    ]:
        path = tmp_path / f"{actors[0]}.trace"
        tr = ann.Trainer(
            graph, optimizer=optim.SGD(lr=0.1), policy=policies.Async(2), trace=str(path),
            trace_payloads="all",
        )  # fmt: skip
        tr.fit(data, batch_size=8)
        rep = ann.replay(path)
        assert rep.identical
        assert_params_equal(rep.params, tr.params)
        for actor in actors:
            assert ann.replay(path, actor=actor).identical, actor


class StateBreaks(HalvingGradient):
    """HalvingGradient whose ``actor_state`` raises once it has done ``after`` backwards (0:
    always), while ``StateBreaks.breaks`` holds (a test clears it to replay without the
    failure)."""

    breaks: ClassVar[bool] = True

    def setup(self, after: int = 0) -> None:  # type: ignore[override]
        super().setup()
        self.breaks_after, self.backwards_done = after, 0

    def actor_state(self) -> Any:
        if StateBreaks.breaks and self.backwards_done >= self.breaks_after:
            raise KeyError("state broke")
        return {"factor": np.asarray(self.factor), "done": np.asarray(self.backwards_done)}

    def load_actor_state(self, state: Any) -> None:
        super().load_actor_state(state)
        self.backwards_done = int(state["done"])

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        self.backwards_done += 1
        return await super().on_backward(key, grad, meta)


_STATE_BROKE = "actor 'b' failed in StateBreaks.actor_state: KeyError: 'state broke'"

# read at the fit's end (Async), at a step point (Sync), in the fit's own on_loss with keys
# still in flight (PipeDream2BW, once b has done a backward)
_STATE_READS = pytest.mark.parametrize(
    ("policy", "after"),
    [(policies.Async(max_active_keys=3), 0), (policies.Sync(), 0), (policies.PipeDream2BW(2), 1)],
    ids=["async-at-the-end", "sync-at-a-step", "2bw-in-on-loss"],
)


def _state_breaks_run(tmp_path: Any, policy: Any, after: int) -> str:
    """The trace (payloads 'all') of a fit that failed in b's ``actor_state``."""
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(5, 8), x)
    h = g.layer("b", nn.Linear(8, 3), h, actor=StateBreaks, actor_args={"after": after})
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    path = str(tmp_path / "broke.trace")
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", trace=path,
        trace_payloads="all",
    )  # fmt: skip
    with pytest.raises(ann.ActorError, match=re.escape(_STATE_BROKE)):
        tr.fit(_data(32), batch_size=8)
    return path


@pytest.mark.timeout(20)  # (the 2BW replay waited out its 30 s stall timeout)
@_STATE_READS
def test_a_replay_of_a_run_whose_actor_state_raised_fails_there_again(tmp_path, policy, after):
    # the replay never called actor_state: it called the run identical (or, where the fit had
    # keys in flight when the read failed, stalled waiting for them)
    path = _state_breaks_run(tmp_path, policy, after)
    for alone in (None, "b"):
        with pytest.raises(ann.ActorError, match=re.escape(_STATE_BROKE)) as info:
            ann.replay(path, actor=alone)
        assert (info.value.actor, info.value.kind, info.value.key) == ("b", "actor_state", None)
        assert isinstance(info.value.__cause__, KeyError)
    # another actor replayed alone does not reach it, and says that the run failed
    other = ann.replay(path, actor="a")
    assert other.identical and other.recorded_error is not None
    assert _STATE_BROKE in other.recorded_error


@pytest.mark.timeout(20)
@_STATE_READS
def test_a_replay_whose_actor_state_does_not_raise_where_the_runs_did_is_no_identical_run(
    tmp_path, monkeypatch, policy, after
):
    path = _state_breaks_run(tmp_path, policy, after)
    monkeypatch.setattr(StateBreaks, "breaks", False)  # the replay's actor_state returns
    for alone in (None, "b"):
        rep = ann.replay(path, actor=alone)
        assert not rep.identical
        d = rep.first_divergence
        assert d is not None and (d.actor, d.kind) == ("b", "actor_state")
        assert _STATE_BROKE in str(d) and "returned" in str(d)
        assert _STATE_BROKE in (rep.recorded_error or "")


def test_a_replay_stopped_before_a_recorded_failure_says_that_the_run_failed(tmp_path):
    path = _state_breaks_run(tmp_path, policies.Async(max_active_keys=3), 0)
    rep = ann.replay(path, stop_at_key=0)
    assert rep.identical and rep.stopped_at is not None
    assert _STATE_BROKE in (rep.recorded_error or "")
    # a run that ended well recorded no error
    clean = tmp_path / "clean.trace"
    ann.Trainer(
        _stateful_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(clean)
    ).fit(_data(16), batch_size=8)
    assert ann.replay(clean).recorded_error is None


def test_the_command_line_says_that_the_recorded_run_failed_after_an_identical_replay(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncnn._cli import main

    path = _state_breaks_run(tmp_path, policies.Async(max_active_keys=3), 0)
    assert main(["replay", path, "--actor", "a"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "the recorded run then failed: " in out
    assert _STATE_BROKE in out


class SetupBreaks(ann.LayerActor):
    def setup(self) -> None:
        raise ValueError("no such table")


def test_a_replay_of_a_run_whose_setup_raised_fails_there_again(tmp_path):
    path = str(tmp_path / "setup.trace")
    tr = ann.Trainer(
        _stateful_graph(SetupBreaks), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
        trace=path,
    )  # fmt: skip
    with pytest.raises(ann.ActorError, match="SetupBreaks.setup: ValueError") as run_err:
        tr.fit(_data(16), batch_size=8)
    with pytest.raises(ann.ActorError, match="SetupBreaks.setup: ValueError") as replay_err:
        ann.replay(path)
    run, rep = run_err.value, replay_err.value
    assert (
        (rep.actor, rep.kind, str(rep))
        == (run.actor, run.kind, str(run))
        == ("b", "setup", str(run))
    )
