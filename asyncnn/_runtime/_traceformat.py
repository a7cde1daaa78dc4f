"""The trace file format: framed msgpack records (see docs/trace_format.md).

Each record is a 12-byte prefix, then a msgpack map:

    u32 length  |  u32 ~length  |  u32 crc32(payload)  |  payload (length bytes)

all little-endian. The complemented length tells a damaged prefix from a file cut short (and a
length damaged along with its complement, running past the end, is told by a whole record
after it); the CRC tells a damaged payload. The first record is the header,
``{"format": "asyncnn-trace", ...}``.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from typing import IO, Any

import msgpack
import numpy as np

from asyncnn._errors import TraceFormatError

__all__ = ["FORMAT", "VERSION", "encode_record", "iter_frames"]

FORMAT = "asyncnn-trace"
VERSION = 1
_PREFIX = struct.Struct("<III")
MAX_RECORD = 1 << 31  # a larger length is damage, not a record


def encode_record(record: dict[str, Any]) -> bytes:
    """One framed record."""
    payload = msgpack.packb(record, use_bin_type=True)
    n = len(payload)
    return _PREFIX.pack(n, n ^ 0xFFFFFFFF, zlib.crc32(payload)) + payload


def _bytes_left(f: IO[bytes]) -> int | None:
    """The bytes of ``f`` after its position, where the file can tell (None elsewhere)."""
    try:
        return max(0, os.fstat(f.fileno()).st_size - f.tell())
    except (AttributeError, OSError, ValueError):
        return None


_SCAN_CHUNK = 1 << 24


def _whole_record_in(data: bytes) -> int | None:
    """Where in ``data`` a whole record (a consistent prefix, and a payload within ``data``
    that matches its CRC) starts, or None. A record whose length runs past the file's end is
    a cut-off write only if nothing whole comes after it: the same bits flipped in a length
    and in its complement would otherwise read as a truncation."""
    view = np.frombuffer(data, np.uint8)
    for base in range(0, max(0, view.size - _PREFIX.size + 1), _SCAN_CHUNK):
        chunk = view[base : base + _SCAN_CHUNK + 7]
        # a prefix's first 8 bytes: a length, then its complement, byte for byte
        comp = (chunk[:-4] ^ chunk[4:]) == 0xFF
        hits = comp[:-3] & comp[1:-2] & comp[2:-1] & comp[3:]
        for o in np.flatnonzero(hits):
            at = base + int(o)
            if at + _PREFIX.size > view.size:
                break
            n, _, crc = _PREFIX.unpack_from(data, at)
            end = at + _PREFIX.size + n
            if end <= view.size and zlib.crc32(data[at + _PREFIX.size : end]) == crc:
                return at
    return None


def iter_frames(f: IO[bytes], path: str = "<trace>") -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Yields ``(offset, record)`` for each whole record; a final ``(offset, None)`` means the
    file was cut off mid-record (truncated). Damage raises :class:`TraceFormatError`."""
    offset = 0
    index = 0
    while True:
        prefix = f.read(_PREFIX.size)
        if not prefix:
            return
        if len(prefix) < _PREFIX.size:
            yield offset, None
            return
        n, check, crc = _PREFIX.unpack(prefix)
        if n ^ 0xFFFFFFFF != check or n > MAX_RECORD:
            raise TraceFormatError(
                f"{path}: record {index} at byte {offset} is damaged: its length field is corrupt"
            )
        left = _bytes_left(f)
        # never allocate a claim the file cannot hold: read what it holds
        payload = f.read(left if left is not None and n > left else n)
        if len(payload) < n:
            follows = _whole_record_in(payload)
            if follows is not None:
                raise TraceFormatError(
                    f"{path}: record {index} at byte {offset} is damaged: its length field "
                    f"claims {n} bytes, more than the {len(payload)} left, yet a whole record "
                    f"follows at byte {offset + _PREFIX.size + follows}"
                )
            yield offset, None
            return
        if zlib.crc32(payload) != crc:
            raise TraceFormatError(
                f"{path}: record {index} at byte {offset} is damaged: its checksum does not match "
                f"its {n} bytes"
            )
        try:
            record = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is damage
            raise TraceFormatError(
                f"{path}: record {index} at byte {offset} is damaged: {exc}"
            ) from exc
        if not isinstance(record, dict):
            raise TraceFormatError(f"{path}: record {index} at byte {offset} is not a map")
        if index == 0 and record.get("format") != FORMAT:
            raise TraceFormatError(
                f"{path} is not an asyncnn trace (its first record has format "
                f"{record.get('format')!r}, expected {FORMAT!r})"
            )
        yield offset, record
        offset += _PREFIX.size + n
        index += 1
