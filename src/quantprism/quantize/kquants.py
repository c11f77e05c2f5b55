"""llama.cpp's k-quant and Q8_0 encoders, re-derived in numpy and vectorised over blocks.

Written from the algorithm description in shared/reference/gguf-kquants.md §2 (read against
ggml-quants.c). Bit-exactness with ``ggml_quantize_chunk`` needs three things everywhere:
float32 arithmetic with C's evaluation order (``w*l*x`` is ``(w*l)*x``), sums accumulated in
element order (never numpy's pairwise reduction), and round-half-to-even (``np.rint``) except
Q8_0, which uses C ``roundf`` (half away from zero).

Every encoder returns codes plus the block parameters in decoded form (fp16 super-scales, integer
sub-block scales/mins); packing into bytes lives in exporters/kquants.py.
"""
from __future__ import annotations

import numpy as np

from .ggml_types import QK_K

F32 = np.float32
EPS = F32(1e-15)


def _f(x: float) -> np.float32:
    return F32(x)


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in element order (C's loop), float32."""
    return sum0(np.ascontiguousarray(np.moveaxis(np.asarray(a, dtype=F32), -1, 0)))


def sum0(t: np.ndarray) -> np.ndarray:
    """Sum over the FIRST axis in element order, float32: the hot loops keep blocks as columns ([n, B]), so each
    step adds one contiguous row."""
    acc = t[0].astype(F32, copy=True)
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def columns(a: np.ndarray) -> np.ndarray:
    """[B, n] → contiguous float32 [n, B] (the layout sum0 reads fast)."""
    return np.ascontiguousarray(np.asarray(a, dtype=F32).T)


def fp16_round(x: np.ndarray) -> np.ndarray:
    """float32 → fp16 (round to nearest even) → float32, as GGML_FP32_TO_FP16 then back."""
    return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             degenerate_le: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants over blocks x, w [B, n]: (scale [B], the_min [B], L [B, n]).

    The current best ``min`` re-centres every later candidate grid (C overwrites it on accept).
    ``degenerate_le``: qkx3 tests ``max <= min``, qkx2 tests ``max == min``. Blocks are columns inside.
    """
    x = columns(x)
    w = columns(w)
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = sum0(w)
    sum_x = sum0(w * x)
    mn = np.where(mn > 0, F32(0), mn)
    degenerate = (mx <= mn) if degenerate_le else (mx == mn)
    rng = np.where(degenerate, F32(1), mx - mn)
    iscale = _f(nmax) / rng
    scale = F32(1) / iscale
    L = np.clip(np.rint(iscale * (x - mn)), 0, nmax).astype(F32)
    diff = scale * L + mn - x
    best = sum0(w * (diff * diff))
    for step in range(nstep + 1):
        # the denominator also uses the current best min (C's `max - min` after overwrites)
        cur = np.where(degenerate, F32(1), mx - mn)
        isc = (_f(rmin) + _f(rdelta) * _f(step) + _f(nmax)) / cur
        La = np.clip(np.rint(isc * (x - mn)), 0, nmax).astype(F32)
        wl = w * La
        sum_l = sum0(wl)
        sum_l2 = sum0(wl * La)
        sum_xl = sum0(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            alt = sum_xl / sum_l2
        this_scale = np.where(pos, alt, this_scale)
        this_min = np.where(pos, F32(0), this_min)
        d2 = this_scale * La + this_min - x
        err = sum0(w * (d2 * d2))
        take = ok & (err < best) & ~degenerate
        L = np.where(take, La, L)
        best = np.where(take, err, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    scale = np.where(degenerate, F32(0), scale)
    L = np.where(degenerate, F32(0), L)
    return scale.astype(F32), (-mn).astype(F32), np.ascontiguousarray(L.T).astype(np.uint8)


def make_qp(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants over rows x, qw [B, n] (non-negative values): (scale [B], L [B, n])."""
    x = x.astype(F32, copy=False)
    qw = qw.astype(F32, copy=False)
    B, n = x.shape
    mx = np.maximum(F32(0), x.max(axis=1))
    zero = mx < EPS
    mxs = np.where(zero, F32(1), mx)
    iscale = _f(nmax) / mxs
    L0 = np.rint(iscale[:, None] * x)
    s0 = F32(1) / iscale
    diff = x - s0[:, None] * L0.astype(F32)
    best = seqsum(qw * diff * diff)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (_f(0.1) * _f(k) + _f(nmax)) / mxs
        s = F32(1) / isc
        lk = np.minimum(nmax, np.rint(isc[:, None] * x)).astype(F32)
        d = x - s[:, None] * lk
        mse = seqsum(qw * d * d)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, isc, iscale)
    L = np.minimum(nmax, np.rint(iscale[:, None] * x)).astype(F32)
    sumlx = seqsum(qw * x * L)
    suml2 = seqsum(qw * L * L)
    for _ in range(5):  # coordinate descent; a pass without change leaves the state fixed
        for i in range(n):
            w, xi, li = qw[:, i], x[:, i], L[:, i]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            ok = (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                nl = np.minimum(nmax, np.rint(xi * sl2 / np.where(ok, slx, F32(1)))).astype(F32)
            change = ok & (nl != li)
            slx2 = slx + w * xi * nl
            sl22 = sl2 + w * nl * nl
            accept = change & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(accept, nl, li)
            sumlx = np.where(accept, slx2, sumlx)
            suml2 = np.where(accept, sl22, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], F32(0), L)
    return scale, L.astype(np.uint8)


