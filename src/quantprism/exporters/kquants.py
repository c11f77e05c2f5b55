"""Byte packers for GGML block types (layouts: shared/reference/gguf-kquants.md §1).

Pure re-layout of canonical codes and block parameters into little-endian GGML blocks,
vectorised over all blocks of a tensor; one Packer class per type, registered by type name (block facts:
quantize/ggml_types.py).
"""
from __future__ import annotations

import numpy as np

from ..quantize.ggml_types import GGML_TYPES, QK_K, GGMLType


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype("<f2")).view(np.uint8).reshape(*np.shape(x), 2)


def pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins → 12 bytes (get_scale_min_k4's inverse). sc, m: [..., 8]."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0xF) | ((m[..., 4:8] & 0xF) << 4)
    return out


def unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.empty((*s.shape[:-1], 8), dtype=np.uint8)
    m = np.empty_like(sc)
    sc[..., 0:4] = s[..., 0:4] & 63
    m[..., 0:4] = s[..., 4:8] & 63
    sc[..., 4:8] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:8] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def _low_nibbles_k(q: np.ndarray) -> np.ndarray:
    """[B, 256] codes → qs[128]: byte 32c+l = e[64c+l] | e[64c+32+l] << 4."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0, :] & 0xF) | ((q[:, :, 1, :] & 0xF) << 4)).reshape(-1, 128).astype(np.uint8)


def pack_q4_k(codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> bytes:
    R, K = codes.shape
    B = R * K // QK_K
    out = np.empty((B, 144), dtype=np.uint8)
    out[:, 0:2] = _fp16_bytes(d.reshape(B))
    out[:, 2:4] = _fp16_bytes(dmin.reshape(B))
    out[:, 4:16] = pack_scales_k4(sc.reshape(B, 8), m.reshape(B, 8))
    out[:, 16:144] = _low_nibbles_k(codes.reshape(B, 256))
    return out.tobytes()


def pack_q5_k(codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray) -> bytes:
    R, K = codes.shape
    B = R * K // QK_K
    q = codes.reshape(B, 256)
    out = np.empty((B, 176), dtype=np.uint8)
    out[:, 0:2] = _fp16_bytes(d.reshape(B))
    out[:, 2:4] = _fp16_bytes(dmin.reshape(B))
    out[:, 4:16] = pack_scales_k4(sc.reshape(B, 8), m.reshape(B, 8))
    hi = ((q >> 4) & 1).reshape(B, 8, 32)  # bit j of qh[l] = bit 4 of element 32j + l
    qh = np.zeros((B, 32), dtype=np.uint8)
    for j in range(8):
        qh |= (hi[:, j, :] << j).astype(np.uint8)
    out[:, 16:48] = qh
    out[:, 48:176] = _low_nibbles_k(q)
    return out.tobytes()


def pack_q6_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray) -> bytes:
    R, K = codes.shape
    B = R * K // QK_K
    e = codes.reshape(B, 2, 4, 32).astype(np.uint8)  # half h, quarter c, lane l → element 128h + 32c + l
    lo = e & 0xF
    hi = e >> 4
    ql = np.empty((B, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = lo[:, :, 0] | (lo[:, :, 2] << 4)
    ql[:, :, 32:64] = lo[:, :, 1] | (lo[:, :, 3] << 4)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.empty((B, 210), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(B, 128)
    out[:, 128:192] = qh.reshape(B, 64)
    out[:, 192:208] = sc.reshape(B, 16).astype(np.int8).view(np.uint8)
    out[:, 208:210] = _fp16_bytes(d.reshape(B))
    return out.tobytes()


def pack_q8_0(codes: np.ndarray, d: np.ndarray) -> bytes:
    R, K = codes.shape
    B = R * K // 32
    out = np.empty((B, 34), dtype=np.uint8)
    out[:, 0:2] = _fp16_bytes(d.reshape(B))
    out[:, 2:34] = (codes.reshape(B, 32).astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return out.tobytes()


def _nibbles_32(q: np.ndarray) -> np.ndarray:
    """[B, 32] codes → 16 bytes: byte j = e[j] | e[16+j] << 4 (Q4_0/Q4_1/Q5_*/IQ4 low nibbles)."""
    return ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).astype(np.uint8)


def _qh_32(q: np.ndarray) -> np.ndarray:
    """[B, 32] 5-bit codes → 4 bytes: bit i of a little-endian uint32 = bit 4 of element i."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(np.bitwise_or.reduce(bits, axis=1).astype("<u4")).view(np.uint8).reshape(-1, 4)


