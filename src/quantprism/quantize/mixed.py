"""Mixed precision: measured per-tensor sensitivity and a plan under a budget.

Sensitivity of a tensor = mean KL(original‖model with ONLY that tensor quantized) on calibration
tokens — measured, not a proxy. The plan protects (moves to a higher-precision grid) the tensors
with the largest sensitivity per extra bit spent, until either N tensors are protected or the
model-wide bits per weight would exceed the budget. Exporters map the plan to their own override
mechanisms (GGUF per-tensor types, GPTQ ``dynamic``, AWQ ``modules_to_not_convert``, CT ``ignore``).
"""
from __future__ import annotations

import numpy as np
import torch

from .grids import IntGrid, grid_from_id


def bits_per_weight(gid: str) -> float:
    """Storage bits per weight of a grid, parameters included."""
    g = grid_from_id(gid)
    if isinstance(g, IntGrid):
        if g.group_size == -1:
            return float(g.bits)
        scale_bits = 32 if g.scale_dtype == "fp32" else 16
        zero_bits = 0 if g.symmetric else g.bits
        return g.bits + (scale_bits + zero_bits) / g.group_size
    return float(g.bits)


def higher_grid(gid: str) -> str:
    """The grid a protected tensor moves to: one step up in precision on the same runtime family."""
    g = grid_from_id(gid)
    if isinstance(g, IntGrid):
        gs = "c" if g.group_size == -1 else str(g.group_size)
        return f"int8_g{gs}_sym_{g.scale_dtype}"
    up = "q8_0" if g.type in ("Q6_K", "Q8_0") else "q6_k"  # every 4–5 bit GGML type moves to Q6_K
    return up + ("_imat" if g.imatrix and up == "q6_k" else "")


def _mean_kld(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logq = torch.log_softmax(logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum(-1).mean())


def sensitivity(model, overrides_fp: dict[str, torch.Tensor], quantized: dict[str, torch.Tensor],
                input_ids: np.ndarray) -> dict[str, float]:
    """KL increase when only one tensor is quantized, for every tensor in ``quantized`` (name → weight)."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base_sd = dict(original)
    base_sd.update({k: v.to(original[k].dtype) for k, v in overrides_fp.items() if k in original})
    model.load_state_dict(base_sd)
    out: dict[str, float] = {}
    try:
        with torch.inference_mode():
            ref_logp = torch.log_softmax(model(ids).logits.float(), -1)
            for name, w in quantized.items():
                key = f"{name}.weight"
                param = model.get_parameter(key)
                keep = param.detach().clone()
                param.copy_(w.to(param.dtype))
                out[name] = _mean_kld(ref_logp, model(ids).logits)
                param.copy_(keep)
    finally:
        model.load_state_dict(original)
    return out


def plan(sens: dict[str, float], sizes: dict[str, int], main: str, protect: int = 0,
         max_bpw: float | None = None) -> dict:
    """Choose protected tensors: by sensitivity per extra bit, bounded by ``protect`` and ``max_bpw``."""
    high = higher_grid(main)
    b_main, b_high = bits_per_weight(main), bits_per_weight(high)
    total = sum(sizes[n] for n in sens)
    order = sorted(sens, key=lambda n: sens[n] / (sizes[n] * (b_high - b_main) + 1e-9), reverse=True)
    protected: list[str] = []
    bits = b_main * total
    limit = protect if protect > 0 else (len(order) if max_bpw is not None else 0)
    for n in order:
        if len(protected) >= limit:
            break
        extra = sizes[n] * (b_high - b_main)
        if max_bpw is not None and (bits + extra) / total > max_bpw:
            continue
        protected.append(n)
        bits += extra
    return {"grid": main, "high_grid": high, "protected": protected, "bits_per_weight": bits / total,
            "sensitivity": dict(sorted(sens.items(), key=lambda kv: -kv[1]))}
