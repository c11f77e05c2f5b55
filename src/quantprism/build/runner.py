"""The build: targets → one canonical pass per recipe group → exports → per-target worker processes → results.

A target's failure (bad export, runtime error, runtime crash, timeout) marks that target failed; the others go
on. Exit code: 0 when every target passed all its gates, 1 otherwise (bad input raises before, exit 2).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Target
from ..manifest import file_table, write_json_atomic
from ..model import ModelInfo
from .results import SCHEMA, environment, evaluate_gates

SMOKE_PROMPT = "def read_config(path):\n"
WORKER_TIMEOUT_S = 1800


@dataclass
class BuildSettings:
    out: Path
    calibration: str | None
    samples: int
    seq_len: int
    seed: int
    eval_text: Path
    eval_chunks: int = 16
    n_ctx: int = 512
    threads: int = 2
    skip_bench: bool = False
    prompt_len: int = 128
    decode_tokens: int = 32
    repeats: int = 5
    log: Callable[[str], None] = print
    seconds: dict = field(default_factory=dict)


def export_target(t: Target, info: ModelInfo, res, plan: dict | None, dest: Path, fp_state: dict, prov: dict) -> Path:
    """Write one target's artifact under ``dest``; returns what its runtime opens."""
    if t.format == "gguf":
        from ..exporters.gguf import write_gguf

        return write_gguf(dest / "model.gguf", info, fp_state, res, t.quant, imatrix=t.imatrix, provenance=prov, plan=plan)
    if t.format in ("gptq", "awq", "compressed-tensors"):
        from ..exporters.vllm import export_vllm

        return export_vllm(t, info, res, dest / "checkpoint", plan)
    if t.format == "onnx":
        from ..exporters.onnx import export_onnx

        return export_onnx(t, info, res, dest / "onnx", plan) / "model.onnx"
    raise ValueError(t.format)


def base_logprobs_file(info: ModelInfo, s: BuildSettings, calibration_ids: np.ndarray, cache: Path) -> Path:
    """The original model's scored log-probs, chunks and slice masks, computed once per (model, text, framing)."""
    from ..evaluate.compare import base_logprobs, eval_token_chunks, torch_logits_fn
    from ..evaluate.slices import slice_masks
    from ..model import load_tokenizer, load_torch_model

    h = hashlib.sha256()
    for part in (info.weights_sha256, hashlib.sha256(s.eval_text.read_bytes()).hexdigest(), s.n_ctx, s.eval_chunks,
                 hashlib.sha256(np.ascontiguousarray(calibration_ids).tobytes()).hexdigest()):
        h.update(str(part).encode())
    path = cache / f"base-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        return path
    tok = load_tokenizer(info)
    chunks = eval_token_chunks(tok, s.eval_text, s.n_ctx, s.eval_chunks)
    base = base_logprobs(chunks, torch_logits_fn(load_torch_model(info)))
    masks = slice_masks(tok, s.eval_text, chunks, calibration_ids)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, scale=base.scale, min_log_prob=base.min_log_prob, q=base.q, next_tokens=base.next_tokens, chunks=chunks,
             **{f"mask_{k}": v for k, v in masks.items()})
    tmp.replace(path)
    return path


def run_worker(name: str, runtime: str, artifact: Path, base: Path, s: BuildSettings, bos: int, work: Path) -> dict:
    spec = {"name": name, "runtime": runtime, "artifact": str(artifact), "threads": s.threads, "n_ctx": s.n_ctx, "bos": bos,
            "smoke_prompt": SMOKE_PROMPT, "base": str(base), "skip_bench": s.skip_bench, "prompt_len": s.prompt_len,
            "decode_tokens": s.decode_tokens, "repeats": s.repeats, "out": str(work / "worker.json")}
    work.mkdir(parents=True, exist_ok=True)
    (work / "worker.json").unlink(missing_ok=True)
    spec_path = work / "worker-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "quantprism.build.worker", str(spec_path)], capture_output=True,
                              text=True, timeout=WORKER_TIMEOUT_S)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, f"timed out after {WORKER_TIMEOUT_S} s"
    (work / "worker.log").write_text(err or "")
    out = work / "worker.json"
    if out.is_file():
        res = json.loads(out.read_text())
    elif rc is None:
        res = {"status": "error", "error": err}
    else:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        tail = [ln for ln in (err or "").strip().splitlines() if ln.strip()][-1:]
        res = {"status": "error", "error": f"runtime process died ({why}){': ' + tail[0][:200] if tail else ''}"}
    res.setdefault("seconds", {})["wall"] = round(time.perf_counter() - t0, 2)
    return res


def _size(path: Path) -> tuple[dict, int]:
    root = path if path.is_dir() else path.parent
    files = file_table(root) if path.is_dir() or path.suffix == ".onnx" else {path.name: file_table(root)[path.name]}
    files = {k: v for k, v in files.items() if not k.startswith("worker")}
    return files, sum(f["bytes"] for f in files.values())


