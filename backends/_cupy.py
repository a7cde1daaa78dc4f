"""The cupy backend: arrays in the memory of one CUDA device, work queued on CUDA streams.

This module imports cupy at the top; only :func:`asyncnn.backends.get_backend` imports this
module, the first time a ``"cuda:N"`` device is asked for, so a CPU-only run never loads cupy.

cupy keeps a *current device* per host thread, and allocates every new array there. A process
that drives several GPUs therefore enters ``cupy.cuda.Device(index)`` around everything that
allocates; each method here does so, so callers never depend on which device happens to be current.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ._base import Backend, Device, parse_device
from ._dtypes import BFLOAT16

try:
    import cupy
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        "a CUDA device needs cupy, which is not installed: pip install 'asyncnn[gpu]' "
        "(cupy-cuda12x), or place the work on device='cpu'"
    ) from exc

__all__ = ["CupyBackend"]


class _DeviceRNG:
    """A cupy ``Generator`` whose draws always happen on the device it was seeded on.

    cupy's generator keeps its state in one device's memory and refuses to draw while another
    device is current; this wrapper makes the right device current for each draw. It also adds
    ``normal``, which cupy's ``Generator`` does not have in every version.
    """

    def __init__(self, device: Any, generator: Any) -> None:
        self._device = device
        self._gen = generator

    def random(self, size: Any = None, dtype: Any = np.float64) -> Any:
        with self._device:
            return self._gen.random(size, dtype=dtype)

    def standard_normal(self, size: Any = None, dtype: Any = np.float64) -> Any:
        with self._device:
            return self._gen.standard_normal(size, dtype=dtype)

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: Any = None, dtype: Any = np.float64
    ) -> Any:
        with self._device:
            z = self._gen.standard_normal(size, dtype=dtype)
            return (z * scale + loc).astype(dtype, copy=False)

    def uniform(
        self, low: float = 0.0, high: float = 1.0, size: Any = None, dtype: Any = np.float64
    ) -> Any:
        with self._device:
            return self._gen.uniform(low, high, size, dtype=dtype)

    def integers(self, low: int, high: int | None = None, size: Any = None, **kw: Any) -> Any:
        with self._device:
            return self._gen.integers(low, high, size, **kw)

    def permutation(self, x: Any) -> Any:
        with self._device:
            return self._gen.permutation(x)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._gen, name)
        if not callable(attr):
            return attr

        def on_device(*args: Any, **kwargs: Any) -> Any:
            with self._device:
                return attr(*args, **kwargs)

        return on_device


_staging_lock = threading.Lock()
_staging_streams: dict[int, Any] = {}


@functools.cache
def _kernels(module: str) -> Any:
    # a kernels module (it imports cupy), imported on first use; cached, as an eager step asks
    # for the network kernels about ten times and an update for the optimizer's
    return importlib.import_module(f"{__package__}.{module}")


def _call(callback: Callable[[], object]) -> None:
    callback()


def _staging_stream(index: int) -> Any:
    """A stream of device ``index`` for making sources contiguous before a peer copy."""
    with _staging_lock:
        stream = _staging_streams.get(index)
        if stream is None:
            with cupy.cuda.Device(index):
                stream = _staging_streams[index] = cupy.cuda.Stream(non_blocking=True)
        return stream


def _peer_copy(x: Any, target: int) -> Any:
    """``x`` copied onto device ``target``, ordered on that device's current stream.

    The copy is ordered after the work queued so far on this thread's current stream of the
    source device (plain code, such as a forward pass outside the actors); work that wrote ``x``
    on another stream must be waited for by the caller (an actor's stream waits on the
    message's event before its compute). A contiguous source is
    copied by one ``cudaMemcpyAsync`` on that stream, reading over peer access (cupy enables it
    where the devices allow, else the driver stages through the host). ``ndarray.copy`` would
    make a strided source contiguous on the *source* device's current stream of this thread,
    which is not ordered after the producer: that step is done here on a staging stream of
    the source device chained to the target stream by events, both ways, so the temporary is
    neither read too early nor reused by the pool while the copy still reads it.
    """
    source = x.device.id
    with cupy.cuda.Device(source):
        # per device, each thread has its own current stream; the legacy default streams of two
        # devices are not ordered with each other, hence this event
        written = cupy.cuda.Event(disable_timing=True)
        written.record(cupy.cuda.get_current_stream())
    with cupy.cuda.Device(target):
        dst_stream = cupy.cuda.get_current_stream()
        dst_stream.wait_event(written)
        if x.flags.c_contiguous or x.flags.f_contiguous:
            # order="K" keeps the layout, so astype on the source device is a no-op, no kernel
            return x.copy(order="K")
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(dst_stream)
    staging = _staging_stream(source)
    with cupy.cuda.Device(source), staging:
        staging.wait_event(ready)
        packed = cupy.ascontiguousarray(x)
        made = cupy.cuda.Event(disable_timing=True)
        made.record(staging)
    with cupy.cuda.Device(target):
        dst_stream.wait_event(made)
        out = packed.copy(order="K")
        copied = cupy.cuda.Event(disable_timing=True)
        copied.record(dst_stream)
    # later work on the staging stream (where the pool may hand out `packed`'s memory again)
    # starts after the copy has read it
    staging.wait_event(copied)
    return out


class CupyBackend(Backend):
    """The backend of CUDA device ``index``, through cupy."""

    name = "cupy"
    xp = cupy

    def __init__(self, index: int = 0) -> None:
        try:
            count = int(cupy.cuda.runtime.getDeviceCount())
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise RuntimeError(
                f"cuda:{index} was asked for but CUDA reports no usable device ({exc}); "
                "check the driver (nvidia-smi) or place the work on device='cpu'"
            ) from exc
        if not 0 <= index < count:
            raise ValueError(
                f"cuda:{index} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 .. cuda:{count - 1}"
            )
        self.device = Device("cuda", index)
        self._cuda_device = cupy.cuda.Device(index)
        self._dtype_lock = threading.Lock()
        self._checked_dtypes: dict[np.dtype[Any], None] = {}
        self._notifier: Any = None

    # -- arrays ---------------------------------------------------------------------------------

    def dtype(self, dtype: Any) -> np.dtype[Any]:
        if str(dtype) == "bfloat16":
            # numpy learns the name only from ml_dtypes; cupy may still refuse the arrays
            if BFLOAT16 is None:
                raise ValueError(
                    "dtype 'bfloat16' needs the ml_dtypes package (pip install ml_dtypes) and a "
                    "cupy that supports it (14 or later); or use 'float16' or 'float32' on cupy"
                )
            dtype = BFLOAT16
        dt = super().dtype(dtype)
        if dt not in self._checked_dtypes:
            with self._dtype_lock, self._cuda_device:
                try:
                    cupy.zeros(1, dtype=dt)
                except (TypeError, ValueError, NotImplementedError) as exc:
                    raise ValueError(
                        f"cupy {cupy.__version__} has no arrays of dtype {dt}; "
                        "use 'float16' or 'float32' on a CUDA device"
                    ) from exc
                self._checked_dtypes[dt] = None
        return dt

    def rng(self, seed: int | np.random.SeedSequence) -> _DeviceRNG:
        with self._cuda_device:
            # Philox, counter-based: its state is the seed and a counter, made in about 55 µs on
            # an H200, where cupy's default XORWOW initialises a state per thread (about 580
            # µs); a run makes one per dropout module per key
            bits = cupy.random.Philox4x3210(seed)
            return _DeviceRNG(self._cuda_device, cupy.random.Generator(bits))

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        if isinstance(x, cupy.ndarray) and x.device.id != self.device.index:
            x = self.copy_to(x, self.device)
        with self._cuda_device:
            try:
                return cupy.asarray(x, dtype=dtype)
            except (TypeError, ValueError):  # (numpy's TypeError for a name, cupy's ValueError)
                if dtype is None:
                    raise
                self.dtype(dtype)  # a dtype numpy or cupy does not know: say so, and how to fix it
                raise

    def is_local(self, x: Any) -> bool:
        return isinstance(x, cupy.ndarray) and x.device.id == self.device.index

    def to_host_async(self, x: Any, out: Any = None) -> np.ndarray[Any, Any]:
        if not isinstance(x, cupy.ndarray):
            return np.asarray(x)
        shape = x.shape
        if not x.flags.c_contiguous:
            x = cupy.ascontiguousarray(x)  # (which makes a 0-d array 1-d: hence ``shape``)
        # page-locked, so that the copy runs asynchronously on the current stream
        if out is None or out.shape != shape or out.dtype != x.dtype:
            mem = cupy.cuda.alloc_pinned_memory(max(x.nbytes, 1))
            out = np.frombuffer(mem, dtype=x.dtype, count=x.size).reshape(shape)
        cupy.cuda.runtime.memcpyAsync(
            out.ctypes.data, x.data.ptr, x.nbytes, cupy.cuda.runtime.memcpyDeviceToHost,
            cupy.cuda.get_current_stream().ptr,
        )  # fmt: skip
        return out

    def to_numpy(self, x: Any) -> np.ndarray[Any, Any]:
        if isinstance(x, cupy.ndarray):
            # .get() is ordered on the *current* stream only; work queued on another stream must
            # be waited for first (DevicePool.wait on its event, or synchronize)
            return x.get()
        return np.asarray(x)

    def copy_to(self, x: Any, device: str | Device) -> Any:
        target = parse_device(device)
        if not isinstance(x, cupy.ndarray):
            return super().copy_to(x, target)
        if target.kind == "cpu":
            return x.get()
        if target.index == x.device.id:
            return x
        return _peer_copy(x, target.index)

    # -- streams and events ---------------------------------------------------------------------

    def synchronize(self) -> None:
        self._cuda_device.synchronize()

    def activate(self, stream: Any = None) -> contextlib.AbstractContextManager[Any]:
        return self._activate(stream)

    @contextlib.contextmanager
    def _activate(self, stream: Any) -> Iterator[Any]:
        with self._cuda_device:
            if stream is None:
                yield cupy.cuda.get_current_stream()
            else:
                with stream:
                    yield stream

    def new_stream(self) -> Any:
        with self._cuda_device:
            return cupy.cuda.Stream(non_blocking=True)

    def record_event(self, stream: Any = None, blocking: bool = False) -> Any:
        with self._cuda_device:
            # timing off: an event used only for ordering is cheaper to record and to query
            event = cupy.cuda.Event(block=blocking, disable_timing=True)
            event.record(stream)
            return event

    def timing_event(self, stream: Any = None) -> Any:
        with self._cuda_device:
            event = cupy.cuda.Event(block=True)  # (timing on: the default)
            event.record(stream)
            return event

    def elapsed(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(cupy.cuda.get_elapsed_time(start, end)) / 1e3

    def launch(
        self, fn: Callable[..., Any], args: tuple[Any, ...], stream: Any, after: Sequence[Any]
    ) -> tuple[Any, Any]:
        # the base class's steps without its generator-based context manager: this runs for
        # every compute of every GPU actor, several times per step
        if stream is None:
            return super().launch(fn, args, stream, after)
        with self._cuda_device, stream:
            for event in after:
                if event is not None:
                    stream.wait_event(event)
            result = fn(*args)
            event = cupy.cuda.Event(disable_timing=True)
            event.record(stream)
        return result, event

    def wait_event(self, event: Any, stream: Any = None) -> None:
        if event is None:  # produced on the CPU: already done
            return
        with self._cuda_device:
            target = stream if stream is not None else cupy.cuda.get_current_stream()
            target.wait_event(event)

    def event_done(self, event: Any) -> bool:
        return event is None or bool(event.done)

    def notify(self, event: Any, callback: Callable[[], object]) -> bool:
        # A host function on a stream of its own, queued behind the event: the driver runs it
        # as soon as the event completes, where polling from the event loop would sleep in
        # whole milliseconds (the resolution of epoll's timeout). Non-blocking, so the legacy
        # default stream never waits behind it.
        with self._cuda_device:
            if self._notifier is None:
                self._notifier = cupy.cuda.Stream(non_blocking=True)
            self._notifier.wait_event(event)
            self._notifier.launch_host_func(_call, callback)
        return True

    def fused_kernels(self) -> Any:
        return _kernels("_fused")

    def fused_nn_kernels(self) -> Any:
        return _kernels("_fused_nn")

    def memory_pool(self) -> tuple[int, int]:
        with self._cuda_device:
            pool = cupy.get_default_memory_pool()
            return int(pool.used_bytes()), int(pool.total_bytes())
