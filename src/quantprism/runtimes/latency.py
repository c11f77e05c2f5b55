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


def memory_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> dict:
    """Measured memory-copy bandwidth of this machine (torch copy_, ``threads`` threads, best of ``repeats``).

    copy_gb_s counts bytes read + bytes written per second (STREAM 'copy' convention); read_gb_s is a
    pure streaming read (a sum) — the one a decode-speed bound uses (``decode_bound_tok_s``). Arrays are far
    larger than any cache.
    """
    import time

    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = mib * 2**20 // 4
        src = torch.ones(n)
        dst = torch.empty(n)
        copy, read = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            dst.copy_(src)
            copy.append(time.perf_counter() - t)
            t = time.perf_counter()
            float(src.sum())
            read.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)
    nbytes = n * 4
    return {"copy_gb_s": round(2 * nbytes / min(copy) / 1e9, 2), "read_gb_s": round(nbytes / min(read) / 1e9, 2),
            "threads": threads, "array_mib": mib}


def decode_bound_tok_s(bandwidth: dict, bytes_per_token: int) -> float:
    """Memory-bandwidth bound on decode tok/s: a decode step streams every weight and the KV cache from memory once
    and writes next to nothing, so the bound is the measured READ bandwidth (``read_gb_s``) ÷ bytes read per step —
    not the copy bandwidth, which counts the read and the write traffic of a copy."""
    return bandwidth["read_gb_s"] * 1e9 / bytes_per_token


def decode_bytes_per_token(tensor_bytes: dict[str, int], kv_bytes_per_position: int, position: int) -> int:
    """Bytes a decode step must read: every weight once (token_embd: one row, negligible) + the KV cache so far."""
    weights = sum(b for name, b in tensor_bytes.items() if not name.startswith("token_embd"))
    return weights + kv_bytes_per_position * position


def measure_artifact(open_fn, prompt_text: str, prompt_len: int, decode_tokens: int, repeats: int,
                     bos: int | None = 0) -> dict:
    """Open a session with ``open_fn()`` (timed as load_s), build a ``prompt_len``-token prompt from
    ``prompt_text`` (BOS first), measure it, close it; the row carries the session's kernel label."""
    import time

    t0 = time.perf_counter()
    sess = open_fn()
    load_s = time.perf_counter() - t0
    try:
        prompt = ([] if bos is None else [bos]) + sess.tokenize(prompt_text)
        r = measure(sess, prompt[:prompt_len], decode_tokens, repeats)
    finally:
        kernel = getattr(sess, "kernel", "native")
        sess.close()
    return {"load_s": round(load_s, 2), "kernel": kernel, **r}
