"""Packing small unsigned integers into int32 words, LSB first (the layout every vLLM 4/8-bit format uses),
and the checked view of a canonical int-grid tensor that every vLLM packer starts from."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ArtifactError
from ..quantize.grids import IntGrid, QuantizedTensor


def pack_int32(values: np.ndarray, bits: int, axis: int, order: Sequence[int] | None = None) -> np.ndarray:
    """Pack ``values`` (each in 0..2^bits−1) along ``axis``: field i of word c holds element
    ``f·c + order[i]`` (f = 32/bits; ``order`` defaults to 0..f−1). Returns int32 with that axis ÷ f."""
    f = 32 // bits
    v = np.moveaxis(np.asarray(values).astype(np.uint32), axis, -1)
    if v.shape[-1] % f:
        raise ValueError(f"axis of length {v.shape[-1]} is not a multiple of {f}")
    if np.any(v >> bits):
        raise ValueError(f"values do not fit in {bits} bits")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // f, f)
    if order is not None:
        v = v[..., list(order)]
    shifts = (bits * np.arange(f, dtype=np.uint32)).astype(np.uint32)
    words = np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint32)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


@dataclass(frozen=True)
class IntCodes:
    """An int-grid tensor checked for export: codes [N, K], scale/zero [N, G], group size in columns."""

    bits: int
    symmetric: bool
    group_size: int  # -1 = one group per row
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray

    @property
    def groups(self) -> int:
        return self.scale.shape[1]


def int_codes(qt: QuantizedTensor, name: str, scale_dtype: type = np.float16) -> IntCodes:
    """Unpack a canonical int-grid tensor, refusing what the packers would silently get wrong."""
    g = qt.grid
    if not isinstance(g, IntGrid):
        raise ArtifactError(f"{name}: grid {qt.grid_id} is not an integer grid; re-run quantize for this target")
    n, k = qt.codes.shape
    gc = g.group_cols(k)
    scale = np.asarray(qt.params["scale"], dtype=np.float32)
    zero = np.asarray(qt.params["zero"])
    if k % gc or scale.shape != (n, k // gc) or zero.shape != scale.shape:
        raise ArtifactError(f"{name}: {qt.grid_id} parameters do not match a {n}x{k} weight; re-run quantize")
    if not np.array_equal(scale.astype(scale_dtype).astype(np.float32), scale):
        raise ArtifactError(f"{name}: {qt.grid_id} scales are not {np.dtype(scale_dtype).name}-exact; re-run quantize")
    if g.symmetric and np.any(zero != 1 << (g.bits - 1)):
        raise ArtifactError(f"{name}: symmetric grid {qt.grid_id} has zero points other than {1 << (g.bits - 1)}")
    return IntCodes(g.bits, g.symmetric, g.group_size, np.asarray(qt.codes, dtype=np.uint8), scale, zero.astype(np.uint8))
