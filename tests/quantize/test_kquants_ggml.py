"""Our k-quant encoders (RTN) are bit-identical to llama.cpp's ggml_quantize_chunk, with and without imatrix."""
from __future__ import annotations

import numpy as np
import pytest

from quantprism.exporters.kquants import pack
from quantprism.quantize import kquants as kq

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
    if qtype in ("Q4_K", "Q5_K"):
        return kq.quantize_qk_minmax(x, imatrix, 4 if qtype == "Q4_K" else 5)
    if qtype == "Q6_K":
        return kq.quantize_q6_k(x, imatrix)
    return kq.quantize_q8_0(x)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("use_imatrix", [False, True])
def test_bit_identical_to_ggml(qtype, use_imatrix):
    x = weights(64, 768, seed=1)
    imatrix = None
    if use_imatrix:
        imatrix = (np.random.default_rng(2).random(768).astype(np.float32) ** 3) * 4 + 1e-4
    ours = pack(qtype, encode(qtype, x, imatrix))
    ref = ggml_quantize(LIB, qtype, x, imatrix)
    blk = {"Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    a = np.frombuffer(ours, np.uint8).reshape(-1, blk)
    b = np.frombuffer(ref, np.uint8).reshape(-1, blk)
    bad = np.flatnonzero((a != b).any(axis=1))
    assert bad.size == 0, f"{bad.size}/{a.shape[0]} blocks differ, first {bad[:5]}"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_dequantize_matches_gguf_py(qtype):
    from gguf import GGMLQuantizationType, quants

    x = weights(8, 512, seed=3)
    p = encode(qtype, x, None)
    ours = {"Q4_K": lambda: kq.dequant_qk_minmax(p["codes"], p["d"], p["dmin"], p["sc"], p["m"]),
            "Q5_K": lambda: kq.dequant_qk_minmax(p["codes"], p["d"], p["dmin"], p["sc"], p["m"]),
            "Q6_K": lambda: kq.dequant_q6_k(p["codes"], p["d"], p["sc"]),
            "Q8_0": lambda: kq.dequant_q8_0(p["codes"], p["d"])}[qtype]()
    raw = np.frombuffer(pack(qtype, p), np.uint8).reshape(8, -1)
    theirs = quants.dequantize(raw, getattr(GGMLQuantizationType, qtype))
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))
    assert np.abs(ours - x).max() < np.abs(x).max() * 0.2
