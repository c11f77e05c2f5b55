"""vLLM checkpoints (GPTQ, AWQ, compressed-tensors): an independent oracle decodes exactly the canonical weights.

The oracle (tests/vllm_oracle.py) is written from the reference, not from the exporters: for every
decoder linear it applies vLLM's config rules (dynamic / modules_to_not_convert / ignore + targets,
on fused layer names) and the format's bit layout, and must reproduce the canonical dequantized
weights bit for bit. Mutation tests break one packer at a time and check that the oracle notices.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantprism.config import Target
from quantprism.errors import ArtifactError
from quantprism.evaluate.canonical import canonical_overrides
from quantprism.exporters import awq, gptq, reference_choice
from quantprism.exporters import compressed_tensors as ct
from quantprism.exporters.grids import grid_needs
from quantprism.exporters.intpack import pack_int32
from quantprism.exporters.vllm import EXPORT_RECORD, export_vllm
from quantprism.exporters.vllm_plan import module_plan
from quantprism.model import load_model_info
from quantprism.pipeline import plan_recipes, run_stage
from quantprism.quantize.grids import grid_from_id
from quantprism.quantize.mixed import higher_grid
from quantprism.quantize.stage import CanonicalModel, Recipe

from conftest import make_tiny_model
from vllm_oracle import decode, load_dir

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = {
    "gptq": Target(name="gptq", format="gptq", runtime="vllm", group_size=128, method="rtn", protect=1),
    "ct-sym": Target(name="ct-sym", format="compressed-tensors", runtime="vllm", quant="W4A16", group_size=128, method="rtn"),
    "ct-asym": Target(name="ct-asym", format="compressed-tensors", runtime="vllm", quant="W4A16", group_size=64,
                      symmetric=False, method="rtn"),
    "awq": Target(name="awq", format="awq", runtime="vllm", group_size=64, symmetric=False, method="awq"),
    "w8a8": Target(name="w8a8", format="compressed-tensors", runtime="vllm", quant="W8A8", group_size=-1,
                   method="smoothquant+gptq", hardware="gpu-cuda"),  # full ±127 grid (VNNI/GPU); cpu-avx2: ±63
}
# one protected shard of each fused group, plus an unfused module
PLAN_PROTECT = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
PLAN_EXPANDED = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                 "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"}


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> dict:
    """Per family: the model and one canonical pass (4 samples × 64 tokens) serving every target."""
    root = tmp_path_factory.mktemp("vllm")
    out = {}
    for family, arch, tied in (("llama", "llama", False), ("qwen2", "qwen2", True)):
        info = load_model_info(make_tiny_model(root / family, arch, tied=tied, hidden=128, inter=256))
        recipes, index = plan_recipes(list(TARGETS.values()))
        run = run_stage(info, recipes, "builtin", 4, 64, 0, cache_dir=root / "cache")
        out[family] = (info, {name: run.results[index[name]] for name in TARGETS})
    return out


def original_state(info) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted({t.file for t in info.tensors.values()}):
        state.update(load_file(str(info.path / f)))
    return state


def check_oracle(out: Path, info, res, choose, dtype: str = "bfloat16") -> dict[str, str]:
    """Every tensor of the checkpoint is what the canonical result says; returns the oracle's labels."""
    dec, tensors, cfg = decode(out)
    orig = original_state(info)
    want = {**orig, **canonical_overrides(res, choose)}
    labels = {}
    for mod, (label, w) in dec.items():
        labels[mod] = label
        gid = choose(mod)
        assert (label == "fp") == (gid is None), (mod, label, gid)
        expect = want[f"{mod}.weight"]
        if gid is None:
            expect = expect.to(DT[dtype]).float()
        np.testing.assert_array_equal(w, expect.numpy(), err_msg=mod)
    assert len(dec) == 7 * info.n_layers
    # every other tensor: the canonical fp tensor in the checkpoint dtype, nothing missing, nothing extra
    linear_weights = {f"{m}.weight" for m in dec}
    others = {n for n in orig if n not in linear_weights}
    stored = {n for n in tensors if not n.startswith(tuple(f"{m}." for m in dec)) or n.endswith(".bias")}
    assert stored == others, sorted(stored ^ others)
    for n in others:
        assert tensors[n].dtype == DT[dtype], n
        assert torch.equal(tensors[n], want[n].to(DT[dtype])), n
    if info.tied_embeddings:
        assert "lm_head.weight" not in tensors and cfg["tie_word_embeddings"] is True
    return labels


