"""What the single-step commands do (load and check targets, quantize, evaluate one canonical result, validate one
artifact); the CLI only parses their arguments and prints what these return."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import TargetsFile, check_target_against_model, parse_targets, resolve_group_size
from ..errors import ArtifactError, ConfigError
from ..model import ModelInfo, load_model_info
from .plan import CanonicalRun, plan_recipes, run_stage, target_plan, targets_of


def load_targets(targets_file: Path, model: str | None) -> tuple[TargetsFile, ModelInfo]:
    """Parse a targets file and check every target's shape rules against the model (an impossible target is an
    error naming the target and why)."""
    from dataclasses import replace

    tf = parse_targets(targets_file)
    info = load_model_info(model or tf.defaults.model)
    tf = replace(tf, targets={n: resolve_group_size(t, info.linear_shapes, str(targets_file)) for n, t in tf.targets.items()})
    for t in tf.targets.values():
        why = check_target_against_model(t, info.linear_shapes)
        if why:
            raise ConfigError(f"{targets_file}: [target.{t.name}] cannot be built for {info.path}: {why}")
    return tf, info


@dataclass
class QuantizeOutcome:
    run: CanonicalRun | None
    rows: list[dict]            # one per recipe: key, targets, transform, method, grids, cache, path
    plans: dict[str, dict]      # target → mixed-precision plan (targets that have one)


def quantize(tf: TargetsFile, info: ModelInfo, only: list[str], calibration: str | None, samples: int | None,
             seq_len: int | None, sequential: bool = True, out: Path | None = None, cache_dir: Path | None = None,
             progress: Callable[[str, int, int], None] | None = None,
             device: str | None = "auto",
             max_memory: int | None = None) -> QuantizeOutcome:
    """One canonical pass for the selected targets; results copied to ``out`` (with plans.json) when given.
    Progress goes through ``quantprism.progress`` (the pass reports per layer)."""
    from ..manifest import write_json_atomic

    d = tf.defaults
    targets = targets_of(tf, only)
    recipes, index = plan_recipes(targets, info)
    if not recipes:
        return QuantizeOutcome(None, [], {})
    run = run_stage(info, recipes, calibration or d.calibration, samples or d.samples, seq_len or d.seq_len, d.seed,
                    sequential=sequential, cache_dir=cache_dir, progress=progress, device=device, max_memory=max_memory)
    rows = []
    for i, (r, p, hit) in enumerate(zip(recipes, run.paths, run.cache_hits, strict=True)):
        dest = p
        if out is not None:
            dest = out / p.name
            tmp = out / (p.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(p, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        rows.append({"recipe": r.key(), "targets": [n for n, j in index.items() if j == i], "transform": r.transform,
                     "method": r.method, "grids": list(r.grids), "cache": "hit" if hit else "new", "path": dest})
    plans = {t.name: p for t in targets if (p := target_plan(t, run.results[index[t.name]])) is not None}
    if out is not None and plans:
        write_json_atomic(out / "plans.json", plans)
    return QuantizeOutcome(run, rows, plans)


def evaluate_canonical(canonical: Path, grid: str | None, model: str | None, eval_text: str | None,
                       chunks: int | None) -> tuple[str, dict]:
    """Teacher-forced comparison of one canonical result (on ``grid``) with the original model → (grid, summary)."""
    from ..calibration import eval_text_path
    from ..evaluate.canonical import Evaluator, canonical_overrides
    from ..quantize import store

    res, prov = store.load(canonical)
    gid = grid or res.recipe.grids[0]
    solved = {g for grids in res.quant.values() for g in grids}
    if gid not in solved:
        raise ConfigError(f"{canonical}: grid {gid!r} was not solved; available: {', '.join(sorted(solved))}")
    info = load_model_info(model or prov.get("model"))
    if prov.get("model_sha256") and prov["model_sha256"] != info.weights_sha256:
        raise ConfigError(f"{info.path}: weights differ from the model this result was made from; pass --model")
    ev = Evaluator(info, eval_text_path(eval_text), max_chunks=chunks)
    return gid, ev.evaluate(canonical_overrides(res, lambda mod: gid))


def validate_artifact(artifact: Path, threads: int | None, prompt: str = "def main():", tokens: int = 16,
                      model: str | None = None, eval_text: str | None = None, parity: str = "eval") -> dict:
    """Recognize the artifact's format, open it in that format's first runtime (the session checks the structure),
    generate ``tokens`` greedily, and — given the original ``model`` — check tokenization parity as a build does;
    returns facts for the output."""
    from ..calibration import eval_text_path
    from ..evaluate.tokenizer_parity import reference, session_parity
    from ..exporters import FORMATS
    from ..model import load_tokenizer
    from ..runtimes import RUNTIMES, open_runtime

    artifact = Path(artifact)
    fmt = next((FORMATS[n] for n in FORMATS if FORMATS[n].recognize(artifact)), None)
    if fmt is None:
        raise ArtifactError(f"{artifact}: unknown artifact type; validate takes a .gguf file, a .onnx file or an HF "
                            "checkpoint directory with a quantization_config")
    runtime = fmt.runtimes[0]
    sess = open_runtime(runtime, artifact, threads, n_ctx=256)
    parity_result = None
    try:
        out = sess.generate([0] + sess.tokenize(prompt), tokens)
        facts = sess.describe() if hasattr(sess, "describe") else fmt.label
        if model is not None:
            parity_result = session_parity(sess, reference(load_tokenizer(load_model_info(model)),
                                                           eval_text_path(eval_text)), parity)
    finally:
        sess.close()
    return {"artifact": str(artifact), "format": fmt.name, "facts": facts, "runtime": RUNTIMES[runtime].label,
            "kernel": sess.kernel, "generated": len(out), "threads": sess.threads, "tokenizer_parity": parity_result}

