"""Recording a run's events to a trace file without making actors wait on the disk.

Actors call :meth:`Recorder.event` on the hot path: it only appends a tuple to a queue. A writer
thread turns the tuples into records (digests of the tensor bytes, payloads where asked), frames
them (see ``_traceformat``) and writes them through a buffer. Arrays handed to the recorder are
never modified afterwards by the runtime (updates make new arrays), so the thread may read them
later. Where that does not hold (a GPU actor's outputs, or the buffers a replayed CUDA graph
writes again at its next launch), the actor hands over a :class:`Later` (:func:`when_done`):
host copies queued on its own stream behind the work that made the tensors, read once an event
after them is done. The actor never waits for the copy, and the digests stay those of the bytes
(the same function on every device, so ``trace diff`` compares a captured GPU run with an eager
or a CPU one).

The queue is bounded by the bytes it holds (:data:`DEFAULT_MAX_QUEUED_BYTES`, an event's tensors
stay alive while it is queued): past the bound a run admits no new key until the writer has
written enough (:meth:`Recorder.wait_for_room`, awaited where a key goes in), so a run that
records faster than the disk writes slows to the disk's pace instead of growing without limit.
The actors never wait on the disk (an event is queued at once, whatever the queue holds), and
nothing is dropped while the writer works.
"""

from __future__ import annotations

import os
import platform
import queue
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import xxhash

from asyncnn._errors import TraceWriteError
from asyncnn.backends._dtypes import rebuildable_name
from asyncnn.backends._registry import host_array

from ._config import PAYLOAD_MODES
from ._traceformat import FORMAT, VERSION, encode_record

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writer goes unnoticed
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_QUEUED_BYTES",
    "PAYLOAD_MODES",
    "Later",
    "Recorder",
    "describe_arrays",
    "digest",
    "dtype_code",
    "when_done",
]


#: how many bytes of events a :class:`Recorder`'s queue holds before the run admits no new key
#: (256 MiB): a few seconds of a disk's writing, far more than a run's events between two of
#: the writer's turns, and little beside the memory of a run worth tracing
DEFAULT_MAX_QUEUED_BYTES = 256 << 20

#: what a queued event costs beside its tensors (its tuple, its meta, its record as packed),
#: counted so that the bound holds for events without tensors too
_EVENT_BYTES = 512


class Later:
    """Something of an event that the trace's writer computes on its own thread, where it may
    wait for a device: its tensors (host copies a device is still writing) or a value of its
    ``meta`` (a loss read once its copy has landed, device times). ``resolve()`` gives it;
    ``nbytes`` is what it holds meanwhile (host copies), counted against the writer's bound.
    """

    __slots__ = ("nbytes", "resolve")

    def __init__(self, resolve: Callable[[], Any], nbytes: int = 0) -> None:
        self.resolve = resolve
        self.nbytes = nbytes


def when_done(event: Any, read: Callable[[], Any], nbytes: int = 0) -> Later:
    """``read()``, once the device work before ``event`` has finished (the writer waits);
    ``nbytes``: the bytes of what ``read()`` gives (host copies), which the queue holds."""

    def resolve() -> Any:
        event.synchronize()
        return read()

    return Later(resolve, nbytes)


def _held_bytes(tensors: Any) -> int:
    """The bytes an event's tensors keep alive while it is queued (their ``nbytes``: read, not
    computed; a :class:`Later`'s own count), whether or not their payload is written."""
    if tensors is None:
        return 0
    if type(tensors) is Later:
        return int(tensors.nbytes)
    n = 0
    for t in tensors:  # (a loop, not sum() of a generator: this runs on every event)
        if t is not None:  # (a Python number, which the writer takes as an array: not counted)
            n += getattr(t, "nbytes", 0)
    return int(n)


def dtype_code(dtype: np.dtype[Any]) -> str:
    """How a trace names ``dtype`` so that a reader rebuilds the same one (see
    :func:`~asyncnn.backends._dtypes.rebuildable_name`); a dtype no name rebuilds (a structured
    one) keeps its ``str``."""
    return rebuildable_name(dtype) or dtype.str


def _bytes_of(host: np.ndarray[Any, Any]) -> memoryview:
    """The bytes of a C-ordered array, as a flat uint8 view: ``memoryview.cast`` refuses the
    extension dtypes (bfloat16's buffer format ``"E"``), and a 0-d array cannot be viewed as
    bytes until flattened (a view either way: nothing is copied)."""
    return host.reshape(-1).view(np.uint8).data


