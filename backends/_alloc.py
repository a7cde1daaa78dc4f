"""Tuning glibc's allocator so large arrays stop page-faulting on every training step.

glibc serves allocations above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and returns them to the
OS with ``munmap`` when freed; it also gives the top of the heap back past ``M_TRIM_THRESHOLD``.
A training step allocates and frees the same large activations every time, so each step touches
brand-new pages and takes a page fault per 4 KiB: on the project's CPU machines that nearly
doubled a numpy MLP step (39.8 ms against 24.4 ms, DESIGN.md section 7). Raising both thresholds
keeps freed blocks inside the process, where the next step reuses them without faults. The cost is
memory the process keeps after a peak instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from typing import Any

from ._checks import check_number

__all__ = ["allocator_tuning", "tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit builds); 2.36
# accepts 1 GiB. A refused value is retried at this limit.
_MMAP_THRESHOLD_FALLBACK = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)

_lock = threading.Lock()
_applied: dict[str, int] = {}


def _mallopt() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Raises glibc's mmap and trim thresholds so freed large arrays are reused, not unmapped.

    Where glibc refuses ``mmap_threshold`` (versions that cap it at 32 MiB on 64-bit), the cap is
    applied instead: every array up to 32 MiB (a 2048 x 4096 float32 matrix) then comes from the
    heap. Calling it again with the same values changes nothing.

    Args:
        mmap_threshold: bytes from which an allocation gets its own ``mmap`` (``M_MMAP_THRESHOLD``).
        trim_threshold: free bytes at the top of the heap before glibc returns them to the OS
            (``M_TRIM_THRESHOLD``).

    Returns:
        True when both settings were applied; False on a platform without glibc's ``mallopt``
        (macOS, Windows, musl) or when glibc refused them. Never raises for those.

    Raises:
        TypeError, ValueError: a threshold that is not a whole number of bytes, 0 or more (a
            negative one was taken as 0: every allocation its own ``mmap``). Thresholds above
            ``2**31 - 1`` (glibc's ``int``) are applied as ``2**31 - 1``.
    """
    check_number("mmap_threshold", mmap_threshold, integer=True, least=0)
    check_number("trim_threshold", trim_threshold, integer=True, least=0)
    mmap_threshold = min(int(mmap_threshold), 2**31 - 1)
    trim_threshold = min(int(trim_threshold), 2**31 - 1)
    wanted = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    with _lock:
        if _applied == wanted:
            return True
        mallopt = _mallopt()
        if mallopt is None:
            return False
        ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        if not ok and mmap_threshold > _MMAP_THRESHOLD_FALLBACK:
            ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_FALLBACK) == 1
            wanted["mmap_threshold"] = _MMAP_THRESHOLD_FALLBACK
        ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
        if ok:
            _applied.clear()
            _applied.update(wanted)
        return ok


def allocator_tuning() -> dict[str, int]:
    """The thresholds :func:`tune_allocator` last applied (empty when it never succeeded)."""
    with _lock:
        return dict(_applied)
