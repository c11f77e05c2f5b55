"""The machine and the hardware label: detection, the W8A8 grid rule, and both int8 arithmetics emulated in numpy,
so the saturation rule is tested on every machine (the real-vLLM check in tests/runtimes/test_vllm.py takes the
branch of the machine it runs on)."""
from __future__ import annotations

import numpy as np
import pytest

from quantprism.config import Target
from quantprism.exporters.grids import grid_needs, int8_reduced
from quantprism.hardware import Machine, detect, int8_pairs_saturate, u8s8_dot_avx2, u8s8_dot_vnni


def test_detect_agrees_with_proc_cpuinfo():
    flags = set()
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    m = detect()
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    assert m.int8_pairs_saturate == (not vnni)
    assert m.kind == ("cpu-avx512-vnni" if "avx512_vnni" in flags else "cpu-avx-vnni" if vnni
                      else "cpu-avx2" if "avx2" in flags else "cpu")
    assert set(m.isa) <= flags and m.cores >= 1
    print(f"this machine: {m.kind}, {m.cpu}, int8 pair sums saturate: {m.int8_pairs_saturate}")


@pytest.mark.parametrize("label, reduced", [("cpu-avx2", True), ("cpu", True), ("CPU-AVX2-epyc", True),
                                            ("cpu-avx512-vnni", False), ("cpu-avx-vnni", False), ("cpu-amx", False),
                                            ("gpu-cuda", False)])
def test_w8a8_grid_follows_the_label(label, reduced):
    assert int8_pairs_saturate(label) == reduced
    for fmt, quant in (("compressed-tensors", "W8A8"), ("onnx", "w8a8")):
        t = Target(name="t", format=fmt, runtime="vllm" if fmt != "onnx" else "onnxruntime", quant=quant,
                   group_size=-1, method="smoothquant+rtn", hardware=label)
        assert int8_reduced(t) == reduced
        assert grid_needs(t).grids[0].endswith("_r_fp16" if fmt != "onnx" else "_r_fp32") == reduced


def test_machine_matches_labels():
    avx2 = Machine("AMD EPYC", ("avx", "avx2", "fma"), 2, "cpu-avx2", True)
    vnni = Machine("Intel Xeon", ("avx2", "avx512f", "avx512_vnni"), 2, "cpu-avx512-vnni", False)
    assert avx2.matches("cpu-avx2") and avx2.matches("cpu") and not avx2.matches("cpu-avx512-vnni")
    assert vnni.matches("cpu-avx2") and vnni.matches("cpu-avx512-vnni")  # ±63 is exact on both
    assert not avx2.matches("gpu-cuda") and not vnni.matches("gpu-cuda")
    assert vnni.matches("cpu-x86-avx512-vnni") and not avx2.matches("cpu-x86-avx512-vnni")
    assert avx2.missing("cpu-x86-avx512-vnni") == ["avx512f", "avx512_vnni"]
    h100 = Machine("Xeon", ("avx2",), 16, "cpu-avx2", True, "x86_64", frozenset({"avx2", "cuda", "sm80", "sm90"}))
    a100 = Machine("EPYC", ("avx2",), 16, "cpu-avx2", True, "x86_64", frozenset({"avx2", "cuda", "sm80"}))
    assert h100.matches("gpu-sm90") and h100.matches("gpu-sm80") and h100.label == "gpu-sm90"
    assert a100.matches("gpu-sm80") and a100.missing("gpu-sm90") == ["sm90"] and a100.label == "gpu-sm80"
    arm = Machine("Neoverse", (), 4, "cpu", True, "aarch64", frozenset({"asimd", "fp"}))
    assert arm.label == "cpu-arm64" and arm.missing("cpu-x86-avx2")[0] == "arch x86_64"


