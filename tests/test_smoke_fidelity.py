"""The smoke test holds every artifact, in its own runtime, against the canonical model of its target (canonical fp
state + the grids the format carries, dequantized — computed without the exporter). One build covers every format
× transform that targets.toml allows (none, AWQ, SmoothQuant); a second build with exporters that take the fp
tensors from the original checkpoint (the GGUF + AWQ bug: KLD 0.096, marked PASS) must fail smoke for each family."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import require, require_vllm  # noqa: E402

require("llama_cpp", "make install builds llama-cpp-python")
require("onnxruntime", "pip install -e .[onnx]")
require_vllm()
pytestmark = [pytest.mark.slow, pytest.mark.llamacpp, pytest.mark.vllm, pytest.mark.onnx]

HEAD = """
[defaults]
samples = 8
seq_len = 128
"""
# name: (format, extra keys, methods). The transforms are what matters here (AWQ / SmoothQuant fold scales into the
# norms), not the rounding: RTN keeps the one canonical pass small (GPTQ-in-the-loop AWQ searches cost minutes).
MATRIX = {
    "gguf-q4km": ("gguf", 'quant = "Q4_K_M"', ("rtn", "awq", "smoothquant+rtn")),
    "gptq-w4": ("gptq", "bits = 4\ngroup_size = 128", ("rtn", "awq")),
    "awq-w4": ("awq", "bits = 4\ngroup_size = 128\nsymmetric = false", ("rtn", "awq")),
    "ct-w4a16": ("compressed-tensors", 'quant = "W4A16"\ngroup_size = 128', ("rtn", "awq")),
    "ct-w8a8": ("compressed-tensors", 'quant = "W8A8"\ngroup_size = -1\nhardware = "cpu-avx2"', ("rtn", "smoothquant+rtn")),
    "onnx-nbits8": ("onnx", 'quant = "nbits8"\ngroup_size = 32', ("rtn", "awq", "smoothquant+rtn")),
    "onnx-genai-nbits4": ("onnx-genai", 'quant = "nbits4"\ngroup_size = 32', ("rtn", "awq")),
}
RUNTIME = {"gguf": "llamacpp", "gptq": "vllm", "awq": "vllm", "compressed-tensors": "vllm", "onnx": "onnxruntime",
           "onnx-genai": "onnxruntime-genai"}


def _targets(names: dict[str, tuple[str, str, str]]) -> str:
    out = [HEAD]
    for name, (fmt, extra, method) in names.items():
        out.append(f'[target.{name}]\nformat = "{fmt}"\nruntime = "{RUNTIME[fmt]}"\nmethod = "{method}"\n{extra}\n')
    return "\n".join(out)


def _build(run_cli, tmp: Path, spec: dict, out: str) -> dict:
    toml = tmp / f"{out}.toml"
    toml.write_text(_targets(spec))
    rc, o, e = run_cli("build", "--targets", toml, "--out", tmp / out, "--eval-chunks", "2", "--threads", "2",
                       "--skip-bench")
    assert rc in (0, 1), o + e
    return json.loads((tmp / out / "results.json").read_text())


def _row_text(r: dict) -> str:
    f = r.get("smoke", {}).get("details", {}).get("fidelity", {})
    return (f"{r['name']:28s} smoke {'ok ' if r.get('smoke', {}).get('passed') else 'BAD'} "
            f"fidelity top-1 {f.get('top1_agreement', float('nan')):.4f} decisive {f.get('top1_decisive', float('nan')):.4f} "
            f"KLD {f.get('kld_mean', float('nan')):.2e} | vs original KLD {r.get('quality', {}).get('kld_mean', float('nan')):.2e}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_every_format_and_transform_agrees_with_its_canonical_model(tmp_path, cache, monkeypatch, run_cli):
    monkeypatch.setenv("QUANTPRISM_CACHE", str(cache))
    spec = {f"{name}-{m.replace('+', '-')}": (fmt, extra, m) for name, (fmt, extra, methods) in MATRIX.items()
            for m in methods}
    doc = _build(run_cli, tmp_path, spec, "good")
    print("\n" + "\n".join(_row_text(r) for r in doc["targets"]))
    for r in doc["targets"]:
        assert r["status"] == "ok", r.get("error")
        smoke = r["smoke"]
        assert smoke["passed"], (r["name"], smoke)
        assert smoke["details"]["generated_tokens"] == 32 and smoke["details"]["text"].strip()
        assert smoke["details"]["nonfinite_rows"] == 0
        fid = smoke["details"]["fidelity"]
        assert fid["n_tokens"] > 400 and fid["decisive_tokens"] > 100
        # the artifact's own quality is that of a 4/8-bit RTN model, not of a broken one (the bug: 0.096)
        assert r["quality"]["kld_mean"] < 0.01, r["name"]
    assert doc["passed"]


def _stale_fp_state(info, canonical):
    """The bug: fp tensors (norms, biases, embeddings) from the original checkpoint, ignoring the transform."""
    from quantprism.exporters.state import canonical_fp_state

    return canonical_fp_state(info, None)


def _stale_weights(info, canonical, choose):
    from quantprism.exporters.state import canonical_fp_state, canonical_weights

    state = canonical_weights(info, canonical, choose)
    original = canonical_fp_state(info, None)
    for k in canonical.fp:
        mod = k.removesuffix(".weight")
        if k in original and not (mod in canonical.quant and choose(mod) is not None):
            state.derived[k] = lambda k=k: original[k]  # the lazy store's loaders come first
    return state


def test_exporters_that_ignore_the_canonical_fp_state_fail_smoke(tmp_path, cache, monkeypatch, run_cli):
    """What the smoke fidelity check exists for: each exporter family, made to take the fp tensors from the original
    checkpoint, writes a loadable artifact that generates text — and fails smoke against its canonical model."""
    import quantprism.exporters.gguf as gguf_exp
    import quantprism.exporters.onnx as onnx_exp
    import quantprism.exporters.vllm as vllm_exp

    monkeypatch.setenv("QUANTPRISM_CACHE", str(cache))
    monkeypatch.setattr(gguf_exp, "canonical_fp_state", _stale_fp_state)
    monkeypatch.setattr(vllm_exp, "canonical_fp_state", _stale_fp_state)
    monkeypatch.setattr(onnx_exp, "canonical_weights", _stale_weights)
    spec = {"gguf-awq": ("gguf", 'quant = "Q4_K_M"', "awq"),
            "ct-w4a16-awq": ("compressed-tensors", 'quant = "W4A16"\ngroup_size = 128', "awq"),
            "onnx-nbits8-smoothquant": ("onnx", 'quant = "nbits8"\ngroup_size = 32', "smoothquant+rtn")}
    doc = _build(run_cli, tmp_path, spec, "stale")
    print("\n" + "\n".join(_row_text(r) for r in doc["targets"]))
    for r in doc["targets"]:
        assert r["status"] == "ok", r.get("error")
        smoke = r["smoke"]
        assert smoke["checks"]["generated"] and smoke["checks"]["text"]  # it loads and talks …
        assert smoke["checks"]["fidelity"] is False and not smoke["passed"], r["name"]  # … but is not the model
        assert not r["passed"]
    assert not doc["passed"]
