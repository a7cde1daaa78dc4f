"""The trace file format: framed msgpack records (see docs/trace_format.md).

Each record is a 12-byte prefix, then a msgpack map:

    u32 length  |  u32 ~length  |  u32 crc32(payload)  |  payload (length bytes)

all little-endian. The complemented length tells a damaged prefix from a file cut short; the CRC
tells a damaged payload. The first record is the header, ``{"format": "asyncnn-trace", ...}``.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from typing import IO, Any

import msgpack

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
        if left is not None and n > left:  # never allocate what the file cannot hold
            yield offset, None
            return
        payload = f.read(n)
        if len(payload) < n:
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
