"""Policies that are another policy but for what they override: :class:`WrappedPolicy`, and
:class:`Replay`, the policy of a replayed run (the recorded policy with each actor's recorded
order). Staleness remedies (``_remedies.py``) are wrapped policies too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._policies import Op, Policy, RecordedOrder, StageOrder, Sync
from ._stage_orders import OpCallback

__all__ = ["Replay", "WrappedPolicy"]


class WrappedPolicy(Policy):
    """A policy that is another policy (:attr:`wrapped`) but for what a subclass overrides:
    every decision is delegated, so a wrapper states only where it differs (a replay, a
    staleness remedy)."""

    @property
    def wrapped(self) -> Policy:
        """The policy every decision not overridden is delegated to."""
        raise NotImplementedError

    @property
    def deterministic(self) -> bool:  # type: ignore[override]
        return self.wrapped.deterministic

    @property
    def flush(self) -> bool:  # type: ignore[override]
        return self.wrapped.flush

    @property
    def microbatches(self) -> int:  # type: ignore[override]
        return self.wrapped.microbatches

    @property
    def stash(self) -> bool:  # type: ignore[override]
        return self.wrapped.stash

    def split(self, rows: int) -> list[tuple[int, int]]:
        return self.wrapped.split(rows)

    def waits_between_minibatches(self) -> bool:
        return self.wrapped.waits_between_minibatches()

    def max_in_flight(self, num_stages: int) -> int:
        return self.wrapped.max_in_flight(num_stages)

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        return self.wrapped.stage_order(stage, num_stages)

    def order_for(self, actor: str, stage: int, num_stages: int) -> StageOrder:
        return self.wrapped.order_for(actor, stage, num_stages)

    def orders(self, actors: Sequence[str]) -> dict[str, StageOrder]:
        return self.wrapped.orders(actors)

    def delivers(self, actor: str) -> bool:
        return self.wrapped.delivers(actor)

    def splits_backward(self) -> bool:
        return self.wrapped.splits_backward()

    def keeps_pullback(self) -> bool:
        return self.wrapped.keeps_pullback()

    def minibatch_done(self, backwards_done: int, minibatch_keys: int) -> bool:
        return self.wrapped.minibatch_done(backwards_done, minibatch_keys)

    def update_due(self, backwards_since_update: int, minibatch_done: bool) -> bool:
        return self.wrapped.update_due(backwards_since_update, minibatch_done)

    def gradient_scale(self, accumulated: int) -> float:
        return self.wrapped.gradient_scale(accumulated)

    def loss_cotangent(self, rows: float, minibatch_rows: float) -> float:
        return self.wrapped.loss_cotangent(rows, minibatch_rows)

    def corrects_gradients(self) -> bool:
        return self.wrapped.corrects_gradients()

    def needs_forward_weights(self) -> bool:
        return self.wrapped.needs_forward_weights()

    def correct_gradient(
        self, grads: Any, delay: int, version: int, weights: Any, forward_weights: Any
    ) -> Any:
        return self.wrapped.correct_gradient(grads, delay, version, weights, forward_weights)

    def corrects_updates(self) -> bool:
        return self.wrapped.corrects_updates()

    def correct_update(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        return self.wrapped.correct_update(new, old, grads, delay, optimizer, step)

    def versions_kept(self) -> int:
        return self.wrapped.versions_kept()

    def forward_version(self, minibatch: int, start_version: int, version: int) -> int:
        return self.wrapped.forward_version(minibatch, start_version, version)

    def predicts_weights(self) -> bool:
        return self.wrapped.predicts_weights()

    def predict_weights(self, weights: Any, previous: Any, horizon: float) -> Any:
        return self.wrapped.predict_weights(weights, previous, horizon)

    def weight_change_decay(self) -> float | None:
        return self.wrapped.weight_change_decay()

    def backward_weights(self, weights: Any, weight_change: Any, delay: int) -> Any:
        return self.wrapped.backward_weights(weights, weight_change, delay)

    def allows_capture(self, num_stages: int, traced: bool) -> bool:
        # the wrapped policy's own rule, and the general one over this policy's decisions
        return self.wrapped.allows_capture(num_stages, traced) and Policy.allows_capture(
            self, num_stages, traced
        )


@dataclass(frozen=True, eq=False)
class Replay(WrappedPolicy):
    """The policy of a replayed run: the recorded policy, with each actor's recorded order.

    Everything but the order of work is the recorded policy's, so the replay computes exactly
    what the run did. Built by :func:`asyncnn.replay`; not meant to be written by hand.

    Attributes:
        recorded: the policy of the recorded run.
        recorded_ops: each actor's recorded operations, ``(kind, key)`` in processing order
            (the run asks :meth:`orders` for its layers'; :func:`asyncnn.replay` hands a loss
            actor its :meth:`order_for` through ``LossActor.follow``).
        keys: how many keys may be in flight (every recorded one: the orders decide).
        isolated: replay this actor alone: its sends are recorded, not delivered.
        on_op: called as ``on_op(actor, seq, kind, key)`` after each operation.
    """

    recorded: Policy = field(default_factory=lambda: Sync())
    recorded_ops: Mapping[str, list[Op]] = field(default_factory=dict)
    keys: int = 1
    isolated: str | None = None
    on_op: OpCallback | None = None
    name: ClassVar[str] = "Replay"

    @property
    def wrapped(self) -> Policy:
        return self.recorded

    @property
    def deterministic(self) -> bool:  # type: ignore[override]
        return True  # the recorded order is followed, whatever the policy was

    @property
    def flush(self) -> bool:  # type: ignore[override]
        return True

    def max_in_flight(self, num_stages: int) -> int:
        return self.keys

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        raise TypeError("a replay's order is per actor: use Replay.order_for")

    def order_for(self, actor: str, stage: int, num_stages: int) -> StageOrder:
        return RecordedOrder(list(self.recorded_ops.get(actor, [])), actor, self.on_op)

    def orders(self, actors: Sequence[str]) -> dict[str, StageOrder]:
        return Policy.orders(self, actors)  # each actor its recorded order

    def delivers(self, actor: str) -> bool:
        return self.isolated is None

    def allows_capture(self, num_stages: int, traced: bool) -> bool:
        # As the recorded run did (the replay passes its cuda_graphs on): the replay follows
        # each actor's recorded order, so every actor sees the same input signatures in the
        # same order, and captures, replays, evicts and takes slots exactly as the run did. A
        # captured kernel need not equal its eager launch bit for bit (16-bit products), so
        # replaying a captured run eagerly would not check it.
        return self.recorded.allows_capture(num_stages, traced)

    def to_spec(self) -> dict[str, Any]:
        return self.recorded.to_spec()  # a replay's trace reads as the recorded run's
