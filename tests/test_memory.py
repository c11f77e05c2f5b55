"""memory.py: freed heap pages really leave the process (the streamed pass's per-layer creep)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# 3,000 blocks of 64 KB (below glibc's default and our mmap threshold: they live in the heap), touched, then all but
# every 10th freed — the survivors pin the heap, so glibc's automatic top trim cannot return the free pages
PROBE = r"""
import json, re
def rss():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024
from quantprism.memory import trim_heap
blocks = [bytearray(b"x" * (64 << 10)) for _ in range(3000)]
keep = blocks[::10]
before_free = rss()
del blocks
after_free = rss()
ok = trim_heap()
print(json.dumps({"ok": ok, "before_free": before_free, "after_free": after_free, "after_trim": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_returns_free_heap_pages():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    freed = 3000 * 64 / 1024 * 0.9  # MB
    assert m["ok"] is True
    # free() alone keeps the pages (the bug: RSS creeping layer after layer) …
    assert m["before_free"] - m["after_free"] < 0.5 * freed, m
    # … malloc_trim(0) hands at least most of them back
    assert m["after_free"] - m["after_trim"] > 0.7 * freed, m


@pytest.mark.parametrize("shape", [(5, 3), (300, 300), (513, 257), (1, 7)])
def test_narrow_to_float32_in_place_equals_float(shape):
    import torch

    from quantprism.memory import narrow_to_float32_

    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, dtype=torch.float64, generator=g) * 1e3
    want = A.float()  # the textbook conversion, a second buffer
    ptr = A.data_ptr()
    got = narrow_to_float32_(A, block_rows=64)  # blocks that do and do not tile the rows
    assert got.data_ptr() == ptr  # inside the float64 buffer, not a copy
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)
