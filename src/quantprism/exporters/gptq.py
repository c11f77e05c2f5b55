"""GPTQ checkpoint tensors and config for vLLM 0.32 (reference vllm-formats.md §1).

Per linear: ``qweight`` int32 [K/f, N] packed along K LSB-first (f = 32/bits), ``qzeros`` int32
[G, N/f], ``scales`` fp16 [G, N], ``g_idx`` int32 = arange(K) // group_size. Symmetric only
(vLLM types uint4b8 / uint8b128: W = (q − 2^(b−1))·s), desc_act false: the canonical stage's
act-order is static-group, so groups stay contiguous and the trivial g_idx is the true one
(vLLM discards g_idx anyway). qzeros follow the GPTQ v1 convention (stored zero − 1: 0x77777777
at 4 bits, 0x7F7F7F7F at 8) for other loaders; vLLM never reads them for sym.
The mixed plan becomes ``dynamic``: "-:" keeps a layer fp, "+:" with bits 8 moves it to int8
(GPU only), both anchored regexes on vLLM's (fused) layer names.
"""
from __future__ import annotations

import re

import numpy as np

from ..config import Target
from ..errors import ArtifactError
from ..model import ModelInfo
from ..quantize.grids import QuantizedTensor, grid_from_id
from .base import ExportSpec
from .grids import GridNeeds, int_grid
from .intpack import int_codes, pack_int32
from .vllm import VLLMFormat
from .vllm_plan import ModulePlan


def pack_qweight(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [N, K] → [K/f, N]: field i of word [r, n] = q[f·r + i, n]."""
    return pack_int32(codes.T, bits, axis=0)


def v1_qzeros(groups: int, n: int, bits: int) -> np.ndarray:
    """The v1 zero words for symmetric codes (zero 2^(b−1), stored minus one), [G, N/f]."""
    stored = np.full((groups, n), (1 << (bits - 1)) - 1, dtype=np.uint32)
    return pack_int32(stored, bits, axis=1)


def pack_module(qt: QuantizedTensor, name: str = "") -> dict[str, np.ndarray]:
    c = int_codes(qt, name)
    if not c.symmetric or c.bits not in (4, 8):
        raise ArtifactError(f"{name}: GPTQ for vLLM is symmetric 4- or 8-bit, got {qt.grid_id}; re-run quantize")
    n, k = c.codes.shape
    gs = k if c.group_size == -1 else c.group_size
    return {
        "qweight": pack_qweight(c.codes, c.bits),
        "qzeros": v1_qzeros(c.groups, n, c.bits),
        "scales": np.ascontiguousarray(c.scale.T.astype(np.float16)),
        "g_idx": (np.arange(k) // gs).astype(np.int32),
    }


def _rule(prefix: str) -> str:
    return re.escape(prefix) + "$"  # re.match anchors the start only: layers.1 must not catch layers.10


def quantization_config(target: ExportSpec, mp: ModulePlan) -> dict:
    cfg: dict = {
        "quant_method": "gptq", "bits": target.bits, "group_size": target.group_size, "desc_act": False,
        "sym": True, "lm_head": False, "checkpoint_format": "gptq",  # v1 qzeros (stored zero − 1)
    }
    dynamic: dict[str, dict] = {}
    for prefix in mp.prefixes(mp.fp_modules):
        dynamic[f"-:{_rule(prefix)}"] = {}
    for prefix in mp.prefixes(mp.high_modules):
        g = grid_from_id(mp.protected_grid)
        dynamic[f"+:{_rule(prefix)}"] = {"bits": g.bits, "group_size": g.group_size, "desc_act": False, "sym": True}
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


GPTQ_GROUP_SIZES = (-1, 32, 64, 128)


class GPTQFormat(VLLMFormat):
    name = "gptq"
    label = "GPTQ checkpoint"
    quant_method = "gptq"

    def check(self, where: str, vals: dict) -> None:
        from ..errors import ConfigError

        if vals.get("quant") is not None:
            raise ConfigError(f"{where} key 'quant': GPTQ is set by bits/group_size, remove 'quant'")
        bits, gs = vals.get("bits", 4), vals.get("group_size", 128)
        if bits not in (4, 8):
            raise ConfigError(f"{where} key 'bits': vLLM loads GPTQ with 4 or 8 bits only, got {bits}")
        if not vals.get("symmetric", True):
            raise ConfigError(f"{where} key 'symmetric': vLLM 0.32 cannot load asymmetric GPTQ; set symmetric = true or use format \"awq\"")
        # vLLM's GPTQ layer checks Marlin support on every device; bits = 8 loads on GPUs only (CPU: 4-bit)
        if gs not in GPTQ_GROUP_SIZES:
            raise ConfigError(f"{where} key 'group_size': vLLM 0.32 loads GPTQ with group_size -1, 32, 64 or 128, got {gs}")

    def grid_needs(self, t: Target, info: ModelInfo | None = None) -> GridNeeds:
        return GridNeeds((int_grid(t.bits, t.group_size, True, "fp16"),))

    pack_module = staticmethod(pack_module)
    quantization_config = staticmethod(quantization_config)


FORMAT = GPTQFormat()