def digest(array: Any) -> int:
    """A 64-bit hash (xxh3) of an array's bytes in C order."""
    return int(xxhash.xxh3_64_intdigest(_bytes_of(host_array(array))))


def describe_arrays(
    arrays: Any, with_payload: bool
) -> tuple[list[dict[str, Any] | None], list[bytes | None]]:
    """Shape, dtype, bytes and digest of each array (``None`` entries stay ``None``), and with
    ``with_payload`` the bytes of each, aligned with the descriptions (``None`` for ``None``)."""
    info: list[dict[str, Any] | None] = []
    payloads: list[bytes | None] = []
    for a in arrays:
        if a is None:
            info.append(None)
            if with_payload:
                payloads.append(None)
            continue
        host = host_array(a)
        raw = _bytes_of(host)
        info.append(
            {
                "s": list(host.shape),
                "d": dtype_code(host.dtype),
                "n": host.nbytes,
                "h": int(xxhash.xxh3_64_intdigest(raw)),
            }
        )
        if with_payload:
            payloads.append(raw.tobytes())
    return info, payloads


class _UnkeptKey(TypeError):
    """A dict key :func:`encode_tree` cannot keep as it is; ``where`` gathers its index path
    on the way out (built only when one is refused: a tree is encoded at every traced fit)."""

    def __init__(self, key: Any) -> None:
        super().__init__()
        self.key = key
        self.where = ""

    def __str__(self) -> str:
        k = self.key
        # a numpy scalar key (a label read from an array) has a plain twin that the trace keeps
        plain = type(k.item()).__name__ if isinstance(k, np.generic) else None
        fix = f" (give it as {plain}(key))" if plain in ("int", "float", "bool") else ""
        return (
            f"the dict at {self.where or 'its top'} has the key {k!r:.60} of type "
            f"{type(k).__name__}, which a trace cannot keep as it is{fix}; key dicts by str, "
            "int, float, bool or None"
        )


def encode_tree(tree: Any) -> Any:
    """A pytree with arrays replaced by ``{"s", "d", "b"}`` maps (for the initial state).

    A dict keeps its keys as they are, in their order (str, int, float, bool and None: what
    msgpack holds as a map's key), and a numpy scalar is marked ``"sc"`` (a 0-d array is
    not): a replay hands an actor the tree its run had, as the cluster's wire does.

    Raises:
        TypeError: a dict key of another type (a tuple, a numpy integer), naming where it is.
    """
    try:
        return _encode(tree)
    except _UnkeptKey:
        _check_keys(tree)  # (walks the tree again, only now, to say where the key lies)
        raise


def _kept_key(key: Any) -> bool:
    # (a subclass is written as its base, as the wire sends it: an IntEnum as its int)
    return key is None or isinstance(key, bool | int | float | str)


def _encode(tree: Any) -> Any:
    """:func:`encode_tree`'s walk, which refuses a key without saying where it lies."""
    if isinstance(tree, dict):
        out: dict[Any, Any] = {}
        for k, v in tree.items():
            if not _kept_key(k):
                raise _UnkeptKey(k)
            out[k] = _encode(v)
        return {"dict": out}
    if isinstance(tree, list | tuple):
        items = [_encode(v) for v in tree]
        return {"list" if isinstance(tree, list) else "tuple": items}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        host = host_array(tree)  # (a 0-d array stays 0-d: a custom actor's scalar state)
        spec: dict[str, Any] = {
            "s": list(host.shape),
            "d": dtype_code(host.dtype),
            "b": host.tobytes(),
        }
        if isinstance(tree, np.generic):  # a numpy scalar reads back as one, not as 0-d
            spec["sc"] = True
        return spec
    return {"value": tree}


def decode_tree(spec: Any) -> Any:
    """The inverse of :func:`encode_tree` (numpy arrays). A tree written before keys and numpy
    scalars were kept (its keys all str, its numpy scalars 0-d arrays) reads as written."""
    if "dict" in spec:
        return {k: decode_tree(v) for k, v in spec["dict"].items()}
    if "list" in spec:
        return [decode_tree(v) for v in spec["list"]]
    if "tuple" in spec:
        return tuple(decode_tree(v) for v in spec["tuple"])
    if "b" in spec:
        array = np.frombuffer(spec["b"], dtype=np.dtype(spec["d"])).reshape(spec["s"])
        if spec.get("sc") is True and array.ndim == 0:
            return array[()]  # (a scalar of its dtype: a copy of the record's bytes)
        return array.copy()
    return spec["value"]


