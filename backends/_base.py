"""The abstract backend: everything the framework asks of a compute engine."""

from __future__ import annotations

import abc
import contextlib
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Backend", "Device", "parse_device"]

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """Where arrays live and work runs: ``Device("cpu")`` or ``Device("cuda", 1)``.

    Checked when made, as :func:`parse_device` checks the strings: ``kind`` is ``"cpu"`` or
    ``"cuda"``; ``index`` an int >= 0 (None: 0, as ``"cuda"`` means ``"cuda:0"``), and 0 on
    the CPU, which is one device.

    Raises:
        ValueError: another kind (``Device("CPU")`` meant ``cuda:0``), a negative index, or
            a CPU index other than 0.
        TypeError: an index that is not an int.
    """

    kind: str
    index: int = 0

    def __post_init__(self) -> None:
        # (devices are made once per actor or name, never per compute: the checks cost nothing)
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(
                f"unknown device kind {self.kind!r}: use Device('cpu') or Device('cuda', N) "
                "(or the names 'cpu', 'cuda', 'cuda:N')"
            )
        index = 0 if self.index is None else self.index
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"Device: index must be an int >= 0, got {self.index!r}")
        if index < 0:
            raise ValueError(f"Device: index must be an int >= 0, got {self.index!r}")
        if self.kind == "cpu" and index != 0:
            raise ValueError(
                f"unknown device Device('cpu', {self.index!r}): there is one CPU device, "
                "Device('cpu') (the name 'cpu')"
            )
        object.__setattr__(self, "index", int(index))

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def backend_name(self) -> str:
        return "numpy" if self.kind == "cpu" else "cupy"


def parse_device(device: str | Device) -> Device:
    """Parses ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: for anything else, showing the accepted forms.
    """
    if isinstance(device, Device):
        return device
    m = _DEVICE_RE.match(str(device).strip())
    if m is None:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu" and index not in (None, "0"):
        raise ValueError(f"unknown device {device!r}: there is one CPU device, 'cpu'")
    return Device(kind, int(index or 0))


