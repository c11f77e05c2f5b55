"""RoPE scaling as llama.cpp reads it from a GGUF (what convert_hf_to_gguf.py writes for each HF ``rope_type``).

- ``linear``: rope.scaling.type linear + factor.
- ``yarn``: type yarn, factor, original context, and the YaRN knobs the config sets.
- ``llama3`` (Llama 3.1–3.3): no keys; a ``rope_freqs.weight`` tensor of per-frequency divisors, computed from the
  config exactly as llama.cpp's converter does (float32 on the same formula).
- ``longrope`` (Phi-3): type longrope, the original context, the attention factor √(1 + ln s / ln L₀) and the
  ``rope_factors_long`` / ``rope_factors_short`` tensors; llama.cpp picks long or short once per context (n_ctx
  above the original context → long), HF per sequence length — they agree when a sequence fills the context.
- ``dynamic`` (dynamic NTK) is refused: llama.cpp has no dynamic scaling for these architectures, so a file would
  silently run unscaled past the original context.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ArtifactError


def rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 ``rope_parameters``, or the older ``rope_scaling`` + ``rope_theta``, as one dict."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    return rope


def rotary_dims(cfg: dict[str, Any], head_dim: int) -> int:
    """Rotated dimensions per head (``partial_rotary_factor``, e.g. Phi-4-mini's 0.75)."""
    pct = rope_params(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return int(pct * head_dim)


def llama3_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling (llama.cpp's rope_freqs tensor)."""
    import torch

    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def write_rope(w, cfg: dict[str, Any], head_dim: int,
               add_tensor: Callable[[str, np.ndarray], None] | None = None) -> None:
    """RoPE base and scaling keys (and llama3's / longrope's factor tensors) on a GGUFWriter; ``head_dim``: the
    rotated dimensions per head. ``add_tensor``: how a factor tensor joins the file (default ``w.add_tensor``; the
    streamed writer registers it in its own tensor list)."""
    import gguf

    add_tensor = add_tensor or w.add_tensor
    rope = rope_params(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    elif kind == "llama3":
        add_tensor("rope_freqs.weight", llama3_factors(rope, head_dim))
    elif kind in ("longrope", "su"):
        orig = int(rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"])
        scale = int(cfg["max_position_embeddings"]) / orig
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long or not short or len(long) != len(short) or len(long) != head_dim // 2:
            raise ArtifactError(f"longrope needs long_factor and short_factor of {head_dim // 2} values each")
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
        add_tensor("rope_factors_long.weight", np.asarray(long, dtype=np.float32))
        add_tensor("rope_factors_short.weight", np.asarray(short, dtype=np.float32))
    elif kind not in ("default", "none"):
        raise ArtifactError(f"rope_type {kind!r} has no GGUF form llama.cpp runs for this architecture "
                            "(supported: default, linear, yarn, llama3, longrope)")
