"""Starting and keeping the workers of a LocalCluster: workers that lie, die or are held before
the run, cancelled starts, failures while they connect or spawn, modules that cannot be sent or
are put on the path late, huge error reports, and workers started from a thread that ends."""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import threading
import types
from collections import deque
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _cluster_cases import _alive, chain, data, fit
from _reference import assert_params_equal

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def three() -> Any:
    with ann.cluster.LocalCluster(workers=3) as cluster:
        yield cluster


class _Impostor(ann.cluster.LocalCluster):
    """A local cluster joined, before its workers, by a token holder claiming index 7."""

    def _launch(self, host: str, port: int, token: bytes) -> None:
        import hashlib
        import hmac
        import socket
        import struct

        import msgpack

        # connected now, before any worker process exists: first in the driver's queue
        sock = socket.create_connection((host, port), timeout=10)

        def claim() -> None:
            with sock:
                nonce = sock.recv(32, socket.MSG_WAITALL)
                hello = msgpack.packb({"role": "worker", "index": 7})
                mac = hmac.new(token, nonce + hello, hashlib.sha256).digest()
                sock.sendall(struct.pack("<I", len(hello)) + hello + mac)
                sock.recv(1)

        threading.Thread(target=claim, daemon=True).start()
        super()._launch(host, port, token)


def test_a_worker_claiming_an_impossible_index_fails_the_start_naming_it() -> None:
    cluster = _Impostor(workers=2)
    try:
        with pytest.raises(ann.WorkerError, match="said it was number 7 of 2"):
            fit(chain([0, 1, None]), policies.Sync(), cluster=cluster, epochs=1)
    finally:
        cluster.close()


class _Stillborn(ann.cluster.LocalCluster):
    """A local cluster whose worker 1 dies before it can connect."""

    def _launch(self, host: str, port: int, token: bytes) -> None:
        super()._launch(host, port, token)
        self.processes[1].kill()


@pytest.mark.timeout(30)  # well under the default start_timeout of 60 s
def test_a_worker_that_dies_before_connecting_fails_the_start_at_once_naming_it() -> None:
    cluster = _Stillborn(workers=2)
    try:
        with pytest.raises(ann.WorkerError, match="worker 1 killed by SIGKILL before it conn"):
            fit(chain([0, 1, None]), policies.Sync(), cluster=cluster, epochs=1)
        assert not cluster.started and cluster.processes == []
    finally:
        cluster.close()


class _StruckAfterConnecting(ann.cluster.LocalCluster):
    """A local cluster whose worker 1 is stopped or killed once every worker has connected."""

    def __init__(self, how: str, **options: Any) -> None:
        super().__init__(**options)
        self.how = how

    async def _admit_all(self, listener: Any) -> None:
        await super()._admit_all(listener)
        victim = self.processes[1]
        os.kill(victim.pid, signal.SIGSTOP if self.how == "stop" else signal.SIGKILL)
        if self.how == "kill":
            victim.wait()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_worker_struck_after_connecting_fails_the_start_naming_it(how: str) -> None:
    # (the ping after the workers connect had no timeout: a stopped worker hung the start; a
    # killed one surfaced as a bare EOFError)
    cluster = _StruckAfterConnecting(how, workers=2, start_timeout=3.0)
    try:
        with pytest.raises(ann.WorkerError) as info:
            fit(chain([0, 1, None]), policies.Sync(), cluster=cluster, epochs=1)
        assert info.value.worker == 1
        said = str(info.value)
        if how == "stop":
            assert "worker 1 connected but did not answer the driver's ping within 3 s" in said
        else:
            assert "worker 1" in said and "before it could answer the driver's ping" in said
        assert not cluster.started
    finally:
        cluster.close()


