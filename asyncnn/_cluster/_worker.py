"""The worker process: hosts its share of a graph's actors for each run the driver starts.

Started as ``python -m asyncnn._cluster --driver HOST:PORT --index I`` with the run's
token in the environment (``ASYNCNN_CLUSTER_TOKEN``, hex), or in-process by a Ray actor through
:func:`run_worker`. It connects to the driver, listens for its peers, builds the mesh of worker
connections, then serves commands until the driver says ``shutdown`` or goes away (then it exits:
a worker never outlives its driver).

What one run needs beside the actors (its run object, the reports on their way to the
scheduler, the tasks reading the driver and the peers, the trace file) is ``_worker_run``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from typing import Any

import anyio
import numpy as np

from asyncnn._errors import ActorError
from asyncnn._math._imports import class_path, trusted_modules
from asyncnn._math._optim_spec import from_spec as optimizer_from_spec
from asyncnn._math._pytree import tree_map
from asyncnn._runtime._config import RunConfig
from asyncnn._runtime._graph import Graph
from asyncnn._runtime._lifecycle import (
    hosting,
    maybe_pool,
    recording,
    single_error,
)
from asyncnn._runtime._policies import policy_from_spec
from asyncnn._runtime._recorder import Recorder
from asyncnn._runtime._run import RunState
from asyncnn.backends import get_backend

from . import _shm
from ._base import DEFAULT_HEARTBEAT_TIMEOUT
from ._codec import decode_state, encode_state
from ._handshake import (
    Refusals,
    accept,
    connect,
    listen,
    serve_listener,
)
from ._remote import RemoteActor
from ._wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AuthenticationError,
    Connection,
    lost_peer,
)
from ._worker_run import (
    MarkersMissing,
    Reports,
    WorkerRun,
    _check_actor_states,
    _on,
    _refuse_unsendable,
    _TraceFile,
    _WorkerShare,
    send_within,
)

__all__ = ["driver_paths", "run_worker", "worker_main"]

TOKEN_ENV = "ASYNCNN_CLUSTER_TOKEN"
PATH_ENV = "ASYNCNN_CLUSTER_PATH"
#: the most characters of an error's message (and of its cause) a worker's report carries, and
#: of its traceback: with 4 bytes a character at worst, well under the 1 MiB header limit
MESSAGE_CHARS = 16_000
TRACEBACK_CHARS = 100_000


class Worker:
    """One worker's state between runs: its connections and what it has refused."""

    #: the cluster's heartbeat_timeout (each run says it): how long the waits of a run's end
    #: may go without anything moving (see _WorkerShare, _report_error)
    heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT

    def __init__(
        self, index: int, driver: Connection, listener: Any, max_message_bytes: int, token: bytes
    ) -> None:
        self.index = index
        self.driver = driver
        self.listener = listener
        self.max_message_bytes = max_message_bytes
        self.token = token
        self.peers: dict[int, Connection] = {}
        self.expected: set[int] = set()
        self.mesh_known = False
        self.peer_arrived = anyio.Event()
        #: refused connections since the last report to the driver (a count and a few lines)
        self.rejected = Refusals()
        #: the trace file of a run that failed here, until the error report carries it
        self.failed_trace: bytes | None = None

    async def accept_peers(self) -> None:
        """Accepts the connections of workers with higher indices for the whole life of the
        worker; anything else (a wrong token, an unexpected hello) is refused and reported.
        Handshakes run concurrently, at most :data:`MAX_PENDING_HANDSHAKES` at once, and
        running out of file descriptors pauses accepting instead of ending the worker."""
        await serve_listener(
            self.listener, self._handshake,
            lambda what: self.rejected.add(f"worker {self.index}: {what}"),
        )  # fmt: skip

    async def _handshake(self, sock: Any) -> None:
        try:
            conn, hello = await accept(sock, self.token, self.max_message_bytes)
        except AuthenticationError as exc:
            self.rejected.add(f"worker {self.index} refused a connection: {exc}")
            return
        j = hello.get("index")
        # a peer may dial before this worker has heard of the mesh: any higher index is
        # welcome then, and checked against the mesh once it is known
        if (
            hello.get("role") != "peer"
            or not isinstance(j, int)
            or j <= self.index
            or (self.mesh_known and j not in self.expected)
            or j in self.peers
        ):
            self.rejected.add(
                f"worker {self.index} refused a connection that authenticated but said "
                f"{hello!r} (expected a peer among {sorted(self.expected - set(self.peers))})"
            )
            conn.close()
            return
        conn.peer = f"worker {j}"
        self.peers[j] = conn
        self.peer_arrived.set()
        self.peer_arrived = anyio.Event()

    async def build_mesh(self, addresses: Mapping[int, tuple[str, int]]) -> None:
        """Connects to every lower-indexed worker and waits for every higher-indexed one."""
        self.expected = {j for j in addresses if j > self.index}
        self.mesh_known = True
        for j in [j for j in self.peers if j not in addresses]:
            self.rejected.add(f"worker {self.index} dropped a peer claiming index {j}")
            self.peers.pop(j).close()
        for j, (host, port) in sorted(addresses.items()):
            if j < self.index:
                self.peers[j] = await connect(
                    host, port, self.token, {"role": "peer", "index": self.index},
                    f"worker {j}", self.max_message_bytes,
                )  # fmt: skip
        with anyio.fail_after(60):
            while not self.expected <= set(self.peers):
                await self.peer_arrived.wait()

    async def serve(self) -> None:
        """Answers the driver's commands until ``shutdown`` or until the driver is gone.

        The driver authenticated with the run's token and started this process: the classes
        its specs name are imported here as there (user layers and actors included)."""
        with trusted_modules("*"):
            await self._serve()

    async def _serve(self) -> None:
        while True:
            header, buffers = await self.driver.receive()
            t = header.get("t")
            if t == "ping":
                await self.driver.send({"t": "pong"})
            elif t == "clock":  # a traced run's start: the driver matches this host's clock
                await self.driver.send(
                    {"t": "clock", "now": time.perf_counter(), "boot": _shm.boot_id()}
                )
            elif t == "mesh":
                addresses = {int(j): (str(h), int(p)) for j, h, p in header["peers"]}
                await self.build_mesh(addresses)
                await self.driver.send({"t": "ready"})
            elif t == "run":
                try:
                    await self.run_share(header, buffers)
                except BaseException as exc:
                    await self._after_failure(exc)
                    raise
            elif t == "shutdown":
                return
            else:
                raise ValueError(f"worker {self.index}: unexpected command {t!r} from the driver")

    async def run_share(self, cmd: dict[str, Any], buffers: list[Any]) -> None:
        """Runs this worker's actors for one run and sends the driver their final state."""
        self.heartbeat_timeout = float(cmd.get("heartbeat_timeout") or self.heartbeat_timeout)
        _add_paths(cmd.get("paths") or [])
        graph = Graph.from_spec(cmd["graph"])
        graph.shapes = {k: tuple(v) for k, v in cmd["shapes"].items()}
        placement: dict[str, int | None] = cmd["placement"]
        hosted = {n for n, w in placement.items() if w == self.index}
        share = decode_state(cmd, buffers)
        state = RunState(
            params=share["params"],
            opt_states=share["opt_states"],
            versions=share["versions"],
            minibatches=int(cmd["minibatches"]),
            keys=int(cmd["keys"]),
            pending_grads=share["pending"],
            actor_states=share["actor_states"],
            earlier_params=share["earlier"],
            pending_delays=share["pending_delays"],
        )
        for name in state.params:  # host arrays from the wire, onto each node's device
            move = _on(get_backend(graph.nodes[name].device))
            state.params[name] = tree_map(move, state.params[name])
            state.opt_states[name] = tree_map(move, state.opt_states[name])
            if name in state.pending_grads:
                acc, count = state.pending_grads[name]
                state.pending_grads[name] = (tree_map(move, acc), count)
            if name in state.actor_states:
                # (in its own order: a pytree's sorts keys, which fails for int and str keys)
                state.actor_states[name] = _in_order(move, state.actor_states[name])
            if name in state.earlier_params:
                state.earlier_params[name] = {
                    v: tree_map(move, p) for v, p in state.earlier_params[name].items()
                }
        recorder = None
        trace = None if cmd["trace"] is None else _TraceFile(self.index)
        try:
            if trace is not None:
                recorder = Recorder(trace.path, {"worker": self.index}, cmd["trace"])
                recorder.advice = (
                    f"it is worker {self.index}'s part of the trace, a temporary file on its "
                    f"host: free space in its temporary folder ({tempfile.gettempdir()}), or "
                    "set TMPDIR for the workers to another"
                )
                trace.unlink()
                # one clock for the whole run: the driver's (the driver's t0, on this host's
                # clock: a worker elsewhere has it to within the driver's estimate of the two)
                recorder.t0 = float(cmd["t0"])
            await self._serve_share(cmd, graph, placement, hosted, state, recorder, trace)
        finally:
            if trace is not None:
                trace.close()

    async def _serve_share(
        self,
        cmd: dict[str, Any],
        graph: Graph,
        placement: dict[str, int | None],
        hosted: set[str],
        state: RunState,
        recorder: Recorder | None,
        trace: _TraceFile | None,
    ) -> None:
        """Serves this worker's actors for the run, ``recorder`` (None: untraced) writing
        ``trace``; then sends the driver their final state (with the trace's events), or keeps
        the events for the error report and raises the run's error."""
        error: BaseException | None = None
        run: WorkerRun | None = None
        threads = int(cmd["threads"])
        # how the driver's pool cuts work: this pool cuts as it does, on its own threads (the
        # products planned for the driver's plan_workers, one process's team on its host)
        cut = cmd.get("pool") or {}
        if cut.get("split") is False:
            # a driver's pool that leaves products whole (a caller's, with BLAS's own threads):
            # whole products on a worker's one-thread BLAS would run on one core; its own
            # default pool cuts them over its threads instead (bit-identity with one process
            # holds for the runtime's own pools: docs/cluster.md)
            cut = {}
        try:
            with recording(recorder):  # a worker writes no error event: the driver's trace has it
                async with maybe_pool(
                    None, threads, part_flops=int(cut.get("part_flops", 0)),
                    split=cut.get("split"), inline_flops=cut.get("inline_flops"),
                    plan_workers=cut.get("plan_workers", cut.get("cpu_workers")),
                ) as pool:  # fmt: skip
                    proxies: dict[str, RemoteActor] = {}
                    for name, w in placement.items():
                        if w != self.index:
                            conn = self.driver if w is None else self.peers[w]
                            proxies[name] = RemoteActor(name, conn, None, w)
                    config = RunConfig.from_spec(cmd["config"])
                    run = WorkerRun(
                        graph, optimizer_from_spec(cmd["optimizer"]),
                        policy_from_spec(cmd["policy"]), state, pool, config, recorder=recorder,
                        max_in_flight=int(cmd["max_in_flight"]), hosted=hosted, remote=proxies,
                    )  # fmt: skip
                    run.reports = Reports()
                    _check_actor_states(run)
                    nccl = cmd.get("nccl") or {}
                    part = _WorkerShare(self, nccl.get("plan") or [], nccl.get("ids") or [])
                    async with hosting(run, part):
                        pass  # the driver drives the run: its actors stop when it says so
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, then re-raised
            error = exc
        if error is None:
            assert run is not None
            out: list[Any] = []
            try:
                # an actor's state may have become unsendable since the check before the run
                # (a set added while it trained): named as that check names it
                state = run.state()
                for name, st in state.actor_states.items():
                    if name in run.local:
                        _refuse_unsendable(name, type(run.local[name]), st)
                result = {
                    "t": "result",
                    **encode_state(state, out),
                    "stats": {
                        n: {"cls": class_path(type(s)), "fields": s.as_dict()}
                        for n, s in run.statistics().items()
                    },
                    "rejected": self.rejected.take(),
                }
            except BaseException as exc:  # noqa: BLE001 - reported with the trace, re-raised
                error = exc
        if error is not None:
            if trace is not None:  # sent with the error report, for the driver's trace
                with contextlib.suppress(OSError):
                    self.failed_trace = await anyio.to_thread.run_sync(trace.read)
            raise error
        if trace is not None:
            raw = await anyio.to_thread.run_sync(trace.read)
            dropped = self._trace_too_large(len(raw), sum(np.asarray(b).nbytes for b in out))
            if dropped is None:
                out.append(np.frombuffer(raw, dtype=np.uint8))
                result["trace"] = len(out) - 1
            else:  # the run's result matters more than its trace: the driver's trace says so
                result["trace_dropped"] = dropped
        await self.driver.send(result, out)

    def _trace_too_large(self, size: int, beside: int) -> str | None:
        """Why this worker's part of the trace (``size`` bytes, in a frame with ``beside``
        bytes of tensors) cannot go to the driver, or None where it can: a frame over the
        connection's ``max_message_bytes`` is refused, and the report it rides on was lost
        with it (the run said the worker died; a finished run failed at its end)."""
        limit = self.driver.max_message_bytes
        if size + beside <= limit:
            return None
        with_ = f", with the {beside:,} bytes of its frame's tensors," if beside else ""
        return (
            f"its part of the trace ({size:,} bytes{with_}) is over max_message_bytes "
            f"({limit:,} bytes); raise max_message_bytes of the cluster to keep it"
        )

    async def _after_failure(self, error: BaseException) -> None:
        """Reports ``error``, the run's failure here (:meth:`_report_error`), while reading and
        dropping whatever the driver and the peers send, then goes on dropping it until the
        driver hangs up (or has sent nothing for ``heartbeat_timeout``).

        Its actors stopped, this worker read nothing more: a process blocked sending to it (an
        actor of the driver, run in the task that reads this worker, its link's buffer full)
        stayed blocked, never read the report behind it, and the run ended in a StallError
        after ``stall_timeout`` (or, this worker gone, "worker N died") instead of the actor's
        error. Every link is emptied now, and stays so until the driver has read the report.
        """
        quiet = self.heartbeat_timeout
        driver = self.driver
        hung_up = anyio.Event()

        async def discard(conn: Connection, done: anyio.Event | None) -> None:
            try:
                await conn.discard()
            except (EOFError, ConnectionError):
                # only the end of the stream says the peer hung up (a discard that ended
                # otherwise, taken for it, had this worker exit under the driver's send)
                if done is not None:
                    done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(discard, driver, hung_up)
            for peer in self.peers.values():
                tg.start_soon(discard, peer, None)
            await self._report_error(error)
            seen, since = driver.received_progress(), anyio.current_time()
            while not hung_up.is_set():
                with anyio.move_on_after(min(1.0, quiet / 4)):
                    await hung_up.wait()
                now, progress = anyio.current_time(), driver.received_progress()
                if progress != seen:
                    seen, since = progress, now
                elif now - since >= quiet:
                    break  # a driver that takes this long to hang up is past reading the report
            tg.cancel_scope.cancel()

    async def _report_error(self, error: BaseException) -> None:
        """Sends the driver the report of ``error``, the run's failure here: first what it is
        (its class, message and traceback; an actor's name, message kind, key and cause), then,
        in a frame of its own, the events this worker recorded up to it (a traced run).

        The cause goes first and alone: it is a few kilobytes at most, where the events may be
        many megabytes, over a slow link or to a driver slow to read; sent with them, a report
        cut short lost the cause too, and the run said "worker N died". Each frame is given up
        once nothing of it has gone out for the cluster's ``heartbeat_timeout`` (the events
        then stay missing from the driver's trace, which says so); a report that cannot go at
        all (the driver is gone, or takes nothing) is written to this process's stderr.
        """
        err = single_error(error)
        frame: dict[str, Any] = {
            "t": "error",
            "type": type(err).__name__,
            "message": _clip(str(err), MESSAGE_CHARS),
            "traceback": _clip("".join(traceback.format_exception(err)), TRACEBACK_CHARS),
        }
        lost = lost_peer(err)
        if lost is not None:
            frame["lost"] = lost.worker  # not this worker's fault: the driver says whose
        if isinstance(err, MarkersMissing):
            frame["missing"] = list(err.missing)  # whose part did not end: the driver blames them
        if isinstance(err, ActorError):
            frame.update(actor=err.actor, kind=err.kind, key=err.key)
            cause = err.__cause__
            if cause is not None:
                frame["cause"] = _clip(f"{type(cause).__name__}: {cause}", MESSAGE_CHARS)
                # what the driver needs to rebuild it as an exception of its class
                frame["cause_class"] = [type(cause).__module__, type(cause).__qualname__]
                frame["cause_message"] = _clip(str(cause), MESSAGE_CHARS)
        events, self.failed_trace = self.failed_trace, None
        if events is not None:  # the events this worker recorded, up to the failure
            dropped = self._trace_too_large(len(events), 0)
            if dropped is None:
                frame["trace_follows"] = True
            else:  # the error matters more than the events before it
                frame["trace_dropped"] = dropped
        quiet = self.heartbeat_timeout
        try:
            if not await send_within(self.driver, frame, [], quiet):
                _unsent(self.index, frame, f"the driver took none of it for {quiet:g} s")
                return
            if events is not None and "trace_follows" in frame:
                trace = {"t": "trace", "trace": 0}
                await send_within(self.driver, trace, [np.frombuffer(events, np.uint8)], quiet)
        except (EOFError, ConnectionError):
            pass  # the driver is gone: exiting reports it too


