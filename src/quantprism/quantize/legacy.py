"""llama.cpp's 32-element block types — Q4_0, Q4_1, Q5_0, Q5_1 ("legacy quants") and IQ4_NL / IQ4_XS
(non-linear 4-bit) — re-derived in numpy, vectorised over blocks, bit-exact to ``ggml_quantize_chunk``.

llama.cpp writes these where a k-quant's 256-element super-block does not fit a row (hidden 576, 896, 960 …:
Q4_K → Q5_0, Q5_K → Q5_1, IQ4_XS → IQ4_NL) and as file types of their own (Q4_0, IQ4_XS). The same
float32 rules as kquants.py hold: C's evaluation order, sums in element order (``seqsum``), and the
rounding C uses — truncation ``(int8_t)(x + 8.5f)`` in the reference paths, round-half-even
(``nearest_int``) in the importance-weighted ones.

With an importance vector every row is weighted by ``qw · sqrt(σ² + x²)``, σ² the row's mean square.
"""
from __future__ import annotations

import numpy as np

from .kquants import EPS, F32, columns, fp16_round, make_qkx, make_qx, seqsum, sum0

QK = 32
# the 16 levels of IQ4_NL / IQ4_XS (kvalues_iq4nl in ggml-common.h): a non-uniform 4-bit grid
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)


