"""What every cluster does: start worker processes, connect them into a mesh, stop them.

Subclasses say how a worker process is started (:class:`~asyncnn.cluster.LocalCluster`: a
subprocess on this host; :class:`~asyncnn.cluster.RayCluster`: a Ray actor) and how to learn its
fate; the data path is frames (``_wire``): over TCP, or through shared memory between processes
of one host (``_shm``, what a ``LocalCluster`` uses unless told not to).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from asyncnn._errors import WorkerError
from asyncnn._runtime._lifecycle import error_leaves
from asyncnn.backends import MAX_POOL_WORKERS

from . import _shm
from ._handshake import (
    accept,
    listen,
    serve_listener,
)
from ._wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AuthenticationError,
    Connection,
)

if TYPE_CHECKING:
    from asyncnn._runtime._config import RunConfig

__all__ = ["DEFAULT_HEARTBEAT_TIMEOUT", "HEARTBEAT_INTERVAL", "MIN_HEARTBEAT_TIMEOUT", "Cluster"]

log = logging.getLogger("asyncnn.cluster")

#: seconds between two heartbeats of a worker during a run (a worker with nothing else to
#: send is silent this long by design)
HEARTBEAT_INTERVAL = 0.5
#: the shortest ``heartbeat_timeout`` a cluster takes: twice the interval, so that a late
#: heartbeat (a busy event loop, a loaded host) is no hang
MIN_HEARTBEAT_TIMEOUT = 2 * HEARTBEAT_INTERVAL
#: a cluster's ``heartbeat_timeout`` unless told otherwise (a worker's bounds before it is told
#: its cluster's, with a run)
DEFAULT_HEARTBEAT_TIMEOUT = 10.0


#: the clusters whose workers run, held weakly: an atexit entry of each cluster's own ``_stop``
#: kept the cluster alive, so a cluster dropped without ``close()`` (a sweep's forgotten one)
#: kept its worker processes, sockets and shared memory until the program ended; held so, it is
#: collected and ``__del__`` stops them
_STARTED: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At the program's end, stops the workers of every cluster still running."""
    for cluster in list(_STARTED):
        try:
            cluster._stop()
        except Exception:  # noqa: BLE001 - the others are stopped all the same
            pass


