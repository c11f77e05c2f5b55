"""Hard slices of the evaluation text: where quantization hurts first, beyond the average.

Every scored row (a chunk position predicting the next token) may belong to:
- ``long_context``: late positions of the window (the last quarter of the context), where errors in
  attention over many cached keys accumulate;
- ``rare_tokens``: the next token is among the rarest 10 % of scored tokens by frequency in the
  calibration corpus (what calibration saw least);
- ``structured``: the next token lies on a code- or JSON-like line (indentation, brackets, operators).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .kld import TokenScores, scored_positions, summarize

CODE_LINE = re.compile(r"^\s{2,}\S|[{}\[\]();=<>]|^\s*(def|class|import|from|return|if|for|while|with|try)\b|^\s*[\"'][^\"']*[\"']\s*:")


def slice_masks(tokenizer, eval_text: Path, chunks: np.ndarray, calibration_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over the scored rows of ``chunks`` (in the order compare() scores them)."""
    text = Path(eval_text).read_text(encoding="utf-8")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64)
    n_chunks, n_ctx = chunks.shape
    sl = scored_positions(n_ctx)
    pos = np.arange(sl.start, sl.stop)
    nxt = (np.arange(n_chunks)[:, None] * n_ctx + pos[None, :] + 1).reshape(-1)  # global index of the predicted token
    line_starts = np.array([0] + [m.end() for m in re.finditer("\n", text)])
    lines = text.split("\n")
    code_line = np.array([bool(CODE_LINE.search(ln)) for ln in lines])
    tok_line = np.searchsorted(line_starts, offsets[nxt, 0], side="right") - 1
    next_ids = np.asarray(enc["input_ids"])[nxt]
    counts = np.bincount(np.asarray(calibration_ids).reshape(-1), minlength=int(next_ids.max()) + 1)
    freq = counts[next_ids]  # a token calibration never saw counts 0
    rare_cut = np.percentile(freq, 10)
    return {
        "long_context": np.tile(pos >= n_ctx * 3 // 4, n_chunks),
        "rare_tokens": freq <= rare_cut,
        "structured": code_line[tok_line],
    }


def slice_summaries(scores: TokenScores, masks: dict[str, np.ndarray]) -> dict[str, dict]:
    out = {}
    for name, m in masks.items():
        if m.sum() < 2:
            continue
        sub = TokenScores(*(getattr(scores, f)[m] for f in ("kld", "nll", "nll_base", "same_top", "p_diff")))
        s = summarize(sub)
        out[name] = {"n_tokens": s["n_tokens"], "kld_mean": s["kld_mean"], "kld_p99": s["kld_p99"],
                     "top1_agreement": s["top1_agreement"], "ppl_ratio": s["ppl_ratio"]}
    return out
