"""What a router refuses or names: wiring mistakes, a capacity factor that is not finite, outputs
that read a branch, gates that give bools, NaN or Inf; and integer gate scores, which route and
weigh as their float values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _reference import assert_params_equal
from _routing_cases import C, D, H, NanFromRow2, _data, moe_graph


def test_capacity_factor_must_be_a_finite_number_when_the_graph_is_built():
    for factor in (float("inf"), float("nan"), "1", 0, True):
        with pytest.raises(ann.GraphError, match=r"router 'gate': capacity_factor=.* finite"):
            moe_graph(experts=3, k=1, capacity_factor=factor)
    # a router module made by hand (or read from a spec) is checked before any compute
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    router = ann.dynamic.Router(nn.Linear(D, 2), 2, capacity_factor=float("inf"))
    r = g.layer("gate", router, x)
    outs = [g.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("m", r, *outs), y)
    with pytest.raises(ann.GraphError, match=r"router 'gate': capacity_factor=inf"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_bad_wiring_is_a_clear_graph_error():
    g = moe_graph(experts=3)
    with pytest.raises(ann.GraphError, match=r"gate.*scores of shape \(2, 5\).*needs \(2, 4\)"):
        g2 = ann.Graph()
        x = g2.input("x", (None, D))
        y = g2.input("y", (None,), dtype="int64")
        r = g2.router("gate", nn.Linear(D, 5), x, experts=4)
        outs = [g2.layer(f"e{i}", nn.Linear(D, C), r) for i in range(4)]
        g2.loss("loss", nn.CrossEntropyLoss(), g2.merge("m", r, *outs), y)
        ann.Trainer(g2, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    g3 = ann.Graph()
    x = g3.input("x", (None, D))
    r = g3.router("gate", nn.Linear(D, 3), x, experts=3)
    outs = [g3.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    with pytest.raises(ann.GraphError, match=r"router 'gate' has 3 experts but 2 branches"):
        g3.merge("m", r, *outs)
    with pytest.raises(
        ann.GraphError, match=r"router 'bad': Router: k=4 must be an int in \[1, experts=3\]"
    ):
        g3.router("bad", nn.Linear(D, 3), x, experts=3, k=4)
    with pytest.raises(ann.GraphError, match="is not a router"):
        g3.merge("m2", x, *outs)
    # an expert whose output also feeds something else
    g4 = ann.Graph()
    x = g4.input("x", (None, D))
    y = g4.input("y", (None,), dtype="int64")
    r = g4.router("gate", nn.Linear(D, 2), x, experts=2)
    outs = [g4.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    m = g4.merge("m", r, *outs)
    g4.loss("loss", nn.CrossEntropyLoss(), m, y)
    g4.loss("side", nn.CrossEntropyLoss(), outs[0], y)
    with pytest.raises(ann.GraphError, match=r"layer 'e0' feeds \['m', 'side'\]"):
        g4.check_structure()
    assert g.to_spec() == ann.Graph.from_spec(g.to_spec()).to_spec()
    assert ann.Graph.from_spec(g.to_spec()).nodes["gate"].actor is ann.dynamic.RouterActor


@dataclass(frozen=True)
class BoolSignGate(nn.Module):
    """A condition as bools (x0 <= 0, x0 > 0): no scores to rank."""

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        pos = ops.raw(x)[:, :1] > 0
        return np.concatenate([~pos, pos], axis=1)


def test_a_gate_that_gives_bools_is_refused_when_the_graph_is_built():
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("side", BoolSignGate(), x, experts=2, k=1, gates="none")
    outs = [g.layer(f"b{i}", nn.Linear(D, C), r) for i in range(2)]
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("m", r, *outs), y)
    with pytest.raises(ann.GraphError, match=r"'side'.*scores of dtype bool.*astype"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def _two_expert_graph(gate: Any, **kw: Any) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", gate, x, experts=2, k=1, **kw)
    outs = [g.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    o = g.merge("merge", r, *outs)
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    g.output("logits", o)
    return g


@pytest.mark.parametrize("gates", ["softmax", "normalized", "none"])
def test_a_nan_gate_score_is_an_error_naming_the_router_not_a_silent_route(gates):
    # a NaN has no rank: argsort put it last, so with "normalized" weights the row went to the
    # other expert with a finite output, and the NaN went unnoticed
    tr = ann.Trainer(_two_expert_graph(NanFromRow2(), gates=gates), optimizer=optim.SGD(lr=0.1),
                     policy=policies.Sync(), dtype="float64")  # fmt: skip
    data = _data(n=4)
    msg = r"router 'gate': the gate NanFromRow2\(\) gave a NaN score \(row 2, expert 1\)"
    with pytest.raises(ann.ActorError, match=msg) as info:
        tr.fit(data, batch_size=4)
    assert info.value.actor == "gate"
    with pytest.raises(ValueError, match=msg):
        tr.predict({"x": data["x"]})


@dataclass(frozen=True)
class InfGate(nn.Module):
    """Scores from the first two features, +inf in the third row's second: a softmax of it is
    NaN (the router's own output)."""

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        s = np.array(ops.raw(x)[:, :2])
        s[2:, 1] = np.inf
        return s


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_check_finite_names_the_router_whose_gate_weights_are_not_finite():
    # the router's forward went unchecked: the merge or the loss was named instead
    tr = ann.Trainer(_two_expert_graph(InfGate()), optimizer=optim.SGD(lr=0.1),
                     policy=policies.GPipe(2), dtype="float64", check_finite=True)  # fmt: skip
    with pytest.raises(ann.ActorError, match=r"'gate' produced NaN or Inf in its forward") as info:
        tr.fit(_data(n=8), batch_size=8)
    assert (info.value.actor, info.value.kind, info.value.key) == ("gate", "forward", 0)


@pytest.mark.parametrize("reads", ["e1", "e1b", "gate"])
def test_an_output_reading_a_router_or_an_expert_branch_is_refused_naming_the_merge(reads):
    # predict failed with numpy's "setting an array element with a sequence": such a node
    # gets only the rows routed to it, a different set per key
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", nn.Linear(D, 2), x, experts=2, k=1)
    e0 = g.layer("e0", nn.Linear(D, C), r)
    e1 = g.layer("e1b", nn.Linear(D, C), g.layer("e1", nn.Linear(D, D), r))
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("merge", r, e0, e1), y)
    g.output("out", reads)
    said = "router 'gate', whose value" if reads == "gate" else f"layer '{reads}' of an expert"
    with pytest.raises(
        ann.GraphError, match=rf"output 'out' reads {said}.*g\.output\('out', 'merge'\)"
    ):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@dataclass(frozen=True)
