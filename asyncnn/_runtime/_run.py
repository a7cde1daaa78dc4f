"""A run: the actors of a graph and the scheduler that feeds them keys (``_open_run.py`` holds
the async face :func:`open_run`, which makes one; ``_run_guards.py`` the checks, the turn among
steps and the watchdog that guard the scheduler; ``_run_actors.py`` the making of the local
actors and what they report back)."""

from __future__ import annotations

import collections
import copy
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any

import anyio
import numpy as np

from asyncnn._errors import ActorError
from asyncnn._math._data import _plain_ndarray
from asyncnn._math._pytree import tree_map
from asyncnn.backends import (
    DevicePool,
    array_namespace,
    get_backend,
    is_cupy_array,
    to_numpy,
)

from ._checks import checked_orders, range_checks
from ._checks import validate as validate  # the trainer imports it from here
from ._config import RunConfig
from ._context import ActorContext
from ._graph import Graph
from ._lifecycle import close_channels, pool_spec
from ._loss_weights import label_weights, labels_weighed
from ._messages import END, FORWARD, Message
from ._policies import OneFOneBOrder, Policy
from ._recorder import Recorder
from ._run_actors import RunActors, _Pending
from ._run_guards import RunGuards, checked_max_in_flight, checked_split
from ._setup import _hook_failed
from ._stall import BlockedLoopMonitor
from ._state import RunState
from ._state import init_state as init_state  # a cluster driver and tests import it here
from ._statistics import ActorStatistics

__all__ = ["Run", "RunState"]


