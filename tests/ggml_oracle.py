"""llama.cpp's own quantizer as a test oracle: ggml_quantize_chunk from libggml-base via ctypes."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from quantprism.quantize.ggml_types import GGML_TYPES


def ggml_lib() -> ctypes.CDLL | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(lib_dir.glob("libggml-base.so*"))
    if not cands:
        return None
    lib = ctypes.CDLL(str(cands[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(lib: ctypes.CDLL, qtype: str, x: np.ndarray, imatrix: np.ndarray | None) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, k = x.shape
    t = GGML_TYPES[qtype]
    blk, size = t.block, t.type_size
    out = np.zeros(rows * (k // blk) * size, dtype=np.uint8)
    imp = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        imp = imatrix.ctypes.data
    n = lib.ggml_quantize_chunk(t.ggml_id, x.ctypes.data, out.ctypes.data, 0, rows, k, imp)
    assert n == out.size
    return out.tobytes()
