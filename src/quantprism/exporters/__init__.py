"""Exporters: pure packers of canonical codes into each runtime's native format."""
from __future__ import annotations

from collections.abc import Callable

from ..config import Target
from ..model import ModelInfo


def reference_choice(target: Target, info: ModelInfo, canonical, plan: dict | None = None) -> Callable[[str], str | None]:
    """The grid each module of ``target``'s artifact carries (None = fp): with ``state.canonical_weights`` this is
    the model the runtime must reproduce, built without the exporter's packers."""
    if canonical is None:
        return lambda _mod: None
    if target.format == "gguf":
        from .gguf import reference_choice as gguf_choice

        return gguf_choice(target.quant or "F16", int(info.config["num_hidden_layers"]), info.tied_embeddings,
                           target.imatrix, plan)
    if target.format == "onnx":
        from .onnx import module_choice

        return module_choice(target, canonical, plan)
    from .vllm import reference_choice as vllm_choice

    return vllm_choice(target, canonical, plan)