def _unsent(index: int, frame: dict[str, Any], why: str) -> None:
    """Writes an error report the driver could not be sent (``why``) to this process's stderr,
    the driver's terminal for a LocalCluster: the failure is said somewhere."""
    what = frame.get("cause") or f"{frame.get('type')}: {frame.get('message')}"
    actor = f" (actor {frame['actor']!r})" if frame.get("actor") is not None else ""
    with contextlib.suppress(OSError, ValueError):
        print(
            f"asyncnn worker {index}: could not report its failure to the driver ({why}): "
            f"{what}{actor}",
            file=sys.stderr,
            flush=True,
        )


def _clip(text: str, limit: int) -> str:
    """``text`` with its middle cut out past ``limit`` characters: an error report's header
    must stay under the header limit (a message several megabytes long came to the driver as a
    frame that "broke the protocol", the actual error lost)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


async def worker_main(
    driver_host: str,
    driver_port: int,
    index: int,
    token: bytes,
    bind: str = "127.0.0.1",
    advertise: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> None:
    """Runs one worker until the driver shuts it down or disappears.

    Args:
        driver_host / driver_port: where the driver listens.
        index: this worker's number (nodes with ``worker=index`` run here).
        token: the run's shared secret.
        bind: the address to listen on for peers (loopback by default).
        advertise: the address peers should dial (default: ``bind``).
        max_message_bytes: the largest frame accepted.
    """
    listener = listen(bind, 0)
    port = listener.getsockname()[1]
    hello = {
        "role": "worker",
        "index": index,
        "pid": os.getpid(),
        "host": advertise or bind,
        "port": port,
    }
    driver = await connect(driver_host, driver_port, token, hello, "the driver", max_message_bytes)
    worker = Worker(index, driver, listener, max_message_bytes, token)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.accept_peers)
        try:
            await worker.serve()
        except (EOFError, ConnectionError):
            pass  # the driver is gone: so is this worker
        finally:
            tg.cancel_scope.cancel()
            for conn in worker.peers.values():
                conn.close()
            driver.close()
            listener.close()


def _in_order(fn: Any, tree: Any) -> Any:
    """``fn`` of each leaf of ``tree`` (dicts, lists and tuples), each dict keeping its own keys
    in their order: an actor's state may mix int and str keys, as one process keeps them."""
    if isinstance(tree, dict):
        return {k: _in_order(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_in_order(fn, v) for v in tree]
    if type(tree) is tuple:
        return tuple(_in_order(fn, v) for v in tree)
    return fn(tree)


def _add_paths(paths: list[str]) -> None:
    """Puts the driver's import ``paths`` that this process lacks (and that exist here) first
    on its import path, so that user modules (custom layers, actors) import here as there."""
    sys.path[:0] = [
        p for p in paths if isinstance(p, str) and p and p not in sys.path and os.path.isdir(p)
    ]


def driver_paths() -> list[str]:
    """The driver's import path, as it tells its workers: the directories on it, absolute.

    A relative entry (``'.'``, or ``''``, which ``python -c``, the REPL and IPython put first)
    means the driver's current folder now; a worker would resolve it in its own, and a module
    the driver imports through it was "No module named ..." there."""
    out: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str):
            continue  # (a path-like object some tools append; imports skip it too)
        path = os.path.abspath(entry or os.curdir)
        if path not in out and os.path.isdir(path):
            out.append(path)
    return out