class _HeldAtTheDoor(ann.cluster.LocalCluster):
    """Launches its workers but lets none in while ``hold``: a start to cancel midway."""

    hold = True
    launched: list[int] = []
    waited_in_vain = 0  # waits for a worker's exit that ran out (it had been told nothing)

    def _launch(self, host: str, port: int, token: bytes) -> None:
        super()._launch(host, port, token)
        self.launched = list(self.pids)
        for p in self.processes:

            def wait(timeout: float | None = None, _wait: Any = p.wait) -> int:
                try:
                    return int(_wait(timeout=timeout))
                except subprocess.TimeoutExpired:
                    self.waited_in_vain += 1
                    raise

            p.wait = wait  # type: ignore[method-assign]

    async def _admit_all(self, listener: Any) -> None:
        if self.hold:
            await anyio.sleep_forever()
        await super()._admit_all(listener)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_a_start_cancelled_before_workers_connect_ends_at_once(anyio_backend: str) -> None:
    # the workers not yet connected were never told to stop, and were waited on 2 s each
    # before being killed: a cancel took 4 s more with two workers
    opts: dict[str, Any] = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync()}
    cluster = _HeldAtTheDoor(workers=2)
    try:
        with anyio.move_on_after(0.3) as scope:
            async with ann.open_run(chain([0, 1, None]), cluster=cluster, **opts) as run:
                await run.step(data(32))
        assert scope.cancelled_caught
        assert cluster.waited_in_vain == 0  # killed at once, not waited on
        assert len(cluster.launched) == 2 and not any(_alive(p) for p in cluster.launched)
        cluster.hold = False
        async with ann.open_run(chain([0, 1, None]), cluster=cluster, **opts) as run:
            await run.step(data(32))  # the cluster starts again
        assert sorted(run.losses) == [0]
    finally:
        cluster.close()


def test_closing_a_cluster_while_its_run_is_open_is_refused_by_name() -> None:
    # close() inside a run closed the connections under the run's readers: the run then failed
    # with a KeyError, or 10 s later with "worker 1 ... sent nothing (hung, or stopped)"
    cluster = ann.cluster.LocalCluster(workers=2)
    cluster.running = True  # as open_run sets it, for the length of the run
    with pytest.raises(
        RuntimeError, match=r"LocalCluster.close\(\) was called while a run is open"
    ):
        cluster.close()
    cluster.broken()  # a failed run still takes its workers down
    cluster.running = False
    cluster.close()
    cluster.close()  # twice: nothing to do


def test_a_with_block_left_by_an_error_during_a_run_keeps_the_error_and_stops_after_it() -> None:
    # __exit__ called close(), whose refusal (a run open on another thread) replaced the block's
    # own error, and the workers stayed up after the run ended
    opened, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run_on_a_thread(cluster: Any) -> None:
        async def main() -> None:
            opts = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync()}
            async with ann.open_run(chain([0, 1, None]), cluster=cluster, **opts) as run:
                await run.step(data(32))
                opened.set()
                await anyio.to_thread.run_sync(release.wait, 60)

        try:
            anyio.run(main, backend="trio")
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    thread = None
    with pytest.raises(ZeroDivisionError, match="the block's own") as caught:
        with ann.cluster.LocalCluster(workers=2) as cluster:
            thread = threading.Thread(target=run_on_a_thread, args=(cluster,))
            thread.start()
            assert opened.wait(60)
            pids = list(cluster.pids)
            raise ZeroDivisionError("the block's own")
    assert any("stops its workers when the run" in n for n in caught.value.__notes__)
    assert thread is not None and all(_alive(p) for p in pids)  # (the run goes on)
    release.set()
    thread.join(60)
    assert not errors and not cluster.started
    assert not any(_alive(p) for p in pids)


