"""Custom actors with arguments (``actor_args``), a set-up hook, and state of their own."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._math._pytree import tree_leaves

pytestmark = pytest.mark.timeout(120)


class ScaledGradient(ann.LayerActor):
    """Sends ``factor`` times the input gradient upstream; counts the keys it saw (its state)."""

    def setup(self, factor: float = 1.0, label: str = "") -> None:
        self.factor = float(factor)
        self.label = label
        self.seen = np.zeros((), dtype=np.int64)

    def actor_state(self) -> Any:
        return {"seen": self.seen}

    def load_actor_state(self, state: Any) -> None:
        self.seen = np.asarray(state["seen"]).copy()

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        grads = await super().on_backward(key, grad, meta)
        self.seen = self.seen + 1
        return [None if g is None else g * self.factor for g in grads or []]


def _graph(factor: float, worker: int | None = None) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Sequential(nn.Linear(6, 8), nn.Tanh()), x)
    h = g.layer(
        "b", nn.Linear(8, 3), h, actor=ScaledGradient,
        actor_args={"factor": factor, "label": "half"}, worker=worker,
    )  # fmt: skip
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def _data(n: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 6)), "y": rng.integers(0, 3, size=n)}


def _fit(graph: ann.Graph, **kw: Any) -> ann.Trainer:
    tr = ann.Trainer(
        graph, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64", **kw
    )
    tr.fit(_data(), epochs=2, batch_size=16)
    return tr


def test_actor_args_reach_setup_and_the_spec():
    g = _graph(0.0)
    spec = g.to_spec()
    (entry,) = [e for e in spec["nodes"] if e["name"] == "b"]
    assert entry["actor_args"] == {"factor": 0.0, "label": "half"}
    again = ann.Graph.from_spec(spec)
    assert again.nodes["b"].actor_args == {"factor": 0.0, "label": "half"}
    assert again.to_spec() == spec
    # factor 0: the first layer gets a zero gradient and never moves
    tr = _fit(g)
    start = _fit(g, seed=0)  # same seed: same start; compare with an untrained trainer's
    fresh = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    for got, want in zip(tree_leaves(tr.params["a"]), tree_leaves(fresh.params["a"]), strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(
        not np.array_equal(p, q)
        for p, q in zip(tree_leaves(start.params["b"]), tree_leaves(fresh.params["b"]), strict=True)
    )


def test_actor_state_carries_over_from_one_fit_to_the_next():
    tr = _fit(_graph(0.5))  # 2 epochs of 2 minibatches of 2 keys: 8 backwards
    assert int(tr.state.actor_states["b"]["seen"]) == 8
    tr.fit(_data(), epochs=1, batch_size=16)
    assert int(tr.state.actor_states["b"]["seen"]) == 12


def test_bad_actor_args_are_refused_when_the_graph_is_built():
    g = ann.Graph()
    x = g.input("x", (None, 6))
    with pytest.raises(ann.GraphError, match=r"layer 'b'.*no actor class"):
        g.layer("b", nn.Linear(6, 3), x, actor_args={"factor": 0.5})
    with pytest.raises(ann.GraphError, match=r"layer 'c'.*\['arr'\].*ndarray"):
        g.layer("c", nn.Linear(6, 3), x, actor=ScaledGradient, actor_args={"arr": np.ones(2)})
    with pytest.raises(ann.GraphError, match=r"layer 'd': ScaledGradient.setup does not take"):
        g.layer("d", nn.Linear(6, 3), x, actor=ScaledGradient, actor_args={"fcator": 0.5})
    with pytest.raises(ann.GraphError, match=r"layer 'e': LayerActor.setup does not take"):
        g.layer("e", nn.Linear(6, 3), x, actor=ann.LayerActor, actor_args={"k": 1})


class PassesFactorOn(ann.LayerActor):
    def setup(self, factor: float = 1.0) -> None:
        super().setup(factor)  # (a leftover the base cannot take)


def test_the_base_setup_accepts_any_override_and_refuses_leftover_positionals():
    # `*args: Any, **kwargs: Any` is what mypy accepts any override of (`def setup(self,
    # factor=1.0)`, as docs/custom_actors.md shows); `**args` alone made that an [override] error
    params = inspect.signature(ann.LayerActor.setup).parameters.values()
    assert [(p.kind, p.annotation) for p in params if p.name != "self"] == [
        (inspect.Parameter.VAR_POSITIONAL, "Any"),
        (inspect.Parameter.VAR_KEYWORD, "Any"),
    ]
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("b", nn.Linear(6, 3), x, actor=PassesFactorOn, actor_args={"factor": 2.0})
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    with pytest.raises(ann.GraphError) as refused:
        tr.fit(_data(), batch_size=16)
    # the layer and the class once (the run's set-up prefixed them to the base's words again)
    assert str(refused.value) == (
        "layer 'b': PassesFactorOn.setup passed 1 positional argument(s) (2.0,) to "
        "LayerActor.setup, which takes none; the run calls setup with the node's actor_args as "
        "keywords: take them in your setup's own parameters and call super().setup() without them"
    )


def test_a_stateless_actor_given_state_says_so():
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(6, 3), x), y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    tr.state.actor_states["b"] = {"seen": 1}
    with pytest.raises(TypeError, match="layer 'b': LayerActor was given actor state"):
        tr.fit(_data(), batch_size=16)


@pytest.mark.slow
def test_actor_args_equal_in_one_process_and_on_workers():
    one = _fit(_graph(0.25))
    with ann.cluster.LocalCluster(workers=1) as cluster:
        two = _fit(_graph(0.25, worker=0), cluster=cluster)
    for name in ("a", "b"):
        for p, q in zip(tree_leaves(one.params[name]), tree_leaves(two.params[name]), strict=True):
            np.testing.assert_array_equal(p, q)
    # the worker's actor sends its own state back with its weights
    assert int(two.state.actor_states["b"]["seen"]) == int(one.state.actor_states["b"]["seen"]) == 8


MainActor = type("MainActor", (ann.LayerActor,), {"__module__": "__main__"})


@pytest.mark.anyio
async def test_a_class_from_main_is_refused_before_workers_start():
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(6, 3), x, actor=MainActor), y)
    assert g.main_classes() == ["MainActor"]
    with pytest.raises(ann.GraphError, match=r"\['MainActor'\], defined in __main__.*module"):
        async with ann.open_run(g, optim.SGD(lr=0.1), policies.Sync(), cluster=object()):
            pass


def test_a_trace_naming_a_class_from_main_warns(tmp_path):
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(6, 3), x, actor=MainActor), y)
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=str(tmp_path / "t")
    )
    with pytest.warns(UserWarning, match="replay can rebuild the graph only where __main__"):
        tr.fit(_data(), batch_size=16)


def test_a_checkpoint_keeps_an_actors_own_state(tmp_path):
    tr = _fit(_graph(0.5))
    tr.save(tmp_path / "ckpt")
    back = ann.Trainer.load(tmp_path / "ckpt")
    assert int(back.state.actor_states["b"]["seen"]) == 8
    assert back.graph.nodes["b"].actor_args == {"factor": 0.5, "label": "half"}
    back.fit(_data(), epochs=1, batch_size=16)
    assert int(back.state.actor_states["b"]["seen"]) == 12


class ReturnsNone(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        await super().on_forward(key, inputs, meta)
        return None


class ReturnsTuple(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        out = await super().on_forward(key, inputs, meta)
        return out, out


class ReturnsOneTensor(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        (g,) = await super().on_backward(key, grad, meta) or [None]
        return g


class ReturnsTwoGrads(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        grads = await super().on_backward(key, grad, meta) or []
        return grads + grads


class ReturnsNoGrads(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        await super().on_backward(key, grad, meta)
        return []


class ReturnsScalarGrads(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        await super().on_backward(key, grad, meta)
        return [1.0]


class ReturnsSummedGrads(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        (g,) = await super().on_backward(key, grad, meta) or [None]
        return [g.sum()]


class SyncForward(ann.LayerActor):
    def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:  # type: ignore[override]
        return inputs[0][:, :3]


def _actor_on_b(actor: type[ann.LayerActor]) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Sequential(nn.Linear(6, 8), nn.Tanh()), x)
    h = g.layer("b", nn.Linear(8, 3), h, actor=actor)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def _assert_fails_at_b(actor: type, kind: str, cause: type, match: str) -> None:
    """A GPipe(2) float64 fit with ``actor`` on layer b fails in b's ``kind`` of key 0, with
    ``cause`` and a message matching ``match``."""
    tr = ann.Trainer(
        _actor_on_b(actor), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64"
    )
    with pytest.raises(ann.ActorError, match=match) as info:
        tr.fit(_data(), batch_size=16)
    err = info.value
    assert (err.actor, err.kind, err.key) == ("b", kind, 0)
    assert f"actor 'b' failed on {kind} of key 0" in str(err)
    assert isinstance(err.__cause__, cause)


@pytest.mark.parametrize(
    ("actor", "kind", "cause", "match"),
    [
        (ReturnsNone, "forward", TypeError, r"ReturnsNone.on_forward returned None; .*one array"),
        (ReturnsTuple, "forward", TypeError, r"ReturnsTuple.on_forward returned tuple"),
        (ReturnsOneTensor, "backward", TypeError, r"on_backward returned ndarray; .*a list"),
        (ReturnsTwoGrads, "backward", ValueError, r"returned 2 gradients for 1 input slot"),
        (ReturnsNoGrads, "backward", ValueError, r"returned 0 gradients for 1 input slot"),
        (SyncForward, "forward", TypeError, r"SyncForward.on_forward must be defined with async"),
        # (both were broadcast over the layer upstream's output: it trained on a wrong gradient)
        (
            ReturnsScalarGrads,
            "backward",
            TypeError,
            r"slot 0 \(from 'a'\) a gradient that is a float",
        ),
        (
            ReturnsSummedGrads,
            "backward",
            TypeError,
            r"that is a float64 of shape \(\), not an array",
        ),
    ],
    ids=[
        "forward-none",
        "forward-tuple",
        "backward-tensor",
        "backward-long",
        "backward-short",
        "sync-hook",
        "backward-scalar",
        "backward-0-d",
    ],  # fmt: skip
)
def test_a_hook_returning_the_wrong_thing_is_an_error_of_its_own_actor(actor, kind, cause, match):
    # (before, the consumer failed under its own name, or the layer upstream took a row of
    # the tensor, or the extra gradients were dropped without a word)
    _assert_fails_at_b(actor, kind, cause, match)


class SpinsInItsHandler(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        while True:  # a long computation written in the handler, not through self.compute
            pass


@pytest.mark.anyio
async def test_a_handler_that_blocks_the_loop_is_a_stall_error_that_says_how_not_to():
    # (it said only "(small work runs inline)", which a handler that blocks by itself is not)
    with pytest.raises(
        ann.StallError,
        match=r"actor 'b' has been computing its forward of key 0 .* it is interrupted where it "
        r"runs Python next .*\. A handler must not block the loop: wait with await "
        r"anyio\.sleep\(\), not time\.sleep\(\)",
    ):
        async with ann.open_run(
            _actor_on_b(SpinsInItsHandler), optim.SGD(lr=0.1), policies.GPipe(2),
            dtype="float64", stall_timeout=0.2,
        ) as run:  # fmt: skip
            await run.step(_data(16))


class DropsRows(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        return (await super().on_forward(key, inputs, meta))[:1]


class WidensOutput(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        out = await super().on_forward(key, inputs, meta)
        return np.concatenate([out, out[:, :1]], axis=1)


class Float32Output(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        return (await super().on_forward(key, inputs, meta)).astype(np.float32)


class DropsGradientRows(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        (g,) = await super().on_backward(key, grad, meta) or [None]
        return [g[:1]]


class Float32Gradient(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        (g,) = await super().on_backward(key, grad, meta) or [None]
        return [g.astype(np.float32)]


class ForwardWithoutSuper(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        return self.module(self.params, *inputs)


class BackwardTwice(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        await super().on_backward(key, grad, meta)
        return await super().on_backward(key, grad, meta)


class IntOutput(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        return (await super().on_forward(key, inputs, meta)).astype(np.int64)


class IntGradient(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        (g,) = await super().on_backward(key, grad, meta) or [None]
        return [(g * 100).astype(np.int64)]  # a quantisation gone wrong


@pytest.mark.parametrize(
    ("actor", "kind", "cause", "match"),
    [
        (DropsRows, "forward", ValueError,
         r"DropsRows.on_forward returned an output of shape \(1, 3\) for inputs of shape "
         r"\(8, 8\): 1 row where its inputs have 8 rows"),
        (WidensOutput, "forward", ValueError,
         r"WidensOutput.on_forward returned an output of shape \(8, 4\) .* the graph expects "
         r"\(8, 3\)"),
        (Float32Output, "forward", TypeError,
         r"Float32Output.on_forward returned a float32 output in a float64 run"),
        (DropsGradientRows, "backward", ValueError,
         r"DropsGradientRows.on_backward gave input slot 0 \(from 'a'\) a gradient of shape "
         r"\(1, 8\) for an input of shape \(8, 8\)"),
        (Float32Gradient, "backward", TypeError,
         r"Float32Gradient.on_backward gave input slot 0 \(from 'a'\) a float32 gradient for a "
         r"float64 input"),
        (ForwardWithoutSuper, "backward", RuntimeError,
         r"default on_backward found no forward state for key 0 in self.store: "
         r"ForwardWithoutSuper.on_forward was overridden without storing it .* super\(\)"),
        (BackwardTwice, "backward", RuntimeError,
         r"no forward state for key 0 .* at most once per key"),
        (IntOutput, "forward", TypeError,
         r"IntOutput.on_forward returned an output of dtype int64 where the layer's module gives a "
         r"floating one .* return it in the run's dtype \(out.astype\('float64'\)\)"),
        (IntGradient, "backward", TypeError,
         r"IntGradient.on_backward gave input slot 0 \(from 'a'\) a gradient of dtype int64 for a "
         r"float64 input; .* \(g.astype\('float64'\)\)"),
    ],
    ids=[
        "rows", "width", "output-dtype", "grad-rows", "grad-dtype", "no-super", "twice",
        "output-int", "grad-int",
    ],
)  # fmt: skip
def test_a_custom_hooks_wrong_shape_or_dtype_is_an_error_of_its_own_actor(
    actor, kind, cause, match
):
    # (before: the loss failed on the output under its own name, the layer upstream on the
    # gradient under its, a float32 output or gradient trained on without a word, and a forward
    # that kept nothing made the default backward fail with a bare KeyError: 0; an integer
    # output failed at the loss, under its name, and an integer gradient was trained on,
    # truncated, without a word)
    _assert_fails_at_b(actor, kind, cause, match)


class Float32InputHalf(ann.LayerActor):
    async def on_backward_input(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        (g,) = await super().on_backward_input(key, grad, meta) or [None]
        return [g.astype(np.float32)]


class WeightHalfReturnsGradients(ann.LayerActor):
    async def on_backward_weight(self, key: int, meta: dict[str, Any]) -> Any:
        await super().on_backward_weight(key, meta)
        return [np.zeros((8, 8))]


@pytest.mark.parametrize(
    ("actor", "kind", "match"),
    [
        (Float32InputHalf, "backward_input",
         r"on_backward_input gave input slot 0 \(from 'a'\) a float32 gradient"),
        (WeightHalfReturnsGradients, "backward_weight",
         r"WeightHalfReturnsGradients.on_backward_weight returned list; it must return None"),
    ],
    ids=["input-half-dtype", "weight-half-returns"],
)  # fmt: skip
def test_the_halves_of_a_split_backward_are_checked_too(actor, kind, match):
    # (a value returned by on_backward_weight was dropped without a word)
    tr = ann.Trainer(
        _actor_on_b(actor), optimizer=optim.SGD(lr=0.1), policy=policies.ZeroBubbleH1(2),
        dtype="float64",
    )  # fmt: skip
    with pytest.raises(ann.ActorError, match=match) as info:
        tr.fit(_data(), batch_size=16)
    assert (info.value.actor, info.value.kind) == ("b", kind)


class CountsInPlace(ann.LayerActor):
    """Keeps the state it is given as it is and counts its backwards in place."""

    def setup(self) -> None:
        self.seen = np.zeros((), dtype=np.int64)

    def actor_state(self) -> Any:
        return {"seen": self.seen}

    def load_actor_state(self, state: Any) -> None:
        self.seen = state["seen"]

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        self.seen += 1
        return await super().on_backward(key, grad, meta)


def test_a_run_never_changes_the_actor_state_it_was_given():
    # load_actor_state got the RunState's own object: the next fit counted on in the earlier
    # tr.state (4, then 8)
    tr = ann.Trainer(
        _actor_on_b(CountsInPlace), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
        dtype="float64",
    )  # fmt: skip
    tr.fit(_data(), batch_size=16)
    after_first = tr.state
    assert int(after_first.actor_states["b"]["seen"]) == 4
    tr.fit(_data(), batch_size=16)
    assert int(after_first.actor_states["b"]["seen"]) == 4
    assert int(tr.state.actor_states["b"]["seen"]) == 8


class AsyncSetup(ann.LayerActor):
    async def setup(self, factor: float = 1.0) -> None:  # type: ignore[override]
        self.factor = factor


class AsyncLoad(ann.LayerActor):
    def actor_state(self) -> Any:
        return {"n": 1}

    async def load_actor_state(self, state: Any) -> None:  # type: ignore[override]
        self.n = state["n"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("actor", "hook"), [(AsyncSetup, "setup"), (AsyncLoad, "load_actor_state")]
)
async def test_an_async_setup_is_refused_before_a_run_computes(actor, hook):
    # the coroutine was dropped unawaited: the actor ran unconfigured and failed later on an
    # attribute setup never set (or its state was never loaded)
    with pytest.raises(
        ann.GraphError, match=rf"layer 'b': {actor.__name__}.{hook} is an async def; it must "
        rf"be a plain def .* `def {hook}\(self, ...\)`",
    ):  # fmt: skip
        async with ann.open_run(_actor_on_b(actor), optim.SGD(lr=0.1), policies.Sync()) as run:
            await run.step(_data(16))  # pragma: no cover


class AsyncState(ann.LayerActor):
    async def actor_state(self) -> Any:  # type: ignore[override]
        return {"n": 1}

    def load_actor_state(self, state: Any) -> None:
        self.n = state["n"]


@pytest.mark.parametrize(
    ("actor", "hook"),
    [(AsyncSetup, "setup"), (AsyncState, "actor_state"), (AsyncLoad, "load_actor_state")],
)
def test_an_async_setup_is_refused_when_the_layer_is_added(actor, hook):
    # only the run refused it, at its start: a graph with it was built, saved and sent to
    # workers before anything said the actor could never be set up
    with pytest.raises(
        ann.GraphError, match=rf"layer 'b': {actor.__name__}.{hook} is an async def; it must "
        rf"be a plain def .* `def {hook}\(self, ...\)`",
    ):  # fmt: skip
        _actor_on_b(actor)


class RunDtype(ann.LayerActor):
    """Keeps the size of the run's dtype, as its context gives it, in its state."""

    def actor_state(self) -> Any:
        return {"itemsize": self.ctx.dtype.itemsize}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_context_gives_actors_the_runs_dtype(dtype):
    # an actor with no floating parameter and integer inputs could not tell the run's dtype
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(6, 3), x, actor=RunDtype), y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype=dtype)
    tr.fit(_data(), batch_size=16)
    assert tr.state.actor_states["b"]["itemsize"] == np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class IdsAsFloat32(nn.Module):
    """Integer ids as float32 values (no parameters)."""

    def __call__(self, params: Any, ids: Any, *, rng: Any = None) -> Any:
        return ops.astype(ids, "float32")


