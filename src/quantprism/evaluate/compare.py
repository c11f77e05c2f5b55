"""Teacher-forced comparison of a model against the original on held-out text (torch side).

Runtime adapters produce logits for the same chunks; this module gives the original model's
base log-probs and scores any torch model (e.g. one built from canonical dequantized weights).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .kld import BaseLogprobs, TokenScores, concat, score_tokens, scored_positions, summarize
from .perplexity import eval_chunks

LogitsFn = Callable[[np.ndarray], np.ndarray]  # chunk int64 [T] → logits float32 [T, V]


def torch_logits_fn(model) -> LogitsFn:
    def fn(chunk: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(chunk)[None]).logits[0].float().numpy()

    return fn


def eval_token_chunks(tokenizer, text_path: Path, n_ctx: int = 512, max_chunks: int | None = None) -> np.ndarray:
    text = Path(text_path).read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    return eval_chunks(ids, n_ctx, tokenizer.bos_token_id, max_chunks)


def _scored(chunks: np.ndarray, fn: LogitsFn) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n_ctx = chunks.shape[1]
    sl = scored_positions(n_ctx)
    for c in chunks:
        logits = fn(c)
        yield logits[sl], c[sl.start + 1 : n_ctx]


def base_logprobs(chunks: np.ndarray, fn: LogitsFn) -> BaseLogprobs:
    parts = [BaseLogprobs.from_logits(lg, nxt) for lg, nxt in _scored(chunks, fn)]
    return BaseLogprobs(
        np.concatenate([p.scale for p in parts]), np.concatenate([p.min_log_prob for p in parts]),
        np.concatenate([p.q for p in parts]), np.concatenate([p.next_tokens for p in parts]),
    )


def compare(chunks: np.ndarray, base: BaseLogprobs, fn: LogitsFn) -> tuple[dict, TokenScores]:
    """Summary statistics (kld_mean, top1_agreement, ppl_ratio, percentiles …) and per-token scores."""
    scores, row = [], 0
    for logits, _ in _scored(chunks, fn):
        n = logits.shape[0]
        scores.append(score_tokens(base, logits, slice(row, row + n)))
        row += n
    s = concat(scores)
    return summarize(s), s
