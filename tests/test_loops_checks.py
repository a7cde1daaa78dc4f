"""Loops: bad lengths, cycles, stop conditions of another shape or dtype or with parameters, and
NaN or Inf in a loop's forward or gradients, each refused naming the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn.dynamic import RNNCell

from _loops_cases import DC, DX, C, H, Step, T, _data, loop_graph, rnn_graph
from _reference import assert_params_close, assert_params_equal


def test_bad_lengths_and_cycles_are_clear_errors():
    g = rnn_graph()
    data = _data()
    data["len"][4] = T + 2
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    # unchecked data: the loop actor's own check still names the loop (a row of the key)
    with pytest.raises(ann.ActorError, match=r"loop 'rnn': lengths\[4\] = 7 is outside \[0, 5\]"):
        tr.fit(data, batch_size=8, check_data=False)
    # (predict and evaluate said "loop: lengths[4] ...", naming no node; now they check the
    # lengths up front, as fit does)
    for call in (tr.predict, tr.evaluate):
        with pytest.raises(ValueError, match=r"^input 'len': length 7 at row 4 is out of range"):
            call(data)
    spec = g.to_spec()
    assert ann.Graph.from_spec(spec).to_spec() == spec
    assert [e for e in spec["nodes"] if e["name"] == "rnn"][0]["recurrent"] is True
    cyclic: Any = {"nodes": [dict(e) for e in spec["nodes"]], "outputs": {}}
    for e in cyclic["nodes"]:
        if e["name"] == "embed":
            e["inputs"] = ["head"]  # reads a later node: a cycle through the head
    with pytest.raises(ann.GraphError, match=r"node 'embed' reads 'head', which comes after it"):
        ann.Graph.from_spec(cyclic)
    for e in cyclic["nodes"]:
        if e["name"] == "embed":
            e["inputs"] = ["embed"]
    with pytest.raises(ann.GraphError, match=r"node 'embed' reads itself: a cycle"):
        ann.Graph.from_spec(cyclic)
    marked = {"nodes": [dict(e) for e in spec["nodes"]], "outputs": {}}
    for e in marked["nodes"]:
        if e["name"] == "head":
            e["recurrent"] = True
    with pytest.raises(ann.GraphError, match="marked recurrent but is not a loop"):
        ann.Graph.from_spec(marked)
    g2 = ann.Graph()
    x = g2.input("x", (None, H))
    g2.layer("a", nn.Linear(H, H), x)
    with pytest.raises(ann.GraphError, match=r"layer 'b' reads its own output: a cycle"):
        g2.layer("b", nn.Linear(H, H), "b")
    with pytest.raises(ann.GraphError, match=r"loop 'l': Loop: without xs, give max_steps"):
        g2.loop("l", Step(H), x)
    with pytest.raises(ann.GraphError, match=r"layer 'rnn' .*turned a state of shape \(2, 4\)"):
        g3 = ann.Graph()
        c = g3.input("c", (None, H))
        y = g3.input("y", (None,), dtype="int64")
        h = g3.loop("rnn", nn.Linear(H, 2), c, max_steps=3)
        g3.loss("loss", nn.CrossEntropyLoss(), h, y)
        ann.Trainer(g3, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@dataclass(frozen=True)
class HaltShaped(nn.Module):
    """Halt's stop condition (a row stops once its first state component exceeds 0.3), given in
    the shape ``kind`` names: ``"rows"`` ``(rows,)``, ``"column"`` ``(rows, 1)`` (both one bool
    per row), or one the rule refuses: ``"wide"`` ``(rows, 2)``, ``"extra_row"``
    ``(rows + 1,)``, ``"batch"`` ``()`` (one value for the whole batch), ``"deep"``
    ``(rows, 1, 1)``; ``"squeezed"`` is ``(rows,)`` but ``()`` for a single row (a column
    squeezed), which a build's check on two rows cannot see."""

    kind: str

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        first = ops.raw(h)[:, :1] > 0.3  # (rows, 1)
        return {
            "rows": lambda: first[:, 0],
            "column": lambda: first,
            "wide": lambda: np.concatenate([first, first], axis=1),
            "extra_row": lambda: np.concatenate([first[:, 0], first[:1, 0]]),
            "batch": lambda: np.asarray(first.all()),
            "deep": lambda: first[:, :, None],
            "squeezed": lambda: first.squeeze(),
        }[self.kind]()


