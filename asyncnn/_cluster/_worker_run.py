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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import numpy as np

from asyncnn._errors import ActorError
from asyncnn._runtime._lifecycle import start_cancellable
from asyncnn._runtime._run import Run
from asyncnn._runtime._setup import _hook_failed

from ._base import DEFAULT_HEARTBEAT_TIMEOUT, HEARTBEAT_INTERVAL
from ._codec import unsendable
from ._nccl import LinkedShare, NcclLinks, _proc
from ._remote import ClusterRun, LinkReader
from ._wire import Connection, PeerLost, ProtocolError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

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


async def send_within(
    conn: Connection,
    header: dict[str, Any],
    buffers: list[Any],
    quiet: float,
    armed: Callable[[], bool] = lambda: True,
) -> bool:
    """Sends one frame on ``conn``, giving up once ``armed()`` holds and nothing of it has gone
    out for ``quiet`` seconds (the other end reads nothing): a frame that keeps moving, however
    slowly, is never cut, and while ``armed()`` is false the send waits as long as it takes.

    Returns:
        True once the frame is sent; False where it was given up before any of it went out
        (the stream is whole: other frames may follow).

    Raises:
        ConnectionError: given up with part of it out; the connection is closed, as anything
            sent after half a frame would be misread.
    """
    before = conn.sent_progress()
    sent = cut = False

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal cut
        seen, since = conn.sent_progress(), anyio.current_time()
        while True:
            await anyio.sleep(min(1.0, quiet / 4))
            now, progress = anyio.current_time(), conn.sent_progress()
            if progress != seen or not armed():
                seen, since = progress, now
            elif now - since >= quiet:
                cut = True
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        await conn.send(header, buffers)
        sent = True
        tg.cancel_scope.cancel()
    if sent or not cut:
        return True
    if conn.sent_progress() == before:
        return False
    conn.close()
    raise ConnectionError(
        f"{conn.peer} took nothing more of a {header.get('t')!r} frame for {quiet:g} s, with part "
        "of it sent: the connection is closed"
    )


