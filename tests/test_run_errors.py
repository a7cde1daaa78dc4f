"""The runtime under failure: every bad batch, bad option, broken layer or stuck actor ends in a
clear error within seconds, naming the field, the option or the layer, never a hang."""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._math._pytree import tree_leaves

from _reference import chain_graph
from _run_cases import _data, _silent_graph, _sync_run, _trainer


def test_bad_batches_name_the_field():
    tr = _trainer()
    d = _data()
    with pytest.raises(
        ValueError, match=r"input 'x': got shape \(16, 4\), the graph declares \(None, 5\)"
    ):
        tr.fit({"x": d["x"][:, :4], "y": d["y"]}, batch_size=8)
    with pytest.raises(ValueError, match=r"the batch has no \['y'\]"):
        tr.fit({"x": d["x"]}, batch_size=8)
    with pytest.raises(ValueError, match=r"'y' is declared int64 but got float64 data"):
        tr.fit({"x": d["x"], "y": d["y"].astype(float)}, batch_size=8)
    with pytest.raises(ValueError, match=r"'extra'"):
        tr.fit({**d, "extra": d["x"]}, batch_size=8)


def test_nan_in_data_with_checks_on():
    d = _data()
    d["x"][3, 1] = np.nan
    with pytest.raises(ValueError, match="'x' contains NaN"):
        _trainer(check_finite=True).fit(d, batch_size=8)


@dataclass(frozen=True)
class Exploding(nn.Module):
    at_call: int = 0

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        raise FloatingPointError("boom in the layer")


@dataclass(frozen=True)
class Log(nn.Module):
    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.log(x)


def _graph_with(middle: nn.Module) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("first", nn.Linear(5, 3), x)
    h = g.layer("middle", middle, h)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def test_exception_in_layer_is_one_actor_error():
    g = _graph_with(nn.Identity())
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2))
    # swap the module after validation, so that it fails at run time
    g.nodes["middle"].module = Exploding()
    with pytest.raises(ann.ActorError) as info:
        tr.fit(_data(), batch_size=8)
    err = info.value
    assert err.actor == "middle" and err.kind == "forward" and err.key == 0
    assert isinstance(err.__cause__, FloatingPointError)
    assert "boom in the layer" in str(err)


def test_nan_produced_by_a_layer_is_named():
    g = _graph_with(Log())  # log of negative activations: NaN
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), check_finite=True)
    with (
        np.errstate(invalid="ignore"),
        pytest.raises(ann.ActorError, match="'middle' produced NaN"),
    ):
        tr.fit(_data(), batch_size=16)


def test_layer_that_never_answers_is_a_stall_error_within_seconds():
    g = _silent_graph()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), stall_timeout=0.5)
    start = time.perf_counter()
    with pytest.raises(ann.StallError) as info:
        tr.fit(_data(), batch_size=16)
    assert time.perf_counter() - start < 5
    assert "silent: computing forward of key 0" in str(info.value)
    assert "first: waiting for backward of key 0" in str(info.value)


@pytest.mark.anyio
async def test_a_bad_batch_after_good_ones_is_still_checked():
    # a batch like the last one skips the checks: any change of name, shape or dtype must not
    d = _data(n=16)
    good = {k: v[:8] for k, v in d.items()}
    async with ann.open_run(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64"
    ) as run:
        with pytest.raises(ValueError, match=r"the batch has no \['x', 'y'\]"):
            await run.step({})  # on a fresh run: nothing was checked before it
        await run.step(good)
        await run.step({k: v[8:] for k, v in d.items()})
        with pytest.raises(ValueError, match=r"input 'x': got shape \(8, 4\)"):
            await run.step({"x": good["x"][:, :4], "y": good["y"]})
        with pytest.raises(ValueError, match=r"'y' is declared int64 but got float64 data"):
            await run.step({"x": good["x"], "y": good["y"].astype(float)})
        with pytest.raises(ValueError, match=r"the batch has no \['y'\]"):
            await run.step({"x": good["x"]})
        with pytest.raises(ValueError, match=r"'extra'"):
            await run.step({**good, "extra": good["y"]})
        await run.step(good)  # and a good one after them runs
        await run.drain()
    assert sorted(run.losses) == [0, 1, 2]
    nan = {"x": good["x"].copy(), "y": good["y"]}
    nan["x"][3, 1] = np.nan
    async with ann.open_run(
        chain_graph(2),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.GPipe(2),
        dtype="float64",
        check_finite=True,
    ) as run:
        await run.step(good)
        with pytest.raises(ValueError, match="'x' contains NaN"):
            await run.step(nan)  # the same shapes and dtypes: checked all the same
    # a finite value the run's cast makes Inf: named as fit names it, not at the first actor
    # that computes on the Inf ("actor 'stage0' produced NaN or Inf")
    huge = {"x": good["x"].astype(np.float64), "y": good["y"]}
    huge["x"][2, 0] = 1e39
    async with ann.open_run(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), check_finite=True
    ) as run:
        with pytest.raises(
            ValueError,
            match=r"input 'x' has 1e\+39 in row 2, which overflows the run's dtype float32",
        ):
            await run.step(huge)


