"""vLLM checkpoints (GPTQ, AWQ, compressed-tensors): canonical codes re-laid into an HF directory.

``export_vllm`` is the one entry point. It maps the mixed-precision plan onto the checkpoint
(exporters/vllm_plan.py), packs each decoder linear with the format's packer, writes every other
tensor (embeddings, norms, lm_head, biases, fp-kept linears) from the canonical fp tensors, and
records the per-module choice in ``quantprism_export.json``. ``reference_choice`` gives the same
choice as a ``canonical_overrides`` chooser: the weights any loader of the checkpoint must see.
Tied models: vLLM ties lm_head to embed_tokens and skips any lm_head.* tensor, so the checkpoint
holds embed_tokens only, as the original does.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from ..config import Target, check_target_against_model
from ..errors import ArtifactError, ConfigError
from ..model import ModelInfo
from . import awq, compressed_tensors, gptq
from .hf_checkpoint import DEFAULT_SHARD_BYTES, cast_fp, write_hf_checkpoint
from .state import canonical_fp_state
from .vllm_plan import ModulePlan, module_plan

FORMATS: dict[str, ModuleType] = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors}
EXPORT_RECORD = "quantprism_export.json"


def checkpoint_tensors(fmt: ModuleType, info: ModelInfo, canonical, mp: ModulePlan, dtype: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in canonical_fp_state(info, canonical).items():
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and mp.grids.get(mod) is not None:
            continue  # replaced by the packed tensors below
        tensors[name] = cast_fp(name, t, dtype)
    for mod, gid in mp.grids.items():
        if gid is None:
            continue
        for suffix, arr in fmt.pack_module(canonical.quant[mod][gid], mod).items():
            tensors[f"{mod}.{suffix}"] = torch.from_numpy(arr)
    return tensors


def export_vllm(target: Target, info: ModelInfo, canonical, out_dir: Path, plan: dict | None = None, *,
                dtype: str = "bfloat16", shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``out_dir`` (an HF directory vLLM 0.32 loads) for ``target`` from a CanonicalModel."""
    fmt = FORMATS.get(target.format)
    if fmt is None:
        raise ArtifactError(f"target {target.name}: format {target.format!r} is not a vLLM format; use gptq, awq or compressed-tensors")
    why = check_target_against_model(target, info.linear_shapes)
    if why:
        raise ConfigError(f"target {target.name}: {why}")
    mp = module_plan(target, canonical, plan)
    tensors = checkpoint_tensors(fmt, info, canonical, mp, dtype)
    record = {"format": target.format, "scheme": target.scheme, "dtype": dtype, "recipe": canonical.recipe.key(), **mp.record()}
    return write_hf_checkpoint(out_dir, info, tensors, fmt.quantization_config(target, mp), dtype, shard_bytes,
                               extra_json={EXPORT_RECORD: record})


def reference_choice(target: Target, canonical, plan: dict | None = None) -> Callable[[str], str | None]:
    """The exported grid per module (None = fp), as a chooser for evaluate.canonical.canonical_overrides."""
    grids = module_plan(target, canonical, plan).grids
    return grids.get
