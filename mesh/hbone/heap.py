"""Keep glibc from handing relay-sized buffers back to the kernel after every use.

Bulk relaying allocates and frees bytes objects of 64-256 KiB many thousand times a second
(a TCP read, a DATA frame, a TLS write). With glibc's defaults a free that leaves more than
128 KiB at the top of the heap is trimmed (returned to the kernel) and large blocks are
mmap'd, so the next allocation page-faults and zeroes the same memory again: measured on
the loopback bench, that churn was about half of ztunnel's CPU per GB. Blocks up to 1 MiB
now come from the heap and up to 4 MiB of free heap stay mapped, a bounded cost in RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 4 * 1024 * 1024
MMAP_THRESHOLD = 1024 * 1024


def tune() -> bool:
    """Apply the thresholds; False where the C library is not glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
    if not ok:
        log.debug("mallopt refused the heap thresholds; keeping the C library's defaults")
    return ok
