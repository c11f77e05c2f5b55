"""The bundled reference model: architecture, size budget, held-out split, and that it actually learned."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quantprism.calibration import BUILTIN_CALIBRATION, BUILTIN_EVAL
from quantprism.model import BUILTIN_MODEL, load_model_info, load_tokenizer, load_torch_model


def test_architecture_matches_the_spec():
    info = load_model_info(None)
    cfg = info.config
    assert info.architecture == "LlamaForCausalLM" and not info.tied_embeddings
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (256, 4, 2, 768)
    assert 4 <= cfg["num_hidden_layers"] <= 6
    assert cfg.get("head_dim", 64) == 64
    for name, (_, k) in info.linear_shapes.items():
        assert k % 256 == 0, name  # Q4_K/Q5_K/Q6_K and groups 32/64/128 all apply
    assert info.tokenizer_kind == "byte-level BPE"
    training = json.loads((BUILTIN_MODEL / "training.json").read_text())
    assert training["seed"] == 0 and training["steps"] > 0


def test_assets_fit_the_budget():
    total = sum(p.stat().st_size for p in BUILTIN_MODEL.parent.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"assets are {total / 2**20:.1f} MiB"


def test_heldout_split_is_by_module():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from corpus import is_heldout, unit

    # a module's docstrings and its source (which contains them) always fall on the same side
    for mod in ("json/tool.py", "os.py", "asyncio/tasks.py", "email/message.py"):
        assert unit(f"doc:{mod}") == unit(f"src:{mod}") == mod
        assert is_heldout(f"doc:{mod}") == is_heldout(f"src:{mod}")


def test_heldout_text_is_not_in_calibration_text():
    cal = BUILTIN_CALIBRATION.read_text()
    paras = [p for p in BUILTIN_EVAL.read_text().split("\n\n") if len(p) > 200]
    assert len(paras) > 50
    leaked = [p[:60] for p in paras if p in cal]
    # the eval text drops paragraphs that also occur in training (pydoc repeats some verbatim)
    assert not leaked, leaked[:3]


@pytest.mark.slow
def test_heldout_perplexity_far_below_unigram():
    from quantprism.evaluate.perplexity import eval_chunks, torch_nll

    info = load_model_info(None)
    tok = load_tokenizer(info)
    ids = tok.encode(BUILTIN_EVAL.read_text(), add_special_tokens=False)
    chunks = eval_chunks(ids, 512, tok.bos_token_id, max_chunks=16)
    ppl = math.exp(float(torch_nll(load_torch_model(info), chunks).mean()))
    counts = np.ones(len(tok))
    np.add.at(counts, tok.encode(BUILTIN_CALIBRATION.read_text(), add_special_tokens=False), 1)
    logp = np.log(counts / counts.sum())
    unigram = math.exp(float(-logp[chunks[:, 1:].reshape(-1)].mean()))
    assert ppl < unigram / 3, (ppl, unigram)
