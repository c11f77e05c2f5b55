"""Grids: the values a runtime can represent, with their block geometry.

A grid is fitted per group of input columns (``group_cols``): ``fit`` chooses the group's
parameters from (possibly error-updated) weights and an importance vector; ``quant_col`` /
``dequant_col`` round and reconstruct one column inside the group, which is what GPTQ needs;
``rtn`` quantizes a whole tensor by round-to-nearest. ``QuantizedTensor.dequantize()`` gives the
exact fp32 weights every runtime must reproduce.

Codes are uint8 everywhere: unsigned levels ``0..2^b-1`` (symmetric int grids use the GPTQ
convention ``w = s·(q − 2^(b−1))``; Q8_0 and int8 per-channel store ``q + 128``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from . import kquants as kq
from .ggml_types import GGML_TYPES

Params = dict[str, torch.Tensor]
CLIP_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76)


class Grid(Protocol):
    id: str
    bits: float

    def group_cols(self, k: int) -> int: ...
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None, clip: bool) -> Params: ...
    def quant_col(self, w: torch.Tensor, p: Params, j: int) -> torch.Tensor: ...
    def dequant_col(self, q: torch.Tensor, p: Params, j: int) -> torch.Tensor: ...
    def rtn(self, w: torch.Tensor, importance: torch.Tensor | None, clip: bool) -> QuantizedTensor: ...
    def dequantize(self, codes: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray: ...
    def stack(self, groups: list[Params], codes: torch.Tensor) -> QuantizedTensor: ...


@dataclass
class QuantizedTensor:
    """Integer codes [N, K] plus the grid's parameters (numpy), and the grid that reads them."""

    grid_id: str
    codes: np.ndarray
    params: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def grid(self) -> Grid:
        return grid_from_id(self.grid_id)

    def dequantize(self) -> np.ndarray:
        return self.grid.dequantize(self.codes, self.params)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def _round_scale(s: torch.Tensor, dtype: str) -> torch.Tensor:
    """Scales are stored by the runtimes in fp16/bf16: the canonical value must be representable."""
    if dtype == "fp32":
        return s
    return s.to(torch.float16 if dtype == "fp16" else torch.bfloat16).float()


