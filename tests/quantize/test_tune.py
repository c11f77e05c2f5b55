"""Block-wise output reconstruction (tune.py): every tunable grid's parameters round-trip exactly through the
differentiable form, tuning keeps the storage ranges, and learned rounding moves codes by one level at most."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantprism.model import load_model_info
from quantprism.pipeline import run_stage
from quantprism.quantize.gptq import gptq_quantize
from quantprism.quantize.grids import IntGrid, grid_from_id
from quantprism.quantize.stage import Recipe
from quantprism.quantize.tune import _Linear, code_units, tunable

GRIDS = ["int4_g64_sym_fp16", "int4_g32_asym_fp16", "q4_k_imat", "q5_k_imat", "q6_k_imat", "q8_0", "q4_0_imat",
         "q5_0_imat", "q4_1_imat", "q5_1_imat"]


@pytest.mark.parametrize("gid", GRIDS)
def test_untuned_form_is_the_solved_tensor_and_code_units_round_to_gptqs_codes(gid):
    """Zero corrections reproduce the dequantized tensor bit for bit and encode to the same bytes; GPTQ's
    error-updated weights in code units round back to exactly its codes (so learned rounding starts at GPTQ)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 512, generator=g)
    X = torch.randn(1024, 512, generator=g) * torch.linspace(0.2, 3, 512)
    H = 2 * X.T @ X / X.shape[0]
    grid = grid_from_id(gid)
    assert tunable(grid)
    upd = torch.empty(W.shape)
    q = gptq_quantize(W, H, grid, act_order=isinstance(grid, IntGrid), updated=upd)
    lin = _Linear(q, None)
    assert np.array_equal(lin.weight(hard=True, zero_corr=True).detach().numpy(), q.dequantize())
    enc = lin.encode()
    assert np.array_equal(enc.codes, q.codes) and all(np.array_equal(enc.params[k], q.params[k]) for k in q.params)
    lr = _Linear(q, code_units(q, upd))
    assert np.array_equal((lr.centred(hard=True) + lr.Z).numpy(), q.codes.astype(np.float32))
    assert np.array_equal(lr.weight(hard=True).detach().numpy(), q.dequantize())


