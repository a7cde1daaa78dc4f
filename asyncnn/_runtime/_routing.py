"""Data-dependent routing: a router sends each row of a key to some of its experts (successors),
and a merge gathers what comes back, by row index, as if every row had taken its own path.

A router is a layer whose module, :class:`Router`, wraps a *gate* module giving one score per
expert and row; the top ``k`` scores pick a row's experts (at most ``capacity`` rows each per key;
rows over it are dropped and counted). Each expert branch is a chain of ordinary layers that gets
only its rows, or, when no row chose it, an explicit *skip* (a message whose tensor is ``None``), so
static stage orders still see every key. The router sends the merge the gate weights and the route
(a ``(rows, k)`` int64 array of expert indices, ``-1`` for a dropped choice); both travel as plain
tensors, so the route is in the trace and a replay reproduces it. The backward wave retraces the
route: expert gradients go back only to the rows that went there, and the gate gets the gradient
of its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._errors import ActorError
from asyncnn._math._autodiff import vjp
from asyncnn._math._nn._module import Initializer, Module
from asyncnn._math._ops import raw as ops_raw

from ._actors import LayerActor
from ._messages import FORWARD
from ._statistics import ActorStatistics

if TYPE_CHECKING:
    from ._graph import Graph, Node

__all__ = [
    "GATES",
    "Merge",
    "MergeActor",
    "Router",
    "RouterActor",
    "RouterStatistics",
    "assign_rows",
    "expert_starts",
    "gate_weights",
    "topk_experts",
]

GATES = ("softmax", "normalized", "none")
OVERFLOW = ("drop", "error")


@dataclass(frozen=True)
class Router(Module):
    """The module of a router node (made by :meth:`Graph.router`); see the module docstring.

    Attributes:
        gate: the module scoring the experts: ``gate(params, x, *extra) -> (rows, experts)``.
        experts: how many experts (branches) the router feeds.
        k: how many experts each row goes to (top-k of the scores; ties go to the lower index).
        gates: how a row's outputs are weighted in the merge: ``"softmax"`` (the softmax over all
            experts, at the chosen ones), ``"normalized"`` (the softmax over the chosen ``k``),
            ``"none"`` (weight 1: hard branches; the gate then gets no gradient).
        capacity: the most rows an expert takes per key (None: no limit).
        capacity_factor: or a limit of ``ceil(capacity_factor * rows * k / experts)`` per key.
        on_overflow: ``"drop"`` (drop rows over capacity and count them) or ``"error"``.
    """

    gate: Module
    experts: int
    k: int = 1
    gates: str = "softmax"
    capacity: int | None = None
    capacity_factor: float | None = None
    on_overflow: str = "drop"

    def __post_init__(self) -> None:
        if not isinstance(self.gate, Module):
            raise TypeError(f"Router: gate must be an nn.Module, got {type(self.gate).__name__}")
        if not isinstance(self.experts, int) or self.experts < 1:
            raise ValueError(f"Router: experts={self.experts!r} must be an int >= 1")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.experts:
            raise ValueError(f"Router: k={self.k!r} must be an int in [1, experts={self.experts}]")
        if self.gates not in GATES:
            raise ValueError(f"Router: gates={self.gates!r} must be one of {GATES}")
        if self.capacity is not None and self.capacity_factor is not None:
            raise ValueError("Router: give capacity or capacity_factor, not both")
        if self.capacity is not None and (not isinstance(self.capacity, int) or self.capacity < 0):
            raise ValueError(f"Router: capacity={self.capacity!r} must be an int >= 0")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"Router: capacity_factor={self.capacity_factor!r} must be > 0")
        if self.on_overflow not in OVERFLOW:
            raise ValueError(f"Router: on_overflow={self.on_overflow!r} must be one of {OVERFLOW}")

    def init_params(self, init: Initializer) -> Any:
        return self.gate.init_params(init)

    def limit(self, rows: int) -> int | None:
        """The capacity of each expert for a key of ``rows`` rows (None: unlimited)."""
        if self.capacity_factor is not None:
            return int(math.ceil(self.capacity_factor * rows * self.k / self.experts))
        return self.capacity

    def scores(self, params: Any, x: Any, *extra: Any) -> Any:
        """The gate's scores, checked to be ``(rows, experts)``."""
        s = self.gate(params, x, *extra)
        shape = tuple(getattr(s, "shape", ()))
        if len(shape) != 2 or shape[1] != self.experts or shape[0] != x.shape[0]:
            raise ValueError(
                f"the gate {self.gate!r} gave scores of shape {shape} for input {tuple(x.shape)}; "
                f"a router over {self.experts} experts needs ({x.shape[0]}, {self.experts})"
            )
        return s

    def __call__(self, params: Any, x: Any, *extra: Any, rng: Any = None) -> Any:
        # Shape evaluation only (graph validation): the experts read the routed rows of x.
        self.scores(params, x, *extra)
        return x


