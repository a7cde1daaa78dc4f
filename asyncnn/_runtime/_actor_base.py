"""What every actor shares: an inbox, a mailbox of partial messages, sends, computing on the
device pool, and the one-line description a stall report shows. Layer, loss, routing and loop
actors build on :class:`_Actor`."""

from __future__ import annotations

import contextvars
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from asyncnn._errors import ActorError
from asyncnn._math._pytree import tree_leaves
from asyncnn.backends import get_backend, parse_device

from ._messages import BACKWARD, FORWARD, Message
from ._recorder import when_done
from ._statistics import ActorStatistics

if TYPE_CHECKING:
    from ._context import ActorContext
    from ._node import Node

__all__ = ["MAX_DIRECT_DEPTH", "Inbox", "_Actor"]

#: how many actors may run nested in one sender's task (each taking a message directly and
#: sending on to the next): past it, messages queue as usual (bounds the Python stack)
MAX_DIRECT_DEPTH = 16
#: a sender yields to the event loop once this many messages were handed over directly
DIRECT_YIELD_EVERY = 16


# How deep actors run nested in this task's sender now, and how many hand-overs it made so far:
# per task (each task runs in its own copy of the context), as a hand-over may wait inside (a
# send to another process) while other tasks of the thread hand over on their own
_direct_depth: contextvars.ContextVar[int] = contextvars.ContextVar("asyncnn_depth", default=0)
_direct_runs: contextvars.ContextVar[int] = contextvars.ContextVar("asyncnn_runs", default=0)


def direct_depth() -> int:
    """How many handed-over operations run nested in the current task now."""
    return _direct_depth.get()


async def _hand_over(owner: _Actor, msg: Message) -> bool:
    """Whether ``owner`` (idle, its inbox empty) took and processed ``msg`` in this task."""
    depth = _direct_depth.get()
    if depth >= MAX_DIRECT_DEPTH:
        return False
    runs = _direct_runs.get() + 1
    if depth == 0 and runs >= DIRECT_YIELD_EVERY:
        # work handed over never yields by itself: let the other tasks (and the stall
        # watchdog) run now and then; only from the outermost sender (the actors nested in it
        # must not wait), at its first hand-over once the count is due
        _direct_runs.set(0)
        await anyio.lowlevel.checkpoint()
        if owner.inbox._items:  # queued meanwhile: ``msg`` must not pass it
            return False
    else:
        _direct_runs.set(runs)
    token = _direct_depth.set(depth + 1)
    try:
        return await owner.run_directly(msg)
    finally:
        _direct_depth.reset(token)