class Backend(abc.ABC):
    """One compute engine (numpy on the CPU, cupy on a CUDA device).

    The math is written once against :attr:`xp`, an array namespace with numpy's API. Everything
    else that differs between engines (moving bytes, seeding, streams) goes through these methods.
    """

    #: the backend's name: ``"numpy"`` or ``"cupy"``
    name: str
    #: the array namespace (the ``numpy`` or ``cupy`` module)
    xp: Any
    #: the device this backend instance computes on
    device: Device

    def dtype(self, dtype: Any) -> np.dtype[Any]:
        """The numpy dtype for a name such as ``"float32"``, checked to be supported.

        Raises:
            ValueError: a name numpy does not know (for ``"bfloat16"``, saying that numpy
                learns it from the ml_dtypes package, which is not installed).
        """
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            from ._dtypes import unknown_dtype_hint  # (it imports this module)

            raise ValueError(f"unknown dtype {dtype!r}{unknown_dtype_hint(dtype)}") from exc
        return dt

    @abc.abstractmethod
    def rng(self, seed: int | np.random.SeedSequence) -> Any:
        """A seeded random generator whose ``random``/``normal``/``uniform`` make arrays here."""

    @abc.abstractmethod
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` (numpy, host data or an array of this backend) as an array on this device.

        Raises:
            ValueError: ``dtype`` is a name numpy does not know (as :meth:`dtype` says).
        """

    def is_local(self, x: Any) -> bool:
        """Whether ``x`` is an array of this device already (``asarray`` would return it)."""
        return False

    @abc.abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray[Any, Any]:
        """A host copy of ``x`` (no copy when it is already a numpy array)."""

    def to_host_async(self, x: Any, out: Any = None) -> np.ndarray[Any, Any]:
        """A host array that ``x`` is being copied into on the current stream: read it only once
        an event recorded after this call has completed (on the CPU: a finished copy).

        ``out``, an array this returned before (and that has been read), is reused when it
        has ``x``'s shape and dtype."""
        return self.to_numpy(x)

    def to_bytes(self, x: Any) -> memoryview:
        """The raw bytes of ``x`` in C order (through the host)."""
        host = np.ascontiguousarray(self.to_numpy(x))
        # viewed as bytes by numpy: a memoryview's own cast refuses the formats numpy cannot
        # export (bfloat16's "E" from ml_dtypes, datetime64's "M")
        return host.reshape(-1).view(np.uint8).data

    def from_bytes(self, buf: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
        """An array on this device made from raw bytes written by :meth:`to_bytes`."""
        dt = np.dtype(dtype)
        expected = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        if len(memoryview(buf).cast("B")) != expected:
            raise ValueError(
                f"from_bytes: {len(memoryview(buf).cast('B'))} bytes cannot hold an array of "
                f"shape {shape} and dtype {dt} ({expected} bytes)"
            )
        host = np.frombuffer(buf, dtype=dt).reshape(shape)
        return self.asarray(host)

    def copy_to(self, x: Any, device: str | Device) -> Any:
        """``x`` as an array on ``device`` (no copy when it already lives there).

        Between CUDA devices the copy is queued on the target device's current stream; wait for
        the producer's event first when ``x`` was made on another stream.
        """
        from ._registry import get_backend  # the registry imports this module

        return get_backend(parse_device(device)).asarray(x)

    def synchronize(self) -> None:  # noqa: B027 - a no-op where work is synchronous
        """Blocks until all work queued on this device has finished."""

    # Streams and events: the CPU runs work synchronously, so these are trivial there.
    def activate(self, stream: Any = None) -> contextlib.AbstractContextManager[Any]:
        """A context in which work is queued on ``stream`` of this device (nothing on the CPU)."""
        return contextlib.nullcontext(stream)

    def new_stream(self) -> Any:
        """A new stream on this device (``None`` on the CPU)."""
        return None

    def record_event(self, stream: Any = None, blocking: bool = False) -> Any:
        """An event marking the work queued so far on ``stream`` (``None`` on the CPU).

        ``blocking``: a host thread that waits for it sleeps instead of spinning (for waits off
        the actors' path, such as the trace writer's, which should leave the cores to them)."""
        return None

    def timing_event(self, stream: Any = None) -> Any:
        """An event on ``stream`` that marks a moment on the device's own clock, for
        :meth:`elapsed` (a host thread waiting for it sleeps); ``None`` where work runs on the
        host (the CPU: the host's clock times it)."""
        return None

    def elapsed(self, start: Any, end: Any) -> float:
        """Seconds of the device's clock from ``start`` to ``end``, two :meth:`timing_event`
        events of this device (``end`` complete, or this waits for it)."""
        raise NotImplementedError(f"{self.device} has no clock of its own: time it on the host")

    def launch(
        self, fn: Callable[..., Any], args: tuple[Any, ...], stream: Any, after: Sequence[Any]
    ) -> tuple[Any, Any]:
        """``fn(*args)`` queued on ``stream`` after the events ``after``: ``(result, the event
        after its work)``. What :meth:`DevicePool.enqueue` does on a device with streams."""
        with self.activate(stream):
            for event in after:
                self.wait_event(event, stream)
            result = fn(*args)
        return result, self.record_event(stream)

    def wait_event(self, event: Any, stream: Any = None) -> None:  # noqa: B027 - CPU: nothing
        """Makes ``stream`` wait for ``event`` without blocking the host."""

    def event_done(self, event: Any) -> bool:
        """Whether the work before ``event`` has finished."""
        return True

    def notify(self, event: Any, callback: Callable[[], object]) -> bool:
        """Arranges for ``callback()`` to run, on some thread, once the work before ``event`` has
        finished; returns False where the backend cannot (the caller then polls). The callback
        must not touch the device."""
        return False

    def memory_in_use(self) -> int:
        """Bytes in live arrays of this backend's memory pool (0 where it has none)."""
        return self.memory_pool()[0]

    def fused_kernels(self) -> Any:
        """The module of this backend's fused optimizer kernels (``sgd_leaf``, ``adam_leaf``:
        one kernel per parameter; ``sgd_many``, ``adam_many``: one launch for many; the same
        arithmetic as the plain update), or None where the plain array code is already the
        fast path (numpy)."""
        return None

    def fused_nn_kernels(self) -> Any:
        """The module of this backend's fused network kernels, or None where the array code is
        already the fast path (numpy). The rules call, where ``fits`` says the rows fit:
        ``cross_entropy_rows``, ``reduce_losses`` and ``cross_entropy_grad`` (three kernels
        instead of about eighteen array operations); and ``relu``, ``relu_grad`` and
        ``half_sum`` (a 16-bit sum over axes, accumulated in float32) on this backend's float
        arrays; ``embedding_rows`` (a table's rows at integer ids, NaN for an id outside the
        table) for an Embedding whose ids are not checked on the host."""
        return None

    def memory_pool(self) -> tuple[int, int]:
        """This device's memory pool: ``(bytes in live arrays, bytes held from the driver)``.

        ``(0, 0)`` where the backend has no pool (numpy allocates through the C library).
        """
        return 0, 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device}>"
