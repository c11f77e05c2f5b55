"""Quality of the canonical stage's methods: KLD against the original model on held-out text.

    python benchmarks/canonical_quality.py --out benchmarks/results/canonical_quality.json \
        [--model DIR] [--calibration FILE] [--eval-text FILE] [--synthetic-1b]

Decoder linears are quantized (lm_head and embeddings stay fp) so methods are compared on the
same tensors. Baselines run on fp inputs (as llama.cpp's imatrix tool and textbook GPTQ do);
our GPTQ/AWQ runs are sequential (layer i calibrates on quantized layers < i).
KLD/top-1 use llama-perplexity's definitions (src/quantprism/evaluate/kld.py).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quality_parser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = quality_parser(__doc__.split("\n")[0])
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--synthetic-1b", action="store_true", help="also time the pass on a synthetic ~1B Llama")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from quantprism.calibration import eval_text_path
    from quantprism.evaluate.canonical import Evaluator, canonical_overrides, decoder_only
    from quantprism.model import load_model_info
    from quantprism.pipeline import run_stage
    from quantprism.quantize.stage import Recipe

    torch.set_num_threads(2)
    t_all = time.time()
    info = load_model_info(args.model)
    ev = Evaluator(info, eval_text_path(args.eval_text), max_chunks=args.eval_chunks)
    gs_table = [(g, s) for g in (32, 64, 128) for s in (True, False)]

    def gid(g: int, sym: bool) -> str:
        return f"int4_g{g}_{'sym' if sym else 'asym'}_fp16"

    int_grids = tuple(gid(g, s) for g, s in gs_table)
    kw = dict(calibration=args.calibration, samples=args.samples, seq_len=args.seq_len, seed=0, cache_dir=args.cache_dir)

    # Baselines on fp inputs: plain RTN (no clip search), llama.cpp's Q4_K with imatrix, textbook GPTQ.
    rtn = Recipe(grids=int_grids, method="rtn", clip=False)
    rtn_q4k = Recipe(grids=("q4_k_imat",), method="rtn", clip=False)
    textbook = Recipe(grids=(gid(128, True),), method="gptq", clip=False, damp=0.01, act_order=False)
    t0 = time.time()
    base_run = run_stage(info, [textbook, rtn, rtn_q4k], sequential=False, **kw)
    t_base = time.time() - t0

    # Ours: sequential GPTQ (static-group act-order) with clipping search over every grid; AWQ+GPTQ;
    # GPTQ on the Q4_K grid.
    gptq = Recipe(grids=int_grids + ("q4_k_imat",), method="gptq", clip=True, damp=args.damp)
    awq = Recipe(grids=(gid(128, True),), transform="awq", method="gptq", clip=True, damp=args.damp,
                 awq_grid=gid(128, True))
    t0 = time.time()
    rss0 = peak_rss_mb()
    ours = run_stage(info, [gptq, awq], sequential=True, **kw)
    t_ours = time.time() - t0
    hits = ours.cache_hits

    def kld(res, grid: str) -> dict:
        s = ev.evaluate(canonical_overrides(res, decoder_only(grid)))
        return {"kld": s["kld_mean"], "kld_unc": s["kld_mean_unc"], "kld_p99": s["kld_p99"],
                "top1": s["top1_agreement"], "ppl_ratio": s["ppl_ratio"], "n_tokens": s["n_tokens"]}

    tb, r_rtn, r_q4k = base_run.results
    g_res, a_res = ours.results
    table = {}
    for g, s in gs_table:
        name = f"w4g{g}_{'sym' if s else 'asym'}"
        table[name] = {"rtn": kld(r_rtn, gid(g, s)), "gptq": kld(g_res, gid(g, s))}
        table[name]["gptq_over_rtn"] = table[name]["gptq"]["kld"] / table[name]["rtn"]["kld"]
    res = {
        "model": str(info.path), "calibration": ours.calibration.record(),
        "eval_tokens": table["w4g128_sym"]["rtn"]["n_tokens"],
        "rtn_w4g128_kld": table["w4g128_sym"]["rtn"]["kld"],
        "gptq_textbook_w4g128_kld": kld(tb, gid(128, True))["kld"],
        "gptq_w4g128_kld": table["w4g128_sym"]["gptq"]["kld"],
        "awq_gptq_w4g128_kld": kld(a_res, gid(128, True))["kld"],
        "q4k_rtn_imatrix_kld": kld(r_q4k, "q4_k_imat")["kld"],
        "q4k_gptq_imatrix_kld": kld(g_res, "q4_k_imat")["kld"],
        "table": table,
        "settings": {"damp": args.damp, "sequential": True, "clip_search": True, "act_order": "static groups",
                     "samples": args.samples,
                     "seq_len": args.seq_len},
        "seconds": round(t_ours, 1), "seconds_baselines": round(t_base, 1), "cache_hit": all(hits),
        "peak_rss_mb": round(max(rss0, peak_rss_mb()), 1),
        "awq": [{k: v for k, v in layer.items() if k.startswith("awq")} for layer in a_res.info.get("layers", [])],
    }
    res["ratios"] = {
        "gptq_over_rtn": res["gptq_w4g128_kld"] / res["rtn_w4g128_kld"],
        "textbook_gptq_over_rtn": res["gptq_textbook_w4g128_kld"] / res["rtn_w4g128_kld"],
        "awq_gptq_over_gptq": res["awq_gptq_w4g128_kld"] / res["gptq_w4g128_kld"],
        "q4k_gptq_over_q4k_rtn": res["q4k_gptq_imatrix_kld"] / res["q4k_rtn_imatrix_kld"],
    }
    res["goals"] = {
        "gptq <= 0.45 x rtn": res["ratios"]["gptq_over_rtn"] <= 0.45,
        "awq_gptq <= gptq": res["ratios"]["awq_gptq_over_gptq"] <= 1.0,
        "q4k_gptq <= 0.75 x q4k_rtn": res["ratios"]["q4k_gptq_over_q4k_rtn"] <= 0.75,
    }
    if args.synthetic_1b:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from synthetic import time_synthetic_pass

        res["synthetic_1b"] = time_synthetic_pass()
    res["total_seconds"] = round(time.time() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("table", "awq")}, indent=2))


if __name__ == "__main__":
    main()
