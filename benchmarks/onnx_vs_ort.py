"""Our INT8/INT4 ONNX against ONNX Runtime's own quantizers and onnxruntime-genai's int4, measured in ORT.

    python benchmarks/onnx_vs_ort.py --out benchmarks/results/onnx_vs_ort.json \
        [--model DIR] [--calibration FILE] [--eval-text FILE] [--synthetic]

All int8 variants start from the SAME fp32 graph (our dynamo export): ours = the canonical GPTQ codes in
MatMulNBits 8-bit (block 32, accuracy_level 4); ort_dynamic = quantize_dynamic (MatMul only, its defaults:
QInt8 per-tensor weights, dynamic activations); ort_nbits8 = MatMulNBitsQuantizer 8-bit, block 32, symmetric,
accuracy_level 4 (round-to-nearest). lm_head stays fp32 everywhere. Int4: ours MatMulNBits 4-bit from the
canonical GPTQ codes vs onnxruntime-genai's builder `-p int4` (its own graph and round-to-nearest int4) and
MatMulNBitsQuantizer 4-bit on our graph. KLD/top-1 against the torch original (llama-perplexity definitions);
decode tok/s through our ORT adapter, 2 threads. ``--synthetic`` adds decode speed on a ~1B random-weight Llama
(ours there = canonical RTN codes from 2×64 calibration tokens: speed does not depend on code values).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quality_parser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def ort_quantize(fp32: Path, out_dir: Path, kind: str) -> Path:
    """ORT's own quantizers on our fp32 graph (lm_head excluded, as in ours)."""
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if (out_dir / "model.onnx").is_file():
        return out_dir / "model.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in fp32.parent.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            shutil.copy(f, out_dir / f.name)
    model = onnx.load(str(fp32))
    inits = {i.name for i in model.graph.initializer}
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i.startswith("lm_head") for i in n.input)]
    large = sum(i.ByteSize() for i in model.graph.initializer) > 1.8e9
    del inits
    if kind == "dynamic":
        quantize_dynamic(str(fp32), str(out_dir / "model.onnx"), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=head, use_external_data_format=large)
    else:
        bits = 8 if kind == "nbits8" else 4
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_exclude=head)
        q.process()
        q.model.save_model_to_file(str(out_dir / "model.onnx"), use_external_data_format=large)
    return out_dir / "model.onnx"


def genai_int4(model_dir: Path, out_dir: Path) -> Path:
    if not (out_dir / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
                        "-p", "int4", "-e", "cpu", "-c", str(out_dir / ".cache")], check=True, capture_output=True)
    return out_dir / "model.onnx"


def speed(path: Path, prompt: list[int], threads: int) -> dict:
    from quantprism.runtimes.latency import measure
    from quantprism.runtimes.onnxruntime import open_session

    s = open_session(path, threads=threads)
    try:
        r = measure(s, prompt, 32, 5)
    finally:
        s.close()
    return {k: r[k] for k in ("decode_tok_s_p50", "decode_tok_s_p95", "ttft_ms_p50", "prefill_tok_s")}


