"""One canonical pass for every ONNX test module: the three ONNX schemes on the bundled model (16 × 256
calibration tokens), cached under the session's base temp dir so the second module reads it back."""
from __future__ import annotations

from quantprism.config import Target
from quantprism.model import load_model_info


def onnx_targets() -> list[Target]:
    mk = dict(format="onnx", runtime="onnxruntime")
    return [Target(name="nbits8", quant="nbits8", group_size=32, method="gptq", **mk),
            Target(name="nbits4", quant="nbits4", group_size=32, method="gptq", **mk),
            Target(name="w8a8", quant="w8a8", group_size=-1, method="smoothquant+gptq", **mk)]


def bundled_canonical(tmp_path_factory):
    """(ModelInfo, {target name: (Target, CanonicalModel)})."""
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(None)
    targets = onnx_targets()
    recipes, index = plan_recipes(targets)
    run = run_stage(info, recipes, "builtin", 16, 256, 0, cache_dir=tmp_path_factory.getbasetemp() / "onnx-canonical")
    return info, {t.name: (t, run.results[index[t.name]]) for t in targets}
