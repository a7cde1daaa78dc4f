"""The driver reading its workers during a run: each worker's frames (messages for the driver's
actors, reports to the scheduler, heartbeats, its result or its error report) until its result,
the silence of one that stopped, the traces of a failed run's workers, and a failure named by
its first cause (a worker's death, an actor's own error, a lost peer).

What the driver sends its workers, and the run around it, are ``_driver``'s.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio

from asyncnn._errors import ActorError, RemoteError, WorkerError, remote_error
from asyncnn._runtime._lifecycle import error_leaves, single_error

from ._codec import decode_state
from ._remote import LinkReader, MalformedReport, RemoteActor, apply_report, is_reports
from ._wire import Connection, PeerLost, ProtocolError, lost_peer

if TYPE_CHECKING:
    from ._base import Cluster
    from ._driver import DriverRun


async def _read_worker(cluster: Cluster, run: DriverRun, w: int, hosted: list[str]) -> None:
    """Handles what worker ``w`` sends during a run until its final result; a worker silent
    for ``heartbeat_timeout`` while it is waited for fails the run (see :class:`_Silence`)."""
    conn: Connection = cluster.connections[w]
    who = cluster.describe_worker(w, hosted)
    silence = _Silence(conn, cluster.heartbeat_timeout)
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(silence.watch, tg.cancel_scope)
            reader = LinkReader(conn, tg)
            try:
                await _read_frames(cluster, run, w, hosted, reader, who, silence)
            except Exception as exc:  # raised below as itself, not inside the group's
                error = exc
            tg.cancel_scope.cancel()
    finally:
        # raised even where the group's exit is cancelled (another worker's report, read
        # first, cancels every reader): a worker that failed reports that and exits, so the
        # peer that lost it reports the lost link at once, and the failure read here, not
        # "the worker died", is the run's first cause
        if error is not None:
            raise error
    if silence.caught:
        raise WorkerError(
            w, hosted,
            f"{who} sent nothing for {cluster.heartbeat_timeout:g} s (hung, or stopped); "
            "raise heartbeat_timeout if a single step of its actors can take that long",
        )  # fmt: skip


class _Silence:
    """Watches a worker's connection while the driver waits for its next frame.

    Silence is measured by progress, not by a deadline per frame: bytes of a frame arriving
    (a large result takes seconds to deliver, over a slow link or through a fresh 1 GiB slab)
    and a shared-memory peer's pulse (:data:`~asyncnn._cluster._shm_memory.PULSE`) count as
    signs of life, as whole frames do; a worker stopped mid-frame is caught as one stopped
    between frames. The time the reader spends handing a frame on (an actor's full inbox)
    counts for nothing.
    """

    def __init__(self, conn: Connection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.waiting = False  # the reader waits for the next frame
        self.since = 0.0  # when the last sign of life came (or the wait began)
        self.seen = 0  # the connection's progress then
        self.caught = False

    def begin(self) -> None:
        """The reader starts waiting for a frame."""
        self.waiting = True
        self.since = anyio.current_time()
        # (no peek at the socket, a system call per frame: bytes waiting there are read next)
        self.seen = self.conn.received_progress(peek=False)

    def end(self) -> None:
        """The reader has its frame."""
        self.waiting = False

    async def watch(self, scope: anyio.CancelScope) -> None:
        """Cancels ``scope`` once the worker has been silent for the timeout while waited for
        (looking four times a timeout, at most every second)."""
        step = min(1.0, self.timeout / 4)
        while True:
            await anyio.sleep(step)
            if not self.waiting:
                continue
            now = anyio.current_time()
            progress = self.conn.received_progress()
            if progress != self.seen:
                self.seen, self.since = progress, now
            elif now - self.since >= self.timeout:
                self.caught = True
                scope.cancel()
                return


async def _read_frames(
    cluster: Cluster,
    run: DriverRun,
    w: int,
    hosted: list[str],
    reader: LinkReader,
    who: str,
    silence: _Silence,
) -> None:
    """:func:`_read_worker`'s loop: each frame of worker ``w`` until its final result."""
    conn = reader.conn
    heard = False  # whether it sent anything in this run (its first heartbeat comes at once)
    while True:
        silence.begin()
        try:
            header, buffers = await reader.receive()
        except ProtocolError as exc:
            raise WorkerError(w, hosted, f"{who} broke the protocol: {exc}") from exc
        except (EOFError, ConnectionError) as exc:
            raise await _died(cluster, w, hosted, exc, unheard=not heard) from exc
        finally:
            silence.end()
        heard = True
        t = header.get("t")
        if t == "m":
            try:
                await reader.deliver(run, header, buffers, w)
            except ProtocolError as exc:
                raise WorkerError(w, hosted, f"{who} broke the protocol: {exc}") from exc
        elif t in ("done", "loss", "ctl"):  # reports to the scheduler, alone or several
            frames = [header] if t != "ctl" else header.get("frames")
            if frames is None or not is_reports(frames):
                conn.close()
                raise WorkerError(
                    w, hosted, f"{who} sent a malformed 'ctl' frame: 'frames' must be a list of "
                    f"'done' and 'loss' reports, got {frames!r:.200}",
                )  # fmt: skip
            try:
                for frame in frames:
                    apply_report(run, frame)
            except MalformedReport as exc:
                conn.close()
                raise WorkerError(w, hosted, f"{who} broke the protocol: {exc}") from exc
        elif t == "hb":
            now = time.perf_counter()
            run.last_event = max(run.last_event, now - float(header["age"]))
            for name, line in header["describe"].items():
                actor = run.actors.get(name)
                if isinstance(actor, RemoteActor):
                    actor.last_report = line
                    actor.last_report_at = now
            _note_rejections(cluster, header.get("rejected"))
        elif t == "error":
            _keep_trace(run.worker_traces, w, header, buffers)
            if header.get("lost") is not None:
                j = int(header["lost"])
                failure: Exception = PeerLost(j, f"{who} lost its connection to worker {j}")
            else:
                failure = _remote_failure(header, w, hosted, who)
            if header.get("trace_follows"):
                cut = True
                try:  # the worker's events, sent after the report (watched for silence too)
                    silence.begin()
                    await _trace_after(reader, run.worker_traces, w)
                    cut = False
                finally:
                    silence.end()
                    # raised however the wait ends: cancelled (the worker went silent, or
                    # another's failure cancels every reader), the report is the run's error
                    if cut:
                        raise failure  # noqa: B012
            raise await _blame_unended(cluster, run, header, w, failure)
        elif t == "result":
            _note_rejections(cluster, header.get("rejected"))
            buffers = _own(buffers)
            run.results[w] = {**decode_state(header, buffers), "stats": header["stats"]}
            _keep_trace(run.worker_traces, w, header, buffers)
            return
        else:
            conn.close()
            raise WorkerError(w, hosted, f"{who} sent an unexpected {t!r} frame")


#: the longest the driver waits, after a worker reported a peer's end-of-run marker missing, for
#: that peer's own report (the actor there that did not stop, named) or its silence
UNENDED_GRACE = 3.0


async def _blame_unended(
    cluster: Cluster, run: DriverRun, header: dict[str, Any], w: int, failure: Exception
) -> Exception:
    """The run's error for worker ``w``'s error report ``header`` (``failure``, as read).

    A report of end-of-run markers missing (``MarkersMissing``: ``w``'s actors stopped, and
    another worker sent no marker) blames that other worker, not ``w``: with two workers and
    an actor that does not stop on worker 1, worker 0 reported it first (both wait the same
    ``heartbeat_timeout``), and the run failed as "worker 0 (..., hosting s0) failed", the
    stuck worker named only inside. The worker named is given a moment to report for itself
    (its ``ActorsNotStopped`` names the actor; its silence is caught by its own reader), which
    then is the run's error (it cancels this reader); past that, the error is its own: its
    index, its nodes and what it last said its actors were doing, ``w``'s report as the cause.
    """
    if header.get("type") != "MarkersMissing" or header.get("lost") is not None:
        return failure
    named = header.get("missing")
    if not isinstance(named, list):
        return failure
    suspects = [j for j in named if type(j) is int and j != w and 0 <= j < cluster.workers]
    if suspects:
        await anyio.sleep(min(cluster.heartbeat_timeout / 2, UNENDED_GRACE))
    suspects = [j for j in suspects if j not in run.results]  # (one that ended is no suspect)
    if not suspects:
        return failure
    j = suspects[0]
    theirs = [(n, a) for n, a in run.actors.items() if isinstance(a, RemoteActor) and a.worker == j]
    hosted = [n for n, _ in theirs]
    doing = "; ".join(f"{n}: {a.describe()}" for n, a in theirs)
    err = WorkerError(
        j, hosted,
        f"{cluster.describe_worker(j, hosted)} did not end its part of the run: "
        f"{header.get('message')}" + (f" (its actors: {doing})" if doing else ""),
    )  # fmt: skip
    err.__cause__ = failure
    return err


def _own(buffers: list[Any]) -> list[Any]:
    """``buffers``, those read in place from shared memory copied: the weights (and trace) a
    worker sends back outlive the run, and views would keep its slab mapped in this process
    after the cluster's ``close()``, for as long as the trainer keeps them (one copy of the
    worker's weights per run)."""
    return [b if b.base is None else b.copy() for b in buffers]


@dataclasses.dataclass(frozen=True)
class DroppedTrace:
    """Where a worker's part of the trace would be: the worker left it out of its report (its
    result or its error report), and ``reason`` says why (over ``max_message_bytes``)."""

    reason: str


def _keep_trace(traces: dict[int, Any], w: int, header: dict[str, Any], buffers: list[Any]) -> None:
    dropped = header.get("trace_dropped")
    if isinstance(dropped, str):
        traces[w] = DroppedTrace(dropped[:1000])
        return
    i = header.get("trace")
    if isinstance(i, int) and 0 <= i < len(buffers):
        traces[w] = _own([buffers[i]])[0]


async def _trace_after(conn: Connection | LinkReader, traces: dict[int, Any], w: int) -> None:
    """Reads the frame of worker ``w``'s events that follows its error report (``"trace"``)
    into ``traces``; where it does not come (the worker gave it up, or is gone), or the wait is
    cancelled, the trace says that its events are missing."""
    traces[w] = DroppedTrace(
        "its part of the trace did not come after its error report (the worker could not "
        "send it, or the run ended first)"
    )
    try:
        header, buffers = await conn.receive()
    except (EOFError, ConnectionError):
        return
    if header.get("t") == "trace":
        _keep_trace(traces, w, header, buffers)


async def _gather_traces(
    cluster: Cluster, traces: dict[int, Any], hosted_by: dict[int | None, list[str]]
) -> None:
    """After a failed run: asks every worker still connected whose trace is not in to abort,
    and keeps the trace its error report carries (two seconds at most, in all)."""
    wanted = [w for w, names in hosted_by.items() if w is not None and names and w not in traces]

    async def one(w: int) -> None:
        conn = cluster.connections.get(w)
        if conn is None or conn.closed:
            return
        # (what the run's reader of the worker read ahead and left comes first: its error
        # report, say)
        reader = LinkReader(conn)
        try:
            await conn.send({"t": "abort"})
            while True:
                header, buffers = await reader.receive()
                if header.get("t") in ("error", "result"):
                    _keep_trace(traces, w, header, buffers)
                    if header.get("trace_follows"):
                        await _trace_after(reader, traces, w)
                    return
        except (EOFError, ConnectionError, ValueError):
            return  # gone, or its stream lost its place: its events stay missing

    with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
        async with anyio.create_task_group() as tg:
            for w in wanted:
                tg.start_soon(one, w)


def _note_rejections(cluster: Cluster, report: Any) -> None:
    """Adds a worker's report of refused connections (``{"count", "sample"}``, what is new since
    its last report) to the cluster's: a few lines, however large the count."""
    if not isinstance(report, dict):
        return
    sample = [str(line) for line in report.get("sample", [])[:32]]
    count = report.get("count", len(sample))
    cluster.reject_many(sample, count if isinstance(count, int) else len(sample))


def _remote_failure(header: dict[str, Any], w: int, hosted: list[str], who: str) -> Exception:
    traceback = str(header.get("traceback", ""))
    original = _class_named(header.get("cause_class"))
    message = header.get("cause_message")
    cause: RemoteError
    text = str(header.get("cause") or f"{header.get('type')}: {header.get('message')}")
    if original is not None and isinstance(message, str):
        cause = remote_error(message, traceback, original, fallback=text)
    else:
        cause = RemoteError(text, traceback)
    if header.get("actor") is not None:
        err: Exception = ActorError(
            header["actor"], header.get("kind", ""), header.get("key"),
            f"{header.get('message')} (on {who})",
        )  # fmt: skip
    else:
        err = WorkerError(w, hosted, f"{who} failed: {header.get('type')}: {header.get('message')}")
    err.__cause__ = cause
    return err


def _class_named(spec: Any) -> type[BaseException] | None:
    """The exception class a worker's report names (``[module, qualified name]``) where the
    driver has it: a module imported here already (never imported for a worker's report), and
    no class defined inside a function."""
    if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(p, str) for p in spec)):
        return None
    obj: Any = sys.modules.get(spec[0])
    for part in spec[1].split("."):
        if obj is None or part == "<locals>":
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


