"""Shapes as llama.cpp handles them: on models whose hidden size is not a multiple of 256 (576, 896, 960 — the
widths and head layouts of SmolLM-135M, Qwen2.5-0.5B and SmolLM-360M), every GGUF file type we offer,
built with the RTN recipe, is byte-identical to llama.cpp's own ``llama_model_quantize`` of the same weights —
tensor types (mixture rules + fallbacks), codes, block parameters and imatrix hand-over included."""
from __future__ import annotations

import json

import pytest

from quantprism.config import Target
from quantprism.exporters.gguf import write_gguf
from quantprism.exporters.gguf_types import FILE_TYPES
from quantprism.model import load_model_info
from quantprism.pipeline import plan_recipes, run_stage

from conftest import make_tiny_model, require

require("llama_cpp", "make install builds llama-cpp-python")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

QUANTS = [ft for ft in FILE_TYPES if ft not in ("F16", "F32")]
# (arch, hidden, FFN, heads, KV heads, tied, layers). 576 is SmolLM-135M's layout with 8 layers (the n/8 rules apply);
# 896 and 960 keep their widths and head layouts on 4 layers with narrower FFNs — 1216 (not a multiple of 256, so
# ffn_down falls back too) and 1280 — to keep the suite's time in bounds.
SHAPES = {
    576: ("llama", 576, 1536, 9, 3, True, 8),
    896: ("qwen2", 896, 1216, 14, 2, True, 4),
    960: ("llama", 960, 1280, 15, 5, False, 4),
}


@pytest.mark.parametrize("hidden", sorted(SHAPES))
def test_rtn_file_types_byte_identical_to_llama_cpp(tmp_path, hidden):
    import gguf
    from llamacpp_quantize import gguf_imatrix, quantize

    arch, h, inter, heads, kv, tied, layers = SHAPES[hidden]
    model = make_tiny_model(tmp_path / "m", arch, tied=tied, hidden=h, layers=layers, inter=inter, heads=heads,
                            kv_heads=kv, seed=hidden)
    info = load_model_info(model)
    targets = [Target(name=f"{ft}-{im}", format="gguf", runtime="llamacpp", quant=ft, method="rtn", imatrix=im)
               for ft in QUANTS for im in (True, False)]
    recipes, _ = plan_recipes(targets, info)
    assert len(recipes) == 1
    res = run_stage(info, recipes, "builtin", 4, 64, 0, cache_dir=tmp_path / "c").results[0]
    f32 = write_gguf(tmp_path / "f32.gguf", info, None, "F32")
    fallbacks = set()
    for ft in QUANTS:
        for im in (True, False):
            ours = write_gguf(tmp_path / "ours.gguf", info, res, ft, imatrix=im)
            ref = quantize(f32, tmp_path / "ref.gguf", ft, gguf_imatrix(res.imatrix) if im else None, threads=2)
            a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
            b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
            assert a.keys() == b.keys()
            for name, t in a.items():
                assert t.tensor_type == b[name].tensor_type, (ft, im, name, t.tensor_type.name, b[name].tensor_type.name)
                assert bytes(t.data) == bytes(b[name].data), (ft, im, name, t.tensor_type.name)
                fallbacks.add(t.tensor_type.name)
    # the fallback types were really exercised (576/896/960 rows: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, IQ4_XS → IQ4_NL)
    assert {"Q5_0", "Q5_1", "Q8_0", "IQ4_NL"} <= fallbacks, fallbacks


BUILD_TOML = """
[defaults]
samples = 8
seq_len = 128

[target.q4km]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
method = "rtn"
tokenizer_parity = "strict"
[target.q4km.gates]
max_kld = 10.0
"""


def test_build_576_wide_digit_splitting_bpe_to_q4km(tmp_path, run_cli, monkeypatch):
    """Done-when of the shapes work: a SmolLM-shaped model (hidden 576, FFN 1536, 9:3 heads, tied) carrying StarCoder's
    byte-level BPE (digits split one by one) goes through `quantprism build` to Q4_K_M — which used to be refused —
    and the file llama.cpp loads tokenizes exactly as the HF tokenizer (strict: eval text and stress set), passes,
    and is byte-identical to llama.cpp's own Q4_K_M of the same weights with the same imatrix."""
    import gguf
    from llamacpp_quantize import gguf_imatrix, quantize
    from vocab_families import family_model, vocab_file

    from quantprism.config import parse_targets
    from quantprism.model import load_tokenizer
    from quantprism.quantize import store

    if not vocab_file("starcoder").is_file():
        pytest.fail(f"{vocab_file('starcoder')} missing: run `make install` (it unpacks llama.cpp's test vocabularies)")
    monkeypatch.setenv("QUANTPRISM_CACHE", str(tmp_path / "cache"))
    model = family_model("starcoder", tmp_path / "m", hidden=576, inter=1536, layers=2, heads=9, kv_heads=3, tied=True)
    info = load_model_info(model)
    assert load_tokenizer(info).encode("2024", add_special_tokens=False).__len__() == 4  # digits split one by one
    toml = tmp_path / "targets.toml"
    toml.write_text(BUILD_TOML)
    rc, out, err = run_cli("build", "--model", model, "--targets", toml, "--out", tmp_path / "b", "--eval-chunks", "2",
                           "--threads", "2", "--skip-bench")
    assert rc == 0, out + err
    row = next(r for r in json.loads((tmp_path / "b" / "results.json").read_text())["targets"] if r["name"] == "q4km")
    assert row["passed"] and row["tokenizer_parity"]["passed"], row.get("tokenizer_parity")
    assert row["tokenizer_parity"]["stress"]["equal"] == row["tokenizer_parity"]["stress"]["total"]

    ours = {t.name: t for t in gguf.GGUFReader(row["artifact"]).tensors}
    assert ours["blk.0.attn_q.weight"].tensor_type.name == "Q5_0" and ours["token_embd.weight"].tensor_type.name == "Q8_0"
    t = parse_targets(toml).targets["q4km"]
    run = run_stage(info, plan_recipes([t], info)[0], "builtin", 8, 128, 0, cache_dir=store.default_cache_dir())
    assert run.cache_hits == [True]  # the build's own canonical result (its imatrix goes to llama.cpp)
    res = run.results[0]
    f32 = write_gguf(tmp_path / "f32.gguf", info, None, "F32")
    ref = quantize(f32, tmp_path / "ref.gguf", "Q4_K_M", gguf_imatrix(res.imatrix), threads=2)
    theirs = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type and bytes(t.data) == bytes(theirs[name].data), name
