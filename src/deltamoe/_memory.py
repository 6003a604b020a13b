"""Keep freed tensor buffers from lingering in the process's heap."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_THRESHOLD = 4 * 2**20


@functools.cache
def return_large_frees_to_os() -> bool:
    """Serve allocations of 4 MiB and more with mmap, so that freeing them unmaps them at once.

    glibc raises its mmap threshold dynamically after the first large free; from then on tensor
    buffers come from the heap, whose top is only trimmed beyond twice that threshold. A
    streaming pass over a model then keeps tens of MB of freed tensors resident. Setting the
    threshold explicitly turns the dynamic adjustment off. A no-op (returns False) off glibc.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):
        return False
