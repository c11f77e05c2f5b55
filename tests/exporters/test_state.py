"""One source of fp tensors for every exporter: the canonical fp state (transformed norms, biases, embeddings)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantprism.config import Target
from quantprism.exporters.state import canonical_fp_state, canonical_weights
from quantprism.model import load_model_info


@pytest.fixture(scope="module")
def awq(tmp_path_factory):
    """An AWQ (RTN) result for GGUF Q4_K_M on the bundled model: AWQ folds its scales into the RMSNorm gains."""
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(None)
    t = Target(name="g", format="gguf", runtime="llamacpp", quant="Q4_K_M", method="awq")
    recipes, _ = plan_recipes([t])
    res = run_stage(info, recipes, "builtin", 4, 128, 0, cache_dir=tmp_path_factory.mktemp("c")).results[0]
    return info, t, res


def test_fp_state_takes_the_transformed_tensors(awq):
    from safetensors.torch import load_file

    info, _, res = awq
    original = load_file(str(info.path / "model.safetensors"))
    assert canonical_fp_state(info, None).keys() == original.keys()
    state = canonical_fp_state(info, res)
    norm = "model.layers.0.input_layernorm.weight"
    assert norm in res.fp and not torch.equal(res.fp[norm].float(), original[norm].float())  # AWQ changed it
    assert torch.equal(state[norm], res.fp[norm])
    assert state["model.norm.weight"].dtype == original["model.norm.weight"].dtype  # untouched: as stored


def test_canonical_weights_are_the_dequantized_grids_in_fp32(awq):
    from quantprism.exporters import reference_choice

    info, t, res = awq
    choose = reference_choice(t, info, res)
    w = canonical_weights(info, res, choose)
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj", "lm_head", "model.embed_tokens"):
        gid = choose(mod)
        assert gid is not None
        assert w[f"{mod}.weight"].dtype == torch.float32
        assert np.array_equal(w[f"{mod}.weight"].numpy(), res.quant[mod][gid].dequantize())
    assert choose("model.layers.3.mlp.down_proj").startswith("q6_k")  # llama.cpp's use_more_bits rule (4 layers)
    assert choose("model.layers.0.mlp.down_proj").startswith("q4_k")


def test_gguf_carries_the_transformed_norms(awq, tmp_path):
    """The GGUF + AWQ bug at its root: the file's norms are the canonical (AWQ-scaled) ones."""
    import gguf

    from quantprism.exporters.gguf import write_gguf

    info, t, res = awq
    path = write_gguf(tmp_path / "m.gguf", info, res, "Q4_K_M", imatrix=t.imatrix)
    tensors = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(str(path)).tensors}
    for i in range(info.n_layers):
        for hf, g in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            want = res.fp[f"model.layers.{i}.{hf}.weight"].float().numpy()
            assert np.array_equal(tensors[f"blk.{i}.{g}.weight"], want)


def test_tied_head_grid_is_the_embedding(tiny_models, tmp_path):
    from quantprism.exporters import reference_choice
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(tiny_models["qwen2"])
    t = Target(name="g", format="gguf", runtime="llamacpp", quant="Q8_0", method="rtn")
    res = run_stage(info, plan_recipes([t])[0], "builtin", 2, 64, 0, cache_dir=tmp_path / "c").results[0]
    choose = reference_choice(t, info, res)
    assert choose("lm_head") == "q8_0" and choose("model.embed_tokens") is None
    w = canonical_weights(info, res, choose)
    assert np.array_equal(w["model.embed_tokens.weight"].numpy(), res.quant["lm_head"]["q8_0"].dequantize())
