"""Mixed precision: measured sensitivity ranks tensors usefully, and plans respect their budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantprism.config import parse_targets
from quantprism.evaluate.canonical import canonical_overrides
from quantprism.model import load_model_info, load_torch_model
from quantprism.pipeline import plan_recipes, run_stage, target_plan
from quantprism.quantize.mixed import bits_per_weight, higher_grid, plan


def test_bits_per_weight_and_higher_grid():
    assert bits_per_weight("int4_g128_sym_fp16") == pytest.approx(4 + 16 / 128)
    assert bits_per_weight("int4_g128_asym_fp16") == pytest.approx(4 + 20 / 128)
    assert bits_per_weight("q4_k_imat") == 4.5 and bits_per_weight("q6_k") == 6.5625
    assert higher_grid("int4_g128_sym_fp16") == "int8_g128_sym_fp16"
    assert higher_grid("q4_k_imat") == "q6_k_imat" and higher_grid("q4_k") == "q6_k"


def test_plan_budget_and_count():
    sens = {"a": 1.0, "b": 0.5, "c": 0.01, "d": 0.02}
    sizes = {k: 1000 for k in sens}
    p = plan(sens, sizes, "int4_g128_sym_fp16", protect=2)
    assert p["protected"] == ["a", "b"]
    # a budget that admits exactly one protected tensor out of four
    one = (3 * bits_per_weight("int4_g128_sym_fp16") + bits_per_weight("int8_g128_sym_fp16")) / 4
    p = plan(sens, sizes, "int4_g128_sym_fp16", max_bpw=one + 1e-6)
    assert p["protected"] == ["a"] and p["bits_per_weight"] <= one + 1e-6


@pytest.mark.slow
def test_sensitivity_plan_on_bundled_model(tmp_path):
    tf = tmp_path / "t.toml"
    tf.write_text('[target.m]\nformat = "gptq"\nruntime = "vllm"\ngroup_size = 128\nmethod = "rtn"\nprotect = 2\n')
    t = parse_targets(tf).targets["m"]
    recipes, _ = plan_recipes([t])
    assert recipes[0].sensitivity and "int8_g128_sym_fp16" in recipes[0].grids
    info = load_model_info(None)
    run = run_stage(info, recipes, "builtin", 16, 256, 0, cache_dir=tmp_path / "c")
    res = run.results[0]
    p = target_plan(t, res)
    sens = res.info["sensitivity"]["int4_g128_sym_fp16"]
    assert len(sens) == 7 * info.n_layers and all(v >= 0 for v in sens.values())
    assert len(p["protected"]) == 2 and set(p["protected"]) <= set(sens)
    # protecting the plan's choice helps more than protecting the two least sensitive tensors
    model = load_torch_model(info)
    ids = torch.as_tensor(run.calibration.input_ids[8:16])
    with torch.inference_mode():
        ref = torch.log_softmax(model(ids).logits, -1)

    def kld_with(protected: list[str]) -> float:
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        ov = canonical_overrides(res, lambda m: "int8_g128_sym_fp16" if m in protected else "int4_g128_sym_fp16")
        sd.update({k: v for k, v in ov.items() if k in sd and k.startswith("model.layers.")})
        m2 = load_torch_model(info)
        m2.load_state_dict(sd)
        with torch.inference_mode():
            lq = torch.log_softmax(m2(ids).logits, -1)
        return float((ref.exp() * (ref - lq)).sum(-1).mean())

    least = sorted(sens, key=sens.get)[:2]
    assert kld_with(p["protected"]) < kld_with(least) < kld_with([])
    assert np.isfinite(p["bits_per_weight"])