@dataclass(frozen=True)
class Merge(Module):
    """The module of a merge node (made by :meth:`Graph.merge`): ``out[i] = sum_j w[i, j] *
    expert_{route[i, j]}(x[i])`` over the row's kept choices (zeros for a row all of whose choices
    were dropped)."""

    experts: int

    def init_params(self, init: Initializer) -> Any:
        return {}

    def __call__(self, params: Any, routed: Any, *branches: Any, rng: Any = None) -> Any:
        # Shape evaluation only (graph validation): every branch must give the same row shape.
        shapes = [tuple(b.shape) for b in branches]
        if len(set(s[1:] for s in shapes)) > 1:
            raise ValueError(f"the expert branches give rows of different shapes: {shapes}")
        return branches[0] * 0


@dataclass(slots=True)
class RouterStatistics(ActorStatistics):
    """A router's counters, besides those of every actor.

    Attributes:
        expert_rows: ``{expert node: rows sent to it}`` over the run (its load).
        dropped_rows: ``{expert node: rows that chose it and were dropped over capacity}``.
        capacity: the per-key capacity of each expert for the last key (None: unlimited).
        dropped_total: row choices dropped, all experts together.
    """

    expert_rows: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, int] = field(default_factory=dict)
    capacity: int | None = None
    dropped_total: int = 0


def topk_experts(scores: np.ndarray[Any, Any], k: int) -> np.ndarray[Any, Any]:
    """Each row's ``k`` best experts, best first (ties go to the lower index)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def assign_rows(
    choice: np.ndarray[Any, Any], experts: int, capacity: int | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Applies the capacity: first choices of all rows (in row order), then second choices, ...

    Returns the route (``choice`` with ``-1`` where dropped) and the dropped count per expert.
    """
    route = choice.copy()
    dropped = np.zeros(experts, dtype=np.int64)
    if capacity is None:
        return route, dropped
    load = np.zeros(experts, dtype=np.int64)
    n = choice.shape[0]
    for j in range(choice.shape[1]):  # k columns; the rows of a column at once
        col = choice[:, j].astype(np.int64)
        # each row's place among the rows of this column that chose the same expert, in row
        # order: a stable sort groups them, the offset from the group's start is the place
        order = np.argsort(col, kind="stable")
        grouped = col[order]
        place = np.empty(n, dtype=np.int64)
        place[order] = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
        keep = load[col] + place < capacity
        route[~keep, j] = -1
        dropped += np.bincount(col[~keep], minlength=experts)
        load += np.bincount(col[keep], minlength=experts)
    return route, dropped


def gate_weights(scores: Any, choice: np.ndarray[Any, Any], gates: str) -> Any:
    """The ``(rows, k)`` weights of the chosen experts (differentiable in ``scores``)."""
    from asyncnn import ops

    idx = choice
    if gates == "none":  # weight 1, still a function of the scores (its gradient is zero)
        return _take_rows(ops.add(ops.multiply(scores, 0.0), 1.0), idx)
    if gates == "softmax":
        probs = ops.softmax(scores, axis=-1)
        return _take_rows(probs, idx)
    return ops.softmax(_take_rows(scores, idx), axis=-1)


def _take_rows(a: Any, idx: np.ndarray[Any, Any]) -> Any:
    from asyncnn import ops

    n, e = a.shape
    flat = (np.arange(n)[:, None] * e + idx).reshape(-1)
    return ops.reshape(ops.take(ops.reshape(a, (n * e,)), flat, axis=0), idx.shape)


def expert_rows(route: np.ndarray[Any, Any], e: int) -> tuple[np.ndarray[Any, Any], Any]:
    """The rows that go to expert ``e`` (ascending) and the route column each came through."""
    rows, cols = np.nonzero(route == e)
    return rows, cols


def expert_starts(graph: Graph, router: Node) -> list[str]:
    """The first layer of each expert branch of ``router``, in expert order: the nodes that
    read it, but its merge."""
    return [c for c, _ in router.consumers if graph.nodes[c].actor is not MergeActor]


