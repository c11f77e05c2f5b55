"""Teacher-forced scoring of a text in fixed-size chunks (llama-perplexity's framing).

The text is tokenized once without special tokens and cut into chunks of ``n_ctx``; the first
token of each chunk is replaced by BOS (as llama-perplexity does), so every runtime sees exactly
the same token ids.
"""
from __future__ import annotations

import numpy as np


def eval_chunks(token_ids: list[int] | np.ndarray, n_ctx: int, bos: int | None, max_chunks: int | None = None) -> np.ndarray:
    """int64 [n_chunks, n_ctx] windows of the token stream, first token of each set to BOS."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n = ids.size // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"text has {ids.size} tokens, fewer than one chunk of {n_ctx}")
    chunks = ids[: n * n_ctx].reshape(n, n_ctx).copy()
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def torch_chunk_logprobs(model, chunk: np.ndarray):
    """log-softmax over the vocabulary for every position of one chunk: float32 [T, V]."""
    import torch

    with torch.inference_mode():
        logits = model(torch.from_numpy(chunk)[None]).logits[0].float()
        return torch.log_softmax(logits, dim=-1)


def torch_nll(model, chunks: np.ndarray, first: int = 1) -> np.ndarray:
    """Per-token negative log-likelihood of positions ``first``.. predicting the next token."""
    import torch

    out = []
    for c in chunks:
        lp = torch_chunk_logprobs(model, c)
        tgt = torch.from_numpy(c[first:])
        out.append(-lp[first - 1 : -1].gather(1, tgt[:, None])[:, 0].numpy())
    return np.concatenate(out)
