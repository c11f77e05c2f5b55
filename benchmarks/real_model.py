"""Quality per byte on a real pretrained model: ours against llm-compressor, AutoRound, llama.cpp+imatrix and ORT.

    python benchmarks/real_model.py --out benchmarks/results/real_model.json [--model DIR] \
        [--parts w4,gguf,onnx,time] [--grids int4_g64_sym_fp16,int4_g64_asym_fp16,int4_g128_sym_fp16] [--threads 1] \
        [--peer-cache DIR] [--work DIR]

The model defaults to SmolLM2-135M-Instruct built by scripts/real_model.py (built here when missing). Each part
runs the benchmark that owns its comparison, on that model, in a child process, and its JSON is kept whole under
``parts``; the summary rows put every method and format side by side (KLD, top-1, bytes, seconds, peak RSS):
- w4: benchmarks/peers.py once per W4 grid (same calibration ids, same evaluator, peers' settings chosen on dev);
  a grid whose groups do not tile the model's linears (g128 on 576-wide inputs) is recorded as not applicable;
- gguf: benchmarks/gguf_vs_llamacpp.py for Q4_K_M and Q5_K_M, all scored in llama.cpp;
- onnx: benchmarks/onnx_vs_ort.py (INT8 and INT4, ours vs every ORT quantizer setting on the same graph);
- time: `quantprism quantize` (the whole canonical pass) for the repository's default targets.toml on the model, with
  ``group_size = "auto"`` where 128 does not tile its 576-wide rows, cold cache, wall time and peak RSS of the child;
  once as shipped and once with ``refit = true, tune = 1`` on every target (the setting the W4 rows use).
  AutoRound's wall time and peak RSS come from its W4 job in the w4 part (run beside it on the other core).
Goals (issue 16): W4 ≤ 0.9× the best peer; GGUF ≤ 0.75× llama.cpp+imatrix; ONNX ≤ 0.8× the best ORT setting;
the canonical pass ≤ 0.25× AutoRound's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRIDS = ("int4_g64_sym_fp16", "int4_g64_asym_fp16", "int4_g128_sym_fp16")


def child(cmd: list[str], log: Path) -> dict:
    """Run one part; its wall time and peak RSS (the child's own, from wait4)."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "log": str(log)}


def grid_tiles(model_dir: Path, gid: str) -> tuple[bool, str]:
    from quantprism.model import load_model_info
    from quantprism.quantize.grids import grid_from_id

    info = load_model_info(model_dir)
    g = grid_from_id(gid)
    widths = sorted({t.shape[-1] for t in info.tensors.values() if t.name.startswith("model.layers.")
                     and t.name.endswith("proj.weight")})
    bad = [k for k in widths if k % g.group_size]
    return (not bad, f"input widths {widths}: {bad} not a multiple of {g.group_size}" if bad else "")


def w4_rows(name: str, r: dict) -> list[dict]:
    rows = []
    for row in r.get("rows", []):
        if row.get("ours"):
            o = row["ours"]
            rows.append({"part": name, "who": "quantprism", "method": row["method"], "kld": o["kld"], "top1": o["top1"],
                         "seconds": o["seconds"]})
        p = row.get("peer")
        if p and "kld" in p:
            rows.append({"part": name, "who": p.get("name") or row["same_method_peer"], "method": p["setting"],
                         "kld": p["kld"], "top1": p["top1"], "seconds": p["seconds"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--parts", default="w4,gguf,onnx,time")
    ap.add_argument("--grids", default=",".join(GRIDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-cache", type=Path, default=HERE / ".work" / "peer-cache")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "real_model")
    ap.add_argument("--peers-args", default="", help="extra arguments for peers.py (e.g. --autoround-iters 200,1000)")
    ap.add_argument("--gguf-args", default="--tune 1 --tune-round",
                    help="extra arguments for gguf_vs_llamacpp.py (ours' tuning: block-wise over each layer's mix)")
    ap.add_argument("--time-variants", default="shipped,tuned",
                    help="time part: the default targets as shipped and/or with tune = 2, tune_round = true on every target")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: assemble the parts' JSON files already under --work (parts run separately)")
    args = ap.parse_args()
    py = sys.executable
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        from real_model import DEFAULT_OUT, RECORD_NAME

        model = DEFAULT_OUT
        if not (model / RECORD_NAME).is_file():
            subprocess.run([py, str(ROOT / "scripts" / "real_model.py"), "--out", str(model)], check=True)
    args.work.mkdir(parents=True, exist_ok=True)
    record_file = model / "quantprism-real-model.json"
    res: dict = {"model": str(model), "model_record": json.loads(record_file.read_text()) if record_file.is_file() else None,
                 "threads": args.threads, "parts": {}, "runs": {}}
    prev = json.loads(args.out.read_text()) if args.out.is_file() else {}
    res["parts"].update(prev.get("parts", {}))
    res["runs"].update(prev.get("runs", {}))
    parts = [p for p in args.parts.split(",") if p]
    if args.collect:
        for f in sorted(args.work.glob("*.json")):
            if f.stem.endswith(".prev"):  # an earlier result a later run reused (--reuse-ours); the later one is the part
                continue
            key = (f"w4:{f.stem.removeprefix('peers-')}" if f.stem.startswith("peers-")
                   else f"time:{f.stem.removeprefix('time-')}" if f.stem.startswith("time-") else f.stem)
            res["parts"][key] = json.loads(f.read_text())
            res["runs"].setdefault(key, {"log": str(f.with_suffix(".log")), "collected": True})
        for gid in args.grids.split(","):
            ok, why = grid_tiles(model, gid)
            if not ok:
                res["parts"][f"w4:{gid}"] = {"not_applicable": why}
        parts = []
    th = ["--threads", str(args.threads)]
    if "w4" in parts:
        for gid in args.grids.split(","):
            ok, why = grid_tiles(model, gid)
            key = f"w4:{gid}"
            if not ok:
                res["parts"][key] = {"not_applicable": why}
                continue
            out = args.work / f"peers-{gid}.json"
            res["runs"][key] = child([py, str(HERE / "peers.py"), "--model", str(model), "--grid", gid, *th,
                                      "--peer-cache", str(args.peer_cache), "--out", str(out),
                                      *args.peers_args.split()], args.work / f"peers-{gid}.log")
            if out.is_file():
                res["parts"][key] = json.loads(out.read_text())
    if "gguf" in parts:
        out = args.work / "gguf.json"
        res["runs"]["gguf"] = child([py, str(HERE / "gguf_vs_llamacpp.py"), "--model", str(model), *th,
                                     "--file-types", "Q4_K_M,Q5_K_M", "--eval-chunks", "16", "--autoround-iters", "0",
                                     "--work", str(args.work / "gguf"), "--cache-dir", str(args.work / "gguf-cache"),
                                     "--out", str(out), *args.gguf_args.split()],
                                    args.work / "gguf.log")
        if out.is_file():
            res["parts"]["gguf"] = json.loads(out.read_text())
    if "time" in parts:
        for variant in args.time_variants.split(","):
            extra = {"shipped": "", "tuned": "tune = 2\ntune_round = true\n"}[variant]
            res["parts"][f"time:{variant}"] = canonical_time(model, args.work / f"time-{variant}", extra, args.threads)
            (args.work / f"time-{variant}.json").write_text(json.dumps(res["parts"][f"time:{variant}"], indent=1) + "\n")
            print(f"canonical pass ({variant}): {res['parts'][f'time:{variant}']}", flush=True)
    if "onnx" in parts:
        out = args.work / "onnx.json"
        res["runs"]["onnx"] = child([py, str(HERE / "onnx_vs_ort.py"), "--model", str(model), *th,
                                     # block 64: at 32 this model's Q4_1 origin makes asymmetric 4-bit lossless;
                                     # ORT's GPTQ is its RTN here (ort_gptq_check) at ~an hour of Hessians
                                     "--block", "64", "--skip-rows", "ort_nbits4_gptq",
                                     "--ours-settings", '[{"symmetric": true, "tune": 2, "tune_round": true}]',
                                     "--work", str(args.work / "onnx"), "--out", str(out)], args.work / "onnx.log")
        if out.is_file():
            res["parts"]["onnx"] = json.loads(out.read_text())
    res["summary"] = summarise(res["parts"])
    res["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))


def canonical_time(model: Path, work: Path, extra: str, threads: int) -> dict:
    """Wall time and peak RSS of `quantprism quantize` for the default targets on ``model``, cold cache."""
    import re
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = (ROOT / "targets.toml").read_text()
    text = re.sub(r"(?m)^group_size = 128\b", 'group_size = "auto"', text)  # 576-wide rows: 64 (llama.cpp falls back too)
    if extra:
        text = re.sub(r"(?m)^(\[target\.[^.\]]+\])$", lambda m: m.group(1) + "\n" + extra.rstrip(), text)
    (work / "targets.toml").write_text(text)
    cmd = [str(Path(sys.executable).parent / "quantprism"), "quantize", "--targets", str(work / "targets.toml"),
           "--model", str(model), "--cache-dir", str(work / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # torch reads it at start: the pass runs on `threads` cores
    t0 = time.time()
    with open(work / "quantize.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    out = {"cmd": " ".join(cmd), "rc": os.waitstatus_to_exitcode(status), "seconds": round(time.time() - t0, 1),
           "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "targets": str(work / "targets.toml"), "threads": threads,
           "log": str(work / "quantize.log")}
    for info in (work / "cache").glob("*/canonical.json"):  # what the pass chose per layer (α, ratios), kept
        shutil.copy(info, work / f"canonical-{info.parent.name}.json")
    shutil.rmtree(work / "cache", ignore_errors=True)
    return out


def summarise(parts: dict) -> dict:
    s: dict = {}
    for key, r in parts.items():
        if key.startswith("w4:") and "rows" in r:
            best = r.get("best_peer") or {}
            s[key] = {"ours_best": r.get("ours_best"), "best_peer": best,
                      "ratio_ours_over_best_peer": best.get("ours_best_over_best_peer"), "goal": 0.9,
                      "rows": w4_rows(key, r)}
        elif key.startswith("w4:"):
            s[key] = r
    # more of our own W4 variants run later (peers.py --peers '' --reuse-ours), held against the part's best peer
    for key in sorted(k for k in parts if k.startswith("w4more-")):
        best = (parts.get(f"w4:{key.removeprefix('w4more-')}") or {}).get("best_peer") or {}
        s[key.replace("-", "_")] = {
            m: {"kld": o["kld"], "dev_kld": o.get("dev_kld"), "top1": o["top1"], "seconds": o["seconds"],
                "ratio_vs_best_peer": o["kld"] / best["kld"] if best.get("kld") else None, "best_peer": best.get("peer")}
            for m, o in parts[key].get("ours", {}).items() if m != "rtn"}
        v = s[key.replace("-", "_")]
        if v and all(o["dev_kld"] is not None for o in v.values()):  # chosen on the dev split, as peers.py chooses
            m = min(v, key=lambda n: v[n]["dev_kld"])
            v["best_by_dev"] = {"method": m, "kld": v[m]["kld"], "ratio_vs_best_peer": v[m]["ratio_vs_best_peer"],
                                "goal": 0.9}
    # peers run on their own (AWQ on 32 windows, AutoRound, …) before a w4 part assembled them: their rows as measured
    for key in sorted(k for k in parts if k.startswith(("llmc-", "autoround-")) and "rows" in parts[k]):
        s[key.replace("-", "_")] = [r for r in w4_rows(key, parts[key]) if r["who"] != "quantprism"]
    g = parts.get("gguf")
    if g:
        s["gguf"] = {ft: {k: v for k, v in g[ft].items() if k != "details"} for ft in ("Q4_K_M", "Q5_K_M") if ft in g}
        s["gguf"]["autoround_runs"] = g.get("autoround_runs")
        s["gguf"]["seconds"] = g.get("seconds")
        s["gguf"]["tune"] = {"tune": g.get("tune"), "tune_round": g.get("tune_round")}
    # variants: without tuning, Q5_K_M tuned on its own chain, SmoothQuant with a searched α (gguf-sq-auto), …
    for key in sorted(k for k in parts if k.startswith("gguf-")):
        u = parts[key]
        s[key.replace("-", "_")] = {ft: {k: v for k, v in u[ft].items() if k != "details"}
                                    for ft in ("Q4_K_M", "Q5_K_M") if ft in u}
        s[key.replace("-", "_")].update({k: u.get(k) for k in ("method", "smoothquant_alpha", "smoothquant_inputs", "seconds", "machine")
                                         if k in u})
    x = parts.get("experiments")  # technique experiments (which won, which lost), same evaluator as peers.py
    if x:
        s["techniques_w4_g64_sym"] = [{"variant": r["variant"], "kld": r["kld"], "top1": r["top1"], "ppl_ratio": r["ppl_ratio"],
                                       "seconds": r["secs"]} for r in x["rows"]]
    t = {k.split(":", 1)[1]: v for k, v in parts.items() if k.startswith("time:")}
    # the w4 parts first: they are the assembled results (a stand-alone AutoRound run's file may predate fields)
    ar = [j["peer"] for _, r in sorted(parts.items(), key=lambda kv: not kv[0].startswith("w4:"))
          if isinstance(r, dict) for j in r.get("rows", [])
          if isinstance(j, dict) and j.get("method") == "autoround (SignRound)" and (j.get("peer") or {}).get("seconds")]
    if t:
        s["time"] = dict(t)
        if ar:
            peer = ar[0]
            s["time"]["autoround_one_format"] = {"seconds": peer["seconds"], "peak_rss_mb_worker_so_far": peer.get("peak_rss_mb_so_far"),
                                                 "setting": peer.get("setting")}
            s["time"]["ratios"] = {k: v["seconds"] / peer["seconds"] for k, v in t.items() if v.get("rc") == 0}
            s["time"]["goal"] = 0.25
    o = parts.get("onnx")
    if o:
        s["onnx"] = {"goals": o.get("goals"), "int8": o.get("int8"), "int4": o.get("int4")}
    for key in sorted(k for k in parts if k.startswith("onnx-")):  # e.g. onnx-int8-sq: INT8 with SmoothQuant "auto"
        o = parts[key]
        rows = o.get("rows", {})
        s[key.replace("-", "_")] = {"goals": o.get("goals"), "best_ort_int8": o.get("best_ort_int8"),
                                    "ours_nbits8": {k: rows.get("ours_nbits8", {}).get(k) for k in
                                                    ("settings", "kld", "top1", "bytes", "dev_kld", "candidates")},
                                    "machine": o.get("machine"), "versions": o.get("versions"), "seconds": o.get("seconds")}
    return s


if __name__ == "__main__":
    main()
