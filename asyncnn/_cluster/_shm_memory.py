"""The shared memory under :class:`~asyncnn._cluster._shm.ShmConnection`: its sizes and
limits, the ``memfd`` regions (made here, opened by the peer through ``/proc``), one direction's
ring and slabs (:class:`Channel` on the sending side, ``_Incoming`` on the receiving side), the
fence, the copy of large tensors over threads, and when a receiver may spin. ``_shm.py``
describes the layout and the protocol.
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np

from ._wire import (
    ProtocolError,
)

__all__ = [
    "Channel",
    "DEFAULT_SLAB_BYTES",
    "ENV",
    "MAX_RING_BYTES",
    "RING_BYTES",
    "SPIN_ENV",
    "boot_id",
    "enabled",
    "open_peer",
    "spin_seconds",
    "supported",
]

#: the environment variable that turns shared memory on ("1") or off ("0") in a process whose
#: caller did not say (``LocalCluster`` sets it for its workers)
ENV = "ASYNCNN_SHM"
#: bytes of records in each direction's ring
RING_BYTES = 1 << 20
#: the largest ring a peer may announce
MAX_RING_BYTES = 64 << 20
#: a message whose tensors total at most this many bytes travels inside the ring
INLINE_BYTES = 1 << 16
#: the most slab bytes one direction of a connection keeps (more waits for none: it goes by TCP)
DEFAULT_SLAB_BYTES = 1 << 30
#: slabs per direction at most
MAX_SLABS = 64
#: the environment variable that sets the longest a receiver spins before it sleeps on the
#: socket, in µs (read by :func:`spin_seconds` as each connection is set up, never at import:
#: a typo in it must not break ``import asyncnn`` for programs that use no cluster)
SPIN_ENV = "ASYNCNN_SHM_SPIN_US"
#: the spin without :data:`SPIN_ENV`, in µs
DEFAULT_SPIN_US = 200.0
#: the longest spin :data:`SPIN_ENV` may ask for, in µs: a spin holds the event loop, and a
#: receiver asleep on the socket wakes within about 100 µs (far less than this)
MAX_SPIN_US = 10_000.0
#: how much longer a receiver spins when its last send woke the peer (the answer comes after
#: the peer's wake-up: about 100 µs on a 2-core VM)
LONG_SPIN_FACTOR = 4
#: the longest a closing sender waits for its peer to map the slabs it announced last
LINGER_SECONDS = 2.0
#: copies at least this large run in threads (numpy releases the GIL), keeping the loop free;
#: a copy of at least this many bytes of tensors into a slab holds the pulse (:data:`PULSE`)
THREAD_COPY_BYTES = 8 << 20
#: seconds between two ticks of the pulse
PULSE_SECONDS = 0.1

_CTRL = 4096  # the control page
# u64 word indices: write position, read position, receiver asleep, when the last record was
# published (a float: ``time.perf_counter()``, CLOCK_MONOTONIC, the same in every process), and
# the sender's pulse (ticked while the sending process is in a long step of a send: see _Pulse)
_W, _R, _S, _T, _P = 0, 8, 16, 24, 32
_REL = 64  # u64 word index of slab 0's released generation
_PREFIX = struct.Struct("<IIIIQ")  # record length, kind, header length, slab, generation
_ALIGN = 64  # tensors in a slab start on cache lines

# record kinds
_INLINE, _SLAB, _SOCKET, _NEWSLAB, _WRAP, _DROP = 1, 2, 3, 4, 5, 6
_KINDS = {_INLINE, _SLAB, _SOCKET, _NEWSLAB, _WRAP, _DROP}
_NEWSLAB_BODY = struct.Struct("<QQ")  # fd, size
_WAKE = b"\x00"
_MEMFD_PREFIX = "asyncnn"


def spin_seconds() -> float:
    """The longest a receiver spins before it sleeps on the socket, in seconds: :data:`SPIN_ENV`
    (microseconds; unset or empty: :data:`DEFAULT_SPIN_US`; 0: never spin).

    Raises:
        ValueError: :data:`SPIN_ENV` is not a number of microseconds from 0 to
            :data:`MAX_SPIN_US` (``200us``, ``-50``, ``inf`` and ``nan`` are refused).
    """
    raw = os.environ.get(SPIN_ENV, "")
    if not raw.strip():
        return DEFAULT_SPIN_US * 1e-6
    try:
        us = float(raw)
    except ValueError:
        us = math.nan
    if not 0 <= us <= MAX_SPIN_US:  # (NaN fails it too)
        raise ValueError(
            f"{SPIN_ENV} must be a number of microseconds from 0 to {MAX_SPIN_US:g} (how long a "
            f"shared-memory receiver spins before it sleeps; default {DEFAULT_SPIN_US:g}, 0 "
            f"never spins), got {raw!r}: set it to a plain number such as 200, or unset it"
        )
    return us * 1e-6


def supported() -> bool:
    """Whether this process can use shared-memory connections: Linux (``memfd_create``, peers
    opened through ``/proc``) on x86-64, whose memory ordering the wake-up protocol relies on."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "memfd_create")
        and platform.machine().lower() in ("x86_64", "amd64")
    )


