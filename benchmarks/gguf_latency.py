"""GGUF latency in llama.cpp through our runtime adapter: F16, Q8_0, Q4_K_M of the bundled model and of a
synthetic ~1B-parameter Llama, with decode speed against the memory-bandwidth bound of this machine.

    python benchmarks/gguf_latency.py --out benchmarks/results/gguf_latency.json [--no-synthetic]

Each artifact runs in its own child process (so peak RSS is its own). Bundled-model artifacts are our
exports (canonical GPTQ codes); the 1B model has random weights (benchmarks/synthetic.py's shape), its
F16 GGUF is written by our writer and its Q8_0/Q4_K_M by llama.cpp's quantizer from that F16 —
per-tensor types, hence kernels and bytes read, are the same as our exports'; a canonical pass on the 1B
model is timed separately in benchmarks/synthetic.py. bound_tok_s = READ bandwidth / bytes read per token
(all weights + the KV cache at the mean decode position; a decode step only reads them), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
FILE_TYPES = ("F16", "Q8_0", "Q4_K_M")


def child(path: Path, threads: int, prompt_len: int, decode: int, repeats: int) -> dict:
    from bandwidth import measure_artifact

    from quantprism.calibration import BUILTIN_EVAL
    from quantprism.runtimes.llamacpp import open_session

    text = BUILTIN_EVAL.read_text(encoding="utf-8")[:20000]
    return measure_artifact(lambda: open_session(path, n_ctx=prompt_len + decode + 8, threads=threads, logits_all=False), text, prompt_len, decode, repeats)

def bundled_artifacts(work: Path) -> dict[str, Path]:
    from quantprism.config import Target
    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import load_model_info
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(None)
    targets = [Target(name=ft, format="gguf", runtime="llamacpp", quant=ft, method="gptq") for ft in ("Q8_0", "Q4_K_M")]
    recipes, index = plan_recipes(targets)
    run = run_stage(info, recipes, None, 128, 512, 0)
    out = {"F16": write_gguf(work / "bundled-F16.gguf", info, None, "F16")}
    for t in targets:
        out[t.quant] = write_gguf(work / f"bundled-{t.quant}.gguf", info, run.results[index[t.name]], t.quant)
    return out


def synthetic_artifacts(work: Path, threads: int) -> dict[str, Path]:
    import torch
    from llamacpp_quantize import quantize

    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import BUILTIN_MODEL, load_model_info

    from synthetic import build_model

    hf = work / "synthetic-1b"
    if not (hf / "model.safetensors").is_file() and not (hf / "model.safetensors.index.json").is_file():
        model = build_model()
        model.config.bos_token_id, model.config.eos_token_id = 0, 1
        model.to(torch.bfloat16).save_pretrained(hf, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(BUILTIN_MODEL / f, hf / f)
        del model
    out = {"F16": work / "synthetic-F16.gguf"}
    if not out["F16"].is_file():
        info = load_model_info(hf)
        write_gguf(out["F16"], info, None, "F16")
    for ft in ("Q8_0", "Q4_K_M"):
        out[ft] = work / f"synthetic-{ft}.gguf"
        if not out[ft].is_file():
            quantize(out["F16"], out[ft], ft, None, threads)
    return out


def gguf_facts(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))

    def val(key):
        f = r.fields[key]
        return int(f.parts[-1][0])

    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_layer, n_kv = val(f"{arch}.block_count"), val(f"{arch}.attention.head_count_kv")
    head_dim = val(f"{arch}.embedding_length") // val(f"{arch}.attention.head_count")
    return {"tensor_bytes": {t.name: int(t.n_bytes) for t in r.tensors},
            "kv_bytes_per_position": 2 * n_layer * n_kv * head_dim * 2,  # K and V, F16 cache
            "n_params": int(sum(int(t.n_elements) for t in r.tensors))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (required)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=32, help="decoded tokens per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-synthetic", action="store_true", help="skip the ~1B model")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "latency")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.prompt, args.decode, args.repeats)))
        return
    if args.out is None:
        ap.error("--out is required")

    from bandwidth import decode_bound_tok_s, decode_bytes_per_token, memory_bandwidth

    args.work.mkdir(parents=True, exist_ok=True)
    sets = {"bundled": bundled_artifacts(args.work)}
    if not args.no_synthetic:
        sets["synthetic-1b"] = synthetic_artifacts(args.work, args.threads)
    bw = memory_bandwidth(args.threads)
    rows = []
    for model, arts in sets.items():
        for ft in FILE_TYPES:
            path = arts[ft]
            cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(args.threads),
                   "--prompt", str(args.prompt), "--decode", str(args.decode), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"latency child failed on {path}: {proc.stderr.strip().splitlines()[-1:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            facts = gguf_facts(path)
            mean_pos = r["prompt_tokens"] + r["decode_tokens"] / 2
            per_tok = decode_bytes_per_token(facts["tensor_bytes"], facts["kv_bytes_per_position"], int(mean_pos))
            bound = decode_bound_tok_s(bw, per_tok)  # read bandwidth: a decode step reads, it does not copy
            rows.append({"model": model, "file_type": ft, "path": str(path), "file_bytes": path.stat().st_size,
                         "n_params": facts["n_params"], "bytes_read_per_token": per_tok,
                         "bound_tok_s": round(bound, 2), "fraction_of_bound": round(r["decode_tok_s_p50"] / bound, 3),
                         "quantizer": "quantprism" if model == "bundled" or ft == "F16" else "llama.cpp", **r})
            print(f"{model:13s} {ft:7s} TTFT {r['ttft_ms_p50']:8.1f} ms  prefill {r['prefill_tok_s']:8.1f} tok/s  "
                  f"decode p50 {r['decode_tok_s_p50']:7.1f} p95 {r['decode_tok_s_p95']:7.1f} tok/s  "
                  f"bound {bound:7.1f}  RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    out = {"memory_bandwidth": bw, "bound_bandwidth": "read_gb_s", "threads": args.threads, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
