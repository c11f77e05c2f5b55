"""A Hugging Face model directory that vLLM 0.32 loads: config.json, tokenizer, generation config, safetensors.

Shared by the GPTQ, AWQ and compressed-tensors exporters, which only supply the packed tensors and
the ``quantization_config``. Unquantized tensors come from ``state.canonical_fp_state`` (the
transformed weights: AWQ/SmoothQuant scales folded into norms), cast to the checkpoint dtype. Output is deterministic (same inputs → byte-identical files: sorted keys,
fixed metadata) and the directory appears atomically (built beside the destination, then renamed).
Tensors are streamed: ``tensors`` may be a lazy Mapping or an iterable of (name, tensor) pairs, and the safetensors
are written one tensor at a time (exporters/safetensors_stream.py), so the export never holds the checkpoint.

Checkpoint dtype: bfloat16 by default. Quantized layers keep their scales in fp16 on disk (exact),
but vLLM casts scales to the run's dtype: a bf16 run rounds them (reference pitfall 10), so a
bit-exact comparison with the canonical weights needs ``dtype="float16"`` (or ``--dtype float16``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..errors import ArtifactError
from ..model import ModelInfo
from .safetensors_stream import DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, write_stream  # noqa: F401 (re-exported)

Tensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
FP16_MAX = 65504.0


def cast_fp(name: str, t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` in the checkpoint dtype; fp16 must not overflow (an inf weight would load silently)."""
    if dtype not in DTYPES:
        raise ArtifactError(f"checkpoint dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")
    if dtype == "float16" and t.is_floating_point() and t.numel() and float(t.float().abs().max()) > FP16_MAX:
        raise ArtifactError(f"{name} has values beyond the float16 range; export with dtype=\"bfloat16\"")
    return t.detach().to(DTYPES[dtype]).contiguous()


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp directory beside ``dest``; it replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ArtifactError(f"{dest} exists and is not a directory; choose another output path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the artifact is an ordinary directory
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old)  # POSIX rename onto an empty directory
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_safetensors(root: Path, tensors: Tensors, shard_bytes: int = DEFAULT_SHARD_BYTES,
                      description: str | None = None, total_bytes: int | None = None) -> list[str]:
    """One ``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``; returns the shard files.

    ``tensors``: a Mapping (written in sorted-name order, each value read when written) or an iterable of
    (name, tensor) pairs (written in its order). Shards are filled greedily in that order; a tensor larger than
    ``shard_bytes`` gets a shard of its own. Progress (bytes written) is reported as ``description``."""
    with progress.task(description or f"write {Path(root).name}", total=total_bytes, unit="B") as task:
        return write_stream(Path(root), tensors, shard_bytes, {"format": "pt"},
                            on_tensor=lambda name, n: task.advance(n))


def model_config(info: ModelInfo, quantization_config: dict, dtype: str) -> dict:
    cfg = copy.deepcopy(info.config)
    cfg["quantization_config"] = quantization_config
    cfg["dtype"] = dtype  # transformers ≥ 5 reads "dtype", older readers "torch_dtype"
    cfg["torch_dtype"] = dtype
    return cfg


def generation_config(info: ModelInfo) -> dict:
    src = info.path / "generation_config.json"
    if src.is_file():
        return json.loads(src.read_text(encoding="utf-8"))
    return {k: info.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if info.config.get(k) is not None}


def write_hf_checkpoint(out_dir: Path, info: ModelInfo, tensors: Tensors, quantization_config: dict,
                        dtype: str = "bfloat16", shard_bytes: int = DEFAULT_SHARD_BYTES,
                        extra_json: dict[str, Any] | None = None, total_bytes: int | None = None) -> Path:
    """Write the directory ``out_dir`` atomically; ``tensors`` are final (packed and cast): a Mapping or an iterable
    of (name, tensor) pairs, consumed one tensor at a time (see write_safetensors). ``total_bytes``, when the caller
    knows it, gives the progress report its total."""
    if dtype not in DTYPES:
        raise ArtifactError(f"checkpoint dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp, tensors, shard_bytes, description=f"export {out_dir.name}", total_bytes=total_bytes)
        _json(tmp / "config.json", model_config(info, quantization_config, dtype))
        _json(tmp / "generation_config.json", generation_config(info))
        for f in TOKENIZER_FILES:
            if (info.path / f).is_file():
                shutil.copyfile(info.path / f, tmp / f)
        for name, obj in (extra_json or {}).items():
            _json(tmp / name, obj)
    return out_dir
