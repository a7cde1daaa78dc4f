"""The actors' inbox and the direct hand-over of messages (asyncnn/_runtime/_actor_base.py)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from asyncnn._runtime._actor_base import DIRECT_YIELD_EVERY, MAX_DIRECT_DEPTH, Inbox, _hand_over
from asyncnn._runtime._messages import FORWARD, Message


def _msg(key: int) -> Message:
    return Message(FORWARD, key, 0, "a", "b", 0, (None,), {})


def test_an_inbox_is_first_in_first_out_and_bounded():
    inbox = Inbox(2)
    inbox.send_nowait(_msg(0))
    inbox.send_nowait(_msg(1))
    with pytest.raises(anyio.WouldBlock):
        inbox.send_nowait(_msg(2))  # full
    assert [inbox.receive_nowait().key for _ in range(2)] == [0, 1]
    with pytest.raises(anyio.WouldBlock):
        inbox.receive_nowait()  # empty


@pytest.mark.anyio
async def test_a_waiting_receive_gets_what_is_sent_later():
    inbox = Inbox(4)
    got: list[int] = []

    async def receiver() -> None:
        for _ in range(3):
            got.append((await inbox.receive()).key)

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        for key in range(3):
            await anyio.sleep(0.01)  # the receiver is parked by now
            await inbox.send(_msg(key))
    assert got == [0, 1, 2]


@pytest.mark.anyio
async def test_a_send_to_a_full_inbox_waits_for_room():
    inbox = Inbox(1)
    inbox.send_nowait(_msg(0))
    sent = anyio.Event()

    async def sender() -> None:
        await inbox.send(_msg(1))
        sent.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await anyio.sleep(0.01)
        assert not sent.is_set()  # still waiting: the inbox is full
        assert inbox.receive_nowait().key == 0
        await sent.wait()
    assert inbox.receive_nowait().key == 1


@pytest.mark.anyio
async def test_closing_ends_a_waiting_receive_and_refuses_sends():
    inbox = Inbox(2)
    ended = anyio.Event()

    async def receiver() -> None:
        with pytest.raises(anyio.EndOfStream):
            await inbox.receive()
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        await anyio.sleep(0.01)
        inbox.close()
        await ended.wait()
    with pytest.raises(anyio.ClosedResourceError):
        inbox.send_nowait(_msg(0))


class _Taker:
    """An actor that takes every message handed over and records how deep it ran."""

    direct = True

    def __init__(self, nested: Any = None) -> None:
        self.taken = 0
        self.nested = nested
        self.inbox = Inbox(4, self)  # empty: a hand-over checks that nothing queued meanwhile

    async def run_directly(self, msg: Message) -> bool:
        self.taken += 1
        if self.nested is not None:  # hands the message on, as a layer sends to the next
            return await _hand_over(self.nested, msg)
        return True


@pytest.mark.anyio
async def test_handing_over_yields_now_and_then_and_is_bounded_in_depth():
    ticks = 0
    stop = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await anyio.lowlevel.checkpoint()

    owner = _Taker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        for key in range(4 * DIRECT_YIELD_EVERY):
            assert await _hand_over(owner, _msg(key))  # type: ignore[arg-type]
        # the hand-overs never wait, yet the other task ran in between
        assert ticks - before >= 3
        stop.set()
    # a chain deeper than the bound takes the message only up to it
    chain = _Taker()
    for _ in range(MAX_DIRECT_DEPTH + 4):
        chain = _Taker(chain)
    assert not await _hand_over(chain, _msg(0))  # type: ignore[arg-type]
    depth = 0
    node: Any = chain
    while node is not None and node.taken:
        depth += 1
        node = node.nested
    assert depth == MAX_DIRECT_DEPTH


@pytest.mark.anyio
async def test_hand_overs_of_two_tasks_that_end_out_of_order_leave_no_depth_behind():
    # a worker's two readers may each hand a message over while the other's awaits a socket:
    # each task's hand-over runs one deep, and each task is back at depth 0 after its own
    from asyncnn._runtime import _actor_base

    first_in, release = anyio.Event(), anyio.Event()
    seen: dict[str, int] = {}

    class _Waiter(_Taker):
        async def run_directly(self, msg: Message) -> bool:
            seen["first, inside"] = _actor_base.direct_depth()
            first_in.set()
            await release.wait()  # the first hand-over is still running...
            return True

    class _Late(_Taker):
        async def run_directly(self, msg: Message) -> bool:
            seen["second, inside"] = _actor_base.direct_depth()
            release.set()
            await anyio.sleep(0.01)  # ...when the second begins, and it ends last
            return True

    async def hand_over(name: str, owner: Any, key: int) -> None:
        assert await _hand_over(owner, _msg(key))
        seen[f"{name}, after"] = _actor_base.direct_depth()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hand_over, "first", _Waiter(), 0)
        await first_in.wait()
        tg.start_soon(hand_over, "second", _Late(), 1)
    assert seen == {"first, inside": 1, "second, inside": 1, "first, after": 0, "second, after": 0}


@pytest.mark.anyio
async def test_hand_overs_waiting_in_other_tasks_neither_block_nor_deepen_this_tasks():
    # across processes a handed-over op may wait (a socket); meanwhile other tasks (a worker's
    # other readers) hand over too, each its own chain: their depth and periodic yield are
    # their own, not the thread's
    from asyncnn._runtime import _actor_base

    parked, release = 0, anyio.Event()
    all_parked = anyio.Event()

    class _Parked(_Taker):
        async def run_directly(self, msg: Message) -> bool:
            nonlocal parked
            parked += 1
            if parked == MAX_DIRECT_DEPTH:
                all_parked.set()
            await release.wait()
            return True

    seen: list[int] = []

    class _Depth(_Taker):
        async def run_directly(self, msg: Message) -> bool:
            seen.append(_actor_base.direct_depth())
            return True

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not release.is_set():
            ticks += 1
            await anyio.lowlevel.checkpoint()

    after: list[int] = []

    async def park(key: int) -> None:
        assert await _hand_over(_Parked(), _msg(key))  # type: ignore[arg-type]
        after.append(_actor_base.direct_depth())

    async with anyio.create_task_group() as tg:
        for key in range(MAX_DIRECT_DEPTH):  # as many waiting hand-overs as one chain may nest
            tg.start_soon(park, key)
        await all_parked.wait()
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        owner = _Depth()
        for key in range(4 * DIRECT_YIELD_EVERY):
            assert await _hand_over(owner, _msg(key))  # type: ignore[arg-type]
        # each ran one deep, and this task still let the others run now and then
        assert seen == [1] * (4 * DIRECT_YIELD_EVERY)
        assert ticks - before >= 3
        release.set()
    assert after == [0] * MAX_DIRECT_DEPTH  # each parked task back at depth 0 after its own


@pytest.mark.anyio
async def test_a_hand_over_that_yields_does_not_pass_a_message_queued_meanwhile(monkeypatch):
    import types

    from asyncnn._runtime import _actor_base

    taker = _Taker()
    real = anyio.lowlevel.checkpoint

    async def checkpoint() -> None:  # another task queues a message while the sender yields
        taker.inbox.send_nowait(_msg(1))
        await real()

    patched = types.ModuleType("anyio")
    patched.__dict__.update(vars(anyio))
    patched.lowlevel = types.SimpleNamespace(checkpoint=checkpoint)  # type: ignore[attr-defined]
    monkeypatch.setattr(_actor_base, "anyio", patched)
    token = _actor_base._direct_runs.set(DIRECT_YIELD_EVERY - 1)  # this one yields
    try:
        assert not await _hand_over(taker, _msg(2))  # type: ignore[arg-type]
    finally:
        _actor_base._direct_runs.reset(token)
    assert taker.taken == 0 and taker.inbox.receive_nowait().key == 1


def _pipeline_graph() -> Any:
    import asyncnn as ann
    from asyncnn import nn

    return ann.Graph.sequential(
        [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)],
        loss=nn.CrossEntropyLoss(), stages=[2, 2, 1], input_shape=(None, 6),
    )  # fmt: skip


async def _losses_and_params(policy: Any) -> tuple[list[float], Any]:
    import numpy as np

    import asyncnn as ann
    from asyncnn import optim

    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((16, 6)), "y": rng.integers(0, 4, 16)} for _ in range(5)]
    async with ann.open_run(
        _pipeline_graph(), optim.SGD(lr=0.1), policy, stall_timeout=5
    ) as run:  # fmt: skip
        for batch in data:
            await run.step(batch)
        await run.drain()
    return [run.losses[i] for i in range(5)], run.state().params


@pytest.mark.anyio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["Sync", "GPipe", "OneFOneB"])
async def test_a_handed_over_op_whose_sends_wait_leaves_its_actor_deciding_after_it(
    policy: str, monkeypatch: Any
) -> None:
    # An op handed over runs in its sender's task; a send in it may wait (to another process:
    # its socket, a GPU tensor's event). A message arriving meanwhile wakes the actor's own
    # task, which must not plan from the state before the op ends (it would wait for the
    # message the op has taken, and the run would stall) nor run a second op beside it.
    from asyncnn import policies
    from asyncnn._runtime._actor_base import _Actor
    from asyncnn._runtime._actors import LayerActor
    from asyncnn._runtime._loss_actor import LossActor

    from _reference import assert_params_equal

    make = {"Sync": policies.Sync, "GPipe": lambda: policies.GPipe(4),
            "OneFOneB": lambda: policies.OneFOneB(4)}[policy]  # fmt: skip
    want_losses, want_params = await _losses_and_params(make())
    send = _Actor._send_grads

    async def send_that_waits(self: Any, *args: Any) -> None:  # the layers' and the loss's
        await anyio.sleep(0.002)
        await send(self, *args)

    monkeypatch.setattr(_Actor, "_send_grads", send_that_waits)
    running: dict[int, int] = {}
    most = [0]

    def one_at_a_time(op: Any) -> Any:  # counts the ops each actor runs at once
        async def counted(self: Any, *args: Any) -> None:
            running[id(self)] = running.get(id(self), 0) + 1
            most[0] = max(most[0], running[id(self)])
            try:
                await op(self, *args)
            finally:
                running[id(self)] -= 1

        return counted

    monkeypatch.setattr(LayerActor, "_run_op", one_at_a_time(LayerActor._run_op))
    monkeypatch.setattr(LossActor, "_process", one_at_a_time(LossActor._process))
    losses, params = await _losses_and_params(make())
    assert losses == want_losses
    assert_params_equal(params, want_params)
    assert most[0] == 1  # no actor ran two ops at once
