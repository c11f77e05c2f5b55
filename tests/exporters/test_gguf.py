"""GGUF export: canonical codes packed losslessly, llama.cpp's mixture rules, and a file real llama.cpp loads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantprism.calibration import BUILTIN_EVAL
from quantprism.config import parse_targets
from quantprism.exporters.gguf import _permute_rows, grid_for, write_gguf
from quantprism.exporters.gguf_types import tensor_types, use_more_bits
from quantprism.model import load_model_info, load_tokenizer, load_torch_model
from quantprism.pipeline import plan_recipes, run_stage

REPO = Path(__file__).resolve().parents[2]
from conftest import require  # noqa: E402

llama_cpp = require("llama_cpp", "make install builds llama-cpp-python")


def test_mixture_rules_match_llama_cpp():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    t = tensor_types("Q4_K_M", 4, tied=False)
    assert t["lm_head"] == "Q6_K" and t["model.embed_tokens"] == "Q4_K"
    assert [t[f"model.layers.{i}.self_attn.v_proj"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert t["model.layers.3.mlp.down_proj"] == "Q6_K" and t["model.layers.3.mlp.up_proj"] == "Q4_K"
    assert tensor_types("Q4_K_M", 4, tied=True)["model.embed_tokens"] == "Q6_K"


@pytest.mark.llamacpp
def test_q4km_is_lossless_and_runs_in_llama_cpp(tmp_path):
    import gguf

    info = load_model_info(None)
    target = parse_targets(REPO / "targets.toml").targets["llamacpp-cpu-q4km"]
    recipes, _ = plan_recipes([target])
    res = run_stage(info, recipes, "builtin", 8, 128, 0, cache_dir=tmp_path / "c").results[0]
    path = write_gguf(tmp_path / "m.gguf", info, res, "Q4_K_M")

    types = tensor_types("Q4_K_M", info.n_layers, info.tied_embeddings)
    n_head, n_kv = info.config["num_attention_heads"], info.config["num_key_value_heads"]
    names = {"token_embd": "model.embed_tokens", "output": "lm_head"}
    gmap = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
    checked = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        base = t.name.removesuffix(".weight")
        if base.startswith("blk."):
            _, i, g = base.split(".")
            if g not in gmap:
                continue
            mod = f"model.layers.{i}.{gmap[g]}"
        elif base in names:
            mod = names[base]
        else:
            continue
        qtype = types[mod]
        assert t.tensor_type.name == qtype, (t.name, t.tensor_type.name, qtype)
        gid = grid_for(qtype, mod, imatrix=True, tied=info.tied_embeddings)
        expected = res.quant[mod][gid].dequantize()
        if mod.endswith(("q_proj", "k_proj")):
            expected = _permute_rows(expected, n_head if mod.endswith("q_proj") else n_kv)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        np.testing.assert_array_equal(got.astype(np.float32), expected)
        checked += 1
    assert checked == 7 * info.n_layers + 2

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, logits_all=False)
    tok = load_tokenizer(info)
    text = BUILTIN_EVAL.read_text()  # tokenization parity on the whole evaluation text
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False)
    out = llm("def read_file(path):", max_tokens=16, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", ["mistral", "qwen2", "llama-tied"])
def test_families_load_in_llama_cpp(tmp_path, tiny_models, family):
    """Mistral (llama arch, permuted q/k), Qwen2 (biases, tied, NEOX rope), tied Llama: llama.cpp loads them
    and its logits match the torch model built from the same canonical weights. Random weights attend almost
    uniformly, so this is a weak check of the q/k permutation (without it: max |Δlogit| 0.067 vs tol 0.027
    here, KLD 8.8e-5 on the eval text); test_gguf_rope_trained.py proves the permutation and the biases on the
    trained weights and shows a broken permutation failing there."""
    import torch

    from quantprism.config import Target
    from quantprism.evaluate.canonical import canonical_overrides

    info = load_model_info(tiny_models[family])
    t = Target(name="t", format="gguf", runtime="llamacpp", quant="Q8_0")
    recipes, _ = plan_recipes([t])
    res = run_stage(info, recipes, "builtin", 4, 64, 0, cache_dir=tmp_path / "c").results[0]
    model = load_torch_model(info)
    path = write_gguf(tmp_path / "m.gguf", info, res, "Q8_0")
    ov = canonical_overrides(res, lambda m: "q8_0")
    if info.tied_embeddings:
        ov["model.embed_tokens.weight"] = ov.pop("lm_head.weight")
    sd = model.state_dict()
    sd.update({k: v for k, v in ov.items() if k in sd})
    model.load_state_dict(sd)
    ids = [0] + load_tokenizer(info).encode("def f(x):\n    return x + 1\n", add_special_tokens=False)
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    tol = 2e-2 * max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() < tol  # a missing q/k permutation: only ~2.5 tol here
    # llama.cpp quantizes activations to 8 bits for Q8_0 dot products: argmax may differ only at near-ties
    top2 = np.sort(ref, -1)[:, -2:]
    differ = got.argmax(-1) != ref.argmax(-1)
    assert np.all(top2[differ, 1] - top2[differ, 0] < 2 * tol)


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q4km")
    info = load_model_info(None)
    target = parse_targets(REPO / "targets.toml").targets["llamacpp-cpu-q4km"]
    recipes, _ = plan_recipes([target])
    res = run_stage(info, recipes, "builtin", 16, 256, 0, cache_dir=tmp / "c").results[0]
    return info, res, write_gguf(tmp / "m.gguf", info, res, "Q4_K_M")


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smoke_top1_vs_canonical_torch_model(q4km):
    """The artifact loads, generates 32 tokens, and its teacher-forced top-1 agrees ≥ 99% with the torch model
    built from the canonical dequantized weights (8,192 tokens). llama.cpp rounds activations to Q8_K before
    k-quant dot products; the reference applies the same rounding (evaluate/runtime_arith.py). Without it the
    agreement is lower only through near-ties (measured 98.9%), which is checked too."""
    from quantprism.evaluate.canonical import Evaluator, canonical_overrides
    from quantprism.evaluate.runtime_arith import ggml_activation_hooks
    from quantprism.runtimes.llamacpp import open_session

    info, res, path = q4km
    types = tensor_types("Q4_K_M", info.n_layers, info.tied_embeddings)

    def choose(mod):
        t = types.get(mod)
        return None if t is None else grid_for(t, mod, imatrix=True, tied=info.tied_embeddings)

    ev = Evaluator(info, BUILTIN_EVAL, max_chunks=16)
    ev.state_with(canonical_overrides(res, choose))
    plain = [ev.model(torch_tensor(c)).logits[0].detach().numpy() for c in ev.chunks]
    hooks = ggml_activation_hooks(ev.model, types)
    emulated = [ev.model(torch_tensor(c)).logits[0].detach().numpy() for c in ev.chunks]
    for h in hooks:
        h.remove()
    sess = open_session(path, n_ctx=512, threads=2)
    try:
        assert len(sess.generate([0] + sess.tokenize("import os\n"), 32)) == 32
        agree = {"plain": 0, "emulated": 0}
        total = 0
        for chunk, ref_p, ref_e in zip(ev.chunks, plain, emulated, strict=True):
            got = sess.logits(chunk)
            assert np.abs(ref_e - got).max() < 0.5  # a packing/layout error is off by whole logits
            for key, ref in (("plain", ref_p), ("emulated", ref_e)):
                differ = ref.argmax(-1) != got.argmax(-1)
                top2 = np.sort(ref, -1)[:, -2:]
                assert np.all(top2[differ, 1] - top2[differ, 0] < 0.15), f"{key}: top-1 differs at a clear decision"
                agree[key] += int((~differ).sum())
            total += len(chunk)
    finally:
        sess.close()
    assert agree["emulated"] / total >= 0.99, agree
    assert agree["plain"] / total >= 0.98, agree


def torch_tensor(chunk):
    import torch

    return torch.from_numpy(chunk)[None]


@pytest.mark.llamacpp
def test_validate_cli_good_malformed_truncated(q4km, tmp_path, run_cli):
    from conftest import assert_one_line_error

    _, _, path = q4km
    rc, out, err = run_cli("validate", path, "--threads", "2")
    assert rc == 0, err
    assert "loads in llama.cpp" in out and "generated" in out
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:1000])
    rc, _, err = run_cli("validate", bad)
    assert_one_line_error(rc, err, "not a GGUF file")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli("validate", trunc)
    assert_one_line_error(rc, err, "truncated")
    rc, _, err = run_cli("validate", tmp_path / "missing.gguf")
    assert_one_line_error(rc, err, "no such GGUF file")


@pytest.mark.llamacpp
@pytest.mark.slow
def test_rtn_export_is_byte_identical_to_llama_cpp_quantizer(tmp_path):
    """Our RTN k-quant export (same imatrix or none) equals llama.cpp's own llama_model_quantize byte for byte,
    tensor for tensor, types included: the encoders, the Q4_K_M/Q5_K_M mixture rules, the q/k permutation and
    the imatrix hand-over all agree with llama.cpp."""
    import gguf
    from llamacpp_quantize import gguf_imatrix, quantize

    from quantprism.config import Target

    info = load_model_info(None)
    targets = [Target(name=f"t{i}{ft}", format="gguf", runtime="llamacpp", quant=ft, method="rtn", imatrix=im)
               for ft in ("Q4_K_M", "Q5_K_M") for i, im in enumerate((True, False))]
    recipes, _ = plan_recipes(targets)
    assert len(recipes) == 1
    res = run_stage(info, recipes, "builtin", 8, 128, 0, cache_dir=tmp_path / "c").results[0]
    f32 = write_gguf(tmp_path / "f32.gguf", info, None, "F32")
    for ft in ("Q4_K_M", "Q5_K_M"):
        data = {}
        for im in (True, False):
            ours = write_gguf(tmp_path / f"ours-{ft}-{im}.gguf", info, res, ft, imatrix=im)
            ref = quantize(f32, tmp_path / f"ref-{ft}-{im}.gguf", ft, gguf_imatrix(res.imatrix) if im else None, threads=2)
            a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
            b = {t.name: t for t in gguf.GGUFReader(str(ref)).tensors}
            assert a.keys() == b.keys()
            for name, t in a.items():
                assert t.tensor_type == b[name].tensor_type, (ft, im, name, t.tensor_type, b[name].tensor_type)
                assert bytes(t.data) == bytes(b[name].data), (ft, im, name)
            data[im] = bytes(a["blk.0.ffn_up.weight"].data)
        assert data[True] != data[False]  # the imatrix reached llama.cpp's encoder (and ours)


def test_mixed_precision_plan_only_adds_bits():
    plan = {"high_grid": "q6_k_imat", "protected": ["model.layers.0.mlp.up_proj", "model.layers.3.mlp.down_proj"]}
    t = tensor_types("Q4_K_M", 4, tied=False, plan=plan)
    assert t["model.layers.0.mlp.up_proj"] == "Q6_K"  # promoted by the plan
    assert t["model.layers.3.mlp.down_proj"] == "Q6_K"  # already Q6_K by the mixture rule
    assert t["model.layers.1.mlp.up_proj"] == "Q4_K"
    q8 = tensor_types("Q6_K", 4, tied=False, plan={"high_grid": "q8_0", "protected": ["model.layers.2.self_attn.q_proj"]})
    assert q8["model.layers.2.self_attn.q_proj"] == "Q8_0" and q8["model.layers.1.self_attn.q_proj"] == "Q6_K"


@pytest.mark.llamacpp
def test_plan_merged_into_export(tmp_path):
    """A target with protect=N: the N most sensitive linears are written as Q6_K from the canonical Q6_K codes,
    the plan is recorded in the file, and llama.cpp loads it."""
    import gguf

    from quantprism.config import Target
    from quantprism.pipeline import target_plan

    info = load_model_info(None)
    t = Target(name="mixed", format="gguf", runtime="llamacpp", quant="Q4_K_M", method="gptq", protect=2)
    recipes, _ = plan_recipes([t])
    res = run_stage(info, recipes, "builtin", 4, 128, 0, cache_dir=tmp_path / "c").results[0]
    plan = target_plan(t, res)
    assert len(plan["protected"]) == 2
    path = write_gguf(tmp_path / "m.gguf", info, res, "Q4_K_M", plan=plan)
    reader = gguf.GGUFReader(str(path))
    tensors = {x.name: x for x in reader.tensors}
    rules = tensor_types("Q4_K_M", info.n_layers, info.tied_embeddings)
    promoted = [m for m in plan["protected"] if rules[m] == "Q4_K"]
    assert promoted, "the most sensitive tensors should include one the mixture rule leaves at Q4_K"
    for mod in plan["protected"]:
        from quantprism.exporters.gguf import gguf_name

        x = tensors[f"{gguf_name(mod)}.weight"]
        assert x.tensor_type.name == "Q6_K"
        if not mod.endswith(("q_proj", "k_proj")):
            got = gguf.quants.dequantize(x.data, x.tensor_type).reshape(res.quant[mod]["q6_k_imat"].codes.shape)
            np.testing.assert_array_equal(got, res.quant[mod]["q6_k_imat"].dequantize())
    field = reader.fields["quantprism.plan"]
    recorded = json.loads(bytes(field.parts[-1]).decode())
    assert sorted(recorded["protected"]) == sorted(plan["protected"])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    assert llm("def f(", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] > 0


def shapes_like(hidden: int, inter: int, layers: int = 8, tied: bool = False):
    """What grid_needs reads from a ModelInfo, for a model of the given widths (4 heads, 1 KV head: GQA 4)."""
    from types import SimpleNamespace

    lin = {"q_proj": (hidden, hidden), "k_proj": (hidden // 4, hidden), "v_proj": (hidden // 4, hidden),
           "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
           "down_proj": (hidden, inter)}
    shapes = {f"model.layers.{i}.{'self_attn' if k.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{k}": v
              for i in range(layers) for k, v in lin.items()}
    if not tied:
        shapes["lm_head"] = (1000, hidden)
    cfg = {"num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 1, "hidden_size": hidden}
    from quantprism.model import ARCHS

    return SimpleNamespace(config=cfg, linear_shapes=shapes, tied_embeddings=tied, arch=ARCHS["LlamaForCausalLM"])


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("hidden", [256, 576, 896, 960])
def test_grid_needs_cover_every_tensor_type(quant, tied, hidden):
    """The stage solves exactly what the writer will ask for (no missing grid at export time), for rows that fit
    the 256-blocks and for the widths where llama.cpp falls back."""
    from quantprism.config import Target
    from quantprism.exporters.gguf_types import model_types
    from quantprism.exporters.grids import grid_needs
    from quantprism.quantize.stage import fits

    info = shapes_like(hidden, {256: 512, 576: 1536, 896: 4864, 960: 2560}[hidden], tied=tied)
    for im in (True, False):
        needs = grid_needs(Target(name="t", format="gguf", runtime="llamacpp", quant=quant, imatrix=im), info)
        for mod, t in model_types(quant, info, imatrix=im).items():
            gid = grid_for(t, mod, im, tied)
            where = needs.grids if mod.startswith("model.layers.") else (
                needs.head if mod == "lm_head" or tied else needs.embed)
            assert gid in where, (quant, im, mod, gid, needs)
            k = info.linear_shapes.get(mod, (0, hidden))[1]
            assert fits(gid, k), (quant, mod, gid, k)  # the stage solves it for this module


def test_fallback_types_follow_llama_cpp():
    """llama.cpp's tensor_type_fallback and output rule on a 576-wide model (FFN 1536), as llama-quantize logs it."""
    from quantprism.exporters.gguf_types import model_types

    info = shapes_like(576, 1536, layers=8)
    t = model_types("Q4_K_M", info)
    assert t["model.layers.0.self_attn.q_proj"] == "Q5_0"  # Q4_K → Q5_0 (576 % 256)
    assert t["model.layers.0.self_attn.v_proj"] == "Q8_0"  # Q6_K (use_more_bits) → Q8_0
    assert t["model.layers.0.mlp.down_proj"] == "Q6_K"  # 1536 % 256 == 0: no fallback
    assert t["model.layers.1.mlp.down_proj"] == "Q4_K"
    assert t["lm_head"] == "Q8_0" and t["model.embed_tokens"] == "Q5_0"
    assert model_types("Q5_K_S", info)["model.layers.3.mlp.up_proj"] == "Q5_1"
    assert model_types("IQ4_XS", info)["model.layers.3.mlp.up_proj"] == "IQ4_NL"
    assert model_types("IQ4_XS", info)["model.layers.3.self_attn.v_proj"] == "Q5_1"  # GQA ≥ 4: Q5_K → Q5_1
    assert model_types("IQ4_XS", info, imatrix=False)["model.layers.0.mlp.down_proj"] == "Q5_K"
    assert model_types("Q4_0", info)["model.layers.0.mlp.down_proj"] == "Q4_1"  # only with an imatrix
    assert model_types("Q4_0", info, imatrix=False)["model.layers.0.mlp.down_proj"] == "Q4_0"
    assert model_types("Q4_K_S", info)["model.layers.3.self_attn.v_proj"] == "Q5_1"  # i < 4: Q5_K → Q5_1
    assert model_types("Q6_K", shapes_like(600, 1536))["model.layers.0.self_attn.q_proj"] == "F16"  # 600 % 32
