"""Frames through shared memory, for processes on one host (``LocalCluster``'s workers).

A :class:`ShmConnection` is a :class:`~asyncnn._cluster._wire.Connection` whose frames travel
through memory both processes map; its TCP socket stays, for three things only: waking a receiver
that sleeps, telling either side that the other is gone (end of stream), and carrying the rare
frame that does not fit the shared memory (a header over half the ring, or tensors beyond the
slab budget).

Each direction of a connection has, made by its sending side:

* a **ring** (one ``memfd``): a control page, then ``RING_BYTES`` of records. The control page
  holds the sender's write position, the receiver's read position, the receiver's "asleep" flag,
  the sender's pulse (ticked while the sending process is in a long step of a send, such as
  making a large slab: a sign of life for the peer's watchdog) and one released-generation
  word per slab, each word written by one side only. A record is a
  24-byte prefix (length, kind, header length, slab, generation), the msgpack header (the same
  header as a TCP frame's, with the buffer sizes under ``"n"``) and, for a small message, its
  tensors' bytes, which the receiver copies out at once (so the record is free as soon as it
  is read);
* **slabs** (one ``memfd`` each, up to ``slab_bytes`` in all): a message whose tensors exceed
  ``INLINE_BYTES`` is written once into a free slab and read in place: the receiver's arrays
  are views of the slab, and when the last of them is gone the receiver writes the slab's
  generation to the control page, which frees it for the sender's next message.

Nothing has a name in ``/dev/shm``: the memory is anonymous (``memfd_create``) and the peer opens
it through ``/proc/<pid>/fd/<fd>`` during the handshake (or when a slab is first announced), so it
is freed by the kernel when the last process holding it exits or unmaps it, however it ends
(a SIGKILL included).

How a receiver learns of a record: it reads the write position. When nothing is there it first
spins briefly (at most ``ASYNCNN_SHM_SPIN_US`` µs, read by ``spin_seconds`` as the connection
is set up; only while no other task of its event loop is runnable, and only while spinning
pays off often enough: each record carries the time it was published, so a receiver that
slept learns whether a spin would likely have caught it), then sets its "asleep" flag and
waits for the socket to become readable; a sender that finds the flag set sends one zero byte
on the socket. A missed wake-up (the two sides' flag and position stores crossing) is
prevented by a full fence on x86-64 (acquiring a lock executes a locked instruction), which is
why other machines use TCP.

Everything a peer writes (positions, lengths, kinds, slab numbers and sizes, headers) is checked
before it is used; a peer that writes garbage gets a :class:`~asyncnn._cluster._wire.ProtocolError`
naming the field.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import msgpack
import numpy as np

from ._shm_memory import (
    _DROP,
    _INLINE,
    _NEWSLAB,
    _NEWSLAB_BODY,
    _P,
    _PREFIX,
    _R,
    _REL,
    _S,
    _SLAB,
    _SOCKET,
    _T,
    _W,
    _WAKE,
    _WRAP,
    DEFAULT_SLAB_BYTES,
    ENV,
    INLINE_BYTES,
    LINGER_SECONDS,
    MAX_RING_BYTES,
    MAX_SLABS,
    PULSE,
    RING_BYTES,
    SPIN_ENV,
    THREAD_COPY_BYTES,
    Channel,
    _align,
    _copy,
    _create,
    _fence,
    _Incoming,
    _layout,
    boot_id,
    enabled,
    spin_seconds,
    supported,
)
from ._shm_read import ShmReading
from ._wire import _byte_view, frame_parts, send_waits

__all__ = [
    "DEFAULT_SLAB_BYTES",
    "ENV",
    "MAX_RING_BYTES",
    "RING_BYTES",
    "SPIN_ENV",
    "Channel",
    "ShmConnection",
    "boot_id",
    "enabled",
    "spin_seconds",
    "supported",
]


class ShmConnection(ShmReading):
    """A :class:`Connection` whose frames go through shared memory (see the module's notes);
    made by :func:`~asyncnn._cluster._handshake.connect` / :func:`~asyncnn._cluster._handshake.accept`
    when both ends offer it and share a host.

    Args:
        sock: the connected, authenticated socket (wake-ups, end of stream, oversized frames).
        peer: who is at the other end, for error messages.
        max_message_bytes: the most tensor bytes one message may carry, either way.
        out: this side's sending channel.
        peer_ring: the peer's ring: ``{"pid", "fd", "ring"}``.
        slab_bytes: the most slab bytes this side keeps for its messages.

    Raises:
        ValueError: ``ASYNCNN_SHM_SPIN_US`` is malformed (see :func:`spin_seconds`).
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        max_message_bytes: int,
        out: Channel,
        peer_ring: dict[str, int],
        slab_bytes: int = DEFAULT_SLAB_BYTES,
    ) -> None:
        spin = spin_seconds()  # (before anything is held: a malformed setting fails here)
        super().__init__(sock, peer, max_message_bytes)
        self._spin = spin
        self.out = out
        self.inc = _Incoming(peer_ring["pid"], peer_ring["fd"], peer_ring["ring"])
        self.slab_bytes = slab_bytes
        #: a moving average of how often spinning catches (or would catch) the next record
        self._hits = 1.0
        #: whether this side's last record woke the peer, and a moving average of how often
        #: the long spins that follow paid off
        self._woke = False
        self._long = 1.0
        #: a moving average of how often waiting for a busy slab ended with it free
        self._reuse = 1.0
        self._eof = False
        self._broken: str | None = None
        #: messages sent through the ring, through slabs, and over the socket
        self.counts = {"inline": 0, "slab": 0, "socket": 0}

    # -- sending -----------------------------------------------------------------------------------
    async def send(
        self,
        header: dict[str, Any],
        buffers: Sequence[Any] = (),
        then: Callable[[], None] | None = None,
    ) -> None:
        """Sends one frame (see :meth:`Connection.send`): small ones straight into the ring,
        without waiting for anything when the ring has room and no other send is under way."""
        if self.closed:
            raise ConnectionError(f"the connection to {self.peer} is closed")
        views = [_byte_view(b) for b in buffers]
        sizes = [v.nbytes for v in views]
        total = sum(sizes)
        self._check_size(header, total)
        if total <= INLINE_BYTES and not self._lock.locked() and not self._rest:
            packed = msgpack.packb({**header, "n": sizes}, use_bin_type=True)
            length = _align(_PREFIX.size + len(packed) + total)
            if length <= self.out.ring_bytes // 2 and self._room(length):
                self._put_inline(packed, views, length)
                self.counts["inline"] += 1
                if then is not None:
                    then()
                return
        if self._lock.locked():
            send_waits()
        async with self._lock:
            await self._send_slow(header, views, sizes, total)
            if then is not None:
                then()

    def sent_progress(self) -> int:
        """A count that grows while this side delivers a frame: :attr:`bytes_sent`, and the
        ticks of the pulse while a send is in a long step (a large slab being made)."""
        if self.closed:
            return self.bytes_sent
        try:
            return self.bytes_sent + int(self.out.words[_P])
        except (ValueError, IndexError):  # closed meanwhile
            return self.bytes_sent

    def _room(self, length: int) -> bool:
        """Whether a record of ``length`` bytes fits now (counting the skip to the ring's start)."""
        out = self.out
        at = out.pos % out.ring_bytes
        need = length + (out.ring_bytes - at if at + length > out.ring_bytes else 0)
        return out.pos + need - out.words[_R] <= out.ring_bytes

    async def _wait_room(self, length: int) -> None:
        if not self.closed and not self._room(length):
            send_waits()
        delay = 50e-6
        # closed while a send awaited (its ring is unmapped): _check_alive says so
        while self.closed or not self._room(length):
            self._check_alive()
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.005)

    def _check_alive(self) -> None:
        if self.closed:
            raise ConnectionError(f"the connection to {self.peer} is closed")
        try:
            if self.sock.recv(1, socket.MSG_PEEK) == b"":
                raise ConnectionError(f"{self.peer} closed the connection")
        except BlockingIOError:
            pass
        except OSError as exc:
            raise ConnectionError(f"{self.peer} is gone: {exc}") from exc

    def _record(self, length: int) -> int:
        """Where a record of ``length`` bytes starts (the caller checked there is room); a
        record never wraps: the rest of the ring is skipped first."""
        out = self.out
        at = out.pos % out.ring_bytes
        if at + length > out.ring_bytes:
            rest = out.ring_bytes - at
            if rest >= _PREFIX.size:
                _PREFIX.pack_into(out.data, at, rest, _WRAP, 0, 0, 0)
            out.pos += rest
            at = 0
        return at

    def _publish(self, length: int) -> None:
        out = self.out
        out.stamps[_T] = time.perf_counter()
        out.pos += length
        out.words[_W] = out.pos
        _fence()
        if out.words[_S]:
            out.words[_S] = 0
            self._wake()
            self._woke = True

    def _wake(self) -> None:
        try:
            self.sock.send(_WAKE)
        except BlockingIOError:
            pass  # the socket holds unread wake bytes: the receiver wakes anyway
        except OSError:
            pass  # the peer is gone; its reader learns that from the socket
        else:
            self.bytes_sent += 1

    def _put_inline(self, packed: bytes, views: list[memoryview], length: int) -> None:
        data = self.out.data
        at = self._record(length)
        _PREFIX.pack_into(data, at, length, _INLINE, len(packed), 0, 0)
        o = at + _PREFIX.size
        data[o : o + len(packed)] = packed
        o += len(packed)
        for v in views:
            n = v.nbytes
            data[o : o + n] = v
            o += n
        self.bytes_sent += length
        self._publish(length)

    def _put_control(self, kind: int, body: bytes, slab: int = 0, gen: int = 0) -> None:
        """Writes a record without tensors (the caller waited for room)."""
        length = _align(_PREFIX.size + len(body))
        at = self._record(length)
        _PREFIX.pack_into(self.out.data, at, length, kind, len(body), slab, gen)
        self.out.data[at + _PREFIX.size : at + _PREFIX.size + len(body)] = body
        self._publish(length)

    async def _send_slow(
        self, header: dict[str, Any], views: list[memoryview], sizes: list[int], total: int
    ) -> None:
        if self._rest:  # the rest of a frame over the socket, cut short: it goes first
            await self._send_parts(self._rest)
        packed = msgpack.packb({**header, "n": sizes}, use_bin_type=True)
        if total <= INLINE_BYTES:
            length = _align(_PREFIX.size + len(packed) + total)
            if length <= self.out.ring_bytes // 2:
                await self._wait_room(length)
                self._put_inline(packed, views, length)
                self.counts["inline"] += 1
                return
        else:
            length = _align(_PREFIX.size + len(packed))
            if length <= self.out.ring_bytes // 2:
                offsets, span = _layout(sizes)
                index = await self._slab_for(span)
                if index is not None:
                    await self._put_slab(index, packed, views, offsets, length)
                    self.counts["slab"] += 1
                    return
        # too large for the ring, or beyond the slab budget: the frame goes over the socket,
        # announced in the ring so that it keeps its place among the messages
        parts = frame_parts(header, views)
        await self._wait_room(_PREFIX.size)
        # announced, the frame must go whole, though this send be cancelled before its first
        # byte (the socket full): the peer waits for it, and would never read what follows
        # (the error report of a failed run); the next send sends it first
        self._put_control(_SOCKET, b"")
        self._rest = parts
        self.counts["socket"] += 1
        await self._send_parts(parts)

    async def _slab_for(self, span: int) -> int | None:
        """A free slab of at least ``span`` bytes (made if need be), or None when the budget
        does not allow one."""
        out = self.out
        out.bury()
        free = [
            (s[3], i) for i, s in out.slabs.items() if out.words[_REL + i] == s[4] and s[3] >= span
        ]
        if free:
            return min(free)[1]
        busy = [i for i, s in out.slabs.items() if s[3] >= span]
        if busy and self._reuse >= 0.25:
            # a new slab costs about three copies (the kernel zeroes and maps its pages); a
            # receiver done with its last message frees a slab within microseconds: wait for
            # that for half a copy's time (at ~10 GB/s), or for a receiver's wake-up through
            # the socket (about 100 µs), whichever is longer
            clock = time.perf_counter
            deadline = clock() + max(300e-6, span / 20e9)
            while clock() < deadline:
                await anyio.lowlevel.checkpoint()
                if self.closed:  # meanwhile: its slabs are unmapped
                    raise ConnectionError(f"the connection to {self.peer} is closed")
                for i in busy:
                    s = out.slabs.get(i)
                    if s is not None and out.words[_REL + i] == s[4]:
                        self._reuse = 0.8 * self._reuse + 0.2
                        return i
            self._reuse *= 0.8
        size = max(1 << 20, 1 << (span - 1).bit_length())
        if size > self.slab_bytes:
            return None
        # room in the budget: drop free slabs (smallest first) until the new one fits
        if out.slab_total + size > self.slab_bytes:
            for _, i in sorted((s[3], i) for i, s in out.slabs.items()
                               if out.words[_REL + i] == s[4]):  # fmt: skip
                await self._drop_slab(i)
                if out.slab_total + size <= self.slab_bytes:
                    break
        if out.slab_total + size > self.slab_bytes:
            return None
        index = next((i for i in range(MAX_SLABS) if i not in out.slabs), None)
        if index is None:
            return None
        announce = _align(_PREFIX.size + _NEWSLAB_BODY.size)
        await self._wait_room(announce)
        # from here on no await until the slab is announced: a cancelled send cannot leave a
        # slab the receiver never heard of
        try:
            # A large slab's page table is filled as its tensors are copied in, by the
            # threads that copy them, not by the mapping call: that holds the GIL (Python
            # 3.11) for 0.4 to 1.3 s for 1 GiB on the 2-core VM, which stopped this process's
            # pulse (PULSE) and its other threads, and fills pages the message may not use
            # (a 576 MB message in a fresh 1 GiB slab: 0.36-0.52 s made and copied in lazily,
            # 0.7-1.7 s populated)
            # (this process's channels pulse meanwhile, so that its peers see it alive: only
            # during this work of its own, never while it waits for the peer, whose stop the
            # pulse would hide)
            with PULSE.held():
                fd, mm = _create(f"slab{index}", size, populate=size < THREAD_COPY_BYTES)
        except OSError:
            return None  # out of memory for it: this message goes by TCP
        # a new slab's generation continues from what the receiver last released for the number
        gen = int(out.words[_REL + index])
        out.slabs[index] = [fd, mm, memoryview(mm).cast("B"), size, gen]
        out.slab_total += size
        self._put_control(_NEWSLAB, _NEWSLAB_BODY.pack(fd, size), index, gen)
        out.announced = out.pos
        return index

    async def _drop_slab(self, index: int) -> None:
        out = self.out
        await self._wait_room(_PREFIX.size)
        fd, _, _, size, gen = out.slabs.pop(index)
        out.slab_total -= size
        self._put_control(_DROP, b"", index, gen)
        out.graves.append((out.pos, fd))

    async def _put_slab(
        self,
        index: int,
        packed: bytes,
        views: list[memoryview],
        offsets: list[int],
        length: int,
    ) -> None:
        slab = self.out.slabs[index]
        view = slab[2]
        for v, o in zip(views, offsets, strict=True):
            n = v.nbytes
            if n >= THREAD_COPY_BYTES:
                with PULSE.held():  # (a copy of this process's own: a second or more for 1 GB)
                    await _copy(np.frombuffer(view, np.uint8, n, o), np.frombuffer(v, np.uint8))
            else:
                view[o : o + n] = v
            self.bytes_sent += n  # progress a long copy shows (the driver watches a share's)
        await self._wait_room(length)
        slab[4] += 1  # busy from here: no await until the record is out
        at = self._record(length)
        _PREFIX.pack_into(self.out.data, at, length, _SLAB, len(packed), index, slab[4])
        o = at + _PREFIX.size
        self.out.data[o : o + len(packed)] = packed
        self.bytes_sent += length
        self._publish(length)

    def send_sync(self, header: dict[str, Any]) -> None:
        """Sends a header-only frame without an event loop, best effort (the shutdown notice)."""
        packed = msgpack.packb({**header, "n": []}, use_bin_type=True)
        length = _align(_PREFIX.size + len(packed))
        if self.closed or not self._room(length) or self._lock.locked() or self._rest:
            return  # (a frame cut short: its rest on the socket must not take the wake byte)
        self._put_inline(packed, [], length)
        # the receiver may sleep on the socket: the wake byte must go even if the flag is unset
        self._wake()

    def close(self) -> None:
        """Closes the socket, closes and unmaps this side's memfds and unmaps the peer's
        (idempotent): the memory and descriptors go now, not when the connection object is
        collected, except the peer's slabs that received arrays still view (they go with the
        last of those arrays).

        A slab announced but not yet opened by the peer (its last message, say an error
        report, sent just before this process exits) can only be opened while this process
        holds it: closing waits for the peer to read that far, at most ``LINGER_SECONDS``, and
        not at all once the peer is gone."""
        if not self.closed:
            deadline = time.monotonic() + LINGER_SECONDS
            while self.out.words[_R] < self.out.announced and time.monotonic() < deadline:
                try:
                    self._check_alive()
                except ConnectionError:
                    break
                time.sleep(0.002)
            super().close()  # (the socket, the peer's ring and slabs)
            self.out.close()
