"""Calibration sets: in-domain text → a fixed, hashed batch of token windows.

Sources: "builtin" (the bundled calibration text), a .txt file, a .jsonl file whose lines carry a
"text" field, or a directory of .txt files (sorted by name). Documents are joined with the
tokenizer's EOS, windows of ``seq_len`` tokens are drawn with a seeded generator (non-overlapping
when the text is long enough), and each window starts with BOS — the same framing the evaluation
uses, so calibration sees what deployment sees. The sha256 over the token ids identifies the set
in every cache key and manifest.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_CALIBRATION = ASSETS / "calibration.txt"
BUILTIN_EVAL = ASSETS / "eval_heldout.txt"
RECOMMENDED_SAMPLES = (128, 512)


@dataclass(frozen=True)
class CalibrationSet:
    input_ids: np.ndarray  # int64 [samples, seq_len]
    sha256: str
    source: str
    n_source_tokens: int
    seed: int
    overlapping: bool

    @property
    def samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def record(self) -> dict[str, Any]:
        """What manifests store about the set."""
        return {
            "source": self.source, "sha256": self.sha256, "samples": self.samples, "seq_len": self.seq_len,
            "seed": self.seed, "source_tokens": self.n_source_tokens, "overlapping": self.overlapping,
        }


def resolve_source(source: str | Path | None) -> Path:
    if source is None or str(source) in ("", "builtin"):
        return BUILTIN_CALIBRATION
    return Path(source).expanduser()


MAX_SOURCE_BYTES = 1 << 30  # calibration needs 128–512 windows; a bigger source is a mistake, not data


def check_source(source: str | Path | None) -> Path:
    """The calibration source exists, is readable, is a kind the readers take and is within the size bound (before
    any work: `quantprism targets`, and every read)."""
    return _checked(source)[0]


def _checked(source: str | Path | None) -> tuple[Path, list[Path]]:
    """check_source's path and the files it reads (a directory's .txt files in a fixed order, else the file)."""
    import os

    path = resolve_source(source)
    if not path.exists():
        raise CalibrationError(f"{path}: no such calibration source; pass a .txt, .jsonl or a directory of .txt")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CalibrationError(f"{path}: directory has no .txt files")
    elif path.suffix not in (".txt", ".md", ".jsonl", "") and path != BUILTIN_CALIBRATION:
        raise CalibrationError(f"{path}: unsupported calibration file type '{path.suffix}'; use .txt or .jsonl")
    elif not path.is_file():
        raise CalibrationError(f"{path}: not a regular file")
    else:
        files = [path]
    if not os.access(path, os.R_OK):
        raise CalibrationError(f"{path}: not readable (permissions)")
    total = sum(f.stat().st_size for f in files)
    if total > MAX_SOURCE_BYTES:
        raise CalibrationError(f"{path}: calibration source is {total / 2**30:.1f} GiB, over the 1 GiB bound; pass a "
                               "sample of in-domain text (128–512 windows need a few MB)")
    return path, files


def read_documents(source: str | Path | None) -> list[str]:
    """The calibration documents of a source, in a fixed order."""
    path, files = _checked(source)
    if path.suffix == ".jsonl" and not path.is_dir():
        docs = []
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise CalibrationError(f"{path}:{lineno}: not valid JSON; each line must be an object with a \"text\" field") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CalibrationError(f"{path}:{lineno}: missing string field \"text\"")
            docs.append(obj["text"])
    else:
        docs = [_read_text(f) for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"{path}: calibration source is empty")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not UTF-8 text") from None


def token_ids_sha256(ids: np.ndarray) -> str:
    arr = np.ascontiguousarray(ids, dtype="<i4")
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def build_calibration(
    tokenizer: Any,
    source: str | Path | None = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    max_positions: int | None = None,
    warn: bool = True,
) -> CalibrationSet:
    if samples < 1:
        raise CalibrationError(f"samples must be ≥ 1, got {samples}")
    if seq_len < 8:
        raise CalibrationError(f"seq_len must be ≥ 8, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise CalibrationError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    docs = read_documents(source)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream += tokenizer.encode(d, add_special_tokens=False)
        if eos is not None:
            stream.append(eos)
    body = seq_len - 1 if bos is not None else seq_len
    ids = np.asarray(stream, dtype=np.int64)
    if ids.size < body:
        raise CalibrationError(
            f"{resolve_source(source)}: only {ids.size} tokens, fewer than seq_len {seq_len}; add text or lower seq_len"
        )
    rng = np.random.default_rng(seed)
    n_chunks = ids.size // body
    overlapping = n_chunks < samples
    if overlapping:
        starts = np.sort(rng.integers(0, ids.size - body + 1, size=samples))
        if warn:
            print(
                f"warning: calibration has {ids.size} tokens < samples×seq_len = {samples * body}; windows overlap",
                file=sys.stderr,
            )
    else:
        starts = np.sort(rng.choice(n_chunks, size=samples, replace=False)) * body
    windows = np.stack([ids[s : s + body] for s in starts])
    if bos is not None:
        windows = np.concatenate([np.full((samples, 1), bos, dtype=np.int64), windows], axis=1)
    if warn and not RECOMMENDED_SAMPLES[0] <= samples <= RECOMMENDED_SAMPLES[1]:
        print(
            f"warning: {samples} calibration samples is outside the recommended 128–512", file=sys.stderr
        )
    src = "builtin" if resolve_source(source) == BUILTIN_CALIBRATION else str(resolve_source(source))
    return CalibrationSet(windows, token_ids_sha256(windows), src, int(ids.size), seed, bool(overlapping))


def eval_text_path(path: str | Path | None) -> Path:
    if path is None or str(path) in ("", "builtin"):
        return BUILTIN_EVAL
    p = Path(path).expanduser()
    if not p.is_file():
        raise CalibrationError(f"{p}: no such evaluation text file")
    return p
