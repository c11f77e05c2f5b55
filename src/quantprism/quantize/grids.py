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

from ..errors import QuantprismError
from . import kquants as kq
from . import legacy as lg
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


DEQUANT_CHUNK_BYTES = 32 << 20


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
        """float32 [N, K], computed DEQUANT_CHUNK_BYTES of rows at a time (every grid's parameters are per row): a
        vocabulary-sized matrix never has its float32 temporaries (scales, zeros, codes) whole at once."""
        n, k = self.codes.shape
        rows = max(1, DEQUANT_CHUNK_BYTES // max(1, 4 * k))
        if n <= rows:
            return self.grid.dequantize(self.codes, self.params)
        out = np.empty((n, k), np.float32)
        for a in range(0, n, rows):
            out[a : a + rows] = self.grid.dequantize(self.codes[a : a + rows], {p: v[a : a + rows] for p, v in self.params.items()})
        return out

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


KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS")


@dataclass(frozen=True)
class _Layout:
    """How one GGML type reconstructs a weight inside a block: the encoder, its exact dequantizer, the columns
    one scale covers, and the code kind — "minmax" w = s·q − min, "sym" w = s·(q − offset) with q in [lo, hi],
    "nl" w = s·v[q] on the IQ4 levels."""

    encode: Any
    dequant: Any
    sub: int
    kind: str
    lo: int = 0
    hi: int = 0
    offset: int = 0


def _minmax_k(bits: int) -> _Layout:
    return _Layout(lambda x, i: kq.quantize_qk_minmax(x, i, bits),
                   lambda c, p: kq.dequant_qk_minmax(c, p["d"], p["dmin"], p["sc"], p["m"]), 32, "minmax", 0, (1 << bits) - 1)


def _legacy_sym(bits: int) -> _Layout:
    h = 1 << (bits - 1)
    return _Layout(lambda x, i: lg.quantize_sym(x, i, bits), lambda c, p: lg.dequant_sym(c, p["d"], bits),
                   32, "sym", 0, 2 * h - 1, h)


def _legacy_minmax(bits: int) -> _Layout:
    return _Layout(lambda x, i: lg.quantize_minmax(x, i, bits), lambda c, p: lg.dequant_minmax(c, p["d"], p["m"]),
                   32, "minmax", 0, (1 << bits) - 1)


LAYOUTS: dict[str, _Layout] = {
    "Q4_K": _minmax_k(4), "Q5_K": _minmax_k(5),
    "Q6_K": _Layout(kq.quantize_q6_k, lambda c, p: kq.dequant_q6_k(c, p["d"], p["sc"]), 16, "sym", 0, 63, 32),
    "Q8_0": _Layout(lambda x, i: kq.quantize_q8_0(x), lambda c, p: kq.dequant_q8_0(c, p["d"]), 32, "sym", 1, 255, 128),
    "Q4_0": _legacy_sym(4), "Q5_0": _legacy_sym(5), "Q4_1": _legacy_minmax(4), "Q5_1": _legacy_minmax(5),
    "IQ4_NL": _Layout(lg.quantize_iq4_nl, lambda c, p: lg.dequant_iq4_nl(c, p["d"]), 32, "nl"),
    "IQ4_XS": _Layout(lg.quantize_iq4_xs, lambda c, p: lg.dequant_iq4_xs(c, p["d"], p["sc"]), 32, "nl"),
}


def _block_scale_min(t: str, p: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sub-block effective scale [N, n_sub] and min (w = s·q − min) of one fitted block."""
    if t in ("Q4_K", "Q5_K"):
        return p["d"][:, 0:1] * p["sc"][:, 0].float(), p["dmin"][:, 0:1] * p["m"][:, 0].float()
    if t in ("Q6_K", "IQ4_XS"):
        return p["d"][:, 0:1] * p["sc"][:, 0].float(), None
    return p["d"][:, 0:1], (-p["m"][:, 0:1] if "m" in p else None)


@dataclass(frozen=True)
class KQuantGrid:
    """llama.cpp block types (k-quants, legacy 32-blocks, IQ4). ``imatrix``: fit with importance weights
    (llama.cpp's *_impl path); Q8_0 ignores it, as ggml does."""

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
        return LAYOUTS[self.type].encode(w, imp if self.imatrix else None)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None, clip: bool) -> Params:
        """llama.cpp's own parameter search on the (error-updated) block; the codes are discarded."""
        imp = None if importance is None else importance.float().numpy()
        enc = self._encode(w.float().numpy(), imp)
        p: Params = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.items() if k != "codes"}
        p["_scale"], mn = _block_scale_min(self.type, p)
        if mn is not None:
            p["_min"] = mn
        return p

    def quant_col(self, w: torch.Tensor, p: Params, j: int) -> torch.Tensor:
        lay = LAYOUTS[self.type]
        sub = j // lay.sub
        s = p["_scale"][:, sub]
        nz = s != 0
        ss = torch.where(nz, s, torch.ones_like(s))
        if lay.kind == "minmax":
            q = torch.clamp(torch.round((w + p["_min"][:, sub]) / ss), lay.lo, lay.hi)
        elif lay.kind == "sym":
            q = torch.clamp(torch.round(w / ss) + lay.offset, lay.lo, lay.hi)
        else:
            q = torch.from_numpy(lg.iq4_index((w / ss).numpy().astype(np.float32))).float()
        return torch.where(nz, q, torch.zeros_like(q) + lay.offset)

    def dequant_col(self, q: torch.Tensor, p: Params, j: int) -> torch.Tensor:
        lay = LAYOUTS[self.type]
        sub = j // lay.sub
        s = p["_scale"][:, sub]
        if lay.kind == "minmax":
            return s * q - p["_min"][:, sub]
        if lay.kind == "sym":
            return s * (q - lay.offset)
        return s * torch.from_numpy(lg.IQ4_VALUES)[q.long()]

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
        return LAYOUTS[self.type].dequant(codes, params)


def grid_from_id(gid: str) -> Any:
    """Inverse of ``grid.id`` (used when a cached CanonicalModel is read back)."""
    if gid.startswith("int"):
        parts = gid.split("_")
        bits = int(parts[0][3:])
        g = parts[1][1:]
        flags = parts[3:-1]
        return IntGrid(bits, -1 if g == "c" else int(g), parts[2] == "sym", parts[-1], "n" in flags, "r" in flags)
    t = gid.split("_imat")[0].upper()
    if t not in LAYOUTS:
        raise QuantprismError(f"unknown grid id {gid!r}")
    return KQuantGrid(t, gid.endswith("_imat"))