async def _died(
    cluster: Cluster, w: int, hosted: list[str], exc: BaseException, *, unheard: bool = False
) -> WorkerError:
    """The error of worker ``w``'s death, found by ``exc``; ``unheard``: it had sent the driver
    nothing in this run (not even the heartbeat its part of a run starts with), so it died as
    the run started, most likely before: a death between two fits is noticed when the next
    starts, but not one in the moment before it, and the run's start then fails on it."""
    # a process that closed its socket is usually gone a moment later: its exit status says
    # more than the broken connection
    fate = await cluster._fate_soon(w)
    if "SIGKILL" in fate:
        fate += "; a SIGKILL nobody sent usually comes from the kernel's out-of-memory killer"
    who = cluster.describe_worker(w, hosted)
    if unheard:
        message = (
            f"{who} died as the run started, before it sent the driver anything "
            f"({fate or exc}); its actors had done nothing for this run: run it again (the "
            "cluster starts fresh workers)"
        )
    else:
        message = (
            f"{who} died during the run ({fate or exc}); its actors' work is lost: resume "
            "from the last checkpoint (Trainer.save / Trainer.load)"
        )
    err = WorkerError(w, hosted, message)
    err.__cause__ = exc
    return err


def _one_error(group: BaseExceptionGroup[Any]) -> BaseException:
    # a worker's death explains everything else; then an actor's own failure; then a failure
    # that only says a peer went away; then what one process would report
    leaves = error_leaves(group)
    for e in leaves:
        if isinstance(e, WorkerError):
            return e
    for e in leaves:
        if isinstance(e, ActorError) and lost_peer(e) is None:
            return e
    for e in leaves:
        if lost_peer(e) is not None:
            return e
    return single_error(group)
