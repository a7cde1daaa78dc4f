"""Data-dependent routing: a router sends each row of a key to some of its experts (successors),
and a merge gathers what comes back, by row index, as if every row had taken its own path.

A router is a layer whose module, :class:`~asyncnn.dynamic.Router` (in the math, with
:class:`~asyncnn.dynamic.Merge`), wraps a *gate* module giving one score per
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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._errors import ActorError
from asyncnn._math._autodiff import vjp
from asyncnn._math._nn._routing import (
    Router,
    assign_rows,
    expert_rows,
    gate_weights,
    topk_experts,
)
from asyncnn._math._ops import raw as ops_raw
from asyncnn.backends import is_floating

from ._actor_base import _nbytes
from ._actors import LayerActor
from ._messages import BACKWARD, FORWARD
from ._statistics import ActorStatistics
from ._structure import expert_starts

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node

__all__ = [
    "MergeActor",
    "RouterActor",
    "RouterStatistics",
    "check_scores",
    "plain_route",
    "plain_values",
]


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


class RouterActor(LayerActor):
    """Runs the gate, picks each row's experts, sends each expert its rows (or a skip) and the
    merge the weights and the route; on the backward, scatters the experts' input gradients back
    to their rows and adds the gate's gradient."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stats = RouterStatistics()
        self.stats = stats
        self.router: Router = self.module
        self.expert_names = expert_starts(self.ctx.graph, self.node)
        # consumer edge -> expert index (None: the merge)
        index = {name: e for e, name in enumerate(self.expert_names)}
        self.edge_expert: list[int | None] = [index.get(c) for c, _ in self.consumers]
        stats.expert_rows = {n: 0 for n in self.expert_names}
        stats.dropped_rows = {n: 0 for n in self.expert_names}
        # key -> (route, choice, the rows that go to each expert)
        self.routes: dict[int, tuple[Any, Any, list[Any]]] = {}

    def _gate(self, params: Any, inputs: list[Any], chosen: list[Any], rng: Any = None) -> Any:
        """The gate weights; picks the experts from the scores on the first call (``chosen``
        empty), reuses the pick afterwards (a recompute at another version keeps the route).
        ``rng``: the key's stream (:meth:`_rng`, fresh for each call: a recompute draws the
        forward's dropout masks again), which a stochastic gate draws from."""
        scores = self.router.scores(params, *inputs, rng=rng)
        if not chosen:
            raw = np.asarray(self.backend.to_numpy(ops_raw(scores)))
            check_scores(f"router {self.name!r}", self.router.gate, raw)
            chosen.append(topk_experts(raw, self.router.k))
        return gate_weights(scores, chosen[0], self.router.gates, self.ctx.dtype)

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        x = inputs[0]
        rows = int(x.shape[0])
        chosen: list[Any] = []
        keep = self.keep_pullback

        def run(params: Any, xs: list[Any], rng: Any) -> Any:
            xs = self._to_device(xs)
            if keep:
                return vjp(lambda p, a: self._gate(p, a, chosen, rng), params, xs)
            return self._gate(params, xs, chosen, rng), None

        # the weights the policy gives this forward (the latest, a prediction or a pinned
        # version), like any layer's: their version gives the gradient's delay
        params, version = self.forward_weights(key, meta)
        weights, pullback = await self.compute(
            run, params, inputs, self._rng(key), cost=self._cost(rows)
        )
        if self.ctx.checks_finite:  # the gate's weights are this actor's own output
            await self._check_finite(FORWARD, key, weights)
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
        self._hold(key, (pullback, version, None if keep else inputs), inputs, weights)
        # each expert's rows, worked out once for the gathers, the loads and the backward
        picks = [expert_rows(route, e)[0] for e in range(len(self.expert_names))]
        self.routes[key] = (route, choice, picks)
        loads = []
        for e, name in enumerate(self.expert_names):
            n_e = len(picks[e])
            st.expert_rows[name] += n_e
            st.dropped_rows[name] += int(dropped[e])
            loads.append(n_e)
        rec = self.ctx.recorder
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
        entry = self._unhold(key)
        param_grads, input_grads = await self._route_backward(key, grad, entry)
        # with the forward's version: the gradient's delay is recorded, and corrected by a
        # policy that corrects stale gradients
        await self._settle(param_grads, meta, entry[1])
        return input_grads

    async def on_backward_input(
        self, key: int, grad: Any, meta: dict[str, Any]
    ) -> list[Any] | None:
        # a split backward (ZeroBubbleH1): the gate is small, its parameter gradient comes with
        # the input's here; the key stays stored (as a layer's does) with it for the weight half
        entry = self.store[key]
        param_grads, input_grads = await self._route_backward(key, grad, entry)
        self.store[key] = (param_grads, entry[1], None)
        return input_grads

    async def on_backward_weight(self, key: int, meta: dict[str, Any]) -> None:
        param_grads, forward_version, _ = self._unhold(key)
        await self._settle(param_grads, meta, forward_version)

    async def _route_backward(
        self, key: int, grad: list[Any], entry: tuple[Any, int, Any]
    ) -> tuple[Any, list[Any]]:
        """A key's gate gradient and input gradient (the experts' input gradients scattered
        back to their rows), from its store entry ``(pullback, forward version, inputs)``."""
        pullback, forward_version, inputs = entry
        route, choice, picks = self.routes.pop(key)
        if pullback is None:  # recompute the gate (latest or estimated weights); the route stays
            params = await self.recompute_weights(forward_version)

            def redo(params: Any, xs: list[Any], rng: Any) -> Any:
                xs = self._to_device(xs)
                return vjp(lambda p, a: self._gate(p, a, [choice], rng), params, xs)[1]

            # (the key's stream afresh: the gate's dropout masks are the forward's)
            pullback = await self.compute(redo, params, inputs, self._rng(key))
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
            if scattered:
                # None from the gate: x has no gradient (integer ids routed to embedding
                # experts) or the gate ignores it; the experts' parts still give x's shape
                first = scattered[0][1]
                gx = (
                    xp.zeros((route.shape[0], *first.shape[1:]), dtype=first.dtype)
                    if gx is None
                    else gx.copy()
                )
                for rows, part in scattered:  # ascending expert order: the same sum every time
                    gx[rows] += part
            input_grads[0] = gx
            return param_grads, input_grads

        param_grads, input_grads = await self.compute(backward, pullback, grad)
        if self.ctx.checks_finite:
            await self._check_finite(BACKWARD, key, input_grads)
        return param_grads, input_grads


