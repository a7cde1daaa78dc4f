"""A worker's side of one run: the run object of the actors it hosts (:class:`WorkerRun`), the
reports on their way to the scheduler (:class:`Reports`), the tasks beside the actors (reading the
driver and every peer, the heartbeat: :class:`_WorkerShare`), the trace file a run's events go to
(:class:`_TraceFile`), and the check that what the actors keep can travel back to the driver.

The process around it, its connections and the commands it serves are ``_worker``'s.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np

from asyncnn._errors import ActorError
from asyncnn._runtime._lifecycle import start_cancellable
from asyncnn._runtime._run import Run, _hook_failed

from ._base import HEARTBEAT_INTERVAL
from ._codec import unsendable
from ._nccl import LinkedShare, NcclLinks, _proc
from ._remote import ClusterRun, deliver
from ._wire import Connection, PeerLost, ProtocolError

if TYPE_CHECKING:
    from ._worker import Worker


class Reports:
    """What a worker's actors tell the scheduler (a layer's backward of a key done, a key's loss)
    on its way to the driver.

    A backward message to another process carries the reports pending when it leaves (see
    :func:`~asyncnn._cluster._remote.deliver`), and that process passes them on the same way:
    along a chain of workers the reports of a key reach the driver in one frame, with the first
    stage's, instead of waking it once per stage. What no message takes, :meth:`forward` sends
    to the driver as soon as this worker's event loop gets to it, several reports in one frame.
    """

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.closed = False
        self._kick: anyio.Event | None = None

    def add(self, frames: list[dict[str, Any]]) -> None:
        self.items.extend(frames)
        kick = self._kick
        if kick is not None:
            self._kick = None
            kick.set()

    def take(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items

    def close(self) -> None:
        """After the reports pending now, :meth:`forward` returns."""
        self.closed = True
        self.add([])

    async def forward(self, driver: Connection) -> None:
        """Sends the pending reports to the driver whenever there are some, until closed."""
        while True:
            if self.items:
                frames = self.take()
                await driver.send(frames[0] if len(frames) == 1 else {"t": "ctl", "frames": frames})
            elif self.closed:
                return
            else:
                self._kick = anyio.Event()
                await self._kick.wait()
                # let the tasks woken with these reports go first: an actor whose backward
                # was queued meanwhile takes them along with its gradients
                await anyio.lowlevel.checkpoint()


class WorkerRun(ClusterRun):
    """A run of the actors one worker hosts: what the scheduler must hear goes to the driver."""

    reports: Reports  # on their way to the driver
    nccl: NcclLinks | None = None  # this worker's ends of the run's NCCL links

    def backward_done(self, actor: str, key: int) -> None:
        self.reports.add([{"t": "done", "a": actor, "key": key}])

    def loss_reported(self, key: int, value: float, meta: Mapping[str, Any]) -> None:
        self.reports.add([{"t": "loss", "key": key, "value": value, "m": dict(meta)}])

    def take_reports(self) -> list[dict[str, Any]]:
        """The reports pending now, for a backward message about to leave to carry."""
        return self.reports.take()

    def add_reports(self, frames: list[dict[str, Any]]) -> None:
        """Reports another worker's message carried here, on their way to the driver."""
        self.reports.add(frames)


class _TraceFile:
    """The temporary file a worker's recorder writes a run's events to, read back through a
    descriptor of its own: the file's name is removed as soon as the recorder has opened it, so
    the kernel frees it when the last descriptor closes, however the worker ends (SIGKILL, out
    of memory: a name left behind stayed in the temporary folder for ever).

    Where a file that is open cannot be removed (Windows), the name is removed at
    :meth:`close`, as a worker that is killed leaves it there."""

    def __init__(self, index: int) -> None:
        self.fd, self.path = tempfile.mkstemp(suffix=".trace", prefix=f"asyncnn-w{index}-")
        self.linked = True

    def unlink(self) -> None:
        """Removes the file's name (its contents live on while a descriptor holds them)."""
        try:
            os.unlink(self.path)
        except OSError:
            return
        self.linked = False

    def read(self) -> bytes:
        """Everything the recorder wrote (call it once the recorder is closed)."""
        with open(self.fd, "rb", closefd=False) as f:
            f.seek(0)
            return f.read()

    def close(self) -> None:
        os.close(self.fd)
        if self.linked:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _check_actor_states(run: WorkerRun) -> None:
    """Refuses, before the run trains, a state of an actor hosted here that the worker's result
    could not carry back to the driver (a ``set``, an object): found only when the result was
    sent, it cost the whole run's work and named no layer.

    Raises:
        ActorError: naming the layer (kind ``"actor_state"``), where in its state the part
            lies, and what it is; or the error its ``actor_state`` raised.
    """
    for name in run.layers:
        actor = run.local.get(name)
        if actor is None:
            continue
        try:
            state = actor.actor_state()
        except Exception as exc:
            raise _hook_failed(name, type(actor), "actor_state", exc) from exc
        _refuse_unsendable(name, type(actor), state)


