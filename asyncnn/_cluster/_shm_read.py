"""The receiving half of a :class:`~asyncnn._cluster._shm.ShmConnection`: reading records from
the peer's ring (copying small messages out, viewing slabs in place), and waiting for the next
record by spinning briefly, then sleeping on the socket (see ``_shm``'s notes).
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import msgpack
import numpy as np

from ._shm_memory import (
    _DROP,
    _INLINE,
    _KINDS,
    _NEWSLAB,
    _NEWSLAB_BODY,
    _P,
    _PREFIX,
    _R,
    _S,
    _SLAB,
    _SOCKET,
    _T,
    _W,
    _WRAP,
    LONG_SPIN_FACTOR,
    MAX_SLABS,
    THREAD_COPY_BYTES,
    _cores_free,
    _fence,
    _Incoming,
    _layout,
    _others_runnable,
    _release,
    open_peer,
)
from ._wire import MAX_HEADER_BYTES, Connection, ProtocolError

__all__ = ["ShmReading"]

#: the connections of this process whose reader sleeps on its socket (a spinning reader of
#: another connection watches their rings too, and stops spinning when one has a record)
_sleeping: weakref.WeakSet[ShmReading] = weakref.WeakSet()


class ShmReading(Connection):
    """The receiving half of a shared-memory connection; :class:`ShmConnection` sets the
    attributes declared here and adds the sending half."""

    #: the peer's ring
    inc: _Incoming
    #: the most slab bytes this side keeps for its messages
    slab_bytes: int
    #: a moving average of how often spinning catches (or would catch) the next record
    _hits: float
    #: whether this side's last record woke the peer, and a moving average of how often the
    #: long spins that follow paid off
    _woke: bool
    _long: float
    _eof: bool
    _broken: str | None
    #: the longest a wait spins before it sleeps on the socket, in seconds (``spin_seconds``)
    _spin: float

    def received_progress(self, peek: bool = True) -> int:
        """A count that grows while the peer delivers (see :meth:`Connection.received_progress`):
        bytes on the socket, and the peer's write position and pulse, which its records and
        its long steps of a send (a large slab being made) move before this side reads them."""
        n = super().received_progress(peek)
        if self.closed:
            return n
        try:
            return n + int(self.inc.words[_W]) + int(self.inc.words[_P])
        except (ValueError, IndexError):  # closed meanwhile
            return n

    def close(self) -> None:
        """Closes the socket and unmaps the peer's ring and slabs (see
        :meth:`ShmConnection.close`)."""
        super().close()
        _sleeping.discard(self)  # other readers' spins must not look at its ring any more
        self.inc.close()

    async def receive(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Receives one frame (see :meth:`Connection.receive`).

        Raises:
            EOFError: the peer closed the connection and everything it sent was read.
            ProtocolError: the peer wrote something malformed or beyond the limits.
        """
        if self._broken is not None:
            raise ProtocolError(self._broken)
        inc = self.inc
        while True:
            if self.closed:  # its mappings are gone (close unmaps them)
                raise ConnectionError(f"the connection to {self.peer} is closed")
            if inc.words[_W] != inc.pos:
                got = await self._take()
                if got is not None:
                    return got
                continue
            await self._wait()

    async def discard(self) -> None:
        """Reads and drops everything the peer sends until it closes the connection (see
        :meth:`Connection.discard`): the ring's records, the slabs they name (given back, which
        frees them for the peer's next messages) and the socket's bytes, raw.

        Nothing is parsed as a frame: a receive cut short in the middle of a frame over the
        socket (one that did not fit the slabs, routine once many large messages are in
        flight) leaves the rest of its bytes there with no record announcing them, which
        stopped a discard that read frames (the worker then took the driver for gone, exited,
        and the driver's send to it failed: "worker 0 died" instead of the actor's error).

        Raises:
            EOFError, ConnectionError: the peer closed the connection, or it broke.
        """
        inc = self.inc
        self._rstart = self._rend = 0
        while True:
            if self.closed:  # its mappings are gone (close unmaps them)
                raise ConnectionError(f"the connection to {self.peer} is closed")
            self._skip_records()
            inc.words[_S] = 1  # asleep: a record published from here on sends a wake byte
            try:
                _fence()
                if inc.words[_W] != inc.pos:
                    continue
                await anyio.wait_readable(self.sock)
            finally:
                if not self.closed:
                    inc.words[_S] = 0
            if self.closed:
                raise ConnectionError(f"the connection to {self.peer} is closed")
            try:
                n = self.sock.recv_into(self._rview)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ConnectionError(f"receiving from {self.peer} failed: {exc}") from exc
            if n == 0:
                raise EOFError(f"{self.peer} closed the connection")
            self._arrived += n  # (progress the quiet watch of Worker._after_failure sees)

    def _skip_records(self) -> None:
        """Drops the records the ring holds, giving back the slab of each message in one: what
        a reader that took them and let them go would do, without reading a header. A record
        that does not make sense skips the rest of the ring."""
        inc = self.inc
        written = int(inc.words[_W])
        while inc.pos != written:
            ahead = written - inc.pos
            at = inc.pos % inc.ring_bytes
            rest = inc.ring_bytes - at
            if ahead < 0 or ahead > inc.ring_bytes:
                self._advance(ahead)
                return
            if rest < _PREFIX.size:
                self._advance(min(rest, ahead))
                continue
            length, kind, _, slab, gen = _PREFIX.unpack_from(inc.data, at)
            if length < _PREFIX.size or length > min(rest, ahead) or length % 8:
                self._advance(ahead)
                return
            if kind == _SLAB and slab < MAX_SLABS:
                _release(inc.words, slab, gen)
            elif kind == _DROP:
                inc.slabs.pop(slab, None)
            self._advance(length)

    def _bad(self, what: str) -> ProtocolError:
        self._broken = f"{self.peer} broke the shared-memory protocol: {what}"
        self._refuse_reading()
        return ProtocolError(self._broken)

    async def _take(self) -> tuple[dict[str, Any], list[np.ndarray]] | None:
        inc = self.inc
        written = inc.words[_W]
        ahead = written - inc.pos
        if ahead < 0 or ahead > inc.ring_bytes:
            raise self._bad(
                f"field 'write position' = {written} is not within {inc.ring_bytes} bytes "
                f"ahead of the read position {inc.pos}"
            )
        at = inc.pos % inc.ring_bytes
        rest = inc.ring_bytes - at
        if rest < _PREFIX.size:  # too little room for a prefix: the writer skipped it
            self._advance(rest)
            return None
        length, kind, head_len, slab, gen = _PREFIX.unpack_from(inc.data, at)
        if kind not in _KINDS:
            raise self._bad(f"field 'kind' = {kind} is not a record kind")
        if length < _PREFIX.size or length > rest or length > ahead or length % 8:
            raise self._bad(
                f"field 'record length' = {length} does not fit (at most {min(rest, ahead)}, "
                f"a multiple of 8, at least {_PREFIX.size})"
            )
        if kind == _WRAP:
            self._advance(length)
            return None
        if head_len > length - _PREFIX.size or head_len > MAX_HEADER_BYTES:
            raise self._bad(
                f"field 'header length' = {head_len} exceeds its record's "
                f"{length - _PREFIX.size} bytes"
            )
        start = at + _PREFIX.size
        body = inc.data[start : start + head_len]
        if kind == _SOCKET:
            self._advance(length)
            return await self._receive_socket()
        if kind in (_NEWSLAB, _DROP):
            self._slab_record(kind, body, slab, gen)
            self._advance(length)
            return None
        header, sizes = self._header(body)
        total = sum(sizes)
        if kind == _INLINE:
            if head_len + total > length - _PREFIX.size:
                raise self._bad(
                    f"field 'n' = {sizes!r} claims {total} bytes of tensors; its record holds "
                    f"{length - _PREFIX.size - head_len}"
                )
            o = start + head_len
            buffers = []
            for n in sizes:
                arr = np.empty(n, np.uint8)
                arr.data.cast("B")[:] = inc.data[o : o + n]
                buffers.append(arr)
                o += n
            self._advance(length)
            self.bytes_received += length
            return header, buffers
        # _SLAB
        mapped = inc.slabs.get(slab)
        if mapped is None:
            raise self._bad(f"field 'slab' = {slab} names no slab it announced")
        view, size = mapped
        offsets, span = _layout(sizes)
        if span > size:
            raise self._bad(f"field 'n' = {sizes!r} needs {span:,} bytes; slab {slab} has {size:,}")
        whole = np.frombuffer(view, np.uint8, span, 0)
        weakref.finalize(whole, _release, inc.words, slab, gen)
        buffers = [whole[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
        self._advance(length)
        self.bytes_received += length + total
        return header, buffers

    def _header(self, body: memoryview) -> tuple[dict[str, Any], list[int]]:
        try:
            header = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's fault
            raise self._bad(f"an undecodable header: {exc}") from exc
        sizes = header.get("n") if isinstance(header, dict) else None
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise self._bad(f"field 'n' (buffer sizes) is {sizes!r}, not a list of sizes")
        if sum(sizes) > self.max_message_bytes:
            raise self._bad(
                f"field 'n' announces {sum(sizes):,} bytes of tensors; the limit is "
                f"{self.max_message_bytes:,} bytes (raise max_message_bytes of the cluster if "
                "a real tensor is that large)"
            )
        return header, sizes

    def _slab_record(self, kind: int, body: memoryview, slab: int, gen: int) -> None:
        inc = self.inc
        if slab >= MAX_SLABS:
            raise self._bad(f"field 'slab' = {slab} is not below {MAX_SLABS}")
        if kind == _DROP:
            inc.slabs.pop(slab, None)  # the mapping goes with the last array viewing it
            return
        if len(body) != _NEWSLAB_BODY.size:
            raise self._bad(f"a slab announcement of {len(body)} bytes")
        fd, size = _NEWSLAB_BODY.unpack(body)
        if size > self.slab_limit():
            raise self._bad(
                f"field 'size' = {size:,} of slab {slab} is beyond the limit of "
                f"{self.slab_limit():,} bytes"
            )
        try:
            # (a large slab's page table is filled as its messages are read, by whoever reads
            # them: filling 1 GiB at once held this process's GIL, and so its event loop, for
            # up to seconds, and for pages no message may use)
            mm = open_peer(
                self.inc.pid, fd, size, f"slab {slab}", populate=size < THREAD_COPY_BYTES
            )
        except ProtocolError as exc:
            if not os.path.exists(f"/proc/{self.inc.pid}"):
                raise EOFError(
                    f"{self.peer} exited before this process could open the shared memory "
                    "of its last message"
                ) from None
            raise self._bad(str(exc)) from None
        inc.slabs[slab] = (memoryview(mm).cast("B"), size)

    def slab_limit(self) -> int:
        """The largest slab a peer may announce: its largest allowed message rounded up to a
        power of two, and no more than the slab budget."""
        pow2 = 1 << max(0, self.max_message_bytes - 1).bit_length()
        return max(1 << 20, min(pow2, self.slab_bytes))

    def _advance(self, n: int) -> None:
        self.inc.pos += n
        self.inc.words[_R] = self.inc.pos

    async def _receive_socket(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        # wake bytes (zeros) may precede the frame: a frame starts with b"A"
        while True:
            if self._rstart == self._rend:
                await self._fill()
            while self._rstart < self._rend and self._rbuf[self._rstart] == 0:
                self._rstart += 1
            if self._rstart < self._rend:
                break
        try:
            return await Connection.receive(self)
        except ProtocolError as exc:
            self._broken = str(exc)
            raise

    async def _fill(self) -> None:
        """Reads what the socket has into the (empty) read-ahead buffer, waiting for something."""
        n = await self._recv_some(self._rview)
        self._rstart, self._rend = 0, n

    def _drain(self) -> None:
        """Reads the wake bytes the socket holds, keeping anything else (the start of a frame
        sent over the socket) in the read-ahead buffer; notes the end of the stream."""
        while self._rstart < self._rend and self._rbuf[self._rstart] == 0:
            self._rstart += 1
        if self._rstart < self._rend:
            self._unannounced()
            return  # a frame's bytes wait there: read when its record comes
        try:
            n = self.sock.recv_into(self._rview)
        except BlockingIOError:
            return
        except OSError:
            self._eof = True
            return
        if n == 0:
            self._eof = True
            return
        self._rstart, self._rend = 0, n
        while self._rstart < self._rend and self._rbuf[self._rstart] == 0:
            self._rstart += 1
        self._unannounced()

    def _unannounced(self) -> None:
        # a frame's bytes come after the ring record announcing it (x86-64 makes the record
        # visible first): bytes with no record are garbage
        if self._rstart < self._rend and self.inc.words[_W] == self.inc.pos:
            raise self._bad(
                f"{self._rend - self._rstart} bytes on the socket that no record announced "
                f"(starting {bytes(self._rbuf[self._rstart : self._rstart + 8])!r})"
            )

    async def _wait(self) -> None:
        """Waits until the peer's write position moves (or the peer is gone)."""
        inc = self.inc
        pos = inc.pos
        if self._eof:
            raise EOFError(f"{self.peer} closed the connection")
        start = time.perf_counter()
        # this side's last send woke the peer: its answer comes after its wake-up, so spin
        # long enough to catch that (then both sides spin, and answers come in microseconds),
        # as long as such long spins pay off
        woke = self._woke and self._long >= 0.25
        self._woke = False
        spin = self._spin
        spun = (
            spin > 0 and (woke or self._hits >= 0.25) and not _others_runnable() and _cores_free()
        )
        if spun:
            # the loop is blocked while this spins: it stops (to sleep) as soon as a task of
            # the loop could run, or a record came on another connection (whose reader sleeps)
            clock = time.perf_counter
            until = start + (LONG_SPIN_FACTOR * spin if woke else spin)
            try:
                others = [c.inc for c in _sleeping if c is not self]
            except RuntimeError:  # changed by another thread's event loop meanwhile
                others = []
            n = 0
            while True:
                if inc.words[_W] != pos:
                    self._hits = 0.8 * self._hits + 0.2  # it paid off
                    if woke:
                        self._long = 0.8 * self._long + 0.2
                    return
                n += 1
                if not n & 15 and (
                    clock() > until
                    or any(o.words[_W] != o.pos for o in others)
                    or _others_runnable()
                ):
                    break
        inc.words[_S] = 1
        _sleeping.add(self)
        try:
            _fence()
            if inc.words[_W] != pos:
                return
            await anyio.wait_readable(self.sock)
        finally:
            if not self.closed:  # closed meanwhile: its ring is unmapped
                inc.words[_S] = 0
            _sleeping.discard(self)
        if self.closed:
            raise ConnectionError(f"the connection to {self.peer} is closed")
        self._drain()
        # would spinning have caught it? the sender stamps each record with the time it
        # published it (one clock for every process of a host). A spin that failed is a miss;
        # a record that came soon after a sleep began is a hit, though after the spin's length
        # (the peer may itself have slept and woken late: were both spinning, it would come
        # sooner). Spinning goes on while a quarter of the recent waits hit.
        gap = inc.stamps[_T] - start
        hit = not spun and gap <= 2 * spin
        self._hits = 0.8 * self._hits + (0.2 if hit else 0.0)
        if woke:  # a long spin for nothing
            self._long *= 0.5
        elif gap <= LONG_SPIN_FACTOR * spin:
            self._long = 0.8 * self._long + 0.2
        if self._eof and inc.words[_W] == pos:
            raise EOFError(f"{self.peer} closed the connection")
