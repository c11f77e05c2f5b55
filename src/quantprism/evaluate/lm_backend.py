"""An lm-evaluation-harness model over the runtime registry: `lm_eval --model quantprism --model_args artifact=…`.

Every number comes from the artifact's own runtime — teacher-forced logits for ``loglikelihood`` and
``loglikelihood_rolling``, the runtime's greedy loop for ``generate_until`` — with the runtime's own tokenizer
(llama.cpp's from the GGUF, the HF files beside an ONNX model; the build's tokenization-parity gate proves they equal
the original's). The original model runs through the same class (``runtime=torch``, ``artifact=MODEL_DIR``), so
every task number is paired with the original's.

model_args: ``artifact`` (a .gguf, an ONNX / GenAI folder, an HF checkpoint, or the original model's folder),
``runtime`` (default: the format's first runtime; ``torch`` for an unquantized folder), ``threads``, ``n_ctx``
(default 1024), ``bos`` (default: the runtime's / tokenizer's BOS, else 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import ArtifactError


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _continuation_score(logits, cont: list[int]) -> tuple[float, bool]:
    """lm-eval's (log-likelihood, is_greedy) of ``cont`` from the rows that predict each of its tokens."""
    rows = _log_softmax(np.asarray(logits, dtype=np.float32))
    target = np.asarray(cont)
    return float(rows[np.arange(target.size), target].sum()), bool((rows.argmax(-1) == target).all())


def open_artifact(artifact: Path, runtime: str | None, threads: int | None, n_ctx: int):
    """(session, runtime name) for an artifact; a plain HF folder without quantization_config runs in torch."""
    from ..exporters import FORMATS
    from ..runtimes import open_runtime

    artifact = Path(artifact)
    if not artifact.exists():
        raise ArtifactError(f"{artifact}: no such artifact")
    if runtime is None:
        fmt = next((FORMATS[n] for n in FORMATS if FORMATS[n].recognize(artifact)), None)
        if fmt is not None:
            runtime = fmt.runtimes[0]
        elif artifact.is_dir() and any(artifact.glob("*.safetensors")):
            runtime = "torch"
        else:
            raise ArtifactError(f"{artifact}: unknown artifact type; pass runtime=… in model_args")
    return open_runtime(runtime, artifact, threads, n_ctx=n_ctx), runtime


@register_model("quantprism")
class QuantprismLM(LM):
    def __init__(self, artifact: str | None = None, runtime: str | None = None, threads: int | None = None,
                 n_ctx: int = 1024, bos: int | None = None, session=None, **_: object):
        """``session``: an already open runtime session (the build's worker), instead of ``artifact``."""
        super().__init__()
        if session is not None:
            self.sess, self.runtime = session, session.runtime
        elif artifact:
            self.sess, self.runtime = open_artifact(Path(artifact), runtime, int(threads) if threads else None, int(n_ctx))
        else:
            raise ArtifactError("model_args: artifact=PATH is required (a .gguf, an ONNX folder, a checkpoint)")
        self.n_ctx = int(n_ctx)
        self.bos = int(bos) if bos is not None else self._default_bos()

    def _default_bos(self) -> int:
        llm = getattr(self.sess, "llm", None)
        if llm is not None and hasattr(llm, "token_bos"):
            b = int(llm.token_bos())
            return b if b >= 0 else 0
        tok = getattr(self.sess, "tokenizer", None) or getattr(self.sess, "tok", None)
        return int(tok.bos_token_id) if tok is not None and tok.bos_token_id is not None else 0

    @property
    def eot_token_id(self) -> int:
        return self.bos

    def tok_encode(self, text: str) -> list[int]:
        return list(self.sess.tokenize(text)) if text else []

    # lm-eval's three request types --------------------------------------------------------------------------------
    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        ids = [self.bos, *ctx, *cont]
        if len(ids) > self.n_ctx:  # keep the continuation whole, drop the oldest context
            ids = ids[len(ids) - self.n_ctx:]
        logits = np.asarray(self.sess.logits(ids), dtype=np.float32)
        n = len(cont)
        return _continuation_score(logits[len(ids) - n - 1: len(ids) - 1], ids[len(ids) - n:])

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm-eval's convention: whitespace moves from the end of the context to the continuation
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation, context = context[-n_space:] + continuation, context[:-n_space]
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, (whole[len(ctx):] if whole[: len(ctx)] == ctx else self.tok_encode(continuation))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Requests sharing a context (a multiple-choice document) share one prefill where the runtime can keep its
        KV cache (``continuation_logits``: llama.cpp, torch); otherwise each is scored on its own."""
        pairs = [self._split(*req.args) for req in requests]
        batched = getattr(self.sess, "score_continuations", None)
        if batched is not None:  # the runtime scores whole batches itself (vLLM: prompt log-probs)
            seqs = [[self.bos, *ctx, *cont][-self.n_ctx:] for ctx, cont in pairs]
            return batched([(ids, len(cont)) for ids, (_, cont) in zip(seqs, pairs, strict=True)])
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        shared = getattr(self.sess, "continuation_logits", None)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if shared is not None and 1 + len(ctx) + len(cont) <= self.n_ctx:
                groups.setdefault(tuple(ctx), []).append(i)
            else:
                out[i] = self._score(ctx, cont)
        for ctx, idx in groups.items():
            conts = [pairs[i][1] for i in idx]
            for i, cont, logits in zip(idx, conts, shared([self.bos, *ctx], conts), strict=True):
                out[i] = _continuation_score(logits, cont)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = self.tok_encode(req.args[0])
            total, step = 0.0, self.n_ctx - 1
            for start in range(0, len(ids), step):
                window = ids[start: start + step]
                ctx = ids[max(0, start - (self.n_ctx - 1 - len(window))): start]  # as much left context as fits
                total += self._score(ctx[-(self.n_ctx - 1 - len(window)):] if ctx else [], window)[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        batched = getattr(self.sess, "generate_until", None)
        if batched is not None:  # one batch per set of generation settings (a task's requests share theirs)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
            texts: list[str] = [""] * len(requests)
            for idx in groups.values():
                kw = requests[idx[0]].args[1]
                until = kw.get("until") or []
                max_new = int(kw.get("max_gen_toks", 64))
                prompts = [[self.bos, *self.tok_encode(requests[i].args[0])][-(self.n_ctx - max_new):] for i in idx]
                for i, text in zip(idx, batched(prompts, [until] if isinstance(until, str) else list(until), max_new),
                                   strict=True):
                    texts[i] = text
            return texts
        out = []
        for req in requests:
            context, kw = req.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 64))
            ids = [self.bos, *self.tok_encode(context)]
            ids = ids[max(0, len(ids) - (self.n_ctx - max_new)):]
            toks: list[int] = []
            text = ""
            for t in self.sess.stream(ids, max_new):
                toks.append(t)
                text = self.sess.detokenize(toks)
                if any(s in text for s in until):
                    break
            cut = [text.index(s) for s in until if s in text]
            out.append(text[: min(cut)] if cut else text)
        return out

    def get_model_info(self) -> dict:
        return {"quantprism_runtime": self.runtime, "quantprism_kernel": getattr(self.sess, "kernel", None)}