def test_a_module_that_cannot_be_sent_fails_before_the_workers_are_touched(three: Any) -> None:
    # the specs were built after the start: a module holding a lambda tore down a warm
    # cluster's workers (and started a cold one's) before its error came
    fit(chain([0, 1, None]), policies.Sync(), cluster=three, epochs=1)
    pids = three.pids
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Linear(12, 4), x, worker=0)
    h = g.layer("odd", nn.Sequential(_Holding(fn=lambda v: v), nn.Linear(4, 4)), h, worker=1)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    with pytest.raises(TypeError, match=r"layer 'odd'.*_Holding.fn holds a function"):
        fit(g, policies.Sync(), cluster=three, epochs=1)
    assert three.started and three.pids == pids


@dataclasses.dataclass(frozen=True)
class _Holding(nn.Module):
    """An identity holding a field no spec can carry."""

    fn: Any = None

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x


class _KeepsState(ann.LayerActor):
    """Counts its backwards and keeps, with the count, what ``kind`` says: a set (which no
    process boundary carries), a set once it has trained ("late set") or numpy scalars."""

    def setup(self, kind: str = "set") -> None:
        self.kind = kind
        self.seen = 0

    def actor_state(self) -> Any:
        if self.kind == "set" or (self.kind == "late set" and self.seen):
            return {"seen": self.seen, "tags": [1, {"a", "b"}]}
        return {"seen": np.int64(self.seen), "rate": np.float32(0.5), "on": np.bool_(True)}

    def load_actor_state(self, state: Any) -> None:
        self.seen = int(state["seen"])

    async def on_backward(self, key: int, grad: Any, meta: Any) -> Any:
        self.seen += 1
        return await super().on_backward(key, grad, meta)


def _keeping(kind: str) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Sequential(nn.Linear(12, 8), nn.Tanh()), x, worker=0)
    h = g.layer("s1", nn.Linear(8, 4), h, worker=1, actor=_KeepsState, actor_args={"kind": kind})
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


@pytest.mark.timeout(60)
def test_an_actor_state_no_process_boundary_carries_is_refused_before_the_run_trains(
    tmp_path: Any,
) -> None:
    opts: dict[str, Any] = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync()}
    with ann.cluster.LocalCluster(workers=2) as cluster:
        # numpy scalars come back as themselves (they came back as 0-d arrays)
        tr = ann.Trainer(_keeping("scalars"), cluster=cluster, **opts)
        tr.fit(data(64), epochs=1, batch_size=32)
        st = tr.state.actor_states["s1"]
        assert type(st["seen"]) is np.int64 and st["seen"] == 2
        assert type(st["rate"]) is np.float32 and type(st["on"]) is np.bool_
        # a set was refused only by the worker's result: the whole fit trained, then was lost,
        # with "cannot send a set in a parameter tree" naming no layer
        path = str(tmp_path / "refused.trace")
        tr = ann.Trainer(_keeping("set"), cluster=cluster, trace=path, **opts)
        with pytest.raises(ann.ActorError) as info:
            tr.fit(data(64), epochs=1, batch_size=32)
    err = info.value
    assert err.actor == "s1" and err.kind == "actor_state"
    for said in ("layer 's1'", "state['tags'][1]", "a set", "worker 1", "_KeepsState"):
        assert said in str(err), (said, str(err))
    assert tr.state.versions == {"s0": 0, "s1": 0}
    assert ann.trace.summary(path)["actors"]["s1"]["forwards"] == 0  # refused before any


@pytest.mark.timeout(60)
def test_an_actor_state_that_becomes_unsendable_mid_run_is_named_and_its_trace_kept(
    tmp_path: Any,
) -> None:
    # the check before the run passes; the worker's result then failed with a TypeError and the
    # events that worker had recorded were lost from the driver's trace
    path = str(tmp_path / "late.trace")
    opts: dict[str, Any] = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync()}
    with ann.cluster.LocalCluster(workers=2) as cluster:
        tr = ann.Trainer(_keeping("late set"), cluster=cluster, trace=path, **opts)
        with pytest.raises(ann.ActorError) as info:
            tr.fit(data(64), epochs=1, batch_size=32)
    err = info.value
    assert err.actor == "s1" and err.kind == "actor_state"
    for said in ("layer 's1'", "state['tags'][1]", "a set", "_KeepsState"):
        assert said in str(err), (said, str(err))
    assert ann.trace.summary(path)["actors"]["s1"]["forwards"] == 2  # the worker's events