class MergeActor(LayerActor):
    """Gathers the experts' outputs of a key by row index, weighted by the gate; on the backward,
    sends each expert the gradient of its rows and the router the gradient of its weights."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routes: dict[int, Any] = {}
        # key -> (weights, each expert's (rows, route columns) on the device, branch outputs)
        self.saved: dict[int, tuple[Any, list[Any], list[Any]]] = {}
        router = self.ctx.graph.nodes[self.node.inputs[0]]
        self.router_name = router.name
        self.router_k = int(router.module.k)
        # asyncnn's router makes its routes right by construction; a custom one's are checked
        # (shapes and dtypes, and a pass over the (rows, k) route, already on the host for the
        # gathers)
        self.checks_routes = router.custom_actor is not None
        # its keys are kept in :attr:`saved`, not as pullbacks: the one version it holds is
        # its (empty) latest, counted as a parameterless layer's is
        self.stats.versions_held = self.stats.peak_versions_held = 1

    def _file(self, msg: Any) -> None:
        if msg.kind == FORWARD and msg.slot == 0 and len(msg.tensors) > 1:
            self.routes[msg.key] = msg.tensors[1]
        super()._file(msg)

    def _skips(self, inputs: list[Any]) -> bool:
        return inputs[0] is None  # the router skipped the key (it is inside another branch)

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        # the route's read and the gathers and sums run on this actor's stream (compute), after
        # the events of the messages that brought them
        route_t = self.routes.pop(key, None)
        if self.checks_routes:
            self._check_route(key, inputs[0], route_t, meta.get("rows"))
        out, weights, picks, branches = await self.compute(
            self._combine, key, inputs, route_t, cost=0
        )
        self._save(key, (weights, picks, branches))
        if self.ctx.checks_finite:
            await self._check_finite(FORWARD, key, out)
        return out

    def _save(self, key: int, entry: tuple[Any, list[Any], list[Any]]) -> None:
        """Keeps a key's ``(weights, picks, branch outputs)`` until its backward, counted in
        the statistics as a layer's stored key is (``stored``, ``peak_stored``, and their
        bytes: the weights, the row picks and the branch outputs)."""
        self.saved[key] = entry
        weights, picks, branches = entry
        st = self.stats
        st.stored = len(self.saved)
        st.peak_stored = max(st.peak_stored, st.stored)
        indices = [a for pick in picks if pick is not None for a in pick]
        held = self.held_bytes[key] = _nbytes([weights, *indices, *branches])
        st.stored_bytes += held
        st.peak_stored_bytes = max(st.peak_stored_bytes, st.stored_bytes)

    def _unsave(self, key: int) -> tuple[Any, list[Any], list[Any]]:
        """Takes a key's entry out of :attr:`saved` (what :meth:`_save` put in)."""
        entry = self.saved.pop(key)
        self.stats.stored = len(self.saved)
        self.stats.stored_bytes -= self.held_bytes.pop(key, 0)
        return entry

    def _combine(
        self, key: int, inputs: list[Any], route_t: Any
    ) -> tuple[Any, Any, list[Any], list[Any]]:
        route = np.asarray(self.backend.to_numpy(route_t))
        if self.checks_routes:
            self._check_route_values(key, route)
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
        if out is None:
            out = _all_dropped(self.ctx.graph, self.name, weights, xp)
        return out, weights, picks, list(branches)

    def _route_error(self, key: int, what: str) -> ActorError:
        return ActorError(
            self.name, FORWARD, key,
            f"merge {self.name!r}: for key {key}, router {self.router_name!r} sent {what}; the "
            f"merge needs (weights, route): a route of shape (rows, k={self.router_k}) of int64 "
            f"expert indices in [0, {len(self.node.inputs) - 1}) (-1 for a dropped choice; no "
            "expert twice in a row) and floating weights of that shape, one row per row the "
            "router was given (see docs/dynamic.md); fix what the router's on_forward returns "
            "for its merge",
        )  # fmt: skip

    def _check_route(self, key: int, weights: Any, route: Any, rows: Any) -> None:
        """Refuses a route (from a custom router) whose presence, shape or dtype breaks the
        contract: it would fail deep in the gathers, or mix rows without a word. O(1): shapes
        and dtypes only, no read of the values (which may be on a device)."""
        if route is None:
            raise self._route_error(key, "no route (only the weights)")
        r_shape = getattr(route, "shape", None)
        w_shape = getattr(weights, "shape", None)
        r_dtype = getattr(route, "dtype", None)
        w_dtype = getattr(weights, "dtype", None)
        run_dtype = self.ctx.dtype
        if (
            r_shape is None
            or len(r_shape) != 2
            or r_shape[1] != self.router_k
            or w_shape != r_shape
            or (rows is not None and r_shape[0] != rows)
            or r_dtype is None
            or r_dtype.kind not in "iu"
            # (weights in the run's dtype, the common case, are floating: no call)
            or (w_dtype != run_dtype and (w_dtype is None or not is_floating(w_dtype)))
        ):
            what = (
                f"a route of shape {r_shape} and dtype {r_dtype} with weights of shape "
                f"{w_shape} and dtype {w_dtype}"
            )
            if rows is not None:
                what += f" (the key has {rows} rows)"
            raise self._route_error(key, what)
        if w_dtype != run_dtype:
            raise self._route_error(
                key, f"gate weights of dtype {w_dtype} in a {run_dtype} run (cast them: "
                f"weights.astype({str(run_dtype)!r}))"
            )  # fmt: skip

    def _check_route_values(self, key: int, route: np.ndarray[Any, Any]) -> None:
        """Refuses a custom router's route with an expert index out of range, or an expert
        twice in one row (its rows would be lost, or summed once where they count twice)."""
        experts = len(self.node.inputs) - 1
        if not route.size:
            return
        bad = (route < -1) | (route >= experts)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise self._route_error(
                key, f"a route with expert index {int(route[row, col])} (row {row}, column "
                f"{col}) for its {experts} experts"
            )  # fmt: skip
        if route.shape[1] > 1:
            ordered = np.sort(route, axis=1)
            twice = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
            if twice.any():
                row = int(np.argwhere(twice)[0][0])
                raise self._route_error(
                    key, f"a route that sends row {row} to the same expert twice "
                    f"({route[row].tolist()})"
                )  # fmt: skip

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        weights, picks, branches = self._unsave(key)
        result: list[Any] = await self.compute(self._split, grad, weights, picks, branches, cost=0)
        if self.ctx.checks_finite:
            await self._check_finite(BACKWARD, key, result)
        return result

    async def on_backward_input(
        self, key: int, grad: Any, meta: dict[str, Any]
    ) -> list[Any] | None:
        return await self.on_backward(key, grad, meta)  # a split backward: all of it

    async def on_backward_weight(self, key: int, meta: dict[str, Any]) -> None:
        return None  # no parameters

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


