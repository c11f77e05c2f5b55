"""Benchmark-only latency helpers: this machine's memory bandwidth, the bandwidth bound on decode speed, and one
artifact's latency row (open timed as load_s, measure, close). The pipeline measures through
``quantprism.runtimes.latency.measure``; these only serve scripts under benchmarks/."""
from __future__ import annotations

from quantprism.runtimes.latency import measure


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
