"""The build: targets → one canonical pass per recipe group → exports → per-target worker processes → results.

A target's failure (bad export, runtime error, runtime crash, timeout) marks that target failed; the others go
on. Exit code: 0 when every target passed all its gates, 1 otherwise (bad input raises before, exit 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, progress
from ..config import Target
from ..errors import ConfigError, disk_full
from ..evaluate.tasks import check_task_names, pair_row, strip_docs
from ..exporters.grids import grid_needs
from ..hardware import detect
from ..manifest import file_table, write_json_atomic
from ..model import ModelInfo
from ..release.artifact import MANIFEST, write_target_manifest
from ..report.results import SCHEMA, environment, evaluate_gates
from .rss import peak_mb, reset_peak

SMOKE_PROMPT = "def read_config(path):\n"
SMOKE_TOKENS = 32  # generated greedily, EOS not honoured: a runtime that stops early fails
SMOKE_CHUNKS = 2  # evaluation chunks scored against the canonical model in the smoke test
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
    device: str | None = "auto"  # the canonical pass and the torch references: auto | cpu | cuda[:N]
    max_memory: int | None = None  # bytes the build may hold: the canonical pass (None: half of the available
    # memory) and the original model's torch row (None: the available memory)
    peak_rss_mb: dict = field(default_factory=dict)  # per stage, this process (runtimes: each worker's own)
    # the targets the canonical pass is planned for (default: the built ones). `build --only` plans for every target
    # of the file, so a target's numbers do not depend on which others were built with it — and a CI job per
    # hardware label reuses the one canonical result of the canonical job
    plan_targets: list | None = None
    tasks: tuple[str, ...] = ()  # [defaults].tasks; a target's own list overrides it
    task_limit: int | None = None
    task_paths: tuple[str, ...] = ()  # the user's task folders


def export_target(t: Target, info: ModelInfo, res, plan: dict | None, dest: Path, prov: dict):
    """Resolve ``t`` into its ExportSpec and write its artifact under ``dest``; returns (spec, what its runtime opens)."""
    from ..exporters import FORMATS

    fmt = FORMATS[t.format]
    spec = fmt.spec(t, info, res, plan, prov)
    return spec, fmt.export(spec, info, res, dest)


def exports_cache() -> Path:
    """Where resume markers and canonical references live: the tool's cache, not the output folder, so an interrupted
    build leaves nothing but finished artifacts under --out."""
    from ..quantize import store

    return store.default_cache_dir().parent / "exports"


def _stamp(target_dir: Path, key: str) -> Path:
    where = hashlib.sha256(f"{target_dir.resolve()}\0{key}".encode()).hexdigest()[:24]
    return exports_cache() / f"done-{where}.json"


def _fingerprint(artifact: Path) -> list:
    """Size and mtime of every file of the artifact: a marker does not vouch for files replaced since."""
    files = sorted(p for p in artifact.rglob("*") if p.is_file()) if artifact.is_dir() else [artifact]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def export_key(t: Target, info: ModelInfo, canonical_path: Path | None, plan: dict | None) -> str:
    """Everything an artifact depends on: the target's settings, the canonical result (content-addressed path), the
    model, the plan, the tool version."""
    target = {k: v for k, v in dataclasses.asdict(t).items() if k not in ("tasks", "gates")}  # judge, don't shape
    blob = json.dumps({"target": target, "canonical": canonical_path.name if canonical_path else None,
                       "model": info.weights_sha256, "plan": plan, "v": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def finished_export(target_dir: Path, key: str) -> tuple[Path, Path] | None:
    """(artifact, canonical reference) of an export an earlier run finished into ``target_dir`` with the same key and
    that is still as that run left it, else None."""
    try:
        d = json.loads(_stamp(target_dir, key).read_text())
        art, ref = Path(d["artifact"]), Path(d["reference"])
        if art.exists() and ref.is_file() and _fingerprint(art) == d["files"]:
            return art, ref
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        pass
    return None


def mark_export(target_dir: Path, key: str, artifact: Path, reference: Path) -> None:
    write_json_atomic(_stamp(target_dir, key), {"artifact": str(artifact.resolve()), "reference": str(reference),
                                                "files": _fingerprint(artifact)})


def base_logprobs_file(info: ModelInfo, s: BuildSettings, calibration_ids: np.ndarray, cache: Path) -> Path:
    """The original model's scored log-probs, chunks and slice masks, computed once per (model, text, framing)."""
    from ..evaluate.compare import base_logprobs, eval_token_chunks
    from ..evaluate.slices import slice_masks
    from ..evaluate.streamed import logits_fn, streamed_logits
    from ..exporters.state import TensorStore
    from ..model import load_tokenizer

    h = hashlib.sha256()
    for part in (info.weights_sha256, hashlib.sha256(s.eval_text.read_bytes()).hexdigest(), s.n_ctx, s.eval_chunks,
                 hashlib.sha256(np.ascontiguousarray(calibration_ids).tobytes()).hexdigest()):
        h.update(str(part).encode())
    path = cache / f"base-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        return path
    tok = load_tokenizer(info)
    chunks = eval_token_chunks(tok, s.eval_text, s.n_ctx, s.eval_chunks)
    base = base_logprobs(chunks, logits_fn(streamed_logits(info, TensorStore(info), chunks, s.device,
                                                           spill_dir=cache / "spill")))
    masks = slice_masks(tok, s.eval_text, chunks, calibration_ids)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, scale=base.scale, min_log_prob=base.min_log_prob, q=base.q, next_tokens=base.next_tokens, chunks=chunks,
             **{f"mask_{k}": v for k, v in masks.items()})
    tmp.replace(path)
    return path