def _blocks(x: np.ndarray) -> tuple[np.ndarray, int, int]:
    x = np.ascontiguousarray(x, dtype=F32)
    R, K = x.shape
    return x.reshape(R, K // QK, QK), R, K


def _row_weights(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """qw · sqrt(σ² + x²) per element, σ² = Σx²/K over the whole row (C: one running float sum)."""
    R, K = x.shape
    sigma2 = seqsum(x * x) / F32(K)
    qw = np.asarray(imatrix, dtype=F32)[None, :]
    return (qw * np.sqrt(sigma2[:, None] + x * x)).reshape(R, K // QK, QK)


def _signed_max(xb: np.ndarray) -> np.ndarray:
    """The element of largest |x| per block, the first one on ties (C's strict ``amax < fabsf(v)``)."""
    idx = np.abs(xb).argmax(axis=-1)
    return np.take_along_axis(xb, idx[..., None], -1)[..., 0]


def quantize_sym(x: np.ndarray, imatrix: np.ndarray | None, bits: int) -> dict[str, np.ndarray]:
    """Q4_0 (bits=4) / Q5_0 (bits=5): w = d·(q − 2^(b−1)). codes [R, K] in 0..2^b−1, d [R, K/32]."""
    xb, R, K = _blocks(x)
    half = 1 << (bits - 1)
    if imatrix is None:
        d = _signed_max(xb) / F32(-half)
        idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
        v = xb * idv[..., None] + F32(half + 0.5)
        codes = np.minimum(2 * half - 1, np.trunc(v)).astype(np.uint8)  # (int8_t) truncates
    else:
        w = _row_weights(xb.reshape(R, K), imatrix)
        d, codes = make_qx(xb.reshape(-1, QK), w.reshape(-1, QK), half)
    return {"codes": codes.reshape(R, K), "d": fp16_round(d).reshape(R, K // QK)}


def quantize_minmax(x: np.ndarray, imatrix: np.ndarray | None, bits: int) -> dict[str, np.ndarray]:
    """Q4_1 / Q5_1: w = d·q + m. codes [R, K] in 0..2^b−1, d and m [R, K/32] (fp16 values)."""
    xb, R, K = _blocks(x)
    nmax = (1 << bits) - 1
    if imatrix is None:
        mn, mx = xb.min(axis=-1), xb.max(axis=-1)
        d = (mx - mn) / F32(nmax)
        idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
        v = np.trunc((xb - mn[..., None]) * idv[..., None] + F32(0.5))
        codes = np.minimum(nmax, v).astype(np.uint8)  # Q5_1's (uint8_t) cast never exceeds 31 here
        m = mn
    else:
        w = _row_weights(xb.reshape(R, K), imatrix)
        d, the_min, codes = make_qkx(xb.reshape(-1, QK), w.reshape(-1, QK), nmax, -0.9, 0.05, 36, True)
        m = -the_min
    return {"codes": codes.reshape(R, K), "d": fp16_round(d).reshape(R, K // QK),
            "m": fp16_round(m).reshape(R, K // QK)}


# levels are integers, so #levels ≤ x equals #levels ≤ floor(x): tables over floor(x) replace the binary search
_FLOOR_MIN = -128
_MU = np.clip(np.searchsorted(IQ4_VALUES, np.arange(_FLOOR_MIN, 115, dtype=F32), side="right"), 1, 15).astype(np.uint8)
_LO, _HI = IQ4_VALUES[_MU - 1], IQ4_VALUES[_MU]


def iq4_index(x: np.ndarray) -> np.ndarray:
    """best_index_int8: the nearest IQ4 level, the upper one on exact ties, in float32 as C compares (beyond the
    end levels the comparison itself picks the end)."""
    cell = np.floor(x)
    np.clip(cell, _FLOOR_MIN, 114, out=cell)
    c = cell.astype(np.int16) - _FLOOR_MIN
    mu = _MU[c]
    return mu - (x - _LO[c] < _HI[c] - x).astype(np.uint8)


def _iq4_block_scales(xb: np.ndarray, w: np.ndarray, ntry: int = 7) -> np.ndarray:
    """Per 32-block scale d minimising Σw(x − d·v[q])² over llama.cpp's 2·ntry+1 candidate grids. xb, w [B, 32]."""
    mx = _signed_max(xb)
    zero = np.abs(mx) < EPS
    mxs = np.where(zero, F32(1), mx)
    x, w = columns(xb), columns(w)  # blocks as columns: the running sums add contiguous rows

    def sums(idv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = IQ4_VALUES[iq4_index(idv * x)]
        wq = w * q
        return sum0(wq * x), sum0(wq * q)

    d0 = -mxs / IQ4_VALUES[0]
    sqx, sq2 = sums(F32(1) / d0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sq2 > 0, sqx / sq2, F32(0)).astype(F32)
    best = d * sqx
    for itry in range(-ntry, ntry + 1):
        sqx, sq2 = sums(F32(itry + IQ4_VALUES[0]) / mxs)
        take = (sq2 > 0) & (sqx * sqx > best * sq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(take, sqx / np.where(take, sq2, F32(1)), d).astype(F32)
        best = np.where(take, d * sqx, best)
    return np.where(zero, F32(0), d)


def _iq4_weights(x: np.ndarray, imatrix: np.ndarray | None, super_block: int) -> np.ndarray:
    """Without an importance vector the weight is x²; with one, qw·sqrt(σ² + x²), σ² = 2·Σx²/super-block."""
    R, K = x.shape
    if imatrix is None:
        return x * x
    xs = x.reshape(R, K // super_block, super_block)
    sigma2 = seqsum(xs * xs) * F32(2.0 / super_block)
    qw = np.asarray(imatrix, dtype=F32).reshape(1, K // super_block, super_block)
    return (qw * np.sqrt(sigma2[..., None] + xs * xs)).reshape(R, K)


def quantize_iq4_nl(x: np.ndarray, imatrix: np.ndarray | None) -> dict[str, np.ndarray]:
    """IQ4_NL: w = d·v[q] per 32-block. codes [R, K] are level indices 0..15, d [R, K/32] (fp16 values)."""
    xb, R, K = _blocks(x)
    w = _iq4_weights(xb.reshape(R, K), imatrix, QK).reshape(-1, QK)
    d = _iq4_block_scales(xb.reshape(-1, QK), w)
    idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    codes = iq4_index(idv[:, None] * xb.reshape(-1, QK))
    return {"codes": codes.reshape(R, K), "d": fp16_round(d).reshape(R, K // QK)}


def quantize_iq4_xs(x: np.ndarray, imatrix: np.ndarray | None) -> dict[str, np.ndarray]:
    """IQ4_XS: w = d·(ls − 32)·v[q], one fp16 d per 256 and a 6-bit scale per 32.
    codes [R, K], d [R, K/256], sc int8 [R, K/256, 8] (ls − 32, in −32..31)."""
    xb, R, K = _blocks(x)
    S = K // 256
    w = _iq4_weights(xb.reshape(R, K), imatrix, 256).reshape(-1, QK)
    scales = _iq4_block_scales(xb.reshape(-1, QK), w).reshape(R * S, 8)
    idx = np.abs(scales).argmax(axis=1)  # C: strict '>' from 0, first largest |d|
    max_scale = np.take_along_axis(scales, idx[:, None], 1)[:, 0]
    d = -max_scale / F32(32)
    idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    ls = np.clip(np.rint(idv[:, None] * scales), -32, 31).astype(F32)
    dl = d[:, None] * ls
    idl = np.where(dl != 0, F32(1) / np.where(dl != 0, dl, F32(1)), F32(0))
    codes = iq4_index(idl[..., None] * xb.reshape(R * S, 8, QK))
    return {"codes": codes.reshape(R, K), "d": fp16_round(d).reshape(R, S), "sc": ls.astype(np.int8).reshape(R, S, 8)}


# Exact dequantization (ggml's dequantize_row_* in float32).

def dequant_sym(codes: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    R, K = codes.shape
    q = codes.reshape(R, K // QK, QK).astype(np.int16) - (1 << (bits - 1))
    return (q.astype(F32) * d[..., None]).reshape(R, K)


def dequant_minmax(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    R, K = codes.shape
    q = codes.reshape(R, K // QK, QK).astype(F32)
    return (q * d[..., None] + m[..., None]).reshape(R, K)


def dequant_iq4_nl(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    R, K = codes.shape
    return (d[..., None] * IQ4_VALUES[codes.reshape(R, K // QK, QK)]).reshape(R, K)


def dequant_iq4_xs(codes: np.ndarray, d: np.ndarray, sc: np.ndarray) -> np.ndarray:
    R, K = codes.shape
    dl = d[..., None] * sc.astype(F32)  # [R, S, 8]
    return (dl[..., None] * IQ4_VALUES[codes.reshape(R, K // 256, 8, QK)]).reshape(R, K)