def halting_graph(kind: str, size: int = H) -> ann.Graph:
    """A loop ``"walk"`` of :class:`Step` cells that runs until :class:`HaltShaped` (``kind``)
    says stop, at most 6 steps, then a head and a loss."""
    return loop_graph(HaltShaped(kind), "walk", size)


@pytest.mark.parametrize("policy", [policies.Sync(), policies.OneFOneB(2)], ids=["Sync", "1F1B2"])
def test_an_until_of_shape_rows_by_one_runs_as_one_of_shape_rows(policy):
    # (rows, 1) is one bool per row, as (rows,) is: the actor took it, but the graph's build
    # refused it (the dense check broadcast it against the rows' mask into (rows, rows))
    rng = np.random.default_rng(3)
    data = {"c": rng.standard_normal((10, DC)), "y": rng.integers(0, C, 10)}
    runs = {}
    for kind in ("rows", "column"):
        g = halting_graph(kind)
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
        hist = tr.fit(data, batch_size=10, epochs=2)
        runs[kind] = (tr.params, hist)
        h0 = g.nodes["enc"].module(tr.params["enc"], data["c"])
        runs[kind] += (np.asarray(ops.raw(g.nodes["walk"].module(tr.params["walk"], h0))),)
    (p_rows, h_rows, d_rows), (p_col, h_col, d_col) = runs["rows"], runs["column"]
    assert_params_close(p_col, p_rows, rtol=0)
    assert h_col.losses == h_rows.losses
    s_rows, s_col = h_rows.statistics["walk"], h_col.statistics["walk"]
    assert s_col.row_steps == s_rows.row_steps < 10 * 2 * s_rows.max_steps_seen  # rows halted
    np.testing.assert_array_equal(d_col, d_rows)  # the dense evaluation agrees too


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("wide", r"\(2, 2\)"), ("extra_row", r"\(3,\)"), ("batch", r"\(\)"),
     ("deep", r"\(2, 1, 1\)")],
)  # fmt: skip
def test_an_until_of_another_shape_is_refused_when_the_graph_is_built(kind, shape):
    with pytest.raises(
        ann.GraphError,
        match=rf"layer 'walk' .*until HaltShaped\(kind='{kind}'\) gave a stop condition of "
        rf"shape {shape} for a state of shape \(2, 4\); it must give one bool per row, shape "
        r"\(2,\) or \(2, 1\)",
    ):
        ann.Trainer(halting_graph(kind), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_an_until_whose_shape_slips_past_the_build_is_refused_by_the_loop_actor():
    # squeezed, a column of one row is a scalar: the build's two rows give (2,), a key of one
    # row gives (), refused by the same rule, named by the loop's actor
    g = halting_graph("squeezed", size=DC)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    rng = np.random.default_rng(0)
    data = {"c": rng.standard_normal((1, DC)), "y": rng.integers(0, C, 1)}
    with pytest.raises(
        ann.ActorError,
        match=r"loop 'walk': until HaltShaped\(kind='squeezed'\) gave a stop condition of shape "
        r"\(\) for a state of shape \(1, 2\); it must give one bool per row, shape \(1,\) or "
        r"\(1, 1\)",
    ) as info:
        tr.fit(data, batch_size=1)
    assert info.value.actor == "walk"


@dataclass(frozen=True)
class Blowup(nn.Module):
    """A cell whose ``kind`` goes wrong: ``"forward"`` gives Inf states; ``"backward"`` gives
    zero states (finite) but a NaN gradient (the square root of zero)."""

    kind: str

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        if self.kind == "forward":
            return ops.add(h, np.inf)
        return ops.sqrt(ops.multiply(ops.multiply(h, h), 0.0))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN's making, on purpose
@pytest.mark.parametrize("policy", [policies.Sync(), policies.ZeroBubbleH1(2)], ids=["Sync", "ZB"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_check_finite_names_the_loop_that_produced_nan_or_inf(kind, policy):
    # the loop's forward and backward went unchecked: the head (forward) or the encoder
    # (backward) was named instead
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    h = g.loop("loop", Blowup(kind), g.layer("enc", nn.Linear(DC, H), c), max_steps=2)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(H, C), h), y)
    rng = np.random.default_rng(0)
    data = {"c": rng.standard_normal((4, DC)), "y": rng.integers(0, C, 4)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64",
                     check_finite=True)  # fmt: skip
    with pytest.raises(ann.ActorError, match=rf"actor 'loop' produced NaN or Inf in its {kind}"):
        tr.fit(data, batch_size=4)


@dataclass(frozen=True)
class SqrtGain(nn.Module):
    """``h * (1 + sqrt(g))`` with ``g = 0``: finite states and input gradients, but an Inf
    gradient for ``g`` (the square root's slope at zero)."""

    size: int

    def init_params(self, init):
        return {"g": init.zeros((self.size,))}

    def __call__(self, params, h, *, rng=None):
        return ops.add(h, ops.multiply(h, ops.sqrt(params["g"])))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Inf's making, on purpose
@pytest.mark.parametrize("policy", [policies.Sync(), policies.ZeroBubbleH1(2)], ids=["Sync", "ZB"])
@pytest.mark.parametrize("first", ["layer", "loop"])
def test_check_finite_names_the_actor_and_parameter_whose_gradient_is_not_finite(first, policy):
    # parameter gradients went unchecked: a first layer (no input gradient formed) was named
    # only a step later, for the NaN forward its updated weights made
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    if first == "layer":
        h = g.layer("first", SqrtGain(DC), c)
    else:
        h = g.loop("first", SqrtGain(DC), c, max_steps=2)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(DC, C), h), y)
    rng = np.random.default_rng(0)
    data = {"c": rng.standard_normal((8, DC)), "y": rng.integers(0, C, 8)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64",
                     check_finite=True)  # fmt: skip
    msg = r"actor 'first' produced NaN or Inf in the gradient of its parameter params\['g'\]"
    with pytest.raises(ann.ActorError, match=msg) as info:
        tr.fit(data, batch_size=4)
    assert (info.value.actor, info.value.kind, info.value.key) == ("first", "backward", 0)