class CountGate(nn.Module):
    """Integer scores: each expert's count of features above its threshold (a condition's
    counts, no parameters), of ``dtype`` (``"float"``: the same numbers as floats)."""

    dtype: str

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        raw = np.asarray(ops.raw(x))
        counts = np.stack([(raw > t).sum(axis=1) for t in (-0.5, 0.0, 0.5)], axis=1)
        return counts.astype(raw.dtype if self.dtype == "float" else self.dtype)


def _count_graph(kind: str, gates: str) -> ann.Graph:
    """A routed graph whose gate scores rows by counts of ``kind`` (an integer dtype, or
    "float": the same numbers as floats)."""
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", CountGate(kind), x, experts=3, k=2, gates=gates)
    outs = [g.layer(f"e{i}", nn.Sequential(nn.Linear(D, H), nn.Tanh()), r) for i in range(3)]
    o = g.layer("head", nn.Linear(H, C), g.merge("merge", r, *outs))
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    g.output("logits", o)
    return g


@pytest.mark.parametrize("dtype", ["int64", "uint8"])
@pytest.mark.parametrize("gates", ["softmax", "normalized", "none"])
def test_integer_gate_scores_route_and_weigh_as_their_float_values(gates, dtype):
    # the gate's scores are "numbers": integers failed at the first key with "softmax: x must
    # be floating point" (unless gates="none"), though the graph's check had let them pass;
    # unsigned ones were ranked negated, wrapped round: a count of 0 ranked first
    data = _data(n=12)
    runs = []
    for kind in (dtype, "float"):
        tr = ann.Trainer(_count_graph(kind, gates), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                         dtype="float64")  # fmt: skip
        hist = tr.fit(data, batch_size=6)
        runs.append((tr.params, hist.losses, tr.predict({"x": data["x"]})["logits"]))
    (p_int, l_int, o_int), (p_float, l_float, o_float) = runs
    assert_params_equal(p_int, p_float)
    assert l_int == l_float
    np.testing.assert_array_equal(o_int, o_float)
    tr = ann.Trainer(
        _count_graph(dtype, gates), optimizer=optim.SGD(lr=0.1), policy=policies.Sync()
    )
    tr.fit(data, batch_size=6)  # float32: the parameters stay float32
    assert {str(a.dtype) for a in ann._math._pytree.tree_leaves(tr.params)} == {"float32"}


@pytest.mark.parametrize("gates", ["softmax", "normalized", "none"])
def test_integer_gate_scores_in_a_float32_run_keep_every_message_float32(tmp_path, gates):
    # integer scores were weighed as float64: the merge sent its experts float64 gradients,
    # whose backward then ran in float64 (the parameters stayed float32 only through the cast
    # of the optimizer's update), and the results differed from the float scores' run
    data = _data(n=12)
    runs = []
    for kind in ("int64", "float"):
        path = str(tmp_path / f"{kind}.trace")
        tr = ann.Trainer(_count_graph(kind, gates), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                         trace=path)  # fmt: skip
        hist = tr.fit(data, batch_size=6)
        sent = {(e.actor, e.kind, t["d"]) for e in ann.trace.read(path).events
                if e.what == "send" for t in e.tensors if t is not None}  # fmt: skip
        assert {s for s in sent if np.dtype(s[2]).kind == "f" and s[2] != "<f4"} == set()
        runs.append((tr.params, hist.losses, tr.predict({"x": data["x"]})["logits"]))
    (p_int, l_int, o_int), (p_float, l_float, o_float) = runs
    assert_params_equal(p_int, p_float)
    assert l_int == l_float
    np.testing.assert_array_equal(o_int, o_float)