class _WorkerShare(LinkedShare):
    """A worker's part in a cluster run: beside its actors it reads the driver and every peer,
    forwards what the scheduler must hear, and beats a heartbeat; when its actors stop it marks
    the end of what it sent on every peer link. The driver watches for stalls and writes the
    run's error into the trace.

    The waits of its own are bounded by the cluster's ``heartbeat_timeout`` (the silence after
    which the driver declares a worker hung), counted as time in which nothing moves:

    * once its actors have stopped, the end-of-run marker of each process not yet heard from:
      by then the run has drained (the driver's stall watchdog no longer looks), so a peer whose
      marker never came would hang the run; the run fails instead, naming it
      (:class:`MarkersMissing`);

    A heartbeat stuck on a link the driver takes nothing from is cancelled with the run's other
    tasks when the run ends (it failed, or it is over): it must not keep them, and so the
    worker's error report, from ending (a frame cut in the middle is finished before the next
    one, see :meth:`~asyncnn._cluster._wire.Connection._send_frame`).
    """

    watches = False
    records_error = False

    def __init__(self, worker: Worker, plan: list[Any], ids: list[Any]) -> None:
        super().__init__(worker.index, plan, ids, 60.0)
        self.worker = worker
        self.heartbeat: anyio.CancelScope | None = None
        self.links_done = anyio.Event()
        #: the processes whose end-of-run marker has not come yet (None: the driver)
        self.unmarked: dict[int | None, Connection] = {j: c for j, c in worker.peers.items()}
        self.unmarked[None] = worker.driver
        self.quiet = float(getattr(worker, "heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT))
        #: the driver's end-of-run marker came (every actor here was told to stop before it)
        self.told_to_stop = anyio.Event()
        #: this worker's actors have stopped and their device work is done
        self.stopped_here = anyio.Event()

    def start(self, tg: Any, run: Run) -> None:
        worker = self.worker
        assert isinstance(run, WorkerRun)

        async def heartbeat() -> None:
            while True:
                age = time.perf_counter() - run.last_event
                what = {n: a.describe() for n, a in run.local.items()}
                # cut off by the end of the run (which cancels this task) as anything else: a
                # frame cut in the middle is finished before the next one (Connection), and
                # one that waits for room on a link the driver takes nothing from must not
                # hold the worker's error report back (the class's notes)
                beat = {"t": "hb", "age": age, "describe": what}
                if worker.rejected.count:  # only what is new since the last report
                    beat["rejected"] = worker.rejected.take()
                await worker.driver.send(beat)
                await anyio.sleep(HEARTBEAT_INTERVAL)

        async def read(conn: Connection, peer: int | None, readers: TaskGroup) -> None:
            reader = LinkReader(conn, readers)
            try:
                await read_frames(reader, peer)
            finally:
                reader.stop()

        async def read_frames(reader: LinkReader, peer: int | None) -> None:
            conn = reader.conn
            while True:
                try:
                    header, buffers = await reader.receive()
                except (EOFError, ConnectionError) as exc:
                    if isinstance(exc, ProtocolError):
                        raise
                    raise PeerLost(peer, f"{conn.peer} is gone ({exc})") from exc
                t = header.get("t")
                if t == "m":
                    await reader.deliver(run, header, buffers, _proc(peer))
                elif t == "eor":
                    self.unmarked.pop(peer, None)
                    if peer is None:
                        self.told_to_stop.set()
                    return
                elif t == "abort" and peer is None:
                    raise RuntimeError("the driver aborted the run")
                else:
                    raise ValueError(f"worker {worker.index}: unexpected {t!r} from {conn.peer}")

        async def read_all() -> None:
            async with anyio.create_task_group() as readers:
                readers.start_soon(read, worker.driver, None, readers)
                for j, conn in worker.peers.items():
                    readers.start_soon(read, conn, j, readers)
            self.links_done.set()

        tg.start_soon(run.reports.forward, worker.driver)
        self.heartbeat = start_cancellable(tg, heartbeat)
        tg.start_soon(read_all)
        tg.start_soon(self._await_stop, run)

    async def end(self, run: Run) -> None:
        pass  # the driver ends the run: it stops this worker's actors through their inboxes

    async def _await_stop(self, run: Run) -> None:
        """Once the driver has told this worker's actors to stop (its end-of-run marker came,
        after every stop message), waits for them to stop and their device work to end, at most
        :attr:`quiet` seconds in which nothing happens here (no actor's event).

        The run has drained by then, so the driver's stall watchdog no longer looks, and the
        worker's heartbeat goes on: with no other worker waiting for this one's end-of-run
        marker (:class:`MarkersMissing`), an actor that never stopped hung the run for ever.

        Raises:
            ActorsNotStopped: naming the actors that did not stop (or whose device work did
                not end).
        """
        step = min(1.0, self.quiet / 4)
        since: float | None = None
        seen = run.last_event
        while not self.stopped_here.is_set():
            with anyio.move_on_after(step):
                await self.stopped_here.wait()
                return
            if not self.told_to_stop.is_set():
                continue
            now = anyio.current_time()
            if since is None or run.last_event != seen:
                since, seen = now, run.last_event
            elif now - since >= self.quiet:
                serving = [n for n in run.local if n not in run._stopped_at]
                raise ActorsNotStopped(
                    self.worker.index, serving or sorted(run.local), self.quiet, not serving
                )

    async def actors_stopped(self, run: Run) -> None:
        self.stopped_here.set()
        # every message this worker's actors sent precedes this marker on each link
        for conn in self.worker.peers.values():
            await conn.send({"t": "eor"})

    async def settle(self, run: Run) -> None:
        self.stopped_here.set()  # (actors_stopped came first, in a run)
        await self._await_markers()  # every process marked the end of what it sent here
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        assert isinstance(run, WorkerRun)
        run.reports.close()  # the forwarder sends what is pending, then stops

    async def _await_markers(self) -> None:
        """Waits for the end-of-run marker of every process not heard from yet, at most
        :attr:`quiet` seconds in which nothing arrives from any of them (a process whose
        messages are still arriving is not given up on).

        Raises:
            MarkersMissing: naming those whose marker never came.
        """
        conns = self.unmarked
        seen = {p: c.received_progress() for p, c in conns.items()}
        since = anyio.current_time()
        while True:
            with anyio.move_on_after(min(1.0, self.quiet / 4)):
                await self.links_done.wait()
                return
            now = anyio.current_time()
            progress = {p: conns[p].received_progress() for p in list(conns)}
            if any(seen.get(p) != v for p, v in progress.items()):
                seen, since = progress, now
            elif now - since >= self.quiet and conns:
                raise MarkersMissing(self.worker.index, sorted(conns, key=_order), self.quiet)


class MarkersMissing(RuntimeError):
    """A worker's actors have stopped, the run drained, and some processes (``missing``: worker
    indices, None for the driver) sent neither their end-of-run marker nor anything else for
    ``seconds``: their part of the run did not end (an actor that does not stop, a hung device,
    a process stopped), and the run would wait for ever."""

    def __init__(self, index: int, missing: list[int | None], seconds: float) -> None:
        self.missing = missing
        names = [_process(p) for p in missing]
        who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        super().__init__(
            f"worker {index}'s actors stopped at the end of the run, but {who} sent no "
            f"end-of-run marker (nor anything else) to it for {seconds:g} s: {who} did not "
            "end its part of the run (an actor that does not stop, a hung device, a stopped "
            "process); raise heartbeat_timeout if ending a run there can take that long"
        )


class ActorsNotStopped(RuntimeError):
    """The run drained and the driver told a worker's actors to stop, but ``actors`` (names)
    did not (``device``: they stopped, but their device work did not end) while nothing
    happened on the worker for ``seconds``: the run would wait for them for ever."""

    def __init__(self, index: int, actors: list[str], seconds: float, device: bool) -> None:
        self.actors = actors
        names = ", ".join(repr(n) for n in actors)
        one = len(actors) == 1
        what = (
            f"the device work of actor{'' if one else 's'} {names} did not end"
            if device
            else f"actor{'' if one else 's'} {names} did not stop"
        )
        super().__init__(
            f"at the end of the run worker {index}'s actors were told to stop, but {what}, and "
            f"nothing happened on worker {index} for {seconds:g} s (an actor whose handler "
            "awaits something that never comes, a hung device): the run would wait for ever. "
            "Make the actor return once it is told to stop, or raise the cluster's "
            "heartbeat_timeout if ending a run there can take that long"
        )


def _process(p: int | None) -> str:
    return "the driver" if p is None else f"worker {p}"


def _order(p: int | None) -> int:
    return -1 if p is None else p


def _on(backend: Any) -> Any:
    """Moves a tree's numpy leaves onto ``backend`` (other leaves, e.g. step counts, stay)."""

    def move(leaf: Any) -> Any:
        return backend.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf

    return move