class _SpinForever(ann.LayerActor):
    """Its forward runs a Python loop that never ends, inline on the event loop's thread."""

    async def on_forward(self, key, inputs, meta):
        def spin():
            while True:
                pass

        return await self.compute(spin, cost=0)


@pytest.mark.timeout(60)
def test_an_inline_compute_that_never_returns_is_a_stall_error():
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    g.loss(
        "loss", nn.CrossEntropyLoss(), g.layer("spin", nn.Linear(5, 3), x, actor=_SpinForever), y
    )
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64", stall_timeout=1.0
    )
    with pytest.raises(
        ann.StallError, match=r"actor 'spin' has been computing its forward of key 0"
    ):
        tr.fit(_data(), batch_size=16)


_release = threading.Event()


class _HangOnAWorker(ann.LayerActor):
    """Its forward hangs on a pool thread (a cost far above the inline threshold)."""

    async def on_forward(self, key, inputs, meta):
        return await self.compute(_release.wait, 60.0, cost=1e12)


@pytest.mark.timeout(30)
def test_a_hung_compute_on_a_pool_thread_fails_fit_without_waiting_for_it():
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("hang", nn.Linear(5, 3), x, actor=_HangOnAWorker)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("out", nn.Linear(3, 3), h), y)
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64", stall_timeout=1.0
    )
    try:
        with pytest.raises(ann.StallError, match=r"hang: computing forward of key 0"):
            tr.fit(_data(), batch_size=16)  # returns in seconds while the thread still waits
    finally:
        _release.set()


@pytest.mark.anyio
async def test_an_input_that_is_not_an_array_is_named():
    d = _data()
    async with _sync_run() as run:
        with pytest.raises(TypeError, match=r"input 'x' is a list, not an array"):
            await run.step({"x": d["x"].tolist(), "y": d["y"]})  # said "got shape ()"
        await run.step(d)


def test_bad_run_options_name_the_option():
    with pytest.raises(ValueError, match=r"seed must be an int >= 0, got -1"):
        _trainer(seed=-1)  # numpy's "expected non-negative integer", naming nothing
    with pytest.raises(ValueError, match=r"stall_timeout must be a number > 0, got True"):
        _trainer(stall_timeout=True)  # was a stall timeout of 1 s
    with pytest.raises(ValueError, match=r"dtype must name a floating dtype.*got None"):
        ann.Trainer(chain_graph(2), optim.SGD(lr=0.1), policies.Sync(), dtype=None)  # was float64


@dataclass(frozen=True)
class _RowsOut(nn.Module):
    """A layer that breaks the batch dimension: ``how`` drops a row, sums the rows, or sums
    everything."""

    how: str

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if self.how == "drop":
            return x[:-1]
        if self.how == "sum0":
            return ops.sum(x, axis=0, keepdims=True)
        return ops.sum(x)


@dataclass(frozen=True)
class _Add(nn.Module):
    def __call__(self, params: Any, a: Any, b: Any, *, rng: Any = None) -> Any:
        return ops.add(a, b)


def _rows_graph(how: str) -> ann.Graph:
    # the pooled rows broadcast back onto x: without the check this trains, and Sync and
    # GPipe(4), which must agree, gave different losses (10.44 and 3.05)
    g = ann.Graph()
    x = g.input("x", (None, 4))
    y = g.input("y", (None, 4))
    pooled = g.layer("pool", _RowsOut(how), g.layer("a", nn.Linear(4, 4), x))
    out = g.layer("out", _Add(), pooled, x)
    g.loss("loss", nn.MSELoss(), out, y)
    return g


