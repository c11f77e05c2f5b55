"""KL divergence, top-1 agreement and PPL ratio with llama-perplexity's definitions.

(shared/reference/gguf-kquants.md §5.) Text cut into ``n_ctx`` chunks, first token of each set to
BOS; positions ``n_ctx/2 .. n_ctx-2`` of each chunk are scored (each predicts the next token).
The base (original model) log-probs are stored as llama-perplexity stores them — uint16 over the
top 16 nats of logits — and the KLD sums only base entries above −16 nats, so our numbers and
``llama-perplexity --kl-divergence`` agree by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)


def scored_positions(n_ctx: int) -> slice:
    return slice(n_ctx // 2, n_ctx - 1)


@dataclass
class BaseLogprobs:
    """The original model's scored log-probs, uint16-encoded per position."""

    scale: np.ndarray  # float32 [T]
    min_log_prob: np.ndarray  # float32 [T]
    q: np.ndarray  # uint16 [T, V]
    next_tokens: np.ndarray  # int64 [T]

    @classmethod
    def from_logits(cls, logits: np.ndarray, next_tokens: np.ndarray) -> BaseLogprobs:
        """Encoded SCORE_ROWS positions at a time (per-position arithmetic: the same bytes as all at once)."""
        if logits.shape[0] > SCORE_ROWS:
            parts = [cls.from_logits(logits[a : a + SCORE_ROWS], next_tokens[a : a + SCORE_ROWS])
                     for a in range(0, logits.shape[0], SCORE_ROWS)]
            return cls(*(np.concatenate([getattr(b, f) for b in parts]) for f in ("scale", "min_log_prob", "q", "next_tokens")))
        logits = logits.astype(np.float32)
        M = logits.max(1)
        m = np.maximum(logits.min(1), M - np.float32(16))
        lse = np.log(np.exp((logits - M[:, None]).astype(np.float64)).sum(1)).astype(np.float32)
        scale = ((M - m) / np.float32(65535)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.where(logits > m[:, None], np.rint((logits - m[:, None]) / safe[:, None]), 0).astype(np.uint16)
        return cls(scale, (m - M - lse).astype(np.float32), q, next_tokens.astype(np.int64))

    def logp(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        return self.scale[rows, None] * self.q[rows].astype(np.float32) + self.min_log_prob[rows, None]

    def __len__(self) -> int:
        return int(self.q.shape[0])


@dataclass
class TokenScores:
    kld: np.ndarray
    nll: np.ndarray
    nll_base: np.ndarray
    same_top: np.ndarray
    p_diff: np.ndarray


SCORE_ROWS = 64  # positions scored at a time: a [rows, vocab] float64 temporary stays a few MB at any vocabulary


def score_tokens(base: BaseLogprobs, logits: np.ndarray, rows: slice | np.ndarray = slice(None)) -> TokenScores:
    """Per-token statistics of quantized-model logits [T, V] against ``base`` rows, SCORE_ROWS positions at a time
    (every statistic is per position, so the blocks' results are the whole matrix's)."""
    idx = np.arange(len(base))[rows]
    if len(idx) <= SCORE_ROWS:
        return _score_block(base, logits, idx)
    return concat([_score_block(base, logits[a : a + SCORE_ROWS], idx[a : a + SCORE_ROWS])
                   for a in range(0, len(idx), SCORE_ROWS)])


def _score_block(base: BaseLogprobs, logits: np.ndarray, rows: np.ndarray) -> TokenScores:
    logits = logits.astype(np.float32)
    lb = base.logp(rows)
    tok = base.next_tokens[rows]
    M = logits.max(1)
    lse = np.log(np.exp((logits - M[:, None]).astype(np.float64)).sum(1)).astype(np.float32)
    logq = logits - (M + lse)[:, None]
    nll = -logq[np.arange(len(tok)), tok]
    nll_base = -lb[np.arange(len(tok)), tok]
    keep = lb > np.float32(-16)
    kld = np.where(keep, np.exp(lb) * (lb - logq), 0.0).sum(1, dtype=np.float64)
    same = logits.argmax(1) == lb.argmax(1)
    p_diff = np.exp(-nll.astype(np.float64)) - np.exp(-nll_base.astype(np.float64))
    return TokenScores(kld, nll.astype(np.float64), nll_base.astype(np.float64), same, p_diff)


def concat(scores: list[TokenScores]) -> TokenScores:
    return TokenScores(*(np.concatenate([getattr(s, f) for s in scores]) for f in ("kld", "nll", "nll_base", "same_top", "p_diff")))


def _mean_unc(x: np.ndarray) -> tuple[float, float]:
    n = x.size
    mean = float(x.mean())
    var = float((x * x).mean() - mean * mean)
    return mean, math.sqrt(max(var, 0.0) / max(1, n - 1))


def _percentile(sorted_x: np.ndarray, f: float) -> float:
    # linear interpolation at f*(N-1), as llama-perplexity
    pos = f * (sorted_x.size - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, sorted_x.size - 1)
    return float(sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo))


def summarize(s: TokenScores) -> dict:
    n = int(s.kld.size)
    kld_mean, kld_unc = _mean_unc(s.kld)
    ks = np.sort(s.kld)
    nll_mean, nll_unc = _mean_unc(s.nll)
    nb_mean, nb_unc = _mean_unc(s.nll_base)
    cov = (float((s.nll * s.nll_base).mean()) - nll_mean * nb_mean) / max(1, n - 1)
    ln_ratio = nll_mean - nb_mean
    ln_ratio_unc = math.sqrt(max(nll_unc**2 + nb_unc**2 - 2 * cov, 0.0))
    same = float(s.same_top.mean())
    out = {
        "n_tokens": n,
        "kld_mean": kld_mean, "kld_mean_unc": kld_unc,
        "kld_max": float(ks[-1]), "kld_min": float(ks[0]),
        "kld_median": _percentile(ks, 0.5),
        "ppl": math.exp(nll_mean), "ppl_unc": math.exp(nll_mean) * nll_unc,
        "ppl_base": math.exp(nb_mean),
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_unc": ln_ratio_unc, "ppl_ratio": math.exp(ln_ratio),
        "top1_agreement": same, "top1_agreement_unc": math.sqrt(same * (1 - same) / max(1, n - 1)),
        "rms_dp": math.sqrt(float((s.p_diff**2).mean())),
    }
    for p in PERCENTILES:
        out[f"kld_p{p:g}"] = _percentile(ks, p / 100)
    return out
