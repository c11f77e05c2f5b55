"""Exporters: pure packers of canonical codes into each runtime's native format.

``FORMATS``: name → Format (exporters/base.py), one module per format, imported on first use. A new format is
one module defining ``FORMAT`` and one line here (`validate` takes the first format that recognises an artifact:
a more specific format stands before the one it refines).
"""
from __future__ import annotations

from collections.abc import Callable

from ..config import Target
from ..model import ModelInfo
from .base import ExportSpec, Format, Registry

FORMATS: Registry = Registry("FORMAT", {
    "gguf": "quantprism.exporters.gguf",
    "gptq": "quantprism.exporters.gptq",
    "awq": "quantprism.exporters.awq",
    "compressed-tensors": "quantprism.exporters.compressed_tensors",
    "onnx-genai": "quantprism.exporters.onnx_genai",
    "onnx": "quantprism.exporters.onnx",
})

__all__ = ["FORMATS", "ExportSpec", "Format", "reference_choice"]


def reference_choice(target: Target, info: ModelInfo, canonical, plan: dict | None = None) -> Callable[[str], str | None]:
    """The grid id each module of ``target``'s artifact carries (None = fp): with ``state.canonical_weights`` this
    is the model the runtime must reproduce, built without the exporter's packers."""
    if canonical is None:
        return lambda _mod: None
    return FORMATS[target.format].spec(target, info, canonical, plan).grid_id