@dataclass(frozen=True)
class IntGrid:
    """Uniform integer grid: ``bits`` 2–8, groups of ``group_size`` input columns (-1 = per channel).

    symmetric: q ∈ [0, 2^b−1], w = s·(q − 2^(b−1)) (GPTQ / CT-sym convention, zero fixed).
    asymmetric: w = s·(q − z), integer z ∈ [0, 2^b−1] per group (AWQ / CT-asym).
    ``narrow`` (symmetric only) restricts to ±(2^(b−1)−1), the int8 per-channel convention.
    ``reduced`` (narrow int8 only) restricts to ±63: x86 int8 GEMMs without VNNI (AVX2 vpmaddubsw) add
    two u8×s8 products in a saturating int16, which overflows for full-range weights; with |w| ≤ 63 a
    pair is at most 255·126 < 32767, so the runtime computes exactly (PyTorch's ``reduce_range``).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "fp16"
    narrow: bool = False
    reduced: bool = False

    @property
    def id(self) -> str:
        g = "c" if self.group_size == -1 else str(self.group_size)
        sfx = ("_n" if self.narrow else "") + ("_r" if self.reduced else "")
        return f"int{self.bits}_g{g}_{'sym' if self.symmetric else 'asym'}{sfx}_{self.scale_dtype}"

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_cols(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def _params_for(self, wmin: torch.Tensor, wmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = 1 << (self.bits - 1)
        if self.symmetric:
            amax = torch.maximum(wmin.abs(), wmax.abs())
            denom = (half // 2 - 1) if self.reduced else (half - 1) if self.narrow else (self.maxq / 2)
            scale = _round_scale(amax / denom, self.scale_dtype)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.full_like(scale, float(half))
        else:
            wmin = torch.minimum(wmin, torch.zeros_like(wmin))
            wmax = torch.maximum(wmax, torch.zeros_like(wmax))
            scale = _round_scale((wmax - wmin) / self.maxq, self.scale_dtype)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.clamp(torch.round(-wmin / scale), 0, self.maxq)
        return scale, zero

    def _qrange(self) -> tuple[int, int]:
        if self.reduced:
            half = 1 << (self.bits - 1)
            return half - (half // 2 - 1), half + (half // 2 - 1)
        if self.narrow:
            return 1, self.maxq
        return 0, self.maxq

    def _q(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        lo, hi = self._qrange()
        return torch.clamp(torch.round(w / scale) + zero, lo, hi)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None, clip: bool) -> Params:
        """Per-row scale/zero for the group ``w`` [N, c]; ``clip`` searches a shrunken range."""
        wmin, wmax = w.min(dim=1).values, w.max(dim=1).values
        scale, zero = self._params_for(wmin, wmax)
        if clip:
            imp = importance if importance is not None else torch.ones(w.shape[1])
            best = None
            for p in CLIP_SHRINK:
                s, z = self._params_for(wmin * p, wmax * p)
                err = (((self._q(w, s[:, None], z[:, None]) - z[:, None]) * s[:, None] - w) ** 2 * imp).sum(1)
                if best is None:
                    best, scale, zero = err, s, z
                else:
                    take = err < best
                    best = torch.where(take, err, best)
                    scale = torch.where(take, s, scale)
                    zero = torch.where(take, z, zero)
        return {"scale": scale, "zero": zero}

    def quant_col(self, w: torch.Tensor, p: Params, j: int) -> torch.Tensor:
        return self._q(w, p["scale"], p["zero"])

    def dequant_col(self, q: torch.Tensor, p: Params, j: int) -> torch.Tensor:
        return p["scale"] * (q - p["zero"])

    def stack(self, groups: list[Params], codes: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(self.id, codes.to(torch.uint8).numpy(), {
            "scale": torch.stack([g["scale"] for g in groups], 1).float().numpy(),
            "zero": torch.stack([g["zero"] for g in groups], 1).to(torch.uint8).numpy(),
        })

    def rtn(self, w: torch.Tensor, importance: torch.Tensor | None, clip: bool) -> QuantizedTensor:
        n, k = w.shape
        gc = self.group_cols(k)
        groups, codes = [], []
        for g0 in range(0, k, gc):
            imp = None if importance is None else importance[g0 : g0 + gc]
            p = self.fit(w[:, g0 : g0 + gc], imp, clip)
            groups.append(p)
            codes.append(self._q(w[:, g0 : g0 + gc], p["scale"][:, None], p["zero"][:, None]))
        return self.stack(groups, torch.cat(codes, 1))

    def dequantize(self, codes: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
        n, k = codes.shape
        gc = self.group_cols(k)
        s = np.repeat(params["scale"].astype(np.float32), gc, axis=1)
        z = np.repeat(params["zero"].astype(np.float32), gc, axis=1)
        return s * (codes.astype(np.float32) - z)


def Int8ChannelGrid(scale_dtype: str = "fp32") -> IntGrid:  # noqa: N802 (a grid constructor, named like one)
    """Per-output-channel symmetric int8 in ±127 (ONNX MatMulInteger, compressed-tensors W8A8)."""
    return IntGrid(bits=8, group_size=-1, symmetric=True, scale_dtype=scale_dtype, narrow=True)


KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class KQuantGrid:
    """llama.cpp block types. ``imatrix``: fit with importance weights (llama.cpp's *_impl path)."""

    type: str = "Q4_K"
    imatrix: bool = True

    @property
    def id(self) -> str:
        return f"{self.type.lower()}{'_imat' if self.imatrix and self.type != 'Q8_0' else ''}"

    @property
    def bits(self) -> float:
        return GGML_TYPES[self.type].bits

    def group_cols(self, k: int) -> int:
        return GGML_TYPES[self.type].block

    def _encode(self, w: np.ndarray, imp: np.ndarray | None) -> dict[str, np.ndarray]:
        imp = imp if self.imatrix else None
        if self.type in ("Q4_K", "Q5_K"):
            return kq.quantize_qk_minmax(w, imp, 4 if self.type == "Q4_K" else 5)
        if self.type == "Q6_K":
            return kq.quantize_q6_k(w, imp)
        return kq.quantize_q8_0(w)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None, clip: bool) -> Params:
        """llama.cpp's own parameter search on the (error-updated) block; the codes are discarded."""
        imp = None if importance is None else importance.float().numpy()
        enc = self._encode(w.float().numpy(), imp)
        p: Params = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.items() if k != "codes"}
        if self.type in ("Q4_K", "Q5_K"):
            p["_scale"] = p["d"][:, 0:1] * p["sc"][:, 0].float()  # [N, 8] per-sub-block scale
            p["_min"] = p["dmin"][:, 0:1] * p["m"][:, 0].float()
        elif self.type == "Q6_K":
            p["_scale"] = p["d"][:, 0:1] * p["sc"][:, 0].float()  # [N, 16]
        return p

    def _col_scale(self, p: Params, j: int) -> torch.Tensor:
        if self.type == "Q8_0":
            return p["d"][:, 0]
        sub = j // (32 if self.type in ("Q4_K", "Q5_K") else 16)
        return p["_scale"][:, sub]

    def quant_col(self, w: torch.Tensor, p: Params, j: int) -> torch.Tensor:
        s = self._col_scale(p, j)
        nz = s != 0
        ss = torch.where(nz, s, torch.ones_like(s))
        if self.type in ("Q4_K", "Q5_K"):
            dm = p["_min"][:, j // 32]
            q = torch.clamp(torch.round((w + dm) / ss), 0, 15 if self.type == "Q4_K" else 31)
        elif self.type == "Q6_K":
            q = torch.clamp(torch.round(w / ss), -32, 31) + 32
        else:
            q = torch.clamp(torch.round(w / ss), -127, 127) + 128
        return torch.where(nz, q, torch.zeros_like(q) + (32 if self.type == "Q6_K" else 128 if self.type == "Q8_0" else 0))

    def dequant_col(self, q: torch.Tensor, p: Params, j: int) -> torch.Tensor:
        s = self._col_scale(p, j)
        if self.type in ("Q4_K", "Q5_K"):
            return s * q - p["_min"][:, j // 32]
        return s * (q - (32 if self.type == "Q6_K" else 128))

    def stack(self, groups: list[Params], codes: torch.Tensor) -> QuantizedTensor:
        keys = [k for k in groups[0] if not k.startswith("_")]
        params = {k: np.concatenate([g[k].numpy() for g in groups], axis=1) for k in keys}
        return QuantizedTensor(self.id, codes.to(torch.uint8).numpy(), params)

    def rtn(self, w: torch.Tensor, importance: torch.Tensor | None, clip: bool) -> QuantizedTensor:
        imp = None if importance is None else importance.float().numpy()
        enc = self._encode(w.float().numpy(), imp)
        codes = enc.pop("codes")
        return QuantizedTensor(self.id, codes, enc)

    def dequantize(self, codes: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
        if self.type in ("Q4_K", "Q5_K"):
            return kq.dequant_qk_minmax(codes, params["d"], params["dmin"], params["sc"], params["m"])
        if self.type == "Q6_K":
            return kq.dequant_q6_k(codes, params["d"], params["sc"])
        return kq.dequant_q8_0(codes, params["d"])


def grid_from_id(gid: str) -> Any:
    """Inverse of ``grid.id`` (used when a cached CanonicalModel is read back)."""
    if gid.startswith("int"):
        parts = gid.split("_")
        bits = int(parts[0][3:])
        g = parts[1][1:]
        flags = parts[3:-1]
        return IntGrid(bits, -1 if g == "c" else int(g), parts[2] == "sym", parts[-1], "n" in flags, "r" in flags)
    t = gid.split("_imat")[0].upper()
    if t.startswith("Q8"):
        t = "Q8_0"
    return KQuantGrid(t, gid.endswith("_imat"))