def test_hardware_tables_define_labels_and_drive_the_int8_grid(tmp_path):
    """A [hardware.LABEL] table names what the label promises; the exporters' int8 rule reads those features, not
    the label's spelling: a VNNI label with a neutral name gets the full grid."""
    from quantprism.config import parse_targets

    p = tmp_path / "t.toml"
    p.write_text("""
[hardware.fleet-a]
features = ["avx2", "avx512_vnni"]
runner = "self-hosted"
extras = ["onnx"]
[target.a]
format = "onnx"
runtime = "onnxruntime"
quant = "w8a8"
group_size = -1
method = "smoothquant+rtn"
hardware = "fleet-a"
[target.b]
format = "onnx"
runtime = "onnxruntime"
quant = "w8a8"
group_size = -1
method = "smoothquant+rtn"
hardware = "cpu-x86-avx2"
""")
    tf = parse_targets(p)
    a, b = tf.targets["a"], tf.targets["b"]
    assert a.hardware_spec.runner == ("self-hosted",) and a.hardware_spec.extras == ("onnx",)
    assert not int8_reduced(a) and int8_reduced(b)
    assert grid_needs(a).grids[0].endswith("_fp32") and grid_needs(b).grids[0].endswith("_r_fp32")
    p.write_text(p.read_text().replace('extras = ["onnx"]', 'extras = ["onnx"]\nfeatrues = ["x"]'))
    with pytest.raises(Exception, match="featrues.*did you mean 'features'"):
        parse_targets(p)


def test_avx2_pair_saturation_emulated():
    """vpmaddubsw: 255·127 + 255·127 = 64,770 clips to 32,767; with |w| ≤ 63 the worst pair is 32,130: exact."""
    a = np.full((1, 4), 255)
    assert u8s8_dot_avx2(a, np.full((1, 4), 127))[0, 0] == 2 * 32767
    assert u8s8_dot_vnni(a, np.full((1, 4), 127))[0, 0] == 4 * 255 * 127
    assert u8s8_dot_avx2(a, np.full((1, 4), 63))[0, 0] == 4 * 255 * 63
    assert u8s8_dot_avx2(a, np.full((1, 4), -128))[0, 0] == -2 * 32768
    odd = np.arange(7)[None] * 30
    w = np.arange(7)[None] - 3
    assert u8s8_dot_avx2(odd, w)[0, 0] == u8s8_dot_vnni(odd, w)[0, 0]  # odd K: the padded lane adds nothing


def test_bundled_w8a8_codes_saturate_on_avx2_only_with_the_full_grid(tmp_path):
    """The real codes of the bundled model's layer-0 qkv (SmoothQuant + RTN) with per-token int8 activations:
    the full ±127 grid saturates under AVX2 arithmetic, the ±63 grid of cpu-avx2 targets never does."""
    import torch

    from quantprism.model import load_model_info
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(None)
    x = torch.randn(64, info.config["hidden_size"], generator=torch.Generator().manual_seed(0)) * 3
    xs = x.abs().amax(-1, keepdim=True).numpy() / 127
    a_u8 = np.clip(np.rint(x.numpy() / xs), -128, 127).astype(np.int64) + 128
    mods = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    for hardware, saturates in (("cpu-avx512-vnni", True), ("cpu-avx2", False)):
        t = Target(name="w8", format="compressed-tensors", runtime="vllm", quant="W8A8", group_size=-1,
                   method="smoothquant+rtn", hardware=hardware)
        res = run_stage(info, plan_recipes([t])[0], "builtin", 4, 128, 0, cache_dir=tmp_path / "c").results[0]
        gid = res.recipe.grids[0]
        codes = np.concatenate([res.quant[m][gid].codes.astype(np.int64) - 128 for m in mods])
        diff = np.abs(u8s8_dot_avx2(a_u8, codes) - u8s8_dot_vnni(a_u8, codes))
        frac = float((diff > 0).mean())
        print(f"{hardware} grid ({gid}): {frac:.1%} of outputs differ under AVX2 arithmetic")
        assert (frac > 0.01) if saturates else (frac == 0.0)
