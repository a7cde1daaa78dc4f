"""Workers as processes on this host."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from asyncnn._errors import WorkerError
from asyncnn._runtime._lifecycle import host_cores

from . import _shm
from ._base import Cluster
from ._worker import PATH_ENV, TOKEN_ENV, driver_paths

__all__ = ["LocalCluster"]

# the fewest workers allowed whatever the cores (a small container may still host a few)
_MIN_LIMIT = 8


class LocalCluster(Cluster):
    """``workers`` processes on this host, started fresh (spawned, never forked) on first use.

    Example:
        >>> with ann.cluster.LocalCluster(workers=2) as cluster:
        ...     tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream(4),
        ...                      cluster=cluster)
        ...     tr.fit(data, epochs=1, batch_size=64)

    Nodes say where they run with ``g.layer(..., worker=i)``; nodes without ``worker`` run in
    this (the driver) process. Workers listen on loopback and admit only peers that know the
    run's token. A worker that dies or hangs fails the run within seconds with a
    :class:`~asyncnn.WorkerError` naming it and the nodes it hosted.

    The workers start on first use and serve later fits too, one run at a time: several
    trainers may share a cluster one after another, but a second run while one is open (a fit
    on another thread, an ``open_run`` in another task) is refused with a ``RuntimeError``
    before anything reaches the workers, and the open run goes on unharmed. Give runs that must
    overlap a cluster each.

    Tensors between these processes travel through shared memory (written once by the sender,
    read in place by the receiver; see the cluster docs), the messages' headers too; TCP on
    loopback stays for the handshake, wake-ups and end-of-stream. ``shm=False`` keeps everything
    on TCP (as between hosts).

    Args:
        workers: how many worker processes: at most :meth:`max_workers` (4 per core this
            process may run on, 8 at least) unless ``oversubscribe`` is set.
        shm: move messages through shared memory (Linux on x86-64; elsewhere TCP regardless).
        oversubscribe: allow more workers than :meth:`max_workers` (each is a Python process
            of its own, tens of MB before any actor runs).
        **options: see :class:`~asyncnn.cluster.Cluster` (``host``, ``heartbeat_timeout``,
            ``start_timeout``, ``max_message_bytes``, ``threads_per_worker``).
    """

    #: workers allowed per core of this host without ``oversubscribe=True``
    MAX_WORKERS_PER_CORE = 4

    def __init__(
        self, workers: int, *, shm: bool = True, oversubscribe: bool = False, **options: Any
    ) -> None:
        super().__init__(workers, **options)
        if not isinstance(shm, bool):
            raise TypeError(f"LocalCluster(shm=...) takes True or False, got {shm!r}")
        if not isinstance(oversubscribe, bool):
            raise TypeError(
                f"LocalCluster(oversubscribe=...) takes True or False, got {oversubscribe!r:.40}"
            )
        # refused before anything starts: a typo (workers=1000) would otherwise spawn a
        # thousand interpreters, each with its own memory, on a host that cannot run them
        limit = self.max_workers()
        if self.workers > limit and not oversubscribe:
            raise ValueError(
                f"LocalCluster(workers={self.workers}) would start {self.workers} processes on "
                f"a host with {host_cores()} cores; the limit is {limit} "
                f"({self.MAX_WORKERS_PER_CORE} per core, {_MIN_LIMIT} at least): pass "
                "oversubscribe=True to start that many anyway"
            )
        self.shm = shm
        self.processes: list[subprocess.Popen[bytes]] = []

    @classmethod
    def max_workers(cls) -> int:
        """The most workers allowed without ``oversubscribe=True``:
        :attr:`MAX_WORKERS_PER_CORE` per core this process may run on, and at least 8."""
        return max(_MIN_LIMIT, cls.MAX_WORKERS_PER_CORE * host_cores())

    def _launch(self, host: str, port: int, token: bytes) -> None:
        env = dict(os.environ)
        env[TOKEN_ENV] = token.hex()
        env[PATH_ENV] = os.pathsep.join(driver_paths())
        env[_shm.ENV] = "1" if self.shm else "0"  # the workers' connections, to all peers
        # the workers' BLAS threads are set by the pool; keep OpenMP from spawning its own
        env.setdefault("OMP_NUM_THREADS", "1")
        # kept one by one: a start cut short (Ctrl-C, a failed spawn) kills those already up
        self.processes = []
        for i in range(self.workers):
            argv = [
                sys.executable, "-m", "asyncnn._cluster", "--driver", f"{host}:{port}",
                "--index", str(i), "--bind", host,
                "--max-message-bytes", str(self.max_message_bytes),
            ]  # fmt: skip
            try:
                _spawn(argv, env, self.processes)
            except OSError as exc:
                raise WorkerError(
                    i, [], f"LocalCluster: could not start worker {i} of {self.workers} "
                    f"({exc}); this host may be out of processes or memory: use fewer workers",
                ) from exc  # fmt: skip

    def _fate(self, index: int) -> str:
        if index >= len(self.processes):
            return ""
        code = self.processes[index].poll()
        if code is None:
            return ""
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def _terminate(self) -> None:
        # a connected worker was just asked to stop; one not connected (a start that was cut
        # short, by a cancel say) was told nothing and would be waited on in vain: kill it now
        for i, p in enumerate(self.processes):
            if i not in self.connections and p.poll() is None:
                p.kill()
        deadline = time.monotonic() + 2.0  # for all of them, not each
        for p in self.processes:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (empty before the cluster starts)."""
        return [p.pid for p in self.processes]


# Linux's PR_SET_PDEATHSIG, which kills a worker whose driver died (_worker._die_with_parent),
# fires when the *thread* that started the worker ends, not its process: workers started from
# a short-lived thread (a fit called inside a notebook runs on one) were SIGKILLed as soon as
# that call returned, and every later fit restarted the cluster. So every worker is started
# from one thread that lives as long as this process.
_spawner: tuple[int, queue.SimpleQueue[Any]] | None = None
_spawner_lock = threading.Lock()


def _spawn(argv: list[str], env: dict[str, str], into: list[subprocess.Popen[bytes]]) -> None:
    """``subprocess.Popen(argv)``, run on this process's spawning thread, which appends the
    process to ``into`` (so that a caller interrupted while it waits still has it to stop)."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # none yet, or lost to a fork
            jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
            threading.Thread(
                target=_serve_spawns, args=(jobs,), name="asyncnn-spawner", daemon=True
            ).start()
            _spawner = (os.getpid(), jobs)
        jobs = _spawner[1]
    done: Future[None] = Future()
    try:
        jobs.put((argv, env, into, done))
        done.result()
    except BaseException:
        # interrupted while waiting (Ctrl-C): a job not taken up yet is cancelled; one taken
        # up may be inside Popen now, and a process started after the caller stopped those in
        # ``into`` would be lost to it (it exits only once it fails to reach the driver). Popen
        # takes milliseconds: let it finish, so that the process is in ``into`` to be stopped
        if not done.cancel():
            _wait_out(done)
        raise


def _wait_out(done: Future[None]) -> None:
    """Waits until ``done`` is done, through further interrupts (a second Ctrl-C)."""
    while True:
        try:
            done.exception()  # waits, and raises nothing of the job's
            return
        except KeyboardInterrupt:
            continue


def _serve_spawns(jobs: queue.SimpleQueue[Any]) -> None:
    while True:
        argv, env, into, done = jobs.get()
        if not done.set_running_or_notify_cancel():
            continue  # its caller was interrupted before this thread took it up
        try:
            into.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL))
            done.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done.set_exception(exc)
