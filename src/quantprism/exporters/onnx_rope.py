"""RoPE variants made exportable: transformers' longrope (Phi-3) chooses its long or short frequencies with a
Python ``if`` on the positions' maximum — a data-dependent branch that torch.export cannot trace. During export
the rotary module computes both and selects with ``torch.where`` on the same condition (max position + 1 above
the original context), which is transformers' rule evaluated inside the graph, per call.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch


def _longrope_forward(self, x, position_ids):
    seq_len = position_ids.max() + 1
    inv_freq = torch.where(seq_len > self._qp_original_ctx, self._qp_long_inv_freq, self._qp_short_inv_freq)
    freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


@contextlib.contextmanager
def exportable_rope(model: torch.nn.Module) -> Iterator[None]:
    """Swap every longrope rotary module's forward for the branch-free one while the block runs."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    swapped = []
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding") and getattr(mod, "rope_type", None) == "longrope":
            cfg = mod.config
            orig = int(cfg.rope_parameters["original_max_position_embeddings"])
            long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, mod.original_inv_freq.device, seq_len=orig + 1)
            mod._qp_original_ctx = orig
            mod._qp_long_inv_freq = long_inv
            mod._qp_short_inv_freq = mod.original_inv_freq
            swapped.append((mod, mod.forward))
            mod.forward = types.MethodType(_longrope_forward, mod)
    try:
        yield
    finally:
        for mod, fwd in swapped:
            mod.forward = fwd
            for k in ("_qp_original_ctx", "_qp_long_inv_freq", "_qp_short_inv_freq"):
                delattr(mod, k)
