"""`quantprism drift --calibration OLD --sample NEW`: has traffic moved away from the calibration set?

Three measures, each against a threshold of the targets file's ``[drift]`` table:

- ``token_js``: Jensen–Shannon divergence (bits, 0–1) between the two unigram token distributions, in the model's
  own tokenizer — new vocabulary, another language, code instead of prose;
- ``length_tv``: total-variation distance between the document-length mixes (tokens per document, in powers-of-two
  buckets) — chat turns instead of long documents;
- ``kld_ratio`` (with ``--build B --target T``): the quantized artifact's mean KLD to the original on the new
  sample over the same on the calibration text, in the artifact's own runtime — the damage itself.

Re-calibration is due when any measure is over its threshold (exit 1: a cron step that opens the rebuild).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

MIN_DOCS = 8
DRIFT_DEFAULTS = {"max_token_js": 0.15, "max_length_tv": 0.5, "max_kld_ratio": 1.5}


def token_stats(tok, docs: list[str]) -> tuple[Counter, list[int], list[int]]:
    """Unigram counts, tokens per document, and the concatenated ids."""
    counts: Counter = Counter()
    lengths, stream = [], []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        counts.update(ids)
        lengths.append(len(ids))
        stream.extend(ids)
    return counts, lengths, stream


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen–Shannon divergence in bits (0: same distribution, 1: disjoint supports)."""
    sp, sq = sum(p.values()), sum(q.values())
    if not sp or not sq:
        return 1.0
    js = 0.0
    for k in set(p) | set(q):
        a, b = p.get(k, 0) / sp, q.get(k, 0) / sq
        m = (a + b) / 2
        if a:
            js += 0.5 * a * math.log2(a / m)
        if b:
            js += 0.5 * b * math.log2(b / m)
    return max(0.0, min(1.0, js))


def length_tv(a: list[int], b: list[int]) -> float:
    """Total-variation distance between two document-length mixes over power-of-two buckets."""
    def hist(x: list[int]) -> Counter:
        return Counter(int(math.log2(max(1, n))) for n in x)

    ha, hb = hist(a), hist(b)
    na, nb = sum(ha.values()), sum(hb.values())
    return 0.5 * sum(abs(ha.get(k, 0) / na - hb.get(k, 0) / nb) for k in set(ha) | set(hb))


def _klds(info, runtime: str, artifact: Path, streams: list[list[int]], bos: int | None, n_ctx: int, chunks: int,
          threads: int | None) -> list[float]:
    """Mean KLD of the artifact (in its runtime, opened once) to the original, on ``chunks`` windows of each stream."""
    from ..evaluate.compare import base_logprobs, compare
    from ..evaluate.perplexity import eval_chunks
    from ..evaluate.streamed import logits_fn, streamed_logits
    from ..exporters.state import TensorStore
    from ..runtimes import open_runtime

    windows = [eval_chunks(stream, n_ctx, bos, chunks) for stream in streams]
    bases = [base_logprobs(ch, logits_fn(streamed_logits(info, TensorStore(info), ch, "cpu"))) for ch in windows]
    sess = open_runtime(runtime, artifact, threads=threads, n_ctx=max(n_ctx, 512))
    try:
        return [float(compare(ch, base, sess.logits)[0]["kld_mean"]) for ch, base in zip(windows, bases, strict=True)]
    finally:
        sess.close()


def drift(calibration: str, sample: str, info, thresholds: dict | None = None, build: Path | None = None,
          target: str | None = None, n_ctx: int = 256, chunks: int = 4, threads: int | None = None) -> dict:
    from ..calibration.sources import read_documents
    from ..errors import ConfigError
    from ..model import load_tokenizer

    th = {**DRIFT_DEFAULTS, **(thresholds or {})}
    tok = load_tokenizer(info)
    old_c, old_len, old_ids = token_stats(tok, read_documents(calibration))
    new_c, new_len, new_ids = token_stats(tok, read_documents(sample))
    out = {"calibration": str(calibration), "sample": str(sample),
           "tokens": {"calibration": len(old_ids), "sample": len(new_ids)},
           "documents": {"calibration": len(old_len), "sample": len(new_len)},
           "length_p50": {"calibration": float(np.median(old_len)), "sample": float(np.median(new_len))},
           "token_js": js_divergence(old_c, new_c),
           # a length mix needs documents: one long .txt on either side says nothing about it
           "length_tv": length_tv(old_len, new_len) if min(len(old_len), len(new_len)) >= MIN_DOCS else None,
           "sample_unseen_token_share": sum(n for k, n in new_c.items() if k not in old_c) / max(1, len(new_ids)),
           "thresholds": th}
    if build is not None:
        from ..report.results import load_results

        doc = load_results(Path(build) / "results.json")
        row = next((r for r in doc.get("targets", []) if r["name"] == target), None)
        if row is None or not row.get("artifact"):
            raise ConfigError(f"{build}: no built target {target!r}; pass --target NAME of results.json")
        if min(len(old_ids), len(new_ids)) < n_ctx:
            raise ConfigError(f"the KLD check needs ≥ {n_ctx} tokens in each text (calibration {len(old_ids)}, "
                              f"sample {len(new_ids)})")
        bos = tok.bos_token_id
        from ..report.results import artifact_path

        art = artifact_path(Path(build), row["artifact"])
        k_old, k_new = _klds(info, row["runtime"], art, [old_ids, new_ids], bos, n_ctx, chunks, threads)
        out.update(target=target, kld_calibration=k_old, kld_sample=k_new, kld_ratio=k_new / max(k_old, 1e-12))
    reasons = []
    if out["token_js"] > th["max_token_js"]:
        reasons.append(f"token distribution JS {out['token_js']:.3f} > {th['max_token_js']:g}")
    if out["length_tv"] is not None and out["length_tv"] > th["max_length_tv"]:
        reasons.append(f"length mix TV {out['length_tv']:.3f} > {th['max_length_tv']:g}")
    if out.get("kld_ratio") is not None and out["kld_ratio"] > th["max_kld_ratio"]:
        reasons.append(f"KLD on the sample {out['kld_ratio']:.2f}× that on the calibration set > {th['max_kld_ratio']:g}×")
    out.update(due=bool(reasons), reasons=reasons)
    return out
