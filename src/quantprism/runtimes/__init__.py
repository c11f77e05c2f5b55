"""Runtime adapters. Every session has the same protocol: tokenize, detokenize, logits (teacher-forced), generate,
timed_generate, close, and the attributes runtime / kernel / threads."""
from __future__ import annotations

from pathlib import Path


def open_runtime(runtime: str, artifact: Path, threads: int | None = None, n_ctx: int = 1024):
    """Open ``artifact`` in its own runtime (llamacpp | vllm | onnxruntime | torch for the original)."""
    if runtime == "llamacpp":
        from .llamacpp import open_session

        return open_session(artifact, n_ctx=n_ctx, threads=threads)
    if runtime == "vllm":
        from .vllm import open_session

        return open_session(artifact, max_model_len=n_ctx, threads=threads)
    if runtime == "onnxruntime":
        from .onnxruntime import open_session

        return open_session(artifact, threads=threads)
    if runtime == "torch":
        from .torch_ref import open_session

        return open_session(artifact, threads=threads)
    raise ValueError(f"unknown runtime {runtime!r}")
