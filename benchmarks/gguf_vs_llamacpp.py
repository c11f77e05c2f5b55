"""Our GGUF k-quants against llama.cpp's own quantizer, all measured in llama.cpp on the same text.

    python benchmarks/gguf_vs_llamacpp.py --out benchmarks/results/gguf_vs_llamacpp.json \
        [--model DIR] [--calibration FILE] [--eval-text FILE] [--method gptq]

For every GGUF file type we write (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0, Q4_0, IQ4_XS; --file-types to
pick): ours = the canonical stage's codes (GPTQ by default, imatrix-weighted grids, llama.cpp's per-tensor types
and shape fallbacks) packed by our writer; llamacpp = llama_model_quantize from our F16 GGUF without an imatrix;
llamacpp_imatrix = the same with the importance matrix llama-imatrix would compute (mean x² per input
channel of the ORIGINAL model on the same calibration set), passed via params.imatrix. The base of
every KLD is the F16 GGUF's logits in llama.cpp (llama-perplexity --kl-divergence-base semantics);
its own distance from the torch original is reported as f16_vs_original.
autoround = AutoRound's own GGUF export (``--format gguf:q4_k_m`` …) on the same calibration ids, run in the peers
virtualenv by benchmarks/autoround_gguf.py at each ``--autoround-iters`` (default 0: the optimized-RTN mode its
README recommends for GGUF; 200 = its SignRound default, hours per file on one core); each file is kept under
``--work`` with its record and reused while model, calibration ids, settings and peer pins are unchanged.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quality_parser, settings_key, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FILE_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS")
GOAL_TYPES = ("Q4_K_M", "Q5_K_M")  # ≤ 0.75× llama.cpp+imatrix and ≤ 0.9× AutoRound's GGUF at equal size (issue 16)


def main() -> None:
    ap = quality_parser(__doc__.split("\n")[0])
    ap.set_defaults(eval_chunks=0)
    ap.add_argument("--method", default="gptq", help="canonical method for ours (see targets.toml 'method')")
    ap.add_argument("--smoothquant-alpha", type=lambda v: v if v == "auto" else float(v), default="auto",
                    help="ours, smoothquant methods: migration strength, or \"auto\" (searched per layer)")
    ap.add_argument("--smoothquant-inputs", default="",
                    help="ours, smoothquant methods: comma-separated linears whose inputs are scaled (targets.toml "
                         "'smoothquant_inputs', e.g. down_proj); default every foldable input")
    ap.add_argument("--tune", type=int, default=0, help="ours: epochs of block-wise tuning (targets.toml 'tune')")
    ap.add_argument("--tune-round", action="store_true", help="ours: the tuning learns the rounding too ('tune_round')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "gguf", help="where the GGUFs go")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--file-types", default=",".join(FILE_TYPES), help="comma-separated GGUF file types")
    ap.add_argument("--autoround-iters", default="0",
                    help="AutoRound GGUF exports to compare, one per iteration count (comma-separated; '' = none)")
    args = ap.parse_args()
    file_types = tuple(args.file_types.split(","))

    import torch
    from llamacpp_quantize import gguf_imatrix, quantize

    from quantprism.calibration import eval_text_path
    from quantprism.config import Target, smoothquant_input_groups
    from quantprism.evaluate.compare import base_logprobs, compare, eval_token_chunks, torch_logits_fn
    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import load_model_info, load_tokenizer, load_torch_model
    from quantprism.pipeline import plan_recipes, run_stage
    from quantprism.quantize.stats import fp_imatrix
    from quantprism.runtimes.llamacpp import open_session

    torch.set_num_threads(args.threads)
    secs: dict[str, float] = {}
    t0 = time.time()
    info = load_model_info(args.model)
    targets = [Target(name=f"ours-{ft}", format="gguf", runtime="llamacpp", quant=ft, method=args.method,
                      smoothquant_alpha=args.smoothquant_alpha, tune=args.tune,
                      smoothquant_inputs=smoothquant_input_groups("--smoothquant-inputs", args.smoothquant_inputs.split(","))
                      if args.smoothquant_inputs else (), tune_round=args.tune_round) for ft in file_types]
    recipes, index = plan_recipes(targets, info)
    import logging

    from quantprism import progress as pbar

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with pbar.reporting(pbar.LogReporter()):  # one line per layer group: a real model's pass takes many minutes
        run = run_stage(info, recipes, args.calibration, args.samples, args.seq_len, 0, cache_dir=args.cache_dir)
    secs["canonical_stage"] = round(time.time() - t0, 1)
    model = load_torch_model(info)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    imat = cached_imatrix(model, info, run.calibration.input_ids, args.work, fp_imatrix)
    secs["fp_imatrix"] = round(time.time() - t0, 1)

    t0 = time.time()
    f16 = write_gguf(args.work / "f16.gguf", info, None, "F16")
    files: dict[str, dict[str, Path]] = {}
    for t in targets:
        ft = t.quant
        res = run.results[index[t.name]]
        prov = {"calibration": run.calibration.record()}
        files[ft] = {"ours": write_gguf(args.work / f"ours-{ft}.gguf", info, res, ft, provenance=prov)}
    secs["write_ours"] = round(time.time() - t0, 1)
    t0 = time.time()
    for ft in file_types:
        files[ft]["llamacpp"] = quantize(f16, args.work / f"llamacpp-{ft}.gguf", ft, None, args.threads)
        files[ft]["llamacpp_imatrix"] = quantize(f16, args.work / f"llamacpp-imatrix-{ft}.gguf", ft,
                                                 gguf_imatrix(imat), args.threads)
    secs["llamacpp_quantize"] = round(time.time() - t0, 1)
    peer_records: dict[str, dict] = {}
    for it in [int(i) for i in args.autoround_iters.split(",") if i]:
        for ft in file_types:
            path, rec = autoround_gguf(info, run.calibration.input_ids, ft, it, args.threads, args.work)
            files[ft][f"autoround_i{it}"] = path
            peer_records[f"{ft}/autoround_i{it}"] = rec

    t0 = time.time()
    chunks = eval_token_chunks(load_tokenizer(info), eval_text_path(args.eval_text), 512, args.eval_chunks or None)
    original = base_logprobs(chunks, torch_logits_fn(model))
    sess = open_session(f16, n_ctx=512, threads=args.threads)
    try:
        base = base_logprobs(chunks, sess.logits)
        f16_vs_original, _ = compare(chunks, original, sess.logits)
    finally:
        sess.close()

    def measure(path: Path) -> dict:
        logging.info("scoring %s in llama.cpp", path.name)
        s = open_session(path, n_ctx=512, threads=args.threads)
        try:
            summary, _ = compare(chunks, base, s.logits)
        finally:
            s.close()
        return summary

    from quantprism.hardware import detect

    machine = detect()
    out: dict = {
        "model": str(info.path), "calibration": run.calibration.record(), "method": args.method,
        "smoothquant_alpha": args.smoothquant_alpha if args.method.startswith("smoothquant") else None,
        "smoothquant_inputs": args.smoothquant_inputs or None,
        "tune": args.tune, "tune_round": args.tune_round,
        "eval_tokens_scored": int(f16_vs_original["n_tokens"]), "threads": args.threads,
        "f16_vs_original": {k: f16_vs_original[k] for k in ("kld_mean", "top1_agreement", "ppl_ratio")},
        "f16_bytes": f16.stat().st_size, "llama_cpp_python": versions("llama_cpp_python")["llama_cpp_python"],
        "autoround_runs": peer_records,
        "machine": {"label": machine.label, "cpu": machine.cpu},  # llama.cpp's int8 activation kernels differ by ISA
    }
    for ft in file_types:
        m = {k: measure(p) for k, p in files[ft].items()}
        size = {k: p.stat().st_size for k, p in files[ft].items()}
        r = {
            "ours_kld": m["ours"]["kld_mean"], "llamacpp_kld": m["llamacpp"]["kld_mean"],
            "llamacpp_imatrix_kld": m["llamacpp_imatrix"]["kld_mean"],
            "ours_bytes": size["ours"], "llamacpp_bytes": size["llamacpp"], "llamacpp_imatrix_bytes": size["llamacpp_imatrix"],
            "ours_top1": m["ours"]["top1_agreement"], "llamacpp_top1": m["llamacpp"]["top1_agreement"],
            "llamacpp_imatrix_top1": m["llamacpp_imatrix"]["top1_agreement"],
        }
        r["kld_ratio_vs_llamacpp_imatrix"] = r["ours_kld"] / r["llamacpp_imatrix_kld"]
        r["size_ratio_vs_llamacpp"] = r["ours_bytes"] / r["llamacpp_imatrix_bytes"]
        for k in (k for k in m if k.startswith("autoround")):
            r[f"{k}_kld"], r[f"{k}_bytes"] = m[k]["kld_mean"], size[k]
            r[f"{k}_top1"] = m[k]["top1_agreement"]
            r[f"kld_ratio_vs_{k}"] = r["ours_kld"] / m[k]["kld_mean"]
        if ft in GOAL_TYPES:
            ar = [r[k] for k in r if k.startswith("kld_ratio_vs_autoround")]
            r["goal_met"] = bool(r["kld_ratio_vs_llamacpp_imatrix"] <= 0.75 and abs(r["size_ratio_vs_llamacpp"] - 1) <= 0.02
                                 and all(x <= 0.9 for x in ar))
        r["details"] = {k: {s: v[s] for s in ("kld_mean", "kld_p99", "top1_agreement", "ppl", "ppl_ratio")}
                        for k, v in m.items()}
        out[ft] = r
    secs["evaluate_in_llamacpp"] = round(time.time() - t0, 1)
    out["seconds"] = secs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for ft in file_types:
        r = out[ft]
        goal = "" if "goal_met" not in r else f" — goal {'met' if r['goal_met'] else 'MISSED'}"
        print(f"{ft}: ours {r['ours_kld']:.6f} ({r['ours_bytes']} B) vs llama.cpp {r['llamacpp_kld']:.6f}, "
              f"+imatrix {r['llamacpp_imatrix_kld']:.6f} ({r['llamacpp_imatrix_bytes']} B): "
              f"{r['kld_ratio_vs_llamacpp_imatrix']:.3f}×"
              + "".join(f", {k[13:]} {v:.3f}×" for k, v in r.items() if k.startswith("kld_ratio_vs_autoround")) + goal)


def cached_imatrix(model, info, ids, work: Path, compute) -> dict:
    """llama-imatrix's statistic of the original model on the calibration ids (minutes on a real model), kept in
    ``work`` as safetensors keyed by model and ids."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    key = settings_key(model=info.weights_sha256, ids=hashlib.sha256(ids.tobytes()).hexdigest(), what="fp_imatrix")
    path = work / f"fp-imatrix-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    imat = compute(model, ids)
    tmp = path.with_suffix(".tmp")
    save_file({k: torch.as_tensor(v).contiguous() for k, v in imat.items()}, str(tmp))
    tmp.replace(path)
    return imat


