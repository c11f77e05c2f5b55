"""vLLM latency through our adapter (in-process engine): the original bf16 checkpoint and our W8A8 export.

    python benchmarks/vllm_latency.py --out benchmarks/results/vllm_latency.json

Both run natively on this AVX2 CPU (W8A8: CPUInt8ScaledMMLinearKernel). 4-bit checkpoints run here only
through the emulated wna16 op, which is a correctness device, so they are excluded from speed figures.
Each checkpoint runs in its own child process (peak RSS is its own); same metrics as the other runtimes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(path: Path, threads: int, prompt_len: int, decode: int, repeats: int, dtype: str) -> dict:
    from bandwidth import measure_artifact

    from quantprism.calibration import BUILTIN_EVAL
    from quantprism.runtimes.vllm import open_session

    text = BUILTIN_EVAL.read_text(encoding="utf-8")[:20000]
    return measure_artifact(lambda: open_session(path, max_model_len=prompt_len + decode + 16, threads=threads, dtype=dtype), text, prompt_len, decode, repeats)

def w8a8_artifact(work: Path) -> Path:
    from quantprism.config import Target
    from quantprism.exporters.vllm import export_vllm
    from quantprism.model import load_model_info
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(None)
    t = Target(name="w8a8", format="compressed-tensors", runtime="vllm", quant="W8A8", group_size=-1,
               method="smoothquant+gptq", hardware="cpu-avx2")  # ±63 weights: no int16 saturation without VNNI
    recipes, index = plan_recipes([t])
    run = run_stage(info, recipes, None, 128, 512, 0)
    return export_vllm(t, info, run.results[index[t.name]], work / "bundled-w8a8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (required)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "vllm")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.prompt, args.decode, args.repeats, args.dtype)))
        return
    if args.out is None:
        ap.error("--out is required")
    from quantprism.model import BUILTIN_MODEL

    arts = {"bf16 (original)": BUILTIN_MODEL, "W8A8 (ours, SmoothQuant+GPTQ)": w8a8_artifact(args.work)}
    rows = []
    for name, path in arts.items():
        cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(args.threads), "--prompt",
               str(args.prompt), "--decode", str(args.decode), "--repeats", str(args.repeats), "--dtype", args.dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"latency child failed on {path}: {proc.stderr.strip().splitlines()[-3:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"model": "bundled", "checkpoint": name, "path": str(path), "dtype": args.dtype, **r})
        print(f"{name:32s} {r['kernel']:8s} TTFT {r['ttft_ms_p50']:8.1f} ms  prefill {r['prefill_tok_s']:8.1f} tok/s  "
              f"decode p50 {r['decode_tok_s_p50']:7.1f} p95 {r['decode_tok_s_p95']:7.1f} tok/s  RSS {r['peak_rss_mb']:7.0f} MB",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
