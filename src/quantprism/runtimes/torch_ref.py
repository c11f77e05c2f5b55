"""The original model in PyTorch (fp32 by default, eager, KV cache): the reference row of every build report."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import GreedySession


class TorchSession(GreedySession):
    runtime = "torch"
    kernel = "native"

    def __init__(self, path: Path | None, threads: int | None = None, dtype: str | None = None):
        import torch

        from ..model import load_model_info, load_tokenizer, load_torch_model

        self.threads = threads or min(os.cpu_count() or 1, 8)
        torch.set_num_threads(self.threads)
        info = load_model_info(path)
        self.model = load_torch_model(info, getattr(torch, dtype) if dtype else None)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.tok = load_tokenizer(info)
        self.eos = {int(self.tok.eos_token_id)} if self.tok.eos_token_id is not None else set()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def logits(self, ids) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]).logits[0].float().numpy()

    def continuation_logits(self, ctx: list[int], conts: list[list[int]]) -> list[np.ndarray]:
        """The rows that score each continuation after one shared prefill of ``ctx``: the KV cache is repeated once
        per continuation and all continuations run as one right-padded batch (causal attention: a real position
        never sees the padding after it)."""
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ctx]), use_cache=True)
            last = out.logits[0, -1:].float().numpy()
            longer = [c[:-1] for c in conts if len(c) > 1]
            if not longer:
                return [last.copy() for _ in conts]
            width = max(len(c) for c in longer)
            batch = torch.tensor([c + [0] * (width - len(c)) for c in longer])
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(longer))
            rows = iter(self.model(batch, past_key_values=cache, use_cache=True).logits.float().numpy())
        return [np.concatenate([last, next(rows)[: len(c) - 1]]) if len(c) > 1 else last.copy() for c in conts]

    def _prefill(self, ids: list[int], max_new: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=True)
        self._past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def _decode(self, token: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([[token]]), past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def close(self) -> None:
        del self.model


def open_session(path: Path | None, threads: int | None = None, dtype: str | None = None) -> TorchSession:
    return TorchSession(path, threads, dtype)


def open_runtime_session(path: Path, threads: int | None, n_ctx: int, dtype: str | None = None):
    """``dtype``: "float32" (default) or the checkpoint's own ("bfloat16", "float16") where float32 does not fit."""
    return open_session(path, threads=threads, dtype=dtype)
