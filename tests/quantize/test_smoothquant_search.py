"""SmoothQuant with a searched strength (smoothquant_alpha = "auto"): the search sees the runtime's activation
rounding (llama.cpp's Q8_K / Q8_0, ORT's int8 blocks, vLLM's int8 tokens) and picks, per layer and input, the
migration that minimises the output error of what the runtime will compute."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from quantprism.config import ConfigError, parse_targets
from quantprism.evaluate.runtime_arith import activation_rounding, int8_per_block, int8_per_token, q8_0, q8_k
from quantprism.exporters import FORMATS
from quantprism.model import load_model_info, load_torch_model
from quantprism.pipeline import plan_recipes
from quantprism.quantize.grids import IntGrid, KQuantGrid
from quantprism.quantize.stage import Recipe
from quantprism.quantize.stats import attach_collectors
from quantprism.quantize.transforms import awq_search, grid_descent, smoothquant_search


def _stats_with_outliers(layer, massive: float):
    """Layer 0's attention input statistics from inputs whose channels 3, 77 and 200 are ``massive`` × the rest —
    the massive activations real checkpoints carry (SmolLM2: down_proj and the norm-fed inputs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 512, 256, generator=g)
    x[..., [3, 77, 200]] *= massive
    stats, handles = attach_collectors(layer)
    with torch.inference_mode():
        layer.self_attn.q_proj(x)
    for h in handles:
        h.remove()
    return stats["attn_in"]


def test_activation_rounding_follows_each_runtime():
    assert activation_rounding("ggml", KQuantGrid("Q5_K", True)) is q8_k  # k-quants: Q8_K per 256
    assert activation_rounding("ggml", KQuantGrid("IQ4_XS", True)) is q8_k
    for t in ("Q5_1", "Q5_0", "Q4_0", "Q8_0"):  # the 32-block types: Q8_0 / Q8_1 per 32 (same values)
        assert activation_rounding("ggml", KQuantGrid(t, True)) is q8_0
    assert activation_rounding("token", IntGrid(8, -1, True)) is int8_per_token
    x = torch.randn(4, 128)
    x[:, 5] = 40.0  # one outlier crushes its block, not the other
    got = activation_rounding("nbits", IntGrid(8, 64, False))(x)
    assert torch.equal(got, int8_per_block(x, 64))
    err = (got - x).abs()
    assert err[:, :64].max() > 10 * err[:, 64:].max()
    assert activation_rounding("none", IntGrid(4, 128, True)) is None


def test_formats_name_their_runtimes_activation_rounding(tmp_path):
    (tmp_path / "t.toml").write_text(
        '[target.g]\nformat="gguf"\nruntime="llamacpp"\nquant="Q5_K_M"\nmethod="smoothquant+gptq"\nsmoothquant_alpha="auto"\n'
        '[target.o]\nformat="onnx"\nruntime="onnxruntime"\nquant="nbits8"\ngroup_size=32\nmethod="smoothquant+gptq"\n'
        '[target.c]\nformat="compressed-tensors"\nruntime="vllm"\nquant="W8A8"\ngroup_size=-1\nmethod="smoothquant+rtn"\n'
        '[target.w]\nformat="gptq"\nruntime="vllm"\nbits=4\ngroup_size=128\nmethod="gptq"\n')
    ts = parse_targets(tmp_path / "t.toml").targets
    assert {n: FORMATS[t.format].act_rounding(t) for n, t in ts.items()} == {
        "g": "ggml", "o": "nbits", "c": "token", "w": "none"}
    recipes, index = plan_recipes(list(ts.values()))
    r = {n: recipes[i] for n, i in index.items()}
    assert r["g"].sq_alpha is None and r["g"].act_round == "ggml"
    assert r["o"].sq_alpha == 0.5 and r["o"].act_round == "nbits"
    assert r["w"].act_round == "none"
    assert len({r["g"].key(), r["o"].key(), r["c"].key()}) == 3  # the activation rounding is part of the recipe


