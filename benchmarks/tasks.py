"""The bundled tasks on the original and on damaged models: does the suite see quantization damage?

    python benchmarks/tasks.py --out benchmarks/results/tasks.json [--limit N]

Models: the original (torch) and, for GPTQ and for RTN at 4, 3 and 2 bits (group 32 asymmetric, and RTN 3/2 bits at
group 128 symmetric — the harsh layout), the canonical
model — the original with every decoder linear replaced by its dequantized grid, exactly as a runtime computes it —
saved as an fp32 HF folder and run through the same `quantprism` lm-eval backend in torch (no runtime here runs
3- or 2-bit codes). Per task: the metric, its standard error, the paired difference to the original with a 95 %
bootstrap interval over documents (2,000 resamples), and answer agreement with the original.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import versions  # noqa: E402

TASKS = ["qp_continuation", "qp_code", "qp_long_recall", "qp_rare", "qp_structure"]
# (method, bits, group, symmetric): the harsh standard layout (g128 sym) besides the gentle one (g32 asym)
VARIANTS = {"gptq-w4": ("gptq", 4, 32, False), "rtn-w4": ("rtn", 4, 32, False), "rtn-w3": ("rtn", 3, 32, False),
            "rtn-w2": ("rtn", 2, 32, False), "rtn-w3-g128-sym": ("rtn", 3, 128, True),
            "rtn-w2-g128-sym": ("rtn", 2, 128, True)}


def canonical_folder(info, method: str, bits: int, work: Path, group: int = 32, sym: bool = False) -> Path:
    """The canonical model of a W{bits} target as an fp32 HF folder (built once, cached under --work)."""
    import torch
    from safetensors.torch import save_file

    from quantprism.config import Target
    from quantprism.exporters import FORMATS
    from quantprism.exporters.state import canonical_weights
    from quantprism.pipeline.plan import plan_recipes, run_stage

    out = work / (f"{method}-w{bits}" + ("" if (group, sym) == (32, False) else f"-g{group}-{'sym' if sym else 'asym'}"))
    if (out / "model.safetensors").is_file():
        return out
    t = Target(name=out.name, format="gptq", runtime="vllm", bits=bits, group_size=group, symmetric=sym, method=method)
    recipes, index = plan_recipes([t], info)
    run = run_stage(info, recipes, None, 128, 512, 0, cache_dir=work / "cache", device="cpu")
    res = run.results[index[t.name]]
    spec = FORMATS[t.format].spec(t, info, res, None, {})
    state = canonical_weights(info, res, spec.grid_id)
    tensors = {k: state[k].to(torch.float32).contiguous() for k in state}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in info.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, tmp / f.name)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def evaluate(folder: Path, limit: int | None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import quantprism.evaluate.lm_backend  # noqa: F401
    from quantprism.evaluate.tasks import answer

    r = lm_eval.simple_evaluate(model="quantprism", model_args=f"artifact={folder},threads=1", tasks=TASKS,
                                task_manager=TaskManager(include_path=str(ROOT / "src/quantprism/assets/tasks")),
                                limit=limit, log_samples=True)
    out = {}
    for task in TASKS:
        metric = "exact_match" if task == "qp_code" else "acc"
        samples = sorted(r["samples"][task], key=lambda s: s["doc_id"])
        out[task] = {"metric": metric, "value": float(r["results"][task][f"{metric},none"]),
                     "stderr": float(r["results"][task][f"{metric}_stderr,none"]),
                     "per_doc": [float(s[metric]) for s in samples],
                     "answers": [answer(s) for s in samples]}
    return out


def paired(base: dict, other: dict, rng: np.random.Generator, n_boot: int = 2000) -> dict:
    a, b = np.array(base["per_doc"]), np.array(other["per_doc"])
    d = b - a
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boot = d[idx].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    agree = float(np.mean([x == y for x, y in zip(base["answers"], other["answers"], strict=True)]))
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "agreement": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "tasks")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all 120)")
    args = ap.parse_args()
    from quantprism.model import load_model_info

    info = load_model_info(None)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {"original": evaluate(info.path, args.limit)}
    for name, (method, bits, group, sym) in VARIANTS.items():
        results[name] = evaluate(canonical_folder(info, method, bits, args.work, group, sym), args.limit)
    rng = np.random.default_rng(0)
    table = {}
    for name, res in results.items():
        table[name] = {}
        for task in TASKS:
            row = {k: res[task][k] for k in ("metric", "value", "stderr")}
            if name != "original":
                row.update(paired(results["original"][task], res[task], rng))
            table[name][task] = row
    doc = {"tasks": table, "documents": {t: len(results["original"][t]["per_doc"]) for t in TASKS},
           "seconds": round(time.perf_counter() - t0, 1), "versions": versions("lm_eval", "torch", "transformers"),
           "note": "canonical models (dequantized grids) in torch through the quantprism lm-eval backend"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for name, rows in table.items():
        print(name, " ".join(f"{t}={r['value']:.3f}" + (f"({r['diff']:+.3f} [{r['ci95'][0]:+.3f},{r['ci95'][1]:+.3f}])"
                                                        if "diff" in r else "") for t, r in rows.items()))


if __name__ == "__main__":
    main()
