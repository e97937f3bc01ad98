"""Host memory on 2 MiB pages (Linux transparent huge pages), for the weights a decode step streams.

A decode step reads each projection's weights once: 120 matrices of 1.6-8.8 MB for 2B4T. On
4 KiB pages every matrix costs hundreds of TLB misses, and the hardware prefetcher stops at each
page boundary. numpy asks for huge pages only for arrays of 4 MiB or more, and the kernel backs
only whole 2 MiB-aligned runs of one allocation with them, so q|k|v and o (2.4 and 1.6 MB) stayed
on small pages. :func:`empty_arrays` gives a model's matrices one buffer on huge pages. With it,
the projections of a decode step took 3.5-7% less time and the whole step 4-6% (NOTES.md).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Sequence

import numpy as np

from .backend import ALIGNMENT

HUGE_PAGE = 2 << 20
"""Bytes of a huge page on x86-64 and most aarch64 kernels: a buffer's alignment."""

AVAILABLE = hasattr(mmap, "MADV_HUGEPAGE")
"""Whether this OS takes the huge-page advice (Linux): the buffers below exist only where it does."""


class _Mapping(mmap.mmap):
    """An anonymous private mapping: its type marks the memory of :func:`huge_page_buffer`."""


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of ``nbytes`` starting on a 2 MiB boundary, in memory the OS is asked to
    back with huge pages (``MADV_HUGEPAGE``).

    Only where :data:`AVAILABLE` (the callers check it). Where transparent huge pages are off,
    the buffer is on ordinary pages and works the same. The memory goes back when the last
    array viewing it is collected.
    """
    # Private: shared anonymous memory gets huge pages only under a separate setting (shmem_enabled).
    mapping = _Mapping(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages (EINVAL): ordinary pages
        pass
    whole = np.frombuffer(mapping, np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    return whole[start : start + nbytes]


def on_huge_pages(array: np.ndarray) -> bool:
    """Whether ``array`` views memory of :func:`huge_page_buffer`."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, _Mapping)


def empty_arrays(layouts: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Uninitialized C-contiguous arrays of the ``(shape, dtype)`` ``layouts``, packed in that order
    into one :func:`huge_page_buffer`, each starting on a 64-byte boundary.

    The caller fills them one by one, so that each array they replace can go before the next
    is copied: the peak is one array more, not all of them twice.
    """
    sizes = [-(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGNMENT) * ALIGNMENT for shape, dtype in layouts]
    buffer = huge_page_buffer(max(sum(sizes), ALIGNMENT))
    arrays, offset = [], 0
    for (shape, dtype), size in zip(layouts, sizes, strict=True):
        arrays.append(np.ndarray(shape, dtype, buffer=buffer, offset=offset))
        offset += size
    return arrays


def return_free_memory() -> None:
    """Hand the pages the C heap holds free back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Arrays of a few MB often come from the heap, not from a mapping of their own (glibc raises
    its threshold for those as big blocks are freed), so freeing them keeps their pages
    resident: moving a model's weights onto huge pages left 0.3 GiB of 2B4T's old ones
    resident without it, and held 0.4 GiB more at the peak.
    """
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl has none
        if trim is not None:
            trim(0)