class _Silent(ann.cluster.Cluster):
    """A cluster whose workers never come (nothing is launched)."""

    def _launch(self, host: str, port: int, token: bytes) -> None:
        pass


@pytest.mark.anyio
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
async def test_a_lone_failure_while_workers_connect_is_raised_as_itself(
    anyio_backend: str, error: type[BaseException], monkeypatch: Any
) -> None:
    # Ctrl-C while the driver waited for its workers came out as a BaseExceptionGroup holding
    # the KeyboardInterrupt (so `except KeyboardInterrupt` missed it)
    if error is KeyboardInterrupt and anyio_backend == "asyncio":
        pytest.skip("asyncio re-raises a task's KeyboardInterrupt out of its event loop")

    async def fail(*args: Any) -> None:
        raise error("while the workers connect")

    monkeypatch.setattr("asyncnn._cluster._base.serve_listener", fail)
    cluster = _Silent(workers=2)
    with pytest.raises(error, match="while the workers connect"):
        await cluster.start()
    assert not cluster.started


@pytest.mark.anyio
async def test_a_worker_that_cannot_be_spawned_is_named_and_those_started_are_stopped(
    anyio_backend: str, monkeypatch: Any
) -> None:
    # the processes were kept in a list made in one expression: a failed spawn (or Ctrl-C)
    # lost the workers already started, never stopped or waited for
    real = subprocess.Popen
    started: list[subprocess.Popen[bytes]] = []

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if started:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        started.append(real([argv[0], "-c", "import signal; signal.pause()"], **kw))
        return started[0]

    monkeypatch.setattr(subprocess, "Popen", popen)
    cluster = ann.cluster.LocalCluster(workers=3)
    with pytest.raises(
        ann.WorkerError, match=r"could not start worker 1 of 3 \(\[Errno 11\]"
    ) as info:
        await cluster.start()
    assert info.value.worker == 1
    assert started[0].poll() is not None  # stopped and waited for


def _user_layer_on_worker_1(name: str, module: nn.Module) -> ann.Graph:
    """A layer of the driver on worker 0, then ``name``: ``module`` (a user's, from a module the
    driver imported) and a Linear on worker 1."""
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Linear(12, 4), x, worker=0)
    h = g.layer(name, nn.Sequential(module, nn.Linear(4, 4)), h, worker=1)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def _identity_layer_in(folder: Any, module: str, cls: str) -> None:
    """Writes ``folder/module.py``, defining ``cls``: an identity layer of a user's module that
    only the driver's import path finds."""
    (folder / f"{module}.py").write_text(
        "import dataclasses\nfrom asyncnn import nn\n\n\n@dataclasses.dataclass(frozen=True)\n"
        f"class {cls}(nn.Module):\n    def __call__(self, params, x, *, rng=None):\n"
        "        return x\n"
    )


def _imported(module: str, monkeypatch: Any) -> Any:
    """``module`` imported in the driver, and gone from ``sys.modules`` at the test's end."""
    imported = importlib.import_module(module)
    monkeypatch.setitem(sys.modules, module, imported)
    return imported


def _trains_on_workers_as_in_one_process(g: ann.Graph, cluster: Any) -> None:
    many, _ = fit(g, policies.Sync(), cluster=cluster, epochs=1)
    one, _ = fit(g, policies.Sync(), epochs=1)
    assert_params_equal(one.params, many.params)


