"""ONNX Runtime integer kernels that carry canonical codes verbatim (no rounding here).

- ``MatMulNBits`` (com.microsoft), weight-only, from ``IntGrid(4|8, block, sym|asym)``: B is uint8
  [N, n_blocks, block·bits/8] with codes packed low-bits-first along K, scales fp32 [N·n_blocks],
  zero points uint8 [N·ceil(n_blocks·bits/8)] packed the same way. Symmetric grids omit the zero
  points: ORT's default, 2^(bits−1), is exactly the grid's fixed zero.
- W8A8: ``DynamicQuantizeLinear`` (per-tensor uint8 activations) + ``MatMulInteger`` + scale ``Mul``
  from per-channel 8-bit grids. Weights are stored as the *unsigned* codes with zero point 128
  (U8U8), not as int8: MLAS's AVX2 U8S8 kernel sums pairs of u8·s8 products in int16 and saturates
  (measured on this CPU: up to 11% relative error), U8U8 is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..errors import ArtifactError
from ..quantize.grids import IntGrid, QuantizedTensor, grid_from_id

MS_DOMAIN = "com.microsoft"
NBITS = "MatMulNBits"
W8A8 = "MatMulInteger"


def kernel_for(gid: str) -> str:
    """Which ORT kernel runs a grid: ``MatMulNBits`` (grouped 4/8-bit) or ``MatMulInteger`` (8-bit per channel)."""
    g = grid_from_id(gid)
    if not isinstance(g, IntGrid):
        raise ArtifactError(f"grid {gid} has no ONNX Runtime kernel; ONNX targets use int grids (nbits8/nbits4/nbits2/w8a8)")
    if g.group_size == -1:
        if g.bits != 8:
            raise ArtifactError(f"grid {gid}: per-channel weights need 8 bits for MatMulInteger; use quant = \"w8a8\"")
        return W8A8
    bs = g.group_size
    if g.bits not in (2, 4, 8) or bs < 16 or bs & (bs - 1):
        raise ArtifactError(f"grid {gid}: MatMulNBits needs 2, 4 or 8 bits and a power-of-two block size ≥ 16 (e.g. 32, 128)")
    return NBITS


def _pack_along_k(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values [..., L] → bytes [..., L·bits/8], element j of a byte group in the low bits first."""
    v = values.astype(np.uint8)
    per = 8 // bits  # values per byte (2-bit: four, 4-bit: two)
    if per == 1:
        return np.ascontiguousarray(v)
    if v.shape[-1] % per:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], per - v.shape[-1] % per), np.uint8)], axis=-1)
    out = np.zeros((*v.shape[:-1], v.shape[-1] // per), np.uint8)
    for j in range(per):
        out |= v[..., j::per] << (bits * j)
    return np.ascontiguousarray(out)


def pack_nbits(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """MatMulNBits initializers of one weight: ``B``, ``scales`` and, for asymmetric grids, ``zero_points``."""
    g = qt.grid
    n, k = qt.codes.shape
    bs = g.group_size
    if k % bs:
        raise ArtifactError(f"{qt.grid_id}: in_features {k} is not a multiple of the block size {bs}")
    nb = k // bs
    out = {"B": _pack_along_k(qt.codes.reshape(n, nb, bs), g.bits),
           "scales": np.ascontiguousarray(qt.params["scale"], dtype=np.float32).reshape(n * nb)}
    zero = qt.params["zero"].reshape(n, nb)
    if g.symmetric:
        if not np.all(zero == 1 << (g.bits - 1)):
            raise ArtifactError(f"{qt.grid_id}: symmetric grid with a zero point other than {1 << (g.bits - 1)}")
    else:
        out["zero_points"] = _pack_along_k(zero, g.bits).reshape(-1)
    return out


def pack_w8a8(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """MatMulInteger initializers: unsigned codes transposed to [K, N], per-column scale and zero point."""
    g = qt.grid
    if g.group_size != -1 or g.bits != 8:
        raise ArtifactError(f"{qt.grid_id}: MatMulInteger takes per-channel 8-bit grids only")
    n, _ = qt.codes.shape
    zero = qt.params["zero"].reshape(n).astype(np.uint8)
    return {"B": np.ascontiguousarray(qt.codes.T, dtype=np.uint8),
            "scales": np.ascontiguousarray(qt.params["scale"], dtype=np.float32).reshape(n),
            "zero_point": np.array(128, np.uint8) if np.all(zero == 128) else zero}


@dataclass
class Replacement:
    """Nodes and initializers that compute one linear ``y = x @ W.T`` from its codes."""

    nodes: list[NodeProto]
    initializers: list[TensorProto]
    shared: dict[str, list[NodeProto]] = field(default_factory=dict)  # activation quantizers, keyed by input


def _inits(prefix: str, arrays: dict[str, np.ndarray]) -> tuple[list[TensorProto], dict[str, str]]:
    names = {k: f"{prefix}.{k}" for k in arrays}
    return [numpy_helper.from_array(a, names[k]) for k, a in arrays.items()], names


def nbits_nodes(module: str, x: str, y: str, qt: QuantizedTensor, accuracy_level: int) -> Replacement:
    """``y = MatMulNBits(x)``; accuracy_level 4 = int8 activations per block (ORT's fast CPU path)."""
    g = qt.grid
    n, k = qt.codes.shape
    inits, names = _inits(f"{module}.weight", pack_nbits(qt))
    ins = [x, names["B"], names["scales"]] + ([names["zero_points"]] if "zero_points" in names else [])
    node = helper.make_node(NBITS, ins, [y], name=f"{module}/{NBITS}", domain=MS_DOMAIN, K=k, N=n, bits=g.bits,
                            block_size=g.group_size, accuracy_level=accuracy_level)
    return Replacement([node], inits)


def w8a8_nodes(module: str, x: str, y: str, qt: QuantizedTensor) -> Replacement:
    """``y = (MatMulInteger(q(x), B) · x_scale · w_scale)`` with q = DynamicQuantizeLinear (shared per input)."""
    inits, names = _inits(f"{module}.weight", pack_w8a8(qt))
    xq, xs, xz = f"{x}/q", f"{x}/q_scale", f"{x}/q_zero"
    quant = helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=f"{x}/DynamicQuantizeLinear")
    p = f"{module}/{W8A8}"
    nodes = [
        helper.make_node(W8A8, [xq, names["B"], xz, names["zero_point"]], [f"{p}/int32"], name=p),
        helper.make_node("Cast", [f"{p}/int32"], [f"{p}/float"], name=f"{p}/Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [xs, names["scales"]], [f"{p}/scale"], name=f"{p}/Scale"),
        helper.make_node("Mul", [f"{p}/float", f"{p}/scale"], [y], name=f"{p}/Mul"),
    ]
    return Replacement(nodes, inits, {x: [quant]})


def linear_nodes(module: str, x: str, y: str, qt: QuantizedTensor, accuracy_level: int = 4) -> Replacement:
    if kernel_for(qt.grid_id) == NBITS:
        return nbits_nodes(module, x, y, qt, accuracy_level)
    return w8a8_nodes(module, x, y, qt)


def splice(proto, replaced: dict[str, list[NodeProto]], initializers: list[TensorProto], prune: bool = False) -> None:
    """Put each replaced node's new nodes in its place, add ``initializers``, drop initializers nothing reads (and,
    with ``prune``, nodes whose outputs nothing needs), and declare the com.microsoft opset the kernels use."""
    g = proto.graph
    nodes = [m for n in g.node for m in replaced.get(n.name, [n])]
    if prune:
        need, keep = {o.name for o in g.output}, []
        for n in reversed(nodes):  # e.g. the Transpose of a replaced weight
            if any(o in need for o in n.output):
                keep.append(n)
                need.update(n.input)
        nodes = keep[::-1]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(initializers)
    used = {x for n in g.node for x in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

