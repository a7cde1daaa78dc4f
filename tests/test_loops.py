"""Loops: a cell feeding itself, rows of one key leaving at different steps; gradients equal a
plain loop over the instances one by one (BPTT)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn.dynamic import RNNCell

from _loops_cases import DC, DX, C, H, Halt, T, _data, loop_graph, reference_fit, rnn_graph
from _reference import assert_params_close, assert_params_equal, fresh_params

POLICIES = [
    pytest.param(policies.Sync(), 1, 2, id="Sync"),
    pytest.param(policies.GPipe(2), 2, 2, id="GPipe2"),
    pytest.param(policies.OneFOneB(3), 3, 1, id="1F1B3"),
    pytest.param(policies.PipeDream(1, stash=True), 1, 1, id="PipeDream-stash"),
    pytest.param(policies.PipeDream(1, stash=False), 1, 1, id="PipeDream-nostash"),
    pytest.param(policies.Async(max_active_keys=1), 1, 2, id="Async1"),
]


@pytest.mark.parametrize(("policy", "micro", "batches"), POLICIES)
def test_bptt_equals_a_plain_loop_over_instances(policy, micro, batches):
    g = rnn_graph()
    data = _data(n=8 * batches)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
    hist = tr.fit(data, batch_size=8)
    bs = [{k: v[i * 8 : (i + 1) * 8] for k, v in data.items()} for i in range(batches)]
    assert_params_close(tr.params, reference_fit(g, start, bs, micro), rtol=1e-10)
    st = hist.statistics["rnn"]
    assert st.row_steps == int(data["len"].sum())
    assert st.max_steps_seen == T


def test_all_states_output():
    g = rnn_graph(output="all")
    data = _data(output="all")
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    tr.fit(data, batch_size=8)
    assert_params_close(tr.params, reference_fit(g, start, [data], 2, "all"), rtol=1e-10)


def test_stop_condition_carried_in_the_state():
    g = loop_graph(Halt())
    rng = np.random.default_rng(3)
    data = {"c": rng.standard_normal((10, DC)), "y": rng.integers(0, C, 10)}
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2), dtype="float64")
    hist = tr.fit(data, batch_size=10)
    m = {n: g.nodes[n].module for n in g.layers}
    steps_taken = []

    def loss(p):
        total = 0.0
        steps_taken.clear()
        for half in np.array_split(np.arange(10), 2):
            for i in half:
                hh = m["enc"](p["enc"], data["c"][i : i + 1])
                taken = 0
                while taken < 6:
                    hh = m["loop"].cell(p["loop"], hh)
                    taken += 1
                    if float(ops.raw(hh)[0, 0]) > 0.3:
                        break
                steps_taken.append(taken)
                o = m["head"](p["head"], hh)
                total = total + nn.CrossEntropyLoss()({}, o, data["y"][i : i + 1]) / 10
        return total

    p = dict(start)
    ref, _ = optim.SGD(lr=0.1).update(p, ann.grad(loss)(p), optim.SGD(lr=0.1).init(p))
    assert_params_close(tr.params, ref, rtol=1e-10)
    assert len(set(steps_taken)) > 1  # rows left the loop at different steps
    assert hist.statistics["loop"].row_steps == sum(steps_taken)


def test_async_loop_replays_identically_and_runs_are_bit_identical(tmp_path):
    path = str(tmp_path / "rnn.trace")
    data = _data(n=32)
    tr = ann.Trainer(rnn_graph(), optimizer=optim.SGD(lr=0.05),
                     policy=policies.Async(max_active_keys=3), dtype="float64",
                     trace=path)  # fmt: skip
    tr.fit(data, batch_size=4)
    loops = [e for e in ann.trace.read(path).events if e["ev"] == "loop"]
    assert [sum(e["m"]["steps"]) for e in sorted(loops, key=lambda e: e["key"])] == [
        int(data["len"][i : i + 4].sum()) for i in range(0, 32, 4)
    ]
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence
    assert_params_close(rep.params, tr.params, rtol=0)
    runs = []
    for _ in range(2):
        t2 = ann.Trainer(rnn_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(4),
                         dtype="float32")  # fmt: skip
        t2.fit(data, batch_size=16)
        runs.append(t2.params)
    assert_params_close(runs[0], runs[1], rtol=0)


def test_a_keys_cost_counts_its_row_steps_so_long_unrolls_leave_the_event_loop():
    from asyncnn.dynamic import Loop, planned_row_steps

    lengths = np.array([0, 3, 6, 9], dtype=np.int64)  # 9 is over the 6 steps of xs: capped
    h, xs = np.zeros((4, 2)), np.zeros((4, 6, 3))
    loop = Loop(RNNCell(3, 2), has_xs=True, has_lengths=True)
    assert planned_row_steps(loop, [h, xs, lengths]) == 0 + 3 + 6 + 6
    assert planned_row_steps(Loop(RNNCell(3, 2), has_xs=True), [h, xs]) == 4 * 6
    assert planned_row_steps(Loop(RNNCell(3, 2), max_steps=5), [h]) == 4 * 5


@dataclass(frozen=True)
class Climb(nn.Module):
    """``h <- h + 0.1 tanh(h @ w) + 0.25 e0``: the first component climbs by at least 0.15 a
    step, so every row reaches :class:`Over` soon. Refuses a state that is over already (a
    finished row): only the rows still active may reach the cell."""

    size: int

    def init_params(self, init):
        return {"w": init.normal((self.size, self.size), 0.5)}

    def __call__(self, params, h, *, rng=None):
        if (np.asarray(ops.raw(h))[:, 0] > 1.0).any():
            raise ValueError("Climb: stepped a row that had finished")
        e0 = np.zeros(self.size)
        e0[0] = 0.25
        return ops.add(ops.add(h, ops.multiply(ops.tanh(ops.matmul(h, params["w"])), 0.1)), e0)


@dataclass(frozen=True)
class Over(nn.Module):
    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        return ops.raw(h)[:, :1] > 1.0


def _sent_forward(path, actor, like):
    """What ``actor`` sent on its forward of key 0, as recorded with ``trace_payloads="all"``."""
    (send,) = [e for e in ann.trace.read(path).events
               if e.actor == actor and e.what == "send" and e.kind == "forward" and e.key == 0]  # fmt: skip
    return np.frombuffer(send.payloads[0], dtype=like.dtype).reshape(like.shape)


@pytest.mark.parametrize("output", ["last", "all"])
@pytest.mark.parametrize("stop", ["until", "lengths"])
def test_predict_and_evaluate_step_the_active_rows_only_as_training_does(tmp_path, stop, output):
    # the plain evaluation (graph check, predict, evaluate) stepped every row to max_steps:
    # the cell ran on finished rows (Climb refuses them: the Trainer failed to build), and a
    # loop whose rows had all stopped went on (max_steps=10**6: 7 s to build a Trainer)
    rows = 8
    steps = T if stop == "lengths" else 10**6 if output == "last" else 40
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    h0 = g.layer("enc", nn.Linear(DC, H), c)
    if stop == "until":
        h = g.loop("loop", Climb(H), h0, until=Over(), max_steps=steps, output=output)
    else:
        xs = g.input("xs", (None, T, DX))
        lens = g.input("len", (None,), dtype="int64")
        h = g.loop("loop", RNNCell(DX, H), h0, xs, lens, output=output)
    g.output("states", h)
    if output == "all":
        h = g.layer("flat", nn.Flatten(), h)
    width = H * (steps if output == "all" else 1)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(width, C), h), y)
    rng = np.random.default_rng(4)
    data = {"c": rng.standard_normal((rows, DC)), "y": rng.integers(0, C, rows)}
    if stop == "lengths":
        data["xs"] = rng.standard_normal((rows, T, DX))
        data["len"] = np.array([0, T, 2, 1, 3, T, 0, 4])
    path = str(tmp_path / "loop.trace")
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64",
                     trace=path, trace_payloads="all")  # fmt: skip
    states = tr.predict({k: v for k, v in data.items() if k != "y"}, batch_size=rows)["states"]
    evaluated = tr.evaluate(data, batch_size=rows)["loss"]
    hist = tr.fit(data, batch_size=rows)  # one key, at the weights predict and evaluate used
    np.testing.assert_array_equal(states, _sent_forward(path, "loop", states))
    assert evaluated == hist.losses[0]  # (8 rows: the mean's scaling is exact)
    (loop,) = [e for e in ann.trace.read(path).events if e["ev"] == "loop"]
    taken = loop["m"]["steps"]
    assert len(set(taken)) > 2 and max(taken) <= min(steps, 40)  # rows left at different steps
    m = {n: g.nodes[n].module for n in g.layers}

    def loss(p):  # the plain evaluation is differentiable: its gradient is training's
        extra = [data["xs"], data["len"]] if stop == "lengths" else []
        h = m["loop"](p["loop"], m["enc"](p["enc"], data["c"]), *extra)
        h = m["flat"](p["flat"], h) if output == "all" else h
        return nn.CrossEntropyLoss()({}, m["head"](p["head"], h), data["y"])

    start = fresh_params(g)
    ref, _ = optim.SGD(lr=0.1).update(start, ann.grad(loss)(start), optim.SGD(lr=0.1).init(start))
    assert_params_close(tr.params, ref, rtol=1e-10)


def test_a_traced_loop_event_records_the_version_its_steps_computed_with(tmp_path):
    # (it recorded the latest version, where PipeDream2BW pins the one before the last update)
    path = str(tmp_path / "rnn.trace")
    tr = ann.Trainer(rnn_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream2BW(4),
                     dtype="float64", trace=path)  # fmt: skip
    tr.fit(_data(n=32), batch_size=8)  # 4 minibatches of 4 keys
    events = ann.trace.read(path).events
    starts = {e["key"]: e["v"] for e in events
              if e["ev"] == "start" and e["a"] == "rnn" and e["k"] == "forward"}  # fmt: skip
    loops = {e["key"]: e["v"] for e in events if e["ev"] == "loop"}
    assert loops == starts
    # minibatch m computes with version m - 1 (the first two with the starting version 0)
    assert [loops[k] for k in sorted(loops)] == [0] * 8 + [1] * 4 + [2] * 4


_DRAWN: list[np.random.Generator] = []  # a copy of the rng of each training call of DropCell


@dataclass(frozen=True)
class DropCell(nn.Module):
    """An :class:`RNNCell` whose new state goes through dropout (recurrent dropout); notes a
    copy of the generator each training call is given, as it is before the call draws."""

    cell: RNNCell
    p: float

    def init_params(self, init):
        return self.cell.init_params(init)

    def __call__(self, params, h, x, *, rng=None):
        if rng is not None:
            _DRAWN.append(copy.deepcopy(rng))
        return nn.Dropout(self.p)({}, self.cell(params, h, x), rng=rng)


def _drop_graph(p: float) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, T, DX))
    c = g.input("c", (None, DC))
    lens = g.input("len", (None,), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    h = g.loop("rnn", DropCell(RNNCell(DX, H), p), g.layer("enc", nn.Linear(DC, H), c), x, lens)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(H, C), h), y)
    return g


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(policies.Sync(), id="Sync"),
        pytest.param(policies.PipeDream(1, stash=False), id="PipeDream-nostash"),
        pytest.param(policies.Async(max_active_keys=1), id="Async1"),
    ],
)
def test_a_stochastic_cell_draws_the_keys_masks_and_its_recompute_draws_them_again(policy):
    # the loop gave its cell no rng: dropout in a cell was inert in training, silently
    g = _drop_graph(0.5)
    data = _data(n=8)
    start = fresh_params(g)
    _DRAWN.clear()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", seed=0)
    tr.fit(data, batch_size=8)  # one key
    steps = int(data["len"].max())
    recomputes = not isinstance(policy, policies.Sync)  # (no pullback kept: steps taped again)
    assert len(_DRAWN) == steps * (2 if recomputes else 1)
    if recomputes:  # each step of the recompute starts from the stream its forward step had
        for forward, again in zip(_DRAWN[:steps], _DRAWN[steps:], strict=True):
            assert forward.bit_generator.state == again.bit_generator.state
    stream = copy.deepcopy(_DRAWN[0])  # the key's stream, as the first step got it
    m = {n: g.nodes[n].module for n in g.layers}

    def loss(p):  # the plain loop, its cell drawing from the same stream step after step
        h = m["rnn"](p["rnn"], m["enc"](p["enc"], data["c"]), data["x"], data["len"], rng=stream)
        return nn.CrossEntropyLoss()({}, m["head"](p["head"], h), data["y"])

    ref, _ = optim.SGD(lr=0.1).update(start, ann.grad(loss)(start), optim.SGD(lr=0.1).init(start))
    assert_params_close(tr.params, ref, rtol=1e-10)


def test_dropout_in_a_cell_trains_seeded_repeatably_and_leaves_evaluation_alone():
    data = _data(n=16)

    def fit(p: float, seed: int = 0) -> tuple[list[float], dict]:
        tr = ann.Trainer(_drop_graph(p), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                         dtype="float64", seed=seed)  # fmt: skip
        return list(tr.fit(data, batch_size=8, epochs=2).losses), tr.params

    (dropped, params), (again, params_again) = fit(0.9), fit(0.9)
    inert, _ = fit(1e-12)
    assert dropped != inert  # p changes training
    assert dropped == again
    assert_params_equal(params, params_again)  # bit for bit, run to run
    assert fit(0.9, seed=1)[0] != dropped  # the masks follow the run's seed
    # evaluation draws nothing: the same as without dropout, at the same weights
    evaluated = [
        ann.Trainer(
            _drop_graph(p), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64"
        ).evaluate(data)  # fmt: skip
        for p in (0.9, 1e-12)
    ]
    assert evaluated[0] == evaluated[1]


def test_an_until_that_draws_random_numbers_is_refused():
    @dataclass(frozen=True)
    class Coin(nn.Module):
        def init_params(self, init):
            return {}

        def __call__(self, params, h, *, rng=None):
            return rng.random(h.shape[0]) < 0.5

    with pytest.raises(ann.GraphError, match=r"loop .loop.: Loop: until .*Coin\(\) draws random"):
        loop_graph(Coin())
