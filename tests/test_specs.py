"""A graph's spec checks (``asyncnn/_runtime/_specs.py``): what a custom actor's ``actor_args``
may hold, and the form ``setup`` gets them in wherever the graph is built."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

pytestmark = pytest.mark.timeout(120)


class _Sizes(ann.LayerActor):
    """Notes what ``setup`` got, each time it runs (in this process)."""

    got: list[Any] = []

    def setup(self, sizes: Any = (1, 2), nested: Any = None) -> None:
        type(self).got.append((sizes, nested))


def _graph(args: dict[str, Any]) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, 4))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(4, 3), x, actor=_Sizes, actor_args=args)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(16, 4)), "y": rng.integers(0, 3, size=16)}


def test_tuples_in_actor_args_reach_setup_as_lists_wherever_the_graph_is_built(tmp_path):
    # (setup got a tuple in the process that built the graph, a list after Trainer.load, on a
    # cluster's workers and in a replay: `sizes + (1,)` worked in one and failed in the others)
    given = {"sizes": (3, 4), "nested": {"pairs": [(1, 2), (3, (4, 5))]}}
    as_lists = {"sizes": [3, 4], "nested": {"pairs": [[1, 2], [3, [4, 5]]]}}
    g = _graph(given)
    assert g.nodes["a"].actor_args == as_lists
    assert type(g.nodes["a"].actor_args["sizes"]) is list
    assert ann.Graph.from_spec(g.to_spec()).nodes["a"].actor_args == as_lists
    _Sizes.got = []
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), trace=None)
    tr.fit(_data(), batch_size=8)
    tr.save(str(tmp_path / "c"))
    ann.Trainer.load(str(tmp_path / "c")).fit(_data(), batch_size=8)
    assert len(_Sizes.got) == 2
    for sizes, nested in _Sizes.got:  # the same values, of the same types, both times
        assert type(sizes) is list and sizes == [3, 4]
        assert nested == as_lists["nested"] and type(nested["pairs"][1][1]) is list
    # a copy: what the caller changes later is not the graph's
    mine = {"sizes": [3, 4]}
    g = _graph(mine)
    mine["sizes"].append(5)
    assert g.nodes["a"].actor_args == {"sizes": [3, 4]}


def test_a_tuple_of_values_no_spec_carries_is_still_refused():
    with pytest.raises(ann.GraphError, match=r"layer 'a': actor_args \['sizes'\] hold values"):
        _graph({"sizes": (3, np.ones(2))})
