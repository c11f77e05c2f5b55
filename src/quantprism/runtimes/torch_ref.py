"""The original model in PyTorch (fp32, eager, KV cache): the reference row of every build report."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


class TorchSession:
    runtime = "torch"
    kernel = "native"

    def __init__(self, path: Path | None, threads: int | None = None):
        import torch

        from ..model import load_model_info, load_tokenizer, load_torch_model

        self.threads = threads or min(os.cpu_count() or 1, 8)
        torch.set_num_threads(self.threads)
        info = load_model_info(path)
        self.model = load_torch_model(info)
        self.tok = load_tokenizer(info)
        self.eos = self.tok.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def logits(self, ids) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]).logits[0].float().numpy()

    def timed_generate(self, ids: list[int], max_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], float, list[float]]:
        import torch

        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(torch.tensor([ids]), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            ttft = time.perf_counter() - t0
            past, toks, per = out.past_key_values, [], []
            while len(toks) < max_tokens and not (stop_at_eos and tok == self.eos):
                toks.append(tok)
                if len(toks) == max_tokens:
                    break
                t1 = time.perf_counter()
                out = self.model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
                per.append(time.perf_counter() - t1)
        return toks, ttft, per

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        return self.timed_generate(ids, max_tokens)[0]

    def close(self) -> None:
        del self.model


def open_session(path: Path | None, threads: int | None = None) -> TorchSession:
    return TorchSession(path, threads)
