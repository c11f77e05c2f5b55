"""The onnx-genai target on the bundled model (GPTQ nbits4 / nbits8, block 32): onnxruntime-genai's fused graph
built from the canonical weights carries the canonical codes exactly (read back by an oracle written from the
operator spec), runs in onnxruntime-genai's own Generator, agrees with the canonical torch model, exports
byte-identically, and refuses a fused group whose shards sit on different grids."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from quantprism.errors import ArtifactError
from quantprism.model import load_tokenizer, load_torch_model

from conftest import require  # noqa: E402

og = require("onnxruntime_genai", "pip install -e .[onnx]")
onnx = require("onnx", "pip install -e .[onnx]")
from onnx_canonical import bundled_canonical  # noqa: E402
from onnx_oracle import kernel_weights  # noqa: E402

pytestmark = pytest.mark.onnx
PROMPT = "class Path:\n    def "
SCHEMES = ("nbits4", "nbits8")


def genai_target(onnx_t):
    """The onnx-genai twin of a bundled ONNX target: same grids, same canonical result."""
    return dataclasses.replace(onnx_t, name=f"genai-{onnx_t.name}", format="onnx-genai", runtime="onnxruntime-genai")


@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    return bundled_canonical(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(canonical, tmp_path_factory):
    """{scheme: (Target, CanonicalModel, artifact dir)} for nbits4 and nbits8."""
    from quantprism.exporters.onnx_genai import export_onnx_genai

    info, results = canonical
    root = tmp_path_factory.mktemp("genai")
    out = {}
    for q in SCHEMES:
        t, res = results[q]
        out[q] = (t, res, export_onnx_genai(genai_target(t), info, res, root / q))
    return out


def _expected_weights(info, t, res) -> dict[str, np.ndarray]:
    """What the fused graph's integer MatMuls must compute with, from the canonical result alone: per layer the
    q|k|v rows and the gate|up rows stacked, o_proj and down_proj as they are (module choice of the ONNX target)."""
    from quantprism.exporters import reference_choice

    choose = reference_choice(t, info, res)
    deq = lambda m: res.quant[m][choose(m)].dequantize()  # noqa: E731
    out = {}
    for i in range(info.n_layers):
        p = f"model.layers.{i}."
        out[f"{p}qkv"] = np.concatenate([deq(p + f"self_attn.{x}_proj") for x in "qkv"], axis=0)
        out[f"{p}o"] = deq(p + "self_attn.o_proj")
        out[f"{p}gate_up"] = np.concatenate([deq(p + "mlp.gate_proj"), deq(p + "mlp.up_proj")], axis=0)
        out[f"{p}down"] = deq(p + "mlp.down_proj")
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_matmulnbits_decodes_to_the_canonical_weights(canonical, exported, scheme):
    from onnx import numpy_helper

    info = canonical[0]
    t, res, out = exported[scheme]
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    # the builder's fused decoder: one GQA (with rotary) per layer, fused q/k/v and gate/up, skip-norms
    assert ops.count("GroupQueryAttention") == info.n_layers
    assert ops.count("SkipSimplifiedLayerNormalization") >= 2 * info.n_layers - 1
    assert ops.count("MatMulNBits") == 4 * info.n_layers
    assert all(a.i for n in model.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
               if a.name == "do_rotary")
    expected = _expected_weights(info, t, res)
    bits = 4 if scheme == "nbits4" else 8
    matched: dict[str, str] = {}
    for name, (kind, w) in kernel_weights(model).items():
        node = next(n for n in model.graph.node if n.name == name)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (kind, attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == ("MatMulNBits", bits, t.group_size, 4)
        hits = [k for k, e in expected.items() if e.shape == w.shape and np.array_equal(e, w)]
        assert len(hits) == 1, f"{name} decodes to {len(hits)} canonical (stacked) weights"
        assert hits[0] not in matched.values(), f"{hits[0]} carried twice"
        matched[name] = hits[0]
    assert sorted(matched.values()) == sorted(expected)
    # everything else stays fp32: only lm_head is a float MatMul, equal to the canonical lm_head
    inits = {i.name: i for i in model.graph.initializer}
    float_mm = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(float_mm) == 1 and "lm_head" in float_mm[0].name
    from quantprism.exporters.state import canonical_fp_state

    head = canonical_fp_state(info, res)["lm_head.weight"].float().numpy()
    assert np.array_equal(numpy_helper.to_array(inits[float_mm[0].input[1]]), head.T)


def _canonical_torch(info, t, res):
    from quantprism.exporters import reference_choice
    from quantprism.exporters.state import canonical_weights, load_weights

    model = load_torch_model(info)
    load_weights(model, canonical_weights(info, res, reference_choice(t, info, res)))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_generates_and_agrees_with_the_canonical_model(canonical, exported, scheme, record_property):
    """The build's smoke rule: 32 greedy tokens, then over the first 2 evaluation chunks top-1 ≥ 99 % on decisive
    positions (top-2 margin ≥ 1 nat) and mean KLD ≤ 0.01 against the canonical torch model."""
    from quantprism.calibration import eval_text_path
    from quantprism.evaluate.compare import eval_token_chunks
    from quantprism.pipeline.validate import DECISIVE_MARGIN, MAX_FIDELITY_KLD, MIN_TOP1_DECISIVE
    from quantprism.runtimes.onnxruntime_genai import open_session

    info = canonical[0]
    t, res, out = exported[scheme]
    tok = load_tokenizer(info)
    chunks = eval_token_chunks(tok, eval_text_path("builtin"), 512, 2)
    s = open_session(out, threads=2, n_ctx=576)
    try:
        assert (s.runtime, s.kernel, s.threads) == ("onnxruntime-genai", "native", 2)
        assert s.tokenize(PROMPT) == tok(PROMPT, add_special_tokens=False)["input_ids"]
        prompt = [info.config["bos_token_id"]] + s.tokenize(PROMPT)
        gen, ttft, per_token = s.timed_generate(prompt, 32, stop_at_eos=False)
        assert len(gen) == 32 and len(per_token) == 31 and ttft > 0
        assert s.detokenize(gen).strip()
        # the Generator's KV-cache decode = teacher forcing on the generated text
        assert list(s.logits(prompt + gen[:-1])[len(prompt) - 1 :].argmax(-1)) == gen
        got = [s.logits(c) for c in chunks]
    finally:
        s.close()
    model = _canonical_torch(info, t, res)
    with torch.no_grad():
        ref = [model(torch.from_numpy(c)[None]).logits[0].numpy() for c in chunks]
    got_a, ref_a = np.concatenate(got), np.concatenate(ref)
    assert np.isfinite(got_a).all()
    top2 = np.sort(ref_a, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
    same = got_a.argmax(-1) == ref_a.argmax(-1)
    lr = ref_a - np.logaddexp.reduce(ref_a, axis=-1, keepdims=True)
    lg = got_a - np.logaddexp.reduce(got_a, axis=-1, keepdims=True)
    kld = float((np.exp(lr) * (lr - lg)).sum(-1).mean())
    top1_dec = float(same[decisive].mean())
    for k, v in {"top1": float(same.mean()), "top1_decisive": top1_dec, "decisive": int(decisive.sum()), "kld": kld}.items():
        record_property(k, v)
    print(f"{scheme}: top-1 {same.mean():.4f}, decisive {top1_dec:.4f} of {int(decisive.sum())}, KLD {kld:.3g}")
    assert decisive.sum() > len(decisive) // 4
    assert top1_dec >= MIN_TOP1_DECISIVE
    assert kld <= MAX_FIDELITY_KLD
    assert kld < 2e-4  # measured ~4.5e-5 (int8 activation rounding inside MatMulNBits): far below the smoke limit


@pytest.mark.slow
def test_export_is_deterministic(canonical, exported, tmp_path):
    from quantprism.exporters.onnx_genai import export_onnx_genai

    info = canonical[0]
    t, res, first = exported["nbits4"]
    again = export_onnx_genai(genai_target(t), info, res, tmp_path / "again")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "quantprism_onnx_genai.json"} <= set(names)
    for n in names:
        assert (first / n).read_bytes() == (again / n).read_bytes(), n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize("protect", ["self_attn.v_proj", "mlp.up_proj"])
def test_mixed_grid_fused_group_is_refused(canonical, tmp_path, protect):
    """A plan that puts one shard of a fused MatMul on a higher grid cannot be one MatMulNBits: one-line error,
    raised before the builder runs, nothing written."""
    from quantprism.exporters.onnx_genai import export_onnx_genai

    info, results = canonical
    t, res = results["nbits4"]
    high = results["nbits8"][0]
    from quantprism.exporters import reference_choice

    high_grid = reference_choice(high, info, results["nbits8"][1])("model.layers.0.mlp.down_proj")
    assert high_grid in res.quant[f"model.layers.1.{protect}"]  # one recipe solved both grids
    plan = {"protected": [f"model.layers.1.{protect}"], "high_grid": high_grid}
    with pytest.raises(ArtifactError) as e:
        export_onnx_genai(genai_target(t), info, res, tmp_path / "mixed", plan)
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.1" in msg and "different grids" in msg and high_grid in msg
    assert not (tmp_path / "mixed").exists() and not list(tmp_path.iterdir())
    # a plan protecting a whole unfused linear is fine for the grid check (only fused groups must agree)
    from quantprism.exporters.onnx_genai import check_fused_grids, fused_groups

    check_fused_grids({"model.layers.1.self_attn.o_proj": high_grid}, fused_groups(info))


def test_stacked_shards_dequantize_to_the_stacked_weights():
    from quantprism.exporters.onnx_genai import stack_shards
    from quantprism.quantize.grids import IntGrid

    g = torch.Generator().manual_seed(0)
    for grid in (IntGrid(4, 32, True, "fp32"), IntGrid(8, 32, False, "fp32")):
        parts = [grid.rtn(torch.randn(n, 64, generator=g), None, False) for n in (8, 4, 4)]
        st = stack_shards(parts)
        assert st.codes.shape == (16, 64)
        assert np.array_equal(st.dequantize(), np.concatenate([p.dequantize() for p in parts]))
    a = IntGrid(4, 32, True, "fp32").rtn(torch.randn(4, 64, generator=g), None, False)
    b = IntGrid(8, 32, True, "fp32").rtn(torch.randn(4, 64, generator=g), None, False)
    with pytest.raises(ArtifactError, match="different grids"):
        stack_shards([a, b])


@pytest.mark.parametrize("damage", ["no_config", "no_model", "garbage"])
def test_damaged_artifact_is_one_line_error(exported, tmp_path, damage):
    import shutil

    from quantprism.runtimes.onnxruntime_genai import open_session

    d = shutil.copytree(exported["nbits4"][2], tmp_path / "a")
    if damage == "no_config":
        (d / "genai_config.json").unlink()
    elif damage == "no_model":
        (d / "model.onnx").unlink()
    else:
        (d / "model.onnx").write_bytes(b"\x08\xff" * 500)
    with pytest.raises(ArtifactError) as e:
        open_session(d, threads=1)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg


@pytest.mark.slow
def test_qwen2_with_biases_tied_embeddings_and_rope_theta(tmp_path):
    """The bundled trained weights as a Qwen2 checkpoint: q/k/v biases (the builder's packed Add after the fused
    MatMul), tied embeddings (lm_head fed by the embedding) and rope_theta 1e6 read from transformers 5's
    rope_parameters; RTN codes (2 × 64 calibration tokens). Same rule as the Llama smoke."""
    import json

    from trained_variants import bundled_tokenizer, save_trained_as

    from quantprism.config import Target
    from quantprism.exporters.onnx_genai import export_onnx_genai
    from quantprism.model import BUILTIN_MODEL, load_model_info
    from quantprism.pipeline import plan_recipes, run_stage
    from quantprism.pipeline.validate import DECISIVE_MARGIN, MAX_FIDELITY_KLD, MIN_TOP1_DECISIVE
    from quantprism.runtimes.onnxruntime_genai import open_session

    d = save_trained_as("qwen2", tmp_path / "qwen2", qkv_bias=0.05, tied=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {**(cfg.get("rope_parameters") or {}), "rope_theta": 1e6}
    cfg.pop("rope_theta", None)
    (d / "config.json").write_text(json.dumps(cfg))
    info = load_model_info(d)
    assert info.tied_embeddings
    t = Target(name="q4", format="onnx", runtime="onnxruntime", quant="nbits4", group_size=32, method="rtn")
    recipes, _ = plan_recipes([t])
    res = run_stage(info, recipes, None, 2, 64, 0, cache_dir=tmp_path / "canonical").results[0]
    out = export_onnx_genai(genai_target(t), info, res, tmp_path / "genai")
    layout = json.loads((out / "quantprism_onnx_genai.json").read_text())
    assert layout["rotary_caches"]["builder_max_abs_diff"] < 1e-6  # the builder reads the 1e6 theta too
    assert len(layout["node_modules"]) == 4 * info.n_layers
    text = (BUILTIN_MODEL.parent / "eval_heldout.txt").read_text(encoding="utf-8")
    ids = [0] + bundled_tokenizer()(text[:20000], add_special_tokens=False)["input_ids"][:511]
    s = open_session(out, threads=2)
    try:
        got = s.logits(ids)
    finally:
        s.close()
    model = _canonical_torch(info, t, res)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
    lr = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lg = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kld = float((np.exp(lr) * (lr - lg)).sum(-1).mean())
    assert decisive.sum() >= 10
    assert float((got.argmax(-1) == ref.argmax(-1))[decisive].mean()) >= MIN_TOP1_DECISIVE
    assert kld <= MAX_FIDELITY_KLD and kld < 2e-4
