"""onnxruntime-genai adapter: an ``onnx-genai`` folder (genai_config.json, model.onnx, tokenizer) run by
onnxruntime-genai's own Model and Generator (its KV-cache management, GroupQueryAttention with a shared
past/present buffer of ``max_length`` positions).

- ``logits(ids)``: one ``append_tokens`` of the whole sequence into a fresh generator, then the ``logits``
  output, which holds every position of that run ([1, T, V]): teacher forcing in one graph run.
- ``timed_generate``: greedy. Each step appends the previous token (one graph run) and takes the argmax of the
  last logits row, so EOS can be ignored (``stop_at_eos=False``: a smoke test must decode every token); genai's
  own ``generate_next_token`` loop picks the same tokens and runs at the same speed (measured) but ends at EOS.
- Threads: the decoder's session_options (intra_op_num_threads, inter_op_num_threads = 1) overlaid on the
  artifact's genai_config.json, CPU provider only.
- Tokenization: the HF tokenizer files next to the model (``add_special_tokens=False``), as the ORT adapter.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, RuntimeUnavailable
from .base import GreedySession, HFTokenizerSession, import_probe

GENAI_CONFIG = "genai_config.json"


def available() -> tuple[bool, str]:
    return import_probe("onnxruntime_genai", "onnxruntime-genai", "pip install -e .[onnx]")


def _root(path: Path) -> Path:
    path = Path(path)
    root = path if path.is_dir() else path.parent
    if not (root / GENAI_CONFIG).is_file():
        raise ArtifactError(f"{path}: no {GENAI_CONFIG}; export the onnx-genai artifact first")
    return root


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:160] if s else type(e).__name__


class OnnxRuntimeGenAISession(HFTokenizerSession, GreedySession):
    """One loaded onnxruntime-genai decoder; ``logits`` is teacher-forced, ``generate`` greedy."""

    runtime = "onnxruntime-genai"
    kernel = "native"

    _og_tok = None

    def runtime_tokenize(self, text: str) -> list[int]:
        """What a deployment gets: onnxruntime-genai's own Tokenizer (it always matches special-token strings)."""
        if self._og_tok is None:
            import onnxruntime_genai as og

            self._og_tok = og.Tokenizer(self.model)
        return [int(i) for i in self._og_tok.encode(text)]

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 1024):
        ok, why = available()
        if not ok:
            raise RuntimeUnavailable(why)
        import onnxruntime_genai as og

        self.root = _root(path)
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self.n_ctx = int(n_ctx)
        try:
            cfg = json.loads((self.root / GENAI_CONFIG).read_text(encoding="utf-8"))
            model_cfg = cfg["model"]
            decoder = model_cfg["decoder"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{self.root / GENAI_CONFIG}: not a genai decoder config ({_first_line(e)}); re-export it") from None
        model_file = self.root / decoder.get("filename", "model.onnx")
        if not model_file.is_file():
            raise ArtifactError(f"{self.root}: no {model_file.name} (named in {GENAI_CONFIG}); re-export it")
        self.context_length = int(model_cfg.get("context_length") or self.n_ctx)
        eos = model_cfg.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.vocab_size = int(model_cfg.get("vocab_size", 0))
        try:
            config = og.Config(str(self.root))
            config.clear_providers()  # CPU
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
        except Exception as e:  # genai raises RuntimeError with ORT's message; find the cause, say it in one line
            from .onnxruntime import check_onnx

            check_onnx(model_file)
            raise ArtifactError(f"{model_file}: onnxruntime-genai cannot load it ({_first_line(e)}); re-export it") from None
        self._og = og

    def _generator(self, total: int):
        """A fresh generator whose KV buffer holds ``total`` positions (at least n_ctx, at most the context length)."""
        if total > self.context_length:
            raise ValueError(f"{total} positions exceed the model's context length {self.context_length}")
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(max(self.n_ctx, total), self.context_length), do_sample=False)
        return self._og.Generator(self.model, params)

    @staticmethod
    def _ids(ids) -> np.ndarray:
        return np.asarray([int(i) for i in ids], dtype=np.int32)

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        ids = self._ids(ids)
        g = self._generator(len(ids))
        g.append_tokens(ids)
        out = np.asarray(g.get_output("logits"), dtype=np.float32)
        if out.ndim != 3 or out.shape[1] != len(ids):
            raise ArtifactError(f"{self.root}: logits of shape {out.shape} for {len(ids)} tokens; the graph prunes "
                                "its lm_head to the last position, re-export it without prune_lm_head")
        return out[0]

    def continuation_logits(self, ctx: list[int], conts: list[list[int]]) -> list[np.ndarray]:
        """The rows that score each continuation after one shared prefill of ``ctx``: the generator rewinds to the
        context's end (``rewind_to``) before each continuation."""
        g = self._generator(len(ctx) + max((len(c) for c in conts), default=1))
        g.append_tokens(self._ids(ctx))
        last = np.asarray(g.get_output("logits"), dtype=np.float32)[0, -1:]
        out = []
        for c in conts:
            if len(c) > 1:
                g.rewind_to(len(ctx))
                g.append_tokens(self._ids(c[:-1]))
                out.append(np.concatenate([last, np.asarray(g.get_output("logits"), dtype=np.float32)[0]]))
            else:
                out.append(last.copy())
        return out

    def _prefill(self, ids: list[int], max_new: int) -> np.ndarray:
        self._gen = self._generator(len(ids) + max_new)
        self._gen.append_tokens(self._ids(ids))
        return self._gen.get_logits()[0, -1]

    def _decode(self, token: int) -> np.ndarray:
        self._gen.append_tokens(np.asarray([token], np.int32))
        return self._gen.get_logits()[0, -1]

    def describe(self) -> str:
        from .onnxruntime import check_onnx

        return f"{check_onnx(self.root)['nodes']} nodes (onnxruntime-genai graph)"

    def close(self) -> None:
        self.model = None


def open_session(path: Path, threads: int | None = None, n_ctx: int = 1024) -> OnnxRuntimeGenAISession:
    return OnnxRuntimeGenAISession(path, threads, n_ctx)


def open_runtime_session(path: Path, threads: int | None, n_ctx: int) -> OnnxRuntimeGenAISession:
    return OnnxRuntimeGenAISession(path, threads, n_ctx)
