"""A synthetic ~1B-parameter Llama-shaped model (random weights, built locally) for speed/memory figures.

    python benchmarks/synthetic.py --out benchmarks/results/synthetic_1b.json [--samples 32 --seq-len 512]

The canonical pass runs in a child process so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
             num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=2048)


def build_model(layers: int | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # transformers' own init: N(0, 0.02) weights, unit norms
    cfg = LlamaConfig(**{**SHAPE, **({"num_hidden_layers": layers} if layers else {})}, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def child(samples: int, seq_len: int, layers: int | None) -> dict:
    import numpy as np
    import torch

    from quantprism.quantize.stage import Recipe, StageSettings, run_canonical

    torch.set_num_threads(2)
    t0 = time.time()
    model = build_model(layers)
    n_params = sum(p.numel() for p in model.parameters())
    t_build = time.time() - t0
    ids = np.random.default_rng(0).integers(2, SHAPE["vocab_size"], (samples, seq_len))
    counter: dict = {}
    t0 = time.time()
    run_canonical(model, ids, StageSettings([Recipe(grids=("int4_g128_sym_fp16",))]), counter=counter)
    return {
        "params": n_params, "layers": model.config.num_hidden_layers, "shape": SHAPE,
        "calibration": {"samples": samples, "seq_len": seq_len, "tokens": samples * seq_len},
        "recipe": "GPTQ int4 g128 sym, sequential, static-group act-order, clip search", "build_seconds": round(t_build, 1),
        "seconds": round(time.time() - t0, 1), "layer_forwards": counter.get("layer_forwards"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }


def time_synthetic_pass(samples: int = 32, seq_len: int = 512, layers: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--samples", str(samples), "--seq-len", str(seq_len)]
    if layers:
        cmd += ["--layers", str(layers)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (default: 20 → ~1.1B)")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.samples, args.seq_len, args.layers)))
        return
    res = time_synthetic_pass(args.samples, args.seq_len, args.layers)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
