"""Hidden states between decoder layers, per calibration batch: in RAM up to a byte budget, beyond it in a
memory-mapped file on disk.

The streamed pass holds two of these (the current layer's inputs and its outputs). They are kept in the checkpoint's
dtype (bf16 for most released models: half of fp32, and what the layer itself computes in when deployed); a batch is
cast to float32 on the compute device only while its layer runs.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class Activations:
    def __init__(self, dtype: torch.dtype = torch.float32, budget_bytes: int | None = None,
                 spill_dir: Path | None = None):
        self.dtype = dtype
        self.budget = budget_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._ram: list[torch.Tensor | None] = []
        self._disk: list[tuple[int, tuple[int, ...]] | None] = []  # (byte offset, shape) in the spill file
        self._ram_bytes = 0
        self._file: Path | None = None
        self._fh = None
        self._end = 0

    @property
    def ram_bytes(self) -> int:
        return self._ram_bytes

    @property
    def disk_bytes(self) -> int:
        return self._end

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu", self.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if self.budget is None or self._ram_bytes + nbytes <= self.budget:
            self._ram.append(t)
            self._disk.append(None)
            self._ram_bytes += nbytes
            return
        if self._fh is None:
            d = self.spill_dir or Path(tempfile.gettempdir())
            d.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="activations.", suffix=".bin", dir=d)
            self._fh, self._file = os.fdopen(fd, "wb"), Path(name)
        self._fh.write(t.view(-1).view(torch.uint8).numpy().tobytes())
        self._fh.flush()
        self._ram.append(None)
        self._disk.append((self._end, tuple(t.shape)))
        self._end += nbytes

    def __len__(self) -> int:
        return len(self._ram)

    def __getitem__(self, i: int) -> torch.Tensor:
        t = self._ram[i]
        if t is not None:
            return t
        off, shape = self._disk[i]
        n = int(np.prod(shape)) * torch.empty((), dtype=self.dtype).element_size()
        mm = np.memmap(self._file, dtype=np.uint8, mode="r", offset=off, shape=(n,))
        raw = torch.from_numpy(np.array(mm))  # one batch copied in; the mapping is dropped right away
        del mm
        return raw.view(self.dtype).reshape(shape)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        self._ram.clear()
        self._disk.clear()
        self._ram_bytes = 0
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
        self._end = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing to report
            pass


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), capped by the room left under this process's cgroup memory limit
    (v2 memory.max, or v1 memory.limit_in_bytes) where one applies."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail if avail is not None else 8 << 30


def cgroup_room() -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and its ancestors (None: no limit)."""
    rooms = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, rel = line.split(":", 2)
        if ctrls == "":  # v2: limits of every ancestor apply
            base, limit_f, usage_f = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in ctrls.split(","):
            base, limit_f, usage_f = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        g = base / rel.lstrip("/")
        while True:
            try:
                limit = (g / limit_f).read_text().strip()
                if limit != "max" and int(limit) < 1 << 60:  # v1 reads 2^63 rounded down to a page when unlimited
                    rooms.append(int(limit) - int((g / usage_f).read_text().strip()))
            except (OSError, ValueError):
                pass
            if g == base or base not in g.parents:
                break
            g = g.parent
    return min(rooms) if rooms else None


def parse_bytes(text: str) -> int:
    """``"12GB"``, ``"512MiB"``, ``"0.5G"``, ``"1000000"`` → bytes (decimal units for KB/MB/GB/TB, binary for KiB…)."""
    from ..errors import ConfigError

    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    num, mult = s, 1
    for u, m in units.items():
        if s.endswith(u):
            num, mult = s[: -len(u)], m
            break
    try:
        v = float(num)
    except ValueError:
        raise ConfigError(f"memory size {text!r}: use a number with a unit, e.g. 12GB or 1500MB") from None
    if v <= 0:
        raise ConfigError(f"memory size {text!r} must be positive")
    return int(v * mult)
