"""Stand-ins for actors that live in another process, and the task that delivers what arrives.

A run in one process holds every node's actor in ``run.actors``; a node hosted elsewhere is a
:class:`RemoteActor`, whose ``send_channel`` writes the message to the connection of the process
that hosts it. On the other side, :func:`deliver` puts each arriving message into the local
actor's inbox, awaiting room there: a full inbox stops the reading, the socket's buffers fill and
the remote sender waits, as it would on an in-process channel. A :class:`LinkReader` reads a link
for the task that hands its messages on, and goes on reading it while that task waits in a send.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from asyncnn._runtime._messages import BACKWARD
from asyncnn._runtime._run import Run
from asyncnn.backends import parse_device

from ._codec import announce_message, decode_message, encode_message
from ._nccl import _proc
from ._wire import Connection, PeerLost, ProtocolError, _on_send_wait

if TYPE_CHECKING:
    import numpy as np
    from anyio.abc import TaskGroup

    from asyncnn._runtime._messages import Message

__all__ = [
    "ClusterRun",
    "LinkReader",
    "MalformedReport",
    "RemoteActor",
    "apply_report",
    "deliver",
    "is_reports",
]


class ClusterRun(Run):
    """A run in one process of a cluster (the driver's or a worker's): the reports to the
    scheduler that messages between processes carry (see ``_worker.Reports``) leave and arrive
    through :meth:`take_reports` and :meth:`add_reports`."""

    def take_reports(self) -> list[dict[str, Any]]:
        """The reports a backward message about to leave this process carries (the driver, where
        the scheduler is, has none)."""
        return []

    def add_reports(self, frames: list[dict[str, Any]]) -> None:
        """Reports a message from another process carried here: the driver applies them."""
        for frame in frames:
            apply_report(self, frame)


#: a local actor's attributes of its state, which a stand-in for one in another process lacks
_ACTOR_STATE = {"version": "version", "params": "weights", "opt_state": "optimizer state"}
#: where each is known once the run has ended (a field of ``run.state()``)
_STATE_FIELD = {"version": "versions", "params": "params", "opt_state": "opt_states"}


class RemoteActor:
    """The actor of node ``name``, hosted by the process at the other end of ``conn``. It is its
    own ``send_channel``: a message sent to it is written to ``conn``.

    Args:
        name: the node.
        conn: the connection to the hosting process.
        run: the local run (its device pool waits for GPU events before a tensor leaves).
        worker: the hosting worker's index (None: the driver).
    """

    def __init__(
        self, name: str, conn: Connection, run: ClusterRun | None, worker: int | None
    ) -> None:
        self.name = name
        self.worker = worker
        where = "the driver" if worker is None else f"worker {worker}"
        self.conn = conn
        self.run = run
        self.where = where
        self.send_channel = self
        #: what the hosting process last said this actor was doing (from its heartbeats)
        self.last_report = "no report yet"
        #: when that report arrived (``time.perf_counter()``), or None
        self.last_report_at: float | None = None

    def __getattr__(self, attribute: str) -> Any:
        """Refuses, naming the layer, its process and where its state is known, an attribute of
        the actor it stands for (``run.actors[name].version``, as in one process): that actor's
        state lives in its own process while the run goes on, and comes back at its end.

        Raises:
            AttributeError: always (``__getattr__`` is asked only for what the stand-in lacks).
        """
        if attribute.startswith("_"):  # (protocol lookups, copy's and pickle's: not the user's)
            raise AttributeError(attribute)
        name = self.__dict__.get("name", "?")
        where = self.__dict__.get("where", "another process")
        if attribute in _ACTOR_STATE:
            raise AttributeError(
                f"run.actors[{name!r}].{attribute}: layer {name!r} is hosted by {where}, which "
                f"holds its {_ACTOR_STATE[attribute]} while the run goes on (run.actors[{name!r}] "
                "is only a stand-in that sends it messages); take "
                f"run.state().{_STATE_FIELD[attribute]}[{name!r}] after the open_run block (the "
                "workers send their state back when the run ends)"
                + (", or run.params for the weights known now" if attribute == "params" else "")
            )
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {attribute!r}: "
            f"run.actors[{name!r}] stands for an actor hosted by {where}, and has name, worker "
            "and describe() (its state is in run.state() after the open_run block)"
        )

    def send_nowait(self, msg: Message) -> None:
        raise anyio.WouldBlock  # sending means writing to a socket: always the awaited path

    async def send(self, msg: Message) -> None:
        link = self._nccl_link(msg)
        if link is None:
            if msg.event is not None and self.run is not None:
                # the producing kernels must be done before the bytes are copied to the host
                await self.run.pool.wait(msg.event)
            header, buffers = encode_message(msg)
        else:  # the frame announces the tensors; NCCL carries them right after it
            header, buffers = announce_message(msg), []
        if msg.kind == BACKWARD and self.run is not None:
            reports = self.run.take_reports()  # those pending here ride along
            if reports:
                header["r"] = reports
        try:
            await self.conn.send(
                header,
                buffers,
                then=None if link is None else lambda: link.send(list(msg.tensors), msg.event),
            )
        except ConnectionError as exc:
            raise PeerLost(self.worker, f"{self.where} is gone ({exc})") from exc

    def _nccl_link(self, msg: Message) -> Any:
        links = getattr(self.run, "nccl", None)
        if links is None or not msg.tensors:
            return None
        if not all(t is None or hasattr(t, "__cuda_array_interface__") for t in msg.tensors):
            return None
        graph = self.run.graph  # type: ignore[union-attr]
        src = graph.nodes.get(msg.src)
        if src is None:
            return None
        return links.outgoing(
            str(parse_device(src.device)),
            _proc(self.worker),
            str(parse_device(graph.nodes[msg.dst].device)),
        )

    def describe(self) -> str:
        if self.last_report_at is None:
            return f"on {self.where}: {self.last_report}"
        age = time.perf_counter() - self.last_report_at
        return f"on {self.where}, as reported {age:.1f} s ago: {self.last_report}"


async def deliver(
    run: ClusterRun, header: dict[str, Any], buffers: list[Any], conn: Connection, peer: int = -1
) -> None:
    """Puts the message of a ``"m"`` frame into its local actor's inbox (``peer``: the sending
    process, a worker index or -1 for the driver), after passing on the reports to the scheduler
    it carries (``"r"``: applied in the driver, added to a worker's own on their way there).

    Raises:
        ProtocolError: the frame is malformed or names an actor this process does not host.
    """
    reports = header.get("r")
    if reports is not None:
        if not is_reports(reports):
            conn.close()
            raise ProtocolError(
                f"{conn.peer} sent a message whose 'r' is not a list of 'done' and 'loss' "
                f"reports: {reports!r:.200}"
            )
        try:
            run.add_reports(reports)  # a worker's go on towards the driver; the driver's apply
        except MalformedReport as exc:
            conn.close()
            raise ProtocolError(f"{conn.peer} sent {exc}") from exc
    try:
        msg = decode_message(header, buffers)
        if "g" in header:  # the tensors follow over NCCL
            msg.tensors, msg.event = _receive_nccl(run, header, msg, peer)
    except ValueError as exc:
        conn.close()
        raise ProtocolError(f"{conn.peer} sent a malformed message: {exc}") from exc
    actor = run.local.get(msg.dst)
    if actor is None:
        conn.close()
        raise ProtocolError(
            f"{conn.peer} sent a {msg.kind} message for {msg.dst!r}, which this process does "
            f"not host (it hosts {sorted(run.local)})"
        )
    await actor.send_channel.send(msg)


#: frames after which a link's reader reads no more for the run (or reads the next itself, as the
#: driver reads the trace that follows a worker's error report): reading ahead stops there
_LAST_FRAMES = frozenset({"eor", "result", "error", "abort", "trace"})


class LinkReader:
    """Reads the frames of ``conn`` for the one task that handles them (the driver's reader of
    a worker, a worker's reader of the driver or of a peer), and goes on reading it while that
    task waits in a send.

    The task hands each message on (:meth:`deliver`), and the actor it goes to may take it in
    this very task (a direct hand-over, ``_actor_base``) and send on: to another process, where
    a full link (the shared-memory ring, the socket's buffers) makes the send wait for that
    process to read. Its own reader may be waiting likewise, in a send back to this process:
    the driver's reader of worker 0 ran a driver's layer whose send to worker 0 waited, while
    worker 0's reader of the driver ran a layer whose send to the driver waited; each waited
    for the other to read, for ever (a false ``StallError``). So a send about to wait in
    :meth:`deliver` (:func:`~asyncnn._cluster._wire.send_waits`) starts a task (in ``tg``) that
    reads the link on meanwhile, keeping the frames in order until this task takes them (it
    stops once this task is back in :meth:`receive`). Every link is then read while its reader
    waits, whatever for, and every send ends once its peer is alive.

    What is read ahead is what the peer sent, held here instead of in the link: the messages of
    the keys the policy lets in flight (every message belongs to one; an actor's inbox is sized
    for them too), besides the peer's heartbeats and reports. A hand-over that does not wait (the
    usual case) costs nothing more than a context variable set and reset.

    What was read ahead is kept on the connection (:attr:`Connection.unread`): a reader that
    leaves without taking it (its task cancelled by another process's failure) leaves it to
    the next reader of the link, as the driver reads a failed run's traces (a worker's error
    report read ahead was dropped, and its part of the trace with it). Without ``tg`` the
    reader only reads (it never reads ahead).
    """

    def __init__(self, conn: Connection, tg: TaskGroup | None = None) -> None:
        self.conn = conn
        self._tg = tg
        #: frames (or the error that ended the reading) read ahead, in order
        self._ahead = conn.unread
        self._delivering = False
        #: the task that reads ahead (it may be in the middle of a receive), when one does
        self._helper: anyio.CancelScope | None = None
        self._arrived: anyio.Event | None = None

    async def receive(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The next frame (see :meth:`Connection.receive`): those read ahead first.

        Raises:
            EOFError, ConnectionError, ProtocolError: as :meth:`Connection.receive`, in order
                with the frames read before.
        """
        while True:
            if self._ahead:
                item = self._ahead.popleft()
                if isinstance(item, Exception):
                    raise item
                return item
            if self._helper is None:
                return await self.conn.receive()
            # the task reading ahead is in the middle of a receive: its frame is the next
            self._arrived = event = anyio.Event()
            await event.wait()

    async def deliver(
        self, run: ClusterRun, header: dict[str, Any], buffers: list[Any], peer: int
    ) -> None:
        """:func:`deliver`, with the link read on meanwhile should a send in it wait."""
        self._delivering = True
        token = _on_send_wait.set(self._send_waits)
        try:
            await deliver(run, header, buffers, self.conn, peer)
        finally:
            _on_send_wait.reset(token)
            self._delivering = False

    def stop(self) -> None:
        """Stops the reading ahead (the reader is done with the link for this run)."""
        if self._helper is not None:
            self._helper.cancel()

    def _send_waits(self) -> None:
        if (
            self._tg is not None
            and self._helper is None
            and self._delivering
            and not self.conn.closed
        ):
            self._helper = anyio.CancelScope()
            self._tg.start_soon(self._read_ahead, self._helper)

    async def _read_ahead(self, scope: anyio.CancelScope) -> None:
        _on_send_wait.set(None)  # (this task's sends, were there any, are no reader's)
        try:
            with scope:
                while True:
                    item: tuple[dict[str, Any], list[np.ndarray]] | Exception
                    try:
                        item = await self.conn.receive()
                    except Exception as exc:  # the reader raises it, after the frames before
                        item = exc
                    self._ahead.append(item)
                    self._wake()
                    if (
                        not self._delivering
                        or isinstance(item, Exception)
                        or item[0].get("t") in _LAST_FRAMES
                    ):
                        return
        finally:
            self._helper = None
            self._wake()

    def _wake(self) -> None:
        event, self._arrived = self._arrived, None
        if event is not None:
            event.set()


def _receive_nccl(run: Run, header: dict[str, Any], msg: Message, peer: int) -> tuple[Any, Any]:
    links = getattr(run, "nccl", None)
    src = run.graph.nodes.get(msg.src)
    dst = run.graph.nodes.get(msg.dst)
    link = None
    if links is not None and src is not None and dst is not None:
        link = links.incoming(peer, str(parse_device(src.device)), str(parse_device(dst.device)))
    if link is None:
        raise ValueError(
            f"it announced NCCL tensors from {msg.src!r} to {msg.dst!r}, but this run has no "
            "NCCL link for them"
        )
    tensors, event = link.receive(list(header["g"]))
    return tuple(tensors), event


def is_reports(frames: Any) -> bool:
    """Whether ``frames`` is a list of a worker's reports to the scheduler."""
    return isinstance(frames, list) and all(
        isinstance(f, dict) and f.get("t") in ("done", "loss") for f in frames
    )


class MalformedReport(ValueError):
    """A report to the scheduler with a field missing or of the wrong type."""


def apply_report(run: Run, report: dict[str, Any]) -> None:
    """A worker's report to the scheduler: a layer's backward of a key done, or a key's loss.

    Raises:
        MalformedReport: a field is missing or of the wrong type (checked before the scheduler
            hears of it: what the scheduler's own callbacks raise is theirs, not the worker's).
    """
    try:
        key = int(report["key"])
        if report["t"] == "done":
            actor = str(report["a"])
        else:
            value = float(report["value"])
            meta = dict(report["m"])
            for field in ("minibatch", "rows", "mb_rows"):
                int(meta[field])
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedReport(
            f"a malformed {report.get('t')!r} report {report!r:.200}: bad or missing field {exc}"
        ) from exc
    if report["t"] == "done":
        run.backward_done(actor, key)
    else:
        run.loss_reported(key, value, meta)