def main_grid(res, name: str):
    gid = grid_needs(TARGETS[name]).grids[0]
    return lambda m: gid if m.startswith("model.layers.") else None


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(TARGETS))
def test_oracle_reproduces_canonical_weights(staged, tmp_path, family, name):
    info, results = staged[family]
    t, res = TARGETS[name], results[name]
    out = export_vllm(t, info, res, tmp_path / name)
    choose = main_grid(res, name)
    assert reference_choice(t, info, res)("model.layers.0.mlp.up_proj") == choose("model.layers.0.mlp.up_proj")
    labels = check_oracle(out, info, res, choose)
    kind = {"gptq": "gptq-int4", "awq": "awq-int4", "w8a8": "int-quantized-int8"}.get(name, "pack-quantized-int4")
    assert set(labels.values()) == {kind}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["architectures"] == info.config["architectures"]
    assert (out / "tokenizer.json").read_bytes() == (info.path / "tokenizer.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == info.config["eos_token_id"]


def test_configs_are_what_vllm_reads(staged, tmp_path):
    info, results = staged["llama"]
    cfgs = {n: json.loads((export_vllm(TARGETS[n], info, results[n], tmp_path / n) / "config.json").read_text())
            ["quantization_config"] for n in TARGETS}
    g = cfgs["gptq"]
    assert (g["quant_method"], g["bits"], g["group_size"], g["desc_act"], g["sym"], g["lm_head"]) == ("gptq", 4, 128, False, True, False)
    assert "dynamic" not in g  # no plan given
    a = cfgs["awq"]
    assert (a["quant_method"], a["version"], a["w_bit"], a["q_group_size"], a["zero_point"]) == ("awq", "gemm", 4, 64, True)
    assert a["modules_to_not_convert"] == []
    for n in ("ct-sym", "ct-asym", "w8a8"):
        c = cfgs[n]
        assert c["quant_method"] == "compressed-tensors" and c["ignore"] == ["lm_head"]
        grp = c["config_groups"]["group_0"]
        assert grp["targets"] == ["Linear"] and grp["weights"]["actorder"] is None and grp["weights"]["dynamic"] is False
    assert cfgs["ct-asym"]["config_groups"]["group_0"]["weights"]["symmetric"] is False
    w = cfgs["w8a8"]["config_groups"]["group_0"]
    assert cfgs["w8a8"]["format"] == w["format"] == "int-quantized"
    assert w["weights"]["strategy"] == "channel" and w["weights"]["num_bits"] == 8
    assert w["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "group_size": None, "block_structure": None, "dynamic": True, "actorder": None}


def test_w8a8_carries_the_smoothquant_norms(staged, tmp_path):
    """The SmoothQuant scales live in the norms (res.fp): the checkpoint must hold those, not the originals."""
    info, results = staged["llama"]
    res = results["w8a8"]
    out = export_vllm(TARGETS["w8a8"], info, res, tmp_path / "w")
    got = load_file(str(out / "model.safetensors"))["model.layers.0.input_layernorm.weight"]
    orig = original_state(info)["model.layers.0.input_layernorm.weight"]
    assert torch.equal(got, res.fp["model.layers.0.input_layernorm.weight"].to(torch.bfloat16))
    assert not torch.equal(got, orig.to(torch.bfloat16))


# ------------------------------------------------------------------ compressed-tensors' own decompression

def ct_library_verdicts(out: Path, res, choose) -> dict[str, str]:
    """Each quantized decoder linear decompressed by compressed-tensors' own per-format compressor (the
    registry's pack-quantized / int-quantized ``decompress``, the scheme built from the checkpoint's config
    group): {module: "equal" | "differs" | "refused: <error>"} against the canonical dequantized weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)  # the library's own schema accepts the config
    _, tensors = load_dir(out)
    groups = qc["config_groups"]
    verdicts: dict[str, str] = {}
    for mod in (m for m in res.quant if m.startswith("model.layers.")):
        gid = choose(mod)
        if gid is None:
            continue
        g = grid_from_id(gid)  # which config group holds this grid
        grp = next(v for v in groups.values() if v["weights"]["num_bits"] == g.bits
                   and v["weights"]["symmetric"] == g.symmetric and v["weights"]["group_size"] in (g.group_size, None))
        act = grp["input_activations"]
        scheme = QuantizationScheme(targets=grp["targets"], weights=QuantizationArgs.model_validate(grp["weights"]),
                                    input_activations=QuantizationArgs.model_validate(act) if act else None)
        sd = {k[len(mod) + 1:]: v for k, v in tensors.items() if k.startswith(mod + ".") and not k.endswith("bias")}
        sd["weight_scale"] = sd["weight_scale"].float()  # fp32 arithmetic, like the kernels
        try:
            w = BaseCompressor.load_from_registry(grp["format"]).decompress(sd, scheme)["weight"].float().numpy()
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            verdicts[mod] = f"refused: {type(e).__name__}: {str(e)[:100]}"
            continue
        want = res.quant[mod][gid].dequantize()
        verdicts[mod] = "equal" if w.shape == want.shape and np.array_equal(w, want) else "differs"
    return verdicts


def ct_library_model_verdicts(out: Path, res, choose) -> dict[str, str]:
    """The whole checkpoint through the library end to end, as transformers loads it with dequantize=True:
    CompressedTensorsHfQuantizer builds the model from config.json, applies the quantization config (config
    groups' targets and ``ignore`` resolved by the library, not by us), loads the compressed tensors, and
    ModelCompressor.decompress_model dequantizes every quantized module. Same verdicts as above per module;
    a load that fails, or that leaves any tensor missing/unexpected/mismatched (a silently re-initialized
    parameter), is "refused" for every module."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    mods = [m for m in res.quant if m.startswith("model.layers.") and choose(m) is not None]
    try:
        with warnings.catch_warnings():  # "the checkpoint's quantization_config is used": that is the point
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
            model, loading = AutoModelForCausalLM.from_pretrained(
                out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32,
                output_loading_info=True, local_files_only=True)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        return dict.fromkeys(mods, f"refused: {type(e).__name__}: {str(e)[:100]}")
    if any(loading.values()):
        return dict.fromkeys(mods, f"refused: loading info {loading}")
    sd = model.state_dict()
    assert not any(k.endswith("weight_packed") for k in sd), "not decompressed"
    assert all(sd[f"{m}.weight"].is_floating_point() for m in mods), "not decompressed"
    verdicts = {}
    for mod in mods:
        w, want = sd[f"{mod}.weight"].float().numpy(), res.quant[mod][choose(mod)].dequantize()
        verdicts[mod] = "equal" if w.shape == want.shape and np.array_equal(w, want) else "differs"
    return verdicts


def ct_library_check(out: Path, res, choose) -> int:
    """compressed-tensors' own decompression (per-format compressors and the whole-model path) gives the
    canonical weights exactly for every quantized module; returns how many modules were checked."""
    per_module = ct_library_verdicts(out, res, choose)
    whole = ct_library_model_verdicts(out, res, choose)
    assert per_module.keys() == whole.keys()
    bad = {m: (v, whole[m]) for m, v in per_module.items() if (v, whole[m]) != ("equal", "equal")}
    assert not bad, bad
    return len(per_module)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compressed_tensors_library_decompresses_to_canonical(staged, tmp_path, family):
    pytest.importorskip("compressed_tensors")
    info, results = staged[family]
    plan = {"grid": "int4_g128_sym_fp16", "high_grid": "int8_g128_sym_fp16", "protected": PLAN_PROTECT}
    gpu = Target(name="ct-gpu", format="compressed-tensors", runtime="vllm", quant="W4A16", group_size=128,
                 method="rtn", protect=1, hardware="gpu-cuda")
    cases = [(TARGETS[n], results[n], None) for n in ("ct-sym", "ct-asym", "w8a8")]
    cases.append((gpu, results["ct-sym"], plan))  # a second, 8-bit config group
    for t, res, p in cases:
        out = export_vllm(t, info, res, tmp_path / t.name, p)
        assert ct_library_check(out, res, reference_choice(t, info, res, p)) == 7 * info.n_layers


@pytest.mark.parametrize("quant, gs, sym", [("W4A16", 32, True), ("W4A16", -1, False), ("W4A16", -1, True),
                                            ("W8A16", 64, True), ("W8A16", -1, True)])
def test_compressed_tensors_schemes(tmp_path_factory, tmp_path, quant, gs, sym):
    info = load_model_info(make_tiny_model(tmp_path_factory.mktemp("ct") / "m", hidden=64, inter=128, layers=1))
    t = Target(name="c", format="compressed-tensors", runtime="vllm", quant=quant, group_size=gs, symmetric=sym)
    gid = grid_needs(t).grids[0]
    res = synthetic(info, (gid,))
    out = export_vllm(t, info, res, tmp_path / "o")
    labels = check_oracle(out, info, res, lambda m: gid)
    assert set(labels.values()) == {f"pack-quantized-int{grid_from_id(gid).bits}"}
    if importlib.util.find_spec("compressed_tensors"):
        assert ct_library_check(out, res, lambda m: gid) == 7


# ------------------------------------------------------------------ mixed precision and fused shards

def _plan(t: Target) -> dict:
    main = grid_needs(t).grids[0]
    return {"grid": main, "high_grid": higher_grid(main), "protected": list(PLAN_PROTECT)}


@pytest.mark.parametrize("name, hardware, label", [
    ("gptq", "cpu-avx2", "fp"), ("gptq", "gpu-cuda", "gptq-int8"), ("awq", "gpu-cuda", "fp"),
    ("ct-sym", "cpu", "fp"), ("ct-sym", "gpu-cuda", "pack-quantized-int8"), ("w8a8", "gpu-cuda", "fp"),
])
def test_plan_protects_whole_fused_groups(staged, tmp_path, name, hardware, label):
    info, results = staged["llama"]
    t = dataclasses.replace(TARGETS[name], hardware=hardware, protect=1)
    res = results[name]
    plan = _plan(t)
    mp = module_plan(t, res, plan)
    assert set(mp.protected) == PLAN_EXPANDED and mp.requested == tuple(PLAN_PROTECT)
    out = export_vllm(t, info, res, tmp_path / name, plan)
    choose = reference_choice(t, info, res, plan)
    labels = check_oracle(out, info, res, choose)
    assert {m for m, lab in labels.items() if lab == label} == PLAN_EXPANDED
    assert all(labels[m] != label for m in labels if m not in PLAN_EXPANDED)
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert set(record["protected"]) == PLAN_EXPANDED and record["requested"] == PLAN_PROTECT
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if name == "gptq":  # rules are written on vLLM's fused names
        sign = "-" if label == "fp" else "+"
        assert sorted(qc["dynamic"]) == sorted(f"{sign}:{r}" for r in (
            r"model\.layers\.0\.self_attn\.qkv_proj$", r"model\.layers\.1\.mlp\.gate_up_proj$",
            r"model\.layers\.1\.self_attn\.o_proj$"))


def test_real_plan_from_sensitivity_exports(staged, tmp_path):
    from quantprism.pipeline import target_plan

    info, results = staged["llama"]
    t = TARGETS["gptq"]
    plan = target_plan(t, results["gptq"])
    assert plan and len(plan["protected"]) == 1
    out = export_vllm(t, info, results["gptq"], tmp_path / "g", plan)
    labels = check_oracle(out, info, results["gptq"], reference_choice(t, info, results["gptq"], plan))
    fp = {m for m, lab in labels.items() if lab == "fp"}
    assert plan["protected"][0] in fp and len(fp) in (1, 2, 3)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """12 layers (layers.1 vs layers.10/11), RTN codes straight from the weights: no calibration needed."""
    info = load_model_info(make_tiny_model(tmp_path_factory.mktemp("deep") / "m", hidden=64, inter=128, layers=12))
    return info, synthetic(info, ("int4_g64_sym_fp16", "int4_g64_asym_fp16", "int8_g64_sym_fp16"))


def synthetic(info, grids: tuple[str, ...]) -> CanonicalModel:
    state = original_state(info)
    res = CanonicalModel(Recipe(grids=grids, method="rtn"))
    for name, w in state.items():
        mod = name.removesuffix(".weight")
        if mod.startswith("model.layers.") and name.endswith("_proj.weight"):
            res.quant[mod] = {g: grid_from_id(g).rtn(w.float(), None, clip=False) for g in grids}
    return res


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct-sym"])
def test_layer_1_rules_do_not_catch_layers_10_and_11(deep, tmp_path, fmt):
    info, res = deep
    t = {"gptq": Target(name="g", format="gptq", runtime="vllm", group_size=64),
         "awq": Target(name="a", format="awq", runtime="vllm", group_size=64, symmetric=False),
         "ct-sym": Target(name="c", format="compressed-tensors", runtime="vllm", quant="W4A16", group_size=64)}[fmt]
    plan = {"grid": "x", "high_grid": "int8_g64_sym_fp16", "protected": ["model.layers.1.mlp.down_proj"]}
    out = export_vllm(t, info, res, tmp_path / fmt, plan)
    labels = check_oracle(out, info, res, reference_choice(t, info, res, plan))
    assert [m for m, lab in labels.items() if lab == "fp"] == ["model.layers.1.mlp.down_proj"]


# ------------------------------------------------------------------ group sizes, 8-bit, dtype, sharding, determinism

@pytest.mark.parametrize("bits, gs", [(4, 32), (4, 64), (4, -1), (8, 64), (8, -1)])
def test_gptq_group_sizes_and_bits(tmp_path_factory, tmp_path, bits, gs):
    info = load_model_info(make_tiny_model(tmp_path_factory.mktemp("g") / "m", hidden=64, inter=128, layers=1))
    t = Target(name="g", format="gptq", runtime="vllm", bits=bits, group_size=gs)
    gid = f"int{bits}_g{'c' if gs == -1 else gs}_sym_fp16"
    res = synthetic(info, (gid,))
    out = export_vllm(t, info, res, tmp_path / "o")
    labels = check_oracle(out, info, res, lambda m: gid)
    assert set(labels.values()) == {f"gptq-int{bits}"}
    qz = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.qzeros"]
    assert np.all(qz.numpy().view(np.uint32) == (0x77777777 if bits == 4 else 0x7F7F7F7F))  # GPTQ v1 zero − 1


def test_float16_checkpoint_and_overflow_refusal(deep, tmp_path):
    info, res = deep
    t = Target(name="c", format="compressed-tensors", runtime="vllm", quant="W4A16", group_size=64, symmetric=False)
    res_asym = CanonicalModel(res.recipe, {}, {m: {"int4_g64_asym_fp16": g["int4_g64_asym_fp16"]} for m, g in res.quant.items()})
    out = export_vllm(t, info, res_asym, tmp_path / "f16", dtype="float16")
    check_oracle(out, info, res_asym, lambda m: "int4_g64_asym_fp16", dtype="float16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    big = CanonicalModel(res.recipe, {"model.norm.weight": torch.full((64,), 1e6)}, res_asym.quant)
    with pytest.raises(ArtifactError, match="float16 range"):
        export_vllm(t, info, big, tmp_path / "big", dtype="float16")
    assert not (tmp_path / "big").exists()


def test_sharded_checkpoint_passes_the_oracle(staged, tmp_path):
    info, results = staged["qwen2"]
    res = results["awq"]
    out = export_vllm(TARGETS["awq"], info, res, tmp_path / "s", shard_bytes=100_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(str(out / s)).values())
    check_oracle(out, info, res, main_grid(res, "awq"))


def test_export_is_deterministic_and_atomic(staged, tmp_path, monkeypatch):
    info, results = staged["llama"]
    t, res = TARGETS["ct-asym"], results["ct-asym"]
    a = export_vllm(t, info, res, tmp_path / "a", shard_bytes=200_000)
    b = export_vllm(t, info, res, tmp_path / "b", shard_bytes=200_000)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) > 5
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # re-exporting over an existing directory replaces it; a failure leaves the old one and no temp dirs
    export_vllm(t, info, res, a, shard_bytes=200_000)
    assert sorted(p.name for p in a.iterdir()) == files

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ct, "pack_zero_point", boom)
    with pytest.raises(RuntimeError):
        export_vllm(t, info, res, tmp_path / "c")
    with pytest.raises(RuntimeError):
        export_vllm(t, info, res, a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()


# ------------------------------------------------------------------ mutations: the oracle must catch each one

def _reversed_nibbles(codes, bits):
    return pack_int32(codes.T, bits, axis=0, order=list(range(32 // bits))[::-1])


# Each mutant breaks one packer the way a plausible bug would. GPTQ and AWQ mutants are checked by the spec
# oracle only: the compressed-tensors library decodes compressed-tensors checkpoints, not GPTQ/AWQ ones (their
# decoders are vLLM's gptq/awq kernels, exercised in tests/runtimes/test_vllm.py). The compressed-tensors
# mutants ("ct-*", "w8a8-*") must also be caught by the library's own decompression.
MUTATIONS = {
    "gptq-nibble-order": ("gptq", gptq, "pack_qweight", _reversed_nibbles),
    "gptq-packed-along-N": ("gptq", gptq, "pack_qweight", lambda codes, bits: pack_int32(codes, bits, axis=0)),
    "awq-standard-order": ("awq", awq, "AWQ_ORDER", tuple(range(8))),
    "ct-no-offset": ("ct-sym", ct, "pack_weight",
                     lambda codes, bits: pack_int32((codes.astype(np.int64) - 8) & 0xF, bits, axis=1)),
    "ct-transposed": ("ct-sym", ct, "pack_weight",
                      lambda codes, bits: pack_int32(codes.T, bits, axis=1)),
    "ct-nibble-order": ("ct-sym", ct, "pack_weight",
                        lambda codes, bits: pack_int32(codes, bits, axis=1, order=list(range(32 // bits))[::-1])),
    "ct-zp-no-offset": ("ct-asym", ct, "pack_zero_point",
                        lambda z, bits: pack_int32((z.astype(np.int64) - 8) & 0xF, bits, axis=0)),
    "w8a8-unsigned": ("w8a8", ct, "int8_weight", lambda codes: codes.view(np.int8)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_oracle_catches_a_broken_packer(staged, tmp_path, monkeypatch, mutation):
    name, module, attr, wrong = MUTATIONS[mutation]
    info, results = staged["llama"]
    res = results[name]
    monkeypatch.setattr(module, attr, wrong)
    out = export_vllm(TARGETS[name], info, res, tmp_path / "m")
    with pytest.raises((AssertionError, ValueError)):
        check_oracle(out, info, res, main_grid(res, name))


CT_MUTATIONS = [m for m, (name, *_) in MUTATIONS.items() if TARGETS[name].format == "compressed-tensors"]


@pytest.mark.parametrize("mutation", CT_MUTATIONS)
def test_compressed_tensors_library_catches_a_broken_packer(staged, tmp_path, monkeypatch, mutation):
    """The library's own decoders, not only our oracle, see each compressed-tensors mutant: no quantized module
    of the mutated checkpoint decompresses to the canonical weights, per-format compressor or whole model
    (where the same export without the mutation decompresses exactly: test_compressed_tensors_library_…)."""
    pytest.importorskip("compressed_tensors")
    name, module, attr, wrong = MUTATIONS[mutation]
    info, results = staged["llama"]
    res, choose = results[name], main_grid(results[name], name)
    monkeypatch.setattr(module, attr, wrong)
    out = export_vllm(TARGETS[name], info, res, tmp_path / "m")
    per_module = ct_library_verdicts(out, res, choose)
    whole = ct_library_model_verdicts(out, res, choose)
    assert len(per_module) == len(whole) == 7 * info.n_layers
    for verdicts in (per_module, whole):
        assert not [m for m, v in verdicts.items() if v == "equal"], verdicts
    if mutation != "ct-transposed":  # same shapes, wrong bits: the library decodes them, to other weights
        assert set(per_module.values()) == set(whole.values()) == {"differs"}, (per_module, whole)
    else:  # a transposed [K, N/f] block only fits the square modules; the others are refused
        assert "differs" in per_module.values() and any(v.startswith("refused") for v in per_module.values())


def test_refuses_a_canonical_result_without_the_grid(staged, tmp_path):
    info, results = staged["llama"]
    with pytest.raises(ArtifactError, match="re-run quantize"):
        export_vllm(TARGETS["awq"], info, results["w8a8"], tmp_path / "x")  # only int8 codes in that result
    bad = dataclasses.replace(TARGETS["gptq"], group_size=32)
    with pytest.raises(ArtifactError, match="int4_g32_sym_fp16"):
        export_vllm(bad, info, results["gptq"], tmp_path / "y")
    assert not any(tmp_path.iterdir())