def run_worker(
    driver_host: str,
    driver_port: int,
    index: int,
    token: bytes,
    bind: str,
    advertise: str | None,
    max_message_bytes: int,
    paths: list[str],
) -> None:
    """Runs :func:`worker_main` (under trio) in this process, after putting the driver's import
    ``paths`` (those that exist here) first on the import path, so that user modules (custom
    layers, actors) import here as there."""
    _add_paths(paths)
    from asyncnn.backends import tune_allocator

    tune_allocator()
    anyio.run(
        worker_main, driver_host, driver_port, index, token, bind, advertise, max_message_bytes,
        backend="trio",
    )  # fmt: skip


def _die_with_parent() -> None:
    """Linux: ask the kernel to kill this process when its parent dies (no orphans, even when
    the driver is killed with SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m asyncnn._cluster")
    parser.add_argument("--driver", required=True, help="HOST:PORT of the driver")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--advertise", default=None)
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    args = parser.parse_args(argv)
    _die_with_parent()
    token = bytes.fromhex(os.environ.pop(TOKEN_ENV))
    paths = os.environ.pop(PATH_ENV, "").split(os.pathsep)
    host, _, port = args.driver.rpartition(":")
    try:
        run_worker(
            host, int(port), args.index, token, args.bind, args.advertise,
            args.max_message_bytes, paths,
        )  # fmt: skip
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - the driver has the details where it could
        if os.environ.get("ASYNCNN_WORKER_DEBUG"):
            traceback.print_exception(exc)
        sys.exit(1)
