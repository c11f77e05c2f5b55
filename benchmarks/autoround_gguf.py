"""AutoRound's own GGUF export, run inside the peers virtualenv (never imported by quantprism).

    python autoround_gguf.py SPEC.json

SPEC.json: {"model": DIR, "calibration": CALIB.safetensors (input_ids), "file_type": "Q4_K_M", "iters": 0,
            "threads": 1, "out": FILE.gguf, "record": FILE.json}

AutoRound quantizes the fp32 model with its ``gguf:<type>`` scheme on the exact calibration token ids quantprism
used (its imatrix / "optimized RTN" and, with iters > 0, SignRound tuning read them) and writes the file with its
own GGUF converter; benchmarks/gguf_vs_llamacpp.py scores that file in llama.cpp beside ours. AutoRound's README
recommends ``--iters 0`` (optimized RTN) for GGUF at every bit width but 3. The GGUF lands at ``out`` by rename;
the record (seconds, peak RSS, settings, versions) is written last.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import versions  # noqa: E402

SEED = 42  # AutoRound's default seed, passed explicitly


def main() -> None:
    spec = json.load(open(sys.argv[1], encoding="utf-8"))
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(0)
    ids = load_file(spec["calibration"])["input_ids"].long()
    fmt = "gguf:" + spec["file_type"].lower()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    loader = torch.utils.data.DataLoader([{"input_ids": r} for r in ids], batch_size=8, shuffle=False)
    kw = dict(scheme=fmt, iters=int(spec["iters"]), nsamples=int(ids.shape[0]), seqlen=int(ids.shape[1]), batch_size=8,
              dataset=loader, device_map="cpu", seed=SEED)
    out = Path(spec["out"])
    with tempfile.TemporaryDirectory(dir=out.parent) as td:
        ar = AutoRound(model, tok, **kw)
        ar.quantize_and_save(td, format=fmt)
        found = sorted(Path(td).rglob("*.gguf"))
        if len(found) != 1:
            raise SystemExit(f"AutoRound wrote {len(found)} GGUF files, expected 1: {found}")
        os.replace(found[0], out)
    rec = {"peer": "autoround", "format": fmt, "settings": {k: v for k, v in kw.items() if k != "dataset"},
           "seconds": round(time.time() - t0, 1), "calibration_windows": int(ids.shape[0]),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "bytes": out.stat().st_size, "versions": versions("auto-round", "gguf", "torch", "transformers")}
    tmp = spec["record"] + ".tmp"
    Path(tmp).write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, spec["record"])


if __name__ == "__main__":
    main()