def make_qx(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants (rmse_type 1) over blocks x [B, n]: (scale [B], L [B, n] in 0..2*nmax-1)."""
    idx = np.abs(x).argmax(axis=1)  # first index of the largest |x|
    m = np.take_along_axis(np.asarray(x, dtype=F32), idx[:, None], 1)[:, 0]
    x = columns(x)
    w = (x * x) if qw is None else columns(qw)
    zero = np.abs(m) < EPS
    ms = np.where(zero, F32(1), m)

    def grid(isc):
        return np.clip(np.rint(isc * x), -nmax, nmax - 1).astype(F32)

    wx = w * x
    isc = -_f(nmax) / ms
    lq = grid(isc)
    slx = sum0(wx * lq)
    sl2 = sum0(w * lq * lq)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sl2 != 0, slx / sl2, F32(0)).astype(F32)
    best = scale * slx
    L = lq
    for k in range(-9, 10):
        if k == 0:
            continue
        isc = -(_f(nmax) + _f(0.1) * _f(k)) / ms
        lk = grid(isc)
        sx = sum0(wx * lk)
        s2 = sum0(w * lk * lk)
        take = (s2 > 0) & (sx * sx > best * s2)
        with np.errstate(divide="ignore", invalid="ignore"):
            ns = np.where(take, sx / np.where(take, s2, F32(1)), scale)
        L = np.where(take, lk, L)
        scale = ns.astype(F32)
        best = np.where(take, scale * sx, best)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero, F32(-nmax), L)
    return scale, np.ascontiguousarray((L + nmax).T).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Whole-row encoders. x: float32 [rows, K]; imatrix: float32 [K] or None.
# --------------------------------------------------------------------------------------------

def _pack_scale_min_6bit(ls: np.ndarray, lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Values are stored through uint8_t then MIN(63): nearest_int's int wraps mod 256 first.
    return np.minimum(63, ls.astype(np.int64) & 0xFF).astype(np.uint8), np.minimum(63, lm.astype(np.int64) & 0xFF).astype(np.uint8)


def _requant_k(xb: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray,
               Lsearch: np.ndarray, nmax: int) -> np.ndarray:
    """L = clip(rint((x + dmin*m) / (d*sc))), keeping the search's L where d*sc == 0. xb [S, 8, 32]."""
    dj = d[:, None] * sc.astype(F32)  # [S, 8]
    dm = dmin[:, None] * m.astype(F32)
    nz = dj != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((xb + dm[..., None]) / np.where(nz, dj, F32(1))[..., None])
    q = np.clip(q, 0, nmax).astype(np.uint8)
    return np.where(nz[..., None], q, Lsearch)


def quantize_qk_minmax(x: np.ndarray, imatrix: np.ndarray | None, bits: int) -> dict[str, np.ndarray]:
    """Q4_K (bits=4) / Q5_K (bits=5). Returns codes [R, K] and d, dmin [R, S] f32 (fp16 values), sc, m [R, S, 8]."""
    x = np.ascontiguousarray(x, dtype=F32)
    R, K = x.shape
    S = K // QK_K
    nmax = (1 << bits) - 1
    xb = x.reshape(R * S, 8, 32)
    if imatrix is None:
        sum_x2 = seqsum(xb * xb)  # [RS, 8]
        av = np.sqrt(sum_x2 / F32(32))
        w = av[..., None] + np.abs(xb)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if bits == 4 else (-0.5, 0.1, 15)
        scale, the_min, L = make_qkx(xb.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, rdelta, nstep, False)
        scale = scale.reshape(R * S, 8)
        the_min = the_min.reshape(R * S, 8)
        # C keeps a running max starting at +0 and only takes strictly larger values (never -0).
        max_s = np.where(scale.max(axis=1) > 0, scale.max(axis=1), F32(0))
        max_m = np.where(the_min.max(axis=1) > 0, the_min.max(axis=1), F32(0))
        inv_s = np.where(max_s > 0, F32(63) / np.where(max_s > 0, max_s, F32(1)), F32(0))
        inv_m = np.where(max_m > 0, F32(63) / np.where(max_m > 0, max_m, F32(1)), F32(0))
        ls, lm = _pack_scale_min_6bit(np.rint(inv_s[:, None] * scale), np.rint(inv_m[:, None] * the_min))
        d = fp16_round(max_s / F32(63))
        dmin = fp16_round(max_m / F32(63))
    else:
        qw = np.asarray(imatrix, dtype=F32).reshape(S, 8, 32)
        xs = x.reshape(R * S, QK_K)
        sigma2 = F32(2) * seqsum(xs * xs) / F32(QK_K)  # [RS]
        qwb = np.broadcast_to(qw[None], (R, S, 8, 32)).reshape(R * S, 8, 32)
        w = qwb * np.sqrt(sigma2[:, None, None] + xb * xb)
        sw = seqsum(w)  # [RS, 8]
        scale, the_min, L = make_qkx(xb.reshape(-1, 32), w.reshape(-1, 32), nmax, -0.9, 0.05, 36, True)
        scale = scale.reshape(R * S, 8)
        the_min = the_min.reshape(R * S, 8)
        d_blk, ls = make_qp(scale, sw, 63)
        m_blk, lm = make_qp(the_min, sw, 63)
        d = fp16_round(d_blk)
        dmin = fp16_round(m_blk)
    L = L.reshape(R * S, 8, 32)
    codes = _requant_k(xb, d, dmin, ls, lm, L, nmax)
    return {
        "codes": codes.reshape(R, K),
        "d": d.reshape(R, S), "dmin": dmin.reshape(R, S),
        "sc": ls.reshape(R, S, 8), "m": lm.reshape(R, S, 8),
    }


def quantize_q6_k(x: np.ndarray, imatrix: np.ndarray | None) -> dict[str, np.ndarray]:
    """Q6_K. Returns codes [R, K] in 0..63, d [R, S] f32 (fp16 values), sc int8 [R, S, 16]."""
    x = np.ascontiguousarray(x, dtype=F32)
    R, K = x.shape
    S = K // QK_K
    xb = x.reshape(R * S, 16, 16)
    qw = None
    if imatrix is not None:
        qw = np.broadcast_to(np.asarray(imatrix, dtype=F32).reshape(S, 16, 16)[None], (R, S, 16, 16)).reshape(-1, 16)
    scale, L = make_qx(xb.reshape(-1, 16), qw, 32)
    scale = scale.reshape(R * S, 16)
    L = L.reshape(R * S, 16, 16)
    a = np.abs(scale)
    idx = a.argmax(axis=1)  # first max wins, as C's strict '>' running max
    max_scale = np.take_along_axis(scale, idx[:, None], 1)[:, 0]
    zero = np.abs(max_scale) < EPS
    iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d = fp16_round(F32(1) / iscale)
    sc = np.minimum(127, np.rint(iscale[:, None] * scale)).astype(np.int8)
    dd = d[:, None] * sc.astype(F32)
    nz = dd != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(xb / np.where(nz, dd, F32(1))[..., None]), -32, 31) + 32
    codes = np.where(nz[..., None], q.astype(np.uint8), L)
    # an all-zero super-block is written as zero bytes: d = 0, scales 0, codes 0
    codes = np.where(zero[:, None, None], np.uint8(0), codes)
    sc = np.where(zero[:, None], np.int8(0), sc)
    d = np.where(zero, F32(0), d)
    return {"codes": codes.reshape(R, K), "d": d.reshape(R, S), "sc": sc.reshape(R, S, 16)}


