"""Interleaved schedules: several non-adjacent stages per device following one order.

:func:`interleaved_1f1b_schedule` and :func:`interleaved_zero_bubble_schedule` give each device's
order (PyTorch's ``ScheduleInterleaved1F1B`` and ``ScheduleInterleavedZeroBubble`` compute the
same ones); :class:`Interleaved1F1B` and :class:`ZeroBubbleH1` are the policies that run them,
the stages of a device sharing one schedule (made by :meth:`Policy.orders`) and taking turns in
it (``_turns.DeviceTurns``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ._messages import BACKWARD, FORWARD
from ._policies import (
    _BUILTIN,
    Op,
    Policy,
    StageOrder,
    _check_fields,
    _check_int,
    check_stage,
)
from ._turns import DeviceTurns

__all__ = [
    "BACKWARD_INPUT",
    "BACKWARD_WEIGHT",
    "Interleaved1F1B",
    "ZeroBubbleH1",
    "interleaved_1f1b_schedule",
    "interleaved_zero_bubble_schedule",
]


def interleaved_1f1b_schedule(
    devices: int, virtual: int, microbatches: int
) -> list[list[tuple[str, int, int]]]:
    """Each device's order of work under interleaved 1F1B (Narayanan et al. 2021), idle slots
    left out: ``(kind, stage, microbatch)`` with ``kind`` ``FORWARD`` or ``BACKWARD`` and
    ``stage = chunk * devices + device`` (device ``d`` hosts stages ``d, d + D, ...``).

    Microbatches go in rounds of ``R = M // max(1, M // D)`` (``M`` must be a multiple of the
    number of rounds). Device ``d`` runs ``min((V - 1) R + 2 (D - 1 - d), M V)`` warm-up
    forwards, then alternates one forward and one backward, then the remaining backwards. Its
    ``k``-th forward is of chunk ``(k // R) mod V`` and its ``j``-th backward of chunk
    ``V - 1 - (j // R) mod V``; each chunk takes its microbatches in order.
    """
    devices, virtual, microbatches, per_round = _checked_rounds(
        "interleaved_1f1b_schedule", "interleaved 1F1B", devices, virtual, microbatches
    )
    return [
        _one_f_one_b_device_ops(d, devices, virtual, microbatches, per_round)
        for d in range(devices)
    ]


def _checked_rounds(
    function: str, schedule: str, devices: int, virtual: int, microbatches: int
) -> tuple[int, int, int, int]:
    """An interleaved schedule's arguments checked (as plain ints) and its microbatches per
    round: ``(devices, virtual, microbatches, per_round)``."""
    devices, virtual, microbatches = (
        _check_int(function, label, value)
        for label, value in (
            ("devices", devices),
            ("virtual", virtual),
            ("microbatches", microbatches),
        )
    )
    per_round = _per_round(devices, microbatches)
    if per_round is None:
        raise ValueError(
            f"{schedule} with {microbatches} microbatches on {devices} devices: the "
            f"microbatches must be a multiple of the rounds (max(1, M // D) = "
            f"{max(1, microbatches // devices)})"
        )
    return devices, virtual, microbatches, per_round


def _per_round(devices: int, microbatches: int) -> int | None:
    rounds = max(1, microbatches // devices)
    return None if microbatches % rounds else microbatches // rounds


def _one_f_one_b_device_ops(
    d: int, devices: int, virtual: int, microbatches: int, per_round: int
) -> list[tuple[str, int, int]]:
    total = microbatches * virtual
    warmup = min((virtual - 1) * per_round + 2 * (devices - 1 - d), total)
    taken = {FORWARD: [0] * virtual, BACKWARD: [0] * virtual}

    def op(kind: str, chunk: int) -> tuple[str, int, int]:
        taken[kind][chunk] += 1
        return (kind, chunk * devices + d, taken[kind][chunk] - 1)

    def forward(k: int) -> tuple[str, int, int]:
        return op(FORWARD, (k // per_round) % virtual)

    def backward(j: int) -> tuple[str, int, int]:
        return op(BACKWARD, virtual - 1 - (j // per_round) % virtual)

    ops = [forward(k) for k in range(warmup)]
    for j in range(total - warmup):
        ops += [forward(warmup + j), backward(j)]
    ops += [backward(j) for j in range(total - warmup, total)]
    return ops


#: the kinds of a zero-bubble order: a backward split into its input half (sent upstream at once)
#: and its weight half (deferred), see ``asyncnn._math._autodiff_split.vjp_split``
BACKWARD_INPUT = "backward_input"
BACKWARD_WEIGHT = "backward_weight"


def interleaved_zero_bubble_schedule(
    devices: int, virtual: int, microbatches: int
) -> list[list[tuple[str, int, int]]]:
    """Each device's order under interleaved zero bubble (Qi et al. 2024, the ZB-H1 rule on
    interleaved stages), idle slots left out: ``(kind, stage, microbatch)`` with ``kind``
    ``FORWARD``, ``BACKWARD_INPUT`` or ``BACKWARD_WEIGHT``.

    Like :func:`interleaved_1f1b_schedule`, with ``(V - 1) R + (D - 1 - d)`` warm-up forwards
    and each backward split: the steady state runs a forward and an input half, and, once
    device ``d`` has run ``d`` of them, the weight half of its oldest backward whose weight half
    is still due; the cool-down runs the remaining input halves (each followed by a weight half,
    likewise), then the weight halves left. With ``V = 1`` this is ZB-H1.
    """
    devices, virtual, microbatches, per_round = _checked_rounds(
        "interleaved_zero_bubble_schedule", "zero bubble", devices, virtual, microbatches
    )
    return [
        _zero_bubble_device_ops(d, devices, virtual, microbatches, per_round)
        for d in range(devices)
    ]


def _zero_bubble_device_ops(
    d: int, devices: int, virtual: int, microbatches: int, per_round: int
) -> list[tuple[str, int, int]]:
    total = microbatches * virtual
    warmup = min((virtual - 1) * per_round + (devices - 1 - d), total)
    taken = {k: [0] * virtual for k in (FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)}

    def op(kind: str, chunk: int) -> tuple[str, int, int]:
        taken[kind][chunk] += 1
        return (kind, chunk * devices + d, taken[kind][chunk] - 1)

    def back_chunk(j: int) -> int:
        return virtual - 1 - (j // per_round) % virtual

    ops = [op(FORWARD, (k // per_round) % virtual) for k in range(warmup)]
    weights_done = 0
    for j in range(total):  # the j-th backward
        if j < total - warmup:
            ops.append(op(FORWARD, ((warmup + j) // per_round) % virtual))
        ops.append(op(BACKWARD_INPUT, back_chunk(j)))
        if j >= d:  # the first d backwards' weight halves wait (ZB-H1's 1F1B part)
            ops.append(op(BACKWARD_WEIGHT, back_chunk(weights_done)))
            weights_done += 1
    while weights_done < total:
        ops.append(op(BACKWARD_WEIGHT, back_chunk(weights_done)))
        weights_done += 1
    return ops


#: one device's order: ``ops(device, devices, virtual, microbatches, per_round)``
DeviceOps = Callable[[int, int, int, int, int], list[tuple[str, int, int]]]


class _DeviceSchedule:
    """One device's interleaved order, shared by the stages it hosts: each asks for its own
    part of the order of a minibatch of ``m`` keys (made once per size), and they take turns
    in it (:attr:`turns`)."""

    def __init__(self, devices: int, virtual: int, device: int, device_ops: DeviceOps) -> None:
        self.devices = devices
        self.virtual = virtual
        self.device = device
        self.device_ops = device_ops
        self.orders: dict[int, list[tuple[str, int, int]]] = {}  # m -> the device's order
        self.parts: dict[int, dict[int, list[Op]]] = {}  # m -> stage -> its ops (keys 0..m-1)
        self.turns = DeviceTurns(device, self.sequence)

    def order(self, m: int) -> list[tuple[str, int, int]]:
        """The device's order for a minibatch of ``m`` keys: ``(kind, stage, key - first)``."""
        ops = self.orders.get(m)
        if ops is None:
            # a minibatch whose key count PyTorch refuses (the last, short one) runs in one round
            per_round = _per_round(self.devices, m) or m
            ops = self.orders[m] = self.device_ops(
                self.device, self.devices, self.virtual, m, per_round
            )
        return ops

    def sequence(self, m: int) -> list[int]:
        """The stage of each operation of the device's order of ``m`` keys."""
        return [st for _, st, _ in self.order(m)]

    def part(self, stage: int, m: int) -> list[Op]:
        parts = self.parts.get(m)
        if parts is None:
            parts = self.parts[m] = {}
            for kind, st, mb in self.order(m):
                parts.setdefault(st, []).append((kind, mb))
        return parts[stage]


class _InterleavedOrder(StageOrder):
    """A stage's part of its device's interleaved order, restarting at each minibatch; with
    ``takes_turns`` (the orders of :meth:`Policy.orders`, which share the device's schedule)
    it takes turns with the device's other stages."""

    def __init__(self, schedule: _DeviceSchedule, stage: int, takes_turns: bool = True) -> None:
        self.schedule = schedule
        self.stage = stage
        self.takes_turns = takes_turns
        self.base = 0
        self.i = 0
        self.ops: list[Op] | None = None  # this minibatch's, once its size is known
        self.keys = 0  # and its size

    def next(self) -> Op:
        if self.ops is None:
            return (FORWARD, self.base)  # every stage's part starts with the first forward
        kind, mb = self.ops[self.i]
        return (kind, self.base + mb)

    def done(self, op: Op, minibatch_keys: int) -> None:
        if self.ops is None:  # told on the minibatch's first op, its first forward
            self.ops = self.schedule.part(self.stage, minibatch_keys)
            self.keys = minibatch_keys
        self.i += 1
        if self.i == len(self.ops):
            self.base += self.keys
            self.i = 0
            self.ops = None

    def start(self, first_key: int) -> None:
        self.base = first_key

    def device_turns(self) -> DeviceTurns | None:
        if self.schedule.virtual == 1 or not self.takes_turns:
            return None  # alone on its device, or its schedule shared with no other stage
        return self.schedule.turns


class _DeviceOrders:
    """What the interleaved policies share: ``K = D V`` layers on ``D`` devices, device ``d``
    hosting stages ``d, d + D, ...``, each device's stages following one order."""

    virtual: int
    name: ClassVar[str]

    def _device_ops(self) -> DeviceOps:
        raise NotImplementedError

    def devices(self, num_stages: int) -> int:
        """``D``: the devices ``num_stages`` layers make, ``V`` stages each."""
        if num_stages % self.virtual:
            divisors = [v for v in range(1, num_stages + 1) if num_stages % v == 0]
            raise ValueError(
                f"{self.name}(virtual={self.virtual}): the graph's {num_stages} layers are "
                f"not a multiple of virtual={self.virtual}; give virtual one of {divisors} "
                f"(stages per device), or the graph a multiple of {self.virtual} layers"
            )
        return num_stages // self.virtual

    def stage_order(self, stage: int, num_stages: int) -> StageOrder:
        """The stage's part of its device's order, alone: it takes no turns (its schedule is
        its own, so the device's other stages would never pass it the turn). A run's orders
        come from :meth:`orders`, whose stages of a device share one schedule and its turns."""
        check_stage(self, stage, num_stages)
        d = self.devices(num_stages)
        schedule = _DeviceSchedule(d, self.virtual, stage % d, self._device_ops())
        return _InterleavedOrder(schedule, stage, takes_turns=False)

    def orders(self, actors: Sequence[str]) -> dict[str, StageOrder]:
        d = self.devices(len(actors))
        ops = self._device_ops()
        shared = [_DeviceSchedule(d, self.virtual, dev, ops) for dev in range(d)]
        return {name: _InterleavedOrder(shared[i % d], i) for i, name in enumerate(actors)}


@dataclass(frozen=True)
class Interleaved1F1B(_DeviceOrders, Policy):
    """Interleaved 1F1B (Narayanan et al. 2021) with a flush: ``K = D V`` layers on ``D``
    devices, device ``d`` hosting the ``V`` non-adjacent stages ``d, d + D, ...`` (virtual
    stages), which take turns in one order (:func:`interleaved_1f1b_schedule`). Computes what
    ``GPipe`` computes (minibatch SGD), in the order of PyTorch's ``ScheduleInterleaved1F1B``
    (a minibatch whose key count PyTorch refuses, not a multiple of its rounds, runs in one
    round); with equal stages and ``M >= D`` its bubble (idle over busy time per device) is
    ``(D - 1) / (M V)``.

    Attributes:
        microbatches: ``M``, keys per minibatch.
        virtual: ``V``, stages per device; the graph's layer count must be a multiple of it.
    """

    microbatches: int = 1
    virtual: int = 2
    name: ClassVar[str] = "Interleaved1F1B"

    def __post_init__(self) -> None:
        _check_fields(self, ints=("microbatches", "virtual"))

    def _device_ops(self) -> DeviceOps:
        return _one_f_one_b_device_ops


@dataclass(frozen=True)
class ZeroBubbleH1(_DeviceOrders, Policy):
    """Zero bubble, ZB-H1 (Qi et al., ICLR 2024) with a flush: each backward split into its
    input half (B, sent upstream at once) and its weight half (W, deferred into the slots the
    order gives), with 1F1B's warm-up. With ``V = 1`` its peak memory over the stages is
    1F1B's (the first stage's ``min(K, M)`` keys), but every stage holds up to ``K`` keys
    (``min(K, M)``, where 1F1B's stage ``s`` holds ``min(K - s, M)``), since stage ``s`` also
    keeps the residuals of the weight halves it defers. With ``virtual = V > 1`` each of ``D``
    devices hosts the stages ``d, d + D, ...`` and they take turns in one order, PyTorch's
    ``ScheduleInterleavedZeroBubble`` (:func:`interleaved_zero_bubble_schedule`). Computes
    what ``GPipe`` computes (minibatch SGD); with equal forward, input and weight halves and
    ``M >= D`` its bubble (idle over busy time per device) is ``(D - 1) / (3 M V)``, a third
    of 1F1B's.

    Attributes:
        microbatches: ``M``, keys per minibatch.
        virtual: ``V``, stages per device (1: plain ZB-H1, one stage per device).
    """

    microbatches: int = 1
    virtual: int = 1
    name: ClassVar[str] = "ZeroBubbleH1"

    def __post_init__(self) -> None:
        _check_fields(self, ints=("microbatches", "virtual"))

    def _device_ops(self) -> DeviceOps:
        return _zero_bubble_device_ops

    def splits_backward(self) -> bool:
        return True

    def allows_capture(self, num_stages: int, traced: bool) -> bool:
        return False  # the captured vjp is not split: eager


_BUILTIN.update({p.name: p for p in (Interleaved1F1B, ZeroBubbleH1)})
