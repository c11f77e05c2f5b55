"""The machine we run on, and what a target's ``hardware`` label promises about the deployment machine.

Why it matters numerically: x86 int8 GEMMs without VNNI (AVX2 ``vpmaddubsw``) add two u8×s8 products in a
*saturating* int16 before widening; with full-range int8 weights (|w| ≤ 127) and u8 activations a pair can
reach 2·255·127 = 64,770 > 32,767 and clips. VNNI (``vpdpbusd``, AVX-512 VNNI / AVX-VNNI / AMX) accumulates
groups of four products straight into int32: exact. So W8A8 weights for a machine without VNNI are kept in
±63 (a pair is then ≤ 2·255·63 = 32,130: never saturates), while a VNNI machine takes the full ±127 grid.

Labels: ``gpu-*`` (CUDA), ``cpu-avx512-vnni`` / ``cpu-avx-vnni`` / ``cpu-amx`` (VNNI: full range), anything
else starting with ``cpu`` (``cpu``, ``cpu-avx2``, …: assume no VNNI, reduced range — the safe side).
"""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import numpy as np

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT16_MAX = 32767


def label_has_vnni(label: str) -> bool:
    """Does the deployment machine a label names accumulate int8 products without int16 saturation?"""
    lab = label.lower()
    return lab.startswith("gpu") or "vnni" in lab or "amx" in lab


def int8_pairs_saturate(label: str) -> bool:
    """W8A8 on this label's machine goes through AVX2's saturating int16 pair sums (so weights stay in ±63)."""
    return not label_has_vnni(label)


@dataclass(frozen=True)
class Machine:
    cpu: str
    isa: tuple[str, ...]
    cores: int
    kind: str  # cpu-avx512-vnni | cpu-avx-vnni | cpu-avx2 | cpu
    int8_pairs_saturate: bool

    def matches(self, label: str) -> bool:
        """Can this machine validate an artifact built for ``label`` with the deployment's arithmetic?
        GPU labels never match a CPU machine; a VNNI label needs a VNNI machine; a no-VNNI label's reduced grid
        is exact everywhere, so any x86 machine with AVX2 validates it."""
        lab = label.lower()
        if lab.startswith("gpu"):
            return False
        if label_has_vnni(lab):
            return not self.int8_pairs_saturate
        return "avx2" in self.isa

    def record(self) -> dict:
        return asdict(self) | {"isa": list(self.isa)}


def _cpuinfo() -> tuple[str, set[str]]:
    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and (not cpu or cpu == "x86_64"):
                    cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu, flags


def detect() -> Machine:
    cpu, flags = _cpuinfo()
    isa = tuple(f for f in ISA_FLAGS if f in flags)
    if "avx512_vnni" in flags:
        kind = "cpu-avx512-vnni"
    elif "avx_vnni" in flags or "amx_int8" in flags:
        kind = "cpu-avx-vnni"
    elif "avx2" in flags:
        kind = "cpu-avx2"
    else:
        kind = "cpu"
    saturates = not any(f in flags for f in VNNI_FLAGS)
    return Machine(cpu=cpu, isa=isa, cores=os.cpu_count() or 1, kind=kind, int8_pairs_saturate=saturates)


def u8s8_dot_avx2(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """AVX2's u8×s8 int8 dot product (``vpmaddubsw`` then ``vpmaddwd``): adjacent products summed in a saturating
    int16, then widened and summed in int32. ``a_u8`` [M, K] in 0..255, ``w_s8`` [N, K] in -128..127 → [M, N]."""
    a = np.asarray(a_u8, dtype=np.int64)
    w = np.asarray(w_s8, dtype=np.int64)
    if a.shape[-1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        w = np.pad(w, ((0, 0), (0, 1)))
    prod = a[:, None, :] * w[None, :, :]
    pairs = prod.reshape(*prod.shape[:-1], -1, 2).sum(-1)
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(-1)


def u8s8_dot_vnni(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """VNNI's ``vpdpbusd``: groups of four u8×s8 products accumulated in int32 — the exact integer product."""
    return np.asarray(a_u8, dtype=np.int64) @ np.asarray(w_s8, dtype=np.int64).T
