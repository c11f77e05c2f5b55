"""Memory handed back to the kernel: glibc's mmap threshold (freed large buffers leave the process), trimming the
heap's free pages, and madvise on the unused tail of a buffer. The C library is looked up once (``find_library``
runs ``ldconfig``)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
from typing import Any


@functools.cache
def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def release_freed_memory(mmap_threshold: int = 4 << 20) -> bool:
    """Make glibc serve allocations ≥ ``mmap_threshold`` from their own mappings, returned to the system on free.

    By default glibc raises that threshold after the first large free (up to 32 MB), so the per-layer buffers of the
    streamed pass (one layer's weights, Hessians, activations: 1–30 MB each) land in the heap, which fragments and never
    shrinks: RSS then creeps layer after layer. False where the C library is not glibc."""
    libc = _libc()
    try:
        m_mmap_threshold = -3
        return libc is not None and bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold)))
    except AttributeError:
        return False


def trim_heap() -> bool:
    """Give the free pages inside glibc's heaps back to the kernel (malloc_trim(0)).

    Buffers below the mmap threshold (a layer's small tensors, the solvers' per-group temporaries, oneDNN/MKL
    scratch) are freed into the heap, whose touched free pages still count in RSS: measured 20–30 MB per call in
    the 1B pass, taken before each large allocation and after each layer. False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)  # returns whether anything was released; either way the heap is as small as it can be
    except AttributeError:
        return False
    return True


def release_pages(t: Any, keep_bytes: int) -> bool:
    """Hand the whole pages of a CPU tensor's buffer beyond its first ``keep_bytes`` back to the kernel (madvise
    MADV_DONTNEED: the mapping stays, the memory is released; a later read would see zeros, so only for bytes never
    read again). False where that is not possible (not Linux, not a CPU tensor)."""
    libc = _libc()
    if t.device.type != "cpu" or libc is None:
        return False
    page = mmap.PAGESIZE
    start = -(-(t.data_ptr() + keep_bytes) // page) * page
    end = (t.data_ptr() + t.untyped_storage().nbytes()) // page * page
    if end <= start:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0  # 4 = MADV_DONTNEED


def narrow_to_float32_(A: Any, block_rows: int = 256) -> Any:
    """A contiguous 2-D float64 CPU tensor rounded to float32 INSIDE its own buffer: the result is a view of the
    buffer's first half and the second half's pages go back to the kernel. Same values as ``A.float()`` without a
    second buffer (a 5632-wide Hessian: 254 MB instead of 254 + 127 at the moment of conversion). A is consumed."""
    import torch

    r, c = A.shape
    out = A.view(-1).view(torch.float32)[: r * c].view(r, c)
    for r0 in range(0, r, block_rows):  # float32 row i overlaps float64 rows ≤ i/2: rows already read
        out[r0 : r0 + block_rows] = A[r0 : r0 + block_rows].float()
    release_pages(A, keep_bytes=4 * r * c)
    return out