def pack_legacy(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int) -> bytes:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 (also IQ4_NL, laid out as Q4_0): d [, m] [, qh] then qs, per 32 elements."""
    q = codes.reshape(-1, 32)
    parts = [_fp16_bytes(d.reshape(-1))]
    if m is not None:
        parts.append(_fp16_bytes(m.reshape(-1)))
    if bits == 5:
        parts.append(_qh_32(q))
    parts.append(_nibbles_32(q))
    return np.concatenate(parts, axis=1).tobytes()


def pack_iq4_xs(codes: np.ndarray, d: np.ndarray, sc: np.ndarray) -> bytes:
    """IQ4_XS: d (fp16), scales_h (uint16: 2 high bits per 32-block), scales_l (4 bytes of nibbles), qs[128]."""
    B = d.size
    ls = (sc.reshape(B, 8).astype(np.int16) + 32).astype(np.uint16)  # 6-bit, 0..63
    low = (ls & 0xF).astype(np.uint8)
    sl = low[:, 0::2] | (low[:, 1::2] << 4)
    sh = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype("<u2")
    qs = _nibbles_32(codes.reshape(-1, 32)).reshape(B, 128)
    return np.concatenate([_fp16_bytes(d.reshape(B)), np.ascontiguousarray(sh).view(np.uint8).reshape(B, 2),
                           sl.astype(np.uint8), qs], axis=1).tobytes()


class Packer:
    """One GGML type's byte layout (gguf-py style: one class per type, registered by it)."""

    ggml: GGMLType

    def pack(self, p: dict[str, np.ndarray]) -> bytes:
        raise NotImplementedError

    def nbytes(self, rows: int, cols: int) -> int:
        return rows * cols // self.ggml.block * self.ggml.type_size


class Q4K(Packer):
    ggml = GGML_TYPES["Q4_K"]

    def pack(self, p: dict[str, np.ndarray]) -> bytes:
        return pack_q4_k(p["codes"], p["d"], p["dmin"], p["sc"], p["m"])


class Q5K(Packer):
    ggml = GGML_TYPES["Q5_K"]

    def pack(self, p: dict[str, np.ndarray]) -> bytes:
        return pack_q5_k(p["codes"], p["d"], p["dmin"], p["sc"], p["m"])


class Q6K(Packer):
    ggml = GGML_TYPES["Q6_K"]

    def pack(self, p: dict[str, np.ndarray]) -> bytes:
        return pack_q6_k(p["codes"], p["d"], p["sc"])


class Q80(Packer):
    ggml = GGML_TYPES["Q8_0"]

    def pack(self, p: dict[str, np.ndarray]) -> bytes:
        return pack_q8_0(p["codes"], p["d"])


class Legacy(Packer):
    """The 32-element types: symmetric (Q4_0, Q5_0, IQ4_NL: d only) or with a min (Q4_1, Q5_1)."""

    def __init__(self, name: str, bits: int) -> None:
        self.ggml = GGML_TYPES[name]
        self.bits = bits

    def pack(self, p: dict[str, np.ndarray]) -> bytes:
        return pack_legacy(p["codes"], p["d"], p.get("m"), self.bits)


class IQ4XS(Packer):
    ggml = GGML_TYPES["IQ4_XS"]

    def pack(self, p: dict[str, np.ndarray]) -> bytes:
        return pack_iq4_xs(p["codes"], p["d"], p["sc"])


PACKERS: dict[str, Packer] = {c.ggml.name: c for c in (
    Q4K(), Q5K(), Q6K(), Q80(), IQ4XS(),
    Legacy("Q4_0", 4), Legacy("Q4_1", 4), Legacy("Q5_0", 5), Legacy("Q5_1", 5), Legacy("IQ4_NL", 4))}


def pack(qtype: str, params: dict[str, np.ndarray]) -> bytes:
    """Bytes of one tensor in GGML type ``qtype`` from canonical codes and block parameters."""
    return PACKERS[qtype].pack(params)