def autoround_gguf(info, ids, file_type: str, iters: int, threads: int, work: Path) -> tuple[Path, dict]:
    """AutoRound's GGUF of ``file_type`` from the same calibration ids (benchmarks/autoround_gguf.py in the peers
    venv); reused from ``work`` while its inputs are unchanged."""
    import hashlib
    import subprocess
    import tempfile

    from peers import PEERS, PEERS_GGUF, ensure_venv
    from safetensors.numpy import save_file

    key = settings_key(model=info.weights_sha256, ids=hashlib.sha256(ids.tobytes()).hexdigest(), file_type=file_type,
                       iters=iters, threads=threads, pins=PEERS + PEERS_GGUF)
    out, record = work / f"autoround-i{iters}-{file_type}-{key}.gguf", work / f"autoround-i{iters}-{file_type}-{key}.json"
    if out.is_file() and record.is_file():
        return out, dict(json.loads(record.read_text()), from_cache=True)
    py = ensure_venv(gguf=True)
    with tempfile.TemporaryDirectory() as td:
        cal = Path(td) / "calib.safetensors"
        save_file({"input_ids": ids.astype("int64")}, str(cal))
        spec = Path(td) / "spec.json"
        spec.write_text(json.dumps({"model": str(info.path), "calibration": str(cal), "file_type": file_type, "iters": iters,
                                    "threads": threads, "out": str(out.resolve()), "record": str(record.resolve())}))
        r = subprocess.run([str(py), str(Path(__file__).resolve().parent / "autoround_gguf.py"), str(spec)], cwd=td)
    if r.returncode != 0 or not record.is_file():
        raise SystemExit(f"AutoRound GGUF export {file_type} iters={iters} failed (exit {r.returncode})")
    return out, json.loads(record.read_text())


if __name__ == "__main__":
    main()