class Float64OnIntegers(ann.LayerActor):
    """A layer without parameters on integer ids, whose output is float64 whatever the run."""

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        return (await super().on_forward(key, inputs, meta)).astype(np.float64)


def test_an_output_not_in_the_runs_dtype_is_refused_where_nothing_else_tells_it():
    # (before: no floating parameter or input to guess the run's dtype from, so the float64
    # output passed, and the float32 layer after it computed in float64 without a word)
    g = ann.Graph()
    ids = g.input("ids", (None, 6), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("b", IdsAsFloat32(), ids, actor=Float64OnIntegers)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("c", nn.Linear(6, 3), h), y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float32")
    data = {"ids": np.arange(96).reshape(16, 6) % 5, "y": np.arange(16) % 3}
    with pytest.raises(
        ann.ActorError, match=r"Float64OnIntegers.on_forward returned a float64 output in a "
        r"float32 run; return it in the run's dtype \(out.astype\('float32'\)\)",
    ) as info:  # fmt: skip
        tr.fit(data, batch_size=16)
    assert (info.value.actor, info.value.kind) == ("b", "forward")


class NaNOutput(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        return (await super().on_forward(key, inputs, meta)) * np.nan


class NaNGradient(ann.LayerActor):
    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        return [g * np.nan for g in await super().on_backward(key, grad, meta) or []]


class NaNForwardWithoutSuper(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        out = await super().on_forward(key, inputs, meta)
        return np.full_like(out, np.inf)


@pytest.mark.parametrize(
    ("actor", "kind"),
    [(NaNOutput, "forward"), (NaNGradient, "backward"), (NaNForwardWithoutSuper, "forward")],
    ids=["output", "gradient", "inf-output"],
)
def test_check_finite_blames_the_custom_hook_that_made_the_nan(actor, kind):
    # (the checks ran inside the default hooks, before the override changed the result: the
    # NaN output was blamed on 'loss', the NaN gradient on the parameter gradient of 'a')
    tr = ann.Trainer(
        _actor_on_b(actor), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
        dtype="float64", check_finite=True,
    )  # fmt: skip
    with pytest.raises(ann.ActorError, match=rf"actor 'b' produced NaN or Inf in its {kind}"):
        tr.fit(_data(), batch_size=16)


class PassesOn(ann.LayerActor):
    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        return await super().on_forward(key, inputs, meta)

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        return await super().on_backward(key, grad, meta)


@pytest.mark.parametrize("actor", [None, PassesOn], ids=["plain", "custom"])
def test_check_finite_checks_each_value_once(monkeypatch, actor):
    # (a check waits for the device: a custom hook's result is checked where it is sent, and
    # the default hook it called then checks nothing, as a plain layer's checks once)
    from asyncnn._runtime._run_actors import RunActors

    seen: list[tuple[str, str]] = []
    check = RunActors.check_finite

    def counted(self: Any, name: str, kind: str, key: int, value: Any) -> None:
        seen.append((name, kind))
        check(self, name, kind, key, value)

    monkeypatch.setattr(RunActors, "check_finite", counted)
    tr = ann.Trainer(
        _actor_on_b(actor or ann.LayerActor), optimizer=optim.SGD(lr=0.1),
        policy=policies.GPipe(2), dtype="float64", check_finite=True,
    )  # fmt: skip
    tr.fit(_data(16), batch_size=16)  # one minibatch of 2 keys
    for name in ("a", "b"):
        assert seen.count((name, "forward")) == 2 and seen.count((name, "backward")) == 2


def test_an_integer_output_where_the_module_gives_integers_passes():
    # (the refusal of an integer output is for a module whose own output is floating)
    g = ann.Graph()
    ids = g.input("ids", (None, 4), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("b", nn.Identity(), ids, actor=PassesOn)
    h = g.layer("c", nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(8, 3)), h)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    data = {"ids": np.arange(64).reshape(16, 4) % 5, "y": np.arange(16) % 3}
    tr.fit(data, batch_size=16)
    assert tr.versions["c"] == 1


class SetupFails(ann.LayerActor):
    def setup(self, path: str = "") -> None:
        raise ValueError(f"no such table: {path!r}")


class SetupTypeFails(ann.LayerActor):
    def setup(self, sizes: Any = 3) -> None:
        self.n = len(sizes)  # (a TypeError of the user's own code, not of the call)


class SetupReturnsAwaitable(ann.LayerActor):
    def setup(self) -> Any:
        async def later() -> None:
            pass

        return later()


class LoadFails(ann.LayerActor):
    def actor_state(self) -> Any:
        return {"seen": 0}

    def load_actor_state(self, state: Any) -> None:
        raise KeyError("count")  # a state of an older version of the class


@pytest.mark.parametrize(
    ("actor", "args", "hook", "match"),
    [
        (SetupFails, {"path": "t.npy"}, "setup",
         r"actor 'b' failed in SetupFails.setup: ValueError: no such table: 't.npy'"),
        (SetupTypeFails, {"sizes": 3}, "setup",
         r"actor 'b' failed in SetupTypeFails.setup: TypeError: object of type 'int' has no len"),
        (LoadFails, {}, "load_actor_state",
         r"actor 'b' failed in LoadFails.load_actor_state: KeyError: 'count'"),
    ],
    ids=["setup", "setup-typeerror", "load"],
)  # fmt: skip
def test_a_setup_or_state_load_that_raises_names_the_layer(actor, args, hook, match):
    # (the error came out bare, naming no layer: "ValueError: no such table", "KeyError: 'count'")
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("b", nn.Linear(6, 3), x, actor=actor, actor_args=args)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    tr.state.actor_states["b"] = {"seen": 1}
    with pytest.raises(ann.ActorError, match=match) as info:
        tr.fit(_data(), batch_size=16)
    assert (info.value.actor, info.value.kind, info.value.key) == ("b", hook, None)
    causes = {"setup": (ValueError, TypeError), "load_actor_state": (KeyError,)}
    assert type(info.value.__cause__) in causes[hook]


@pytest.mark.parametrize(
    ("actor", "args", "state", "hook", "said"),
    [
        (SetupFails, {"path": "t.npy"}, None, "setup",
         "actor 'b' failed in SetupFails.setup: ValueError: no such table: 't.npy'"),
        (LoadFails, {}, {"seen": 1}, "load_actor_state",
         "actor 'b' failed in LoadFails.load_actor_state: KeyError: 'count'"),
        # asyncnn's own refusals, which name the layer
        (ann.LayerActor, {}, {"seen": 1}, "load_actor_state",
         "layer 'b': LayerActor was given actor state but keeps none"),
        (SetupReturnsAwaitable, {}, None, "setup",
         "layer 'b': SetupReturnsAwaitable.setup returned an awaitable"),
    ],
    ids=["setup", "load", "load-stateless", "setup-awaitable"],
)  # fmt: skip
def test_a_failed_setup_or_state_load_is_recorded_in_the_trace(
    tmp_path, actor, args, state, hook, said
):
    # (the trace of such a run held no event at all: its summary showed no error, nothing said
    # why the run had done nothing)
    path = str(tmp_path / "setup.trace")
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(6, 4), x)
    h = g.layer("b", nn.Linear(4, 3), h, actor=actor, actor_args=args)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64", trace=path
    )
    if state is not None:
        tr.state.actor_states["b"] = state
    with pytest.raises(Exception, match=re.escape(said)):
        tr.fit(_data(), batch_size=16)
    errors = [e for e in ann.trace.read(path).events if e.what == "error"]
    assert [(e.actor, e.kind, e.key) for e in errors] == [("b", hook, -1)]
    assert said in errors[0].meta["error"]
    summary = ann.trace.summary(path)
    assert len(summary["errors"]) == 1 and said in summary["errors"][0]


def _setup_fails_on_b(worker: int | None = None) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(6, 4), x)
    h = g.layer(
        "b", nn.Linear(4, 3), h, actor=SetupFails, actor_args={"path": "t.npy"}, worker=worker
    )
    g.loss("loss", nn.CrossEntropyLoss(), h, y, worker=worker)
    return g