_ROWS_SAID = {
    "drop": r"shape \(1, 4\) for inputs of shape \(2, 4\): 1 row where its inputs have 2 rows",
    "sum0": r"shape \(1, 4\) for inputs of shape \(2, 4\): 1 row where its inputs have 2 rows",
    "all": r"shape \(\) for inputs of shape \(2, 4\): no batch dimension where its inputs",
}


@pytest.mark.parametrize("how", sorted(_ROWS_SAID))
def test_a_layer_that_drops_or_mixes_rows_is_refused_naming_it(how):
    with pytest.raises(ann.GraphError, match=rf"layer 'pool' \(_RowsOut.*{_ROWS_SAID[how]}"):
        ann.Trainer(_rows_graph(how), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(4))


@pytest.mark.anyio
async def test_open_run_refuses_a_layer_that_drops_rows():
    with pytest.raises(ann.GraphError, match=r"layer 'pool' .*keep the batch dimension"):
        async with ann.open_run(_rows_graph("drop"), optim.SGD(lr=0.1), policies.Sync()):
            pass  # pragma: no cover


@dataclass(frozen=True)
class _KeepNonNegative(nn.Module):
    """Drops the rows whose first feature is negative: every row of the graph check's zeros
    passes, some of real data do not."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x[ops.raw(x)[:, 0] >= 0]


def test_a_layer_that_drops_rows_only_on_real_data_is_named_in_the_run():
    # (the graph check ran it on zeros, where it kept every row; in the run the loss failed,
    # blamed for the layer's rows: "actor 'loss' failed ... logits of shape (2, 3) and labels
    # of shape (8,) do not match")
    g = ann.Graph()
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), "int64")
    h = g.layer("head", nn.Linear(4, 3), g.layer("filter", _KeepNonNegative(), x))
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((8, 4)), "y": rng.integers(0, 3, 8)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    with pytest.raises(ann.ActorError) as info:
        tr.fit(data, epochs=1, batch_size=8)
    assert info.value.actor == "filter"
    assert isinstance(info.value.__cause__, ann.GraphError)
    assert re.search(r"layer 'filter' .* for inputs of shape \(8, 4\): \d rows? where its "
                     r"inputs have 8 rows", str(info.value.__cause__))  # fmt: skip


def test_predict_and_evaluate_refuse_a_layer_that_drops_rows_as_fit_does():
    # (predict returned fewer rows than it was given, no longer lined up with them, and evaluate
    # blamed the loss: "CrossEntropyLoss: logits of shape (5, 3) and labels of shape (8,)")
    g = ann.Graph()
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), "int64")
    h = g.layer("head", nn.Linear(4, 3), g.layer("filter", _KeepNonNegative(), x))
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    g.output("logits", h)
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((8, 4)), "y": rng.integers(0, 3, 8)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    says = r"layer 'filter' .* for inputs of shape \(8, 4\): \d rows? where its inputs have 8 rows"
    with pytest.raises(ann.GraphError, match=says):
        tr.predict({"x": data["x"]})
    with pytest.raises(ann.GraphError, match=says):
        tr.evaluate(data)
    # rows it keeps all of pass
    kept = {"x": np.abs(data["x"]), "y": data["y"]}
    assert tr.predict({"x": kept["x"]})["logits"].shape == (8, 3)
    assert np.isfinite(tr.evaluate(kept)["loss"])


def test_an_expert_that_drops_rows_is_named_in_fit_and_in_predict():
    # (in predict, an expert's rows dropped down to one were broadcast onto all of the rows
    # routed to it by the merge, without a word)
    g = ann.Graph()
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), "int64")
    r = g.router("gate", nn.Linear(4, 2), x, experts=2, k=1)
    m = g.merge("merge", r, *(g.layer(f"e{i}", _KeepNonNegative(), r) for i in range(2)))
    h = g.layer("head", nn.Linear(4, 3), m)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    g.output("logits", h)
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((16, 4)), "y": rng.integers(0, 3, 16)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    says = r"layer 'e\d' .* for inputs of shape \(\d+, 4\): \d+ rows? where its inputs have"
    with pytest.raises(ann.GraphError, match=says):
        tr.predict({"x": data["x"]})
    with pytest.raises(ann.GraphError, match=says):
        tr.evaluate(data)
    with pytest.raises(ann.ActorError) as info:
        tr.fit(data, epochs=1, batch_size=16)
    assert isinstance(info.value.__cause__, ann.GraphError)
    assert re.search(says, str(info.value.__cause__))


@pytest.mark.anyio
async def test_a_batch_that_is_not_a_dict_names_the_inputs():
    d = _data()
    async with _sync_run() as run:
        for batch, what in (((d["x"], d["y"]), "tuple of 2"), ([d["x"]], "list of 1")):
            with pytest.raises(
                TypeError,
                match=rf"a batch must be a dict of input name to array, got a {what}; the "
                r"graph's inputs are \['x', 'y'\]: pass \{'x': ..., 'y': ...\}",
            ):
                await run.step(batch)  # was AttributeError: 'tuple' object has no 'items'
        await run.step(d)
    assert sorted(run.losses) == [0]


class _SplitAs(policies.GPipe):
    """A custom policy whose split is given (a user's mistake, in most of the cases below)."""

    def __init__(self, parts):
        super().__init__(2)
        object.__setattr__(self, "_parts", parts)

    def split(self, rows):
        return self._parts(rows)


@pytest.mark.anyio
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "parts",
    [
        lambda r: [(0, r // 2)],  # half the rows dropped (the loss was half)
        lambda r: [(0, r), (0, r)],  # every row twice
        lambda r: [(0, 0), (0, r)],  # an empty key (a NaN loss)
        lambda r: [(0, r + 5)],  # past the rows (that key weighted 13/8)
        lambda r: [],  # no key at all (waited forever)
        lambda r: [(r // 2, r), (0, r // 2)],  # out of order
        lambda r: [(0, 2.0), (2.0, r)],  # not ints
        lambda r: None,
    ],
    ids=["half", "twice", "empty", "past", "none", "unordered", "floats", "None"],
)
async def test_a_custom_split_that_does_not_cover_the_rows_once_is_refused(parts):
    d = _data(n=8)
    async with ann.open_run(chain_graph(3), optim.SGD(lr=0.1), _SplitAs(parts)) as run:
        with pytest.raises(ValueError, match=r"_SplitAs.split\(8\) returned .*cover its rows"):
            await run.step(d)
        assert run.in_flight == 0


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_a_custom_split_and_a_bad_max_in_flight_are_checked():
    d = _data(n=8)
    async with ann.open_run(
        chain_graph(3), optim.SGD(lr=0.1), _SplitAs(lambda r: [(0, 3), (3, r)])
    ) as run:
        await run.step(d)  # a split of uneven parts that covers the rows is fine
    assert sorted(run.losses) == [0]

    class NoneInFlight(policies.GPipe):
        def max_in_flight(self, num_stages):
            return 0  # (the first step waited forever)

    with pytest.raises(ValueError, match=r"NoneInFlight.max_in_flight\(3\) returned 0"):
        async with ann.open_run(chain_graph(3), optim.SGD(lr=0.1), NoneInFlight(2)):
            pass


class _ScalesAs(policies.GPipe):
    """A custom policy whose loss cotangent or gradient scale is given (a user's mistake)."""

    def __init__(self, cotangent: Any = None, scale: Any = None) -> None:
        super().__init__(2)
        object.__setattr__(self, "_cotangent", cotangent)
        object.__setattr__(self, "_scale", scale)

    def loss_cotangent(self, rows: int, minibatch_rows: int) -> Any:
        if self._cotangent is None:
            return super().loss_cotangent(rows, minibatch_rows)
        return self._cotangent(rows, minibatch_rows)

    def gradient_scale(self, accumulated: int) -> Any:
        return 1.0 if self._scale is None else self._scale(accumulated)


class _FlagsAs(policies.GPipe):
    """A custom policy whose ``update_due`` or ``minibatch_done`` is given (a user's mistake)."""

    def __init__(self, due: Any = None, done: Any = None) -> None:
        super().__init__(2)
        object.__setattr__(self, "_due", due)
        object.__setattr__(self, "_done", done)

    def update_due(self, backwards_since_update: int, minibatch_done: bool) -> Any:
        if self._due is None:
            return super().update_due(backwards_since_update, minibatch_done)
        return self._due(backwards_since_update, minibatch_done)

    def minibatch_done(self, backwards_done: int, minibatch_keys: int) -> Any:
        if self._done is None:
            return super().minibatch_done(backwards_done, minibatch_keys)
        return self._done(backwards_done, minibatch_keys)


@pytest.mark.anyio
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("policy", "said"),
    [
        (_ScalesAs(cotangent=lambda r, m: None), r"_ScalesAs.loss_cotangent\(4, 8\) returned None"),
        (_ScalesAs(cotangent=lambda r, m: "0.5"), r"_ScalesAs.loss_cotangent\(4, 8\) returned '0.5'"),
        (_ScalesAs(cotangent=lambda r, m: math.nan), r"loss_cotangent\(4, 8\) returned nan"),
        (_ScalesAs(scale=lambda n: None), r"_ScalesAs.gradient_scale\(2\) returned None"),
        (_ScalesAs(scale=lambda n: math.inf), r"_ScalesAs.gradient_scale\(2\) returned inf"),
        (_ScalesAs(scale=lambda n: True), r"_ScalesAs.gradient_scale\(2\) returned True"),
        (_FlagsAs(due=lambda n, d: None), r"_FlagsAs.update_due\(1, False\) returned None"),
        (_FlagsAs(due=lambda n, d: "no"), r"_FlagsAs.update_due\(1, False\) returned 'no'"),
        (_FlagsAs(due=lambda n, d: int(d)), r"_FlagsAs.update_due\(1, False\) returned 0"),
        (_FlagsAs(done=lambda b, k: None), r"_FlagsAs.minibatch_done\(1, 2\) returned None"),
    ],
    ids=["cotangent-None", "cotangent-str", "cotangent-nan", "scale-None", "scale-inf",
         "scale-bool", "due-None", "due-str", "due-int", "done-None"],
)  # fmt: skip
async def test_a_custom_policy_hook_that_returns_the_wrong_kind_is_refused_naming_it(
    policy: Any, said: str
) -> None:
    # (a loss_cotangent that forgot its return trained every weight to NaN without a word; a
    # gradient_scale of None failed on a bare TypeError that named no method; an update_due
    # that forgot its return gave None: no update, a fit's epochs without moving a weight;
    # "no" is truthy: an update after every backward)
    must = "a bool" if "FlagsAs" in said else "a finite number"
    with pytest.raises(ann.ActorError) as info:
        async with ann.open_run(chain_graph(3), optim.SGD(lr=0.1), policy) as run:
            await run.step(_data(n=8))
    assert isinstance(info.value.__cause__, ValueError)
    assert re.search(said + f": it must be {must}", str(info.value.__cause__))


@pytest.mark.anyio
async def test_a_custom_loss_cotangent_of_a_numpy_number_is_taken() -> None:
    policy = _ScalesAs(cotangent=lambda r, m: np.float32(r) / np.float32(m),
                       scale=lambda n: np.array(1.0))  # fmt: skip
    async with ann.open_run(chain_graph(3), optim.SGD(lr=0.1), policy) as run:
        await run.step(_data(n=8))
    assert sorted(run.losses) == [0]


@pytest.mark.anyio
async def test_a_custom_update_due_of_a_numpy_bool_is_taken() -> None:
    policy = _FlagsAs(due=lambda n, d: np.bool_(d), done=lambda b, k: np.asarray(b) == k)
    async with ann.open_run(chain_graph(3), optim.SGD(lr=0.1), policy) as run:
        await run.step(_data(n=8))
        await run.drain()
    assert sorted(run.losses) == [0]
    assert set(run.state().versions.values()) == {1}


def test_fit_refuses_a_streaming_policys_update_due_that_forgot_its_return() -> None:
    class ForgotReturn(policies.PipeDream):
        def update_due(self, backwards_since_update: int, minibatch_done: bool) -> Any:
            backwards_since_update >= 2  # noqa: B015 - (the mistake: no return)

    d = _data(n=8)
    with pytest.raises(ValueError, match=r"ForgotReturn.update_due\(1, False\) returned None"):
        _trainer(policy=ForgotReturn(2)).fit(d, epochs=1, batch_size=8)


@dataclass(frozen=True)
class _OrderAs(policies.Policy):
    """A new policy (as docs/policies.md writes one) whose stage_order returns what it is given."""

    microbatches: int = 2
    order: Any = None

    def stage_order(self, stage: int, num_stages: int) -> Any:
        return self.order


@pytest.mark.anyio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("order", [None, 3], ids=["None", "int"])
async def test_a_stage_order_that_returns_no_order_is_named(order: Any) -> None:
    # (it failed in the actor's start as "'NoneType' object has no attribute 'start'")
    with pytest.raises(
        TypeError,
        match=rf"_OrderAs.stage_order\(0, 3\) returned {order}: it must return a StageOrder",
    ):
        async with ann.open_run(chain_graph(3), optim.SGD(lr=0.1), _OrderAs(order=order)):
            pass  # pragma: no cover


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_orders_that_leave_out_a_layer_are_named() -> None:
    class TwoOrders(policies.GPipe):
        def orders(self, actors: Any) -> dict[str, policies.StageOrder]:
            return dict(list(super().orders(actors).items())[:2])

    with pytest.raises(TypeError, match=r"TwoOrders.orders\(.*\) gave no order for layer "):
        async with ann.open_run(chain_graph(3), optim.SGD(lr=0.1), TwoOrders(2)):
            pass  # pragma: no cover


@pytest.mark.parametrize("bad", [0, -2, 2.5, "2", True])
def test_a_new_policys_microbatches_is_checked_when_made(bad: Any) -> None:
    with pytest.raises(
        ValueError, match=r"_OrderAs\(microbatches=.*\): microbatches must be an int"
    ):
        _OrderAs(microbatches=bad)


@pytest.mark.anyio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("in_flight", [None, 64], ids=["default", "overridden"])
async def test_a_bad_microbatches_that_skipped_the_check_is_named_at_the_run(
    in_flight: Any,
) -> None:
    # (with max_in_flight left as it is, its error blamed max_in_flight; overridden, as
    # docs/policies.md's example does, the step died on a ZeroDivisionError in split)
    class SetLater(policies.Policy):  # (no dataclass: nothing checks it when made)
        microbatches = 0

        def stage_order(self, stage: int, num_stages: int) -> policies.StageOrder:
            return policies.OneFOneBOrder(None, flush=True)

        def max_in_flight(self, num_stages: int) -> int:
            return super().max_in_flight(num_stages) if in_flight is None else in_flight

    with pytest.raises(
        ValueError, match=r"SetLater\(microbatches=0\): microbatches must be an int"
    ):
        async with ann.open_run(chain_graph(2), optim.SGD(lr=0.1), SetLater()) as run:
            await run.step(_data(n=8))


@pytest.mark.anyio
async def test_open_run_casts_a_state_of_another_dtype_to_the_runs():
    # (float32 weights and Adam buffers given to a float64 run stayed float32 for the whole
    # run, where Trainer.params = ... and Trainer.load(dtype=...) convert)
    g = chain_graph(2)
    given = ann.Trainer(g, optimizer=optim.Adam(lr=0.1), policy=policies.Sync()).state
    async with ann.open_run(
        g, optimizer=optim.Adam(lr=0.1), policy=policies.Sync(), dtype="float64", state=given
    ) as run:
        for name in g.layers:
            for leaf in tree_leaves(run.state().params[name]):
                assert leaf.dtype == np.float64
            for leaf in tree_leaves(run.state().opt_states[name]):
                assert getattr(leaf, "dtype", None) != np.float32  # (a step count is an int)
        await run.step(_data(n=8))
        await run.drain()
    assert {leaf.dtype for leaf in tree_leaves(run.params)} == {np.dtype("float64")}
    # the caller's state is left as it was
    assert {leaf.dtype for leaf in tree_leaves(given.params)} == {np.dtype("float32")}


@pytest.mark.anyio
async def test_open_run_refuses_a_state_of_other_shapes_naming_the_place():
    # (found only at the first forward, as the layer's error)
    g = chain_graph(2)
    other = ann.Trainer(
        chain_graph(2, width=7), optimizer=optim.SGD(lr=0.1), policy=policies.Sync()
    )
    with pytest.raises(
        ValueError, match=r"open_run: state.params\['stage0'\]\[0\]\['bias'\] has shape \(7,\); "
        r"the layer's is \(6,\)",
    ):  # fmt: skip
        async with ann.open_run(
            g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), state=other.state
        ):
            pass


@pytest.mark.anyio
async def test_an_on_loss_callback_that_raises_is_named_as_the_callers_not_the_losss():
    # (it was "actor 'loss' failed on forward of key 0", or, where the loss ran in the task of
    # the layer before it, "actor 'stage1' failed": the loss computed well)
    def on_loss(minibatch: int, loss: float, rows: int) -> None:
        raise ZeroDivisionError("the logger's own bug")

    with pytest.raises(
        ann.ActorError, match=r"^the on_loss function given to open_run raised "
        r"ZeroDivisionError: the logger's own bug \(called as on_loss\(0, .*, 8\)\); the loss "
        r"was computed: the error is in that function, not in an actor$",
    ) as info:  # fmt: skip
        async with ann.open_run(
            chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
            on_loss=on_loss,
        ) as run:  # fmt: skip
            await run.step(_data(n=8))
            await run.drain()
    assert (info.value.actor, info.value.kind) == ("on_loss", "callback")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


class _NeedsArgs(ValueError):
    """An error whose constructor takes more than a message (json's JSONDecodeError's kind)."""

    def __init__(self, row: int, detail: str) -> None:
        super().__init__(f"row {row}: {detail}")
        self.row = row


@dataclass(frozen=True)
class _FailsPastTwoRows(nn.Module):
    def init_params(self, init: Any) -> Any:
        return {}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if x.shape[0] > 2:  # (the graph's check runs two rows)
            raise _NeedsArgs(2, "a custom error")
        return x


def test_a_layers_error_in_predict_names_it_and_keeps_its_kind():
    # (it was rebuilt from its message as type(exc)(...): a subclass needing other arguments
    # came out as a TypeError about its constructor, its fields lost)
    g = ann.Graph.sequential([nn.Linear(5, 5), _FailsPastTwoRows()], loss=nn.MSELoss(),
                             stages=2, input_shape=(None, 5), label_shape=(None, 5),
                             label_dtype="float64")  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    with pytest.raises(_NeedsArgs, match=r"^row 2: a custom error") as info:
        tr.predict({"x": np.ones((4, 5))})
    assert info.value.row == 2 and info.value.__notes__ == ["in layer 'stage1'"]


@pytest.mark.anyio
async def test_open_run_refuses_a_pool_that_is_not_an_open_device_pool():
    # it failed inside the run with "'ComputeTeam' object has no attribute 'inline_flops'",
    # and a closed pool as the first actor's error (or never, where all work ran inline)
    from asyncnn.backends import ComputeTeam, open_device_pool

    args = (chain_graph(2), optim.SGD(lr=0.1), policies.Sync())
    for pool in (ComputeTeam(2), "cpu"):
        with pytest.raises(TypeError, match=r"open_run: pool must be a DevicePool from "):
            async with ann.open_run(*args, pool=pool):
                pass
    async with open_device_pool(cpu_workers=1) as closed:
        pass
    with pytest.raises(ValueError, match=r"open_run: pool .* is closed.*open_device_pool"):
        async with ann.open_run(*args, pool=closed):
            pass


@pytest.mark.anyio
async def test_an_async_on_loss_is_refused_where_it_would_never_run():
    # (its coroutine was made and never awaited: the losses arrived, the callback's body never
    # ran, and only a "never awaited" RuntimeWarning said anything)
    async def on_loss(minibatch: int, loss: float, rows: int) -> None:
        raise AssertionError("never reached")  # pragma: no cover

    with pytest.raises(TypeError, match=r"^open_run: on_loss is an async function .*never await"):
        async with ann.open_run(chain_graph(2), optim.SGD(lr=0.1), policies.Sync(),
                                on_loss=on_loss):  # fmt: skip
            pass  # pragma: no cover

    class Returns:  # (a plain callable that hands back an awaitable all the same)
        def __call__(self, minibatch: int, loss: float, rows: int) -> Any:
            return on_loss(minibatch, loss, rows)

    with pytest.raises(ann.ActorError) as info:
        async with ann.open_run(chain_graph(2), optim.SGD(lr=0.1), policies.Sync(),
                                on_loss=Returns()) as run:  # fmt: skip
            await run.step(_data(n=8))
    assert "returned an awaitable (an async def?), which the run does not await" in str(info.value)


@pytest.mark.anyio
async def test_a_batch_with_keys_of_mixed_types_names_what_is_missing():
    # (sorting the keys for the message failed: "'<' not supported between 'str' and 'int'")
    d = _data(n=8)
    async with ann.open_run(chain_graph(2), optim.SGD(lr=0.1), policies.Sync()) as run:
        with pytest.raises(
            ValueError, match=r"the batch has no \['x'\]; .* the batch gave \[0, 'y'\]"
        ):
            await run.step({0: d["x"], "y": d["y"]})