def main() -> None:
    ap = quality_parser(__doc__.split("\n")[0])
    ap.set_defaults(eval_chunks=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="gptq", help="canonical method for ours (gptq | smoothquant+gptq …)")
    ap.add_argument("--synthetic", action="store_true", help="also decode speed on a synthetic ~1B Llama")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "onnx")
    ap.add_argument("--ort-quantize", nargs=3, metavar=("KIND", "FP32", "OUT"), help=argparse.SUPPRESS)
    if "--ort-quantize" in sys.argv:  # child mode: one ORT quantizer in its own process (memory is its own)
        i = sys.argv.index("--ort-quantize")
        ort_quantize(Path(sys.argv[i + 2]), Path(sys.argv[i + 3]), sys.argv[i + 1])
        return
    args = ap.parse_args()

    import torch

    from quantprism.calibration import eval_text_path
    from quantprism.config import Target
    from quantprism.evaluate.compare import base_logprobs, compare, eval_token_chunks, torch_logits_fn
    from quantprism.exporters.onnx import export_onnx
    from quantprism.model import load_model_info, load_tokenizer, load_torch_model
    from quantprism.pipeline import plan_recipes, run_stage
    from quantprism.runtimes.onnxruntime import open_session

    torch.set_num_threads(args.threads)
    t_all = time.time()
    info = load_model_info(args.model)
    targets = {"nbits8": Target(name="ours8", format="onnx", runtime="onnxruntime", quant="nbits8", group_size=32,
                                 method=args.method),
               "nbits4": Target(name="ours4", format="onnx", runtime="onnxruntime", quant="nbits4", group_size=32,
                                method=args.method)}
    recipes, index = plan_recipes(list(targets.values()))
    run = run_stage(info, recipes, args.calibration, args.samples, args.seq_len, 0)
    w = args.work
    paths = {"fp32": export_onnx(None, info, None, w / "fp32") / "model.onnx"}
    for k, t in targets.items():
        dest = w / f"ours-{k}-{args.method}"
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        paths[f"ours_{k}"] = export_onnx(t, info, run.results[index[t.name]], dest) / "model.onnx"
    paths["ort_dynamic"] = ort_quantize(paths["fp32"], w / "ort-dynamic", "dynamic")
    paths["ort_nbits8"] = ort_quantize(paths["fp32"], w / "ort-nbits8", "nbits8")
    paths["ort_nbits4"] = ort_quantize(paths["fp32"], w / "ort-nbits4", "nbits4")
    paths["genai_int4"] = genai_int4(info.path, w / "genai-int4")

    chunks = eval_token_chunks(load_tokenizer(info), eval_text_path(args.eval_text), 512, args.eval_chunks)
    base = base_logprobs(chunks, torch_logits_fn(load_torch_model(info)))
    prompt = [int(i) for i in chunks[0][:128]]
    rows = {}
    for name, p in paths.items():
        s = open_session(p, threads=args.threads)
        try:
            q, _ = compare(chunks, base, s.logits)
        finally:
            s.close()
        rows[name] = {"kld": q["kld_mean"], "kld_p99": q["kld_p99"], "top1": q["top1_agreement"], "ppl_ratio": q["ppl_ratio"],
                      "bytes": sum(f.stat().st_size for f in p.parent.glob("model.onnx*")), **speed(p, prompt, args.threads)}
        print(f"{name:12s} KLD {q['kld_mean']:.3g} top-1 {q['top1_agreement']:.4f} decode {rows[name]['decode_tok_s_p50']:.1f} tok/s",
              flush=True)
    r = rows
    best_ort = min(r["ort_dynamic"]["kld"], r["ort_nbits8"]["kld"])
    out = {
        "model": str(info.path), "method": args.method, "calibration": run.calibration.record(), "eval_tokens_scored": int(q["n_tokens"]),
        "threads": args.threads, "rows": rows,
        "ours_kld": r["ours_nbits8"]["kld"], "ours_top1": r["ours_nbits8"]["top1"],
        "ort_dynamic_kld": r["ort_dynamic"]["kld"], "ort_nbits8_kld": r["ort_nbits8"]["kld"],
        "ours_decode_tok_s": r["ours_nbits8"]["decode_tok_s_p50"],
        "ort_dynamic_decode_tok_s": r["ort_dynamic"]["decode_tok_s_p50"],
        "ort_nbits8_decode_tok_s": r["ort_nbits8"]["decode_tok_s_p50"], "fp32_decode_tok_s": r["fp32"]["decode_tok_s_p50"],
        "goals": {
            "kld_vs_best_ort": r["ours_nbits8"]["kld"] / best_ort,
            "decode_vs_ort_nbits8": r["ours_nbits8"]["decode_tok_s_p50"] / r["ort_nbits8"]["decode_tok_s_p50"],
            "decode_vs_fp32": r["ours_nbits8"]["decode_tok_s_p50"] / r["fp32"]["decode_tok_s_p50"],
        },
        "int4": {"ours_kld": r["ours_nbits4"]["kld"], "genai_int4_kld": r["genai_int4"]["kld"],
                 "ort_nbits4_kld": r["ort_nbits4"]["kld"], "ours_decode_tok_s": r["ours_nbits4"]["decode_tok_s_p50"],
                 "genai_int4_decode_tok_s": r["genai_int4"]["decode_tok_s_p50"]},
    }
    if args.synthetic:
        out["synthetic_1b"] = synthetic_speed(w, args.threads)
    out["seconds"] = round(time.time() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["goals"]), json.dumps(out["int4"]))


def synthetic_speed(work: Path, threads: int) -> dict:
    """Decode tok/s on a ~1B random-weight Llama: fp32, ORT dynamic, ORT nbits8 and ours on the same graph."""
    from quantprism.config import Target
    from quantprism.exporters.onnx import export_onnx
    from quantprism.model import load_model_info
    from quantprism.pipeline import plan_recipes, run_stage

    hf = ROOT / "benchmarks" / ".work" / "latency" / "synthetic-1b"  # written by benchmarks/gguf_latency.py
    if not hf.is_dir():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from gguf_latency import synthetic_artifacts

        synthetic_artifacts(hf.parent, threads)
    info = load_model_info(hf)
    t = Target(name="ours8", format="onnx", runtime="onnxruntime", quant="nbits8", group_size=32, method="rtn")
    recipes, index = plan_recipes([t])
    run = run_stage(info, recipes, None, 2, 64, 0)
    paths = {}
    for key, tt, res, d in (("fp32", None, None, work / "syn-fp32"), ("ours_nbits8", t, run.results[index["ours8"]], work / "syn-ours8")):
        paths[key] = d / "model.onnx" if (d / "model.onnx").is_file() else export_onnx(tt, info, res, d) / "model.onnx"
    del run
    for kind in ("dynamic", "nbits8"):  # each ORT quantizer in its own process: a 4 GB graph, copied inside
        d = work / f"syn-ort-{kind}"
        if not (d / "model.onnx").is_file():
            subprocess.run([sys.executable, __file__, "--out", "-", "--ort-quantize", kind, str(paths["fp32"]), str(d)], check=True)
        paths[f"ort_{kind}"] = d / "model.onnx"
    prompt = list(range(10, 138))
    out = {}
    for k, p in paths.items():  # each session in its own process too
        code = (f"import json,sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from onnx_vs_ort import speed; "
                f"from pathlib import Path; print(json.dumps(speed(Path({str(p)!r}), {prompt!r}, {threads})))")
        r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        out[k] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"synthetic-1b {k:12s} decode {out[k]['decode_tok_s_p50']:.2f} tok/s", flush=True)
    return out


if __name__ == "__main__":
    main()
