"""Latency through a runtime adapter: the same metrics for every runtime (llama.cpp, ONNX Runtime, vLLM).

A session provides ``timed_generate(ids, max_tokens, stop_at_eos) -> (tokens, ttft_s, per_token_s)``.
TTFT = prompt evaluation + the first token; prefill tok/s = prompt tokens / TTFT; decode tok/s is
reported from the per-token latencies of all repeats pooled: p50 = 1/median latency, p95 = 1/(95th
percentile latency), i.e. the speed that 95% of decode steps reach or beat.
"""
from __future__ import annotations

import resource

import numpy as np


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    benchmark child would report its parent's peak."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(session, prompt: list[int], decode_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> dict:
    """Greedy runs of ``prompt`` + ``decode_tokens`` (EOS ignored so every run decodes the same count)."""
    for _ in range(warmup):
        session.timed_generate(prompt, decode_tokens, stop_at_eos=False)
    ttfts, lats = [], []
    for _ in range(repeats):
        _, ttft, per = session.timed_generate(prompt, decode_tokens, stop_at_eos=False)
        ttfts.append(ttft)
        lats.extend(per)
    lat = np.asarray(lats)
    ttft = float(np.median(ttfts))
    return {
        "prompt_tokens": len(prompt), "decode_tokens": decode_tokens, "repeats": repeats, "warmup": warmup,
        "ttft_ms_p50": round(ttft * 1e3, 2), "ttft_ms_p95": round(float(np.percentile(ttfts, 95)) * 1e3, 2),
        "prefill_tok_s": round(len(prompt) / ttft, 2),
        "decode_tok_s_p50": round(1.0 / float(np.median(lat)), 2),
        "decode_tok_s_p95": round(1.0 / float(np.percentile(lat, 95)), 2),
        "decode_ms_per_token_p50": round(float(np.median(lat)) * 1e3, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": getattr(session, "threads", None),
    }
