"""Resident memory of this process: now, and the peak since the last reset (per build stage in results.json)."""
from __future__ import annotations

import resource
from pathlib import Path


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    return _status("VmRSS") or 0


def reset_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS since the last ``reset_peak`` (VmHWM), else since the process started (ru_maxrss)."""
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_mb() -> float:
    return round(peak_rss() / 1e6, 1)


def release_freed_memory(mmap_threshold: int = 4 << 20) -> bool:
    """Make glibc serve allocations ≥ ``mmap_threshold`` from their own mappings, returned to the system on free.

    By default glibc raises that threshold after the first large free (up to 32 MB), so the per-layer buffers of the
    streamed pass (one layer's weights, Hessians, activations: 1–30 MB each) land in the heap, which fragments and never
    shrinks: RSS then creeps layer after layer. False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold)))
    except (OSError, AttributeError):
        return False