@pytest.mark.anyio
async def test_a_failed_setup_of_an_open_run_is_recorded_in_its_trace(tmp_path):
    path = str(tmp_path / "setup.trace")
    g = _setup_fails_on_b()
    with pytest.raises(ann.ActorError, match="SetupFails.setup: ValueError") as info:
        async with ann.open_run(g, optim.SGD(lr=0.1), policies.Sync(), trace=path):
            pass
    assert (info.value.actor, info.value.kind) == ("b", "setup")
    (error,) = [e for e in ann.trace.read(path).events if e.what == "error"]
    assert (error.actor, error.kind, error.meta["error"]) == ("b", "setup", str(info.value))


def test_a_failed_setup_on_a_worker_is_recorded_once(tmp_path):
    # the driver's trace records a worker's error: the worker's part must not record it again
    path = str(tmp_path / "setup.trace")
    g = _setup_fails_on_b(worker=0)
    with ann.cluster.LocalCluster(workers=1) as cluster:
        tr = ann.Trainer(
            g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=path, cluster=cluster
        )
        with pytest.raises(ann.ActorError, match="SetupFails.setup: ValueError"):
            tr.fit(_data(), batch_size=16)
    errors = [e for e in ann.trace.read(path).events if e.what == "error"]
    assert [(e.actor, e.kind) for e in errors] == [("b", "setup")]


