"""One target in its own process: smoke test, quality in its own runtime, latency. A crash here (even a
runtime segfault) fails only this target; the runner reads the JSON this writes, or notes its absence.

    python -m quantprism.build.worker SPEC.json      (written by the runner)
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np


def load_base(path: Path):
    from ..evaluate.kld import BaseLogprobs

    z = np.load(path, allow_pickle=False)
    return BaseLogprobs(z["scale"], z["min_log_prob"], z["q"], z["next_tokens"]), z["chunks"], {
        k[5:]: z[k] for k in z.files if k.startswith("mask_")}


def run(spec: dict) -> dict:
    from ..evaluate.compare import compare
    from ..evaluate.slices import slice_summaries
    from ..runtimes import open_runtime
    from ..runtimes.latency import measure

    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    sess = open_runtime(spec["runtime"], Path(spec["artifact"]), spec["threads"], n_ctx=spec["n_ctx"] + 64)
    secs["open"] = round(time.perf_counter() - t0, 2)
    out: dict = {"kernel": sess.kernel, "threads": sess.threads}
    try:
        if os.environ.get("QUANTPRISM_TEST_KILL_TARGET") == spec["name"]:
            os.kill(os.getpid(), signal.SIGKILL)  # a test simulates a runtime crash mid-target
        t0 = time.perf_counter()
        prompt = [spec["bos"]] + sess.tokenize(spec["smoke_prompt"])
        toks = sess.generate(prompt, 32)
        text = sess.tokenizer.decode(toks) if hasattr(sess, "tokenizer") and hasattr(sess.tokenizer, "decode") else None
        out["smoke"] = {"passed": len(toks) > 0, "details": {"generated_tokens": len(toks), "prompt_tokens": len(prompt),
                                                             "text": text}}
        secs["smoke"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        base, chunks, masks = load_base(Path(spec["base"]))
        summary, scores = compare(chunks, base, sess.logits)
        q = {k: summary[k] for k in ("kld_mean", "kld_p99", "kld_median", "top1_agreement", "ppl", "ppl_base", "ppl_ratio",
                                    "n_tokens")}
        q["slices"] = slice_summaries(scores, masks)
        out["quality"] = q
        secs["quality"] = round(time.perf_counter() - t0, 2)
        if not spec["skip_bench"]:
            t0 = time.perf_counter()
            lat = measure(sess, prompt[:1] + list(chunks[0][1 : spec["prompt_len"]]), spec["decode_tokens"], spec["repeats"])
            out["latency"] = {k: lat[k] for k in ("ttft_ms_p50", "prefill_tok_s", "decode_tok_s_p50", "decode_tok_s_p95",
                                                 "peak_rss_mb", "threads", "prompt_tokens", "decode_tokens", "repeats")}
            out["latency"]["comparable"] = sess.kernel == "native"
            secs["latency"] = round(time.perf_counter() - t0, 2)
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
    except Exception as e:  # reported in results.json as this target's failure
        res = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    write_json_atomic(Path(spec["out"]), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
