"""A run's side of its actors: the local actors it makes from a :class:`RunState` (each set up
with its node's arguments and own state), and the calls they make back to it, which the run
hands them in their :class:`ActorContext`: progress (the watchdog's clock), a key's backward done
at a stage (the keys in flight), a key's share of its minibatch's loss (the losses, and the
caller's ``on_loss``), and the NaN/Inf check. Apart from ``_run.py``, the scheduler, because
none of it decides what goes in: each hears from the actors what has come out.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncnn._errors import ActorError

from ._actor_table import actor_class
from ._checks import first_not_finite
from ._loss_actor import LossActor
from ._setup import _set_up, record_setup_failure

if TYPE_CHECKING:
    import anyio

    from ._context import ActorContext
    from ._graph import Graph
    from ._state import RunState

__all__ = ["NamedOnLoss", "RunActors"]


#: how the error of a run's ``on_loss`` that raised names the function, unless it names itself
_GIVEN_ON_LOSS = "the on_loss function given to open_run"


@dataclass(frozen=True)
class NamedOnLoss:
    """A run's ``on_loss`` with the words that name it in the error it may raise: ``Trainer.fit``
    passes its own so (an error there is not in a function its caller gave ``open_run``).

    Attributes:
        fn: called as ``fn(minibatch, loss, rows)``.
        name: the function as the error names it (where it raised).
    """

    fn: Callable[[int, float, int], None]
    name: str

    def __call__(self, minibatch: int, loss: float, rows: int) -> None:
        self.fn(minibatch, loss, rows)


@dataclass
class _Pending:
    """A minibatch whose loss is still being assembled from its keys."""

    keys: int  # the shares expected: one per key and loss node
    values: list[float] = field(default_factory=list)  # the shares reported so far


class RunActors:
    """A run's side of its actors, a base of :class:`~._run.Run` (whose set-up gives the
    attributes below)."""

    #: the graph's layer nodes, in stage order
    layers: list[str]
    num_stages: int
    #: what the actors see of this run
    context: ActorContext
    #: the actors of this process
    local: dict[str, Any]
    #: when an actor last made progress (``time.perf_counter``)
    last_event: float
    #: keys admitted whose backward wave has not finished
    in_flight: int
    #: key -> the stages that have done its backward
    _done_count: dict[int, int]
    #: minibatch -> its loss, once every key of it has reported
    losses: dict[int, float]
    #: minibatch -> the shares of its loss reported so far
    _pending: dict[int, _Pending]
    #: the caller's on_loss (a NamedOnLoss, a plain function) or None
    _on_loss: Any
    #: every tensor is checked for NaN/Inf
    checks_finite: bool
    #: set when a key retires or a minibatch's loss is known (made only while someone waits)
    _changed: anyio.Event | None

    def _start_actors(self, graph: Graph, state: RunState, hosted: Collection[str] | None) -> None:
        """Makes the local actors (each set up with its node's arguments and own state)."""
        for i, name in enumerate(self.layers):
            if hosted is not None and name not in hosted:
                continue
            node = graph.nodes[name]
            cls = actor_class(node)
            try:
                actor = cls(
                    self.context,
                    node,
                    i,
                    self.num_stages,
                    state.params[name],
                    state.opt_states[name],
                    state.versions[name],
                )
            except Exception as exc:  # (the base's own refusals as it is made: traced too)
                record_setup_failure(self.context.recorder, name, "setup", exc)
                raise
            actor.acc, actor.acc_count = state.pending_grads.get(name, (None, 0))
            if actor.acc_count:  # (the carried gradients' delays, for the update applying them)
                actor.pending_delays[:] = state.pending_delays.get(name, ())
            actor.load_earlier(state.earlier_params.get(name))
            self.local[name] = actor  # before its set-up, so a failure closes its inbox too
            _set_up(actor, node, state.actor_states.get(name))
        for name in graph.losses:
            if hosted is None or name in hosted:
                self.local[name] = LossActor(self.context, graph.nodes[name])

    # -- called by actors ------------------------------------------------------------------------
    def touch(self) -> None:
        self.last_event = time.perf_counter()

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def backward_done(self, actor: str, key: int) -> None:
        n = self._done_count.get(key)
        if n is None:
            return  # a key this run never admitted (an actor replayed alone): none in flight
        n += 1
        if n == self.num_stages:
            del self._done_count[key]
            self.in_flight -= 1
            self._notify()
        else:
            self._done_count[key] = n

    def loss_reported(self, key: int, value: float, meta: Mapping[str, Any]) -> None:
        mb = int(meta["minibatch"])
        pending = self._pending.get(mb)
        if pending is None:
            return  # a minibatch this run never admitted (a loss actor replayed alone)
        pending.values.append(value)  # the key's share of its minibatch's loss (sums_over_rows)
        if len(pending.values) == pending.keys:
            del self._pending[mb]
            # summed exactly: the shares arrive in an order that varies from run to run (two
            # losses, a pipeline), and an ordinary sum would vary in its last bits with it
            total = math.fsum(pending.values)
            self.losses[mb] = total
            if self._on_loss is not None:
                rows = int(meta["mb_rows"])
                try:
                    returned = self._on_loss(mb, total, rows)
                    if inspect.isawaitable(returned):
                        # (a coroutine made and never run: the callback's body never ran)
                        close = getattr(returned, "close", None)
                        if close is not None:
                            close()
                        raise TypeError(
                            "it returned an awaitable (an async def?), which the run does not "
                            "await: on_loss must be a plain function, called as each loss "
                            "arrives; keep async work out of it (a trio or anyio memory channel's "
                            "send_nowait, read by a task of your own)"
                        )
                except Exception as exc:
                    if (
                        isinstance(exc, ActorError)
                        and exc.kind == "actor_state"
                        and exc.actor in self.local
                    ):
                        # the function read the run's state (fit's own does, under
                        # PipeDream2BW) and an actor's actor_state raised: that actor's error
                        raise
                    # the caller's function failed, not the loss actor that reported the loss
                    # (as an ActorError, which the actors pass on unwrapped, not as their own)
                    named = self._on_loss
                    what = named.name if isinstance(named, NamedOnLoss) else _GIVEN_ON_LOSS
                    raise ActorError(
                        "on_loss", "callback", key,
                        f"{what} raised {type(exc).__name__}: {exc} (called as on_loss({mb}, "
                        f"{total!r}, {rows})); the loss was computed: the error is in that "
                        "function, not in an actor",
                    ) from exc  # fmt: skip
            self._notify()  # drain waits for the losses too

    def check_finite(self, actor: str, kind: str, key: int, value: Any) -> None:
        if self.checks_finite and first_not_finite(value) is not None:
            raise ActorError(
                actor, kind, key,
                f"actor {actor!r} produced NaN or Inf in its {kind} of key {key} (the first "
                "actor to do so in this run; check_finite=True found it)",
            )  # fmt: skip