class StateFails(ann.LayerActor):
    """Its ``actor_state`` raises once it has done ``after`` backwards (0: always)."""

    def setup(self, after: int = 0) -> None:
        self.fails_after = after
        self.backwards_done = 0

    def actor_state(self) -> Any:
        if self.backwards_done >= self.fails_after:
            raise KeyError("state broke")
        return {"backwards": self.backwards_done}

    def load_actor_state(self, state: Any) -> None:
        self.backwards_done = int(state["backwards"])

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> Any:
        self.backwards_done += 1
        return await super().on_backward(key, grad, meta)


_STATE_FAILS = r"actor 'b' failed in StateFails.actor_state: KeyError: 'state broke'"


@pytest.mark.anyio
async def test_an_actor_state_that_raises_names_the_layer():
    # (run.state() raised the bare KeyError, naming no layer or hook)
    async with ann.open_run(_actor_on_b(StateFails), optim.SGD(lr=0.1), policies.Sync()) as run:
        await run.step(_data(16))
        await run.drain()
        with pytest.raises(ann.ActorError, match=_STATE_FAILS) as info:
            run.state()
        await run.step(_data(16))  # (the run itself goes on: only the read failed)
    assert (info.value.actor, info.value.kind, info.value.key) == ("b", "actor_state", None)
    assert isinstance(info.value.__cause__, KeyError)