def check_scores(who: str, gate: Any, raw: np.ndarray[Any, Any]) -> None:
    """Raises ValueError where the gate gave a NaN score: NaN has no rank, so the experts a row
    would go to (and, with ``gates="normalized"``, whether the NaN reaches its weights at all)
    would depend on where the sort puts it. One pass over the ``(rows, experts)`` scores already
    on the host for the top-k."""
    if not is_floating(raw.dtype) or not np.isnan(raw).any():  # (bfloat16 is kind "V")
        return
    row, expert = (int(i) for i in np.argwhere(np.isnan(raw))[0])
    raise ValueError(
        f"{who}: the gate {gate!r} gave a NaN score (row {row}, expert {expert}); a router "
        "cannot rank NaN. Find where the gate's input or weights went NaN (check_finite=True "
        "names the first actor that produced one), or lower the learning rate"
    )


def plain_route(
    graph: Graph, node: Node, params: Any, values: dict[str, Any], backend: Any, dtype: Any
) -> Any:
    """Plain (non-actor) evaluation of a router: ``("routed", x, weights, route)``, the weights
    in ``dtype`` (the run's), as the router actor makes them. Capacity applies to the rows at
    hand (``predict``'s and ``evaluate``'s batch) as to a key's: with ``on_overflow="error"``
    rows over it fail the call, naming the router, as they fail a run.

    Raises:
        ValueError: a NaN score, or rows over capacity under ``on_overflow="error"``.
    """
    router: Router = node.module
    inputs = [backend.asarray(values[s]) for s in node.inputs]
    scores = router.scores(params, *inputs)
    raw = np.asarray(backend.to_numpy(ops_raw(scores)))
    check_scores(f"router {node.name!r}", router.gate, raw)
    choice = topk_experts(raw, router.k)
    rows = int(inputs[0].shape[0])
    capacity = router.limit(rows)
    route, dropped = assign_rows(choice, router.experts, capacity)
    if dropped.any() and router.on_overflow == "error":
        names = expert_starts(graph, node)
        over = {n: int(d) for n, d in zip(names, dropped, strict=True) if d}
        raise ValueError(
            f"router {node.name!r}: a batch of {rows} rows sends more rows than the capacity "
            f"{capacity} allows to {over} (rows over capacity); raise capacity (or "
            "capacity_factor), pass a smaller batch_size to predict or evaluate (a capacity "
            "holds per batch there, as per key in a run), or on_overflow='drop' to drop them"
        )
    return ("routed", inputs[0], gate_weights(scores, choice, router.gates, np.dtype(dtype)), route)


def plain_values(graph: Graph, name: str, params: Any, values: dict[str, Any], dtype: Any) -> bool:
    """Evaluates a routing node (or a layer of an expert branch) outside the actors, into
    ``values``; returns False for other nodes. A branch value is ``("branch", rows, array)``.
    ``dtype`` is the run's floating dtype (a router's weights are made in it)."""
    from asyncnn.backends import get_backend

    node = graph.nodes[name]
    backend = get_backend(node.device)
    if node.role == "router":
        values[name] = plain_route(graph, node, params, values, backend, dtype)
        return True
    if node.kind != "layer" or not node.inputs:
        return False
    src = values.get(node.inputs[0])
    if node.role == "merge":
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
        if out is None:
            out = _all_dropped(graph, name, weights, backend.xp)
        values[name] = out
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


def _all_dropped(graph: Graph, name: str, weights: Any, xp: Any) -> Any:
    """The merge ``name``'s output where every choice of every row was dropped: zeros, of the
    graph's width for it (the merge and the plain evaluation alike)."""
    shape = graph.shapes.get(name)
    trail = tuple(shape[1:]) if shape else ()
    return xp.zeros((weights.shape[0], *trail), dtype=weights.dtype)
