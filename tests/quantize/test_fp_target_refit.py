"""fp targets (fit the quantized layer on quantized inputs to the fp layer on fp inputs) and the scale refit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantprism.model import load_model_info
from quantprism.pipeline import run_stage
from quantprism.quantize.gptq import fp_target_weights, gptq_quantize
from quantprism.quantize.grids import grid_from_id
from quantprism.quantize.refit import refit_scales, row_errors
from quantprism.quantize.stage import Recipe
from quantprism.quantize.stats import InputStats


def _inputs(n=4096, k=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.1)
    X[:, :3] *= 15  # outlier channels, as real checkpoints have
    return X, g


def test_cross_statistics_are_the_float64_product():
    X, g = _inputs(n=700, k=130)
    Xq = X + 0.1 * torch.randn(X.shape, generator=g)
    st = InputStats(X.shape[1], sample_tokens=0, cross=True)
    for a in range(0, 700, 256):  # several batches, a short last one
        st.add(Xq[a : a + 256], X[a : a + 256])
    st.to_cpu()
    want = (2 * Xq.double().T @ X.double() / 700).float()
    assert torch.allclose(st.cross_hessian, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.hessian, (2 * Xq.double().T @ Xq.double() / 700).float(), rtol=1e-5, atol=1e-5)


def test_fp_target_is_w_when_inputs_agree_and_lowers_the_fp_output_error_when_they_do_not():
    X, g = _inputs()
    W = 0.05 * torch.randn(96, X.shape[1], generator=g)
    H = 2 * X.T @ X / X.shape[0]
    assert torch.allclose(fp_target_weights(W, H, H, 0.01), W, atol=1e-6)
    # the quantized model's inputs: the fp inputs plus an error correlated with them (what upstream quantization does)
    Xq = X @ (torch.eye(X.shape[1]) + 0.05 * torch.randn(X.shape[1], X.shape[1], generator=g))
    Hq, G = 2 * Xq.T @ Xq / X.shape[0], 2 * Xq.T @ X / X.shape[0]
    V = fp_target_weights(W, Hq, G, 0.01)
    grid = grid_from_id("int4_g64_sym_fp16")
    Y = X @ W.T
    err = {}
    for name, target in (("quantized", W), ("fp", V)):
        Q = torch.from_numpy(gptq_quantize(target, Hq, grid, act_order=True).dequantize())
        err[name] = float(((Y - Xq @ Q.T) ** 2).mean())
    assert err["fp"] < 0.8 * err["quantized"], err


@pytest.mark.parametrize("gid", ["int4_g64_sym_fp16", "int4_g64_asym_fp16", "int4_g32_sym_fp16", "int8_gc_sym_n_fp32"])
def test_refit_never_raises_a_rows_error_and_keeps_the_codes(gid):
    X, g = _inputs()
    W = 0.05 * torch.randn(80, X.shape[1], generator=g)
    H = 2 * X.T @ X / X.shape[0]
    q = gptq_quantize(W, H, grid_from_id(gid), act_order=True)
    r = refit_scales(W, H, q)
    assert np.array_equal(r.codes, q.codes) and np.array_equal(r.params["zero"], q.params["zero"])
    before = row_errors(W, torch.from_numpy(q.dequantize()), H)
    after = row_errors(W, torch.from_numpy(r.dequantize()), H)
    assert bool((after <= before * (1 + 1e-6)).all())
    if gid.startswith("int4"):  # 4-bit groups fitted before the sweep leave room: the refit must find it
        assert float(after.sum()) < 0.97 * float(before.sum())
    if gid.endswith("fp16"):  # the stored scales stay representable in the format's dtype
        s = r.params["scale"]
        assert np.array_equal(s, s.astype(np.float16).astype(s.dtype))


@pytest.mark.slow
def test_fp_target_pass_equals_the_plain_pass_where_inputs_still_agree(tmp_path, tiny_models):
    """Layer 0's attention input is the embedding in both models: identical codes there; deeper linears differ, and
    the fp stream costs one extra forward per layer."""
    info = load_model_info(tiny_models["llama"])
    kw = dict(calibration="builtin", samples=4, seq_len=64, seed=0)
    grid = "int4_g32_sym_fp16"
    plain = run_stage(info, [Recipe(grids=(grid,))], cache_dir=tmp_path / "a", **kw)
    fp = run_stage(info, [Recipe(grids=(grid,), target="fp")], cache_dir=tmp_path / "b", **kw)
    qa, qb = plain.results[0].quant, fp.results[0].quant
    for lin in ("q_proj", "k_proj", "v_proj"):
        m = f"model.layers.0.self_attn.{lin}"
        assert np.array_equal(qa[m][grid].codes, qb[m][grid].codes)
    deeper = [m for m in qa if m.startswith("model.layers.1.")]
    assert any(not np.array_equal(qa[m][grid].codes, qb[m][grid].codes) for m in deeper)
    assert fp.counter["layer_forwards"] == plain.counter["layer_forwards"] + info.n_layers


@pytest.mark.slow
def test_tuned_scales_lower_the_layer_loss_and_keep_the_codes(tmp_path):
    """Block-wise reconstruction on the bundled (trained) model: per layer the loss over the calibration set goes down
    or the tuning is dropped; codes and zero points are the untuned pass's; only scales move."""
    info = load_model_info(None)
    kw = dict(calibration="builtin", samples=8, seq_len=128, seed=0)
    grid = "int4_g64_asym_fp16"
    base = run_stage(info, [Recipe(grids=(grid,), refit=True)], cache_dir=tmp_path / "a", **kw)
    tuned = run_stage(info, [Recipe(grids=(grid,), refit=True, tune=2)], cache_dir=tmp_path / "b", **kw)
    recs = [layer[f"tune_{grid}"] for layer in tuned.results[0].info["layers"]]
    assert len(recs) == info.n_layers and all(r["loss_after"] <= r["loss_before"] for r in recs)
    assert any(r["kept"] and r["loss_after"] < 0.97 * r["loss_before"] for r in recs)
    qa, qb = base.results[0].quant, tuned.results[0].quant
    m = "model.layers.0.mlp.down_proj"  # layer 0's inputs are the same in both passes: same codes
    assert np.array_equal(qa[m][grid].codes, qb[m][grid].codes)
    assert np.array_equal(qa[m][grid].params["zero"], qb[m][grid].params["zero"])
    if recs[0]["kept"]:
        assert not np.array_equal(qa[m][grid].params["scale"], qb[m][grid].params["scale"])


def test_targets_toml_refit_and_tune_reach_their_own_recipe(tmp_path):
    from quantprism.config import ConfigError, parse_targets
    from quantprism.pipeline import plan_recipes

    f = tmp_path / "targets.toml"
    f.write_text("[target.a]\nformat='gptq'\nruntime='vllm'\ngroup_size=64\nrefit=true\ntune=1\n"
                 "[target.b]\nformat='gptq'\nruntime='vllm'\ngroup_size=32\n")
    recipes, index = plan_recipes(list(parse_targets(f).targets.values()))
    a, b = recipes[index["a"]], recipes[index["b"]]
    assert index["a"] != index["b"] and (a.refit, a.tune) == (True, 1) and (b.refit, b.tune) == (False, 0)
    f.write_text("[target.a]\nformat='gptq'\nruntime='vllm'\ntune=99\n")
    with pytest.raises(ConfigError, match="tune"):
        parse_targets(f)
