"""Graph specs: a round trip keeps every node option, and a spec that is damaged, names a module
nobody trusts, or cannot be written is an error naming the node and the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn

from _graph_cases import Add, _base


def test_spec_round_trip():
    g = ann.Graph.sequential(
        [nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=2,
        input_shape=(None, 4),
    )
    import msgpack

    spec = msgpack.unpackb(msgpack.packb(g.to_spec()))
    g2 = ann.Graph.from_spec(spec)
    assert g2.to_spec() == g.to_spec()


def test_a_spec_with_two_nodes_of_one_name_says_so_not_a_cycle():
    g = ann.Graph.sequential([nn.Linear(4, 8), nn.Linear(8, 3)], nn.CrossEntropyLoss(), stages=2)
    spec = g.to_spec()
    again = dict(spec, nodes=spec["nodes"] + [dict(spec["nodes"][2])])  # stage0 twice
    with pytest.raises(ann.GraphError, match=r"nodes 2 and 5 are both named 'stage0'"):
        ann.Graph.from_spec(again)
    renamed = dict(spec, nodes=[dict(e) for e in spec["nodes"]])
    renamed["nodes"][3]["name"] = "stage0"  # stage1 renamed: it reads a node of its own name
    with pytest.raises(ann.GraphError, match=r"nodes 2 and 3 are both named 'stage0'"):
        ann.Graph.from_spec(renamed)


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ([], "expected a dict with a list of 'nodes'"),
        ({"nodes": "x"}, "expected a dict with a list of 'nodes'"),
        ({"nodes": [1]}, "node 0 is 1, not a dict"),
        (
            {"nodes": [{"kind": "input", "name": "x", "shape": [None, 2], "dtype": "float32"},
                       {"kind": "layer", "name": "l", "inputs": "x", "module": {}}]},
            "node 'l' has inputs 'x'; expected a list of node names",
        ),
        ({"nodes": [], "outputs": []}, "outputs \\[\\]; expected a dict"),
    ],
    ids=["not-a-dict", "nodes-not-a-list", "node-not-a-dict", "inputs-a-string", "outputs-a-list"],
)  # fmt: skip
def test_a_damaged_spec_is_a_graph_error_naming_what(spec, said):
    # (a string of inputs was split into one-letter node names; the others raised TypeError)
    with pytest.raises(ann.GraphError, match=said):
        ann.Graph.from_spec(spec)


class Scaled(ann.LayerActor):
    """A custom actor with a setup argument (for the spec round trip)."""

    def setup(self, scale: float = 1.0, tags: Any = None) -> None:
        self.scale = scale


def _full_graph() -> ann.Graph:
    g, x, y = _base()
    h = g.layer("a", nn.Linear(4, 3), x, worker=1, actor=Scaled,
                actor_args={"scale": 2.0, "tags": ["t", {"k": 1}]})  # fmt: skip
    h2 = g.layer("b", nn.Linear(3, 3), h, device="cpu", stop_gradient=True)
    g.loss("loss", nn.CrossEntropyLoss(), h, y, worker=0)
    g.loss("loss2", nn.CrossEntropyLoss(), h2, y)
    g.output("logits", h)
    return g


def test_a_spec_round_trip_keeps_every_node_option():
    import msgpack

    g = _full_graph()
    spec = msgpack.unpackb(msgpack.packb(g.to_spec()))
    again = ann.Graph.from_spec(spec)
    assert again.to_spec() == g.to_spec() and again.outputs == g.outputs
    for name, node in g.nodes.items():
        other = again.nodes[name]
        for field in ("kind", "module", "inputs", "shape", "dtype", "device", "worker",
                      "custom_actor", "actor_args", "stop_gradient", "consumers"):  # fmt: skip
            assert getattr(other, field) == getattr(node, field), (name, field)
    chain = ann.Graph.sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)],
                                 nn.CrossEntropyLoss(), stages=2, workers=[0, 1])  # fmt: skip
    again = ann.Graph.from_spec(chain.to_spec())
    assert [again.nodes[n].init_offset for n in again.layers] == [0, 1]
    assert [again.nodes[n].worker for n in again.layers] == [0, 1]


def _loop_graph() -> ann.Graph:
    g = ann.Graph()
    h0 = g.input("h0", shape=(None, 3))
    xs = g.input("xs", shape=(None, 4, 3))
    n = g.input("n", shape=(None,), dtype="int64")
    h = g.loop("cell", Add(), h0, xs, n)  # h <- h + x_t
    g.output("h", g.layer("head", nn.Linear(3, 2), h))
    return g


@pytest.mark.parametrize("mark", ["written", "absent", "false"])
def test_a_loop_is_recurrent_after_a_spec_round_trip_with_or_without_the_mark(mark):
    # (a spec without "recurrent", as older ones, rebuilt the loop unmarked: its next spec
    # differed from the one it was read from)
    import msgpack

    spec = msgpack.unpackb(msgpack.packb(_loop_graph().to_spec()))
    assert _entry(spec, "cell")["recurrent"] is True
    if mark == "absent":
        del _entry(spec, "cell")["recurrent"]
    elif mark == "false":
        _entry(spec, "cell")["recurrent"] = False
    again = ann.Graph.from_spec(spec)
    assert again.nodes["cell"].recurrent and not again.nodes["head"].recurrent
    assert again.to_spec() == _loop_graph().to_spec()
    assert ann.Graph.from_spec(again.to_spec()).nodes["cell"].recurrent


def _entry(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in spec["nodes"] if e.get("name") == name)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda s: _entry(s, "b").__setitem__("stop_gradiant", True),
         r"layer 'b' has the unknown field 'stop_gradiant'; a layer node has 'name'"),
        (lambda s: s.__setitem__("extra", 1), r"unknown field 'extra'; a graph spec has 'nodes'"),
        (lambda s: _entry(s, "b").__setitem__("stop_gradient", "false"),
         r"layer 'b' has stop_gradient 'false' \(a str\); expected true or false"),
        (lambda s: _entry(s, "a").__setitem__("worker", "1"),
         r"layer 'a' has worker '1' \(a str\); expected an int >= 0 or None"),
        (lambda s: _entry(s, "loss").__setitem__("worker", -1), r"loss 'loss' has worker -1"),
        (lambda s: _entry(s, "loss").__setitem__("device", "cpu"),
         r"loss 'loss' has the unknown field 'device'"),
        (lambda s: _entry(s, "x").__setitem__("shape", 4), r"input 'x' has shape 4 \(a int\)"),
        (lambda s: _entry(s, "x").__setitem__("dtype", None), r"input 'x' has dtype None"),
        (lambda s: _entry(s, "x").__setitem__("inputs", ["y"]), r"input 'x' has inputs \['y'\]"),
        (lambda s: _entry(s, "a").__setitem__("actor", 3), r"layer 'a' has actor 3 \(a int\)"),
        (lambda s: _entry(s, "a").__setitem__("actor", "collections:OrderedDict"),
         r"layer 'a': 'collections:OrderedDict' is not a LayerActor subclass"),
        (lambda s: _entry(s, "a").pop("module"), r"layer 'a' is missing the field 'module'"),
        (lambda s: _entry(s, "a").pop("name"), r"node 2 is missing the field 'name'"),
        (lambda s: _entry(s, "a").__setitem__("module", {"type": "Linear", "args": {"bias": 1}}),
         r"layer 'a' has a module that cannot be rebuilt: .*in_features"),
        (lambda s: s.__setitem__("outputs", {"logits": 3}), r"output 'logits': 3; expected a nam"),
    ],
    ids=["typo", "top-level-extra", "bool-as-str", "worker-str", "loss-worker-negative",
         "field-of-another-kind", "shape-int", "dtype-None", "input-reads", "actor-int",
         "actor-not-an-actor", "no-module", "no-name", "module-args", "output-not-a-name"],
)  # fmt: skip
def test_a_spec_field_missing_unknown_or_mistyped_is_named(damage, said):
    # (a typo's field was dropped without a word, "false" read as True, a worker "1" or a
    # shape 4 taken or a TypeError, a missing field or a module's bad args named no node)
    import copy

    spec = copy.deepcopy(_full_graph().to_spec())
    damage(spec)
    with pytest.raises(ann.GraphError, match=said):
        ann.Graph.from_spec(spec)


def test_a_spec_naming_an_untrusted_module_is_refused_without_importing_it(tmp_path, monkeypatch):
    import sys

    from asyncnn._math._imports import UntrustedModuleError, untrusted_cause

    (tmp_path / "graphmod_untrusted.py").write_text(
        "import pathlib\npathlib.Path('ran').touch()\nfrom asyncnn import nn\nLayer = nn.Linear\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    spec = _full_graph().to_spec()
    _entry(spec, "b")["module"] = {"type": "graphmod_untrusted:Layer", "args": {}}
    with pytest.raises(ann.GraphError, match="layer 'b' has a module that cannot be rebuilt: "
                       ".*pass trusted_modules=") as info:  # fmt: skip
        ann.Graph.from_spec(spec)
    assert isinstance(untrusted_cause(info.value), UntrustedModuleError)
    _entry(spec, "b")["module"] = nn.to_spec(nn.Linear(3, 3))
    _entry(spec, "a")["actor"] = "graphmod_untrusted:Actor"
    with pytest.raises(UntrustedModuleError, match="graphmod_untrusted"):
        ann.Graph.from_spec(spec)
    assert "graphmod_untrusted" not in sys.modules and not (tmp_path / "ran").exists()


@dataclass(frozen=True)
class Holding(nn.Module):
    """A module holding any value (an array cannot be in a spec)."""

    factor: Any = None

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x


def test_a_node_that_cannot_be_in_a_spec_is_named():
    def local_actor() -> type:
        class Local(ann.LayerActor):
            pass

        return Local

    g, x, y = _base()
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("held", Holding(np.ones(3)), x), y)
    with pytest.raises(TypeError, match=r"layer 'held': its module cannot be in a spec: .*ndarr"):
        g.to_spec()
    g, x, y = _base()
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("a", nn.Linear(4, 3), x, actor=local_actor()), y)
    with pytest.raises(ValueError, match=r"layer 'a': its actor cannot be in a spec: .*<locals>"):
        g.to_spec()
