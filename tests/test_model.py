"""Model loading: supported families, hashing, and refusals (pickle, incomplete, unsupported)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from quantprism.errors import ModelError
from quantprism.model import load_model_info, load_tokenizer, load_torch_model

from conftest import assert_one_line_error


@pytest.mark.parametrize("name, arch, tied", [
    ("llama", "LlamaForCausalLM", False),
    ("mistral", "MistralForCausalLM", False),
    ("qwen2", "Qwen2ForCausalLM", True),
    ("llama-tied", "LlamaForCausalLM", True),
])
def test_families_load(tiny_models, name, arch, tied):
    info = load_model_info(tiny_models[name])
    assert info.architecture == arch
    assert info.tied_embeddings is tied
    assert ("lm_head" in info.linear_shapes) is (not tied)
    assert info.linear_shapes["model.layers.0.self_attn.k_proj"] == (128, 256)
    assert info.linear_shapes["model.layers.1.mlp.down_proj"] == (256, 512)
    if arch == "Qwen2ForCausalLM":
        assert "model.layers.0.self_attn.q_proj.bias" in info.tensors  # Qwen2 attention biases
    model = load_torch_model(info)
    n = sum(p.numel() for p in model.parameters())
    assert n == info.n_params
    ids = torch.tensor([[0, 5, 9, 77]])
    assert model(ids).logits.shape == (1, 4, 4096)
    assert info.tokenizer_kind == "byte-level BPE"
    tok = load_tokenizer(info)
    assert tok.decode(tok.encode("def f(x):\n    return x", add_special_tokens=False)) == "def f(x):\n    return x"


def test_sha256_is_stable_and_content_sensitive(tiny_models, tmp_path):
    a = load_model_info(tiny_models["llama"]).weights_sha256
    assert a == load_model_info(tiny_models["llama"]).weights_sha256
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models["llama"], copy)
    assert load_model_info(copy).weights_sha256 == a
    from safetensors.torch import load_file, save_file

    st = copy / "model.safetensors"
    tensors = load_file(st)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, st, metadata={"format": "pt"})
    assert load_model_info(copy).weights_sha256 != a


def _broken(tmp_path, tiny_models, how):
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    how(d)
    return d


def _pickle_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _truncate(d):
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _drop_config(d):
    (d / "config.json").unlink()


def _bad_arch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))


def _bad_json(d):
    (d / "config.json").write_text("{not json")


def _missing_layer(d):
    from safetensors.torch import load_file, save_file

    p = d / "model.safetensors"
    t = load_file(p)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, p, metadata={"format": "pt"})


@pytest.mark.parametrize("how, needle", [
    (_pickle_only, "never unpickles"),
    (_truncate, "truncated safetensors"),
    (_drop_config, "no config.json"),
    (_bad_arch, "not supported"),
    (_bad_json, "invalid JSON"),
    (_missing_layer, "missing model.layers.1.mlp.up_proj.weight"),
])
def test_bad_model_dirs_refused(tmp_path, tiny_models, run_cli, how, needle):
    d = _broken(tmp_path, tiny_models, how)
    with pytest.raises(ModelError, match=needle.split()[0]):
        load_model_info(d)
    before = sorted(p.name for p in d.iterdir())
    rc, _, err = run_cli("inspect", d)
    assert_one_line_error(rc, err, needle)
    assert sorted(p.name for p in d.iterdir()) == before


def test_missing_model_dir(tmp_path, run_cli):
    rc, _, err = run_cli("inspect", tmp_path / "nowhere")
    assert_one_line_error(rc, err, "no such model directory")


def test_inspect_prints_architecture_shapes_and_applicability(tiny_models, tmp_path, run_cli, monkeypatch):
    t = tmp_path / "t.toml"
    t.write_text("[target.q4]\nformat='gguf'\nruntime='llamacpp'\nquant='Q4_K_M'\n"
                 "[target.g96]\nformat='awq'\nruntime='vllm'\nsymmetric=false\ngroup_size=512\n")
    rc, out, err = run_cli("inspect", tiny_models["qwen2"], "--targets", t)
    assert rc == 0, err
    for needle in ("Qwen2ForCausalLM", "tied", "byte-level BPE", "model.layers.*.self_attn.q_proj.bias",
                   "128×256", "q4", "g96", "group_size 512 does not divide in_features 256"):
        assert needle in out, needle
    from conftest import make_tiny_model

    odd = make_tiny_model(tmp_path / "odd", hidden=320, inter=640, layers=1)  # 320 % 256 ≠ 0
    rc, out, err = run_cli("inspect", odd, "--targets", t)
    assert rc == 0, err
    assert "llama.cpp fallback" in " ".join(out.split()) and "Q4_K→Q5_0" in out, out


@pytest.mark.parametrize("arch, needle", [
    ("Qwen3MoeForCausalLM", "mixture-of-experts"),
    ("MixtralForCausalLM", "mixture-of-experts"),
    ("LlavaForConditionalGeneration", "vision/audio tower"),
    ("T5ForConditionalGeneration", "encoder-decoder"),
    ("PhimoeForCausalLM", "mixture-of-experts"),
    ("Gemma3nForCausalLM", "AltUp"),
    ("GPT2LMHeadModel", "not supported"),
])
def test_unsupported_structures_refused_naming_what_is_missing(tmp_path, tiny_models, run_cli, arch, needle):
    """`quantprism targets` refuses an architecture it cannot quantize and prove with one line naming the
    architecture and what it has that is missing here; nothing is written."""
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = [arch]
    (d / "config.json").write_text(json.dumps(cfg))
    toml = tmp_path / "targets.toml"
    toml.write_text('[target.t]\nformat = "gguf"\nruntime = "llamacpp"\nquant = "Q4_K_M"\n')
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, _, err = run_cli("targets", toml, "--model", d)
    assert_one_line_error(rc, err, arch, needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