def finish_row(row: dict, gates: dict, skip_bench: bool) -> dict:
    if row.get("status") == "ok":
        row["gates"] = evaluate_gates(row, gates, skip_bench)
        row["passed"] = bool(row.get("smoke", {}).get("passed")) and all(g["passed"] is not False for g in row["gates"].values())
    else:
        row["gates"] = {k: {"limit": v, "value": None, "passed": False} for k, v in gates.items()}
        row["passed"] = False
    return row


def build(targets: list[Target], info: ModelInfo, s: BuildSettings, progress=None) -> dict:
    """Run the build and return the results document (also written to ``s.out/results.json``)."""
    from ..model import load_tokenizer, load_torch_model
    from ..pipeline import plan_recipes, run_stage, target_plan
    from ..quantize import store

    t_all = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    recipes, index = plan_recipes(targets)
    s.log(f"canonical stage: {len(recipes)} recipe(s) for {len(targets)} target(s)")
    run = run_stage(info, recipes, s.calibration, s.samples, s.seq_len, s.seed, progress=progress)
    s.seconds["canonical_stage"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    fp_state = load_torch_model(info).state_dict()
    prov = {"calibration": run.calibration.record()}
    artifacts: dict[str, Path] = {}
    for t in targets:
        row = {"name": t.name, "format": t.format, "runtime": t.runtime, "scheme": t.scheme, "method": t.method,
               "hardware": t.hardware, "status": "ok"}
        rows[t.name] = row
        try:
            res = run.results[index[t.name]] if t.name in index else None
            plan = target_plan(t, res) if res is not None else None
            row["plan"] = {"protected": plan["protected"], "bits_per_weight": plan["bits_per_weight"]} if plan else None
            t1 = time.perf_counter()
            artifacts[t.name] = export_target(t, info, res, plan, s.out / t.name, fp_state, prov)
            row["seconds"] = {"export": round(time.perf_counter() - t1, 2)}
            row["artifact"] = str(artifacts[t.name])
            row["files"], row["size_bytes"] = _size(artifacts[t.name])
            row["size_mb"] = round(row["size_bytes"] / 1e6, 3)
            row["bits_per_weight"] = round(8 * row["size_bytes"] / info.n_params, 3)
            s.log(f"exported {t.name}: {row['size_mb']} MB")
        except Exception as e:  # one target's export failure does not stop the others
            row.update(status="error", error=f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            s.log(f"export of {t.name} FAILED: {row['error']}")
    del fp_state
    s.seconds["export"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    base = base_logprobs_file(info, s, run.calibration.input_ids, store.default_cache_dir().parent / "base")
    s.seconds["original_logprobs"] = round(time.perf_counter() - t0, 1)
    bos = load_tokenizer(info).bos_token_id or 0

    t0 = time.perf_counter()
    original = {"name": "original", "format": "safetensors", "runtime": "torch", "scheme": str(info.config.get("torch_dtype") or info.config.get("dtype") or "fp"),
                "artifact": str(info.path), "status": "ok"}
    original["files"] = {k: v for k, v in file_table(info.path).items() if k.endswith((".safetensors", ".json"))}
    original["size_bytes"] = sum(f["bytes"] for k, f in original["files"].items() if k.endswith(".safetensors"))
    original["size_mb"] = round(original["size_bytes"] / 1e6, 3)
    original["bits_per_weight"] = round(8 * original["size_bytes"] / info.n_params, 3)
    s.log("original model in torch (reference row)")
    original.update(run_worker("original", "torch", info.path, base, s, bos, s.out / ".work" / "original"))
    original["passed"] = original.get("status") == "ok"
    for t in targets:
        row = rows[t.name]
        if row["status"] == "ok":
            s.log(f"{t.name}: smoke, quality and latency in {t.runtime}")
            row.update(run_worker(t.name, t.runtime, artifacts[t.name], base, s, bos, s.out / t.name / ".work"))
        finish_row(row, t.gates, s.skip_bench)
        s.log(f"{t.name}: {'PASSED' if row['passed'] else 'FAILED'}" + (f" ({row['error']})" if row.get("error") else ""))
    s.seconds["targets"] = round(time.perf_counter() - t0, 1)
    s.seconds["total"] = round(time.perf_counter() - t_all, 1)
    doc = {
        "schema": SCHEMA, "model": {"path": str(info.path), "architecture": info.architecture, "n_params": info.n_params,
                                    "weights_sha256": info.weights_sha256},
        "calibration": run.calibration.record(), "eval": {"text": str(s.eval_text), "n_ctx": s.n_ctx, "chunks": s.eval_chunks,
                                                          "threads": s.threads, "skip_bench": s.skip_bench},
        "environment": environment(), "seconds": s.seconds, "original": original,
        "targets": [rows[t.name] for t in targets], "passed": all(rows[t.name]["passed"] for t in targets),
    }
    write_json_atomic(s.out / "results.json", doc)
    from .report import write_reports

    write_reports(doc, s.out)
    return doc