def _refuse_unsendable(name: str, cls: type, state: Any) -> None:
    """Raises an :class:`ActorError` (kind ``"actor_state"``) naming layer ``name``, where in
    ``state`` (what its ``cls.actor_state()`` returned) the part lies that no process boundary
    carries, and what it is; nothing when all of it can travel."""
    found = None if state is None else unsendable(state)
    if found is not None:
        place, what = found
        raise ActorError(
            name, "actor_state", None,
            f"layer {name!r}: what {cls.__name__}.actor_state() returns cannot be sent from a "
            f"worker process back to the driver: state{place} is {what}. Return a tree of "
            "dicts, lists and tuples of arrays, numbers, strings and None (a set as a sorted "
            "list, say), or host the layer in the driver (no worker=)",
        )  # fmt: skip


class _WorkerShare(LinkedShare):
    """A worker's part in a cluster run: beside its actors it reads the driver and every peer,
    forwards what the scheduler must hear, and beats a heartbeat; when its actors stop it marks
    the end of what it sent on every peer link. The driver watches for stalls and writes the
    run's error into the trace."""

    watches = False
    records_error = False

    def __init__(self, worker: Worker, plan: list[Any], ids: list[Any]) -> None:
        super().__init__(worker.index, plan, ids, 60.0)
        self.worker = worker
        self.heartbeat: anyio.CancelScope | None = None
        self.links_done = anyio.Event()

    def start(self, tg: Any, run: Run) -> None:
        worker = self.worker
        assert isinstance(run, WorkerRun)

        async def heartbeat() -> None:
            while True:
                age = time.perf_counter() - run.last_event
                what = {n: a.describe() for n, a in run.local.items()}
                # never cut off mid-frame (the end of the run cancels this task): a half
                # frame would garble the stream for the result that follows
                beat = {"t": "hb", "age": age, "describe": what}
                if worker.rejected.count:  # only what is new since the last report
                    beat["rejected"] = worker.rejected.take()
                with anyio.CancelScope(shield=True):
                    await worker.driver.send(beat)
                await anyio.sleep(HEARTBEAT_INTERVAL)

        async def read(conn: Connection, peer: int | None) -> None:
            while True:
                try:
                    header, buffers = await conn.receive()
                except (EOFError, ConnectionError) as exc:
                    if isinstance(exc, ProtocolError):
                        raise
                    raise PeerLost(peer, f"{conn.peer} is gone ({exc})") from exc
                t = header.get("t")
                if t == "m":
                    await deliver(run, header, buffers, conn, _proc(peer))
                elif t == "eor":
                    return
                elif t == "abort" and peer is None:
                    raise RuntimeError("the driver aborted the run")
                else:
                    raise ValueError(f"worker {worker.index}: unexpected {t!r} from {conn.peer}")

        async def read_all() -> None:
            async with anyio.create_task_group() as readers:
                readers.start_soon(read, worker.driver, None)
                for j, conn in worker.peers.items():
                    readers.start_soon(read, conn, j)
            self.links_done.set()

        tg.start_soon(run.reports.forward, worker.driver)
        self.heartbeat = start_cancellable(tg, heartbeat)
        tg.start_soon(read_all)

    async def end(self, run: Run) -> None:
        pass  # the driver ends the run: it stops this worker's actors through their inboxes

    async def actors_stopped(self, run: Run) -> None:
        # every message this worker's actors sent precedes this marker on each link
        for conn in self.worker.peers.values():
            await conn.send({"t": "eor"})

    async def settle(self, run: Run) -> None:
        await self.links_done.wait()  # every process marked the end of what it sent here
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        assert isinstance(run, WorkerRun)
        run.reports.close()  # the forwarder sends what is pending, then stops


def _on(backend: Any) -> Any:
    """Moves a tree's numpy leaves onto ``backend`` (other leaves, e.g. step counts, stay)."""

    def move(leaf: Any) -> Any:
        return backend.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf

    return move