class RouterActor(LayerActor):
    """Runs the gate, picks each row's experts, sends each expert its rows (or a skip) and the
    merge the weights and the route; on the backward, scatters the experts' input gradients back
    to their rows and adds the gate's gradient."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stats = RouterStatistics()
        self.stats = stats
        self.router: Router = self.module
        self.expert_names = expert_starts(self.run.graph, self.node)
        # consumer edge -> expert index (None: the merge)
        index = {name: e for e, name in enumerate(self.expert_names)}
        self.edge_expert: list[int | None] = [index.get(c) for c, _ in self.consumers]
        stats.expert_rows = {n: 0 for n in self.expert_names}
        stats.dropped_rows = {n: 0 for n in self.expert_names}
        # key -> (route, choice, the rows that go to each expert)
        self.routes: dict[int, tuple[Any, Any, list[Any]]] = {}

    def _gate(self, params: Any, inputs: list[Any], chosen: list[Any]) -> Any:
        """The gate weights; picks the experts from the scores on the first call (``chosen``
        empty), reuses the pick afterwards (a recompute at another version keeps the route)."""
        scores = self.router.scores(params, *inputs)
        if not chosen:
            raw = np.asarray(self.backend.to_numpy(ops_raw(scores)))
            chosen.append(topk_experts(raw, self.router.k))
        return gate_weights(scores, chosen[0], self.router.gates)

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        x = inputs[0]
        rows = int(x.shape[0])
        chosen: list[Any] = []
        keep = self.keep_pullback

        def run(params: Any, xs: list[Any]) -> Any:
            xs = self._to_device(xs)
            if keep:
                return vjp(lambda p, a: self._gate(p, a, chosen), params, xs)
            return self._gate(params, xs, chosen), None

        weights, pullback = await self.compute(run, self.params, inputs, cost=self._cost(rows))
        choice = chosen[0]
        capacity = self.router.limit(rows)
        route, dropped = assign_rows(choice, self.router.experts, capacity)
        st = self.stats
        assert isinstance(st, RouterStatistics)
        st.capacity = capacity
        if dropped.any():
            if self.router.on_overflow == "error":
                over = {n: int(d) for n, d in zip(self.expert_names, dropped, strict=True) if d}
                raise ActorError(
                    self.name, FORWARD, key,
                    f"router {self.name!r}: key {key} sends more rows than the capacity "
                    f"{capacity} allows to {over} (rows over capacity); raise capacity, or pass "
                    "on_overflow='drop' to drop and count them",
                )  # fmt: skip
            st.dropped_total += int(dropped.sum())
        self._hold(key, (pullback, self.version, None if keep else inputs), inputs, weights)
        # each expert's rows, worked out once for the gathers, the loads and the backward
        picks = [expert_rows(route, e)[0] for e in range(len(self.expert_names))]
        self.routes[key] = (route, choice, picks)
        loads = []
        for e, name in enumerate(self.expert_names):
            n_e = len(picks[e])
            st.expert_rows[name] += n_e
            st.dropped_rows[name] += int(dropped[e])
            loads.append(n_e)
        rec = self.run.recorder
        if rec is not None:
            rec.event(self.name, "route", FORWARD, key, self.version, "", self.seq,
                      meta={"load": loads, "dropped": [int(d) for d in dropped],
                            "capacity": capacity})  # fmt: skip
        # the per-expert gathers are kernels too: queued on this actor's stream (through
        # compute), so the event the messages carry covers them
        return await self.compute(self._gather, x, weights, route, picks, cost=0)

    def _gather(self, x: Any, weights: Any, route: Any, picks: list[Any]) -> list[tuple[Any, ...]]:
        x = self._to_device([x])[0]
        xp = self.backend.xp
        tensors: list[tuple[Any, ...]] = []
        for e in self.edge_expert:
            if e is None:
                tensors.append((weights, xp.asarray(route)))
                continue
            rows = picks[e]
            tensors.append((x[xp.asarray(rows)],) if len(rows) else (None,))
        return tensors

    def _outputs(self, key: int, out: Any) -> list[tuple[Any, ...]]:
        return list(out)  # gathered by on_forward

    async def _output_grad(self, parts: list[Any]) -> Any:
        return list(parts)  # one per consumer edge, not summed; moved in on_backward's compute

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        pullback, _, inputs = self._unhold(key)
        route, choice, picks = self.routes.pop(key)
        if pullback is None:  # recompute the gate at the latest version; the route stays

            def redo(params: Any, xs: list[Any]) -> Any:
                return vjp(lambda p, a: self._gate(p, a, [choice]), params, self._to_device(xs))[1]

            pullback = await self.compute(redo, self.params, inputs)
        if not any(e is None for e in self.edge_expert):
            raise ActorError(self.name, "backward", key, f"router {self.name!r}: no merge gradient")

        def backward(pullback: Any, grad: list[Any]) -> tuple[Any, list[Any]]:
            # all on this actor's stream (compute), after the events of the gradients' senders
            xp = self.backend.xp
            grad = self._to_device(grad)
            g_weights = None
            scattered: list[tuple[Any, Any]] = []
            for e, part in zip(self.edge_expert, grad, strict=True):
                if e is None:
                    g_weights = part
                elif part is not None:
                    scattered.append((xp.asarray(picks[e]), part))
            if self.router.gates != "none":  # the dropped choices' weights were not used
                g_weights = g_weights * xp.asarray(route >= 0)
            param_grads, input_grads = pullback(g_weights)
            input_grads = list(input_grads)
            gx = input_grads[0]
            gx = xp.zeros_like(inputs[0]) if gx is None else gx.copy()
            for rows, part in scattered:  # ascending expert order: the same sum every time
                gx[rows] += part
            input_grads[0] = gx
            return param_grads, input_grads

        param_grads, input_grads = await self.compute(backward, pullback, grad)
        await self._settle(param_grads, meta)
        return input_grads


class MergeActor(LayerActor):
    """Gathers the experts' outputs of a key by row index, weighted by the gate; on the backward,
    sends each expert the gradient of its rows and the router the gradient of its weights."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routes: dict[int, Any] = {}
        # key -> (weights, each expert's (rows, route columns) on the device, branch outputs)
        self.saved: dict[int, tuple[Any, list[Any], list[Any]]] = {}

    def _file(self, msg: Any) -> None:
        if msg.kind == FORWARD and msg.slot == 0 and len(msg.tensors) > 1:
            self.routes[msg.key] = msg.tensors[1]
        super()._file(msg)

    def _skips(self, inputs: list[Any]) -> bool:
        return inputs[0] is None  # the router skipped the key (it is inside another branch)

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        # the route's read and the gathers and sums run on this actor's stream (compute), after
        # the events of the messages that brought them
        out, weights, picks, branches = await self.compute(
            self._combine, key, inputs, self.routes.pop(key), cost=0
        )
        self.saved[key] = (weights, picks, branches)
        return out

    def _combine(
        self, key: int, inputs: list[Any], route_t: Any
    ) -> tuple[Any, Any, list[Any], list[Any]]:
        route = np.asarray(self.backend.to_numpy(route_t))
        inputs = self._to_device(inputs)
        weights, branches = inputs[0], inputs[1:]
        out = None
        xp = self.backend.xp
        picks: list[Any] = []  # per expert: (rows, route columns), None for a skip
        for e, y in enumerate(branches):
            rows, cols = expert_rows(route, e)
            if y is None:
                if len(rows):
                    raise ActorError(self.name, FORWARD, key,
                                     f"merge {self.name!r}: expert {e} skipped key {key} but the "
                                     f"route sent it {len(rows)} rows")  # fmt: skip
                picks.append(None)
                continue
            if y.shape[0] != len(rows):
                raise ActorError(self.name, FORWARD, key,
                                 f"merge {self.name!r}: expert {e} returned {y.shape[0]} rows for "
                                 f"the {len(rows)} rows routed to it; an expert branch must keep "
                                 "its rows (one output row per input row)")  # fmt: skip
            if out is None:
                out = xp.zeros((weights.shape[0], *y.shape[1:]), dtype=y.dtype)
            r, c = xp.asarray(rows), xp.asarray(cols)
            picks.append((r, c))
            w = weights[r, c]
            out[r] += w.reshape((-1,) + (1,) * (y.ndim - 1)) * y
        if out is None:  # every choice of every row was dropped: the rows' outputs are zeros
            shape = self.run.graph.shapes.get(self.name)
            trail = tuple(shape[1:]) if shape else ()
            out = xp.zeros((weights.shape[0], *trail), dtype=weights.dtype)
        return out, weights, picks, list(branches)

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        weights, picks, branches = self.saved.pop(key)
        result: list[Any] = await self.compute(self._split, grad, weights, picks, branches, cost=0)
        return result

    def _split(self, grad: Any, weights: Any, picks: list[Any], branches: list[Any]) -> list[Any]:
        xp = self.backend.xp
        g_weights = xp.zeros_like(weights)
        grads: list[Any] = [g_weights]
        for pick, y in zip(picks, branches, strict=True):
            if y is None:
                grads.append(None)
                continue
            r, c = pick
            g_rows = grad[r]
            w = weights[r, c].reshape((-1,) + (1,) * (y.ndim - 1))
            grads.append(w * g_rows)
            g_weights[r, c] = (g_rows * y).reshape(len(r), -1).sum(axis=1)
        return grads


