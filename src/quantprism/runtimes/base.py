"""The runtime contract: a typed Session protocol, ONE greedy decode loop, and the Runtime entry that opens one.

Runtimes only load artifacts and run them (they import no exporter). A session reports ``runtime``, ``kernel``
("native", or e.g. "emulated-wna16" when a kernel is missing and emulated — then it is no speed figure) and
``threads``. Step-driven runtimes (llama.cpp, ONNX Runtime, torch) implement ``_prefill`` / ``_decode`` and
inherit ``timed_generate`` from ``GreedySession``; vLLM drives its own scheduler and implements it directly.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    runtime: str
    kernel: str
    threads: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Teacher-forced logits [T, V] of every position of ``ids``."""
        ...

    def timed_generate(self, ids: list[int], max_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], float, list[float]]:
        """Greedy tokens, seconds to the first token, seconds per later token."""
        ...

    def generate(self, ids: list[int], max_tokens: int) -> list[int]: ...

    def stream(self, ids: list[int], max_tokens: int, sampling: Sampling = ...) -> Iterator[int]:
        """Generated tokens one at a time (EOS ends it, not yielded), drawn by ``sampling``."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from a logits row: temperature 0 = greedy (argmax, as every check uses);
    otherwise softmax(logits / temperature) restricted to the top-p nucleus, from a generator seeded by ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def picker(self):
        if self.temperature <= 0.0:
            return lambda row: int(np.argmax(row))
        rng = np.random.default_rng(self.seed)

        def pick(row: np.ndarray) -> int:
            z = row.astype(np.float64) / self.temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            if self.top_p < 1.0:
                order = np.argsort(-p, kind="stable")
                keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
                q = np.zeros_like(p)
                q[keep] = p[keep]
                p = q / q.sum()
            return int(rng.choice(p.size, p=p))

        return pick


GREEDY = Sampling()


class GreedySession:
    """The one greedy loop. Subclasses give ``_prefill(ids) -> last logits row`` (resetting any state) and
    ``_decode(token) -> next logits row``, and ``eos`` (a set of token ids)."""

    eos: set[int]

    def _prefill(self, ids: list[int], max_new: int) -> np.ndarray:
        """Reset, run ``ids`` (room for ``max_new`` more positions), return the last position's logits."""
        raise NotImplementedError

    def _decode(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def timed_generate(self, ids: list[int], max_tokens: int, stop_at_eos: bool = True) -> tuple[list[int], float, list[float]]:
        """``stream``, greedy, timed: seconds to the first token (prefill), then seconds per later token (decode)."""
        t0 = last = time.perf_counter()
        ttft: float | None = None
        out: list[int] = []
        per_token: list[float] = []
        for tok in self.stream(ids, max_tokens, stop_at_eos=stop_at_eos):
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            else:
                per_token.append(now - last)
            last = now
            out.append(tok)
        return out, (time.perf_counter() - t0) if ttft is None else ttft, per_token

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        return self.timed_generate(ids, max_tokens)[0]

    def stream(self, ids: list[int], max_tokens: int, sampling: Sampling = GREEDY, rows: list | None = None,
               stop_at_eos: bool = True) -> Iterator[int]:
        """The loop: tokens one at a time, drawn by ``sampling``; EOS ends it (not yielded) unless ``stop_at_eos`` is
        False. ``rows``: if given, each yielded token's logits row is appended (a shadow compare's baseline)."""
        pick = sampling.picker()
        row = self._prefill([int(i) for i in ids], max_tokens)
        tok = pick(row)
        n = 0
        while n < max_tokens and not (stop_at_eos and tok in self.eos):
            if rows is not None:
                rows.append(np.asarray(row, dtype=np.float32))
            yield tok
            n += 1
            if n == max_tokens:
                return
            row = self._decode(tok)
            tok = pick(row)


class HFTokenizerSession:
    """Sessions whose artifact directory (``root``) carries the HF tokenizer files (ONNX Runtime, GenAI)."""

    root: Path
    eos: set[int]
    _tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            from ..errors import ArtifactError

            try:
                self._tok = AutoTokenizer.from_pretrained(str(self.root), local_files_only=True)
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{self.root}: no usable tokenizer files next to the model "
                                    f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
            if not self.eos and self._tok.eos_token_id is not None:
                self.eos = {int(self._tok.eos_token_id)}
        return self._tok

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


@dataclass(frozen=True)
class Runtime:
    """A registry entry: how to open an artifact in this runtime."""

    name: str
    label: str  # human name
    module: str  # the adapter module, imported on open
    packages: tuple[str, ...] = ()  # distributions recorded in results.json

    def open(self, artifact: Path, threads: int | None = None, n_ctx: int = 1024, options: dict | None = None) -> Session:
        """``options``: adapter-specific keywords (the torch reference's ``dtype``)."""
        import importlib

        return importlib.import_module(self.module).open_runtime_session(Path(artifact), threads, n_ctx, **(options or {}))


def import_probe(module: str, dist: str, install: str) -> tuple[bool, str]:
    """(importable, "dist version" or why not and how to install): the ``available()`` of an adapter."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        importlib.import_module(module)
    except ImportError as e:
        return False, f"{dist} is not installed ({e}); run `{install}`"
    try:
        return True, f"{dist} {version(dist)}"
    except PackageNotFoundError:
        return True, dist