@pytest.mark.parametrize("value, ok", [("auto", True), (0.7, True), (1.5, False), ("0.5", False)])
def test_smoothquant_alpha_is_a_number_in_0_1_or_auto(tmp_path, value, ok):
    v = f'"{value}"' if isinstance(value, str) else value
    (tmp_path / "t.toml").write_text(f'[target.t]\nformat="gguf"\nruntime="llamacpp"\nquant="Q4_K_M"\n'
                                     f'method="smoothquant+gptq"\nsmoothquant_alpha={v}\n')
    if ok:
        assert parse_targets(tmp_path / "t.toml").targets["t"].smoothquant_alpha == value
    else:
        with pytest.raises(ConfigError, match="smoothquant_alpha"):
            parse_targets(tmp_path / "t.toml")


def test_the_search_migrates_massive_activations_only_where_the_runtime_rounds_them():
    """Trained weights (the bundled model's layer 0) and inputs with massive channels. With ORT's int8 blocks in the
    loop the search migrates (α > 0) and cuts the output error several-fold against no scaling; with weights alone
    (fp activations) on a fine 8-bit grid, scaling buys little and the search may keep none — never worse than none."""
    layer = load_torch_model(load_model_info(None)).model.layers[0]
    st = _stats_with_outliers(layer, 60.0)
    grid = IntGrid(8, 32, False)
    s, info = smoothquant_search(layer, "attn_in", st, grid, activation_rounding("nbits", grid))
    assert info["alpha"] is not None and info["mse"] < info["mse_unscaled"] / 3, info
    assert s[[3, 77, 200]].min() > 4 * s.median()  # the massive channels are the ones divided down
    _, plain = smoothquant_search(layer, "attn_in", st, grid, None)
    assert plain["mse"] <= plain["mse_unscaled"]
    assert plain["mse_unscaled"] < info["mse_unscaled"] / 4  # what the rounding of activations costs unscaled


@pytest.mark.parametrize("n", [9, 10, 20])
def test_grid_descent_finds_a_single_valleys_floor_with_fewer_evaluations(n):
    for floor in range(n):
        errs = grid_descent(n, lambda i, f=floor: (i - f) ** 2 + 0.01 * i)
        assert min(errs, key=errs.__getitem__) == floor and len(errs) < n - 2
    # two valleys: a local search may stop in the shallower one (the coarse pass lands beside it); stride 1 sees both
    two = [1.0, 0.5, 1.0, 1.0, 0.6, 0.1, 1.0, 1.0, 1.0] + [1.0] * (n - 9)
    local = grid_descent(n, two.__getitem__)
    assert min(local, key=local.__getitem__) == 1 and 5 not in local
    full = grid_descent(n, two.__getitem__, 1)
    assert min(full, key=full.__getitem__) == 5 and len(full) == n


@pytest.mark.parametrize("massive", [1.0, 8.0, 60.0])
def test_the_searches_choose_what_the_exhaustive_search_chooses(massive):
    """Trained weights (bundled layer 0) with and without massive channels: SmoothQuant's α (ORT's int8 blocks and
    llama.cpp's Q8_0 in the loop) and AWQ's ratio from ``grid_descent`` equal the exhaustive search's."""
    layer = load_torch_model(load_model_info(None)).model.layers[0]
    st = _stats_with_outliers(layer, massive)
    for grid, kind in ((IntGrid(8, 32, False), "nbits"), (KQuantGrid("Q5_0", True), "ggml")):
        _, fast = smoothquant_search(layer, "attn_in", st, grid, activation_rounding(kind, grid))
        _, full = smoothquant_search(layer, "attn_in", st, grid, activation_rounding(kind, grid), stride=1)
        assert (fast["alpha"], fast["mse"]) == (full["alpha"], full["mse"]) and fast["evaluated"] < full["evaluated"]
    _, fast = awq_search(layer, "attn_in", st, IntGrid(4, 64, True))
    _, full = awq_search(layer, "attn_in", st, IntGrid(4, 64, True), stride=1)
    assert (fast["ratio"], fast["mse"]) == (full["ratio"], full["mse"]) and fast["evaluated"] < full["evaluated"] == 21


