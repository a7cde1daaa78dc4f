"""The graph: named nodes (inputs, layers, losses) wired by tensors, validated before compute."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from asyncnn._errors import GraphError
from asyncnn._math._imports import class_path
from asyncnn._math._nn import Sequential
from asyncnn._math._nn import to_spec as module_spec
from asyncnn._math._nn._loops import Loop
from asyncnn._math._nn._routing import Merge, Router
from asyncnn.backends import is_floating, parse_device
from asyncnn.backends._dtypes import unknown_dtype_hint

from ._balance import split_sizes
from ._graph_args import check_module, checked_modules, checked_stages, checked_worker
from ._node import Node, TensorRef
from ._specs import (
    _actor_from_spec,
    _init_offset,
    _module_from_spec,
    _spec_of,
    check_actor_args,
    check_cycles,
    check_spec_layout,
)
from ._structure import check_capacity_factor, check_merge, check_routing

__all__ = ["Graph"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class Graph:
    """A network as a graph of actors.

    Example:
        >>> g = Graph()
        >>> x = g.input("x", shape=(None, 40))
        >>> y = g.input("y", shape=(None,), dtype="int64")
        >>> h = g.layer("stage0", nn.Sequential(nn.Linear(40, 64), nn.ReLU()), x)
        >>> out = g.layer("stage1", nn.Linear(64, 10), h)
        >>> g.loss("loss", nn.CrossEntropyLoss(), out, y)
        >>> g.output("logits", out)
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.outputs: dict[str, str] = {}
        #: each node's output shape, found when the graph is validated (batch of 2)
        self.shapes: dict[str, tuple[int, ...]] = {}

    # -- building --------------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise GraphError(
                f"node name {name!r} is not valid: use letters, digits, '_', '.', '-', starting "
                "with a letter or '_'"
            )
        if name in self.nodes:
            raise GraphError(f"a node named {name!r} already exists; node names must be unique")

    def _resolve(self, who: str, refs: Sequence[Any]) -> tuple[str, ...]:
        names = []
        for i, ref in enumerate(refs):
            if isinstance(ref, TensorRef):
                if ref.graph_id != id(self):
                    raise GraphError(f"{who}: input {i} ({ref!r}) belongs to another graph")
                name = ref.node
            elif isinstance(ref, str):
                name = ref
            else:
                raise GraphError(
                    f"{who}: input {i} is a {type(ref).__name__}; pass the tensor returned by "
                    "g.input(...) or g.layer(...), or a node name"
                )
            if name not in self.nodes:
                raise GraphError(
                    f"{who}: input {i} names unknown node {name!r}; known nodes: "
                    f"{sorted(self.nodes)}"
                )
            if self.nodes[name].kind == "loss":
                raise GraphError(f"{who}: input {i} is the loss node {name!r}, which has no output")
            names.append(name)
        return tuple(names)

    def input(self, name: str, shape: Sequence[int | None], dtype: str = "float32") -> TensorRef:
        """Declares a data input. ``None`` in ``shape`` marks the batch dimension (the first)."""
        self._check_name(name)
        if not isinstance(shape, Sequence) or isinstance(shape, str):
            raise GraphError(f"input {name!r}: shape {shape!r} is not a tuple, e.g. (None, 40)")
        shape = tuple(shape)
        if not shape or shape[0] is not None or any(s is None for s in shape[1:]):
            raise GraphError(
                f"input {name!r}: shape {shape} must start with None (the batch dimension) and "
                "give every other dimension, e.g. (None, 40)"
            )
        dims: list[int] = []
        for d in shape[1:]:
            if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
                raise GraphError(
                    f"input {name!r}: shape {shape} has dimension {d!r}; every dimension after "
                    "the batch's must be an int >= 0"
                )
            dims.append(int(d))
        shape = (None, *dims)
        if dtype is None:  # numpy would read None as float64
            raise GraphError(f"input {name!r}: dtype None; give one, e.g. 'float32' or 'int64'")
        try:
            kind = np.dtype(dtype).kind
        except TypeError as exc:
            raise GraphError(
                f"input {name!r}: unknown dtype {dtype!r}{unknown_dtype_hint(dtype)}"
            ) from exc
        if kind in "OUSMmVc" and not is_floating(np.dtype(dtype)):
            what = "complex numbers" if kind == "c" else "not numbers"
            raise GraphError(
                f"input {name!r}: dtype {dtype!r} is {what}; an input takes floats, ints or "
                "bools (e.g. 'float32' for features, 'int64' for class labels)"
            )
        self.nodes[name] = Node(name, "input", shape=shape, dtype=str(np.dtype(dtype)))
        return TensorRef(id(self), name)

    def layer(
        self,
        name: str,
        module: Any,
        *inputs: TensorRef | str,
        device: str = "cpu",
        worker: int | None = None,
        actor: Any = None,
        actor_args: Mapping[str, Any] | None = None,
        stop_gradient: bool = False,
    ) -> TensorRef:
        """Adds a layer actor computing ``module(params, *inputs)`` on ``device``.

        Args:
            name: the node's name (unique).
            module: an ``asyncnn.nn`` module.
            *inputs: the tensors it reads, in the order ``module`` takes them.
            device: ``"cpu"`` or ``"cuda:N"``.
            worker: the worker process that hosts it (with a cluster).
            actor: a :class:`~asyncnn.LayerActor` subclass with custom ``on_forward`` /
                ``on_backward`` handlers (default: the plain layer actor).
            actor_args: keyword arguments of the custom actor's ``setup`` (plain values:
                None, bool, int, float, str, and lists and string-keyed dicts of those; a
                tuple is taken as a list, so ``setup`` gets a list in every process). They are
                part of the graph's spec, so they reach worker processes, traces and
                checkpoints; ``setup`` gets a copy of them.
            stop_gradient: the layer trains from the gradient of its own output but sends none
                to its inputs; the layers before it then neither wait for nor get a backward
                message from it (local learning: each stage learns from its own loss, and its
                backward never waits for the stages after it).
        """
        self._check_name(name)
        if any(ref == name or getattr(ref, "node", None) == name for ref in inputs):
            raise GraphError(
                f"layer {name!r} reads its own output: a cycle. Only a loop cell's own edge may "
                "be recurrent; build it with g.loop(name, cell, init, xs=..., lengths=...)"
            )
        check_module(f"layer {name!r}", module)
        if not callable(module) or not hasattr(module, "init"):
            raise GraphError(
                f"layer {name!r}: {module!r} is not an asyncnn module (it needs init and __call__)"
            )
        if not inputs:
            raise GraphError(f"layer {name!r} has no inputs")
        try:
            dev = str(parse_device(device))
        except ValueError as exc:
            raise GraphError(f"layer {name!r}: {exc}") from exc
        worker = checked_worker(f"layer {name!r}", worker)
        if not isinstance(stop_gradient, bool | np.bool_):  # bool("no") would read as True
            raise GraphError(
                f"layer {name!r}: stop_gradient={stop_gradient!r:.40}; give True or False"
            )
        names = self._resolve(f"layer {name!r}", inputs)
        if type(module) is Merge:  # (a merge's role, by its module's type, as Node.role)
            # given here directly, or rebuilt from a spec: the checks g.merge makes
            check_merge(self, name, names, module)
        args = check_actor_args(name, actor, actor_args)
        self.nodes[name] = Node(
            name,
            "layer",
            module=module,
            inputs=names,
            device=dev,
            worker=worker,
            custom_actor=actor,
            actor_args=args,
            stop_gradient=bool(stop_gradient),
        )
        for slot, src in enumerate(names):
            self.nodes[src].consumers.append((name, slot))
        return TensorRef(id(self), name)

    def router(
        self,
        name: str,
        gate: Any,
        x: TensorRef | str,
        *extra: TensorRef | str,
        experts: int,
        k: int = 1,
        gates: str = "softmax",
        capacity: int | None = None,
        capacity_factor: float | None = None,
        on_overflow: str = "drop",
        device: str = "cpu",
        worker: int | None = None,
    ) -> TensorRef:
        """Adds a router: each row of ``x`` goes to the ``k`` experts with the best gate scores.

        The experts are the layers that read the returned tensor (one per expert, in the order
        they are added; each may continue as a chain of one-input layers), and their branches
        come back together in :meth:`merge`. See ``docs/dynamic.md``.

        Args:
            name: the node's name.
            gate: a module scoring the experts: ``gate(params, x, *extra) -> (rows, experts)``
                (e.g. ``nn.Linear(d, experts)``; a parameterless module for a fixed condition).
            x: the rows to route.
            *extra: more inputs the gate reads (not routed), e.g. a flag to branch on.
            experts: the number of experts.
            k: experts per row (top-k of the scores).
            gates: ``"softmax"``, ``"normalized"`` (softmax over the chosen k) or ``"none"``
                (weight 1, hard branches).
            capacity: the most rows per expert and key; ``capacity_factor``: or
                ``ceil(capacity_factor * rows * k / experts)``.
            on_overflow: ``"drop"`` (rows over capacity are dropped and counted in
                ``run.statistics()[name]``) or ``"error"``.
            device: where the router runs.
            worker: the worker process that hosts it (with a cluster).
        """
        check_capacity_factor(name, capacity_factor)
        try:
            module = Router(gate, experts, k, gates, capacity, capacity_factor, on_overflow)
        except (TypeError, ValueError) as exc:
            raise GraphError(f"router {name!r}: {exc}") from exc
        return self.layer(name, module, x, *extra, device=device, worker=worker)

    def merge(
        self,
        name: str,
        router: TensorRef | str,
        *branches: TensorRef | str,
        device: str = "cpu",
        worker: int | None = None,
    ) -> TensorRef:
        """Gathers a router's expert branches by row index: row ``i`` of the output is the sum,
        over its kept choices ``j``, of the gate weight times its expert's output row.

        Args:
            name: the node's name.
            router: the router's tensor (from :meth:`router`).
            *branches: the last tensor of each expert branch, in expert order.
        """
        (src,) = self._resolve(f"merge {name!r}", [router])
        mod = self.nodes[src].module
        if self.nodes[src].role != "router":
            raise GraphError(f"merge {name!r}: {src!r} is not a router (make one with g.router)")
        experts = mod.experts
        if len(branches) != experts:
            raise GraphError(
                f"merge {name!r}: router {src!r} has {experts} experts but {len(branches)} "
                "branches were given; pass the last tensor of each expert branch, in order"
            )
        return self.layer(name, Merge(experts), router, *branches, device=device, worker=worker)

    def loop(
        self,
        name: str,
        cell: Any,
        init: TensorRef | str,
        xs: TensorRef | str | None = None,
        lengths: TensorRef | str | None = None,
        *,
        until: Any = None,
        max_steps: int | None = None,
        output: str = "last",
        device: str = "cpu",
        worker: int | None = None,
    ) -> TensorRef:
        """Adds a loop: a cell actor whose output feeds itself, ``h <- cell(params, h, x_t)``.

        Each row of a key runs its own number of steps (``lengths``, or until ``until`` says
        stop); the backward unwinds the steps in reverse (BPTT). See ``docs/dynamic.md``.

        Args:
            name: the node's name.
            cell: the step module: ``cell(params, h, x_t) -> h`` (``cell(params, h)`` without
                ``xs``).
            init: the initial state, ``(rows, ...)``.
            xs: per-step inputs, ``(rows, steps, ...)``.
            lengths: an int input ``(rows,)``: each row's number of steps.
            until: a parameterless module, ``until({}, h)``: one bool per row, ``(rows,)`` or
                ``(rows, 1)``, true where a row stops (any other shape fails when the graph is
                checked, naming the loop).
            max_steps: the most steps (required without ``xs``).
            output: ``"last"`` (each row's final state) or ``"all"`` (every step's state,
                ``(rows, steps, ...)``, zeros after a row's end).
        """
        try:
            module = Loop(cell, xs is not None, lengths is not None, until, max_steps, output)
        except (TypeError, ValueError) as exc:
            raise GraphError(f"loop {name!r}: {exc}") from exc
        inputs = [init] + [r for r in (xs, lengths) if r is not None]
        ref = self.layer(name, module, *inputs, device=device, worker=worker)
        self.nodes[name].recurrent = True
        return ref

    def loss(
        self, name: str, module: Any, *inputs: TensorRef | str, worker: int | None = None
    ) -> None:
        """Adds a loss node: it runs as soon as its inputs arrive and starts the backward wave.

        With a cluster it runs on ``worker``, by default beside the first layer it reads."""
        self._check_name(name)
        check_module(f"loss {name!r}", module)
        if not callable(module):
            raise GraphError(
                f"loss {name!r}: {module!r:.80} is not a loss module; pass one such as "
                "nn.CrossEntropyLoss() or nn.MSELoss()"
            )
        if not inputs:
            raise GraphError(f"loss {name!r} has no inputs")
        worker = checked_worker(f"loss {name!r}", worker)
        names = self._resolve(f"loss {name!r}", inputs)
        # The loss runs where the first layer feeding it runs, so logits need no copy.
        device = next((self.nodes[s].device for s in names if self.nodes[s].kind == "layer"), "cpu")
        self.nodes[name] = Node(
            name, "loss", module=module, inputs=names, device=device, worker=worker
        )
        for slot, src in enumerate(names):
            self.nodes[src].consumers.append((name, slot))

    def output(self, name: str, tensor: TensorRef | str) -> None:
        """Names a tensor as an output of the graph (what ``predict`` returns)."""
        if not isinstance(name, str) or not name:
            raise GraphError(f"output name {name!r:.40} is not valid: give a non-empty string")
        if name in self.outputs:
            raise GraphError(f"an output named {name!r} already exists")
        (src,) = self._resolve(f"output {name!r}", [tensor])
        self.outputs[name] = src

    @classmethod
    def sequential(
        cls,
        modules: Sequence[Any],
        loss: Any,
        stages: int | Sequence[int] = 1,
        input_shape: Sequence[int | None] | None = None,
        input_dtype: str = "float32",
        label_shape: Sequence[int | None] = (None,),
        label_dtype: str = "int64",
        devices: Sequence[str] | None = None,
        balance: str = "params",
        workers: Sequence[int | None] | None = None,
        balance_rows: int = 64,
    ) -> Graph:
        """A chain of stages over consecutive ``modules``, with inputs ``"x"``, ``"y"``.

        Args:
            modules: the layers in order.
            loss: the loss module, applied to the last stage's output and ``"y"``.
            stages: ``K`` (split into K stages balanced by ``balance``) or the number of
                consecutive modules in each stage, e.g. ``[2, 3]``.
            input_shape: the shape of input ``"x"`` (None first, the batch dimension). By
                default ``(None, in_features)`` when the first module has ``in_features`` (a
                ``Linear``), else ``(None,)``; give it for anything else (a convolution's
                ``(None, C, L)``).
            input_dtype: the dtype of ``"x"``.
            label_shape: the shape of input ``"y"``.
            label_dtype: the dtype of ``"y"``.
            devices: the device of each stage (default all ``"cpu"``).
            balance: how stages are balanced when ``stages`` is an int: ``"params"``
                (parameter count), ``"flops"`` (per-sample FLOPs: a module of your own with
                parameters must define ``flops``, else it is refused) or ``"time"`` (each module's
                measured forward and backward time on a batch of ``balance_rows`` rows, float32,
                one BLAS thread, on this machine's CPU: the fastest of five timings; a
                ``Linear`` with a bias and its ``ReLU`` also as the one op a stage holding both
                runs them as; what runs fastest decides, so stage boundaries may differ between
                machines).
            workers: the worker process of each stage, with a cluster (``None``: the driver).
            balance_rows: the rows of the timing batch of ``balance="time"``.

        Returns:
            A graph with nodes ``"stage0"`` .. ``"stage{K-1}"`` (each an ``nn.Sequential``),
            ``"loss"``, and output ``"logits"``.
        """
        modules = checked_modules(modules)
        if input_shape is None:
            first = getattr(modules[0], "in_features", None) if modules else None
            input_shape = (None,) if not isinstance(first, int) else (None, first)
        g = cls()
        h: TensorRef = g.input("x", input_shape, input_dtype)  # checked before it is used
        y = g.input("y", label_shape, label_dtype)
        input_shape = g.nodes["x"].shape or (None,)
        sizes = split_sizes(
            modules, checked_stages(stages), balance, input_shape, input_dtype, balance_rows
        )
        for what, given in (("devices", devices), ("workers", workers)):
            if given is None:
                continue
            if isinstance(given, str) or not isinstance(given, Sequence | np.ndarray):
                raise GraphError(
                    f"sequential: {what}={given!r}; give a list with one entry per stage "
                    f"({len(sizes)} stages)"
                )
            if len(given) != len(sizes):
                raise GraphError(f"sequential: {len(sizes)} stages but {len(given)} {what}")
        start = 0
        for k, size in enumerate(sizes):
            dev = devices[k] if devices is not None else "cpu"
            w = workers[k] if workers is not None else None
            h = g.layer(
                f"stage{k}", Sequential(*modules[start : start + size]), h, device=dev, worker=w
            )
            g.nodes[f"stage{k}"].init_offset = start
            start += size
        g.loss("loss", loss, h, y)
        g.output("logits", h)
        return g

    # -- queries ---------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Layer node names in topological order (their stage index is their position)."""
        return [n.name for n in self.nodes.values() if n.kind == "layer"]

    @property
    def inputs(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.kind == "input"]

    @property
    def losses(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.kind == "loss"]

    def __repr__(self) -> str:
        counts = (len(self.inputs), len(self.layers), len(self.losses))
        return "Graph({} inputs, {} layers, {} losses)".format(*counts)

    # -- validation ------------------------------------------------------------------------------
    def check_structure(self) -> None:
        """Raises :class:`GraphError` unless every layer reaches a loss and a loss exists.

        Nodes can only read nodes added before them, so a graph built with this API has no
        cycles; a graph rebuilt from a spec is checked for them in ``from_spec``.
        """
        if not self.losses:
            raise GraphError("the graph has no loss node: add one with g.loss(name, module, ...)")
        if not self.layers:  # (its loss would wait for a layer's output for ever)
            raise GraphError(
                f"the graph has no layer, so nothing to train: its losses {self.losses} read "
                "inputs only; add one with g.layer(name, module, *inputs)"
            )
        reaches: set[str] = set(self.losses)
        for node in reversed(list(self.nodes.values())):
            # a gradient reaches a node only through consumers that send one back
            if any(c in reaches and not self.nodes[c].stop_gradient for c, _ in node.consumers):
                reaches.add(node.name)
        for name in self.layers:
            if name not in reaches:
                raise GraphError(
                    f"layer {name!r} reaches no loss through layers that send gradients back, so "
                    "it would never get a gradient; connect its output to a loss (or remove it)"
                )
        for name in self.inputs:
            if not self.nodes[name].consumers:
                raise GraphError(f"input {name!r} is not read by any node")
        check_routing(self)

    def main_classes(self) -> list[str]:
        """The classes this graph names (custom actors, modules at any depth) that are defined
        in ``__main__`` (a script or a notebook): another process cannot import them, so they
        cannot reach worker processes, and a trace naming them replays only where ``__main__``
        defines them again."""
        found: list[str] = []

        def visit(obj: Any) -> None:
            if isinstance(obj, tuple):
                for item in obj:
                    visit(item)
                return
            cls = obj if isinstance(obj, type) else type(obj)
            if cls.__module__ == "__main__" and cls.__qualname__ not in found:
                found.append(cls.__qualname__)
            if not isinstance(obj, type) and dataclasses.is_dataclass(obj):
                for f in dataclasses.fields(obj):
                    visit(getattr(obj, f.name))

        for node in self.nodes.values():
            if node.module is not None:
                visit(node.module)
            if node.custom_actor is not None:
                visit(node.custom_actor)
        return found

    # -- specs -----------------------------------------------------------------------------------
    def to_spec(self) -> dict[str, Any]:
        """The graph as a plain msgpack-able dict (modules by spec, not pickle)."""
        nodes = []
        for n in self.nodes.values():
            entry: dict[str, Any] = {"name": n.name, "kind": n.kind, "inputs": list(n.inputs)}
            if n.kind == "input":
                entry["shape"] = list(n.shape or ())
                entry["dtype"] = n.dtype
            else:
                entry["module"] = _spec_of(n, "module", module_spec, n.module)
            if n.kind == "layer":
                entry["device"] = n.device
                entry["worker"] = n.worker
                custom = n.custom_actor
                if custom is not None:
                    entry["actor"] = _spec_of(n, "actor", class_path, custom)
                if n.actor_args:
                    entry["actor_args"] = dict(n.actor_args)
                if n.stop_gradient:
                    entry["stop_gradient"] = True
                if n.recurrent:  # the loop cell's self edge: the one cycle a graph may have
                    entry["recurrent"] = True
                if n.init_offset is not None:
                    entry["init_offset"] = n.init_offset
            if n.kind == "loss" and n.worker is not None:
                entry["worker"] = n.worker
            nodes.append(entry)
        return {"nodes": nodes, "outputs": dict(self.outputs)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Graph:
        """Rebuilds a graph from :meth:`to_spec` output."""
        g = cls()
        check_spec_layout(spec)
        try:
            check_cycles(spec["nodes"])
            for entry in spec["nodes"]:
                kind = entry["kind"]
                if kind == "input":
                    g.input(entry["name"], tuple(entry["shape"]), entry["dtype"])
                elif kind == "layer":
                    g.layer(
                        entry["name"],
                        _module_from_spec(entry),
                        *entry["inputs"],
                        device=entry.get("device", "cpu"),
                        worker=entry.get("worker"),
                        actor=_actor_from_spec(entry),
                        actor_args=entry.get("actor_args"),
                        stop_gradient=bool(entry.get("stop_gradient", False)),
                    )
                    node = g.nodes[entry["name"]]
                    node.recurrent = bool(entry.get("recurrent", False))
                    node.init_offset = _init_offset(node, entry.get("init_offset"))
                    if node.recurrent and node.role != "loop":
                        raise GraphError(
                            f"graph spec: node {node.name!r} is marked recurrent but is not a "
                            "loop (only g.loop(...) nodes have a recurrent edge)"
                        )
                elif kind == "loss":
                    g.loss(
                        entry["name"], _module_from_spec(entry), *entry["inputs"],
                        worker=entry.get("worker"),
                    )  # fmt: skip
                else:
                    raise GraphError(f"graph spec: node {entry.get('name')!r} has kind {kind!r}")
            for name, src in spec.get("outputs", {}).items():
                g.output(name, src)
        except KeyError as exc:
            raise GraphError(f"graph spec is missing the field {exc}") from exc
        return g
