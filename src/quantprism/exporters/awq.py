"""AWQ (GEMM layout, zero_point true) checkpoint tensors and config for vLLM 0.32 (reference §2).

Per linear: ``qweight`` int32 [K, N/8] packed along N in AWQ's interleaved order (field i of word
[k, c] = q[k, 8c + AWQ_ORDER[i]]), ``qzeros`` int32 [G, N/8] likewise with the raw zero 0..15,
``scales`` fp16 [G, N]; W = (q − z)·s. 4-bit only, so the mixed plan's protected modules stay fp
through ``modules_to_not_convert`` — full HF module names, because vLLM matches them as substrings
of each fused shard's name ("model.layers.1.mlp.up_proj" cannot catch layers.10-19).
"""
from __future__ import annotations

import numpy as np

from ..config import Target
from ..errors import ArtifactError
from ..model import ModelInfo
from ..quantize.grids import QuantizedTensor
from .base import ExportSpec
from .grids import GridNeeds, int_grid
from .intpack import int_codes, pack_int32
from .vllm import VLLMFormat
from .vllm_plan import ModulePlan

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_columns(values: np.ndarray) -> np.ndarray:
    """[R, N] 4-bit values → [R, N/8] in the interleaved order."""
    return pack_int32(values, 4, axis=1, order=AWQ_ORDER)


def pack_module(qt: QuantizedTensor, name: str = "") -> dict[str, np.ndarray]:
    c = int_codes(qt, name)
    if c.symmetric or c.bits != 4:
        raise ArtifactError(f"{name}: AWQ stores asymmetric 4-bit codes, got {qt.grid_id}; re-run quantize")
    return {
        "qweight": pack_columns(c.codes.T),
        "qzeros": pack_columns(c.zero.T),
        "scales": np.ascontiguousarray(c.scale.T.astype(np.float16)),
    }


def quantization_config(target: ExportSpec, mp: ModulePlan) -> dict:
    return {
        "quant_method": "awq", "version": "gemm", "zero_point": True, "lm_head": False,
        "bits": 4, "w_bit": 4, "group_size": target.group_size, "q_group_size": target.group_size,
        "modules_to_not_convert": list(mp.fp_modules),  # explicit, so vLLM never derives it from dtypes
    }


class AWQFormat(VLLMFormat):
    name = "awq"
    label = "AWQ checkpoint"
    quant_method = "awq"

    def check(self, where: str, vals: dict) -> None:
        from ..errors import ConfigError

        if vals.get("quant") is not None:
            raise ConfigError(f"{where} key 'quant': AWQ is set by bits/group_size, remove 'quant'")
        if vals.get("bits", 4) != 4:
            raise ConfigError(f"{where} key 'bits': AWQ checkpoints are 4-bit, got {vals.get('bits')}")
        if vals.get("symmetric", True):
            raise ConfigError(f"{where} key 'symmetric': the AWQ format stores zero points; set symmetric = false")
        if vals.get("group_size", 128) == -1:
            raise ConfigError(f"{where} key 'group_size': AWQ needs a group size (32/64/128)")

    def grid_needs(self, t: Target, info: ModelInfo | None = None) -> GridNeeds:
        return GridNeeds((int_grid(4, t.group_size, False, "fp16"),))

    pack_module = staticmethod(pack_module)
    quantization_config = staticmethod(quantization_config)


FORMAT = AWQFormat()