def test_a_module_put_on_the_path_after_the_workers_started_imports_there(
    tmp_path: Any, three: Any, monkeypatch: Any
) -> None:
    # the workers had the driver's import path of when they started: a notebook that then
    # appended a folder failed the run with "No module named ..." from the worker
    fit(chain([0, 1, None]), policies.Sync(), cluster=three, epochs=1)
    _identity_layer_in(tmp_path, "late_layers_for_the_cluster", "Late")
    monkeypatch.syspath_prepend(str(tmp_path))
    late = _imported("late_layers_for_the_cluster", monkeypatch)
    _trains_on_workers_as_in_one_process(_user_layer_on_worker_1("late", late.Late()), three)


@pytest.mark.anyio
async def test_a_worker_reports_an_error_with_a_huge_message_within_the_header_limit(
    anyio_backend: str,
) -> None:
    # a 3 MB message went out whole (four times: message, cause, traceback...), the driver
    # refused the frame ("broke the protocol: ... header"), and the actual error was lost
    import msgpack

    from asyncnn._cluster._wire import MAX_HEADER_BYTES
    from asyncnn._cluster._worker import Worker

    sent: list[dict[str, Any]] = []

    class Driver:
        async def send(self, frame: dict[str, Any], buffers: Any = ()) -> None:
            sent.append(frame)

        def sent_progress(self) -> int:
            return len(sent)

    try:
        raise ValueError("x" * 3_000_000 + " the end")
    except ValueError as exc:
        error = ann.ActorError("s1", "forward", 4, f"ValueError: {exc}")
        error.__cause__ = exc
    worker = Worker(1, Driver(), None, 1 << 30, b"")  # type: ignore[arg-type]
    await worker._report_error(error)
    (frame,) = sent
    assert len(msgpack.packb(frame)) < MAX_HEADER_BYTES
    assert frame["actor"] == "s1" and frame["key"] == 4
    for field in ("message", "cause", "traceback"):
        assert "characters cut" in frame[field] and frame[field].endswith(
            ("the end", "the end\n")
        ), field


def test_workers_started_from_a_thread_that_ends_stay_up_for_the_next_fit() -> None:
    # Linux kills a child whose parent *thread* ends (PR_SET_PDEATHSIG): a fit inside a notebook
    # runs on a thread of its own, so its workers were SIGKILLed when it returned, and each
    # later fit restarted the cluster ("worker 0 killed by SIGKILL since the last run")
    with ann.cluster.LocalCluster(workers=2) as cluster:
        tr = ann.Trainer(chain([0, 1, None]), optimizer=optim.SGD(lr=0.1),
                         policy=policies.Sync(), cluster=cluster)  # fmt: skip
        call = threading.Thread(target=tr.fit, args=(data(32),), kwargs={"batch_size": 32})
        call.start()
        call.join()
        pids = cluster.pids
        assert len(pids) == 2
        tr.fit(data(32), batch_size=32)
        assert cluster.pids == pids and all(_alive(p) for p in pids)


def test_relative_entries_of_the_drivers_path_reach_the_workers_as_absolute_ones(
    tmp_path: Any, monkeypatch: Any
) -> None:
    # '' (python -c, the REPL, IPython) was dropped and '.' sent as it was: a worker resolved
    # it in its own working folder, not the driver's
    from asyncnn._cluster._worker import driver_paths

    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", ".", "sub", "missing", str(tmp_path / "sub")])
    here, sub = str(tmp_path), str(tmp_path / "sub")
    assert driver_paths() == [here, sub]  # (each once, in the driver's order)


