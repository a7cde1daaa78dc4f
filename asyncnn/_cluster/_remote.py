"""Stand-ins for actors that live in another process, and the task that delivers what arrives.

A run in one process holds every node's actor in ``run.actors``; a node hosted elsewhere is a
:class:`RemoteActor`, whose ``send_channel`` writes the message to the connection of the process
that hosts it. On the other side, :func:`deliver` puts each arriving message into the local
actor's inbox, awaiting room there: a full inbox stops the reading, the socket's buffers fill and
the remote sender waits, as it would on an in-process channel.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from asyncnn._runtime._messages import BACKWARD
from asyncnn.backends import parse_device

from ._codec import announce_message, decode_message, encode_message
from ._nccl import _proc
from ._wire import Connection, PeerLost, ProtocolError

if TYPE_CHECKING:
    from asyncnn._runtime._messages import Message
    from asyncnn._runtime._run import Run

__all__ = ["RemoteActor", "apply_report", "deliver", "is_reports"]


class RemoteActor:
    """The actor of node ``name``, hosted by the process at the other end of ``conn``. It is its
    own ``send_channel``: a message sent to it is written to ``conn``.

    Args:
        name: the node.
        conn: the connection to the hosting process.
        run: the local run (its device pool waits for GPU events before a tensor leaves).
        worker: the hosting worker's index (None: the driver).
    """

    def __init__(self, name: str, conn: Connection, run: Run | None, worker: int | None) -> None:
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
        if msg.kind == BACKWARD:  # the reports pending here ride along (see _worker.Reports)
            take = getattr(self.run, "take_reports", None)
            reports = take() if take is not None else None
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
    run: Run, header: dict[str, Any], buffers: list[Any], conn: Connection, peer: int = -1
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
        give = getattr(run, "add_reports", None)
        if give is not None:  # a worker: on towards the driver
            give(reports)
        else:  # the driver: to the scheduler now
            try:
                for report in reports:
                    apply_report(run, report)
            except ValueError as exc:
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


def apply_report(run: Run, report: dict[str, Any]) -> None:
    """A worker's report to the scheduler: a layer's backward of a key done, or a key's loss.

    Raises:
        ValueError: a field is missing or of the wrong type.
    """
    try:
        if report["t"] == "done":
            run.backward_done(str(report["a"]), int(report["key"]))
        else:
            run.loss_reported(int(report["key"]), float(report["value"]), dict(report["m"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"a malformed {report.get('t')!r} report {report!r:.200}: {exc}") from exc