def _nbytes(xs: Any) -> int:
    if type(xs) is list:  # a plain loop: called for every stored key (no generator's frame)
        n = 0
        for x in xs:
            n += int(getattr(x, "nbytes", 0))
        return n
    nbytes = getattr(xs, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    return sum(int(getattr(x, "nbytes", 0)) for x in tree_leaves(xs))


class Inbox:
    """An actor's inbox: a bounded first-in first-out queue of messages, both ends in one object
    (the run sends with :meth:`send` / :meth:`send_nowait`, the actor takes with
    :meth:`receive_nowait` / :meth:`receive`).

    It does what anyio's memory object streams do for one receiver, at a fraction of their cost
    on the path every message takes: a message for a waiting actor sets one event; a receive
    that must wait parks on that event at once, with no checkpoint before it (a receive that
    finds a message queued is still a checkpoint, as anyio's is); a send with room does not
    yield.
    """

    __slots__ = ("capacity", "owner", "_items", "_receiver", "_space", "_closed")

    def __init__(self, capacity: int, owner: _Actor | None = None) -> None:
        self.capacity = capacity
        #: the actor this inbox belongs to: it may run a message directly (see
        #: :meth:`_Actor.run_directly`) when nothing is queued before it
        self.owner = owner
        self._items: deque[Message] = deque()
        self._receiver: anyio.Event | None = None  # set when a message arrives, or on close
        self._space: anyio.Event | None = None  # set when a full inbox gets room, or on close
        self._closed = False

    def send_nowait(self, msg: Message) -> None:
        """Queues ``msg``.

        Raises:
            anyio.ClosedResourceError: the inbox is closed.
            anyio.WouldBlock: the inbox is full.
        """
        if self._closed:
            raise anyio.ClosedResourceError
        items = self._items
        if len(items) >= self.capacity:
            raise anyio.WouldBlock
        items.append(msg)
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            receiver.set()

    def direct_owner(self) -> _Actor | None:
        """The owner, where it may run a message sent now in the sender's task (see
        :meth:`_Actor.run_directly`): it takes messages directly and nothing is queued before."""
        owner = self.owner
        if owner is not None and owner.direct and not self._items and not self._closed:
            return owner
        return None

    async def send(self, msg: Message) -> None:
        """Queues ``msg``, waiting only while the inbox is full.

        A send with room is not a checkpoint: the run admits a minibatch's keys (data and
        labels) in one go, and the actors start on them when it next waits (for the policy's
        admission or a flush), with no scheduler round trip per message.
        """
        owner = self.direct_owner()
        if owner is not None and await _hand_over(owner, msg):
            return
        while True:
            try:
                self.send_nowait(msg)
                return
            except anyio.WouldBlock:
                if self._space is None:  # full: wait for room (a checkpoint)
                    self._space = anyio.Event()
                await self._space.wait()

    def receive_nowait(self) -> Message:
        """The oldest queued message.

        Raises:
            anyio.WouldBlock: none is queued.
            anyio.EndOfStream: none is queued and the inbox is closed.
        """
        items = self._items
        if items:
            msg = items.popleft()
            space = self._space
            if space is not None:
                self._space = None
                space.set()
            return msg
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> Message:
        """The oldest message, waiting for one if none is queued."""
        if self._items:
            await anyio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                event = self._receiver = anyio.Event()
                await event.wait()

    def close(self) -> None:
        """Closes the inbox: later sends fail; a waiting receive ends once the queue is empty."""
        self._closed = True
        for event in (self._receiver, self._space):
            if event is not None:
                event.set()
        self._receiver = self._space = None


class _Actor:
    """What layer and loss actors share: an inbox, a mailbox of partial messages, bookkeeping."""

    def __init__(self, ctx: ActorContext, node: Node) -> None:
        self.ctx = ctx
        self.node = node
        self.name = node.name
        self.device = parse_device(getattr(node, "device", "cpu"))
        self.on_cpu = self.device.kind == "cpu"
        self.backend = get_backend(self.device)
        # Bounded: at most max_in_flight keys are admitted, each bringing one message per input
        # slot and one per consumer edge, plus control messages; twice that leaves room to spare,
        # so the bound is never what stops a sender (it would be a bug, met with back-pressure).
        in_flight = ctx.max_in_flight
        edges = len(node.inputs) + len(node.consumers)
        self.capacity = 2 * in_flight * max(1, edges) + 8
        self.inbox = Inbox(self.capacity, self)
        #: whether this actor runs messages directly, in the sender's task, when it is idle
        #: (see :meth:`run_directly`); the loss actor does on the CPU, without a trace
        self.direct = False
        #: an op of this actor runs in a sender's task now (:meth:`run_directly`); this actor's
        #: own task waits for its end (:meth:`_after_hand_over`) before deciding anything
        self.handed_over = False
        self._hand_over_ended: anyio.Event | None = None
        self.send_channel = self.inbox  # what senders hold (a remote actor's writes to the wire)
        self.n_inputs = len(node.inputs)
        # a key's forward is complete when every input slot has arrived
        self.fwd_slots: dict[int, list[Any]] = {}
        self.fwd_count: dict[int, int] = {}
        self.meta: dict[int, dict[str, Any]] = {}
        self.ready: deque[tuple[str, int]] = deque()  # completed messages, in completion order
        self.stats = ActorStatistics()
        self.waiting_for: Any = "its first message"  # a description, or the (kind, key) awaited
        self.computing: tuple[str, int, float] | None = None
        self.seq = 0  # this actor's processing sequence number (traces and replay)
        self.stopping = False  # told to stop: returns once nothing it must do is left
        # GPU: this actor's own stream; the events its next compute waits for (those of the
        # messages it reads); the event of its last compute; arrays kept alive until the
        # kernels reading them are done (cupy's pool would otherwise hand their memory to the
        # producer's stream while this stream still reads it): a compute's arguments and its
        # function, whose closure may hold them (a pullback holds the forward's inputs, which
        # a backward's weight gradient reads, and the run's copy of a batch is made on the
        # host thread's stream, which does not wait for this one before it copies the next)
        self.stream = None if self.on_cpu else self.backend.new_stream()
        self.events: dict[int, list[Any]] = {}
        self.after: list[Any] = []
        self.last_event: Any = None
        #: a traced GPU actor's work since its last op ended, as device timing events (the
        #: trace's "device" events); None elsewhere
        self.spans: list[tuple[Any, Any]] | None = (
            [] if ctx.recorder is not None and not self.on_cpu else None
        )
        self.keepalive: deque[tuple[Any, Any, Any]] = deque()
        self.born = time.perf_counter()
        self.delivers = ctx.policy.delivers(self.name)
        #: CPU work estimated below this many flops runs inline (the pool's threshold, fixed)
        self.inline_limit = ctx.inline_flops
        # counts that inline work in the pool's statistics (this loop thread's counter: one
        # attribute increment per compute, where pool.run would cost a call and a yield)
        self.inline_count = ctx.pool.inline_counter()
        # which inputs get a gradient back (those from layers; none when this node stops the
        # gradient), and where each goes: (input slot, source node, the source's consumer edge)
        self.input_is_layer = [
            ctx.graph.nodes[src].kind == "layer" and not node.stop_gradient for src in node.inputs
        ]
        self.any_input_is_layer = any(self.input_is_layer)
        self.grad_targets = [
            (slot, src, ctx.edge_index[(src, self.name, slot)])
            for slot, src in enumerate(node.inputs)
            if self.input_is_layer[slot]
        ]

    @property
    def run(self) -> ActorContext:
        """The same as :attr:`ctx` (the name custom actors have used): the run's context."""
        return self.ctx

    def _file(self, msg: Message) -> None:
        """Puts a message in the mailbox; notes when a key's forward or backward is complete."""
        self.stats.messages_in += 1
        rec = self.ctx.recorder
        if rec is not None and msg.kind in (FORWARD, BACKWARD):
            rec.event(self.name, "receive", msg.kind, msg.key, msg.version, msg.src)
        if msg.kind == FORWARD:
            slots = self.fwd_slots.get(msg.key)
            if slots is None:
                slots = self.fwd_slots[msg.key] = [None] * self.n_inputs
                self.fwd_count[msg.key] = 0
                self.meta[msg.key] = msg.meta
            # moved to this device inside the compute, on this actor's stream (after its event)
            slots[msg.slot] = msg.tensors[0]
            if msg.event is not None:
                self.events.setdefault(msg.key, []).append(msg.event)
            self.fwd_count[msg.key] += 1
            if self.fwd_count[msg.key] == self.n_inputs:
                self.ready.append((FORWARD, msg.key))
        else:
            self._file_other(msg)

    async def _take_message(self) -> None:
        """Files the next message of the inbox, waiting for one only if none is queued (taking
        a queued one without yielding saves a scheduler round trip)."""
        try:
            msg = self.inbox.receive_nowait()
        except anyio.WouldBlock:
            msg = await self.inbox.receive()
        self._file(msg)

    def _end_hand_over(self) -> None:
        """Ends an op run in a sender's task (:meth:`run_directly` sets :attr:`handed_over`
        and calls this in a ``finally``). A send in such an op may wait (to another process:
        its socket, a GPU tensor's event; or a full inbox), and a message arriving meanwhile
        wakes this actor's own task, which must not decide from the state before the op ends
        (it would wait for a message the op has taken, and the run would stall) nor start
        another op beside it: it waits in :meth:`_after_hand_over` for this."""
        self.handed_over = False
        ended, self._hand_over_ended = self._hand_over_ended, None
        if ended is not None:
            ended.set()

    async def _after_hand_over(self) -> None:
        """Returns once no op of this actor runs in a sender's task (:meth:`_end_hand_over`)."""
        while self.handed_over:
            if self._hand_over_ended is None:
                self._hand_over_ended = anyio.Event()
            await self._hand_over_ended.wait()

    async def run_directly(self, msg: Message) -> bool:
        """Whether this actor has taken and fully processed ``msg`` on the sender's task
        (another actor's :meth:`_send`, or the run's); only called where :attr:`direct` is set
        and its inbox is empty, at most :data:`MAX_DIRECT_DEPTH` actors deep. An actor that
        does must be idle, and should not wait for its own work (the hand-over saves wake-ups
        only where the work runs inline or is queued); its sends may wait, and it sets
        :attr:`handed_over` around the op and ends it with :meth:`_end_hand_over`, so that its
        own task, woken meanwhile, waits instead of running beside it. No actor does by
        default."""
        return False

    def _from_device(self, msg: Message) -> bool:
        """Whether ``msg``'s key has tensors from a GPU actor here: a CPU actor's compute then
        waits for their events (see :meth:`compute`), so it does not take the message in the
        sender's task (:meth:`run_directly`), which would wait for the device there."""
        return msg.event is not None or msg.key in self.events

    def _for_trace(self, tensors: tuple[Any, ...]) -> Any:
        """What the trace's writer may read later of the tensors sent: CPU arrays as they are
        (nothing writes into them again); a GPU actor's, copies to the host queued on its
        stream behind the work that made them (:func:`when_done`: the writer waits, this actor
        does not), taken before its next launch, which may write over buffers it handed out
        (its CUDA graphs')."""
        if self.on_cpu:
            return tensors
        backend = self.backend
        with backend.activate(self.stream):
            hosts = tuple(None if t is None else backend.to_host_async(t) for t in tensors)
            event = backend.record_event(self.stream, blocking=True)
        # (their bytes count toward the writer's bound on what it holds queued)
        nbytes = sum(h.nbytes for h in hosts if h is not None)
        return when_done(event, lambda: hosts, nbytes=nbytes)

    def _file_other(self, msg: Message) -> None:
        raise ActorError(self.name, msg.kind, msg.key, f"{self.name}: unexpected {msg.kind}")

    async def _send(self, msg: Message) -> None:
        self.stats.messages_out += 1
        rec = self.ctx.recorder
        if rec is not None:
            rec.event(
                self.name, "send", msg.kind, msg.key, msg.version, msg.dst, self.seq,
                self._for_trace(msg.tensors), rec.payloads == "all", {"slot": msg.slot},
            )  # fmt: skip
        if not self.delivers:
            return  # the policy records this actor's sends only (an actor replayed alone)
        channel = self.ctx.channels[msg.dst]
        owner = channel.direct_owner() if type(channel) is Inbox else None
        if owner is not None:
            start = time.perf_counter()
            if await _hand_over(owner, msg):
                # the time was the receiver's work, not this actor's
                self.stats.busy_seconds -= time.perf_counter() - start
                return
        try:
            # The inbox is sized so this never blocks; not yielding saves a scheduler round trip.
            channel.send_nowait(msg)
        except anyio.WouldBlock:
            await channel.send(msg)

    async def _send_grads(
        self, key: int, version: int, grads: Sequence[Any] | None, meta: dict[str, Any]
    ) -> None:
        """Sends each input from a layer its gradient (``None`` for all: a skipped key).

        Raises:
            TypeError: a gradient that is not an array with a batch dimension (a custom
                actor's ``[1.0]``, or a 0-d sum): the layer upstream would broadcast it over
                its output and train on it without a word.
        """
        for slot, src, edge in self.grad_targets:
            grad = None if grads is None else grads[slot]
            # one getattr per gradient sent: a layer's output keeps the batch dimension (the
            # graph checks it), so its gradient has at least one; autodiff broadcasts a size-1
            # cotangent, which would turn a scalar here into a wrong gradient, not an error
            if grad is not None and getattr(grad, "ndim", 0) == 0:
                raise TypeError(
                    f"{type(self).__name__} gave input slot {slot} (from {src!r}) a gradient "
                    f"that is {_describe_grad(grad)}, not an array with the batch dimension of "
                    f"that input; return one array shaped like the input (None for no gradient)"
                )
            msg = Message(BACKWARD, key, version, self.name, src, edge, (grad,), meta)
            msg.event = self.last_event  # None on the CPU
            await self._send(msg)

    def _fail(self, exc: BaseException, kind: str, key: int | None) -> ActorError:
        err = ActorError(
            self.name,
            kind,
            key,
            f"actor {self.name!r} failed on {kind} of key {key}: {type(exc).__name__}: {exc}",
        )
        err.__cause__ = exc
        return err

    # -- work -----------------------------------------------------------------------------------
    async def compute(self, fn: Callable[..., Any], *args: Any, cost: float | None = None) -> Any:
        """Runs ``fn(*args)`` on this actor's device through the run's device pool.

        Small CPU work (``cost`` in flops below the pool's inline threshold) runs right here:
        a hand-off to a worker thread would cost more than the work.
        """
        if self.on_cpu:
            if self.after:
                # Tensors from a GPU actor: its work is queued on its own stream, which a copy
                # to the host (cupy's get, on another stream) is not ordered after, so wait for
                # the events its messages carry (a captured graph's buffers would otherwise be
                # read still holding the previous key's values).
                after, self.after = self.after, []
                for event in after:
                    if not event.done:
                        await self.ctx.pool.wait(event)
            if cost is not None and cost < self.inline_limit:
                self.inline_count.tasks += 1
                return fn(*args)
            return await self.ctx.pool.run(self.device, fn, *args, cost=cost)
        after, self.after = self.after, []
        if self.spans is not None:  # a trace: when the work runs, on the device's clock
            fn, args = _timed, (self.backend, self.spans, fn, *args)
        result, event = await self.ctx.pool.enqueue(
            self.device, fn, *args, stream=self.stream, after=after
        )
        self.last_event = event
        self.stats.note_pool(*self.backend.memory_pool())
        self.keepalive.append((event, fn, args))
        self._release_done()
        return result

    def _release_done(self) -> None:
        """Drops what :attr:`keepalive` holds for the computes whose kernels have run (their
        events are recorded in order on this actor's stream)."""
        keepalive, done = self.keepalive, self.backend.event_done
        while keepalive and done(keepalive[0][0]):
            keepalive.popleft()

    def _record_device(self, rec: Any, kind: str, key: int, seq: int) -> None:
        """The trace's "device" event of the op just ended: when its work ran on the device."""
        if self.spans:
            spans, self.spans = self.spans, []
            rec.event(self.name, "device", kind, key, -1, "", seq,
                      meta={"spans": rec.device_spans(self.backend, spans)})  # fmt: skip

    async def wait_for_device(self) -> None:
        """Waits (without blocking the event loop) until this actor's queued GPU work is done,
        then lets go of what its computes up to then kept alive (the end of a run waits so)."""
        event = self.last_event
        if event is not None:
            await self.ctx.pool.wait(event, device=self.device)
            # done, and so is all before it on this stream (computes queued during the wait
            # come after it and stay kept)
            keepalive = self.keepalive
            for i, entry in enumerate(keepalive):
                if entry[0] is event:
                    for _ in range(i + 1):
                        keepalive.popleft()
                    break

    def _sum_parts(self, parts: list[Any]) -> Any:
        g = None
        for part in self._to_device(parts):
            if part is not None:
                g = part if g is None else g + part
        return g

    def _to_device(self, xs: list[Any]) -> list[Any]:
        # runs inside the compute: on this actor's stream, after the producers' events
        if self.on_cpu:  # the common case, answered first: host arrays already
            for x in xs:
                if type(x) is not np.ndarray:
                    break
            else:
                return xs
        local = self.backend.is_local
        return [x if x is None or local(x) else self.backend.asarray(x) for x in xs]

    def describe(self) -> str:
        """One line saying what this actor is doing or waiting for (for stall reports)."""
        if self.computing is not None:
            kind, key, since = self.computing
            return f"computing {kind} of key {key} for {time.perf_counter() - since:.1f} s"
        partial = [
            f"forward key {k} ({self.fwd_count[k]}/{self.n_inputs} inputs)"
            for k in self.fwd_slots
            if self.fwd_count[k] < self.n_inputs
        ]
        held = f"; holding {sorted(self.fwd_slots)} forwards" if self.fwd_slots else ""
        extra = f"; partial: {', '.join(partial)}" if partial else ""
        w = self.waiting_for
        what = f"{w[0]} of key {w[1]}" if isinstance(w, tuple) else w
        return f"waiting for {what}{held}{extra}"


def _describe_grad(grad: Any) -> str:
    shape = getattr(grad, "shape", None)
    if shape is not None:
        return f"a {type(grad).__name__} of shape {tuple(shape)}"
    return f"a {type(grad).__name__} ({grad!r:.40})"


def _timed(backend: Any, spans: list[tuple[Any, Any]], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` between two timing events on the current stream (inside a launch: the
    actor's, after the events it waits for), noted in ``spans``."""
    start = backend.timing_event()
    result = fn(*args)
    spans.append((start, backend.timing_event()))
    return result
