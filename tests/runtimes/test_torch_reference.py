"""The original model's torch row: float32 where it fits the memory a build may use, the checkpoint's dtype where
only that fits, not run where neither does (a model larger than the allowed memory cannot be loaded whole)."""
from __future__ import annotations

import numpy as np

from quantprism.model import load_model_info
from quantprism.pipeline.build import LOAD_OVERHEAD, TORCH_RUNTIME_BYTES, original_precision
from quantprism.runtimes import open_runtime


def test_precision_follows_the_allowance():
    info = load_model_info(None)  # the bundled model: bfloat16 on disk
    n = info.n_params
    need32, need16 = (int(LOAD_OVERHEAD * n * b) + TORCH_RUNTIME_BYTES for b in (4, 2))
    assert original_precision(info, need32) == ("float32", "")
    dtype, why = original_precision(info, need32 - 1)
    assert dtype == "bfloat16" and "float32 would need" in why
    dtype, why = original_precision(info, need16 - 1)
    assert dtype is None and "GB allowed" in why


def test_bfloat16_session_runs_the_checkpoint_close_to_float32():
    path = load_model_info(None).path
    ids = np.arange(1, 129) % 200 + 5
    s32 = open_runtime("torch", path, threads=2)
    s16 = open_runtime("torch", path, threads=2, options={"dtype": "bfloat16"})
    try:
        assert s16.dtype == "bfloat16" and s32.dtype == "float32"
        a, b = s32.logits(ids), s16.logits(ids)
        assert np.isfinite(b).all() and a.shape == b.shape
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9  # bf16 activations: a few near-ties may flip
        assert len(s16.timed_generate([1, *ids[:8].tolist()], 8, stop_at_eos=False)[0]) == 8
    finally:
        s32.close()
        s16.close()
