"""One target in its own process: smoke test, quality in its own runtime, latency. A crash here (even a
runtime segfault) fails only this target; the runner reads the JSON this writes, or notes its absence.

    python -m quantprism.pipeline.validate SPEC.json      (written by the runner)
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np

# Smoke fidelity: the runtime against the canonical model of its target (same grids, no exporter). A correct
# artifact differs from it only by the runtime's arithmetic (activation rounding to int8/Q8_K inside the kernels,
# bf16/fp16 compute): tiny logit errors that can flip the argmax only where the top two are nearly tied. A
# "decisive" position has a top-1/top-2 log-prob margin of at least DECISIVE_MARGIN nats — far beyond those
# errors (measured ≤ 0.05 nats of logit error, see the README) — so there the runtime must agree. An
# exporter/state mismatch (GGUF + AWQ with the original norms: KLD 0.096 vs the original) flips decisive positions
# and moves the KLD by orders of magnitude.
DECISIVE_MARGIN = 1.0
MIN_TOP1_DECISIVE = 0.99
MAX_FIDELITY_KLD = 0.01


def load_base(path: Path):
    from ..evaluate.kld import BaseLogprobs

    z = np.load(path, allow_pickle=False)
    return BaseLogprobs(z["scale"], z["min_log_prob"], z["q"], z["next_tokens"]), z["chunks"], {
        k[5:]: z[k] for k in z.files if k.startswith("mask_")}


def fidelity(reference: Path, logits_fn) -> dict:
    """The runtime's teacher-forced logits against the canonical model's on the smoke chunks."""
    from ..evaluate.compare import compare

    ref, chunks, _ = load_base(reference)
    summary, scores = compare(chunks, ref, logits_fn)
    top2 = np.sort(ref.logp(), axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
    top1_decisive = float(scores.same_top[decisive].mean()) if decisive.any() else 1.0
    out = {"n_tokens": summary["n_tokens"], "kld_mean": summary["kld_mean"], "kld_p99": summary["kld_p99"],
           "top1_agreement": summary["top1_agreement"], "decisive_tokens": int(decisive.sum()),
           "top1_decisive": top1_decisive, "limits": {"min_top1_decisive": MIN_TOP1_DECISIVE,
                                                      "max_kld": MAX_FIDELITY_KLD, "decisive_margin": DECISIVE_MARGIN}}
    kld_ok = bool(np.isfinite(summary["kld_mean"])) and summary["kld_mean"] <= MAX_FIDELITY_KLD
    out["passed"] = bool(top1_decisive >= MIN_TOP1_DECISIVE and kld_ok)
    return out


def smoke(sess, spec: dict, logits_fn) -> dict:
    """Loads (done), generates SMOKE_TOKENS greedily, decodes to non-empty text, and agrees with the canonical model."""
    prompt = [spec["bos"]] + sess.tokenize(spec["smoke_prompt"])
    toks, _, _ = sess.timed_generate(prompt, spec["smoke_tokens"], stop_at_eos=False)
    text = sess.detokenize(toks)
    d = {"generated_tokens": len(toks), "prompt_tokens": len(prompt), "text": text}
    checks = {"generated": len(toks) == spec["smoke_tokens"], "text": bool(text.strip())}
    if spec.get("reference"):
        d["fidelity"] = fidelity(Path(spec["reference"]), logits_fn)
        checks["fidelity"] = d["fidelity"]["passed"]
    return {"passed": all(checks.values()), "checks": checks, "details": d}


def tokenizer_parity(sess, spec: dict) -> dict:
    """The runtime's own tokenizer against the HF tokenizer's ids the runner computed once for the build."""
    from ..evaluate.tokenizer_parity import session_parity

    ref = json.loads(Path(spec["tokenizer_reference"]).read_text(encoding="utf-8"))
    return session_parity(sess, ref, spec["tokenizer_parity"])


class Events:
    """Progress for the runner (one JSON line per step, appended to ``spec["events"]``): it draws the target's bar."""

    def __init__(self, path: str | None, total: int):
        self.path, self.total = path, total

    def __call__(self, step: str) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "total": self.total}) + "\n")