def quantize_q8_0(x: np.ndarray) -> dict[str, np.ndarray]:
    """Q8_0 (the imatrix is ignored, as in ggml). codes = q + 128 as uint8; d [R, K/32] (fp16 values)."""
    x = np.ascontiguousarray(x, dtype=F32)
    R, K = x.shape
    xb = x.reshape(R, K // 32, 32)
    amax = np.abs(xb).max(axis=2)
    d = amax / F32(127)
    idv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    v = xb * idv[..., None]
    t = np.trunc(v)
    q = t + np.sign(v) * (np.abs(v - t) >= F32(0.5))  # C roundf: half away from zero
    return {"codes": (q.astype(np.int16) + 128).astype(np.uint8).reshape(R, K), "d": fp16_round(d)}


# Exact dequantization (llama.cpp's formulas, float32).

def dequant_qk_minmax(codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    R, K = codes.shape
    S = K // QK_K
    q = codes.reshape(R, S, 8, 32).astype(F32)
    scale = (d[..., None] * sc.astype(F32))[..., None]
    mins = (dmin[..., None] * m.astype(F32))[..., None]
    return (scale * q - mins).reshape(R, K)


def dequant_q6_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray) -> np.ndarray:
    R, K = codes.shape
    S = K // QK_K
    q = codes.reshape(R, S, 16, 16).astype(np.int16) - 32
    return ((d[..., None] * sc.astype(F32))[..., None] * q.astype(F32)).reshape(R, K)


def dequant_q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    R, K = codes.shape
    q = codes.reshape(R, K // 32, 32).astype(np.int16) - 128
    return (d[..., None] * q.astype(F32)).reshape(R, K)