def _check_keys(tree: Any) -> None:
    """Raises the :class:`_UnkeptKey` that :func:`encode_tree` would raise for ``tree``, without
    encoding its arrays (the weights are encoded on the writer's thread, after the run began)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if not _kept_key(k):
                raise _UnkeptKey(k)
            try:
                _check_keys(v)
            except _UnkeptKey as exc:
                exc.where = f"[{k!r}]{exc.where}"
                raise
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            try:
                _check_keys(v)
            except _UnkeptKey as exc:
                exc.where = f"[{i}]{exc.where}"
                raise


def _encoded_actor_state(layer: str, state: Any) -> Any:
    """A custom actor's state as :func:`encode_tree` encodes it, checked to fit a record."""
    try:
        encoded = encode_tree(state)
        encode_record({"s": encoded})
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"the trace cannot hold the actor state of layer {layer!r} (what its actor_state() "
            f"returned: {type(state).__name__}): {exc}. Return a tree of dicts, lists and "
            "tuples of arrays, numbers, strings and None"
        ) from exc
    return encoded


def package_versions() -> dict[str, str]:
    from asyncnn._version import __version__

    versions = {"asyncnn": __version__, "numpy": np.__version__}
    versions["python"] = platform.python_version()
    import sys

    # (ml_dtypes rounds bfloat16 on numpy: a replay elsewhere may need its version)
    for name in ("cupy", "ml_dtypes"):
        if name in sys.modules:
            versions[name] = str(getattr(sys.modules[name], "__version__", "unknown"))
    return versions


def trace_path_error(error: type[OSError], code: int | None, path: str, why: str) -> OSError:
    """The error for a trace path that cannot be written, of the class ``error`` (the one
    ``os.open`` raises for it, so that callers catching that still do), saying ``why``: the
    recorder's at a fit, and the trainer's when the path is given."""
    return error(
        code,
        f"cannot write the trace {path!r}: {why}. Pass trace= a file path in an existing folder "
        "this process may write to",
    )


