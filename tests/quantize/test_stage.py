"""The canonical stage on real models: GPTQ beats RTN per layer, transforms are exact, one pass serves all targets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantprism.calibration import build_calibration
from quantprism.config import parse_targets
from quantprism.model import load_model_info, load_tokenizer, load_torch_model
from quantprism.pipeline import plan_recipes, run_stage
from quantprism.quantize.gptq import gptq_quantize
from quantprism.quantize.grids import IntGrid, KQuantGrid
from quantprism.quantize.stage import Recipe, StageSettings, run_canonical
from quantprism.quantize.stats import INPUT_GROUPS, attach_collectors
from quantprism.quantize.transforms import apply_scales, awq_search, foldable, smoothquant_scales

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundled():
    info = load_model_info(None)
    tok = load_tokenizer(info)
    calib = build_calibration(tok, "builtin", samples=16, seq_len=256, seed=0, warn=False)
    return info, calib


def _layer_inputs(model, ids, layer_idx):
    captured = {}

    def hook(_m, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        captured["kw"] = {k: v for k, v in kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")}

    h = model.model.layers[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.inference_mode():
        model(torch.as_tensor(ids))
    h.remove()
    return captured["h"], captured["kw"]


@pytest.mark.slow
@pytest.mark.parametrize("grid, act_order", [(IntGrid(4, 128, True), True), (IntGrid(4, 64, False), False),
                                             (KQuantGrid("Q4_K", True), False), (KQuantGrid("Q5_0", True), False),
                                             (KQuantGrid("Q4_1", True), False), (KQuantGrid("IQ4_NL", True), False),
                                             (KQuantGrid("IQ4_XS", True), False)],
                         ids=lambda v: v.id if hasattr(v, "id") else f"act_order={v}")
def test_gptq_lowers_every_layer_output_error_vs_rtn(bundled, grid, act_order):
    info, calib = bundled
    model = load_torch_model(info)
    ids = calib.input_ids[:8]
    for li, layer in enumerate(model.model.layers):
        h, kw = _layer_inputs(model, ids, li)
        stats, handles = attach_collectors(layer)
        with torch.inference_mode():
            layer(h, **kw)
        for hd in handles:
            hd.remove()
        for group, lins in INPUT_GROUPS.items():
            st = stats[group]
            X = st.x_sample
            for lin in lins:
                W = layer.get_submodule(lin).weight.detach().float()
                q_g = torch.from_numpy(gptq_quantize(W, st.hessian, grid, act_order=act_order).dequantize())
                q_r = torch.from_numpy(grid.rtn(W, st.imatrix, clip=False).dequantize())
                e_g = float(((X @ (W - q_g).T) ** 2).mean())
                e_r = float(((X @ (W - q_r).T) ** 2).mean())
                assert e_g < e_r, f"layer {li} {lin}: GPTQ {e_g:.3e} ≥ RTN {e_r:.3e}"


def _layer_out(layer, h, kw):
    with torch.inference_mode():
        r = layer(h, **kw)
    return r[0] if isinstance(r, tuple) else r


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """family → ModelInfo of the bundled trained weights re-expressed as that family (saved once)."""
    from trained_variants import save_trained_as

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model_info(save_trained_as(family, tmp_path_factory.mktemp(family)))
        return cache[family]

    return get


@pytest.mark.parametrize("transform", ["awq", "smoothquant"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "phi3"])
def test_transforms_leave_fp_outputs_unchanged(bundled, variants, transform, family):
    """Folding is exact: a layer's output is unchanged by AWQ / SmoothQuant scales. Gemma 2/3's norms compute
    x̂·(1 + w) and its MLP reads pre_feedforward_layernorm: folding there as into a Llama gain (w ÷ s, into
    post_attention_layernorm) changes the output — shown as the failing case."""
    import copy

    from quantprism.model import arch_of

    info, calib = bundled
    if family != "llama":
        info = variants(family)
    arch = arch_of(info.architecture)
    model = load_torch_model(info)
    ids = calib.input_ids[:4]
    for li in (0, info.n_layers - 1):
        layer = model.model.layers[li]
        h, kw = _layer_inputs(model, ids, li)
        stats, handles = attach_collectors(layer, groups=arch.input_groups)
        ref = _layer_out(layer, h, kw)
        for hd in handles:
            hd.remove()
        works = {"right": copy.deepcopy(layer), "llama-fold": copy.deepcopy(layer)}
        changed = 0
        for group, st in stats.items():
            work = works["right"]
            if not foldable(work, group, arch):  # GQA v→o; Phi-3's v and up are rows of fused modules
                continue
            if transform == "awq":
                s, _ = awq_search(work, group, st, IntGrid(4, 128, True), arch=arch)
                s = s * torch.linspace(0.5, 2.0, s.numel())  # make sure a non-trivial scaling is tested
            else:
                s = smoothquant_scales(work, group, st, 0.5, arch)
            apply_scales(work, group, s, arch)
            if family != "phi3":
                apply_scales(works["llama-fold"], group, s)  # the Llama rule, whatever the architecture
            changed += 1
        assert changed >= (3 if arch.fold_out else 2)
        rel = {k: float((_layer_out(w, h, kw) - ref).norm() / ref.norm()) for k, w in works.items()}
        assert rel["right"] < 1e-4, rel
        if family.startswith("gemma"):
            assert rel["llama-fold"] > 1e-2, rel
        first = arch.input_groups["mlp_in"][0]
        assert not torch.equal(works["right"].get_submodule(first).weight, layer.get_submodule(first).weight)


def test_one_pass_serves_all_default_targets(bundled):
    """Layer forwards are 2 per layer (stats + quantized propagation) whatever the number of targets."""
    info, calib = bundled
    tf = parse_targets(REPO / "targets.toml")
    recipes, index = plan_recipes(list(tf.targets.values()))
    # GPTQ/ONNX int4/GenAI share one recipe; AWQ has its own, and so has each SmoothQuant "auto" target (the search
    # rounds candidates on that target's own grids: Q4_K_M's, ONNX int8's)
    assert len(index) == 6 and len(recipes) == 4
    assert sorted(r.transform for r in recipes) == ["awq", "none", "smoothquant", "smoothquant"]
    small = calib.input_ids[:2, :64]
    counts = []
    for rs in ([recipes[0]], recipes):
        model = load_torch_model(info)
        counter: dict = {}
        res = run_canonical(model, small, StageSettings(list(rs)), counter=counter)
        counts.append(counter["layer_forwards"])
        for r in res:
            for mod, grids in r.quant.items():
                assert set(grids) == set(r.recipe.grids) or mod in ("lm_head", "model.embed_tokens")
    assert counts[0] == counts[1] == 2 * info.n_layers
    # and with fp inputs, exactly one forward per layer
    counter = {}
    run_canonical(load_torch_model(info), small, StageSettings(recipes, sequential=False), counter=counter)
    assert counter["layer_forwards"] == info.n_layers


def test_cache_hit_and_identical_codes(tmp_path, tiny_models):
    info = load_model_info(tiny_models["qwen2"])
    recipes = [Recipe(grids=("int4_g64_sym_fp16", "q4_k_imat"), head_grids=("q6_k_imat",)),
               Recipe(grids=("int4_g128_asym_fp16",), transform="awq", method="rtn")]
    kw = dict(calibration="builtin", samples=4, seq_len=64, seed=0)
    a = run_stage(info, recipes, cache_dir=tmp_path / "c1", **kw)
    assert a.cache_hits == [False, False]
    again = run_stage(info, recipes, cache_dir=tmp_path / "c1", **kw)
    assert again.cache_hits == [True, True] and again.counter == {}  # nothing recomputed
    b = run_stage(info, recipes, cache_dir=tmp_path / "c2", **kw)
    for ra, rb, rc in zip(a.results, b.results, again.results, strict=True):
        assert set(ra.quant) == set(rb.quant)
        for mod in ra.quant:
            for gid in ra.quant[mod]:
                qa, qb, qc = ra.quant[mod][gid], rb.quant[mod][gid], rc.quant[mod][gid]
                assert np.array_equal(qa.codes, qb.codes) and np.array_equal(qa.codes, qc.codes)
                for k in qa.params:
                    assert np.array_equal(qa.params[k], qb.params[k])
    # tied embeddings: the head grid is solved on the shared matrix; no separate embedding entry
    assert info.tied_embeddings and "lm_head" in a.results[0].quant and "model.embed_tokens" not in a.results[0].quant
    # the saved files are byte-identical too
    for pa, pb in zip(a.paths, b.paths, strict=True):
        files = json.loads((pa / "canonical.json").read_text())["files"]
        assert files == json.loads((pb / "canonical.json").read_text())["files"] and "head.safetensors" in files
        assert len(files) == info.n_layers + 1  # one file per decoder layer (streamed) + the head
        for f in files:
            assert (pa / f).read_bytes() == (pb / f).read_bytes()


def test_interrupted_run_resumes_after_last_finished_layer(tmp_path, tiny_models):
    info = load_model_info(tiny_models["llama"])  # 2 decoder layers
    recipes = [Recipe(grids=("int4_g64_sym_fp16",)), Recipe(grids=("int4_g128_asym_fp16",), transform="awq", method="rtn")]
    kw = dict(calibration="builtin", samples=4, seq_len=64, seed=0)

    def die_in_layer_1(mod, li, n):
        if li == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(info, recipes, cache_dir=tmp_path / "c", progress=die_in_layer_1, **kw)
    partial = [p for p in (tmp_path / "c").iterdir() if p.name.startswith("partial-")]
    assert len(partial) == 1 and (partial[0] / "layer_000.r0.safetensors").is_file()
    resumed = run_stage(info, recipes, cache_dir=tmp_path / "c", **kw)
    assert resumed.counter["resumed_from_layer"] == 0
    assert resumed.counter["layer_forwards"] == 2  # only layer 1 ran again: stats + propagation
    assert not partial[0].exists()
    clean = run_stage(info, recipes, cache_dir=tmp_path / "clean", **kw)
    for a, b in zip(resumed.results, clean.results, strict=True):
        assert set(a.quant) == set(b.quant) and set(a.fp) == set(b.fp)
        for mod in a.quant:
            for gid, qa in a.quant[mod].items():
                assert np.array_equal(qa.codes, b.quant[mod][gid].codes)
        for k in a.fp:
            assert torch.equal(a.fp[k], b.fp[k])