@pytest.mark.parametrize("dtype", ["int8", "int16", "int64", "uint8", "float32"])
def test_top_k_ranks_the_extremes_of_the_score_dtype(dtype):
    # a signed score was ranked by its negation, and the dtype's minimum negates to itself:
    # int8 scores [-128, 5, 3] picked expert 0, the worst, for k=1
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    lo, hi = info.min, info.max
    scores = np.array(
        [[lo, 5, 3], [3, lo, 3], [hi, lo, hi], [0, 0, 0], [lo, lo, 1], [1, hi, lo]], dtype=dtype
    )
    # the order of the exact values, best first, ties to the lower index
    want = np.argsort([[-int(v) for v in row] for row in scores.tolist()], axis=1, kind="stable")
    for k in (1, 2, 3):
        np.testing.assert_array_equal(ann.dynamic.topk_experts(scores, k), want[:, :k])


def _spec_with(edit: Any) -> dict[str, Any]:
    """The spec of ``moe_graph(experts=2)`` with ``edit(entry)`` applied to the merge's entry."""
    spec = moe_graph(experts=2, k=1).to_spec()
    nodes = [dict(e) for e in spec["nodes"]]
    for e in nodes:
        if e["name"] == "merge":
            edit(e)
    return {**spec, "nodes": nodes}


def test_a_merge_given_to_layer_or_read_from_a_spec_gets_the_checks_of_g_merge():
    # a Merge module through g.layer (as a spec rebuilds it) was never checked: the graph
    # built, a Trainer took it, and fit died with a bare AttributeError ('Linear' object has no
    # attribute 'k') in the merge actor's set-up
    from asyncnn.dynamic import Merge

    g = ann.Graph()
    x = g.input("x", (None, D))
    h = g.layer("h", nn.Linear(D, D), x)
    a, b = g.layer("a", nn.Linear(D, C), h), g.layer("b", nn.Linear(D, C), h)
    with pytest.raises(ann.GraphError, match=r"^merge 'm': 'h' is not a router \(make one with "
                       r"g.router\).*it reads \['h', 'a', 'b'\]"):  # fmt: skip
        g.layer("m", Merge(2), h, a, b)
    r = g.router("r", nn.Linear(D, 2), x, experts=2)
    outs = [g.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    with pytest.raises(ann.GraphError, match=r"^merge 'm': router 'r' has 2 experts but 1 "
                       "branches were given"):  # fmt: skip
        g.layer("m", Merge(2), r, outs[0])
    with pytest.raises(ann.GraphError, match=r"^merge 'm': its module Merge\(experts=3\) is over 3 "
                       r"experts but router 'r' has 2; make it Merge\(2\)"):  # fmt: skip
        g.layer("m", Merge(3), r, *outs)
    g.layer("m", Merge(2), r, *outs)  # right: as g.merge makes it
    # from a spec: refused when it is read
    for edit, said in [
        (lambda e: e.update(inputs=["x", "e0", "e1"]), r"'x' is not a router"),
        (lambda e: e.update(inputs=["gate", "e0"]), r"router 'gate' has 2 experts but 1 branches"),
    ]:
        with pytest.raises(ann.GraphError, match=rf"^merge 'merge': {said}"):
            ann.Graph.from_spec(_spec_with(edit))


def test_check_structure_checks_every_merge_node():
    # (a graph whose nodes were changed after they were added: what g.layer checked no longer
    # holds; a Trainer checks the structure before any actor is made)
    g = moe_graph(experts=2, k=1)
    merge = g.nodes["merge"]
    merge.inputs = ("x", *merge.inputs[1:])
    with pytest.raises(ann.GraphError, match=r"^merge 'merge': 'x' is not a router"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@pytest.mark.parametrize("field", ["experts", "k", "capacity"])
def test_router_counts_refuse_a_bool(field):
    # experts=True built a router of one expert, k=True and capacity=True took 1
    kw = {"experts": 2, field: True}
    g = ann.Graph()
    x = g.input("x", (None, D))
    with pytest.raises(
        ann.GraphError, match=rf"router 'r': Router: {field} must be an int, got bool"
    ):
        g.router("r", nn.Linear(D, 2), x, **kw)


def test_router_counts_take_numpy_ints_as_ints():
    g = ann.Graph()
    x = g.input("x", (None, D))
    g.router("r", nn.Linear(D, 2), x, experts=np.int64(2), k=np.int32(1), capacity=np.int64(3))
    m = g.nodes["r"].module
    assert (m.experts, m.k, m.capacity) == (2, 1, 3)
    assert type(m.experts) is int and type(m.k) is int and type(m.capacity) is int
    with pytest.raises(ann.GraphError, match=r"Router: k=3 must be an int in \[1, experts=2\]"):
        g.router("r2", nn.Linear(D, 2), x, experts=np.int64(2), k=np.int64(3))
