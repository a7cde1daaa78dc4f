"""Policies: when keys are admitted, the order of work at each stage, and when weights change.

A policy is a frozen description, and everything a policy decides is one of its methods, so
reading a policy class tells all it does. The runtime asks it:

* admission: :meth:`Policy.split` (how a minibatch is split into keys),
  :meth:`Policy.waits_between_minibatches` (whether the scheduler flushes between minibatches)
  and :meth:`Policy.max_in_flight` (how many keys may be in flight at once);
* order: :meth:`Policy.order_for` gives each layer actor a :class:`StageOrder`, a small state
  machine naming the exact message it must process next (deterministic policies) or ``None``,
  meaning "whatever is ready first" (``Async``);
* backward: :meth:`Policy.keeps_pullback` (keep a key's pullback, or its inputs to recompute at
  the latest version) and :meth:`Policy.loss_cotangent` (how each key's loss gradient is scaled);
* updates: :meth:`Policy.minibatch_done` and :meth:`Policy.update_due` (whether a stage applies
  its accumulated gradients now) and :meth:`Policy.gradient_scale`;
* execution: :meth:`Policy.allows_capture` (whether GPU actors may replay CUDA graphs) and
  :meth:`Policy.delivers` (whether an actor's messages reach their destination).

:class:`Replay` is the policy of a replayed run: each actor follows its recorded order.
To write a new policy, subclass :class:`Policy` (see ``docs/policies.md``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np

from asyncnn._math._imports import class_path, import_by_path

from ._messages import BACKWARD, FORWARD
from ._stage_orders import (
    AnyOrder,
    OneFOneBOrder,
    Op,
    RecordedOrder,
    StageOrder,
    _check_bool,
)

__all__ = [
    "AnyOrder",
    "Async",
    "GPipe",
    "OneFOneB",
    "OneFOneBOrder",
    "PipeDream",
    "PipeDream2BW",
    "Policy",
    "RecordedOrder",
    "StageOrder",
    "Sync",
    "policy_from_spec",
]


class _PinnedOneFOneBOrder(OneFOneBOrder):
    """``PipeDream2BW``'s order: 1F1B over the stream (``warmup`` warm-up forwards), except
    that the forwards of a minibatch ``b`` wait for this stage's backwards of minibatch
    ``b - 2``, whose update makes the version they are pinned to (the stage does its next
    backwards meanwhile).

    A minibatch ``b - 1`` of at least ``warmup`` keys never makes them wait (1F1B has done
    those backwards by then); a shorter one (the last minibatch of an epoch, of fewer rows than
    ``microbatches``) holds the forwards of the minibatch after it back until that update: a
    bubble at the upstream stages, the same versions. No deadlock: the rule only moves a
    stage's backwards (of keys it has forwarded) earlier, it is the same at every stage, and a
    stage downstream, of a shorter warm-up, never runs further ahead than one upstream. Keys
    are numbered from :meth:`start` on, consecutively over the whole run (its streams too).
    """

    def __init__(self, warmup: int) -> None:
        super().__init__(warmup, flush=False)
        self.mb_start = 0  # the first key of the minibatch of the last forward
        self.mb_end = 0  # one past its last key: a forward of a key from here on starts the next

    def next(self) -> Op:
        op = super().next()
        if op[0] == FORWARD and op[1] >= self.mb_end and self.base + self.b < self.mb_start:
            return (BACKWARD, self.base + self.b)  # there is one: b < f, as mb_start <= key
        return op

    def done(self, op: Op, minibatch_keys: int) -> None:
        key = op[1]
        if key >= self.mb_end and op[0] == FORWARD:  # the first forward of a minibatch
            self.mb_start = key
            self.mb_end = key + minibatch_keys
        super().done(op, minibatch_keys)

    def start(self, first_key: int) -> None:
        super().start(first_key)
        self.mb_start = self.mb_end = first_key


class Policy(abc.ABC):
    """The strategy of a run. Subclass it (as a frozen dataclass) to write a new policy."""

    name: ClassVar[str] = "Policy"
    #: bit-identical results whatever the thread timing
    deterministic: ClassVar[bool] = True
    #: the scheduler waits for every key of a minibatch to finish before admitting the next
    flush: ClassVar[bool] = True
    #: how many keys each minibatch is split into (like ``numpy.array_split``)
    microbatches: int = 1
    #: whether a backward uses the parameter version its forward used
    stash: bool = True

    def __post_init__(self) -> None:
        """Checks :attr:`microbatches` when a dataclass subclass is made (the built-in policies
        check their own fields instead), storing it as a plain ``int``: a subclass's 0 or 2.5
        failed later as a bad ``max_in_flight``, or a ``ZeroDivisionError`` in :meth:`split`."""
        value = _check_int(type(self).__name__, "microbatches", self.microbatches)
        if is_dataclass(self) and "microbatches" in {f.name for f in fields(self)}:
            object.__setattr__(self, "microbatches", value)

    # -- admission -------------------------------------------------------------------------------
    def split(self, rows: int) -> list[tuple[int, int]]:
        """How a minibatch of ``rows`` rows is split into keys: each key's ``(start, stop)`` rows.

        The default splits into ``min(microbatches, rows)`` parts sized like
        ``numpy.array_split`` (the first ``rows % m`` parts take one row more). A run asks once
        per row count and keeps the answer: the split must depend on ``rows`` alone.
        """
        if isinstance(rows, bool) or not isinstance(rows, int | np.integer) or rows < 1:
            raise ValueError(f"{self.name}.split(rows={rows!r}): rows must be an int >= 1")
        rows = int(rows)
        m = self.microbatches
        if type(m) is not int or m < 1:  # (a subclass's field, which nothing else checked)
            m = _check_int(type(self).__name__, "microbatches", m)
        m = min(m, rows)
        bounds = [i * (rows // m) + min(i, rows % m) for i in range(m + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(m)]

    def waits_between_minibatches(self) -> bool:
        """Whether every key of a minibatch finishes before the next minibatch is admitted (a
        flush); otherwise keys stream on and the stage orders cool down only at the end."""
        return self.flush

    def max_in_flight(self, num_stages: int) -> int:
        """How many keys may be admitted and not yet finished: by default
        :attr:`microbatches` (checked: an int >= 1)."""
        return _check_int(type(self).__name__, "microbatches", self.microbatches)

    # -- the order of work -----------------------------------------------------------------------
    @abc.abstractmethod
    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        """The order of work of layer ``stage`` (its topological position) of ``num_stages``.

        Raises:
            ValueError: (the built-in policies) ``stage`` not in ``0 .. num_stages - 1``, or
                ``num_stages`` < 1.
        """

    def order_for(self, actor: str, stage: int, num_stages: int) -> StageOrder:
        """The order of work of the layer actor named ``actor``; by default
        :meth:`stage_order` of its position (a replay gives each actor its recorded order)."""
        return self.stage_order(stage, num_stages)

    def orders(self, actors: Sequence[str]) -> dict[str, StageOrder]:
        """The orders of every layer actor of a run, made once when the run starts (``actors``
        in topological order: each one's stage is its position). By default
        :meth:`order_for` of each; override it to make orders that share state (several stages
        on one device following one schedule)."""
        num = len(actors)
        made = {name: self.order_for(name, i, num) for i, name in enumerate(actors)}
        for i, (name, order) in enumerate(made.items()):
            if not is_stage_order(order):
                # (a stage_order that forgot its return failed in the actor, as "'NoneType'
                # object has no attribute 'start'", naming neither the policy nor the method)
                raise _no_order(self, name, i, num, order)
        return made

    def delivers(self, actor: str) -> bool:
        """Whether the messages ``actor`` sends reach their destination; ``False`` records them
        only (a replay of one actor alone, whose sends are checked, not delivered)."""
        return True

    # -- backward and updates --------------------------------------------------------------------
    def splits_backward(self) -> bool:
        """Whether a backward runs in two operations of the order (``ZeroBubbleH1``): the input
        half (``"backward_input"``: the inputs' gradients, sent upstream at once) and, later,
        the weight half (``"backward_weight"``: the parameters' gradients, then the update when
        due), from one set of residuals."""
        return False

    def keeps_pullback(self) -> bool:
        """Whether a forward keeps its pullback (and so the parameter version it used) for the
        backward; otherwise it keeps its inputs, and the backward recomputes the vjp at the
        latest version."""
        return self.flush or self.stash

    def minibatch_done(self, backwards_done: int, minibatch_keys: int) -> bool:
        """Whether a stage has finished its part of a minibatch, having done ``backwards_done``
        of the minibatch's ``minibatch_keys`` keys' backwards."""
        return backwards_done == minibatch_keys

    def update_due(self, backwards_since_update: int, minibatch_done: bool) -> bool:
        """Whether a stage applies its accumulated gradients after a backward."""
        return minibatch_done

    def gradient_scale(self, accumulated: int) -> float:
        """The factor applied to the sum of ``accumulated`` gradients before an update."""
        return 1.0

    def loss_cotangent(self, rows: float, minibatch_rows: float) -> float:
        """The gradient seed of a key's mean loss.

        Under a flush it is ``rows / minibatch_rows``, so that the microbatch gradients add up to
        the gradient of the minibatch's mean loss. For a loss whose mean divides by its labels'
        weight rather than its rows (a ``CrossEntropyLoss`` with ignored labels or class
        weights, labels on the host), the two are those weights, the key's and its minibatch's
        (floats; see ``CrossEntropyLoss.mean_weight``).
        """
        return rows / minibatch_rows

    # -- stale gradients -------------------------------------------------------------------------
    def corrects_gradients(self) -> bool:
        """Whether each gradient passes through :meth:`correct_gradient` before it is
        accumulated (a staleness remedy, see ``asyncnn.policies.DelayCompensation``)."""
        return False

    def needs_forward_weights(self) -> bool:
        """Whether :meth:`correct_gradient` reads the weights the gradient's forward used (a
        stage then keeps each earlier version that a stored key references)."""
        return False

    def correct_gradient(
        self, grads: Any, delay: int, version: int, weights: Any, forward_weights: Any
    ) -> Any:
        """A key's parameter gradients as they are accumulated (with
        :meth:`corrects_gradients`; the default changes nothing).

        Args:
            grads: the key's parameter gradients (a pytree like the parameters).
            delay: the stage's updates between the key's forward and the update that will apply
                the gradients (0: not stale).
            version: the stage's version now (the updates it has applied so far).
            weights: the stage's parameters now, which the update will change.
            forward_weights: the parameters the key's forward used, where
                :meth:`needs_forward_weights` is true (else ``None``).
        """
        return grads

    def corrects_updates(self) -> bool:
        """Whether each update's result passes through :meth:`correct_update` (a remedy that
        changes the step itself, ``asyncnn.policies.SpikeCompensation``)."""
        return False

    def correct_update(
        self, new: Any, old: Any, grads: Any, delay: float, optimizer: Any, step: int
    ) -> Any:
        """A stage's parameters after an update, as the policy corrects them (with
        :meth:`corrects_updates`; the default changes nothing).

        Args:
            new: the parameters the optimizer's update gave.
            old: the parameters before the update.
            grads: the gradients the update applied (as accumulated and scaled).
            delay: the mean delay of those gradients (0: not stale).
            optimizer: the run's optimizer.
            step: the optimizer's count of updates before this one (its state's ``"step"``).
        """
        return new

    # -- the weights a forward uses --------------------------------------------------------------
    def versions_kept(self) -> int:
        """How many versions before the latest a stage keeps (besides those its stored keys
        reference), for :meth:`forward_version` to pin forwards to (``PipeDream2BW``: 1). A
        run's state carries them on to the next run (``RunState.earlier_params``)."""
        return 0

    def forward_version(self, minibatch: int, start_version: int, version: int) -> int:
        """The parameter version a forward of a run's ``minibatch``-th minibatch (0-based)
        uses: by default the latest, ``version``; ``start_version`` is the stage's version at
        the run's first forward. Read only when :meth:`versions_kept` is above 0.

        A run whose state holds the ``j`` versions directly below a stage's latest
        (``RunState.earlier_params``, left by the run before it: a later ``fit``, a resumed
        checkpoint) counts as begun ``j`` minibatches before its first, at the version ``j``
        below the stage's: ``minibatch`` then counts from there and ``start_version`` is that
        version. So its forwards are pinned as in one unbroken run, where each stage made one
        update per minibatch (``PipeDream2BW``)."""
        return version

    def predicts_weights(self) -> bool:
        """Whether forwards use weights predicted by :meth:`predict_weights` after each update
        instead of the latest weights (``asyncnn.policies.WeightPrediction``)."""
        return False

    def predict_weights(self, weights: Any, previous: Any, horizon: float) -> Any:
        """The weights forwards use after an update (with :meth:`predicts_weights`).

        Args:
            weights: the stage's parameters after the update.
            previous: its parameters before the update.
            horizon: how many updates the gradients of the coming forwards will lag, on
                average: the keys in flight at the stage over the gradients per update (0
                under a policy that updates only when a minibatch is done).
        """
        return weights

    def weight_change_decay(self) -> float | None:
        """``gamma`` of the average of weight changes a stage keeps for
        :meth:`backward_weights` (``delta <- gamma delta + (1 - gamma) (w_new - w_old)`` at each
        update), or ``None`` to keep none (the default)."""
        return None

    def backward_weights(self, weights: Any, weight_change: Any, delay: int) -> Any:
        """The weights a backward that recomputes (``keeps_pullback()`` false) differentiates
        at, for a key of ``delay``: by default the latest, ``weights``. ``weight_change`` is the
        average of :meth:`weight_change_decay` (``None`` before the first update)."""
        return weights

    # -- execution -------------------------------------------------------------------------------
    def allows_capture(self, num_stages: int, traced: bool) -> bool:
        """Whether GPU actors may capture and replay CUDA graphs (``open_run``'s ``cuda_graphs``),
        never with a split backward, and only where forwards and backwards compute
        at the latest weights or a stash of them (none pinned, predicted or corrected: the
        graphs read the weights in place, or a copy taken at the forward). Then: with flushes
        between minibatches, a fixed order and no update inside a minibatch of several keys
        (each key of a minibatch has graphs of its own at each actor, reused in the next
        minibatch); or, keys streaming on, with a stash (each key in flight has graphs and a
        copy of the weights of its own at each actor, while its backward is due) or without
        (the backward recomputes at the latest weights); what leaves an actor is then copied
        out of its graphs. A trace (``traced``) does not matter to the built-in policies: what
        an actor sends is copied to the host for the trace behind its graphs' work."""
        if self.splits_backward():
            return False
        if (
            self.versions_kept()
            or self.predicts_weights()
            or self.weight_change_decay() is not None
            or self.corrects_gradients()
            or self.corrects_updates()
        ):
            return False  # the graphs read the latest weights, in place
        if self.waits_between_minibatches():
            # graphs per key of a minibatch: no update may come between its keys' forwards
            # and backwards (they would read the new weights)
            keys = self.max_in_flight(num_stages)
            updates_inside = any(self.update_due(n, False) for n in range(1, keys + 1))
            return self.deterministic and (keys == 1 or not updates_inside)
        return True

    def to_spec(self) -> dict[str, Any]:
        """The policy as a plain dict: its name and arguments."""
        args: dict[str, Any] = asdict(self) if is_dataclass(self) else {}
        cls = type(self)
        builtin = _BUILTIN.get(self.name) is cls
        kind = self.name if builtin else class_path(cls)
        return {"type": kind, "args": args}