def _open_alone(path: str) -> Any:
    """``path`` opened for writing, emptied, and locked for this recorder alone: a second run
    recording to the same path while this one writes is refused, instead of the two runs
    writing over each other's records (the file is emptied only once the lock is held)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        # the bare "[Errno 2] No such file or directory" does not say which of a run's paths
        # it was; the same class, so that callers catching it still do
        folder = os.path.dirname(os.path.abspath(path))
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, FileNotFoundError) and not os.path.isdir(folder):
            why = f"its folder {folder!r} does not exist"
        elif isinstance(exc, IsADirectoryError):
            why = "it is a folder"
        raise trace_path_error(type(exc), exc.errno, path, why) from exc
    try:
        # only a regular file: /dev/null or a pipe takes any number of writers and cannot be
        # emptied
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise OSError(
                        f"the trace {path!r} is being written by another run (of this or "
                        "another process): give each run its own trace path"
                    ) from exc
            os.ftruncate(fd, 0)
        return open(fd, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
    except BaseException:
        os.close(fd)
        raise


class Recorder:
    """Writes one run's trace. Open it with a header; call :meth:`event`; :meth:`close` at the end,
    which writes the closing event (``{"a": "scheduler", "ev": "close"}``; the header says
    ``writes_close``). A writer that fails (a full disk) drops every later event, and says so
    through :meth:`failure` (the run stops on it) and :meth:`close`, with a
    :class:`~asyncnn._errors.TraceWriteError` where the disk refused a write.

    Args:
        path: the trace file (created or truncated). While this recorder writes it, a second
            recorder of the same path is refused (``OSError``).
        header: the first record (format, version and package versions are added).
        payloads: ``"inputs"`` (the data fed in: enough to replay), ``"all"`` (every message's
            tensors: enough to replay one actor alone) or ``"none"`` (digests only).
        defer_header: write the header only once :meth:`complete_header` has added the fields
            known later (the run's device pool, opened after the trace so that a trace path
            that cannot be written fails first), or at :meth:`close`. Events and the state
            queued meanwhile are written after it.
        max_queued_bytes: how many bytes of events (their tensors, and :data:`_EVENT_BYTES`
            each) may wait for the writer before :meth:`backlogged` says so, and
            :meth:`wait_for_room` waits (the run, before it admits a key: backpressure that
            drops nothing). The keys in flight may queue more past it: their events are
            never held back.
    """

    def __init__(
        self,
        path: str,
        header: dict[str, Any],
        payloads: str = "inputs",
        *,
        defer_header: bool = False,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        if payloads not in PAYLOAD_MODES:
            raise ValueError(f"trace payloads must be one of {PAYLOAD_MODES}, got {payloads!r}")
        if type(max_queued_bytes) is not int or max_queued_bytes <= 0:
            raise ValueError(
                "the trace writer's max_queued_bytes must be a positive int (bytes; "
                f"{DEFAULT_MAX_QUEUED_BYTES} by default), got {max_queued_bytes!r}"
            )
        self.path = path
        self.payloads = payloads
        #: what to do where writing fails, said in the error (None: free space, or another
        #: trace= path); the owner of a file the user did not name sets its own
        self.advice: str | None = None
        self.t0 = time.perf_counter()
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.max_queued_bytes = max_queued_bytes
        # The bytes queued and not yet written: those put (counted by the producers) less
        # those written (counted by the writer alone), each count written by one side only,
        # so that an event takes no lock the writer contends for
        self._put_bytes = 0
        self._written_bytes = 0
        self._peak_queued_bytes = 0  # (the most ever queued: what the tests look at)
        self._file = _open_alone(path)
        self._error: BaseException | None = None
        # the writer has taken the end of the queue (close()'s None): nothing more comes
        self._ended = False
        self.events = 0
        self.bytes = 0
        self._clocks: dict[str, tuple[Any, float]] = {}
        self._head: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "packages": package_versions(),
            "payloads": payloads,
            # this writer ends the trace with a "close" event: a reader then tells a trace whose
            # process was killed (it ends on a whole record, the last buffer written) from a
            # whole one
            "writes_close": True,
            **header,
        }
        # set once the header may be written (the writer thread writes it before anything)
        self._head_ready = threading.Event()
        if not defer_header:
            self._head_ready.set()
        self._thread = threading.Thread(target=self._run, name="asyncnn-trace-writer", daemon=True)
        self._thread.start()

    def failure(self) -> RuntimeError | None:
        """The error that writing the trace failed with, naming the trace (its cause: what the
        writer raised), or None while it writes: a :class:`~asyncnn._errors.TraceWriteError`
        where the disk refused a write (a full disk), a ``RuntimeError`` where the writer failed
        on something else. A run stops on it (:func:`~asyncnn._runtime._lifecycle.hosting`
        watches for it), instead of going on with a trace that no longer records it."""
        if self._error is None:
            return None
        return self._named(self._error)

    def _named(self, error: BaseException) -> RuntimeError:
        fix = self.advice or (
            "free space where the trace is written, or pass trace= another path (or None to "
            "record none)"
        )
        message = (
            f"writing the trace {self.path!r} failed ({type(error).__name__}: {error}); the "
            f"events after the failure were not recorded: {fix}"
        )
        named: RuntimeError
        if isinstance(error, OSError):  # the disk's: an OSError too, of its errno
            named = TraceWriteError(message, self.path, error.errno, error.strerror)
        else:  # (a writer's bug, a device's error: no file the disk refused)
            named = RuntimeError(message)
        named.__cause__ = error  # (as `raise named from error` would: the cause is shown)
        named.__suppress_context__ = True
        return named

    @property
    def records_errors(self) -> bool:
        """Whether a run's errors are written to this trace: not to a worker's part of a
        cluster's trace (its header names the worker, see ``docs/trace_format.md``), whose
        driver's trace records the run's error, a worker's included (written here too, the
        merged trace would hold it twice)."""
        return "worker" not in self._head

    @property
    def header_pending(self) -> bool:
        """Whether the header still takes fields (:meth:`complete_header`)."""
        return not self._head_ready.is_set()

    def complete_header(self, **fields: Any) -> None:
        """Adds ``fields`` to a deferred header and lets the writer write it.

        Raises:
            RuntimeError: the header was not deferred, or is complete already.
        """
        if self._head_ready.is_set():
            raise RuntimeError(
                f"the header of the trace {self.path!r} is complete already: fields "
                f"{sorted(fields)} can only be added to a header deferred with "
                "Recorder(..., defer_header=True), before complete_header is first called"
            )
        self._head.update(fields)
        self._head_ready.set()
        # (nothing waits while the header is pending; the events queued meanwhile count, and
        # the next key past the bound waits for the writer to write them)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self.bytes += len(data)

    def device_spans(self, backend: Any, spans: list[tuple[Any, Any]]) -> Later:
        """When ``spans`` (pairs of ``backend.timing_event`` events around queued work) ran on
        the device's clock, as ``[[start, end], ...]`` in this trace's seconds, for an event's
        ``meta``: the writer reads the times once the work has finished."""
        base, at = self._device_clock(backend)

        def times() -> list[list[float]]:
            return [
                [at + backend.elapsed(base, a), at + backend.elapsed(base, b)] for a, b in spans
            ]

        return Later(times)

    def _device_clock(self, backend: Any) -> tuple[Any, float]:
        """An event of ``backend``'s device and the trace time it completed at: where the
        device's clock meets the trace's. Read once per device (one wait for it, at the first
        traced work there): the device idle, the event completes as it is recorded."""
        name = str(backend.device)
        clock = self._clocks.get(name)
        if clock is None:
            backend.synchronize()
            event = backend.timing_event()
            backend.elapsed(event, event)  # (waits for it)
            clock = self._clocks[name] = (event, time.perf_counter() - self.t0)
        return clock

    def state(
        self,
        params: Any,
        opt_states: Any,
        versions: Any,
        pending: Any = None,
        actor_states: Any = None,
        earlier: Any = None,
        pending_delays: Any = None,
    ) -> None:
        """Records the weights, optimizer states, not yet applied gradients, custom actors'
        own states (``{layer: state}``), earlier weight versions that forwards are pinned to
        (``{layer: {version: params}}``, ``RunState.earlier_params``) and the delays of the not
        yet applied gradients (``{layer: [delay, ...]}``, ``RunState.pending_delays``) the run
        starts from (so replay can start there too).

        Raises:
            TypeError: an actor state that a trace cannot hold (naming its layer).
        """
        # The actors' states are encoded now, on the caller's thread: an actor may change its
        # state in place once the run starts (the arrays the runtime hands over are never
        # changed, but these are the actor's own), and one a trace cannot hold is refused
        # before the run starts rather than failing the trace at its end.
        if self._error is not None:
            return  # (the writer failed: nothing more is written, so nothing is kept for it)
        actors = {name: _encoded_actor_state(name, st) for name, st in (actor_states or {}).items()}
        # the other trees are encoded on the writer's thread, once the run has begun: a key the
        # trace cannot keep (a custom optimizer's state keyed by a tuple) would fail the trace at
        # the run's end, so their keys are checked here, before it starts
        for field, tree in (("opt_states", opt_states), ("pending", pending), ("earlier", earlier)):
            try:
                _check_keys(tree)
            except _UnkeptKey as exc:
                raise TypeError(f"the trace cannot hold the run's initial {field}: {exc}") from None
        delays = {n: [int(d) for d in ds] for n, ds in (pending_delays or {}).items() if ds}
        # (counts as one event: its trees are the run's own, which the run holds anyway)
        self._put(
            ("state", params, opt_states, versions, pending or {}, actors, earlier, delays,
             _EVENT_BYTES),
            _EVENT_BYTES,
        )  # fmt: skip

    def event(
        self,
        actor: str,
        ev: str,
        kind: str = "",
        key: int = -1,
        version: int = -1,
        peer: str = "",
        seq: int = -1,
        tensors: Any = None,
        payload: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Queues one event (cheap: the digests and the writing happen on the writer thread),
        never waiting, whatever the queue holds (the run waits before it admits a key:
        :meth:`wait_for_room`). Once the writer has failed (:meth:`failure`), drops it: the
        event and the tensors it holds would only wait in memory for a writer that is gone."""
        if self._error is not None:
            return
        size = _EVENT_BYTES if tensors is None else _EVENT_BYTES + _held_bytes(tensors)
        item = (time.perf_counter() - self.t0, actor, ev, kind, key, version, peer, seq,
                tensors, payload, meta, size)  # fmt: skip
        self._put(item, size)

    @property
    def _queued_bytes(self) -> int:
        """The bytes queued and not yet written (or dropped, after a failure)."""
        return self._put_bytes - self._written_bytes

    def _put(self, item: tuple[Any, ...], size: int) -> None:
        """Queues ``item``, whose last field is ``size``, the bytes it holds. (The producers
        are the run's event-loop thread, so the count in takes no lock; were another thread to
        lose an increment, the bound would only be laxer: nothing waits on an exact count.)"""
        self._put_bytes += size
        queued = self._put_bytes - self._written_bytes
        if queued > self._peak_queued_bytes:
            self._peak_queued_bytes = queued
        self._queue.put(item)

    def backlogged(self) -> bool:
        """Whether the writer has more than ``max_queued_bytes`` of events to write, and can
        write them (its header is written, it has not failed): the run then admits no new key
        (:meth:`wait_for_room`). One comparison: the run asks at every key."""
        return (
            self._put_bytes - self._written_bytes > self.max_queued_bytes
            and self._error is None
            and self._head_ready.is_set()
        )

    async def wait_for_room(self, max_interval: float = 0.01) -> None:
        """Returns once :meth:`backlogged` is false: the writer has written the queue down to
        ``max_queued_bytes``, or failed (the run then stops on :meth:`failure`). Polls, without
        blocking the event loop: 100 µs, then twice as long each time, up to
        ``max_interval`` seconds (the disk's pace, far slower)."""
        interval = 1e-4
        while self.backlogged():
            await anyio.sleep(interval)
            interval = min(2 * interval, max_interval)

    def _taken(self, size: int) -> None:
        """The writer is done with an item of ``size`` bytes (written, or dropped after a
        failure)."""
        self._written_bytes += size

    def _run(self) -> None:
        try:
            self._write_all()
        except BaseException as exc:  # noqa: BLE001 - reported by failure() and close()
            self._error = exc
            # what was queued before event() saw the failure, and what comes until close():
            # taken and dropped, so that no event's tensors wait in memory for the run's end
            while not self._ended:
                item = self._queue.get()
                if item is None:
                    self._ended = True
                else:
                    self._taken(item[-1])

    def _write_all(self) -> None:
        """Writes the header, then each queued item, until close()'s None; then the closing
        event, which tells a whole trace from one whose process was killed."""
        self._head_ready.wait()
        self._write(encode_record(self._head))
        while True:
            item = self._queue.get()
            if item is None:
                self._ended = True
                close = {"t": time.perf_counter() - self.t0, "a": "scheduler", "ev": "close"}
                self._write(encode_record(close))
                return
            size = item[-1]
            try:
                self._write_item(item)
            finally:
                # counted out once written (its tensors were held until then), or once its
                # writing failed: the writer drops the rest then
                del item
                self._taken(size)

    def _write_item(self, item: tuple[Any, ...]) -> None:
        """Writes one queued item (its last field the bytes it counts): the run's state, or an
        event."""
        if item[0] == "state":
            _, params, opt_states, versions, pending, actors, earlier, delays, _ = item
            state_rec = {
                "state": {
                    "params": encode_tree(params),
                    "opt_states": encode_tree(opt_states),
                    "versions": versions,
                    "pending": encode_tree(pending),
                }
            }
            if actors:  # (absent where no actor keeps a state: as before it existed)
                state_rec["state"]["actor_states"] = {"dict": actors}
            if earlier:  # (absent where the policy pins no forwards: as before)
                state_rec["state"]["earlier"] = encode_tree(earlier)
            if delays:  # (absent where no pending gradient has a delay: as before)
                state_rec["state"]["pending_delays"] = encode_tree(delays)
            self._write(encode_record(state_rec))
            return
        t, actor, ev, kind, key, version, peer, seq, tensors, payload, meta, _ = item
        rec: dict[str, Any] = {"t": t, "a": actor, "ev": ev}
        if kind:
            rec["k"] = kind
        if key >= 0:
            rec["key"] = key
        if version >= 0:
            rec["v"] = version
        if peer:
            rec["p"] = peer
        if seq >= 0:
            rec["seq"] = seq
        if tensors is not None:
            if type(tensors) is Later:
                tensors = tensors.resolve()
            info, payloads = describe_arrays(tensors, payload)
            rec["x"] = info
            if payloads:
                rec["pl"] = payloads
        if meta:
            if any(type(v) is Later for v in meta.values()):
                meta = {k: v.resolve() if type(v) is Later else v for k, v in meta.items()}
            rec["m"] = meta
        self._write(encode_record(rec))
        self.events += 1

    def close(self) -> None:
        """Writes what is queued and the closing event, and closes the file.

        Raises:
            TraceWriteError: the disk refused a write of the trace (in the writer, or flushing
                its last buffer here), naming the trace; the disk's ``OSError`` is its cause.
            RuntimeError: the writer failed on something else, naming the trace; its error is
                the cause.
        """
        self._head_ready.set()  # a deferred header that nothing completed: as it stands
        self._queue.put(None)
        self._thread.join()
        try:
            # (flushes the last buffer: a full disk fails here too, the file closed all the same)
            self._file.close()
        except OSError as exc:
            if self._error is None:
                self._error = exc
        if self._error is not None:
            raise self._named(self._error)
