"""glibc malloc tuning for a daemon that moves large buffers.

Records, ciphertexts and stream buffers (256 KiB) are above glibc's default mmap
threshold, so each can be a fresh mmap returned by munmap right after use: new
pages for the kernel to zero, frame after frame. Keeping such blocks on the heap,
and trimming the heap only when much is free, lets freed buffers be reused warm.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 << 20  # blocks under this come from the heap
TRIM_THRESHOLD = 128 << 20  # the heap shrinks only when this much is free at its top


def prewarm_heap(nbytes: int, piece: int = 256 * 1024) -> None:
    """Touches ``nbytes`` of heap in record-sized blocks and frees them. With the
    trim threshold above, the pages stay with the process, so the first burst of
    record buffers reuses them instead of faulting in fresh ones."""
    if nbytes > TRIM_THRESHOLD:
        raise ValueError(f"cannot keep more than {TRIM_THRESHOLD} bytes warm")
    blocks = [bytearray(piece) for _ in range(nbytes // piece)]  # bytearray(n) writes every page
    del blocks


def tune() -> bool:
    """Applies the thresholds if the C library is glibc; returns whether it did."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
