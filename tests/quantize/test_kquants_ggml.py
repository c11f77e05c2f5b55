"""Our GGML encoders (RTN) are bit-identical to llama.cpp's ggml_quantize_chunk, with and without imatrix: the
k-quants, the 32-element fallbacks llama.cpp writes for rows that are not multiples of 256 (Q4_0, Q4_1, Q5_0,
Q5_1, IQ4_NL, on a 576-wide row) and IQ4_XS."""
from __future__ import annotations

import numpy as np
import pytest

from quantprism.exporters.kquants import pack
from quantprism.quantize.ggml_types import GGML_TYPES
from quantprism.quantize.grids import KQUANT_TYPES, KQuantGrid

from conftest import require
from ggml_oracle import ggml_lib, ggml_quantize

require("llama_cpp", "make install builds llama-cpp-python")
LIB = ggml_lib()
pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(LIB is None, reason="llama-cpp-python has no libggml-base.so beside it (a non-shared build?)")]


def weights(rows: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32) * 0.02
    x[:, rng.integers(0, k, 4)] *= 12  # outlier columns, as in real LLM weights
    x[0, :256] = 0.0  # an all-zero super-block
    x[1, :32] = 0.5  # a constant sub-block
    x[2, 32:64] = np.abs(x[2, 32:64])  # positive-only sub-block (min clamps to 0)
    return x


def encode(qtype: str, x, imatrix):
    return KQuantGrid(qtype, imatrix is not None)._encode(x, imatrix)


def width(qtype: str) -> int:
    """A 32-block type is tested on a 576-wide row (the case llama.cpp falls back for), a 256-block one on 768."""
    return 768 if GGML_TYPES[qtype].block == 256 else 576


@pytest.mark.parametrize("qtype", KQUANT_TYPES)
@pytest.mark.parametrize("use_imatrix", [False, True])
def test_bit_identical_to_ggml(qtype, use_imatrix):
    k = width(qtype)
    x = weights(64, k, seed=1)
    imatrix = None
    if use_imatrix:
        imatrix = (np.random.default_rng(2).random(k).astype(np.float32) ** 3) * 4 + 1e-4
    ours = pack(qtype, encode(qtype, x, imatrix))
    ref = ggml_quantize(LIB, qtype, x, imatrix)
    blk = GGML_TYPES[qtype].type_size
    a = np.frombuffer(ours, np.uint8).reshape(-1, blk)
    b = np.frombuffer(ref, np.uint8).reshape(-1, blk)
    bad = np.flatnonzero((a != b).any(axis=1))
    assert bad.size == 0, f"{bad.size}/{a.shape[0]} blocks differ, first {bad[:5]}"


@pytest.mark.parametrize("qtype", KQUANT_TYPES)
def test_dequantize_matches_gguf_py(qtype):
    from gguf import GGMLQuantizationType, quants

    x = weights(8, 512, seed=3)
    p = encode(qtype, x, None)
    codes = p.pop("codes")
    ours = KQuantGrid(qtype, False).dequantize(codes, p)
    raw = np.frombuffer(pack(qtype, {"codes": codes, **p}), np.uint8).reshape(8, -1)
    theirs = quants.dequantize(raw, getattr(GGMLQuantizationType, qtype))
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))
    assert np.abs(ours - x).max() < np.abs(x).max() * 0.2
