"""``_state``: a run's fresh state, and the parameters a layer's module draws for it, refused
with the layer, the module and the fix named where the optimizer could not take them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies


@dataclass(frozen=True)
class PyFloatParam(nn.Module):
    """A learnable temperature drawn as a Python float, not an array."""

    def init_params(self, init: Any) -> Any:
        return {"alpha": 0.5}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x * params["alpha"]


@dataclass(frozen=True)
class IntParam(nn.Module):
    """A parameter drawn as an integer array: no optimizer can update it."""

    def init_params(self, init: Any) -> Any:
        return {"count": np.zeros(3, dtype=np.int64)}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x


def _graph(module: nn.Module) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 3))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("temperature", module, g.layer("enc", nn.Linear(3, 3), x))
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(3, 2), h), y)
    return g


def test_a_parameter_that_is_no_array_names_the_layer_the_module_and_the_fix() -> None:
    # (it was "Adam.init: parameter leaf 0 of {'alpha': *} is float, not an array", from
    # Trainer(...), naming neither)
    with pytest.raises(TypeError) as e:
        ann.Trainer(_graph(PyFloatParam()), optimizer=optim.Adam(lr=0.1), policy=policies.Sync())
    msg = str(e.value)
    assert "layer 'temperature'" in msg and "PyFloatParam.init_params" in msg
    assert "params['alpha'] is a float (0.5), not an array" in msg
    assert "init.asarray(0.5)" in msg


def test_in_a_chain_the_module_at_its_place_is_named() -> None:
    graph = ann.Graph.sequential(
        [nn.Linear(3, 3), PyFloatParam(), nn.Linear(3, 2)], loss=nn.CrossEntropyLoss(),
        stages=1, input_shape=(None, 3),
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"layer 'stage0': params\[1\]\['alpha'\] is a float") as e:
        ann.Trainer(graph, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    assert "PyFloatParam.init_params" in str(e.value)


def test_the_optimizers_refusal_of_a_parameter_names_the_layer() -> None:
    with pytest.raises(TypeError) as e:
        ann.Trainer(_graph(IntParam()), optimizer=optim.Adam(lr=0.1), policy=policies.Sync())
    msg = str(e.value)
    assert msg.startswith("layer 'temperature' (IntParam()): ") and "is int64" in msg
    assert "IntParam.init_params" in msg