def run(spec: dict) -> dict:
    from ..evaluate.compare import compare
    from ..evaluate.slices import slice_summaries
    from ..runtimes import open_runtime
    from ..runtimes.latency import measure

    secs: dict[str, float] = {}
    base, chunks, masks = load_base(Path(spec["base"]))
    event = Events(spec.get("events"), 2 + len(chunks) + (0 if spec["skip_bench"] else 1))
    t0 = time.perf_counter()
    sess = open_runtime(spec["runtime"], Path(spec["artifact"]), spec["threads"], n_ctx=spec["n_ctx"] + 64,
                        options=spec.get("options"))
    secs["open"] = round(time.perf_counter() - t0, 2)
    event("runtime loaded")
    out: dict = {"kernel": sess.kernel, "threads": sess.threads}
    try:
        if os.environ.get("QUANTPRISM_TEST_KILL_TARGET") == spec["name"]:
            os.kill(os.getpid(), signal.SIGKILL)  # a test simulates a runtime crash mid-target
        nonfinite = {"rows": 0}

        def logits_fn(chunk: np.ndarray) -> np.ndarray:
            lg = sess.logits(chunk)
            nonfinite["rows"] += int((~np.isfinite(lg).all(-1)).sum())
            return lg

        if spec.get("tokenizer_reference"):
            t0 = time.perf_counter()
            out["tokenizer_parity"] = tokenizer_parity(sess, spec)
            secs["tokenizer_parity"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        out["smoke"] = smoke(sess, spec, logits_fn)
        secs["smoke"] = round(time.perf_counter() - t0, 2)
        event("smoke")
        t0 = time.perf_counter()

        def scored_fn(chunk: np.ndarray) -> np.ndarray:
            lg = logits_fn(chunk)
            event("quality chunk")
            return lg

        summary, scores = compare(chunks, base, scored_fn)
        # no NaN/Inf in any logit row, over the smoke and the quality chunks
        out["smoke"]["checks"]["finite_logits"] = nonfinite["rows"] == 0
        out["smoke"]["details"]["nonfinite_rows"] = nonfinite["rows"]
        out["smoke"]["passed"] = all(out["smoke"]["checks"].values())
        q = {k: summary[k] for k in ("kld_mean", "kld_p99", "kld_median", "top1_agreement", "ppl", "ppl_base", "ppl_ratio",
                                    "n_tokens")}
        q["slices"] = slice_summaries(scores, masks)
        out["quality"] = q
        secs["quality"] = round(time.perf_counter() - t0, 2)
        if not spec["skip_bench"]:
            t0 = time.perf_counter()
            lat = measure(sess, [spec["bos"]] + list(chunks[0][1 : spec["prompt_len"]]), spec["decode_tokens"], spec["repeats"])
            out["latency"] = {k: lat[k] for k in ("ttft_ms_p50", "prefill_tok_s", "decode_tok_s_p50", "decode_tok_s_p95",
                                                 "peak_rss_mb", "threads", "prompt_tokens", "decode_tokens", "repeats")}
            out["latency"]["comparable"] = sess.kernel == "native"
            secs["latency"] = round(time.perf_counter() - t0, 2)
            event("latency")
        if spec.get("tasks"):
            from ..evaluate.tasks import run_tasks

            t0 = time.perf_counter()
            try:
                out["tasks"] = run_tasks(sess, spec["tasks"], spec["bos"], spec["n_ctx"] + 64, spec.get("task_limit"),
                                         spec.get("task_paths"))
            except Exception as e:  # the target's other results stand; its task gate fails (not measured)
                out["tasks_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            secs["tasks"] = round(time.perf_counter() - t0, 2)
    finally:
        sess.close()
    out["seconds"] = secs
    return out


def main(argv: list[str] | None = None) -> int:
    spec_path = Path((argv or sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text())
    from ..manifest import write_json_atomic

    try:
        res = run(spec)
        res["status"] = "ok"
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # the runtime's own
    except Exception as e:  # reported in results.json as this target's failure
        res = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    write_json_atomic(Path(spec["out"]), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
