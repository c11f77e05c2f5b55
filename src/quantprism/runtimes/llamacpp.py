"""llama.cpp (llama-cpp-python) adapter: open a GGUF, greedy generation, teacher-forced logits, tokenization."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, RuntimeUnavailable
from .base import GreedySession, import_probe


def available() -> tuple[bool, str]:
    return import_probe("llama_cpp", "llama-cpp-python", "make install")


def check_gguf(path: Path) -> dict:
    """Structural check of a GGUF file (magic, header, tensor data inside the file); one-line errors."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise ArtifactError(f"{path}: not a GGUF file (magic {head[:4]!r}); re-export it")
    if len(head) < 24:
        raise ArtifactError(f"{path}: truncated GGUF ({size} bytes: no header); re-export it")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    # a tensor record takes ≥ 32 bytes and a key-value pair ≥ 13: counts the file cannot hold are refused before
    # any reader allocates for them
    if version not in (2, 3) or n_tensors * 32 + n_kv * 13 > size - 24:
        raise ArtifactError(f"{path}: malformed GGUF header (version {version}, {n_tensors} tensors, {n_kv} keys in "
                            f"{size} bytes); re-export it")
    try:
        reader = gguf.GGUFReader(str(path))
        n = len(reader.tensors)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf-py raises assorted errors on damaged files
        raise ArtifactError(f"{path}: malformed or truncated GGUF ({type(e).__name__}: {str(e)[:120]}); re-export it") from None
    if end > path.stat().st_size:
        raise ArtifactError(f"{path}: truncated GGUF ({path.stat().st_size} bytes, tensors need {end}); re-export it")
    arch = reader.fields.get("general.architecture")
    return {"tensors": n, "architecture": bytes(arch.parts[-1]).decode() if arch else None}


class LlamaCppSession(GreedySession):
    """One loaded GGUF. ``logits`` is teacher-forced over a token sequence (for KLD); ``generate`` is greedy."""

    runtime = "llamacpp"
    kernel = "native"

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True):
        ok, why = available()
        if not ok:
            raise RuntimeUnavailable(why)
        from llama_cpp import Llama

        self.info = check_gguf(path)  # architecture and tensor count, for reports and `validate`
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self.n_ctx = n_ctx
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=self.threads,
                         n_threads_batch=self.threads, logits_all=logits_all, verbose=False)
        self.logits_all = logits_all  # False = serving mode: only the last position's logits (latency)
        self.eos = {int(self.llm.token_eos())}

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def runtime_tokenize(self, text: str) -> list[int]:
        """What a deployment gets: llama.cpp's tokenizer from the GGUF vocabulary (checked by tokenization parity)."""
        return self.tokenize(text)

    def describe(self) -> str:
        return f"{self.info['architecture']}, {self.info['tensors']} tensors"

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize([int(i) for i in ids]).decode("utf-8", errors="replace")

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        if not self.logits_all:
            raise ValueError("teacher-forced logits need a session opened with logits_all=True")
        ids = [int(i) for i in ids]
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def continuation_logits(self, ctx: list[int], conts: list[list[int]]) -> list[np.ndarray]:
        """The rows that score each continuation after one shared prefill of ``ctx`` (multiple-choice tasks): the
        context is evaluated once, then each continuation from the kept KV cache (eval drops the cells after
        n_tokens)."""
        if not self.logits_all:
            raise ValueError("continuation logits need a session opened with logits_all=True")
        self.llm.reset()
        self.llm.eval([int(i) for i in ctx])
        n = len(ctx)
        last = np.array(self.llm.scores[n - 1], dtype=np.float32)
        out = []
        for cont in conts:
            self.llm.n_tokens = n
            if len(cont) > 1:
                self.llm.eval([int(i) for i in cont[:-1]])
                rows = np.array(self.llm.scores[n: n + len(cont) - 1], dtype=np.float32)
                out.append(np.concatenate([last[None], rows]))
            else:
                out.append(last[None].copy())
        return out

    def _last_row(self) -> np.ndarray:
        import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)  # the last evaluated position, in both modes
        return np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))

    def _prefill(self, ids: list[int], max_new: int) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_row()

    def _decode(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last_row()

    def close(self) -> None:
        self.llm.close()


def open_session(path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True) -> LlamaCppSession:
    return LlamaCppSession(path, n_ctx, threads, logits_all)


def open_runtime_session(path: Path, threads: int | None, n_ctx: int) -> LlamaCppSession:
    return LlamaCppSession(path, n_ctx, threads)