def _state_fails_on_b(after: int) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Sequential(nn.Linear(6, 8), nn.Tanh()), x)
    h = g.layer("b", nn.Linear(8, 3), h, actor=StateFails, actor_args={"after": after})
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


@pytest.mark.parametrize(
    ("policy", "after", "kept"),
    [
        # read at the end of the fit (nothing reads it before): all 4 minibatches are kept
        (policies.Async(max_active_keys=3), 0, 4),
        # read at each step point: the first minibatch, before the second step, is kept
        (policies.Sync(), 0, 1),
        # read by the fit's own on_loss at each loss once b has done a backward: nothing of
        # this fit is seen at every layer after the same minibatches
        (policies.PipeDream2BW(2), 1, 0),
    ],
    ids=["async-at-the-end", "sync-at-a-step", "2bw-in-on-loss"],
)
def test_a_fit_whose_actor_state_raises_names_the_layer_keeps_what_it_trained_and_traces_it(
    tmp_path, policy, after, kept
):
    # (the fit raised the bare KeyError, the trainer kept nothing of a fit that trained to its
    # end, and the trace read as a clean run)
    path = str(tmp_path / "sf.trace")
    tr = ann.Trainer(
        _state_fails_on_b(after), optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64",
        trace=path,
    )  # fmt: skip
    with pytest.raises(ann.ActorError, match=_STATE_FAILS) as info:
        tr.fit(_data(), batch_size=8)
    assert (info.value.actor, info.value.kind, info.value.key) == ("b", "actor_state", None)
    assert isinstance(info.value.__cause__, KeyError)
    # what a failed fit keeps: the weights and history of what it trained, b's own state not
    assert tr.state.minibatches == kept == len(tr.history.losses)
    assert "b" not in tr.state.actor_states
    if kept:
        reference = ann.Trainer(
            _actor_on_b(ann.LayerActor), optimizer=optim.SGD(lr=0.1), policy=policy,
            dtype="float64",
        )  # fmt: skip
        reference.fit({k: v[: 8 * kept] for k, v in _data().items()}, batch_size=8)
        assert tr.versions == reference.versions
        assert (tr.epochs_done, tr.epoch_batches) == (
            (reference.epochs_done, reference.epoch_batches) if kept == 4 else (0, kept)
        )
    notes = getattr(info.value, "__notes__", [])
    assert any("layer 'b'" in n and "not kept" in n for n in notes), notes
    # the trace says the run failed there, as for an actor's other errors
    errors = [e for e in ann.trace.read(path).events if e.what == "error"]
    assert [(e.actor, e.kind, e.key) for e in errors] == [("b", "actor_state", -1)]
    assert "StateFails.actor_state: KeyError" in errors[0].meta["error"]


