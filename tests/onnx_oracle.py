"""Independent readers of ONNX Runtime's integer kernels, written from the operator specs (no quantprism imports).

- com.microsoft MatMulNBits (onnxruntime docs/ContribOperators.md): Y = A @ dequant(B)ᵀ with B uint8
  [N, n_blocks, block_size·bits/8], codes packed low bits first along K; scales [N·n_blocks];
  zero_points uint8 [N·ceil(n_blocks·bits/8)] packed the same way, default 2^(bits−1).
  accuracy_level 4 on CPU quantizes A per block of block_size to int8: s = max|a|/127, q = rint(a/s).
- ONNX MatMulInteger after DynamicQuantizeLinear: x_scale = (max(0, max x) − min(0, min x))/255,
  x_zero = rint(−min(0, min x)/x_scale) saturated to uint8, q = saturate(rint(x/x_scale) + x_zero).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 bytes [..., L] → values [..., count], element 0 in the lowest bits."""
    per = 8 // bits
    mask = (1 << bits) - 1
    vals = np.stack([(packed >> (bits * j)) & mask for j in range(per)], axis=-1)
    return vals.reshape(*packed.shape[:-1], -1)[..., :count]


def decode_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
                 block_size: int) -> np.ndarray:
    """W [N, K] fp32 from MatMulNBits initializers."""
    n_blocks = -(-k // block_size)
    q = _unpack(b.reshape(n, n_blocks, -1), bits, block_size).astype(np.float32)
    if zero_points is None:
        z = np.full((n, n_blocks), float(1 << (bits - 1)), np.float32)
    elif zero_points.dtype == np.uint8:
        z = _unpack(zero_points.reshape(n, -1), bits, n_blocks).astype(np.float32)
    else:
        z = zero_points.reshape(n, n_blocks).astype(np.float32)
    s = scales.reshape(n, n_blocks).astype(np.float32)
    return (s[:, :, None] * (q - z[:, :, None])).reshape(n, -1)[:, :k]


def decode_matmul_integer(b: np.ndarray, b_zero: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """W [N, K] fp32 from MatMulInteger's B [K, N], its zero point (scalar or per column) and the column scales."""
    q = b.astype(np.float32) - np.broadcast_to(b_zero.astype(np.float32), (b.shape[1],))[None, :]
    return (q * scales.astype(np.float32)[None, :]).T


def kernel_weights(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray]]:
    """{node name: (op type, W [N, K])} for every MatMulNBits / MatMulInteger node of the graph."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    out = {}
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
            w = decode_nbits(inits[node.input[1]], inits[node.input[2]], zp, attrs["K"], attrs["N"],
                             attrs.get("bits", 4), attrs["block_size"])
            out[node.name] = ("MatMulNBits", w)
        elif node.op_type == "MatMulInteger":
            # follow int32 → Cast → Mul(·, x_scale · w_scale): the weight scale is the Mul's initializer input
            cast = consumers[node.output[0]][0]
            mul = consumers[cast.output[0]][0]
            scale_node = next(n for n in g.node if n.output[0] in mul.input and n.op_type == "Mul")
            w_scale = next(inits[x] for x in scale_node.input if x in inits)
            out[node.name] = ("MatMulInteger", decode_matmul_integer(inits[node.input[1]], inits[node.input[3]], w_scale))
    return out


def a4_round(x: torch.Tensor, block: int) -> torch.Tensor:
    """MatMulNBits accuracy_level 4: int8 per block of the activation row, fp32 scale max|x|/127, round half even."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    s = amax / 127.0
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return (torch.round(xb / safe) * s).reshape(x.shape).to(x.dtype)


def dynamic_uint8_round(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear round trip over the whole tensor (one scale and zero point)."""
    xf = x.float()
    lo = torch.clamp(xf.min(), max=0.0)
    hi = torch.clamp(xf.max(), min=0.0)
    s = (hi - lo) / 255.0
    if float(s) == 0:
        return x
    z = torch.clamp(torch.round(-lo / s), 0, 255)
    q = torch.clamp(torch.round(xf / s) + z, 0, 255)
    return ((q - z) * s).to(x.dtype)


def ort_activation_hooks(model: torch.nn.Module, kernels: dict[str, str], block: dict[str, int]) -> list:
    """Round each quantized linear's input the way its ORT kernel does; returns hook handles."""
    handles = []
    for name, mod in model.named_modules():
        kind = kernels.get(name)
        if kind == "MatMulNBits":
            def fn(x, b=block[name]):
                return a4_round(x, b)
        elif kind == "MatMulInteger":
            fn = dynamic_uint8_round
        else:
            continue
        handles.append(mod.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:])))
    return handles