@dataclass(frozen=True)
class FloatHalt(nn.Module):
    """A probability of stopping (a sigmoid), not a decision."""

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        return 1 / (1 + np.exp(-ops.raw(h)[:, 0]))


@dataclass(frozen=True)
class LearnedHalt(nn.Module):
    """A stop condition with a parameter (a threshold): until trains none."""

    def init_params(self, init):
        return {"t": init.zeros((1,))}

    def __call__(self, params, h, *, rng=None):
        return ops.raw(h)[:, 0] > params["t"][0]


@pytest.mark.parametrize(
    ("until", "said"),
    [
        # floats were cast to bools: a sigmoid's every value is true, so each row stopped after
        # one step, silently
        (
            FloatHalt(),
            r"layer 'loop' .*until FloatHalt\(\) gave a stop condition of dtype "
            r"float32; it must give bools .*compare, e\.g\. p > 0\.5",
        ),
        # the loop failed at the build with a bare KeyError: 't'
        (
            LearnedHalt(),
            r"loop 'loop': Loop: until LearnedHalt\(\) has parameters, but until is "
            r"called with none",
        ),
    ],
    ids=["floats", "parameters"],
)
def test_an_until_of_floats_or_with_parameters_is_refused_when_the_graph_is_built(until, said):
    with pytest.raises(ann.GraphError, match=said):
        ann.Trainer(loop_graph(until), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def _lengths_graph(cell: Any, features: int = DX, max_steps: int | None = None) -> ann.Graph:
    g = ann.Graph()
    xs = g.input("xs", (None, T, features))
    h0 = g.input("h0", (None, H))
    lens = g.input("L", (None,), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    h = g.loop("rnn", cell, h0, xs, lens, max_steps=max_steps)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("f", nn.Linear(H, C), h), y)
    return g


@dataclass(frozen=True)
class Widen(nn.Module):
    """A cell that turns a state of H features into one of H + 1 (no recurrent state)."""

    def init_params(self, init):
        return {}

    def __call__(self, params, h, x, *, rng=None):
        return ops.concatenate([h, h[:, :1]], axis=1)


@pytest.mark.parametrize(
    ("cell", "features", "said"),
    [
        pytest.param(RNNCell(DX + 1, H), DX, r"expected \(batch, 4\) and \(batch, 4\)", id="xs"),
        pytest.param(Widen(), DX, r"turned a state of shape \(2, 4\) into \(2, 5\)", id="state"),
    ],
)
def test_a_loop_with_lengths_runs_its_cell_when_the_graph_is_checked(cell, features, said):
    # the check fed zero lengths: the cell ran no step, so a wrong xs or cell passed the build
    # and failed in fit's first forward, as an ActorError
    g = _lengths_graph(cell, features)
    with pytest.raises(ann.GraphError, match=r"layer 'rnn' \(Loop\(.*\) fails on its inputs "
                       r"\[h0 \(2, 4\) float32, xs \(2, 5, 3\) float32, L \(2,\) int64\].*" + said):  # fmt: skip
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_a_right_loop_with_lengths_keeps_its_shapes_when_checked():
    g = _lengths_graph(RNNCell(DX, H))
    ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    assert g.shapes["rnn"] == (2, H)


@pytest.mark.parametrize(
    ("max_steps", "bad", "said"),
    [
        pytest.param(
            None, T + 2, r"at most the 5 steps of its xs 'xs'\): lengths must be in 0..5", id="xs"
        ),  # fmt: skip
        pytest.param(3, 4, r"at most its max_steps=3\): lengths must be in 0..3", id="max_steps"),
        pytest.param(None, -1, r"at most the 5 steps", id="negative"),
    ],
)
@pytest.mark.parametrize("policy", [policies.Sync(), policies.Async(max_active_keys=4)])
def test_lengths_out_of_range_are_refused_before_any_compute_naming_the_data_row(
    policy, max_steps, bad, said
):
    # they were found by the loop actor once it reached their key (earlier keys had trained),
    # naming a row of the key: lengths[8] for the data's row 40
    g = _lengths_graph(RNNCell(DX, H), max_steps=max_steps)
    rng = np.random.default_rng(0)
    lens = rng.integers(0, (max_steps or T) + 1, 64)
    lens[40] = bad
    data = {"xs": rng.standard_normal((64, T, DX)), "h0": np.zeros((64, H)), "L": lens,
            "y": rng.integers(0, C, 64)}  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy)
    start = tr.params
    with pytest.raises(ValueError, match=rf"^input 'L': length {bad} at row 40 is out of range "
                       rf"for loop 'rnn' \({said}"):  # fmt: skip
        tr.fit(data, batch_size=16, shuffle=True)
    assert_params_equal(tr.params, start)  # nothing trained