def canonical_reference_file(info: ModelInfo, spec, res, chunks: np.ndarray, key: str, scratch: Path,
                             device: str | None = "cpu") -> Path:
    """The canonical model of ``t`` (canonical fp state + the grids its format carries, dequantized — no exporter,
    no packer) scored on the smoke chunks. The smoke test holds the runtime's logits against it, so any
    exporter/state mismatch (e.g. norms from the original while the codes are AWQ-scaled) fails the target.
    Cached by the export key and the chunks."""
    from ..evaluate.compare import base_logprobs
    from ..evaluate.streamed import logits_fn, streamed_logits
    from ..exporters.state import canonical_weights

    h = hashlib.sha256(key.encode() + np.ascontiguousarray(chunks).tobytes()).hexdigest()[:24]
    path = exports_cache() / f"reference-{h}.npz"
    if path.is_file():
        return path
    state = canonical_weights(info, res, spec.grid_id)
    ref = base_logprobs(chunks, logits_fn(streamed_logits(info, state, chunks, device, spill_dir=scratch / "spill",
                                                          what=f"canonical model of {spec.name}")))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, scale=ref.scale, min_log_prob=ref.min_log_prob, q=ref.q, next_tokens=ref.next_tokens, chunks=chunks)
    tmp.replace(path)
    return path


def tokenizer_reference_file(info: ModelInfo, s: BuildSettings, cache: Path) -> Path:
    """The HF tokenizer's ids of the evaluation text and the stress set (cached by tokenizer files and text)."""
    from ..evaluate.tokenizer_parity import STRESS, reference
    from ..model import load_tokenizer

    h = hashlib.sha256()
    for f in sorted(info.path.glob("tokenizer*")) + sorted(info.path.glob("special_tokens_map.json")):
        h.update(f.name.encode() + f.read_bytes())
    h.update(s.eval_text.read_bytes() + json.dumps(STRESS).encode())
    path = cache / f"tokenizer-{h.hexdigest()[:24]}.json"
    if not path.is_file():
        write_json_atomic(path, reference(load_tokenizer(info), s.eval_text))
    return path