def check_routing(graph: Graph) -> None:
    """Checks the wiring of routers and merges (called by :meth:`Graph.check_structure`)."""
    from asyncnn._errors import GraphError

    for node in graph.nodes.values():
        if node.actor is not RouterActor:
            continue
        router: Router = node.module
        merges = [c for c, _ in node.consumers if graph.nodes[c].actor is MergeActor]
        if len(merges) != 1:
            raise GraphError(
                f"router {node.name!r} needs exactly one merge reading it (g.merge(name, router, "
                f"*branches)); it has {merges or 'none'}"
            )
        merge = graph.nodes[merges[0]]
        starts = expert_starts(graph, node)
        if len(starts) != router.experts:
            raise GraphError(
                f"router {node.name!r} has {router.experts} experts but {len(starts)} layers read "
                f"it ({starts}); add one expert layer per expert: g.layer(name, module, router)"
            )
        if merge.inputs[0] != node.name or len(merge.inputs) != router.experts + 1:
            raise GraphError(
                f"merge {merge.name!r} must read router {node.name!r} first, then the "
                f"{router.experts} expert branches; it reads {list(merge.inputs)}"
            )
        for e, start in enumerate(starts):
            name = start
            while True:
                n = graph.nodes[name]
                if len(n.inputs) != 1 or n.kind != "layer":
                    raise GraphError(
                        f"expert branch {e} of router {node.name!r}: {n.kind} {name!r} reads "
                        f"{list(n.inputs)}; a branch is a chain of one-input layers"
                    )
                if len(n.consumers) != 1:
                    raise GraphError(
                        f"expert branch {e} of router {node.name!r}: layer {name!r} feeds "
                        f"{[c for c, _ in n.consumers]}; a branch layer feeds exactly one node "
                        f"(the next layer of its branch, or the merge {merge.name!r})"
                    )
                ((nxt, slot),) = n.consumers
                if nxt == merge.name:
                    if slot != e + 1:
                        raise GraphError(
                            f"merge {merge.name!r}: expert branch {e} (from {start!r}) comes in "
                            f"at input {slot}; pass the branches in expert order"
                        )
                    break
                name = nxt


