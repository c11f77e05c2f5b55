"""Architectures through the whole pipeline: the bundled TRAINED weights re-expressed as each architecture
(tests/trained_variants.py: peaked attention, so a wrong permutation, norm or RoPE scaling shows) go through
`quantprism build` with a GGUF Q4_K_M, a GPTQ W4 (vLLM) and an INT8 ONNX target; every target must pass smoke (its
runtime's teacher-forced logits against the canonical model of the target, computed without the exporter) and
tokenization parity. The per-cell fidelity top-1 printed here is the README's support matrix.

The seven architectures of the support matrix: Qwen2.5 (Qwen2ForCausalLM), Mistral, Qwen3 (per-head q/k RMSNorm),
Llama 3.x (llama3 RoPE scaling, original context shrunk to 64 tokens so the scaling matters at every scored
position), Gemma 2 and 3 ((1 + w) norms, post-norms, soft-caps, local/global layers), Phi-3 (fused qkv / gate_up,
longrope with the same shrunk context). The bundled Llama itself: tests/test_smoke_fidelity.py."""
from __future__ import annotations

import json

import pytest
from trained_variants import LLAMA3_ROPE, PHI3_LONGROPE, save_trained_as

from conftest import require, require_vllm

require("llama_cpp", "make install builds llama-cpp-python")
require("onnxruntime", "pip install -e .[onnx]")
require_vllm()
pytestmark = [pytest.mark.slow, pytest.mark.llamacpp, pytest.mark.vllm, pytest.mark.onnx]

VARIANTS = {"qwen2.5": ("qwen2", None), "mistral": ("mistral", None), "qwen3": ("qwen3", None),
            "llama3.x": ("llama", LLAMA3_ROPE), "gemma2": ("gemma2", None), "gemma3": ("gemma3", None),
            "phi3": ("phi3", PHI3_LONGROPE)}
TOML = """
[defaults]
samples = 8
seq_len = 128

[target.gguf-q4km]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
method = "{method}"

[target.gptq-w4]
format = "gptq"
runtime = "vllm"
bits = 4
group_size = 128
method = "{method}"

[target.onnx-int8]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits8"
group_size = 32
method = "{method}"
"""


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_architecture_builds_and_passes_in_every_runtime(tmp_path, monkeypatch, run_cli, variant):
    monkeypatch.setenv("QUANTPRISM_CACHE", str(tmp_path / "cache"))
    arch, rope = VARIANTS[variant]
    model = save_trained_as(arch, tmp_path / "m", rope=rope)
    toml = tmp_path / "targets.toml"
    # RTN keeps the suite's time in bounds (the stage is architecture-generic; GPTQ/AWQ are tested on their own);
    # Phi-3 runs GPTQ, whose fused qkv / gate_up rows are the new case for the solver and for vLLM's loader
    toml.write_text(TOML.format(method="gptq" if variant == "phi3" else "rtn"))
    rc, out, err = run_cli("build", "--model", model, "--targets", toml, "--out", tmp_path / "b", "--eval-chunks", "2",
                           "--threads", "2", "--skip-bench")
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    for r in doc["targets"]:
        f = r.get("smoke", {}).get("details", {}).get("fidelity", {})
        print(f"{variant} {r['name']}: smoke {r.get('smoke', {}).get('passed')} fidelity top-1 "
              f"{f.get('top1_agreement')} KLD {f.get('kld_mean')} parity {r.get('tokenizer_parity', {}).get('passed')}")
    assert rc == 0, out + err
    for r in doc["targets"]:
        assert r["passed"] and r["smoke"]["passed"], r["name"]
        assert r["tokenizer_parity"]["passed"], r["name"]