def run_worker(name: str, runtime: str, artifact: Path, base: Path, s: BuildSettings, bos: int, work: Path,
               reference: Path | None = None, tokenizer_ref: Path | None = None, parity_mode: str = "eval",
               options: dict | None = None, tasks: tuple[str, ...] = ()) -> dict:
    spec = {"name": name, "runtime": runtime, "artifact": str(artifact), "threads": s.threads, "n_ctx": s.n_ctx, "bos": bos,
            "options": options or {}, "tasks": list(tasks), "task_limit": s.task_limit,
            "task_paths": list(s.task_paths),
            "smoke_prompt": SMOKE_PROMPT, "smoke_tokens": SMOKE_TOKENS, "base": str(base),
            "tokenizer_reference": str(tokenizer_ref) if tokenizer_ref else None, "tokenizer_parity": parity_mode,
            "reference": str(reference) if reference else None, "skip_bench": s.skip_bench, "prompt_len": s.prompt_len,
            "decode_tokens": s.decode_tokens, "repeats": s.repeats, "out": str(work / "worker.json")}
    work.mkdir(parents=True, exist_ok=True)
    (work / "worker.json").unlink(missing_ok=True)
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    spec["events"] = str(events)
    spec_path = work / "worker-spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    t0 = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # no third-party bars
    with open(work / "worker.log", "w") as errf, \
            progress.task(f"{name}: validate in {runtime}", total=None, unit="step") as bar:
        proc = subprocess.Popen([sys.executable, "-m", "quantprism.pipeline.validate", str(spec_path)],
                                stdout=subprocess.DEVNULL, stderr=errf, text=True, env=env)
        seen, rc = 0, None
        try:
            while rc is None:
                try:
                    rc = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if time.perf_counter() - t0 > WORKER_TIMEOUT_S:
                        proc.kill()
                        proc.wait()
                        break
                seen = _follow(events, seen, bar)
        except BaseException:  # Ctrl-C: the runtime process goes too
            proc.kill()
            proc.wait()
            raise
    err = (work / "worker.log").read_text(errors="replace") if rc is not None else f"timed out after {WORKER_TIMEOUT_S} s"
    out = work / "worker.json"
    if out.is_file():
        res = json.loads(out.read_text())
    elif rc is None:
        res = {"status": "error", "error": err}
    else:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        tail = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
        res = {"status": "error", "error": f"runtime process died ({why}){': ' + tail[-1][:200] if tail else ''}",
               "log_tail": [ln[:300] for ln in tail[-20:]]}  # the scratch folder with the full log is removed
    res.setdefault("seconds", {})["wall"] = round(time.perf_counter() - t0, 2)
    return res


def _follow(events: Path, seen: int, bar) -> int:
    """Advance ``bar`` by the worker's new progress lines; returns how many were seen."""
    try:
        lines = events.read_text(encoding="utf-8").splitlines()
    except OSError:
        return seen
    for line in lines[seen:]:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            break  # a line being written
        if bar.reporter is not None and ev.get("total") and seen == 0:
            bar.set_total(ev["total"])
        bar.advance(1, note=ev.get("step"))
        seen += 1
    return seen


def model_record(info: ModelInfo) -> dict:
    return {"path": str(info.path), "architecture": info.architecture, "n_params": info.n_params,
            "weights_sha256": info.weights_sha256}


def _size(path: Path) -> tuple[dict, int]:
    root = path if path.is_dir() else path.parent
    files = file_table(root) if path.is_dir() or path.suffix == ".onnx" else {path.name: file_table(root)[path.name]}
    files = {k: v for k, v in files.items() if not k.startswith("worker")}
    return files, sum(f["bytes"] for f in files.values())


TORCH_RUNTIME_BYTES = 700 << 20  # torch + transformers imported, the eval chunks' logits and a KV cache
LOAD_OVERHEAD = 1.25  # transformers' loading holds some tensors twice for a moment


def original_precision(info: ModelInfo, max_memory: int | None) -> tuple[str | None, str]:
    """The dtype the original model's torch row runs in, and why not float32: float32 where it fits the memory the
    build may use (``--max-memory``, else what is available now), else the checkpoint's own 16-bit dtype, else None —
    the row is not run (a model larger than the allowed memory, which the streamed stages handle, cannot be loaded whole)."""
    import torch

    from ..model.stream import dtype_of
    from ..quantize.activations import available_memory

    allowance = max_memory if max_memory is not None else available_memory()

    def need(itemsize: int) -> int:
        return int(LOAD_OVERHEAD * info.n_params * itemsize) + TORCH_RUNTIME_BYTES

    gb = 1e9
    if need(4) <= allowance:
        return "float32", ""
    stored = dtype_of(info)
    if stored != torch.float32 and need(stored.itemsize) <= allowance:
        return (str(stored).removeprefix("torch."),
                f"float32 would need ~{need(4) / gb:.1f} GB of the {allowance / gb:.1f} GB allowed; run in the checkpoint's dtype")
    return None, (f"the model needs ~{need(stored.itemsize) / gb:.1f} GB in {str(stored).removeprefix('torch.')} to run "
                  f"whole; {allowance / gb:.1f} GB allowed (--max-memory or available memory)")


def target_dir(out: Path, name: str) -> Path:
    """Where a target's files go: a folder directly under --out, whatever the name (names are checked when the
    targets file is parsed; this is the write side's own proof)."""
    d = out / name
    if d.resolve().parent != out.resolve():
        raise ConfigError(f"target {name!r}: its folder {d} would not be directly under --out {out}; rename the target")
    return d


