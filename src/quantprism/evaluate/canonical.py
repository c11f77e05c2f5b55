"""Evaluate canonical results: build the dequantized torch model of one grid and compare it with the original."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..model import ModelInfo, load_tokenizer, load_torch_model
from .compare import base_logprobs, compare, eval_token_chunks, torch_logits_fn
from .kld import BaseLogprobs


class Evaluator:
    """Holds the original model, the evaluation chunks and the base log-probs (computed once)."""

    def __init__(self, info: ModelInfo, eval_text: Path, n_ctx: int = 512, max_chunks: int | None = None):
        self.info = info
        self.model = load_torch_model(info)
        self.original = {k: v.clone() for k, v in self.model.state_dict().items()}
        tok = load_tokenizer(info)
        self.chunks = eval_token_chunks(tok, eval_text, n_ctx, max_chunks)
        self.base: BaseLogprobs = base_logprobs(self.chunks, torch_logits_fn(self.model))

    def state_with(self, overrides: dict[str, torch.Tensor]) -> None:
        sd = dict(self.original)
        for k, v in overrides.items():
            if k in sd:
                sd[k] = v.to(sd[k].dtype).reshape(sd[k].shape)
        self.model.load_state_dict(sd, strict=True)

    def evaluate(self, overrides: dict[str, torch.Tensor]) -> dict:
        self.state_with(overrides)
        try:
            summary, _ = compare(self.chunks, self.base, torch_logits_fn(self.model))
        finally:
            self.model.load_state_dict(self.original, strict=True)
        return summary


def canonical_overrides(res, choose: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Transformed fp tensors plus each module's chosen grid dequantized (tied head ↔ embeddings kept)."""
    out = dict(res.fp)
    for mod, grids in res.quant.items():
        gid = choose(mod)
        if gid is not None and gid in grids:
            out[f"{mod}.weight"] = torch.from_numpy(np.ascontiguousarray(grids[gid].dequantize()))
    return out


def decoder_only(grid: str) -> Callable[[str], str | None]:
    """Choose ``grid`` for decoder linears only (lm_head and embeddings stay fp)."""

    def choose(mod: str) -> str | None:
        return grid if mod.startswith("model.layers.") else None

    return choose
