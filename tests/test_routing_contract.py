"""Routing's contract at its seams: the route tensor a merge accepts (a custom router's too), the
dtype of the gate weights (the run's, whatever the gate scores in), and gates that score with
infinities or in bfloat16. (The rest of routing is in ``test_routing*.py``.)"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._math._pytree import tree_leaves
from asyncnn.dynamic import Router, RouterActor

from _reference import assert_params_equal
from _routing_cases import NanFromRow2

D, H, C, V = 5, 4, 3, 7

BF16 = pytest.param(
    "bfloat16",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("ml_dtypes") is None, reason="bfloat16 needs ml_dtypes"
    ),
)


def _data(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, D)), "y": rng.integers(0, C, n)}


@dataclass(frozen=True)
class ParityGate(nn.Module):
    """Scores integer ids by their parity, weighted by ``id % 3`` (no parameters), as
    ``dtype``: integers, or floats of some dtype."""

    dtype: str

    def init_params(self, init):
        return {}

    def __call__(self, params, tok, *, rng=None):
        t = np.asarray(ops.raw(tok))
        odd = (t % 2)[:, None] == np.arange(2)
        return (odd * (1 + t[:, None] % 3)).astype(self.dtype)


def _ids_graph(scores: str) -> ann.Graph:
    g = ann.Graph()
    tok = g.input("tok", (None,), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", ParityGate(scores), tok, experts=2, k=1)
    outs = [g.layer(f"e{i}", nn.Embedding(V, H), r) for i in range(2)]
    o = g.layer("head", nn.Linear(H, C), g.merge("m", r, *outs))
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    g.output("logits", o)
    return g


@pytest.mark.parametrize("dtype", ["float32", BF16])
def test_a_parameterless_gate_on_integer_ids_weighs_in_the_runs_dtype(tmp_path, dtype):
    # the router could not see the run's dtype: with integer ids and no parameters it weighed
    # in float64, and the merge sent its experts float64 gradients in a float32 run
    rng = np.random.default_rng(0)
    data = {"tok": rng.integers(0, V, 12), "y": rng.integers(0, C, 12)}
    runs = {}
    for scores in ("int64", "float64", dtype):  # the last: scores already in the run's dtype
        # (a trace cannot hold bfloat16 tensors yet: there the bit-for-bit match below tells)
        path = None if dtype == "bfloat16" else str(tmp_path / f"{scores}.trace")
        tr = ann.Trainer(_ids_graph(scores), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                         dtype=dtype, trace=path)  # fmt: skip
        hist = tr.fit(data, batch_size=6)
        if path is not None:
            sent = {(e.actor, e.kind, np.dtype(t["d"]).name) for e in ann.trace.read(path).events
                    if e.what == "send" for t in e.tensors if t is not None}  # fmt: skip
            floats = {s for s in sent if s[2] != "int64"}
            assert {s for s in floats if s[2] != dtype} == set(), scores
            assert ("gate", "forward", dtype) in floats
        assert {str(a.dtype) for a in tree_leaves(tr.params)} == {dtype}
        logits = tr.predict({"tok": data["tok"]})["logits"]
        assert logits.dtype == np.dtype(dtype)
        runs[scores] = (tr.params, hist.losses, logits)
    # integer scores weigh as those numbers in the run's dtype: bit for bit
    assert_params_equal(runs["int64"][0], runs[dtype][0])
    assert runs["int64"][1] == runs[dtype][1]
    np.testing.assert_array_equal(runs["int64"][2], runs[dtype][2])


class RouteRewriter(RouterActor):
    """A custom router that changes the route (and weights) it sends its merge by ``mode``."""

    def setup(self, mode: str = "same") -> None:
        self.mode = mode

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        out = await super().on_forward(key, inputs, meta)
        return [t if len(t) == 1 else self._rewrite(*t) for t in out]

    def _rewrite(self, w: Any, r: Any) -> tuple[Any, ...]:
        mode = self.mode
        if mode == "no route":
            return (w,)
        if mode == "float route":
            r = r.astype(np.float64)
        elif mode == "one column":
            w, r = w[:, 0], r[:, 0]
        elif mode == "k=1":
            w, r = w[:, :1], r[:, :1]
        elif mode == "rows":
            w, r = w[:-1], r[:-1]
        elif mode == "weights shape":
            w = w[:, :1]
        elif mode == "int weights":
            w = (w > 0).astype(np.int64)
        elif mode == "float32 weights":
            w = w.astype(np.float32)
        elif mode in ("expert 7", "expert -3", "twice"):
            r = r.copy()
            if mode == "twice":
                r[:, 1] = r[:, 0]
            else:
                r[1, 0] = int(mode.split()[1])
        return (w, r)


def _custom_router_graph(mode: str | None) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    router = Router(nn.Linear(D, 3), 3, k=2)
    if mode is None:
        r = g.layer("gate", router, x)
    else:
        r = g.layer("gate", router, x, actor=RouteRewriter, actor_args={"mode": mode})
    outs = [g.layer(f"e{i}", nn.Sequential(nn.Linear(D, H), nn.Tanh()), r) for i in range(3)]
    o = g.layer("head", nn.Linear(H, C), g.merge("merge", r, *outs))
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    return g


SHAPE = (
    r"a route of shape \({}\) and dtype {} with weights of shape \({}\) and dtype {} "
    r"\(the key has 12 rows\)"
)
#: what the merge says it got, per RouteRewriter mode
BAD_ROUTES = {
    "no route": r"no route \(only the weights\)",
    "float route": SHAPE.format("12, 2", "float64", "12, 2", "float64"),
    "one column": SHAPE.format("12,", "int64", "12,", "float64"),
    "k=1": SHAPE.format("12, 1", "int64", "12, 1", "float64"),
    "rows": SHAPE.format("11, 2", "int64", "11, 2", "float64"),
    "weights shape": SHAPE.format("12, 2", "int64", "12, 1", "float64"),
    "int weights": SHAPE.format("12, 2", "int64", "12, 2", "int64"),
    "float32 weights": r"gate weights of dtype float32 in a float64 run \(cast them: "
    r"weights\.astype\(.float64.\)\)",
    "expert 7": r"a route with expert index 7 \(row 1, column 0\) for its 3 experts",
    "expert -3": r"a route with expert index -3 \(row 1, column 0\) for its 3 experts",
    "twice": r"a route that sends row 0 to the same expert twice \(\[\d, \d\]\)",
}


@pytest.mark.parametrize("mode", list(BAD_ROUTES))
def test_the_merge_refuses_a_custom_routers_bad_route_naming_the_router(mode):
    # the merge took any route: a wrong shape failed deep inside ("not enough values to
    # unpack", a KeyError for a missing route), an expert index out of range or an expert twice
    # in a row blamed an expert for returning the wrong number of rows (or, where a router sent
    # its rows by that route, lost them or summed them once), a float route went through
    tr = ann.Trainer(_custom_router_graph(mode), optimizer=optim.SGD(lr=0.1),
                     policy=policies.Sync(), dtype="float64")  # fmt: skip
    said = rf"merge 'merge': for key 0, router 'gate' sent {BAD_ROUTES[mode]}; the merge needs "
    with pytest.raises(
        ann.ActorError, match=said + r".* of int64 expert indices in \[0, 3\)"
    ) as info:
        tr.fit(_data(), batch_size=12)
    assert (info.value.actor, info.value.kind, info.value.key) == ("merge", "forward", 0)


def test_a_custom_router_that_keeps_the_route_trains_as_the_built_in_one():
    runs = []
    for mode in (None, "same"):
        tr = ann.Trainer(_custom_router_graph(mode), optimizer=optim.SGD(lr=0.1),
                         policy=policies.GPipe(2), dtype="float64")  # fmt: skip
        tr.fit(_data(), batch_size=12)
        runs.append(tr.params)
    assert_params_equal(*runs)


@dataclass(frozen=True)
class MaskGate(nn.Module):
    """Scores 0 for the side the sign of a row's first feature picks, ``masked`` for the other:
    an expert masked out (by -inf, or by a large finite number)."""

    masked: float

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        raw = np.asarray(ops.raw(x))
        pos = raw[:, :1] > 0
        return np.where(np.concatenate([~pos, pos], axis=1), 0.0, self.masked).astype(raw.dtype)


def test_hard_gates_weigh_a_choice_of_infinite_score_one_not_nan():
    # gates="none" weighed scores * 0 + 1: NaN where a chosen expert's score was -inf, and the
    # NaN reached the outputs and the parameters without a word
    runs = []
    for masked in (-np.inf, -1e30):
        g = ann.Graph()
        x = g.input("x", (None, D))
        y = g.input("y", (None,), dtype="int64")
        r = g.router("gate", MaskGate(masked), x, experts=2, k=2, gates="none")
        outs = [g.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
        g.loss("loss", nn.CrossEntropyLoss(), g.merge("m", r, *outs), y)
        g.output("out", "m")
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
        out = tr.predict({"x": _data()["x"]})["out"]
        hist = tr.fit(_data(), batch_size=12)
        runs.append((tr.params, hist.losses, out))
    assert np.isfinite(runs[0][2]).all() and np.isfinite(runs[0][1]).all()
    assert_params_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


def _bf16_graph(gate: nn.Module, experts: int) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", gate, x, experts=experts, k=2)
    outs = [g.layer(f"e{i}", nn.Sequential(nn.Linear(D, H), nn.Tanh()), r) for i in range(experts)]
    o = g.layer("head", nn.Linear(H, C), g.merge("merge", r, *outs))
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    return g


@pytest.mark.parametrize("dtype", [BF16])
def test_a_router_runs_in_bfloat16_and_refuses_its_nan_scores(dtype):
    # bfloat16 (numpy's extension dtype, kind "V") was refused as "not numbers" when the graph
    # was checked, and a NaN score in it went past the NaN check (kind "f" only)
    tr = ann.Trainer(_bf16_graph(nn.Linear(D, 3), 3), optimizer=optim.SGD(lr=0.1),
                     policy=policies.GPipe(2), dtype=dtype)  # fmt: skip
    hist = tr.fit(_data(), batch_size=12)
    assert np.isfinite(hist.losses).all()
    assert {str(a.dtype) for a in tree_leaves(tr.params)} == {dtype}
    tr = ann.Trainer(_bf16_graph(NanFromRow2(), 2), optimizer=optim.SGD(lr=0.1),
                     policy=policies.Sync(), dtype=dtype)  # fmt: skip
    said = r"router 'gate': the gate NanFromRow2\(\) gave a NaN score \(row 2, expert 1\)"
    with pytest.raises(ann.ActorError, match=said):
        tr.fit(_data(), batch_size=12)