def finish_row(row: dict, gates: dict, skip_bench: bool, original: dict | None = None) -> dict:
    """Gates and verdict of one target row. Speed-ups are against the original model's row of the same build:
    absolute tok/s differ from machine to machine, the ratio much less."""
    lat, base = row.get("latency"), (original or {}).get("latency") or {}
    if lat and base.get("decode_tok_s_p50") and lat.get("decode_tok_s_p50"):
        lat["decode_speedup"] = round(lat["decode_tok_s_p50"] / base["decode_tok_s_p50"], 3)
    if row.get("status") == "ok":
        pair_row(row, original)
        row["gates"] = evaluate_gates(row, gates, skip_bench)
        row["passed"] = (bool(row.get("smoke", {}).get("passed")) and row.get("tokenizer_parity", {}).get("passed", True)
                         and all(g["passed"] is not False for g in row["gates"].values()))
    else:
        row["gates"] = {k: {"limit": v, "value": None, "passed": False} for k, v in gates.items()}
        row["passed"] = False
    return row


SCRATCH = ".work"  # per-run scratch under --out (worker specs, logs, spill); removed however the build ends


def build(targets: list[Target], info: ModelInfo, s: BuildSettings, progress=None) -> dict:
    """Run the build and return the results document (also written to ``s.out/results.json``). Whatever happens —
    success, a failed target, Ctrl-C, SIGTERM, a full disk — the scratch folder goes; what stays under --out is
    finished artifacts, their manifests and (on success) the reports. Resume markers live in the cache."""
    import shutil

    scratch = s.out / SCRATCH
    try:
        return _build(targets, info, s, scratch, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build(targets: list[Target], info: ModelInfo, s: BuildSettings, scratch: Path, progress=None) -> dict:
    from ..model import load_tokenizer
    from ..quantize import store
    from .plan import plan_recipes, run_stage, target_plan

    t_all = time.perf_counter()
    # the original runs every task any target runs; a task that is unknown or not offline is exit 2 before any work
    every_task = tuple(dict.fromkeys([*s.tasks, *(x for t in targets for x in (t.tasks or ()))]))
    check_task_names(list(every_task), list(s.task_paths))
    s.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    recipes, index = plan_recipes(s.plan_targets or targets, info)
    s.log(f"canonical stage: {len(recipes)} recipe(s) for {len(s.plan_targets or targets)} target(s)")
    reset_peak()
    run = run_stage(info, recipes, s.calibration, s.samples, s.seq_len, s.seed, progress=progress, device=s.device,
                    max_memory=s.max_memory)
    s.seconds["canonical_stage"] = round(time.perf_counter() - t0, 1)
    s.peak_rss_mb["canonical_stage"] = peak_mb()

    t0 = time.perf_counter()
    reset_peak()
    base = base_logprobs_file(info, s, run.calibration.input_ids, store.default_cache_dir().parent / "base")
    chunks = np.load(base)["chunks"][:SMOKE_CHUNKS]
    s.seconds["original_logprobs"] = round(time.perf_counter() - t0, 1)
    s.peak_rss_mb["original_logprobs"] = peak_mb()

    t0 = time.perf_counter()
    reset_peak()
    prov = {"calibration": run.calibration.record()}
    artifacts: dict[str, Path] = {}
    references: dict[str, Path] = {}
    machine = detect()
    for t in targets:
        missing = machine.missing(t.hardware_label)
        row = {"name": t.name, "format": t.format, "runtime": t.runtime, "scheme": t.scheme, "method": t.method,
               "hardware": t.hardware, "group_size": t.group_size, "group_size_auto": t.auto_group,
               "validated_on": machine.label, "hardware_match": not missing, "hardware_missing": missing,
               "status": "ok"}
        rows[t.name] = row
        try:
            tdir = target_dir(s.out, t.name)
            res = run.results[index[t.name]] if t.name in index else None
            plan = target_plan(t, res) if res is not None else None
            row["plan"] = {"protected": plan["protected"], "bits_per_weight": plan["bits_per_weight"]} if plan else None
            t1 = time.perf_counter()
            key = export_key(t, info, run.paths[index[t.name]] if t.name in index else None, plan)
            done = finished_export(tdir, key)
            if done is not None:
                artifacts[t.name], references[t.name] = done
                row["export_resumed"] = True
                s.log(f"{t.name}: export already finished in an earlier run (same inputs) — reused")
            else:
                spec, artifacts[t.name] = export_target(t, info, res, plan, tdir, prov)
                references[t.name] = canonical_reference_file(info, spec, res, chunks, key, scratch, s.device)
                mark_export(tdir, key, artifacts[t.name], references[t.name])
            row["seconds"] = {"export": round(time.perf_counter() - t1, 2)}
            row["artifact"] = str(artifacts[t.name])
            manifest = write_target_manifest(
                tdir, artifacts[t.name], t, model_record(info), run.calibration.record(),
                dataclasses.asdict(recipes[index[t.name]]) if t.name in index else None,
                run.paths[index[t.name]].name if t.name in index else None, list(grid_needs(t, info).grids),
                json.loads(json.dumps(plan, default=str)) if plan else None, machine.label)
            row["manifest"] = {"path": str(tdir / MANIFEST), "sha256": manifest["artifact"]["sha256"],
                               "settings_sha256": manifest["target"]["settings_sha256"]}
            row["files"], row["size_bytes"] = _size(artifacts[t.name])
            row["size_mb"] = round(row["size_bytes"] / 1e6, 3)
            row["bits_per_weight"] = round(8 * row["size_bytes"] / info.n_params, 3)
            s.log(f"exported {t.name}: {row['size_mb']} MB")
        except Exception as e:  # one target's export failure does not stop the others — a full disk stops the build
            full = disk_full(e, f"exporting {t.name}")
            if full is not None:
                raise full from None
            row.update(status="error", error=f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            s.log(f"export of {t.name} FAILED: {row['error']}")
    s.seconds["export"] = round(time.perf_counter() - t0, 1)
    s.peak_rss_mb["export"] = peak_mb()
    reset_peak()
    bos = load_tokenizer(info).bos_token_id or 0
    tok_ref = tokenizer_reference_file(info, s, store.default_cache_dir().parent / "base")

    t0 = time.perf_counter()
    original = {"name": "original", "format": "safetensors", "runtime": "torch", "scheme": str(info.config.get("torch_dtype") or info.config.get("dtype") or "fp"),
                "artifact": str(info.path), "status": "ok"}
    original["files"] = {k: v for k, v in file_table(info.path).items() if k.endswith((".safetensors", ".json"))}
    original["size_bytes"] = sum(f["bytes"] for k, f in original["files"].items() if k.endswith(".safetensors"))
    original["size_mb"] = round(original["size_bytes"] / 1e6, 3)
    original["bits_per_weight"] = round(8 * original["size_bytes"] / info.n_params, 3)
    dtype, why = original_precision(info, s.max_memory)
    if dtype is None:
        original.update(status="skipped", reason=why)
        s.log(f"original model in torch: not run ({why})")
    else:
        s.log(f"original model in torch, {dtype} (reference row){': ' + why if why else ''}")
        original["dtype"] = dtype
        if why:
            original["dtype_reason"] = why
        original.update(run_worker("original", "torch", info.path, base, s, bos, scratch / "original",
                                   options={"dtype": dtype}, tasks=every_task))
    original["passed"] = original.get("status") == "ok"
    for t in targets:
        row = rows[t.name]
        if row["status"] == "ok":
            s.log(f"{t.name}: smoke, quality and latency in {t.runtime}")
            row.update(run_worker(t.name, t.runtime, artifacts[t.name], base, s, bos, scratch / "target" / t.name,
                                  references[t.name], tok_ref, t.tokenizer_parity,
                                  tasks=t.tasks if t.tasks is not None else s.tasks))
        finish_row(row, t.gates, s.skip_bench, original)
        s.log(f"{t.name}: {'PASSED' if row['passed'] else 'FAILED'}" + (f" ({row['error']})" if row.get("error") else ""))
    for r in [original, *rows.values()]:
        strip_docs(r)
    s.seconds["targets"] = round(time.perf_counter() - t0, 1)
    s.peak_rss_mb["targets"] = peak_mb()  # this process while the workers ran (each worker's own: its row)
    s.seconds["total"] = round(time.perf_counter() - t_all, 1)
    doc = {
        "schema": SCHEMA, "model": model_record(info),
        "calibration": run.calibration.record(), "eval": {"text": str(s.eval_text), "n_ctx": s.n_ctx, "chunks": s.eval_chunks,
                                                          "threads": s.threads, "skip_bench": s.skip_bench},
        "environment": environment(), "seconds": s.seconds, "peak_rss_mb": s.peak_rss_mb, "original": original,
        "targets": [rows[t.name] for t in targets], "passed": all(rows[t.name]["passed"] for t in targets),
    }
    write_json_atomic(s.out / "results.json", doc)
    from ..report.render import write_reports

    write_reports(doc, s.out)
    return doc
