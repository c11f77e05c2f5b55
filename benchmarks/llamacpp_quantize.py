"""llama.cpp's own quantizer (``llama_model_quantize`` through ctypes): the baseline our GGUF files are measured
against (benchmarks/gguf_vs_llamacpp.py, gguf_latency.py) and the oracle of the byte-identity test. It is a peer,
not part of the product: quantprism's runtimes only load artifacts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from quantprism.errors import ArtifactError, RuntimeUnavailable
from quantprism.runtimes.llamacpp import available, check_gguf


def quantize(src: Path, dst: Path, file_type: str, imatrix: dict[str, np.ndarray] | None = None,
             threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``): the baseline our artifacts are measured against.

    ``imatrix`` maps GGUF tensor names (``blk.0.attn_q.weight``) to per-input-channel importance,
    passed through ``params.imatrix`` exactly as llama-quantize passes a loaded imatrix file.
    """
    import ctypes

    ok, why = available()
    if not ok:
        raise RuntimeUnavailable(why)
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    from quantprism.exporters.gguf import FILE_TYPES
    from quantprism.manifest import atomic_path

    check_gguf(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[file_type]
    params.nthread = threads or min(os.cpu_count() or 1, 8)
    keep: list = []  # the C side reads these buffers during the call
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: a NULL name ends it
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            data = np.ascontiguousarray(values, dtype=np.float32)
            if not np.all(np.isfinite(data)):
                raise ArtifactError(f"imatrix for {name} has non-finite values")
            keep += [data, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = data.size
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with atomic_path(dst) as tmp:
        with suppress_stdout_stderr(disable=False):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:  # raised inside the block: the temp file is removed, nothing lands at dst
            raise ArtifactError(f"llama_model_quantize failed on {src} (status {rc}); see llama.cpp's message above")
    return Path(dst)


def gguf_imatrix(imatrix: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF module → importance (e.g. a canonical result's or fp_imatrix's) keyed by GGUF tensor name."""
    from quantprism.exporters.gguf import gguf_name

    return {f"{gguf_name(m)}.weight": np.asarray(v, dtype=np.float32) for m, v in imatrix.items()
            if m != "model.embed_tokens"}
