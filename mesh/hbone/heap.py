"""Keep glibc from handing relay-sized buffers back to the kernel after every use.

Bulk relaying allocates and frees bytes objects of 64-256 KiB many thousand times a second
(a TCP read, a DATA frame, a TLS write). With glibc's defaults a free that leaves more than
128 KiB at the top of the heap is trimmed (returned to the kernel) and large blocks are
mmap'd, so the next allocation page-faults and zeroes the same memory again: measured on
the loopback bench, that churn was about half of ztunnel's CPU per GB. Blocks up to 1 MiB
now come from the heap and up to 4 MiB of free heap stay mapped, a bounded cost in RSS.

And two malloc arenas at most (glibc's default is 8 per CPU): each thread that mallocs
(gRPC's, the HTTP endpoints', certificate fetches) otherwise gets an arena of its own, whose
free pages stay resident; the data path is one thread, so sharing costs it nothing
measurable and saves ~1 MiB of an idle ztunnel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
TRIM_THRESHOLD = 4 * 1024 * 1024
MMAP_THRESHOLD = 1024 * 1024
ARENA_MAX = 2


def tune() -> bool:
    """Apply the thresholds; False where the C library is not glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_ARENA_MAX, ARENA_MAX),
    )
    ok = all([bool(mallopt(option, value)) for option, value in settings])  # every one tried
    if not ok:
        log.debug("mallopt refused a heap setting; keeping the C library's defaults for it")
    return ok