def test_a_module_found_through_the_drivers_current_folder_imports_on_the_workers(
    tmp_path: Any, three: Any, monkeypatch: Any
) -> None:
    # a notebook that changed folder and imported a module from there through '' failed the
    # run with "No module named ..." from the worker
    fit(chain([0, 1, None]), policies.Sync(), cluster=three, epochs=1)  # (workers warm)
    _identity_layer_in(tmp_path, "here_layers_for_the_cluster", "Here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    here = _imported("here_layers_for_the_cluster", monkeypatch)
    _trains_on_workers_as_in_one_process(_user_layer_on_worker_1("here", here.Here()), three)


@pytest.mark.anyio
async def test_a_host_the_driver_cannot_listen_on_is_named_with_the_cluster(
    anyio_backend: str, monkeypatch: Any
) -> None:
    # a bare "OSError: [Errno 99] Cannot assign requested address" (or a gaierror for a name
    # that does not resolve) came out of the first fit, naming neither host= nor the cluster,
    # and the socket that failed to bind was left open
    import socket

    from asyncnn._cluster import _handshake

    made: list[socket.socket] = []

    class Tracked(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_handshake.socket, "socket", Tracked)
    cluster = ann.cluster.LocalCluster(workers=2, host="192.0.2.1")  # (TEST-NET-1: not ours)
    with pytest.raises(
        OSError, match=r"^LocalCluster\(host='192\.0\.2\.1'\): the driver cannot listen on it"
    ) as caught:
        await cluster.start()
    assert isinstance(caught.value.__cause__, OSError)
    assert made and all(s.fileno() == -1 for s in made)  # closed
    assert not cluster.started and cluster.pids == []


class _CountsByMinibatch(ann.LayerActor):
    """Keeps its backwards counted by minibatch (int keys) beside a total (a str key), in the
    order it met them."""

    def setup(self) -> None:
        self.counts: dict[Any, int] = {"total": 0}

    def actor_state(self) -> Any:
        return dict(self.counts)

    def load_actor_state(self, state: Any) -> None:
        self.counts = dict(state)

    async def on_backward(self, key: int, grad: Any, meta: Any) -> Any:
        mb = int(meta["minibatch"])
        self.counts[mb] = self.counts.get(mb, 0) + 1
        self.counts["total"] += 1
        return await super().on_backward(key, grad, meta)


@pytest.mark.timeout(60)
def test_an_actor_state_of_mixed_keys_crosses_to_the_workers_in_its_order() -> None:
    # (a worker sorted a state's keys as it put it on its devices: int and str keys failed the
    # second fit on "'<' not supported between instances of 'int' and 'str'", and str keys came
    # back sorted, where one process keeps the actor's order)
    def state_after_two_fits(cluster: Any) -> Any:
        g = ann.Graph()
        x = g.input("x", shape=(None, 12))
        y = g.input("y", shape=(None,), dtype="int64")
        h = g.layer("s0", nn.Sequential(nn.Linear(12, 8), nn.Tanh()), x, worker=0)
        h = g.layer("s1", nn.Linear(8, 4), h, worker=1, actor=_CountsByMinibatch)
        g.loss("loss", nn.CrossEntropyLoss(), h, y)
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                         cluster=cluster)  # fmt: skip
        tr.fit(data(64), epochs=1, batch_size=32)
        tr.fit(data(64), epochs=1, batch_size=32)
        return tr.state.actor_states["s1"]

    one = state_after_two_fits(None)
    with ann.cluster.LocalCluster(workers=2) as cluster:
        many = state_after_two_fits(cluster)
    assert one == {"total": 8, 0: 2, 1: 2, 2: 2, 3: 2}
    assert many == one and list(many) == list(one)


# -- a worker's end of a run: markers that never come, a link that takes nothing ---------------


class _Link:
    """One of a worker's links as its part of a run uses it: it receives ``frames`` in turn and
    then nothing, ever; a send of a frame whose type is in ``stuck`` (``"buffers"``: any frame
    with buffers) never completes, nothing of it going out (the other end reads nothing)."""

    max_message_bytes = 1 << 30

    def __init__(self, peer: str, frames: tuple[dict[str, Any], ...] = (), stuck: Any = ()) -> None:
        self.peer, self.frames, self.stuck = peer, list(frames), set(stuck)
        self.sent: list[dict[str, Any]] = []
        self.unread: deque[Any] = deque()  # (what a LinkReader read ahead of it)

    def received_progress(self, peek: bool = True) -> int:
        return 0

    def sent_progress(self) -> int:
        return 0

    async def receive(self) -> tuple[dict[str, Any], list[Any]]:
        if self.frames:
            return self.frames.pop(0), []
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, header: dict[str, Any], buffers: Any = ()) -> None:
        if header.get("t") in self.stuck or (buffers and "buffers" in self.stuck):
            await anyio.sleep_forever()
        self.sent.append(header)