class Cluster:
    """Worker processes connected to this (driver) process. Use a subclass.

    A cluster starts on first use (the first ``fit`` or ``open_run`` that names it) and keeps its
    workers for later runs; :meth:`close` (or leaving a ``with`` block, or the end of the
    program) stops them. A run that fails takes its workers down with it; the next run starts
    fresh ones.

    Args:
        workers: how many worker processes (nodes say where they run with ``worker=i``,
            ``0 <= i < workers``; nodes without ``worker`` run in the driver).
        host: the address the driver and workers listen on; loopback unless told otherwise
            (one the driver cannot listen on fails the start with an ``OSError`` naming it).
        heartbeat_timeout: a worker silent this long during a run is declared hung (seconds,
            at least :data:`MIN_HEARTBEAT_TIMEOUT`, 1 s: a worker sends a heartbeat every
            :data:`HEARTBEAT_INTERVAL`, 0.5 s). Bytes of a frame arriving, and a worker's
            pulse while it makes a large shared-memory slab, count as signs of life: only a
            worker that sends nothing at all is silent.
        start_timeout: seconds for all workers to start and connect.
        max_message_bytes: the largest message a process accepts (a frame that claims more is
            refused without allocating it).
        threads_per_worker: CPU threads each worker's actors use, at most
            :data:`~asyncnn.backends.MAX_POOL_WORKERS` (default: this host's cores shared out
            between the processes that host CPU actors).
        nccl: move tensors between GPU nodes of different processes with NCCL (cupy's
            bindings; one two-rank communicator per direction of each such pair), instead of
            through the host. Needs one GPU per process end (NCCL refuses two processes on one
            GPU) and cupy with NCCL in every process, the driver included.
    """

    #: whether connections to this cluster's workers may use shared memory (``_shm``): only
    #: where every worker runs on this host (:class:`~asyncnn.cluster.LocalCluster`)
    shm = False
    #: how many refused connections :attr:`rejected` keeps in words
    REJECTED_KEPT = 100
    #: at most one warning about refused connections is logged per this many seconds
    REJECTED_LOG_SECONDS = 5.0

    def __init__(
        self,
        workers: int,
        *,
        host: str = "127.0.0.1",
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        start_timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        threads_per_worker: int | None = None,
        nccl: bool = False,
    ) -> None:
        # a numpy integer is taken, as worker= takes it; a bool is not a count
        if not isinstance(workers, int | np.integer) or isinstance(workers, bool | np.bool_):
            raise TypeError(
                f"{type(self).__name__}(workers=...) takes an int >= 1, got {workers!r:.40} "
                f"(of type {type(workers).__name__})"
            )
        if workers < 1:
            raise ValueError(f"a cluster needs workers >= 1, got {workers!r}")
        # checked here, not where first used: a string timeout failed deep inside the first
        # run, a zero one declared every worker hung, nccl="no" turned NCCL on
        who = type(self).__name__
        _check_positive(who, "heartbeat_timeout", heartbeat_timeout, integer=False)
        if not heartbeat_timeout >= MIN_HEARTBEAT_TIMEOUT:
            # (a shorter one declared every idle worker hung: one with nothing to send is
            # silent between two heartbeats by design)
            raise ValueError(
                f"{who}(heartbeat_timeout=...) must be at least {MIN_HEARTBEAT_TIMEOUT:g} s, "
                f"got {heartbeat_timeout!r}: a worker sends a heartbeat every "
                f"{HEARTBEAT_INTERVAL:g} s, and one with nothing else to send is silent that "
                f"long, so a shorter timeout would declare healthy workers hung"
            )
        if start_timeout is not None:  # None: wait for ever
            _check_positive(who, "start_timeout", start_timeout, integer=False)
        _check_positive(who, "max_message_bytes", max_message_bytes, integer=True)
        if threads_per_worker is not None:
            _check_positive(who, "threads_per_worker", threads_per_worker, integer=True)
            if threads_per_worker > MAX_POOL_WORKERS:
                # (refused here by its own name: the first fit said "cpu_workers must be at
                # most 4096", an argument the user never passed)
                raise ValueError(
                    f"{who}(threads_per_worker=...) must be at most {MAX_POOL_WORKERS}, got "
                    f"{threads_per_worker!r}: each process of the run opens a pool of that many "
                    f"threads, and a pool has at most {MAX_POOL_WORKERS}; leave it out to share "
                    "this host's cores between the processes"
                )
        if not isinstance(nccl, bool):
            raise TypeError(f"{who}(nccl=...) takes True or False, got {nccl!r:.40}")
        if not isinstance(host, str):
            raise TypeError(f"{who}(host=...) takes an address as a str, got {host!r:.40}")
        if not host.strip():
            # (every worker was told to bind to it and exited before it connected, saying
            # nothing of why)
            raise ValueError(
                f"{who}(host=...) takes an address to listen on, got {host!r}: leave it out for "
                "loopback (127.0.0.1), or give this host's address (0.0.0.0 for every interface)"
            )
        # numpy numbers are checked above but stored as Python ones: they go into msgpack
        # headers (which refuse numpy scalars) and into code that calls int methods on them
        self.workers = int(workers)
        self.host = host
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.start_timeout = None if start_timeout is None else float(start_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.threads_per_worker = None if threads_per_worker is None else int(threads_per_worker)
        self.nccl = nccl
        self.connections: dict[int, Connection] = {}
        #: per worker: pid, host and port it listens on for peers
        self.info: dict[int, dict[str, Any]] = {}
        #: the most recent connections refused (wrong token, unexpected peers, handshakes cut),
        #: in words: at most :attr:`REJECTED_KEPT` lines, however many came
        self.rejected: list[str] = []
        #: every connection refused since the cluster was made, by this process or a worker
        self.rejected_count = 0
        self._log_window = (0.0, 0)  # (start of the current logging window, refusals unlogged)
        self.started = False
        #: whether a run is open on the workers (one at a time: they serve one run)
        self.running = False
        #: whether the workers stop as the open run ends (a with-block left by an error while
        #: a run on another thread had them)
        self.close_after_run = False
        #: held while a run tests :attr:`running` and claims it (fits on two threads, each with
        #: its own event loop, may open runs on one cluster at once)
        self.run_lock = threading.Lock()
        self.token = b""

    # -- what subclasses provide -----------------------------------------------------------------
    def _launch(self, host: str, port: int, token: bytes) -> None:
        """Starts the worker processes, which then connect to ``host:port``."""
        raise NotImplementedError

    def _fate(self, index: int) -> str:
        """What became of worker ``index`` (e.g. ``"exited with code -9"``), or ``""``."""
        return ""

    def _unheard(self, index: int) -> str:
        """What is known of worker ``index``, which has not connected and has no fate."""
        return "no word"

    def _terminate(self) -> None:
        """Stops every worker process, waiting for them; kills what does not stop."""

    # -- life --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the workers and connects them (a no-op when they are up).

        A worker that died since the last run (between runs nobody reads its connection) is
        noticed here: the cluster is then restarted, which loses nothing, as between runs every
        weight lives in the driver."""
        if self.started:
            gone = {i: self._fate(i) for i in range(self.workers)}
            # a worker killed a moment ago has closed its connection (the kernel closes a
            # dying process's sockets before its parent can reap it) while its exit status is
            # not there yet: its run would fail at its start, saying the worker died
            for i, conn in self.connections.items():
                if not gone.get(i) and _hung_up(conn):
                    gone[i] = await self._fate_soon(i) or "closed its connection"
            gone = {i: fate for i, fate in gone.items() if fate}
            if not gone:
                return
            log.warning(
                "restarting the cluster: %s",
                "; ".join(f"worker {i} {fate} since the last run" for i, fate in gone.items()),
            )
            self._stop()
        if _shm.enabled(self.shm):
            # a malformed ASYNCNN_SHM_SPIN_US (which the workers inherit) is refused here,
            # named, before any worker starts
            _shm.spin_seconds()
        self.token = os.urandom(32)
        try:
            listener = listen(self.host, 0)
        except OSError as exc:
            # (a bare gaierror or "Cannot assign requested address" named neither)
            raise OSError(
                f"{type(self).__name__}(host={self.host!r}): the driver cannot listen on it "
                f"({exc}); give an address of this host: leave host= out for loopback "
                "(127.0.0.1), or pass 0.0.0.0 for every interface"
            ) from exc
        port = listener.getsockname()[1]
        # which worker the start waits for after all have connected, and for what (a worker
        # that hangs or dies there is named, as one that never connects is)
        awaited: tuple[int, str] | None = None
        try:
            self._launch(self.host, port, self.token)
            with anyio.fail_after(self.start_timeout):
                await self._admit_all(listener)
            with anyio.fail_after(self.start_timeout):
                for i, conn in self.connections.items():
                    awaited = (i, "answer the driver's ping")
                    await conn.send({"t": "ping"})
                    await conn.receive()
                peers = [[i, v["host"], v["port"]] for i, v in self.info.items()]
                for i, conn in self.connections.items():
                    awaited = (i, "take the list of its peers")
                    await conn.send({"t": "mesh", "peers": peers})
            with anyio.fail_after(self.start_timeout):
                for i, conn in self.connections.items():
                    awaited = (i, "connect to its peers")
                    header, _ = await conn.receive()
                    if header.get("t") != "ready":
                        raise WorkerError(i, [], f"worker {i} answered {header!r} to the mesh")
        except TimeoutError:
            missing = sorted(set(range(self.workers)) - set(self.connections))
            if missing or awaited is None:
                fates = "; ".join(
                    f"worker {i}: {self._fate(i) or self._unheard(i)}" for i in missing
                )
                message = (
                    f"workers {missing} did not connect within {self.start_timeout:g} s ({fates})"
                )
            else:
                i, what = awaited
                missing = [i]
                message = (
                    f"worker {i} connected but did not {what} within {self.start_timeout:g} s "
                    f"({self._fate(i) or 'hung, or stopped'})"
                )
            self._stop()
            raise WorkerError(
                missing[0] if missing else -1, [], f"{type(self).__name__}: {message}"
            ) from None
        except (EOFError, ConnectionError) as exc:
            if awaited is None:
                self._stop()
                raise
            i, what = awaited
            fate = self._fate(i) or "closed its connection"
            self._stop()
            raise WorkerError(
                i, [], f"{type(self).__name__}: worker {i} {fate} before it could {what} ({exc})"
            ) from exc
        except BaseException:
            self._stop()
            raise
        finally:
            listener.close()
        self.started = True
        _STARTED.add(self)  # no worker outlives the program (_stop_all), nor a dropped cluster

    async def _fate_soon(self, index: int) -> str:
        """:meth:`_fate` of a worker that closed its connection, which a moment later has its
        exit status (at most a second)."""
        for _ in range(20):
            fate = self._fate(index)
            if fate:
                return fate
            await anyio.sleep(0.05)
        return ""

    async def _admit_all(self, listener: Any) -> None:
        """Accepts the workers' connections, handshaking with every comer at once (so that idle
        connections to the driver's port cannot keep the workers out), until all are in."""
        all_in = anyio.Event()

        async def admit(sock: Any) -> None:
            await self._admit(sock)
            if len(self.connections) >= self.workers:
                all_in.set()

        async def watch() -> None:
            # a worker that ends before it connects fails the start now, not at start_timeout
            while True:
                await anyio.sleep(0.1)
                for i in range(self.workers):
                    fate = "" if i in self.connections else self._fate(i)
                    if fate:
                        raise WorkerError(
                            i, [], f"{type(self).__name__}: worker {i} {fate} before it "
                            "connected to the driver (its output, above, may say why)",
                        )  # fmt: skip

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_listener, listener, admit, self.reject)
                tg.start_soon(watch)
                await all_in.wait()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # a worker that announced an impossible index: that, not the group, is the error;
            # so is a lone failure (Ctrl-C lands in the task waiting here: the caller must get
            # its KeyboardInterrupt, not a group holding it)
            leaves = error_leaves(group)
            wrong = next((e for e in leaves if isinstance(e, WorkerError)), None)
            if wrong is not None:
                raise wrong from None
            cancelled = anyio.get_cancelled_exc_class()
            real = [e for e in leaves if not isinstance(e, cancelled)]
            if len(real) != 1:
                raise
            raise real[0] from None

    async def _admit(self, sock: Any) -> None:
        try:
            conn, hello = await accept(sock, self.token, self.max_message_bytes, shm=self.shm)
        except AuthenticationError as exc:
            self.reject(f"the driver refused a connection: {exc}")
            return
        i = hello.get("index")
        if hello.get("role") != "worker" or not isinstance(i, int) or i in self.connections:
            self.reject(f"the driver refused an authenticated connection saying {hello!r}")
            conn.close()
            return
        if not 0 <= i < self.workers:
            conn.close()
            raise WorkerError(i, [], f"a worker said it was number {i} of {self.workers}")
        conn.peer = f"worker {i}"
        self.connections[i] = conn
        self.info[i] = {k: hello.get(k) for k in ("pid", "host", "port")}

    def open_run(
        self,
        graph: Any,
        optimizer: Any,
        policy: Any,
        config: RunConfig,
        **options: Any,
    ) -> Any:
        """:func:`asyncnn.open_run` on this cluster (``ann.open_run(..., cluster=c)`` calls it,
        with the run's options whole in ``config``; ``options`` are ``state``, ``pool``,
        ``on_loss`` and ``validated``)."""
        from ._driver import open_cluster_run

        return open_cluster_run(self, graph, optimizer, policy, config, **options)

    def reject(self, what: str) -> None:
        """Records (and logs) a refused connection."""
        self.reject_many([what], 1)

    def reject_many(self, sample: list[str], count: int) -> None:
        """Records ``count`` refused connections, of which ``sample`` are described.

        Only the last :attr:`REJECTED_KEPT` lines are kept, and at most one warning is logged
        every :attr:`REJECTED_LOG_SECONDS` (saying how many refusals it stands for), so a flood
        of connections costs a counter, not memory or a log line each."""
        count = max(count, len(sample))
        if not count:
            return
        self.rejected_count += count
        lines = list(sample)
        if count > len(sample):
            lines.append(f"{count - len(sample)} more connections refused (not itemised)")
        self.rejected.extend(lines[-self.REJECTED_KEPT :])
        del self.rejected[: -self.REJECTED_KEPT]
        start, unlogged = self._log_window
        now = time.monotonic()
        unlogged += count
        if now - start >= self.REJECTED_LOG_SECONDS:
            more = f" ({unlogged - 1} more refused since the last warning)" if unlogged > 1 else ""
            log.warning("%s%s", lines[0] if sample else lines[-1], more)
            self._log_window = (now, 0)
        else:
            self._log_window = (start, unlogged)

    def close(self) -> None:
        """Stops the workers (asks them; kills those that do not go within seconds). Closing a
        closed cluster does nothing; a later run starts fresh workers.

        Raises:
            RuntimeError: a run is open on this cluster (leave its ``open_run`` block, or let
                its ``fit`` end, first): its readers would otherwise wait on closed connections
                and the run fail later with a misleading "died" or "hung".
        """
        # the test and the stop are one step: a run claiming the cluster on another thread in
        # between would have its workers stopped under it
        with self.run_lock:
            if self.running:
                raise RuntimeError(
                    f"{type(self).__name__}.close() was called while a run is open on it; end "
                    "the run first (leave its open_run block, or let its fit return or fail): "
                    "a run that fails takes its workers down by itself"
                )
            self._stop()

    def _stop(self) -> None:
        """Stops the workers, whatever runs on them (a failed run, the end of the program)."""
        for conn in self.connections.values():
            try:
                # best effort, without an event loop: a tiny frame fits any socket buffer
                _send_shutdown(conn)
            except OSError:
                pass
        # closed before the workers are waited for: a worker whose run failed reads (and drops)
        # what the driver sends until the driver hangs up (Worker._after_failure), and would
        # otherwise be waited for in vain, then killed
        for conn in self.connections.values():
            conn.close()
        self._terminate()  # (reads which workers were connected: cleared after it)
        self.connections.clear()
        self.started = False
        _STARTED.discard(self)

    def broken(self) -> None:
        """Called after a failed run: its workers may be mid-message, so they are replaced."""
        self._stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        error = exc[1]
        if error is None:
            self.close()
            return
        # The block's own error goes on, whatever the close meets. The test and the stop are
        # one step under the lock: looked at under it and closed after it, a fit on another
        # thread that claimed the cluster in between made close() refuse, and that refusal
        # replaced the block's error.
        with self.run_lock:
            if self.running:
                # the run open on another thread keeps the workers until it ends
                self.close_after_run = True
                error.add_note(
                    f"(the {type(self).__name__} of this with-block stops its workers when "
                    "the run still open on it, on another thread, ends)"
                )
                return
            try:
                self._stop()
            except Exception as stop_error:  # noqa: BLE001 - told beside the block's error
                log.warning("%s: could not stop its workers: %r", type(self).__name__, stop_error)
                error.add_note(
                    f"(the {type(self).__name__} of this with-block could not stop its workers: "
                    f"{type(stop_error).__name__}: {stop_error})"
                )

    def __del__(self) -> None:
        if getattr(self, "started", False):
            self._stop()

    def describe_worker(self, index: int, hosted: list[str]) -> str:
        """``"worker 1 (pid 123, hosting stage1, loss)"``."""
        pid = self.info.get(index, {}).get("pid")
        return f"worker {index} (pid {pid}, hosting {', '.join(hosted) or 'nothing'})"


def _check_positive(who: str, name: str, value: Any, *, integer: bool) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool | np.bool_) or not isinstance(value, kinds):
        raise TypeError(
            f"{who}({name}=...) takes {'an int' if integer else 'a number of seconds'} > 0, got "
            f"{value!r:.40} (of type {type(value).__name__})"
        )
    if not value > 0:  # NaN too
        raise ValueError(f"{who}({name}=...) must be > 0, got {value!r}")


def _hung_up(conn: Connection) -> bool:
    """Whether the worker at the end of ``conn``, idle between runs, closed it (a peek; it
    sends nothing between runs, so anything to read other than the end is no sign)."""
    if conn.closed:
        return True
    try:
        return conn.sock.recv(1, socket.MSG_PEEK) == b""  # (the socket does not block)
    except BlockingIOError:
        return False
    except OSError:  # (reset by the peer)
        return True


def _send_shutdown(conn: Connection) -> None:
    conn.send_sync({"t": "shutdown"})
