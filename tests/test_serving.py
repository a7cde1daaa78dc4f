"""How a layer actor runs its planned operations (asyncnn/_runtime/_serving.py): what its
``StageOrder`` is told after each one."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies

from _reference import assert_params_equal, chain_graph, classification_data, minibatches

pytestmark = pytest.mark.timeout(60)


class _AllForwardsThenAllBackwards(policies.StageOrder):
    """GPipe's order written from ``StageOrder``'s documented contract alone: a minibatch's
    forwards, then its backwards, ending the minibatch once ``minibatch_keys`` backwards are
    done (the size ``done`` is told with every operation)."""

    def __init__(self) -> None:
        self.base = self.forwards = self.backwards = 0
        self.keys: int | None = None  # the minibatch's size, once a forward told it

    def start(self, first_key: int) -> None:
        self.base = first_key

    def next(self) -> tuple[str, int]:
        if self.keys is None or self.forwards < self.keys:
            return ("forward", self.base + self.forwards)
        return ("backward", self.base + self.backwards)

    def done(self, op: tuple[str, int], minibatch_keys: int) -> None:
        if op[0] == "forward":
            self.forwards += 1
            self.keys = minibatch_keys
            return
        self.backwards += 1
        if self.backwards == minibatch_keys:  # the minibatch's last backward
            self.base += minibatch_keys
            self.forwards = self.backwards = 0
            self.keys = None


@dataclasses.dataclass(frozen=True)
class _ContractGPipe(policies.Policy):
    microbatches: int = 3
    name: ClassVar[str] = "_ContractGPipe"

    def stage_order(self, stage: int, num_stages: int) -> policies.StageOrder:
        return _AllForwardsThenAllBackwards()


class _Telling(policies.StageOrder):
    """Another order, followed as it is, noting each ``(kind, key, minibatch_keys)`` it is told."""

    def __init__(self, inner: policies.StageOrder, told: list[tuple[str, int, int]]) -> None:
        self.inner = inner
        self.told = told

    def next(self) -> Any:
        return self.inner.next()

    def done(self, op: tuple[str, int], minibatch_keys: int) -> None:
        self.told.append((op[0], op[1], minibatch_keys))
        self.inner.done(op, minibatch_keys)

    def start(self, first_key: int) -> None:
        self.inner.start(first_key)

    def end_of_stream(self, total_keys: int) -> None:
        self.inner.end_of_stream(total_keys)

    def device_turns(self) -> Any:
        return self.inner.device_turns()


def _telling(policy: policies.Policy, told: dict[str, list[tuple[str, int, int]]]) -> Any:
    """``policy`` with each layer's order wrapped in a :class:`_Telling` (into ``told``)."""

    class Telling(type(policy)):  # type: ignore[misc]
        def orders(self, actors: Any) -> dict[str, policies.StageOrder]:
            made = super().orders(actors)
            return {n: _Telling(o, told.setdefault(n, [])) for n, o in made.items()}

    return Telling(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)})


@pytest.mark.anyio
async def test_a_custom_order_counting_backwards_against_minibatch_keys_runs_as_gpipe():
    # (every backward was told minibatch_keys=1, its key's meta gone by then: this order ended
    # its minibatch after the first backward, and the run stalled waiting for a forward of key
    # 1, done already)
    data = classification_data(14)  # minibatches of 6, 6 and 2 rows: 3, 3 and 2 keys
    results = []
    for policy in (_ContractGPipe(3), policies.GPipe(3)):
        with anyio.fail_after(30):
            async with ann.open_run(
                chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policy,
                dtype="float64", stall_timeout=2,
            ) as run:  # fmt: skip
                for b in minibatches(data, 6) * 2:
                    await run.step(b)
                await run.drain()
        results.append(run)
    assert_params_equal(results[0].params, results[1].params)
    assert results[0].state().versions == {name: 6 for name in results[0].graph.layers}
    assert np.array_equal(
        [loss for _, loss in sorted(results[0].losses.items())],
        [loss for _, loss in sorted(results[1].losses.items())],
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    "policy",
    [policies.GPipe(3), policies.ZeroBubbleH1(3), policies.PipeDream(3), policies.PipeDream2BW(3)],
    ids=str,
)
async def test_every_operation_is_told_the_size_of_its_minibatch(policy):
    # forwards, backwards and both halves of a split backward (ZeroBubbleH1), in a flush and
    # in a stream; the last minibatch is short (2 rows: 2 keys)
    data = classification_data(14)
    sizes = [len(policy.split(len(b["y"]))) for b in minibatches(data, 6)]  # keys per minibatch
    size_of = [n for n in sizes for _ in range(n)]  # key -> its minibatch's size
    told: dict[str, list[tuple[str, int, int]]] = {}
    with anyio.fail_after(30):
        async with ann.open_run(
            chain_graph(3), optimizer=optim.SGD(lr=0.1), policy=_telling(policy, told),
            dtype="float64", stall_timeout=2,
        ) as run:  # fmt: skip
            for b in minibatches(data, 6):
                await run.step(b)
            await run.drain()
    kinds = {"forward", "backward_input", "backward_weight"} if policy.splits_backward() else {
        "forward", "backward"
    }  # fmt: skip
    assert sorted(told) == list(run.graph.layers)
    for name, ops in told.items():
        assert {kind for kind, _, _ in ops} == kinds, (name, ops)
        assert len(ops) == len(kinds) * len(size_of), name
        wrong = [(kind, key, n) for kind, key, n in ops if n != size_of[key]]
        assert not wrong, (name, wrong)