def test_corrections_encode_within_the_storage_ranges():
    """Pushed hard, the 6-bit k-quant sub-scales and mins stay in 0..63, Q6_K's in int8, and the encoded bytes
    dequantize to what the differentiable form computes with the stored values."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 256, generator=g)
    H = torch.eye(256)
    for gid in ("q4_k_imat", "q6_k_imat", "q5_1_imat"):
        q = gptq_quantize(W, H, grid_from_id(gid))
        lin = _Linear(q, None)
        with torch.no_grad():
            for t in lin.rel.values():
                t.uniform_(-0.2, 0.2, generator=g)
            for t in lin.int.values():
                t.uniform_(-90, 90, generator=g)
        enc = lin.encode()
        for k in lin.int:
            lo, hi = (-128, 127) if gid.startswith("q6") else (0, 63)
            assert enc.params[k].min() >= lo and enc.params[k].max() <= hi and enc.params[k].dtype == q.params[k].dtype
        assert np.array_equal(enc.dequantize(), lin.weight(hard=True).detach().numpy())
        assert not np.array_equal(enc.dequantize(), q.dequantize())


@pytest.mark.slow
def test_learned_rounding_and_gguf_tuning_lower_the_layer_loss(tmp_path):
    """On the bundled (trained) model: with learned rounding a layer's tuning is kept exactly when its loss over the
    calibration set went down (most layers, by > 3 %), codes move by at most one level from GPTQ's, and a dropped
    tuning leaves GPTQ's result untouched; GGUF grids (a k-quant and a 32-block fallback) are tuned too, on the fp
    inputs (the quantized inputs are the chain's, another model's)."""
    info = load_model_info(None)
    kw = dict(calibration="builtin", samples=32, seq_len=128, seed=0)
    grids = ("int4_g64_sym_fp16", "q4_k_imat", "q5_0_imat")
    base = run_stage(info, [Recipe(grids=grids)], cache_dir=tmp_path / "a", **kw)
    tuned = run_stage(info, [Recipe(grids=grids, tune=2, tune_round=True)], cache_dir=tmp_path / "b", **kw)
    for gid in grids:
        recs = [layer[f"tune_{gid}"] for layer in tuned.results[0].info["layers"]]
        assert len(recs) == info.n_layers and all(r["kept"] == (r["loss_after"] < r["loss_before"]) for r in recs)
        assert sum(r["kept"] and r["loss_after"] < 0.97 * r["loss_before"] for r in recs) >= info.n_layers / 2, gid
        # the chain is the first grid's model: only its set learns from the quantized inputs, the others from the fp ones
        assert {r["inputs"] for r in recs} == {"quantized" if gid == grids[0] else "fp"}, gid
    m = "model.layers.0.mlp.down_proj"  # layer 0's inputs are the same in both passes: GPTQ's codes are the start
    for gid in grids:
        a = base.results[0].quant[m][gid].codes.astype(int)
        b = tuned.results[0].quant[m][gid].codes.astype(int)
        rec0 = tuned.results[0].info["layers"][0][f"tune_{gid}"]
        assert np.abs(a - b).max() <= 1 and (rec0["codes_changed"] > 0 if rec0["kept"] else np.array_equal(a, b)), gid


def test_gguf_targets_tune_their_deployed_mix_once(tmp_path):
    """A GGUF target's recipe carries its per-tensor types; each layer's mix is ONE tuning set covering every linear with
    the type the writer packs; equal mixes of two targets are one set; targets.toml reaches it (tune_round too)."""
    from quantprism.config import ConfigError, parse_targets
    from quantprism.exporters.gguf import model_types
    from quantprism.pipeline import plan_recipes
    from quantprism.quantize.stage import _tune_sets

    info = load_model_info(None)
    f = tmp_path / "targets.toml"
    f.write_text("[target.a]\nformat='gguf'\nruntime='llamacpp'\nquant='Q4_K_M'\ntune=1\ntune_round=true\n"
                 "[target.b]\nformat='gguf'\nruntime='llamacpp'\nquant='Q4_K_M'\ntune=1\ntune_round=true\n"
                 "[target.c]\nformat='gguf'\nruntime='llamacpp'\nquant='Q4_K_M'\n")
    recipes, index = plan_recipes(list(parse_targets(f).targets.values()), info)
    r = recipes[index["a"]]
    assert index["a"] == index["b"] != index["c"] and r.tune_round and not recipes[index["c"]].tune_mix
    f2 = tmp_path / "t2.toml"
    f2.write_text("[target.a]\nformat='gguf'\nruntime='llamacpp'\nquant='Q4_K_M'\ntune_round=true\n")
    with pytest.raises(ConfigError, match="tune_round.*'tune'"):
        parse_targets(f2)
    types = model_types("Q4_K_M", info, None, True)
    lins = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
    layer = torch.nn.Module()  # _tune_sets reads only the widths of mix-less grids; every grid here is in the mix
    for li in range(info.n_layers):
        sets = _tune_sets(r, f"model.layers.{li}", lins, layer)
        assert len(sets) == 1, sets
        _, assign = sets[0]
        assert assign == {lin: types[f"model.layers.{li}.{lin}"].lower() + ("_imat" if types[f"model.layers.{li}.{lin}"] != "Q8_0" else "")
                          for lin in lins}


def test_tune_lr_reaches_the_optimizer_and_changes_the_tuning(tmp_path):
    """targets.toml's tune_lr becomes the recipe's (its own cache key; bad values are one line); the stage hands it to
    the tuning, whose record shows the scaled peak step, and the tuned layer's loss differs from the default steps'."""
    from quantprism.config import ConfigError, parse_targets
    from quantprism.pipeline import plan_recipes
    from quantprism.quantize import tune

    f = tmp_path / "t.toml"
    head = "[target.a]\nformat='gptq'\nruntime='vllm'\nbits=4\ngroup_size=64\nmethod='gptq'\n"
    f.write_text(head + "tune=1\ntune_round=true\ntune_lr=3\n")
    (r,), _ = plan_recipes(list(parse_targets(f).targets.values()))
    assert r.tune_lr == 3.0 and r.key() != Recipe(**{**r.__dict__, "tune_lr": 1.0}).key()
    for bad, msg in (("tune=1\ntune_lr=0", "tune_lr.*\\(0, 10\\]"), ("tune_lr=2", "tune_lr.*'tune'")):
        f.write_text(head + bad + "\n")
        with pytest.raises(ConfigError, match=msg):
            parse_targets(f)
    info = load_model_info(None)
    kw = dict(calibration="builtin", samples=8, seq_len=64, seed=0)
    runs = {lr: run_stage(info, [Recipe(grids=("int4_g64_sym_fp16",), tune=1, tune_round=True, tune_lr=lr)],
                          cache_dir=tmp_path / str(lr), **kw).results[0] for lr in (1.0, 3.0)}
    for lr, res in runs.items():
        assert all(layer["tune_int4_g64_sym_fp16"]["lr"] == tune.SCALE_LR * lr for layer in res.info["layers"])
    first = [res.info["layers"][0]["tune_int4_g64_sym_fp16"] for res in runs.values()]  # same inputs in both runs
    assert first[0]["loss_before"] == first[1]["loss_before"] and first[0]["loss_after"] != first[1]["loss_after"]