def enabled(choice: bool | None = None) -> bool:
    """Whether to offer shared memory on a new connection: ``choice`` if given, else the
    :data:`ENV` environment variable (off when unset); never where it is not :func:`supported`."""
    if choice is None:
        choice = os.environ.get(ENV, "0") == "1"
    return bool(choice) and supported()


def boot_id() -> str:
    """This host's boot id: two processes that read the same one share a kernel (one host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _fence() -> None:
    # acquiring a lock executes a locked instruction (a compare-and-swap): a full memory barrier
    # on x86-64, which orders this thread's store of a flag before its load of the other side's
    # position. A fresh lock each time: an interrupt between two calls cannot leave one held.
    threading.Lock().acquire()


def _align(n: int, to: int = 8) -> int:
    return (n + to - 1) // to * to


def _map(fd: int, size: int, populate: bool = True) -> mmap.mmap:
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _create(what: str, size: int, populate: bool = True) -> tuple[int, mmap.mmap]:
    """A new memfd of ``size`` bytes, its pages allocated, and its mapping (with its page
    table filled where ``populate``: see :meth:`ShmConnection._slab_for` for when not)."""
    fd = os.memfd_create(f"{_MEMFD_PREFIX}-{what}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        # the pages now, or an error now (ENOSPC, ENOMEM): never a SIGBUS at first touch
        os.posix_fallocate(fd, 0, size)
        return fd, _map(fd, size, populate)
    except BaseException:
        os.close(fd)
        raise


def open_peer(pid: int, fd: int, size: int, what: str, populate: bool = True) -> mmap.mmap:
    """Maps ``size`` bytes of the memory another process of this host holds as ``fd`` (its page
    table filled at once where ``populate``; else as its pages are first read).

    Raises:
        ProtocolError: ``fd`` of process ``pid`` is not an asyncnn memfd at least ``size``
            bytes long (the field named in the message), or cannot be opened.
    """
    path = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(path)
        if not target.startswith(f"/memfd:{_MEMFD_PREFIX}-"):
            raise ProtocolError(
                f"the {what} (field 'fd' = {fd} of pid {pid}) is {target!r}, not asyncnn "
                "shared memory"
            )
        own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"cannot open the {what} at {path}: {exc}") from exc
    try:
        have = os.fstat(own).st_size
        if have < size:
            raise ProtocolError(f"the {what} claims 'size' = {size:,} bytes but has only {have:,}")
        return _map(own, size, populate)
    finally:
        os.close(own)  # the mapping keeps the memory


class Channel:
    """This process's sending side of one direction: its ring and slabs (all memfds it made).

    Args:
        ring_bytes: bytes of records in the ring.
    """

    def __init__(self, ring_bytes: int = RING_BYTES) -> None:
        self.ring_bytes = ring_bytes
        self.fd, self.mm = _create("ring", _CTRL + ring_bytes)
        self.words = memoryview(self.mm).cast("B")[:_CTRL].cast("Q")
        self.stamps = memoryview(self.mm).cast("B")[:_CTRL].cast("d")
        self.data = memoryview(self.mm).cast("B")[_CTRL:]
        self.pos = 0  # what this side has written (a copy of words[_W])
        PULSE.channels.add(self)
        #: slab number -> [fd, mapping, byte view, size, generation last sent]
        self.slabs: dict[int, list[Any]] = {}
        self.slab_total = 0
        #: fds of dropped slabs, with the position the receiver must read past (it may still
        #: have to open them) before they are closed
        self.graves: list[tuple[int, int]] = []
        #: the position just past the last slab announcement (the receiver opens a slab when
        #: it reads its announcement: until then this process must hold the slab's fd)
        self.announced = 0

    def bury(self) -> None:
        """Closes the fds of dropped slabs that the receiver can no longer need."""
        if self.graves:
            read = self.words[_R]
            keep = []
            for pos, fd in self.graves:
                if pos <= read:
                    os.close(fd)
                else:
                    keep.append((pos, fd))
            self.graves = keep

    def tick(self) -> None:
        """Ticks the pulse word (the pulse's thread; nothing once the channel is closed)."""
        try:
            self.words[_P] = (self.words[_P] + 1) & 0xFFFF_FFFF_FFFF_FFFF
        except (ValueError, IndexError):  # its views were released: closed
            pass

    def describe(self) -> dict[str, int]:
        """What the peer needs to map the ring."""
        return {"pid": os.getpid(), "fd": self.fd, "ring": self.ring_bytes}

    def close(self) -> None:
        """Closes the memfds and unmaps them now (idempotent): this side's memory is gone
        unless the peer still maps it. Only a slab whose bytes a send copies in at this moment
        (a send cut short by a cancel) stays mapped, until that copy lets go of it."""
        PULSE.channels.discard(self)
        fds = [self.fd, *(s[0] for s in self.slabs.values()), *(fd for _, fd in self.graves)]
        self.graves = []
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = -1
        _unmap(self.mm, [self.words, self.stamps, self.data])
        for slab in self.slabs.values():
            _unmap(slab[1], [slab[2]])
        self.slabs.clear()


class _Pulse:
    """While a send of this process is in a long local step (making a large slab, copying a
    large tensor in), a thread ticks the pulse word of every channel this process sends on,
    every :data:`PULSE_SECONDS`.

    Such a step sends no bytes for up to seconds (a fresh 1 GiB slab: 0.8 to 3.8 s to allocate
    and map on the 2-core VM), the heartbeats wait behind the send (or for the event loop the
    step holds), and the peer's watchdog (the driver's) would take the process for hung. The
    pulse says it is alive and delivering; a stopped process (SIGSTOP) stops ticking, as its
    threads stop. The thread runs only while a send holds the pulse (it leaves one tick after
    the last lets go), which it does only around such work of its own, never while it waits
    for the peer (room in the ring, a socket write): a peer that stops reading must not look
    alive through the sender's pulse, whose watchdog then caught it never.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._thread: threading.Thread | None = None
        #: the channels whose words are ticked: every open one of this process
        self.channels: weakref.WeakSet[Channel] = weakref.WeakSet()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Within the block, the channels' pulse words tick."""
        with self._lock:
            self._holders += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="asyncnn-shm-pulse", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._holders:
                    self._thread = None
                    return
            try:
                channels = list(self.channels)
            except RuntimeError:  # changed by another thread meanwhile: next time
                channels = []
            for channel in channels:
                channel.tick()
            time.sleep(PULSE_SECONDS)


#: the pulse of this process's channels (see :class:`_Pulse`)
PULSE = _Pulse()


class _Incoming:
    """This process's receiving side of one direction: the peer's ring and slabs, mapped."""

    def __init__(self, pid: int, fd: int, ring_bytes: int) -> None:
        self.pid = pid
        self.ring_bytes = ring_bytes
        mm = open_peer(pid, fd, _CTRL + ring_bytes, "peer's ring")
        self.words = memoryview(mm).cast("B")[:_CTRL].cast("Q")
        self.stamps = memoryview(mm).cast("B")[:_CTRL].cast("d")
        self.data = memoryview(mm).cast("B")[_CTRL:]
        self.pos = 0  # what this side has read (a copy of words[_R])
        self.mm = mm
        #: slab number -> (byte view of the mapping, size); the mapping is the view's ``obj``
        self.slabs: dict[int, tuple[memoryview, int]] = {}

    def close(self) -> None:
        """Unmaps the peer's ring now, and each of its slabs that no received array views (the
        others go with the last array viewing them). Idempotent."""
        _unmap(self.mm, [self.words, self.stamps, self.data])
        for view, _ in self.slabs.values():
            _unmap(view.obj, [view])  # type: ignore[arg-type]  # (an mmap: see open_slab)
        self.slabs.clear()


def _unmap(mm: mmap.mmap, views: list[memoryview[Any]]) -> None:
    """Releases ``views`` of ``mm`` and unmaps it (closing the descriptor the mapping holds),
    unless arrays still view it: then it goes with the last of them (unmapping memory that an
    array reads would crash the process; Python refuses it)."""
    try:
        for v in views:
            v.release()
        mm.close()
    except BufferError:
        pass


def _release(words: memoryview, index: int, generation: int) -> None:
    # runs when the last array of a message read from slab ``index`` is gone
    try:
        words[_REL + index] = generation
    except (ValueError, IndexError):  # the connection's views were released already
        pass


async def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """Copies a large buffer in threads (numpy releases the GIL), in up to one piece per core
    (at most 4, of 4 MB at least): one core copies about 13 GB/s on the 2-core VM, two about 18."""
    n = src.nbytes
    parts = max(1, min(_CORES, 4, n // (4 << 20)))
    step = _align(-(-n // parts), _ALIGN)

    async def piece(a: int, b: int) -> None:
        await anyio.to_thread.run_sync(np.copyto, dst[a:b], src[a:b])

    async with anyio.create_task_group() as tg:
        for a in range(0, n, step):
            tg.start_soon(piece, a, min(n, a + step))


def _layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    offsets = []
    at = 0
    for n in sizes:
        offsets.append(at)
        at = _align(at + n, _ALIGN)
    return offsets, at


_CORES = os.cpu_count() or 1
_runnable = [0.0, 0]  # when /proc/loadavg was last read, and its count of runnable tasks


def _cores_free() -> bool:
    """Whether this host has no more runnable tasks than cores (read from ``/proc/loadavg``
    at most every 10 ms): spinning on an oversubscribed host takes the core that the peer
    needs to answer."""
    now = time.monotonic()
    if now - _runnable[0] > 0.01:
        _runnable[0] = now
        try:
            with open("/proc/loadavg", "rb") as f:
                _runnable[1] = int(f.read().split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            _runnable[1] = 0
    return _runnable[1] <= _CORES


def _others_runnable() -> bool:
    """Whether another task of this event loop could run now (then a receiver does not spin)."""
    try:
        import sniffio

        lib = sniffio.current_async_library()
    except Exception:  # noqa: BLE001 - unknown: be polite
        return True
    if lib == "trio":
        import trio

        stats = trio.lowlevel.current_statistics()
        # a thread's result (the pool's) comes through the run_sync_soon queue
        return stats.tasks_runnable > 0 or stats.run_sync_soon_queue_size > 0
    if lib == "asyncio":
        import asyncio

        ready = getattr(asyncio.get_running_loop(), "_ready", None)
        return ready is None or len(ready) > 0
    return True
