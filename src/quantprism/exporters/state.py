"""The canonical model's tensors, the one source every exporter and every reference reads.

A transform (AWQ, SmoothQuant) changes fp tensors as well as codes: its scales are folded into the
RMSNorm gains (and v→o, up→down). An exporter that took norms, biases or embeddings from the
original checkpoint while packing the transformed codes would write a model that is neither the
original nor the canonical one (a GGUF built with AWQ that way scored KLD 0.096 vs 0.0021 for RTN).
So exporters never read the original state dict: they call ``canonical_fp_state``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..model import ModelInfo

Chooser = Callable[[str], "str | None"]  # module name → grid id it is exported with (None = kept fp)


def canonical_fp_state(info: ModelInfo, canonical) -> dict[str, torch.Tensor]:
    """The original tensors as stored (dtype kept), with the canonical (transformed) fp tensors on top.

    ``canonical`` None (an unquantized export such as GGUF F16) gives the original tensors.
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted({t.file for t in info.tensors.values()}):
        state.update(load_file(str(info.path / f)))
    for name, t in (canonical.fp.items() if canonical is not None else ()):
        if name in state:
            state[name] = t
    return state


def canonical_weights(info: ModelInfo, canonical, choose: Chooser) -> dict[str, torch.Tensor]:
    """The weights a runtime loading the artifact must compute with: the canonical fp state, and each module's
    chosen grid dequantized, exactly, in fp32 (no packer involved). A tied lm_head's grid is the embedding's too."""
    state = canonical_fp_state(info, canonical)
    for mod, grids in (canonical.quant.items() if canonical is not None else ()):
        gid = choose(mod)
        if gid is None:
            continue
        w = torch.from_numpy(np.ascontiguousarray(grids[gid].dequantize()))
        keys = [f"{mod}.weight"]
        if info.tied_embeddings and mod in ("lm_head", "model.embed_tokens"):
            keys = [k for k in ("model.embed_tokens.weight", "lm_head.weight") if k in state] or keys
        for key in keys:
            ref = state.get(key)
            state[key] = w.reshape(ref.shape) if ref is not None else w  # fp32: the stored dtype would round it
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place, in the model's dtypes (keys the model lacks are ignored)."""
    sd = model.state_dict()
    for k, v in state.items():
        if k in sd:
            sd[k] = v.to(sd[k].dtype).reshape(sd[k].shape)
    model.load_state_dict(sd, strict=True)