@pytest.mark.anyio
async def test_a_runs_step_checks_each_batchs_lengths_and_its_actor_those_left_unchecked():
    g = _lengths_graph(RNNCell(DX, H))
    rng = np.random.default_rng(0)
    lens = np.array([1, 2, T + 1, 0])
    batch = {"xs": rng.standard_normal((4, T, DX)), "h0": np.zeros((4, H)), "L": lens,
             "y": rng.integers(0, C, 4)}  # fmt: skip
    async with ann.open_run(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync()) as run:
        with pytest.raises(ValueError, match=r"^input 'L': length 6 at row 2 is out of range"):
            await run.step(batch)
    with pytest.raises(ann.ActorError, match=r"loop 'rnn': lengths\[2\] = 6 is outside \[0, 5\]"):
        async with ann.open_run(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync()) as run:
            await run.step(batch, check_data=False)
            await run.drain()


def test_max_steps_refuses_a_bool_and_takes_a_numpy_int():
    g = ann.Graph()
    c = g.input("c", (None, H))
    with pytest.raises(ann.GraphError, match=r"loop 'l': Loop: max_steps must be an int, got bool"):
        g.loop("l", nn.Linear(H, H), c, max_steps=True)
    with pytest.raises(ann.GraphError, match=r"loop 'l': Loop: max_steps must be >= 0, got -1"):
        g.loop("l", nn.Linear(H, H), c, max_steps=-1)
    g.loop("l", nn.Linear(H, H), c, max_steps=np.int64(3))
    steps = g.nodes["l"].module.max_steps
    assert steps == 3 and type(steps) is int


def test_float_lengths_say_to_declare_the_input_an_int():
    # (the hint said to declare features for the (None,) float input, where the fix is its
    # dtype: "if it has features, declare them")
    g = ann.Graph()
    h0, xs = g.input("h0", (None, 4)), g.input("xs", (None, 5, 3))
    y, ln = g.input("y", (None,), "int64"), g.input("len", (None,))  # float32: the mistake
    lp = g.loop("lp", RNNCell(3, 4), h0, xs, ln)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("o", nn.Linear(4, 3), lp), y)
    with pytest.raises(ann.GraphError) as info:
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    said = str(info.value)
    assert "lengths must be one int per row, got float32" in said and "int64" in said
    assert "if it has features, declare them" not in said
