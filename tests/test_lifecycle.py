"""The life of a run (``asyncnn/_runtime/_lifecycle.py``): the trio loop a synchronous call
(``Trainer.fit``, ``replay``) runs on."""

from __future__ import annotations

import pytest


def test_ctrl_c_reaches_a_trio_call_at_a_checkpoint_of_its_main_task():
    # Trainer.fit and replay start trio through run_trio: a Ctrl-C landing in a child task's
    # code (a cluster driver's read loop, inside an anyio cancel scope) was raised right there,
    # and when that was the scope's exit trio failed with "Cancel scope stack corrupted"
    # instead of stopping the fit; now the child goes on and the main task gets it
    import signal

    import anyio

    from asyncnn._runtime._lifecycle import error_leaves, run_trio

    seen: list[str] = []

    async def main() -> None:
        async def child() -> None:
            with anyio.CancelScope():
                signal.raise_signal(signal.SIGINT)
                seen.append("the child went on")
                await anyio.lowlevel.checkpoint()  # the child's: not where the interrupt goes

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            await anyio.sleep(5)  # the main task's checkpoint: the interrupt comes here
        seen.append("the call went on")

    with pytest.raises(BaseException) as info:
        run_trio(main)
    assert seen == ["the child went on"]
    # (raised inside the task group: anyio hands it on in a group, as the run's own do)
    assert [type(e) for e in error_leaves(info.value)] == [KeyboardInterrupt]
