"""Grid ids the canonical stage is asked for (each Format declares its needs; the stage solves them once).

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
    # the grid each decoder linear is deployed with where it differs per tensor (GGUF's mixes), "module=grid": block-wise
    # tuning fits each layer's linears as deployed together; empty = one grid for every linear (tuned grid by grid)
    mix: tuple[str, ...] = ()


def int_grid(bits: int, gs: int, sym: bool, dtype: str, narrow: bool = False, reduced: bool = False) -> str:
    """The id of an IntGrid (quantize.grids.IntGrid.id), built from its parts."""
    g = "c" if gs == -1 else str(gs)
    return f"int{bits}_g{g}_{'sym' if sym else 'asym'}{'_n' if narrow else ''}{'_r' if reduced else ''}_{dtype}"


def int8_reduced(t: Target) -> bool:
    """W8A8 for a machine without VNNI (hardware "cpu-avx2", "cpu"): weights in ±63 so int16 pair sums cannot
    saturate; VNNI labels ("cpu-avx512-vnni") and GPUs take the full ±127 grid (see quantprism.hardware)."""
    return int8_pairs_saturate(t.hardware_label)


def grid_needs(t: Target, info=None) -> GridNeeds:
    """What ``t``'s format needs from the canonical stage (for model ``info``, where shapes matter)."""
    from . import FORMATS

    return FORMATS[t.format].grid_needs(t, info)
