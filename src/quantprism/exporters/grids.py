"""Which grids each export format needs from the canonical stage (exporters declare, the stage solves).

Scales are rounded to the dtype the runtime stores them in (fp16 for GPTQ/AWQ/compressed-tensors,
fp32 for ONNX initializers), so the canonical dequantized weights are exactly what the runtime sees.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Target
from ..hardware import int8_pairs_saturate


@dataclass(frozen=True)
class GridNeeds:
    grids: tuple[str, ...]  # decoder linears; the first is the target's main grid
    head: tuple[str, ...] = ()  # lm_head (GGUF output.weight); empty = kept in high precision
    embed: tuple[str, ...] = ()  # token embeddings (GGUF token_embd)


def _int(bits: int, gs: int, sym: bool, dtype: str, narrow: bool = False, reduced: bool = False) -> str:
    g = "c" if gs == -1 else str(gs)
    return f"int{bits}_g{g}_{'sym' if sym else 'asym'}{'_n' if narrow else ''}{'_r' if reduced else ''}_{dtype}"


def int8_reduced(t: Target) -> bool:
    """W8A8 for a machine without VNNI (hardware "cpu-avx2", "cpu"): weights in ±63 so int16 pair sums cannot
    saturate; VNNI labels ("cpu-avx512-vnni") and GPUs take the full ±127 grid (see quantprism.hardware)."""
    return int8_pairs_saturate(t.hardware)


def grid_needs(t: Target) -> GridNeeds:
    if t.format == "gguf":
        im = "_imat" if t.imatrix else ""
        q = t.quant
        if q == "Q4_K_M":
            return GridNeeds((f"q4_k{im}", f"q6_k{im}"), (f"q6_k{im}",), ("q4_k",))
        if q == "Q5_K_M":
            return GridNeeds((f"q5_k{im}", f"q6_k{im}"), (f"q6_k{im}",), ("q5_k",))
        if q == "Q6_K":
            return GridNeeds((f"q6_k{im}",), (f"q6_k{im}",), ("q6_k",))
        if q == "Q8_0":
            return GridNeeds(("q8_0",), ("q8_0",), ("q8_0",))
        return GridNeeds(())  # F16: nothing to quantize
    if t.format == "gptq":
        return GridNeeds((_int(t.bits, t.group_size, True, "fp16"),))
    if t.format == "awq":
        return GridNeeds((_int(4, t.group_size, False, "fp16"),))
    if t.format == "compressed-tensors":
        if t.quant == "W8A8":
            return GridNeeds((_int(8, -1, True, "fp16", narrow=True, reduced=int8_reduced(t)),))
        if t.quant == "W8A16":
            return GridNeeds((_int(8, t.group_size, True, "fp16"),))
        return GridNeeds((_int(4, t.group_size, t.symmetric, "fp16"),))
    if t.format == "onnx":
        if t.quant == "w8a8":
            return GridNeeds((_int(8, -1, True, "fp32", narrow=True, reduced=int8_reduced(t)),))
        bits = 8 if t.quant == "nbits8" else 4
        return GridNeeds((_int(bits, t.group_size, t.symmetric, "fp32"),))
    raise ValueError(t.format)
