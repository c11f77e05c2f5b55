"""Arguments every quality benchmark shares, so each runs unchanged on any local model; the dev split that every
"best of" choice is made on (never the evaluation text); content keys for cached benchmark artifacts."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np


def quality_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--model", default=None, help="local HF model directory (default: bundled)")
    ap.add_argument("--calibration", default=None, help="calibration .txt/.jsonl/dir (default: bundled)")
    ap.add_argument("--eval-text", default=None, help="held-out text (default: bundled)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--eval-chunks", type=int, default=64, help="512-token chunks of the eval text to score")
    ap.add_argument("--dev-chunks", type=int, default=32,
                    help="dev split: chunks of the calibration text NOT used as calibration windows, on which every "
                         "'best of' choice is made (never on the eval text)")
    ap.add_argument("--dev-text", default=None,
                    help="separate dev text instead (when the calibration text has no unused chunks)")
    return ap


def dev_split(tokenizer, calib, source, seed: int, n_chunks: int, dev_text: str | None = None,
              also_exclude: tuple = ()) -> tuple[np.ndarray, dict]:
    """Dev chunks (int64 [n, seq_len], BOS first, the eval chunks' framing) disjoint from the calibration windows.

    Default: the calibration stream is rebuilt exactly as ``build_calibration`` builds it, the windows it chose are
    re-derived from the same seed (and checked against ``calib.input_ids``), and ``n_chunks`` of the windows it did
    NOT choose, evenly spread over the text, become the dev split. ``also_exclude``: further calibration sets drawn
    from the same text (other sample counts) whose windows are excluded too. ``dev_text``: chunks of that file instead.
    """
    from quantprism.calibration import read_documents

    seq_len = calib.input_ids.shape[1]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if dev_text:
        from quantprism.evaluate.compare import eval_token_chunks

        chunks = eval_token_chunks(tokenizer, Path(dev_text), seq_len, n_chunks)
        return chunks, {"source": str(dev_text), "chunks": int(len(chunks)), "chunk_tokens": seq_len,
                        "sha256": hashlib.sha256(chunks.tobytes()).hexdigest()}
    stream: list[int] = []
    for d in read_documents(source):
        stream += tokenizer.encode(d, add_special_tokens=False)
        if eos is not None:
            stream.append(eos)
    ids = np.asarray(stream, dtype=np.int64)
    body = seq_len - 1 if bos is not None else seq_len
    total = ids.size // body
    used_all = []
    for c in (calib, *also_exclude):
        samples = c.input_ids.shape[0]
        if c.input_ids.shape[1] != seq_len or total < samples + 4:
            raise SystemExit(f"calibration text has {total} windows of {seq_len} tokens for {samples} calibration samples: "
                             "too few left for a dev split; pass --dev-text FILE (text used neither for calibration nor eval)")
        used = np.sort(np.random.default_rng(seed).choice(total, size=samples, replace=False))
        rebuilt = np.stack([ids[s * body:(s + 1) * body] for s in used])
        if not np.array_equal(rebuilt, c.input_ids[:, -body:]):
            raise SystemExit("dev split: could not re-derive the calibration windows (build_calibration changed?)")
        used_all.append(used)
    unused = np.setdiff1d(np.arange(total), np.concatenate(used_all))
    if unused.size < 4:
        raise SystemExit("dev split: fewer than 4 calibration windows left unused; pass --dev-text FILE")
    pick = unused[np.unique(np.linspace(0, unused.size - 1, min(n_chunks, unused.size)).round().astype(int))]
    chunks = np.stack([ids[i * body:(i + 1) * body] for i in pick])
    if bos is not None:
        chunks = np.concatenate([np.full((len(pick), 1), bos, dtype=np.int64), chunks], axis=1)
    return chunks, {"source": "calibration text: windows not selected as calibration windows (disjoint from them "
                              "and from the eval text)", "chunks": int(len(pick)), "chunk_tokens": seq_len,
                    "unused_windows_available": int(unused.size), "window_indices": [int(i) for i in pick],
                    "sha256": hashlib.sha256(chunks.tobytes()).hexdigest()}


def settings_key(**inputs) -> str:
    """Short content key of a cached artifact's inputs (model sha256, settings, tool versions …)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions(*dists: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    return out