def _worker_part(driver: _Link, peers: dict[int, _Link]) -> tuple[Any, Any]:
    """Worker 0's part in a run (a ``_WorkerShare``) over ``driver`` and ``peers``, with a
    heartbeat timeout of 1 s, and a run of no actors for it."""
    from unittest import mock

    from asyncnn._cluster._handshake import Refusals
    from asyncnn._cluster._worker_run import Reports, WorkerRun, _WorkerShare

    worker = types.SimpleNamespace(
        index=0, driver=driver, peers=peers, rejected=Refusals(), heartbeat_timeout=1.0
    )
    run = mock.Mock(spec=WorkerRun)
    run.local, run.last_event, run.reports = {}, 0.0, Reports()
    return _WorkerShare(worker, [], []), run  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_a_peer_whose_end_of_run_marker_never_comes_fails_the_run_naming_it(
    anyio_backend: str,
) -> None:
    # the run had drained (the driver's watchdog no longer looks), this worker's actors had
    # stopped, and it waited for worker 1's end-of-run marker for ever, beating its heartbeat
    # all along: the driver waited for its result, and the fit hung
    share, run = _worker_part(_Link("the driver", ({"t": "eor"},)), {1: _Link("worker 1")})
    with anyio.fail_after(8), pytest.raises(BaseExceptionGroup) as info:
        async with anyio.create_task_group() as tg:
            share.start(tg, run)
            await share.settle(run)
    (err,) = [e for e in _leaves(info.value) if not isinstance(e, anyio.get_cancelled_exc_class())]
    said = str(err)
    assert "worker 0" in said and "worker 1" in said and "end-of-run marker" in said
    assert "the driver" not in said.split("marker")[0]  # its marker came


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_a_heartbeat_stuck_on_a_link_that_takes_nothing_lets_a_failed_run_end(
    anyio_backend: str,
) -> None:
    # the heartbeat's send is shielded (a frame cut in half would garble the stream), and had no
    # bound: stuck on a full link to the driver, it kept a failed run's tasks from ending, and
    # the worker's error report waited behind it for ever
    share, run = _worker_part(_Link("the driver", stuck={"hb"}), {})
    with anyio.fail_after(8):
        async with anyio.create_task_group() as tg:
            share.start(tg, run)
            await anyio.sleep(0.2)  # the first heartbeat is stuck now
            tg.cancel_scope.cancel()  # the run failed


@pytest.mark.anyio
async def test_an_error_report_whose_trace_cannot_go_still_names_the_cause(
    anyio_backend: str,
) -> None:
    # the report went as one frame, the worker's events with it, under a fixed 5 s bound: a
    # large trace over a slow link (or a driver slow to read) was cut, the error dropped with
    # it, and the run said "worker 1 died"
    from asyncnn._cluster._worker import Worker

    driver = _Link("the driver", stuck={"buffers"})
    worker = Worker(1, driver, None, 1 << 30, b"")  # type: ignore[arg-type]
    worker.heartbeat_timeout = 1.0
    worker.failed_trace = b"events" * 1000
    cause = ZeroDivisionError("division by zero")
    error = ann.ActorError("fails", "forward", 3, f"ZeroDivisionError: {cause}")
    error.__cause__ = cause
    with anyio.fail_after(4):
        await worker._report_error(error)
    (frame,) = driver.sent
    assert frame["t"] == "error" and frame["type"] == "ActorError"
    assert (frame["actor"], frame["kind"], frame["key"]) == ("fails", "forward", 3)
    assert frame["cause"] == "ZeroDivisionError: division by zero"


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]
