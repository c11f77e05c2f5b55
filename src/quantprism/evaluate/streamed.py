"""Teacher-forced logits computed one decoder layer at a time (the original model's log-probs, the canonical
references), so evaluation is bounded by one layer like the canonical pass.

Every chunk goes through layer i before layer i+1 is read: the activations of all chunks are kept between layers (in
float32, spilling to disk beyond the budget). The per-layer forward is transformers' own, batch 1 per chunk, so the
logits equal the whole fp32 model's.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .. import progress as pbar
from ..model import ModelInfo
from .compare import LogitsFn


def streamed_logits(info: ModelInfo, state: Mapping[str, torch.Tensor], chunks: np.ndarray, device: str | None = "cpu",
                    budget_bytes: int | None = None, spill_dir: Path | None = None,
                    what: str = "original model") -> Iterator[np.ndarray]:
    """Logits [T, V] (float32) of each chunk, in order, for the model whose tensors ``state`` holds."""
    from ..model.stream import (
        LayerStream,
        capture_layer_inputs,
        device_of,
        final_logits,
        layer_forward,
        skeleton,
        to_device,
    )
    from ..quantize.activations import Activations

    dev = device_of(device)
    model = skeleton(info)
    stream = LayerStream(model, state, dev)
    ids = torch.as_tensor(np.asarray(chunks), dtype=torch.long)
    half = None if budget_bytes is None else budget_bytes // 2
    hs = Activations(torch.float32, half, spill_dir)
    counter: dict = {}
    layers = model.model.layers
    with torch.inference_mode(), pbar.task(f"logits of the {what}", total=len(layers) + 1, unit="layer") as bar:
        with stream.loaded(model.model.embed_tokens, "model.embed_tokens"):
            kws = to_device(capture_layer_inputs(model, ids, 1, hs), dev)
        for li in range(len(layers)):
            out = Activations(torch.float32, half, spill_dir)
            with stream.loaded(layers[li], f"model.layers.{li}") as layer:
                layer_forward(layer, hs, [kw[li] for kw in kws], counter, dev, out)
            hs.close()
            hs = out
            bar.advance(1)
        head = stream.head_weight()
        with stream.loaded(model.model.norm, "model.norm"):
            for h in hs:
                yield final_logits(model, h.to(dev, torch.float32), head)[0].float().cpu().numpy()
        bar.advance(1)
    hs.close()


def logits_fn(logits: Iterator[np.ndarray]) -> LogitsFn:
    """A LogitsFn over precomputed logits, consumed in chunk order (as ``compare``/``base_logprobs`` call it)."""
    it = iter(logits)

    def fn(_chunk: np.ndarray) -> np.ndarray:
        return next(it)

    return fn
