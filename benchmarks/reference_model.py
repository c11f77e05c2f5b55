"""Held-out perplexity of the bundled reference model next to a unigram baseline.

    python benchmarks/reference_model.py --out benchmarks/results/reference_model.json

The unigram model is fit on the same training documents the model saw (scripts/corpus.py) with
add-one smoothing; both are scored on the same tokens of the held-out evaluation text.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--eval-text", default=None)
    ap.add_argument("--n-ctx", type=int, default=512)
    args = ap.parse_args()
    import torch

    from quantprism.calibration import eval_text_path
    from quantprism.evaluate.perplexity import eval_chunks, torch_nll
    from quantprism.model import load_model_info, load_tokenizer, load_torch_model

    torch.set_num_threads(2)
    t0 = time.time()
    info = load_model_info(args.model)
    tok = load_tokenizer(info)
    text = eval_text_path(args.eval_text).read_text(encoding="utf-8")
    chunks = eval_chunks(tok.encode(text, add_special_tokens=False), args.n_ctx, tok.bos_token_id)
    nll = torch_nll(load_torch_model(info), chunks)
    targets = chunks[:, 1:].reshape(-1)

    from corpus import split

    counts = np.ones(len(tok), dtype=np.float64)  # add-one smoothing
    for _, doc in split()[0]:
        np.add.at(counts, tok.encode(doc, add_special_tokens=False), 1)
    logp = np.log(counts / counts.sum())
    unigram_nll = -logp[targets]
    res = {
        "model": str(info.path), "eval_tokens": int(targets.size), "n_ctx": args.n_ctx,
        "heldout_ppl": round(math.exp(float(nll.mean())), 3),
        "unigram_ppl": round(math.exp(float(unigram_nll.mean())), 3),
        "heldout_nll": round(float(nll.mean()), 4), "unigram_nll": round(float(unigram_nll.mean()), 4),
        "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