@pytest.mark.parametrize("value, want", [(["down_proj"], ("mlp_out",)), (["k_proj", "q_proj", "v_proj"], ("attn_in",)),
                                         (["gate_proj", "down_proj"], ("mlp_in", "mlp_out")), (["lm_head"], None),
                                         ([], None)])
def test_smoothquant_inputs_name_linears_and_become_input_groups(tmp_path, value, want):
    (tmp_path / "t.toml").write_text('[target.t]\nformat="gguf"\nruntime="llamacpp"\nquant="Q5_K_M"\n'
                                     f'method="smoothquant+gptq"\nsmoothquant_inputs={value!r}\n'.replace("'", '"'))
    if want is None:
        with pytest.raises(ConfigError, match="smoothquant_inputs.*down_proj"):
            parse_targets(tmp_path / "t.toml")
        return
    t = parse_targets(tmp_path / "t.toml").targets["t"]
    assert t.smoothquant_inputs == want
    (r,), _ = plan_recipes([t])
    assert r.sq_inputs == want
    (every,), _ = plan_recipes([dataclasses.replace(t, smoothquant_inputs=())])
    assert every.key() != r.key()  # a different recipe, cached apart
    assert every.key() == Recipe(**{k: v for k, v in dataclasses.asdict(every).items() if k != "sq_inputs"}).key()


def test_smoothquant_inputs_need_a_smoothquant_method(tmp_path):
    (tmp_path / "t.toml").write_text('[target.t]\nformat="gguf"\nruntime="llamacpp"\nquant="Q5_K_M"\nmethod="gptq"\n'
                                     'smoothquant_inputs=["down_proj"]\n')
    with pytest.raises(ConfigError, match="smoothquant_inputs.*needs method"):
        parse_targets(tmp_path / "t.toml")


def test_only_the_named_inputs_are_scaled():
    """sq_inputs=("mlp_out",): down_proj's columns and up_proj's rows (where its scale is divided out) move; the
    norms, q/k/v/o and gate stay bit-identical (a Q4_1-origin row stays on its grid). Without it every input moves."""
    from quantprism.calibration import build_calibration
    from quantprism.model import load_tokenizer
    from quantprism.quantize.stage import StageSettings, run_canonical

    info = load_model_info(None)
    ids = build_calibration(load_tokenizer(info), "builtin", samples=2, seq_len=64, seed=0, warn=False).input_ids
    model = load_torch_model(info)
    orig = {k: v.detach().clone() for k, v in model.model.layers[0].state_dict().items()}
    grids = (KQuantGrid("Q5_K", True).id,)
    only = Recipe(grids=grids, transform="smoothquant", method="rtn", sq_alpha=None, act_round="ggml",
                  search_grids=grids, sq_inputs=("mlp_out",))
    every = dataclasses.replace(only, sq_inputs=())
    res = run_canonical(model, ids, StageSettings([only, every], sequential=False))
    moved = {}
    for tag, r in zip(("only", "every"), res, strict=True):
        moved[tag] = sorted(k for k, v in orig.items() if not torch.equal(r.fp[f"model.layers.0.{k}"], v.float()))
    assert set(moved["only"]) <= {"mlp.down_proj.weight", "mlp.up_proj.weight"}, moved
    assert {k for k in res[0].info["layers"][0] if k.startswith("sq_")} == {"sq_mlp_out"}
    assert {k for k in res[1].info["layers"][0] if k.startswith("sq_")} >= {"sq_attn_in", "sq_mlp_in", "sq_mlp_out"}
