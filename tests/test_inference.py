"""What ``Trainer.predict`` and ``Trainer.evaluate`` hold while they run (asyncnn/_inference.py,
asyncnn/_runtime/_forward.py): a batch's activations go as soon as the nodes that read them have
run, so a deep graph holds a few at a time, not all of them; the results are the same bits."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._runtime._forward import forward_pass

# the outputs the watched layers gave, and, at each call, how many of them were still alive
_OUTPUTS: list[weakref.ref[Any]] = []
_ALIVE: list[int] = []


@dataclasses.dataclass(frozen=True)
class _Watched(nn.Module):
    """Tanh that keeps a weak reference to each output, and counts, when called, how many of
    the outputs given before are still alive."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        _ALIVE.append(sum(ref() is not None for ref in _OUTPUTS))
        out = ops.tanh(x)
        _OUTPUTS.append(weakref.ref(out))
        return out


def _deep(depth: int = 8, width: int = 4) -> ann.Trainer:
    """A chain of ``depth`` nodes, each one ``_Watched`` layer, ending in a Linear to 3 logits."""
    modules: list[nn.Module] = [_Watched() for _ in range(depth)] + [nn.Linear(width, 3)]
    graph = ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=[1] * len(modules), input_shape=(None, width)
    )
    return ann.Trainer(
        graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64", seed=0
    )


def _data(n: int = 10, width: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, width)), "y": rng.integers(0, 3, n)}


def _watch() -> None:
    _OUTPUTS.clear()
    _ALIVE.clear()


@pytest.mark.parametrize("call", ["predict", "evaluate"])
def test_a_layer_runs_with_only_its_input_alive_not_every_activation_before_it(call: str) -> None:
    tr, data = _deep(), _data()
    _watch()
    if call == "predict":
        tr.predict({"x": data["x"]}, batch_size=10)
    else:
        tr.evaluate(data, batch_size=10)
    # one batch, 8 watched layers: each finds alive only the output it reads (the one before),
    # where the pass used to hold them all (0, 1, 2, ..., 7)
    assert _ALIVE == [0] + [1] * 7


def test_forward_pass_keeps_what_it_is_asked_for_and_releases_the_rest() -> None:
    tr, data = _deep(), _data()
    graph, params = tr.graph, tr.params
    everything = forward_pass(graph, params, {"x": data["x"]}, "float64")
    _watch()
    (out,) = graph.outputs.values()
    kept = forward_pass(graph, params, {"x": data["x"]}, "float64", keep={out})
    assert set(kept) == {out}
    assert all(ref() is None for ref in _OUTPUTS)  # every intermediate gone once the pass is
    # the same bits as the pass that keeps every node's output (the default, as before)
    assert set(everything) == set(graph.nodes) - set(graph.losses) - {"y"}
    assert kept[out].tobytes() == everything[out].tobytes()
    # a loss and the logits it reads, kept for evaluate, are those of the full pass
    (loss,) = graph.losses
    logits = graph.nodes[loss].inputs[0]
    full = forward_pass(graph, params, data, "float64", losses=True)
    some = forward_pass(graph, params, data, "float64", losses=True, keep={loss, logits})
    assert set(some) == {loss, logits}
    assert all(some[k].tobytes() == full[k].tobytes() for k in some)


def test_predict_and_evaluate_give_the_bits_of_the_full_pass() -> None:
    tr, data = _deep(), _data(n=25)
    graph, params = tr.graph, tr.params
    (name, out), (loss,) = next(iter(graph.outputs.items())), graph.losses
    full = forward_pass(graph, params, data, "float64", losses=True)
    predicted = tr.predict({"x": data["x"]}, batch_size=25)[name]
    assert predicted.tobytes() == np.asarray(full[out]).tobytes()
    result = tr.evaluate(data, batch_size=25)
    assert result["loss"] == float(full[loss])
    assert result["accuracy"] == float((full[out].argmax(axis=1) == data["y"]).mean())
