"""The bundled tasks on the original and on damaged models: does the suite see quantization damage?

    python benchmarks/tasks.py --out benchmarks/results/tasks.json [--limit N]
    python benchmarks/tasks.py --model ~/.cache/quantprism/models/smollm2-135m-instruct \
        --variants rtn-w3-g64-sym rtn-w4-g64-sym gptq-w4-g64-sym --out benchmarks/results/tasks_real.json

Models: the original (torch) and, for GPTQ and for RTN at 4, 3 and 2 bits (group 32 asymmetric, and RTN 3/2 bits at
group 128 symmetric — the harsh layout), the canonical
model — the original with every decoder linear replaced by its dequantized grid, exactly as a runtime computes it —
saved as an fp32 HF folder and run through the same `quantprism` lm-eval backend in torch (no runtime here runs
3- or 2-bit codes). Per task: the metric, its standard error, the paired difference to the original with a 95 %
bootstrap interval over documents (evaluate/tasks.pair), and answer agreement with the original.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import versions  # noqa: E402

TASKS = ["qp_continuation", "qp_code", "qp_long_recall", "qp_rare", "qp_structure"]
# (method, bits, group, symmetric): the harsh standard layout (g128 sym) besides the gentle one (g32 asym)
VARIANTS = {"gptq-w4": ("gptq", 4, 32, False), "rtn-w4": ("rtn", 4, 32, False), "rtn-w3": ("rtn", 3, 32, False),
            "rtn-w2": ("rtn", 2, 32, False), "rtn-w3-g128-sym": ("rtn", 3, 128, True),
            "rtn-w2-g128-sym": ("rtn", 2, 128, True), "rtn-w2-g256-sym": ("rtn", 2, 256, True),
            # hidden 576 (the real model) is not a multiple of 128: its standard layout is g64
            "rtn-w3-g64-sym": ("rtn", 3, 64, True), "rtn-w4-g64-sym": ("rtn", 4, 64, True),
            "gptq-w4-g64-sym": ("gptq", 4, 64, True)}
DEFAULT_VARIANTS = ["gptq-w4", "rtn-w4", "rtn-w3", "rtn-w2", "rtn-w3-g128-sym", "rtn-w2-g128-sym", "rtn-w2-g256-sym"]


def canonical_folder(info, method: str, bits: int, work: Path, group: int = 32, sym: bool = False) -> Path:
    """The canonical model of a W{bits} target as an fp32 HF folder (built once, cached under --work)."""
    import torch
    from safetensors.torch import save_file

    from quantprism.config import Target
    from quantprism.exporters import FORMATS
    from quantprism.exporters.state import canonical_weights
    from quantprism.pipeline.plan import plan_recipes, run_stage

    out = work / info.path.name / (f"{method}-w{bits}" + ("" if (group, sym) == (32, False) else f"-g{group}-{'sym' if sym else 'asym'}"))
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


def evaluate(folder: Path, limit: int | None, bos: int, threads: int = 1) -> dict:
    """The bundled tasks on one model folder, in torch, through the build's own task runner."""
    from quantprism.evaluate.tasks import run_tasks
    from quantprism.runtimes import open_runtime

    sess = open_runtime("torch", folder, threads=threads)
    try:
        return run_tasks(sess, TASKS, bos, 1024, limit)
    finally:
        sess.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "tasks")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all 120)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="a local HF model folder (default: the bundled model)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    args = ap.parse_args()
    from quantprism.evaluate.tasks import pair
    from quantprism.model import load_model_info, load_tokenizer

    info = load_model_info(args.model)
    bos = load_tokenizer(info).bos_token_id or 0  # as the build's workers
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {"original": evaluate(info.path, args.limit, bos, args.threads)}
    for name in args.variants:
        method, bits, group, sym = VARIANTS[name]
        results[name] = evaluate(canonical_folder(info, method, bits, args.work, group, sym), args.limit, bos, args.threads)
    table = {}
    for name, res in results.items():
        table[name] = {}
        for task in TASKS:
            row = {k: res[task][k] for k in ("metric", "value", "stderr")}
            if name != "original":
                row.update(pair(results["original"][task], res[task]))
            table[name][task] = row
    doc = {"tasks": table, "documents": {t: results["original"][t]["n"] for t in TASKS},
           "seconds": round(time.perf_counter() - t0, 1), "versions": versions("lm_eval", "torch", "transformers"),
           "model": str(info.path), "note": "canonical models (dequantized grids) in torch through the quantprism lm-eval backend"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for name, rows in table.items():
        print(name, " ".join(f"{t}={r['value']:.3f}" + (f"({r['diff']:+.3f} [{r['ci95'][0]:+.3f},{r['ci95'][1]:+.3f}])"
                                                        if "diff" in r else "") for t, r in rows.items()))


if __name__ == "__main__":
    main()