#: the methods of a :class:`StageOrder` that the actors call
_ORDER_METHODS = ("next", "done", "start", "end_of_stream", "device_turns")


def is_stage_order(value: Any) -> bool:
    """Whether ``value`` serves as a stage order: a :class:`StageOrder`, or an object with its
    methods (a wrapper of one that does not subclass it)."""
    return isinstance(value, StageOrder) or all(
        callable(getattr(value, method, None)) for method in _ORDER_METHODS
    )


def _no_order(policy: Policy, actor: str, stage: int, num_stages: int, value: Any) -> TypeError:
    """The error for ``value``, no stage order, made for layer ``actor`` (of position
    ``stage``) by ``policy``'s ``stage_order`` (or its ``order_for``, where overridden)."""
    cls = type(policy).__name__
    if type(policy).order_for is Policy.order_for:
        call = f"{cls}.stage_order({stage}, {num_stages})"
    else:
        call = f"{cls}.order_for({actor!r}, {stage}, {num_stages})"
    return TypeError(
        f"{call} returned {value!r:.60}: it must return a StageOrder, a fresh one for each layer "
        f"(here layer {actor!r}), e.g. policies.OneFOneBOrder(None, flush=True) for all "
        "forwards then all backwards; a method that forgot its return gives None"
    )


