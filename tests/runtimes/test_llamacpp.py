"""The llama.cpp adapter: serving-mode generation, latency metrics, llama.cpp's own quantizer through ctypes."""
from __future__ import annotations

import numpy as np
import pytest

from quantprism.errors import ArtifactError
from quantprism.model import load_model_info

from conftest import require  # noqa: E402

llama_cpp = require("llama_cpp", "make install builds llama-cpp-python")
pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    from quantprism.exporters.gguf import write_gguf

    info = load_model_info(None)
    return write_gguf(tmp_path_factory.mktemp("f16") / "f16.gguf", info, None, "F16")


def test_serving_mode_generates_what_teacher_forcing_predicts(f16):
    """logits_all=False (latency mode) reads the last row from llama.cpp directly: same greedy tokens, and each
    token is the argmax of the teacher-forced logits of the sequence so far."""
    from quantprism.runtimes.llamacpp import open_session

    full = open_session(f16, n_ctx=256, threads=2)
    serve = open_session(f16, n_ctx=256, threads=2, logits_all=False)
    try:
        prompt = [0] + full.tokenize("class Path:\n    def ")
        a, b = full.generate(prompt, 24), serve.generate(prompt, 24)
        assert a == b and len(a) == 24
        logits = full.logits(prompt + a[:-1])
        assert list(logits[len(prompt) - 1 :].argmax(-1)) == a
        with pytest.raises(ValueError, match="logits_all"):
            serve.logits(prompt)
    finally:
        full.close()
        serve.close()


def test_latency_metrics_are_consistent(f16):
    from quantprism.runtimes.latency import measure
    from quantprism.runtimes.llamacpp import open_session

    s = open_session(f16, n_ctx=128, threads=2, logits_all=False)
    try:
        r = measure(s, [0] + list(range(10, 73)), decode_tokens=8, repeats=5)
    finally:
        s.close()
    assert r["prompt_tokens"] == 64 and r["repeats"] == 5 and r["threads"] == 2
    assert r["prefill_tok_s"] == pytest.approx(64 / (r["ttft_ms_p50"] / 1e3), rel=0.01)
    assert 0 < r["decode_tok_s_p95"] <= r["decode_tok_s_p50"]  # the tail is never faster than the median
    assert r["peak_rss_mb"] > 0


def test_llama_cpp_quantizer_with_and_without_imatrix(f16, tmp_path):
    """llama_model_quantize via ctypes: Q4_K_M from our F16; the imatrix changes the imatrix-weighted tensors
    only (token_embd never takes one), a wrong-length imatrix is refused, a non-GGUF source is one error."""
    import gguf
    from llamacpp_quantize import gguf_imatrix, quantize

    info = load_model_info(None)
    plain = quantize(f16, tmp_path / "plain.gguf", "Q4_K_M", None, threads=2)
    rng = np.random.default_rng(0)
    imat = {m: rng.random(shape[1]).astype(np.float32) + 0.01 for m, shape in info.linear_shapes.items()}
    imat["lm_head"] = rng.random(info.config["hidden_size"]).astype(np.float32)
    names = gguf_imatrix(imat)
    assert "blk.0.attn_q.weight" in names and "output.weight" in names and "token_embd.weight" not in names
    weighted = quantize(f16, tmp_path / "imat.gguf", "Q4_K_M", names, threads=2)
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(plain)).tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(weighted)).tensors}
    assert a["token_embd.weight"] == b["token_embd.weight"]
    assert a["blk.1.ffn_gate.weight"] != b["blk.1.ffn_gate.weight"]
    assert a["output.weight"] != b["output.weight"]
    bad = {**names, "blk.0.attn_q.weight": np.ones(7, np.float32)}
    with pytest.raises(ArtifactError):
        quantize(f16, tmp_path / "bad.gguf", "Q4_K_M", bad, threads=2)
    assert not (tmp_path / "bad.gguf").exists()  # nothing half written
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ArtifactError, match="not a GGUF"):
        quantize(junk, tmp_path / "x.gguf", "Q4_K_M")
