"""compressed-tensors checkpoints for vLLM 0.32 (reference §3): "pack-quantized" W4A16/W8A16, "int-quantized" W8A8.

pack-quantized, per linear: ``weight_packed`` int32 [N, K/f] packed along K LSB-first holding
q + 2^(b−1) for the signed code q; ``weight_scale`` fp16 [N, G]; for asymmetric grids only
``weight_zero_point`` int32 [N/f, G] packed along N holding zp + 2^(b−1); ``weight_shape`` int64
[N, K]. W = (q − zp)·s. Our unsigned codes already are q + 2^(b−1) (sym: w = s·(code − 2^(b−1));
asym: w = s·(code − z) with signed zp = z − 2^(b−1)), so they are stored as they are.
int-quantized (W8A8), per linear: ``weight`` int8 [N, K] = code − 128, ``weight_scale`` fp32 [N, 1]
(vLLM's parameter dtype), activations int8 per token, dynamic, symmetric.

Mixed plan: protected modules join ``ignore`` (fp), or on GPUs a second config group of 8-bit
pack-quantized layers whose targets are anchored regexes matching both the HF shard names and
vLLM's fused name — vLLM tries layer names before the "Linear" class target, and names a fused
layer qkv_proj / gate_up_proj.
"""
from __future__ import annotations

import re

import numpy as np

from ..config import Target
from ..errors import ArtifactError
from ..model import ModelInfo
from ..quantize.grids import QuantizedTensor, grid_from_id
from .base import ExportSpec
from .grids import GridNeeds, int8_reduced, int_grid
from .intpack import int_codes, pack_int32
from .vllm import VLLMFormat
from .vllm_plan import FUSED, ModulePlan, vllm_prefix

PACKED = "pack-quantized"
INT = "int-quantized"


def pack_weight(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [N, K] (already q + 2^(b−1)) → [N, K/f]."""
    return pack_int32(codes, bits, axis=1)


def pack_zero_point(zero: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned zeros [N, G] (already zp + 2^(b−1)) → [N/f, G], packed along N."""
    return pack_int32(zero, bits, axis=0)


def int8_weight(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.int16) - 128).astype(np.int8)


def pack_module(qt: QuantizedTensor, name: str = "") -> dict[str, np.ndarray]:
    c = int_codes(qt, name)
    if qt.grid.narrow:  # the W8A8 grid: per-channel int8 in ±127
        if c.bits != 8 or c.group_size != -1:
            raise ArtifactError(f"{name}: W8A8 needs per-channel int8, got {qt.grid_id}; re-run quantize")
        return {"weight": int8_weight(c.codes), "weight_scale": c.scale.astype(np.float32)}
    n, k = c.codes.shape
    out = {
        "weight_packed": pack_weight(c.codes, c.bits),
        "weight_scale": np.ascontiguousarray(c.scale.astype(np.float16)),
        "weight_shape": np.array([n, k], dtype=np.int64),
    }
    if not c.symmetric:  # vLLM registers no zero point for sym schemes: an extra tensor fails the load
        out["weight_zero_point"] = pack_zero_point(c.zero, c.bits)
    return out


def weight_args(gid: str) -> dict:
    g = grid_from_id(gid)
    channel = g.group_size == -1
    return {
        "num_bits": g.bits, "type": "int", "symmetric": g.symmetric,
        "strategy": "channel" if channel else "group", "group_size": None if channel else g.group_size,
        "block_structure": None, "dynamic": False, "actorder": None,
    }


def _group(targets: list[str], gid: str, w8a8: bool) -> dict:
    act = None
    if w8a8:
        act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
               "block_structure": None, "dynamic": True, "actorder": None}
    return {"targets": targets, "weights": weight_args(gid), "input_activations": act,
            "output_activations": None, "format": INT if w8a8 else PACKED}


def layer_regex(module: str) -> str:
    """``re:`` target for the vLLM layer holding ``module``: its HF shard names and the fused name."""
    prefix = vllm_prefix(module)
    scope, name = prefix.rsplit(".", 1)
    shards = FUSED.get(prefix.split(".", 3)[3], ())
    names = [name] + [s.rsplit(".", 1)[1] for s in shards]
    return "re:^" + re.escape(scope + ".") + "(" + "|".join(names) + ")$"


def quantization_config(target: ExportSpec, mp: ModulePlan) -> dict:
    w8a8 = target.quant == "W8A8"
    groups = {"group_0": _group(["Linear"], mp.main, w8a8)}
    high = mp.high_modules
    if high:
        targets = list(dict.fromkeys(layer_regex(m) for m in high))
        groups["group_1"] = _group(targets, mp.protected_grid or mp.main, False)
    return {
        "quant_method": "compressed-tensors", "format": INT if w8a8 else PACKED, "config_groups": groups,
        "ignore": ["lm_head", *mp.fp_modules], "kv_cache_scheme": None, "quantization_status": "compressed",
        "global_compression_ratio": None,
    }


CT_SCHEMES = ("W4A16", "W8A16", "W8A8")


class CompressedTensorsFormat(VLLMFormat):
    name = "compressed-tensors"
    label = "compressed-tensors checkpoint"
    quant_method = "compressed-tensors"

    def acts_quantized(self, vals: dict) -> bool:
        return vals.get("quant") == "W8A8"

    def act_rounding(self, t: Target) -> str:
        return "token" if t.quant == "W8A8" else "none"

    def check(self, where: str, vals: dict) -> None:
        from ..errors import ConfigError

        quant, bits = vals.get("quant"), vals.get("bits", 4)
        if quant not in CT_SCHEMES:
            raise ConfigError(f"{where} key 'quant': compressed-tensors needs one of {', '.join(CT_SCHEMES)}, got {quant!r}")
        want_bits = 4 if quant == "W4A16" else 8
        if vals.get("bits", want_bits) != want_bits:
            raise ConfigError(f"{where} key 'bits': {quant} means {want_bits}-bit weights, got {bits}")
        if quant == "W8A8" and vals.get("group_size", -1) != -1:
            raise ConfigError(f"{where} key 'group_size': W8A8 weights are per channel; set group_size = -1")
        if quant in ("W8A8", "W8A16") and not vals.get("symmetric", True):  # W8A16 (GPU only in vLLM 0.32) is symmetric
            raise ConfigError(f"{where} key 'symmetric': {quant} int8 weights are symmetric; set symmetric = true")

    def bits_group(self, t: Target) -> tuple[int, int]:
        if t.quant in ("W8A8", "W8A16"):
            return 8, -1 if t.quant == "W8A8" else t.group_size
        return t.bits, t.group_size

    def grid_needs(self, t: Target, info: ModelInfo | None = None) -> GridNeeds:
        if t.quant == "W8A8":
            return GridNeeds((int_grid(8, -1, True, "fp16", narrow=True, reduced=int8_reduced(t)),))
        if t.quant == "W8A16":
            return GridNeeds((int_grid(8, t.group_size, True, "fp16"),))
        return GridNeeds((int_grid(4, t.group_size, t.symmetric, "fp16"),))

    pack_module = staticmethod(pack_module)
    quantization_config = staticmethod(quantization_config)


FORMAT = CompressedTensorsFormat()
