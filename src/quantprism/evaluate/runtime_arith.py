"""The runtime's activation arithmetic, emulated in torch, for reference models that compare bit-for-bit.

llama.cpp's CPU backend does not multiply k-quant or Q8_0 weights with fp32 activations: it first
quantizes each activation row to Q8_K (blocks of 256, one fp32 scale, the signed extreme maps to
-127) or Q8_0 (blocks of 32, fp16 scale = max|x|/127) and takes integer dot products. A torch model
built from the canonical dequantized weights therefore differs from llama.cpp at near-ties; applying
the same activation rounding (ggml-quants.c quantize_row_q8_K_ref, x86 quantize_row_q8_0) removes
that difference, so the remaining disagreement measures the artifact, not the kernel.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# GGML weight type → the activation format ggml's CPU dot product uses for it (vec_dot_type)
VEC_DOT_TYPE = {"Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "Q8_0": "Q8_0"}


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """Q8_K round trip: per 256 values, iscale = -127/x[argmax |x|], q = min(127, rint(iscale·x)), d = 1/iscale."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // 256, 256)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # first occurrence, like the C loop's strict '>'
    zero = mx == 0
    iscale = torch.where(zero, torch.zeros_like(mx), -127.0 / torch.where(zero, torch.ones_like(mx), mx))
    q = torch.clamp(torch.round(iscale * xb), max=127.0)  # torch.round is round-half-even, like nearest_int
    d = torch.where(zero, torch.zeros_like(mx), 1.0 / torch.where(zero, torch.ones_like(iscale), iscale))
    return (q * d).reshape(shape).to(x.dtype)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 round trip as the AVX2 path does it: d = max|x|/127 stored fp16, q = rint(x·127/max|x|)."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), 127.0 / torch.where(amax == 0, torch.ones_like(amax), amax))
    q = torch.round(xb * inv)
    d = (amax / 127.0).half().float()
    return (q * d).reshape(shape).to(x.dtype)


def ggml_activation_hooks(model: torch.nn.Module, types: dict[str, str]) -> list:
    """Round every Linear's input the way llama.cpp does for that linear's GGML type; returns hook handles."""
    fns = {"Q8_K": q8_k, "Q8_0": q8_0}
    handles = []
    for name, mod in model.named_modules():
        t = types.get(name) or (types.get("model.embed_tokens", "") if name == "lm_head" else "")  # tied output
        vdt = VEC_DOT_TYPE.get(t)
        if isinstance(mod, torch.nn.Linear) and vdt is not None:
            fn = fns[vdt]
            handles.append(mod.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:])))
    return handles


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric int8 per token (vLLM's W8A8 activations): s = max|x|/127, q = rint(x/s) in [-128, 127]."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (torch.clamp(torch.round(xf / s), -128, 127) * s).to(x.dtype)


def int8_activation_hooks(model: torch.nn.Module, modules: set[str]) -> list:
    """Round the inputs of ``modules`` (HF names) the way a W8A8 runtime does; returns hook handles."""
    return [mod.register_forward_pre_hook(lambda _m, args: (int8_per_token(args[0]), *args[1:]))
            for name, mod in model.named_modules() if name in modules and isinstance(mod, torch.nn.Linear)]


def int8_per_block(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX Runtime MatMulNBits at accuracy_level 4 (MLAS CompInt8): per ``block`` values along K (the weights'
    block length), symmetric int8 with an fp32 scale max|x|/127."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    s = xb.abs().amax(-1, keepdim=True) / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (torch.round(xb / s) * s).reshape(shape).to(x.dtype)


def uint8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """ONNX DynamicQuantizeLinear (ORT's W8A8 MatMulInteger graphs): one uint8 scale and zero point for the whole
    input, over [min(0, x), max(0, x)]."""
    xf = x.float()
    lo, hi = min(0.0, float(xf.min())), max(0.0, float(xf.max()))
    s = (hi - lo) / 255.0 or 1.0
    zp = min(255.0, max(0.0, round(-lo / s)))
    return ((torch.clamp(torch.round(xf / s) + zp, 0, 255) - zp) * s).to(x.dtype)


ACT_ROUNDING = ("none", "ggml", "nbits", "token", "tensor")  # what a format's runtime does to a linear's input


def activation_rounding(kind: str, grid) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The runtime's rounding of a linear's input for weights on ``grid``: llama.cpp (``ggml``: Q8_K per 256 for
    k-quants and IQ4, Q8_0/Q8_1 per 32 for the legacy types), ONNX Runtime's MatMulNBits (``nbits``: int8 per weight
    block), vLLM W8A8 (``token``: int8 per token), ORT's W8A8 graphs (``tensor``: uint8 per tensor); None where inputs
    stay floating point."""
    if kind == "ggml":
        t = getattr(grid, "type", None)
        if t is None or t in ("F16", "F32", "BF16"):
            return None
        return q8_k if t.endswith("_K") or t.startswith("IQ") else q8_0
    if kind == "nbits":
        gs = getattr(grid, "group_size", -1)
        return None if gs is None or gs <= 0 else (lambda x, gs=gs: int8_per_block(x, gs))
    if kind == "token":
        return int8_per_token
    if kind == "tensor":
        return uint8_per_tensor
    return None
