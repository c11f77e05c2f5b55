"""Shadow compare: the candidate re-runs a baseline request off the response path; what is recorded.

- exact match of the generated tokens, and the first position where they differ (None when equal);
- the candidate's teacher-forced KLD on the baseline's output: at every position of the baseline's generation,
  KL(P_baseline || P_candidate) between the distribution the baseline drew that token from and the candidate's
  distribution given the same prefix (one teacher-forced pass of the candidate over prompt + baseline output).
  This is the offline build's KLD measured on live prompts, in the candidate's own runtime.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a shorter sequence differs where it ends); None if identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def log_softmax(rows: np.ndarray) -> np.ndarray:
    z = rows.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kld_rows(base: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """KL(P_base || P_cand) per row; vocabularies padded differently by a runtime are cut to the common width."""
    v = min(base.shape[-1], cand.shape[-1])
    lp, lq = log_softmax(base[..., :v]), log_softmax(cand[..., :v])
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def compare(prompt_len: int, base_tokens: list[int], cand_tokens: list[int], base_rows: np.ndarray | None,
            cand_forced: np.ndarray | None) -> dict:
    """``cand_forced``: the candidate's logits over prompt + base_tokens (row t predicts token t+1)."""
    rec: dict = {"exact_match": base_tokens == cand_tokens, "first_divergence": first_divergence(base_tokens, cand_tokens),
                 "baseline_tokens": len(base_tokens), "candidate_tokens": len(cand_tokens)}
    if base_rows is not None and cand_forced is not None and len(base_tokens):
        n = min(len(base_tokens), len(base_rows))
        q = cand_forced[prompt_len - 1: prompt_len - 1 + n]
        k = kld_rows(base_rows[:n], q)
        rec.update(kld_mean=float(k.mean()), kld_max=float(k.max()))
    return rec


class ShadowLog:
    """Append-only JSONL beside the flag (one whole line per record, under a lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, rec: dict) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **rec}, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_shadow(path: Path) -> list[dict]:
    """The records of a shadow log (a torn last line, e.g. from a killed server, is skipped)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def summarize(records: list[dict]) -> dict:
    """What `quantprism report` shows next to the offline results."""
    done = [r for r in records if "exact_match" in r]
    klds = [r["kld_mean"] for r in done if r.get("kld_mean") is not None]
    div = [r["first_divergence"] for r in done if r.get("first_divergence") is not None]
    return {"shadowed": len(done), "skipped": len(records) - len(done),
            "exact_match": (sum(r["exact_match"] for r in done) / len(done)) if done else None,
            "kld_mean": float(np.mean(klds)) if klds else None,
            "kld_p95": float(np.percentile(klds, 95)) if klds else None,
            "first_divergence_median": float(np.median(div)) if div else None}
