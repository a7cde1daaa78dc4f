"""Layer actors: one async task per layer node, processing forward and backward messages.

A :class:`LayerActor` runs ``vjp`` on a forward message, sends the output on and keeps the
pullback under the key; on the backward message for that key it calls the pullback, sends the
input gradients upstream and accumulates its parameter gradients until the policy says to update.
The shared base of every actor is ``_actor_base.py``; the loss actor (``_loss_actor.py``) and
the routing and loop actors (``_routing.py``, ``_loops.py``) build on it and on
:class:`LayerActor`.

To write a custom actor, subclass :class:`LayerActor` and override :meth:`LayerActor.on_forward`
and/or :meth:`LayerActor.on_backward` (both async); pass the class as ``g.layer(..., actor=Cls)``.

Under a policy that splits backwards (``ZeroBubbleH1``) a backward is two operations of the
order: :meth:`LayerActor.on_backward_input` sends the inputs' gradients upstream at once, and
:meth:`LayerActor.on_backward_weight`, later, accumulates the parameters' gradients. Under an
interleaved policy the stages of one device take turns (``_turns.DeviceTurns``): an actor
computes only when the device's order has reached its operation.

Which operation runs when, and in which task, is decided by the base class ``Serving``
(``_serving.py``): the mailbox, the policy's order and the hand-over to a sender's task. This
file holds what each operation computes; the checks of what a custom actor's hooks return are
``_hook_checks.py``'s, and what the actor works out once at its set-up ``_layer_setup.py``'s.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._errors import ActorError
from asyncnn._math._autodiff import vjp
from asyncnn._math._autodiff_split import vjp_split
from asyncnn._math._nn._linear import first_embedding
from asyncnn._math._pytree import tree_leaves

from ._capture import ActorGraphs
from ._graph_checks import check_layer_rows
from ._hook_checks import HookChecks, _checked_shapes, _custom_hook
from ._layer_setup import (
    check_device_mates,
    check_split_overrides,
    draw_places,
    flops_per_sample,
    is_stochastic,
)
from ._messages import BACKWARD, FORWARD, Message
from ._policies import StageOrder
from ._serving import Serving
from ._statistics import ActorStatistics

if TYPE_CHECKING:
    from ._context import ActorContext
    from ._node import Node

__all__ = ["ActorStatistics", "LayerActor"]


class LayerActor(Serving, HookChecks):
    """The actor of a layer node. Subclass it to write a custom actor.

    Override :meth:`on_forward` and :meth:`on_backward`; call ``await self.compute(fn, *args)``
    to run work on this actor's device through the pool, and use :attr:`params`,
    :meth:`apply_gradients` to change weights.
    """

    def __init__(
        self,
        ctx: ActorContext,
        node: Node,
        stage: int,
        num_stages: int,
        params: Any,
        opt_state: Any,
        version: int,
    ) -> None:
        super().__init__(ctx, node)
        self.module = node.module
        self.stage = stage
        self.order: StageOrder = ctx.orders[node.name]
        self.order.start(ctx.first_key)
        # the turns of the device this stage shares with others (an interleaved order)
        self.turns = self.order.device_turns()
        # a backward in two operations: the input half, and later the weight half
        self.splits_backward = ctx.policy.splits_backward()
        self.weight_due: dict[int, dict[str, Any]] = {}  # key -> meta, input half done
        try:
            if self.turns is not None:
                check_device_mates(self.name, self.turns, ctx)
            if self.splits_backward:
                check_split_overrides(type(self), self.name, ctx, LayerActor)
        except BaseException:
            self.send_channel.close()  # the run never sees this actor: close its inbox here
            self.inbox.close()
            raise
        self.params = params
        self.opt_state = opt_state
        self.version = version
        self.consumers = node.consumers
        # consumers that send a gradient back (a stop-gradient layer sends none)
        self.grad_edges = sum(1 for c, _ in node.consumers if not ctx.graph.nodes[c].stop_gradient)
        self.bwd_grads: dict[int, list[Any]] = {}
        self.bwd_count: dict[int, int] = {}
        self.store: dict[int, tuple[Any, int, Any]] = {}  # key -> (pullback, version, inputs)
        self.held_bytes: dict[int, int] = {}
        self.version_refs: dict[int, int] = {}  # version -> stored keys that reference it
        self.skipped: set[int] = set()  # keys this actor skipped (no rows were routed to it)
        self.acc_count = 0  # (acc starts as None: the class's default)
        self.mb_backwards: dict[int, int] = {}  # minibatch -> backwards done here
        # keep each key's pullback, else its inputs, to recompute at the latest version
        self.keep_pullback = ctx.policy.keeps_pullback()
        self.param_size = sum(int(getattr(p, "size", 0)) for p in tree_leaves(params))
        # What a custom hook returns is checked against what the graph expects (asyncnn's own
        # hooks give it by construction, and pay nothing): an output's rows, trailing shape and
        # dtype; each gradient's shape and dtype against the input it is of (kept per key from
        # the forward on). Else the error surfaced at the node that read it, under its name.
        cls = type(self)
        self.checks_output = _custom_hook(cls, "on_forward")
        self.checks_grads = _custom_hook(cls, "on_backward") or _custom_hook(
            cls, "on_backward_input"
        )
        self.input_sigs: dict[int, list[tuple[tuple[int, ...], Any]]] = {}
        self.checked_shapes = _checked_shapes(ctx.graph, node)
        self.stochastic = is_stochastic(self.module)
        self.draw_places = draw_places(node) if self.stochastic else None
        self.flops_per_sample = flops_per_sample(self.module, ctx.graph, node)
        # CUDA graphs of the forward, backward and update (when active, see _capture)
        self.graphs: ActorGraphs | None = None
        if not self.on_cpu and not self.stochastic and ctx.cuda_graphs:
            self.graphs = ActorGraphs(self)
        # -- staleness: the delays of the gradients accumulated since the last update (for the
        # update that applies them: its trace event, statistics and a correction's mean delay),
        # and, for a policy whose gradient correction needs them, the weights of earlier
        # versions that stored keys still reference
        self.pending_delays: list[int] = []
        self.keeps_forward_weights = ctx.policy.needs_forward_weights()
        self.weights_by_version: dict[int, Any] = {}
        # earlier versions kept besides those stored keys reference (PipeDream2BW's double
        # buffer); the (minibatch, version) this run's pinning counts from (its first forward's,
        # or earlier by the versions held from its state, see load_earlier); predicted weights
        self.versions_back = ctx.policy.versions_kept()
        self.run_start: tuple[int, int] | None = None
        self.held_back = 0
        self.predicted: Any = None
        # what the (frozen) policy does to stale gradients and updates, asked once
        self.corrects_gradients = ctx.policy.corrects_gradients()
        self.corrects_updates = ctx.policy.corrects_updates()
        self.predicts_weights = ctx.policy.predicts_weights()
        self.pins_weights = bool(self.versions_back) or self.predicts_weights
        self.forward_weights_asked = False
        # the average weight change of a policy that recomputes at estimated weights
        self.change_decay = ctx.policy.weight_change_decay()
        self.weight_change: Any = None
        # messages taken in the sender's task (see run_directly): without a trace, under a
        # flush policy (a continuous one would let the run's admissions run ahead of the
        # losses), one whole backward at a time, and no device shared with other stages by
        # turns; on a GPU (whose work is queued on the actor's stream, not waited for) only
        # without NaN checks, the one wait for the device inside an operation
        self.direct = (
            type(self) is LayerActor  # a custom actor's work may wait
            and ctx.recorder is None
            and ctx.policy.waits_between_minibatches()
            and self.turns is None
            and not self.splits_backward
            and (self.on_cpu or not ctx.checks_finite)
        )

    # -- set-up and extra state -----------------------------------------------------------------
    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Called once, before any message, with the node's ``actor_args`` as keyword
        arguments (from ``g.layer(..., actor=Cls, actor_args={...})``): override it to
        configure the actor and create per-actor state, with the arguments it takes
        (``def setup(self, factor=1.0)``). The default takes no arguments.

        Raises:
            TypeError: arguments this actor does not take.
        """
        # (``*args, **kwargs``: a type checker then accepts any override's own arguments)
        cls = type(self).__name__
        if args:
            raise TypeError(
                f"layer {self.name!r}: {cls}.setup passed {len(args)} positional argument(s) "
                f"{args!r:.80} to LayerActor.setup, which takes none; the run calls setup with "
                "the node's actor_args as keywords: take them in your setup's own parameters "
                "and call super().setup() without them"
            )
        if kwargs:
            raise TypeError(
                f"layer {self.name!r}: {cls} takes no actor_args (got {sorted(kwargs)}); "
                "override setup(self, ...) to accept them"
            )

    def actor_state(self) -> Any:
        """This actor's own state besides its parameters and optimizer state (a pytree of
        arrays and numbers, e.g. a synthesizer's weights), or None. A run carries it over to
        the next ``fit`` (``RunState.actor_states``) and checkpoints keep it."""
        return None

    def load_actor_state(self, state: Any) -> None:
        """Restores what :meth:`actor_state` returned (called after :meth:`setup`).

        Raises:
            TypeError: the actor keeps no state of its own but was given some.
        """
        raise TypeError(
            f"layer {self.name!r}: {type(self).__name__} was given actor state but keeps none; "
            "override actor_state and load_actor_state together"
        )

    # -- the operations (the base, Serving, runs each in its turn) ------------------------------
    def _fail(self, exc: BaseException, kind: str, key: int | None) -> ActorError:
        err = super()._fail(exc, kind, key)
        if isinstance(exc, TypeError) and "await" in str(exc):
            cls = type(self)
            sync = [h for h in _ASYNC_HOOKS if not inspect.iscoroutinefunction(getattr(cls, h))]
            if sync:  # a hook written as a plain def: its result was awaited
                names = ", ".join(f"{cls.__name__}.{h}" for h in sync)
                err.args = (f"{err.args[0]} ({names} must be defined with async def)",)
        return err

    def _cost(self, rows: int) -> float:
        # FLOPs of the forward: the module's own count per sample where it gives one (a
        # convolution does far more work than its parameter count says), else 2 per parameter
        return (self.flops_per_sample or 2.0 * self.param_size) * rows

    def _rng(self, key: int) -> Any:
        if not self.stochastic:
            return None
        places = self.draw_places
        if places is not None:  # a stage of a chain: one stream per module, by its place
            seed, rng = self.ctx.seed, self.backend.rng
            return [
                None if i is None else rng(np.random.SeedSequence([seed, i, key, _PLACE_TAG]))
                for i in places
            ]
        seq = np.random.SeedSequence([self.ctx.seed, self.stage, key, _STAGE_TAG])
        return self.backend.rng(seq)

    async def _forward(self, key: int) -> None:
        inputs = self.fwd_slots.pop(key)
        del self.fwd_count[key]
        meta = self.meta[key]
        self.after = self.events.pop(key, [])
        if self._skips(inputs):
            # Nothing came for this key (a router sent its rows elsewhere): pass the skip on, so
            # every actor still sees every key and static stage orders stay valid.
            self.skipped.add(key)
            self.stats.skipped += 1
            tensors: list[tuple[Any, ...]] = [(None,)] * len(self.consumers)
        else:
            if self.checks_grads:
                self.input_sigs[key] = [(tuple(x.shape), x.dtype) for x in inputs]
            out = await self.on_forward(key, inputs, meta)
            if self.checks_output:
                self._check_output(out, inputs)
                # what the hook returned, where it is sent: the default on_forward it may have
                # called left its check to here (its result is not what goes on)
                if self.ctx.checks_finite:
                    await self._check_finite(FORWARD, key, out, inputs)
            tensors = self._outputs(key, out)
        for (c_name, slot), out in zip(self.consumers, tensors, strict=True):
            msg = Message(FORWARD, key, self.version, self.name, c_name, slot, out, meta)
            msg.event = self.last_event  # None on the CPU
            await self._send(msg)
        self.stats.forwards += 1

    def _skips(self, inputs: list[Any]) -> bool:
        """Whether a key's forward is a skip: every input is ``None`` (routing sent it nothing)."""
        if len(inputs) == 1:  # the common case, answered first
            return inputs[0] is None
        if all(x is None for x in inputs):
            return True
        if any(x is None for x in inputs):
            missing = [i for i, x in enumerate(inputs) if x is None]
            raise ValueError(
                f"layer {self.name!r} got no rows on input slot(s) {missing} but data on the "
                "others; a layer behind a router must read only its own branch"
            )
        return False

    def _outputs(self, key: int, out: Any) -> list[tuple[Any, ...]]:
        """The tensors sent to each consumer (the same output to all, unless a router)."""
        if out is None or type(out) is tuple or type(out) is list:
            # (the consumers would fail on it under their own names, or take None for a skip)
            raise TypeError(
                f"{type(self).__name__}.on_forward returned "
                f"{'None' if out is None else type(out).__name__}; it must return the layer's "
                "output, one array (sent to every consumer)"
            )
        return [(out,)] * len(self.consumers)

    async def _output_grad(self, parts: list[Any]) -> Any:
        """The gradient of a key's output from one part per consumer edge: their sum, in
        consumer order (the same sum whatever the timing), on this actor's stream."""
        if len(parts) == 1 and self.backend.is_local(parts[0]):
            # nothing to add or move: the pullback's compute waits for the part's event
            return parts[0]
        return await self.compute(self._sum_parts, parts, cost=0)

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        """Computes a key's output from its inputs and keeps what its backward will need.

        The default runs ``vjp`` of the module at the weights the policy gives this forward
        (:meth:`forward_weights`: the latest, a predicted or a pinned version) and stores the
        pullback (or, when the policy recomputes at the latest version, the inputs).
        """
        rows = int(meta.get("rows", 1))
        params, version = self.forward_weights(key, meta)
        if self.keep_pullback:
            vjp_fn: Any = self._vjp
            if self.splits_backward:
                vjp_fn = self._vjp_split
            elif self.graphs is not None:
                vjp_fn = functools.partial(self.graphs.vjp, slot=self.graphs.slot(meta))
            out, pullback = await self.compute(
                vjp_fn, params, inputs, self._rng(key), cost=self._cost(rows)
            )
            self._hold(key, (pullback, version, None), inputs, out)
        else:
            apply = self._apply if self.graphs is None else self.graphs.apply
            out = await self.compute(apply, params, inputs, self._rng(key), cost=self._cost(rows))
            self._hold(key, (None, version, inputs), inputs, out)
        shape = getattr(out, "shape", None)
        if shape is not None and (not shape or shape[0] != inputs[0].shape[0]):
            # the graph's check saw zeros, where a layer that drops rows by their values (a
            # filter) kept them all: named here, not by the loss the short rows reach
            check_layer_rows(self.node, [x.shape for x in inputs], shape)
        if self.ctx.checks_finite and not self.checks_output:
            # (a custom on_forward's result is checked where it is sent, see _forward: one
            # check per value, each a wait for the device)
            await self._check_finite(FORWARD, key, out, inputs)
        return out

    async def _check_finite(
        self, kind: str, key: int, value: Any, inputs: list[Any] | None = None
    ) -> None:
        """With ``check_finite``: waits for the device, then fails on NaN or Inf in ``value``
        (given the forward's ``inputs``, with the error of an Embedding's id out of range)."""
        if self.ctx.checks_finite:
            await self.wait_for_device()
            try:
                self.ctx.check_finite(self.name, kind, key, value)
            except ActorError as exc:
                embedding = first_embedding(self.module)
                if embedding is None or not inputs:
                    raise
                try:  # GPU ids make NaN rows, not an error: read them back, on this path only
                    embedding.check_ids(inputs[0])
                except IndexError as bad:
                    raise ActorError(self.name, kind, key, f"{exc}: {bad}") from bad
                raise

    def _apply(self, params: Any, inputs: list[Any], rng: Any) -> Any:
        return self.module(params, *self._to_device(inputs), rng=rng)

    def _vjp(self, params: Any, inputs: list[Any], rng: Any) -> tuple[Any, Any]:
        inputs = self._to_device(inputs)
        if self.any_input_is_layer:
            return vjp(lambda p, xs: self.module(p, *xs, rng=rng), params, inputs)
        # Inputs straight from the data need no gradient: leave them out of the trace, so the
        # pullback does not compute one (for a first dense layer that is a whole matmul saved).
        out, pullback = vjp(lambda p: self.module(p, *inputs, rng=rng), params)
        return out, lambda g: (pullback(g)[0], [None] * len(inputs))

    def _vjp_split(self, params: Any, inputs: list[Any], rng: Any) -> tuple[Any, Any]:
        """:meth:`_vjp` with a pullback in two halves (``vjp_split``): ``pullback(g)`` gives
        ``(input_grads, weight_pullback)``, one input gradient per slot."""
        inputs = self._to_device(inputs)
        if self.any_input_is_layer:
            out, split = vjp_split(lambda p, xs: self.module(p, *xs, rng=rng), params, inputs)
            return out, lambda g: _first_input(split(g))
        out, split = vjp_split(lambda p: self.module(p, *inputs, rng=rng), params)
        return out, lambda g: ([None] * len(inputs), split(g)[1])

    async def _backward(self, key: int, split: bool = False) -> None:
        parts = self.bwd_grads.pop(key)
        del self.bwd_count[key]
        meta = self.meta.pop(key)
        self.after = self.events.pop(key, [])
        entry = self.store.get(key)
        # the version the gradients are computed with: the stashed one, else the current one
        used = entry[1] if entry is not None and entry[0] is not None else self.version
        input_grads: list[Any] | None = None
        if split:  # the input half: the weight half follows when the order says
            if key not in self.skipped:
                input_grads = self._checked_grads(
                    "on_backward_input",
                    await self.on_backward_input(key, await self._output_grad(parts), meta),
                )
                if self.checks_grads:
                    await self._check_grads("on_backward_input", key, input_grads)
            self.weight_due[key] = meta
            await self._send_grads(key, used, input_grads, meta)
            return
        if key in self.skipped:  # a skipped key: no gradient upstream, a zero one for the weights
            self.skipped.discard(key)
            if self.param_size:
                await self.accumulate(None, meta)
        else:
            input_grads = self._checked_grads(
                "on_backward", await self.on_backward(key, await self._output_grad(parts), meta)
            )
            if self.checks_grads:
                await self._check_grads("on_backward", key, input_grads)
        # done before the gradients leave (the update, if due, is applied already): a cluster
        # worker's report then rides with them instead of waking the driver on its own
        self.stats.backwards += 1
        self.ctx.backward_done(self.name, key)
        await self._send_grads(key, used, input_grads, meta)

    async def _check_grads(self, hook: str, key: int, input_grads: list[Any] | None) -> None:
        """A custom backward hook's input gradients, where they are sent: shapes and dtypes,
        then (``check_finite``) NaN and Inf, which the default hook it may have called left to
        here (its result is not what goes upstream)."""
        self._check_grad_shapes(hook, key, input_grads)
        if self.ctx.checks_finite:
            await self._check_finite(BACKWARD, key, input_grads)

    async def _backward_weight(self, key: int) -> None:
        meta = self.weight_due.pop(key)
        if key in self.skipped:
            self.skipped.discard(key)
            if self.param_size:
                await self.accumulate(None, meta)
        else:
            # (typed None, but a subclass may return the gradients it meant for the inputs)
            hook: Any = self.on_backward_weight
            returned = await hook(key, meta)
            if returned is not None:
                raise TypeError(
                    f"{type(self).__name__}.on_backward_weight returned "
                    f"{type(returned).__name__}; it must return None: the inputs' gradients "
                    "are on_backward_input's to return, and the parameters' go to "
                    "self.accumulate(param_grads, meta)"
                )
        self.stats.backwards += 1
        self.ctx.backward_done(self.name, key)

    async def recompute_weights(self, forward_version: int) -> Any:
        """The weights a backward without its forward's stashed pullback differentiates at: the
        latest, or the policy's estimate of the forward's (``DiscrepancyCorrection``)."""
        if self.change_decay is None:
            return self.params
        return await self.compute(
            self.ctx.policy.backward_weights,
            self.params,
            self.weight_change,
            self.version - forward_version,
            cost=2.0 * self.param_size,
        )

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        """Turns the gradient of a key's output into gradients of its inputs (one per input
        slot) and accumulates the parameter gradients; updates when the policy says so."""
        pullback, forward_version, inputs = self._stored(key, "on_backward", take=True)
        self._check_forward_weights_asked(key)
        rows = int(meta.get("rows", 1))
        if pullback is None and self.graphs is not None and self.change_decay is None:
            # recompute at the latest version, forward and backward in one graph
            param_grads, input_grads = await self.compute(
                self.graphs.backward_latest, inputs, grad, cost=3 * self._cost(rows)
            )
        else:
            if pullback is None:  # recompute (no stashing)
                weights = await self.recompute_weights(forward_version)
                pullback = await self.compute(
                    lambda: self._vjp(weights, inputs, self._rng(key))[1], cost=self._cost(rows)
                )
            param_grads, input_grads = await self.compute(pullback, grad, cost=2 * self._cost(rows))
        if self.ctx.checks_finite and not self.checks_grads:  # (a custom hook's: _check_grads)
            await self._check_finite(BACKWARD, key, input_grads)
        await self._settle(param_grads, meta, forward_version)
        return list(input_grads)

    async def on_backward_input(
        self, key: int, grad: Any, meta: dict[str, Any]
    ) -> list[Any] | None:
        """The input half of a split backward (a policy whose :meth:`Policy.splits_backward`
        is true): turns the gradient of a key's output into gradients of its inputs (one per
        input slot), sent upstream at once, and keeps the key's residuals for
        :meth:`on_backward_weight`."""
        pullback, forward_version, inputs = self._stored(key, "on_backward_input")
        self._check_forward_weights_asked(key)
        rows = int(meta.get("rows", 1))
        input_grads, weight_pullback = await self.compute(pullback, grad, cost=self._cost(rows))
        self.store[key] = (weight_pullback, forward_version, inputs)
        if self.ctx.checks_finite and not self.checks_grads:  # (a custom hook's: _check_grads)
            await self._check_finite(BACKWARD, key, input_grads)
        return list(input_grads)

    async def on_backward_weight(self, key: int, meta: dict[str, Any]) -> None:
        """The weight half of a split backward: the key's parameter gradients from the residuals
        :meth:`on_backward_input` kept, accumulated; updates when the policy says so. It sends
        nothing: an override must return None (the runtime refuses anything else)."""
        weight_pullback, forward_version, _ = self._stored(key, "on_backward_weight", take=True)
        rows = int(meta.get("rows", 1))
        param_grads = await self.compute(weight_pullback, cost=self._cost(rows))
        await self._settle(param_grads, meta, forward_version)

    def _stored(self, key: int, hook: str, take: bool = False) -> tuple[Any, int, Any]:
        """A key's entry in :attr:`store` (taken out of it with ``take``), which the default
        ``on_forward`` put there; a clear error where there is none (a bare ``KeyError`` from
        the dict otherwise; one dict lookup per backward)."""
        if key in self.store:
            return self._unhold(key) if take else self.store[key]
        cls = type(self)
        if _custom_hook(cls, "on_forward"):
            why = (
                f"{cls.__name__}.on_forward was overridden without storing it (the default "
                "on_forward keeps the key's pullback there for the default backward); call "
                "`await super().on_forward(key, inputs, meta)` in it, or override "
                f"{hook} too (and on_backward_input and on_backward_weight under a policy that "
                "splits backwards) and keep what it needs yourself"
            )
        else:
            why = (
                "its backward already took it: a backward hook must call the default "
                f"{hook} at most once per key"
            )
        raise RuntimeError(
            f"layer {self.name!r}: the default {hook} found no forward state for key {key} in "
            f"self.store: {why}"
        ) from None

    def _check_forward_weights_asked(self, key: int) -> None:
        if self.pins_weights and not self.forward_weights_asked:
            raise RuntimeError(
                f"layer {self.name!r}: the policy {self.ctx.policy.name} gives forwards their "
                f"weights, but {type(self).__name__}.on_forward computed key {key} without "
                "asking forward_weights(key, meta)"
            )


#: the last word of the seeds of a node's one stream (by its stage) and of a chain's per-module
#: streams (by the module's place in the whole chain): distinct, so the two never coincide
_STAGE_TAG = 0x5EED
_PLACE_TAG = 0xC4A1

#: the hooks the runtime awaits: a custom actor must define them with ``async def``
_ASYNC_HOOKS = ("on_forward", "on_backward", "on_backward_input", "on_backward_weight")


def _first_input(halves: tuple[tuple[Any, ...], Any]) -> tuple[list[Any], Any]:
    """A split pullback's halves over one list of inputs: the list's gradients, the weight half."""
    (input_grads,), weight_pullback = halves
    return list(input_grads), weight_pullback
