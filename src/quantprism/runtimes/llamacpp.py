"""llama.cpp (llama-cpp-python) adapter: open a GGUF, greedy generation, teacher-forced logits, tokenization."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, RuntimeUnavailable


def available() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return False, f"llama-cpp-python is not installed ({e}); run `make install`"
    return True, "llama-cpp-python"


def check_gguf(path: Path) -> dict:
    """Structural check of a GGUF file (magic, header, tensor data inside the file); one-line errors."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ArtifactError(f"{path}: not a GGUF file (magic {magic!r}); re-export it")
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


class LlamaCppSession:
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
        self.eos = self.llm.token_eos()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize([int(i) for i in ids]).decode("utf-8", errors="replace")

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        if not self.logits_all:
            raise ValueError("teacher-forced logits need a session opened with logits_all=True")
        ids = [int(i) for i in ids]
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def _next_token(self) -> int:
        import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)  # the last evaluated position, in both modes
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),))))

    def timed_generate(self, ids: list[int], max_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], float, list[float]]:
        """Greedy generation with timings: (tokens, seconds to the first token, seconds per later token)."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval([int(i) for i in ids])
        tok = self._next_token()
        ttft = time.perf_counter() - t0
        out: list[int] = []
        per_token: list[float] = []
        while len(out) < max_tokens and not (stop_at_eos and tok == self.eos):
            out.append(tok)
            if len(out) == max_tokens:
                break
            t1 = time.perf_counter()
            self.llm.eval([tok])
            tok = self._next_token()
            per_token.append(time.perf_counter() - t1)
        return out, ttft, per_token

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        return self.timed_generate(ids, max_tokens)[0]

    def close(self) -> None:
        self.llm.close()


def open_session(path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True) -> LlamaCppSession:
    return LlamaCppSession(path, n_ctx, threads, logits_all)


def quantize(src: Path, dst: Path, file_type: str, imatrix: dict[str, np.ndarray] | None = None,
             threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``): the baseline our artifacts are measured against.

    ``imatrix`` maps GGUF tensor names (``blk.0.attn_q.weight``) to per-input-channel importance,
    passed through ``params.imatrix`` exactly as llama-quantize passes a loaded imatrix file.
    """
    import ctypes

    ok, why = available()
    if not ok:
        raise RuntimeUnavailable(why)
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    from ..exporters.gguf import FILE_TYPES
    from ..manifest import atomic_path

    check_gguf(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[file_type]
    params.nthread = threads or min(os.cpu_count() or 1, 8)
    keep: list = []  # the C side reads these buffers during the call
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: a NULL name ends it
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            data = np.ascontiguousarray(values, dtype=np.float32)
            if not np.all(np.isfinite(data)):
                raise ArtifactError(f"imatrix for {name} has non-finite values")
            keep += [data, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = data.size
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with atomic_path(dst) as tmp:
        with suppress_stdout_stderr(disable=False):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:  # raised inside the block: the temp file is removed, nothing lands at dst
            raise ArtifactError(f"llama_model_quantize failed on {src} (status {rc}); see llama.cpp's message above")
    return Path(dst)


def gguf_imatrix(imatrix: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF module → importance (e.g. a canonical result's or fp_imatrix's) keyed by GGUF tensor name."""
    from ..exporters.gguf import gguf_name

    return {f"{gguf_name(m)}.weight": np.asarray(v, dtype=np.float32) for m, v in imatrix.items()
            if m != "model.embed_tokens"}