#: The largest count a policy takes (keys per minibatch, keys in flight, gradients per update,
#: stages per device, warm-up updates): the largest signed 64-bit int (``sys.maxsize`` on a
#: 64-bit Python). A policy's spec goes into the trace's header and the checkpoint, whose
#: encoding (msgpack) fails on an int of 2**64 or more, and numpy and other readers hold
#: counts as int64; no run comes near the bound.
MAX_COUNT = 2**63 - 1


def _check_int(policy: str, field: str, value: Any) -> int:
    """``value`` as an int from 1 to :data:`MAX_COUNT` (a numpy integer too, as
    ``Graph.sequential``'s ``stages`` and ``fit``'s ``batch_size`` take), else a ``ValueError``
    naming ``policy(field=value)``."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, int | np.integer)
        or not 1 <= value <= MAX_COUNT
    ):
        raise ValueError(
            f"{policy}({field}={value!r}): {field} must be an int >= 1 and at most 2**63 - 1"
        )
    return int(value)


def check_stage(policy: object, stage: Any, num_stages: Any) -> None:
    """Refuses a ``stage_order(stage, num_stages)`` whose ``num_stages`` is not an int >= 1 or
    whose ``stage`` is not one of its stages (``0 .. num_stages - 1``), naming both: an order
    made for it would take a warm-up of its own (1F1B's ``K - s - 1``) or fail later."""
    label = f"{type(policy).__name__}.stage_order(stage={stage!r}, num_stages={num_stages!r})"
    if (
        isinstance(num_stages, bool | np.bool_)
        or not isinstance(num_stages, int | np.integer)
        or num_stages < 1
    ):
        raise ValueError(f"{label}: num_stages must be an int >= 1, the pipeline's layers")
    if (
        isinstance(stage, bool | np.bool_)
        or not isinstance(stage, int | np.integer)
        or not 0 <= stage < num_stages
    ):
        raise ValueError(
            f"{label}: stage must be an int in 0..{num_stages - 1}, the layer's position among "
            f"the {num_stages} stages"
        )


def _check_fields(policy: Policy, ints: Sequence[str] = (), bools: Sequence[str] = ()) -> None:
    """Checks a frozen policy's int and bool fields, storing each as a plain ``int`` or
    ``bool`` (a numpy one compares equal, but its spec would not be plain JSON)."""
    label = type(policy).__name__
    for field in ints:
        object.__setattr__(policy, field, _check_int(label, field, getattr(policy, field)))
    for field in bools:
        object.__setattr__(policy, field, _check_bool(label, field, getattr(policy, field)))


@dataclass(frozen=True)
class Sync(Policy):
    """The whole minibatch forward, then backward; one update per minibatch."""

    name: ClassVar[str] = "Sync"

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        check_stage(self, stage, num_stages)
        return OneFOneBOrder(None, flush=True)


@dataclass(frozen=True)
class GPipe(Policy):
    """All M forwards, then all M backwards; one update per minibatch, at the flush."""

    microbatches: int = 1
    name: ClassVar[str] = "GPipe"

    def __post_init__(self) -> None:
        _check_fields(self, ints=("microbatches",))

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        check_stage(self, stage, num_stages)
        return OneFOneBOrder(None, flush=True)


@dataclass(frozen=True)
class OneFOneB(Policy):
    """1F1B with a flush (PipeDream-Flush): at most K - s activations stored at stage s."""

    microbatches: int = 1
    name: ClassVar[str] = "OneFOneB"

    def __post_init__(self) -> None:
        _check_fields(self, ints=("microbatches",))

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        check_stage(self, stage, num_stages)
        return OneFOneBOrder(num_stages - stage - 1, flush=True)


@dataclass(frozen=True)
class PipeDream(Policy):
    """1F1B with no flush, continuous across minibatches; each stage updates after every backward.

    With ``stash=True`` a backward uses the parameter version its forward used (weight stashing);
    with ``stash=False`` it recomputes the stage's vjp at the latest version from the stored input.
    """

    microbatches: int = 1
    stash: bool = True
    name: ClassVar[str] = "PipeDream"
    flush: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_fields(self, ints=("microbatches",), bools=("stash",))

    def max_in_flight(self, num_stages: int) -> int:
        return num_stages  # stage 0 holds at most K keys: its warm-up plus one

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        check_stage(self, stage, num_stages)
        return OneFOneBOrder(num_stages - stage - 1, flush=False)

    def update_due(self, backwards_since_update: int, minibatch_done: bool) -> bool:
        return True

    def loss_cotangent(self, rows: float, minibatch_rows: float) -> float:
        return 1.0  # each update uses the gradient of that microbatch's mean loss


@dataclass(frozen=True)
class PipeDream2BW(Policy):
    """PipeDream-2BW (Narayanan et al. 2021): 1F1B over the stream, double-buffered weights.

    Each stage accumulates the gradients of a minibatch's ``M`` keys (summing to the gradient of
    the minibatch's mean loss) and applies them once; every forward of minibatch ``b`` uses
    the version from before minibatch ``b - 1``'s update, so the versions follow
    ``W(t+1) = W(t) - lr * grad f(W(t-1))``: a constant delay of 1, with two versions per stage.
    ``M >= K - 1`` (checked), so that with full minibatches the version a forward needs is
    always ready when 1F1B reaches it. A minibatch cut into fewer than ``K - 1`` keys (the last
    of an epoch, of fewer rows than ``M``) keeps this rule exactly too: the forwards of the
    minibatch after it wait at the upstream stages until the update they are pinned to is made
    (those stages do their backwards first), a bubble in the pipeline, not a change of the
    versions.

    The version before the latest is part of a run's state (``RunState.earlier_params``) and
    of a checkpoint, so a later ``fit`` (or one resumed from a checkpoint, or a run opened
    with ``state=``, traced or on a cluster) goes on as one unbroken run.
    """

    microbatches: int = 1
    name: ClassVar[str] = "PipeDream2BW"
    flush: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_fields(self, ints=("microbatches",))

    def max_in_flight(self, num_stages: int) -> int:
        return num_stages  # stage 0 holds at most K keys: its warm-up plus one

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        check_stage(self, stage, num_stages)
        if self.microbatches < num_stages - 1:
            raise ValueError(
                f"PipeDream2BW(microbatches={self.microbatches}) on {num_stages} stages: needs "
                f"microbatches >= {num_stages - 1} (K - 1), so that each minibatch's forwards "
                "find the previous version without waiting for it"
            )
        return _PinnedOneFOneBOrder(num_stages - stage - 1)

    def versions_kept(self) -> int:
        return 1

    def forward_version(self, minibatch: int, start_version: int, version: int) -> int:
        return start_version + max(minibatch - 1, 0)


@dataclass(frozen=True)
class Async(Policy):
    """Free-running training, as in AMPNet.

    Each actor takes messages as they come and updates after every ``min_update_frequency``
    gradients, with their mean; at most ``max_active_keys`` keys (one per minibatch) are in
    flight. Not deterministic: reproduce a run with ``asyncnn.replay``.
    """

    max_active_keys: int = 4
    min_update_frequency: int = 1
    stash: bool = False
    name: ClassVar[str] = "Async"
    deterministic: ClassVar[bool] = False
    flush: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_fields(self, ints=("max_active_keys", "min_update_frequency"), bools=("stash",))

    def max_in_flight(self, num_stages: int) -> int:
        return self.max_active_keys

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        check_stage(self, stage, num_stages)
        return AnyOrder()

    def update_due(self, backwards_since_update: int, minibatch_done: bool) -> bool:
        return backwards_since_update >= self.min_update_frequency

    def gradient_scale(self, accumulated: int) -> float:
        return 1.0 / accumulated

    def loss_cotangent(self, rows: float, minibatch_rows: float) -> float:
        return 1.0


_BUILTIN: dict[str, type[Policy]] = {
    p.name: p for p in (Sync, GPipe, OneFOneB, PipeDream, PipeDream2BW, Async)
}


def policy_from_spec(spec: dict[str, Any]) -> Policy:
    """Rebuilds a policy from :meth:`Policy.to_spec` (built-ins by name, others by import path)."""
    kind = spec.get("type")
    cls: Any = _BUILTIN.get(str(kind))
    if cls is None:
        if ":" not in str(kind):
            raise ValueError(
                f"unknown policy {kind!r}: use one of {sorted(_BUILTIN)} or 'package.module:Class'"
            )
        cls = import_by_path(str(kind), Policy, "policy")
    policy: Policy = cls(**spec.get("args", {}))
    return policy