class KeepsEvents(ann.LayerActor):
    def setup(self) -> None:
        self.events = []  # the runtime's own list of what the actor waits on


class KeepsAcc(ann.LayerActor):
    def setup(self) -> None:
        self.acc = 0.0  # the runtime's gradient sum, a property with a setter


class KeepsItsOwn(ann.LayerActor):
    def setup(self) -> None:
        self.my_events: list[int] = []
        self._acc_total = 0.0


@pytest.mark.parametrize(
    ("actor", "named"), [(KeepsEvents, "self.events"), (KeepsAcc, "self.acc")], ids=str
)
def test_a_setup_that_rebinds_what_the_runtime_keeps_on_the_actor_is_refused(actor, named):
    # self.acc = 0.0 failed the first backward with "tree_map: structures differ: * and
    # [{'bias': *, 'weight': *}, {}]", naming neither the attribute nor the setup
    g = ann.Graph()
    x = g.input("x", (None, 6))
    y = g.input("y", (None,), dtype="int64")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(6, 3), x, actor=actor), y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    with pytest.raises(ann.GraphError) as info:
        tr.fit(_data(), batch_size=16)
    said = str(info.value)
    assert said.startswith(f"layer 'b': {actor.__name__}.setup set {named}, which the runtime")
    assert "a name of its own" in said
    # names the actor's own are its own
    g2 = ann.Graph()
    x = g2.input("x", (None, 6))
    y = g2.input("y", (None,), dtype="int64")
    g2.loss("loss", nn.CrossEntropyLoss(), g2.layer("b", nn.Linear(6, 3), x, actor=KeepsItsOwn), y)
    ann.Trainer(g2, optimizer=optim.SGD(lr=0.1), policy=policies.Sync()).fit(_data(), batch_size=16)


class BackwardWhole(ann.LayerActor):
    async def on_backward(self, msg: Any) -> None:
        await super().on_backward(msg)


def test_the_runtimes_refusal_of_an_actor_as_it_is_made_is_recorded_in_the_trace(tmp_path):
    # (an on_backward without the halves of ZeroBubbleH1's split backward is refused as the
    # actor is made, before its setup: the trace held no event of it)
    path = str(tmp_path / "made.trace")
    tr = ann.Trainer(
        _actor_on_b(BackwardWhole), optimizer=optim.SGD(lr=0.1),
        policy=policies.ZeroBubbleH1(2), trace=path,
    )  # fmt: skip
    with pytest.raises(TypeError, match="BackwardWhole overrides on_backward only") as info:
        tr.fit(_data(), batch_size=16)
    errors = [e for e in ann.trace.read(path).events if e.what == "error"]
    assert [(e.actor, e.kind, e.key) for e in errors] == [("b", "setup", -1)]
    assert errors[0].meta["error"] == str(info.value)
    assert ann.trace.summary(path)["errors"]