class Run(RunGuards, RunActors):
    """The actors of one graph, running. Obtain one with :func:`open_run`."""

    def __init__(
        self,
        graph: Graph,
        optimizer: Any,
        policy: Policy,
        state: RunState,
        pool: DevicePool,
        config: RunConfig,
        *,
        on_loss: Any = None,
        recorder: Recorder | None = None,
        max_in_flight: int | None = None,
        hosted: Collection[str] | None = None,
        remote: Mapping[str, Any] | None = None,
    ) -> None:
        self.graph = graph
        #: the run's options (seed, dtype, stall timeout, checks, trace, CUDA graphs)
        self.config = config
        #: CUDA graphs asked for (``open_run(cuda_graphs=...)``: True, or None for "where the
        #: run's GPU actors share one GPU"); they are used where :attr:`cuda_graphs_active` says
        self.cuda_graphs = config.cuda_graphs
        self.optimizer = optimizer
        self.policy = policy
        self.seed = config.seed
        self.dtype = np.dtype(config.dtype)
        self.pool = pool
        self.inline_flops = pool.inline_flops
        self.stall_timeout = config.stall_timeout
        self.checks_finite = config.check_finite  # actors check their outputs for NaN/Inf
        self._on_loss = on_loss
        self.recorder = recorder
        if recorder is not None and recorder.header_pending:
            # how the pool cuts products, so that a replay elsewhere cuts them the same way
            recorder.complete_header(pool=pool_spec(pool))
        self.layers = graph.layers
        self.num_stages = len(self.layers)
        self.edge_index: dict[tuple[str, str, int], int] = {}
        for name, node in graph.nodes.items():
            for e, (c, slot) in enumerate(node.consumers):
                self.edge_index[(name, c, slot)] = e
        self.max_in_flight = max_in_flight or checked_max_in_flight(policy, self.num_stages)
        asked = config.cuda_graphs
        if asked is None:
            # on by default where the GPU actors share one GPU; capture across several GPUs in
            # one process has not run on such a machine yet, so there it is asked for (True)
            gpus = {node.device for node in graph.nodes.values() if node.device != "cpu"}
            asked = len(gpus) == 1
        # the actors' permission: a GPU actor then captures (a CPU actor never does)
        allowed = bool(asked) and policy.allows_capture(self.num_stages, recorder is not None)
        #: whether an actor of this process captures and replays CUDA graphs in this run (see
        #: _capture): its updates then write the weights in place (set once the actors exist)
        self.cuda_graphs_active = False
        self.minibatches = state.minibatches
        #: the last minibatch whose flush the trace holds (those of an earlier run included):
        #: a drain, then the next step, must not record the same flush twice
        self._flushed_through = state.minibatches - 1
        self.next_key = state.keys
        self.stream_start = state.keys
        channels: dict[str, Any] = {}  # every node's inbox, once every actor exists
        #: what the actors see of this run
        self.context = ActorContext(
            graph=graph,
            policy=policy,
            optimizer=optimizer,
            seed=config.seed,
            dtype=self.dtype,
            pool=pool,
            recorder=recorder,
            checks_finite=config.check_finite,
            max_in_flight=self.max_in_flight,
            first_key=self.next_key,
            cuda_graphs=allowed,
            edge_index=self.edge_index,
            channels=channels,
            orders=checked_orders(policy, self.layers, policy.orders(self.layers)),
            touch=self.touch,
            backward_done=self.backward_done,
            loss_reported=self.loss_reported,
            check_finite=self.check_finite,
        )
        # every node's actor: the local ones, and stand-ins for those other processes host
        # (with a cluster; their send_channel writes to the wire)
        self.local: dict[str, Any] = {}
        try:
            self._start_actors(graph, state, hosted)
        except BaseException:
            close_channels(self)  # the actors made so far: their inboxes must not leak
            raise
        # (on the CPU the flag does nothing: with no actor capturing, the run is the eager one,
        # and fit keeps its state at every step)
        self.cuda_graphs_active = any(
            getattr(actor, "graphs", None) is not None for actor in self.local.values()
        )
        self.actors: dict[str, Any] = {
            n: self.local[n] if n in self.local else (remote or {})[n]
            for n in [*self.layers, *graph.losses]
        }
        channels.update((n, a.send_channel) for n, a in self.actors.items())
        for proxy in (remote or {}).values():
            proxy.run = self  # a stand-in sends through this run (its pool, its NCCL links)
        self.in_flight = 0
        self.losses: dict[int, float] = {}
        self._pending: dict[int, _Pending] = {}
        self._done_count: dict[int, int] = {}
        # set when a key retires or a minibatch's loss is known; made only while someone waits
        self._changed: anyio.Event | None = None
        # the graph's inputs and loss count, read on every step (a run's graph does not change)
        self._inputs = graph.inputs
        self._inputs_floating = [
            (name, np.dtype(graph.nodes[name].dtype).kind == "f") for name in self._inputs
        ]
        self._input_consumers = [(name, graph.nodes[name].consumers) for name in self._inputs]
        self._num_losses = len(graph.losses)
        #: (loss, its labels' input, the module) of each loss whose mean divides by its labels'
        #: weight, not its rows (a cross-entropy loss: ignored labels, class weights)
        self._weighed_losses = labels_weighed(graph)
        self._flushes = policy.waits_between_minibatches()  # a policy is frozen
        self._splits: dict[int, list[tuple[int, int]]] = {}  # policy.split by row count
        self._last_batch: tuple[Any, int] = (None, 0)  # the last batch checked, and its rows
        self._range_checks = range_checks(graph, graph.shapes)  # ids and labels, per step
        # steps from several tasks go in one at a time, in the order they came: a step going
        # in, and the turns of those waiting (a flag, not a lock: an uncontended step, the
        # common case, must not pay a scheduler round trip)
        self._stepping = False
        self._step_turns: collections.deque[anyio.Event] = collections.deque()
        #: why this run cannot go on (a step cut off after some of its keys went in), or None
        self._broken: str | None = None
        #: the ``open_run`` block was left: the actors have stopped
        self._ended = False
        #: the block's body has ended: its final drain runs, then the actors stop
        self._closing = False
        # when each local actor stopped serving (its idle time ends there)
        self._stopped_at: dict[str, float] = {}
        # the thread of the loop the actors run on: a step from another thread (or another
        # loop) would run actor work there, on channels bound to this loop
        self._loop_thread = threading.get_ident()
        # stages whose order keeps the last keys of a stream (its warm-up) until the stream
        # ends or more keys come: wait_idle cannot finish there (PipeDream, PipeDream2BW)
        self._holds_stream_tail = [
            name
            for name, order in self.context.orders.items()
            if isinstance(order, OneFOneBOrder) and not order.flush and (order.warmup or 0) > 0
        ]
        self.last_event = time.perf_counter()
        self._monitor: BlockedLoopMonitor | None = None  # watches the loop (_watch_loop)
        self.started = time.perf_counter()
        self.samples = 0

    # -- the scheduler ---------------------------------------------------------------------------
    async def _wait_until(self, condition: Any) -> None:
        while not condition():
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    async def wait_idle(self, losses: bool = False) -> None:
        """Waits until no admitted key is in flight (every stage has done its backward of
        every key, so a flush policy's updates are applied); with ``losses``, also until the
        loss of every admitted minibatch is known. Unlike :meth:`drain` it does not end a
        continuous policy's stream.

        Raises:
            RuntimeError: keys went in since the stream last ended under a continuous 1F1B
                policy (``PipeDream``, ``PipeDream2BW``), whose stages keep the stream's last
                keys until it ends (call :meth:`drain`); a step was cut off (see
                :meth:`step`); or the call came from another thread than the run's loop.
        """
        self._check_usable("wait_idle")
        if self._holds_stream_tail and not self._flushes and self.next_key > self.stream_start:
            raise RuntimeError(
                f"run.wait_idle() cannot finish under {self.policy.name}: its stages "
                f"{self._holds_stream_tail} keep the last keys of the stream (their 1F1B "
                "warm-up) until the stream ends, so those keys stay in flight until more keys "
                "come. Call run.drain() to end the stream and wait for every key (the next "
                "step starts a new stream)"
            )
        if losses:
            if self.in_flight or self._pending:
                await self._wait_until(lambda: self.in_flight == 0 and not self._pending)
        elif self.in_flight:
            await self._wait_until(lambda: self.in_flight == 0)

    async def wait_for_devices(self) -> None:
        """Waits until the device work this process's actors have queued is done (on a GPU a
        key counts as done, for :meth:`wait_idle` and :meth:`drain`, once its work is queued
        on the actors' streams); at once on the CPU."""
        for actor in self.local.values():
            await actor.wait_for_device()

    async def step(self, batch: Mapping[str, Any], *, check_data: bool | None = None) -> int:
        """Admits one minibatch: splits it into the policy's microbatches and sends each in as a
        key once the policy allows. Returns the minibatch's index; its loss arrives in
        :attr:`losses` when its keys have run.

        Before any key goes in, the batch is checked against the graph's inputs (names, shapes,
        dtypes; NaN and Inf with ``check_finite``), and the integer ids a layer starting with an
        Embedding reads and the labels of a cross-entropy loss against their range, as
        ``Trainer.fit`` checks its data: one min and max of each such input. GPU arrays are
        checked only with ``check_data=True``: it reads the two back, which waits for the
        work queued on the current stream at every step; without it a GPU id or label out of
        range gives a NaN row, which ``check_finite=True`` names.

        Steps called from several tasks at once go in one after another, in the order they
        were called. A step cancelled before any of its keys went in, or refused by these
        checks, leaves no trace. One cut off once a key's first message went in (on the CPU a
        step may run much of its keys' work itself, in the actors it hands them to) leaves a
        minibatch the run cannot finish: every later ``step``, :meth:`drain`, and leaving the
        block, raise a ``RuntimeError`` that says so.

        Args:
            batch: ``{input name: array}``, one row per example, numpy or cupy arrays.
            check_data: ids and labels are checked against their range in host arrays
                (``None``), in GPU arrays too (``True``), or not at all (``False``, for data
                checked already: ``Trainer.fit`` checks all of its data before the run).

        Raises:
            ValueError: a missing or unknown input, a wrong shape or dtype, no rows; an id or a
                label out of range (naming the input, the value, its row and the node).
            TypeError: a batch that is not a dict of input name to array, or an input that is
                not an array (a list, say), whose dtype numpy does not know (a torch tensor),
                or that is a masked array (another numpy subclass, ``np.matrix``, is taken as
                the plain array of its data, as ``Trainer.fit`` takes it).
            RuntimeError: the ``open_run`` block was left, an earlier step was cut off, or the
                call came from another thread than the run's loop (use
                ``trio.from_thread.run`` or ``anyio.from_thread.run`` there).
        """
        self._check_usable("step")
        rows = self._checked_rows(batch, check_data)
        parts = self._splits.get(rows)
        if parts is None:
            parts = self._splits[rows] = checked_split(self.policy, rows)
        await self._take_turn()
        try:
            self._check_usable("step")  # a step before this one may have been cut off
            mb = await self._admit_minibatch(batch, rows, parts)
        finally:
            self._pass_turn()
        self.samples += rows
        return mb

    async def _admit_minibatch(
        self, batch: Mapping[str, Any], rows: int, parts: list[tuple[int, int]]
    ) -> int:
        if self._flushes and self.in_flight:
            await self._wait_until(lambda: self.in_flight == 0)
        arrays = {}
        for name, floating in self._inputs_floating:
            # A copy: step returns before its keys are computed, and the caller may refill its
            # buffer for the next batch meanwhile.
            # Data may live on a GPU already (a cupy array): it then stays there.
            src = batch[name]
            if type(src) is not np.ndarray and isinstance(src, np.ndarray):
                # a subclass keeps its class through the cast and the copy below (np.matrix
                # multiplies as matrices in the actors): its plain view, as fit takes it; a
                # masked array refused (its masked entries would be trained on), as fit does
                src = _plain_ndarray(name, src, "input")
            if floating and getattr(src, "dtype", self.dtype) != self.dtype:
                arrays[name] = src.astype(self.dtype)  # a cast copies already
                continue
            arr = (
                src.copy()
                if type(src) is np.ndarray
                else array_namespace(src).array(src, copy=True)
            )
            arrays[name] = arr.astype(self.dtype, copy=False) if floating else arr
        # nothing above changed the run: a cancellation there leaves it as it was
        m = len(parts)
        mb = self.minibatches
        self.minibatches += 1
        if self._flushes and self.recorder is not None and mb - 1 > self._flushed_through:
            self._record_flush(mb - 1)
        # every loss node reports every key; the minibatch's loss is the sum over loss nodes
        self._pending[mb] = _Pending(keys=m * self._num_losses)
        first_key = self.next_key
        weights = label_weights(self._weighed_losses, arrays, parts) if m > 1 else None
        try:
            for i, (lo, hi) in enumerate(parts):
                meta: dict[str, Any] = {
                    "rows": hi - lo,
                    "mb_rows": rows,
                    "mb_keys": m,
                    "minibatch": mb,
                }
                if weights:
                    meta["weights"] = {loss: w[i] for loss, w in weights.items()}
                if lo == 0 and hi == rows:  # the whole minibatch: the copies themselves
                    await self.admit(arrays, meta)
                else:
                    await self.admit({name: arrays[name][lo:hi] for name in self._inputs}, meta)
        except BaseException as exc:
            if self.next_key == first_key:  # none of its keys went in: as if never called
                del self._pending[mb]
                self.minibatches -= 1
            else:
                # its keys in flight wait for the rest of the minibatch (a flush, its loss),
                # which will never come: waiting for them would hang
                self._cut_off(
                    f"the step of minibatch {mb} was cut off ({type(exc).__name__}) after "
                    f"{self.next_key - first_key} of its {m} keys went in (keys {first_key}..)"
                )
            raise
        return mb

    async def admit(self, parts: Mapping[str, Any], meta: dict[str, Any]) -> int:
        """Sends one key in (once the policy allows): ``parts`` maps each graph input to its rows
        of the key, ``meta`` says where the key stands (see :class:`Message`): its ``rows``, and
        its minibatch's ``minibatch`` index, ``mb_keys`` and ``mb_rows``. A minibatch not begun
        by :meth:`step` (a replay admits recorded keys one by one) is registered here, so its
        loss is assembled from its keys all the same. Returns the key."""
        if self.in_flight >= self.max_in_flight:
            await self._wait_until(lambda: self.in_flight < self.max_in_flight)
        rec = self.recorder
        if rec is not None and rec.backlogged():
            # the trace's writer is behind the disk: the key waits to go in (the actors, and
            # the keys in flight, never wait on the disk), so the run goes at the disk's pace
            await rec.wait_for_room()
        mb = int(meta.get("minibatch", -1))
        if mb >= 0 and mb not in self._pending and mb not in self.losses:
            self._pending[mb] = _Pending(keys=int(meta["mb_keys"]) * self._num_losses)
            self.minibatches = max(self.minibatches, mb + 1)
        key = self.next_key
        self.next_key += 1
        self.in_flight += 1
        self._done_count[key] = 0
        if rec is not None:
            rec.event("scheduler", "admit", key=key, meta=meta)
        ready = _ready_events(parts.values())
        # A key goes in whole or the run cannot finish it. Its sends are not shielded from
        # cancellation (a shield would cost every key a cancel scope; a send may also run the
        # receiver's work in this task, a hand-over, or wait on another process's socket, and a
        # stall must still cut it off): a key cut off once its first message went in is said
        # by every later call instead of a wait that would never end.
        sent = False
        try:
            for name, consumers in self._input_consumers:
                part = parts[name]
                for i_c, (consumer, slot) in enumerate(consumers):
                    if rec is not None:  # the data is recorded once, with its first send
                        keep = i_c == 0 and rec.payloads != "none"
                        rec.event(name, "send", FORWARD, key, 0, consumer, -1, (part,), keep,
                                  {"slot": slot})  # fmt: skip
                    msg = Message(FORWARD, key, 0, name, consumer, slot, (part,), meta)
                    if ready and is_cupy_array(part):
                        msg.event = ready[part.device.id]
                    sent = True
                    await self.actors[consumer].send_channel.send(msg)
        except BaseException as exc:
            if sent:
                self._cut_off(
                    f"key {key} (minibatch {mb}) was cut off ({type(exc).__name__}) while its "
                    "messages went in"
                )
            raise
        self.touch()
        return key

    async def drain(self) -> None:
        """Waits until every admitted key has finished its backward wave and reported its loss
        (and, under a continuous policy, the pipeline has cooled down).

        A drain takes its turn among the steps: it waits for the steps called before it to go
        in (the stream's end must count all their keys), and steps called while it waits go in
        after it.

        Raises:
            RuntimeError: a step was cut off after some of its keys went in (see :meth:`step`),
                or the call came from another thread than the run's loop.
        """
        self._check_usable("drain")
        await self._take_turn()
        try:
            self._check_usable("drain")  # a step before this one may have been cut off
            flushes = self._flushes
            if not flushes and self.next_key > self.stream_start:
                for name in self.layers:
                    meta = {"total": self.next_key - self.stream_start}
                    await self.actors[name].send_channel.send(
                        Message(END, -1, 0, "", name, 0, (), meta)
                    )
                self.stream_start = self.next_key
            # a loss actor on a GPU reads its value after sending the gradients back: wait for
            # the losses too (holding the turn: a later step's keys, under a continuous policy,
            # would wait for a stream end this drain does not send)
            await self._wait_until(lambda: self.in_flight == 0 and not self._pending)
            if (
                flushes
                and self.recorder is not None
                and self.minibatches - 1 > self._flushed_through
            ):
                self._record_flush(self.minibatches - 1)
        finally:
            self._pass_turn()

    def _record_flush(self, minibatch: int) -> None:
        """Records that every key of ``minibatch`` finished before the run went on (once)."""
        if self.recorder is not None:
            self.recorder.event("scheduler", "flush", meta={"minibatch": minibatch})
        self._flushed_through = minibatch

    # -- reading ---------------------------------------------------------------------------------
    def state(self) -> RunState:
        """The current weights, optimizer states and versions (device arrays, not copies), and
        the earlier versions a policy that pins forwards to them keeps
        (:attr:`RunState.earlier_params`: a run started from this state goes on pinning them),
        and the gradients summed and not applied yet with their delays
        (:attr:`RunState.pending_grads`, :attr:`RunState.pending_delays`).

        With CUDA graphs active (:attr:`cuda_graphs_active`) the weights are the captures' own
        buffers, which later updates write in place on the actors' streams, and a key counts
        as done (:meth:`drain`) once its work is queued there: copy them after
        :meth:`wait_for_devices`, with no key admitted since, or after leaving ``open_run``'s
        block (as ``fit`` does for its snapshots).

        Raises:
            ActorError: a custom actor's ``actor_state`` raised: naming its layer, with kind
                ``"actor_state"``, key None and that exception as ``__cause__`` (the run
                itself goes on: only this read failed).
        """
        return self._read_state()

    def _read_state(self, unread: dict[str, ActorError] | None = None) -> RunState:
        """:meth:`state`; with ``unread``, a layer whose ``actor_state`` raises is left out of
        :attr:`RunState.actor_states`, its error put in ``unread`` by layer, instead of raised
        (what a stopped fit keeps: the first error must not be hidden by a second)."""
        params: dict[str, Any] = {}
        opt_states: dict[str, Any] = {}
        versions: dict[str, int] = {}
        pending: dict[str, tuple[Any, int]] = {}
        actor_states: dict[str, Any] = {}
        earlier_params: dict[str, dict[int, Any]] = {}
        pending_delays: dict[str, list[int]] = {}
        local = self.local
        for n in self.layers:  # one pass: a fit takes this snapshot at every step
            a = local.get(n)
            if a is None:
                continue
            params[n], opt_states[n], versions[n] = a.params, a.opt_state, a.version
            if a.acc_count:
                pending[n] = (a.acc, a.acc_count)
                # (a copy: the actor goes on noting; at most the count's latest, as an update
                # cancelled before it published keeps its delays noted and its gradients gone)
                delays = a.pending_delays[-a.acc_count :]
                if delays:
                    pending_delays[n] = delays
            try:
                st = a.actor_state()
            except Exception as exc:  # the user's hook: its actor's error, named as set-up's are
                error = _hook_failed(n, type(a), "actor_state", exc)
                if unread is None:
                    raise error from exc
                error.__cause__ = exc
                unread[n] = error
                st = None
            if st is not None:
                actor_states[n] = st
            if a.versions_back:
                earlier = a.earlier_weights()
                if earlier:
                    earlier_params[n] = earlier
        return RunState(
            params=params,
            opt_states=opt_states,
            versions=versions,
            minibatches=self.minibatches,
            keys=self.next_key,
            pending_grads=pending,
            actor_states=actor_states,
            earlier_params=earlier_params,
            pending_delays=pending_delays,
        )

    @property
    def params(self) -> dict[str, Any]:
        """``{node name: params}`` as numpy arrays (copies from the device where needed, once
        the work the GPU actors have queued is done)."""
        local = self.local
        # Under CUDA graphs the weights are the captures' buffers, which updates write in place
        # on the actors' streams, and a copy to the host is not ordered after them (the likely
        # cause of a captured run's replay ending with other first-stage weights on an H100,
        # 2026-12-05). Blocking, as a property must be; at once on the CPU.
        for backend in {id(a.backend): a.backend for a in local.values() if not a.on_cpu}.values():
            backend.synchronize()
        return {n: tree_map(to_numpy, a.params) for n, a in local.items() if n in self.layers}

    def statistics(self) -> dict[str, ActorStatistics]:
        """Per-actor counters: busy/idle time, messages, stored activations and versions.

        Each is a snapshot, taken now: later work does not change it. An actor's idle time
        counts up to when it stopped (the end of the run), not to the time of reading."""
        now = time.perf_counter()
        stopped = self._stopped_at
        out = {}
        for name, actor in self.local.items():
            snap = copy.deepcopy(actor.stats)
            end = stopped.get(name, now)
            snap.idle_seconds = max(0.0, (end - actor.born) - snap.busy_seconds)
            out[name] = snap
        return out


def _ready_events(parts: Collection[Any]) -> dict[int, Any]:
    """``{GPU index: event}`` recorded after the host thread's queued work on each GPU that
    holds a part: ``step``'s copies run on that thread's current stream, which the actors'
    streams do not follow, so each message of a GPU part carries the event to wait on."""
    events: dict[int, Any] = {}
    for part in parts:
        if type(part) is not np.ndarray and is_cupy_array(part) and part.device.id not in events:
            events[part.device.id] = get_backend(f"cuda:{part.device.id}").record_event()
    return events