def plain_route(node: Node, params: Any, values: dict[str, Any], backend: Any) -> Any:
    """Plain (non-actor) evaluation of a router: ``(x, weights, route)``."""
    router: Router = node.module
    inputs = [backend.asarray(values[s]) for s in node.inputs]
    scores = router.scores(params, *inputs)
    choice = topk_experts(np.asarray(backend.to_numpy(scores)), router.k)
    route, _ = assign_rows(choice, router.experts, router.limit(int(inputs[0].shape[0])))
    return ("routed", inputs[0], gate_weights(scores, choice, router.gates), route)


def plain_values(graph: Graph, name: str, params: Any, values: dict[str, Any]) -> bool:
    """Evaluates a routing node (or a layer of an expert branch) outside the actors, into
    ``values``; returns False for other nodes. A branch value is ``("branch", rows, array)``."""
    from asyncnn.backends import get_backend

    node = graph.nodes[name]
    backend = get_backend(node.device)
    if node.actor is RouterActor:
        values[name] = plain_route(node, params, values, backend)
        return True
    if node.kind != "layer" or not node.inputs:
        return False
    src = values.get(node.inputs[0])
    if node.actor is MergeActor:
        _, x, weights, route = values[node.inputs[0]]
        out = None
        for e, src_name in enumerate(node.inputs[1:]):
            _, rows, y = values[src_name]
            if y is None:
                continue
            if out is None:
                out = backend.xp.zeros((x.shape[0], *y.shape[1:]), dtype=y.dtype)
            cols = np.nonzero(route == e)[1]
            w = weights[rows, cols].reshape((-1,) + (1,) * (y.ndim - 1))
            out[rows] += w * y
        values[name] = out if out is not None else backend.xp.zeros_like(x[:, :0])
        return True
    if isinstance(src, tuple):
        if src[0] == "routed":
            e = expert_starts(graph, graph.nodes[node.inputs[0]]).index(name)
            rows = np.nonzero((src[3] == e).any(axis=1))[0]
            x = src[1][backend.xp.asarray(rows)]
        else:
            rows, x = src[1], src[2]
        y = node.module(params, backend.asarray(x)) if len(rows) else None
        values[name] = ("branch", rows, y)
        return True
    return False
