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
    # a worker's two readers may each hand a message over while the other's awaits a socket
    first_in, release = anyio.Event(), anyio.Event()

    class _Waiter(_Taker):
        async def run_directly(self, msg: Message) -> bool:
            first_in.set()
            await release.wait()  # the first hand-over is still running...
            return True

    from asyncnn._runtime import _actor_base

    before = _actor_base._direct.depth
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hand_over, _Waiter(), _msg(0))
        await first_in.wait()

        async def second() -> None:  # ...when the second begins, and it ends last
            class _Late(_Taker):
                async def run_directly(self, msg: Message) -> bool:
                    release.set()
                    await anyio.sleep(0.01)
                    return True

            await _hand_over(_Late(), _msg(1))  # type: ignore[arg-type]

        tg.start_soon(second)
    assert _actor_base._direct.depth == before


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
    monkeypatch.setattr(_actor_base._direct, "runs", DIRECT_YIELD_EVERY - 1)  # this one yields
    assert not await _hand_over(taker, _msg(2))  # type: ignore[arg-type]
    assert taker.taken == 0 and taker.inbox.receive_nowait().key == 1
