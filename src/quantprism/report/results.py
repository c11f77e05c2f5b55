"""results.json: the versioned build record — per-target rows, the original model's row, gates, environment."""
from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

SCHEMA = "quantprism.build/1"

# gate key → (path in a row, comparison)
GATE_FIELDS = {
    "max_kld": (("quality", "kld_mean"), "<="),
    "max_kld_p99": (("quality", "kld_p99"), "<="),
    "min_top1": (("quality", "top1_agreement"), ">="),
    "max_ppl_ratio": (("quality", "ppl_ratio"), "<="),
    "min_decode_tok_s": (("latency", "decode_tok_s_p50"), ">="),
    "min_decode_speedup": (("latency", "decode_speedup"), ">="),
    "min_prefill_tok_s": (("latency", "prefill_tok_s"), ">="),
    "max_ttft_ms": (("latency", "ttft_ms_p50"), "<="),
    "max_bits_per_weight": (("bits_per_weight",), "<="),
    "max_size_mb": (("size_mb",), "<="),
    "max_task_drop": (("tasks_drop_max",), "<="),  # the largest drop of any task vs the original (evaluate/tasks.py)
}


def get(row: dict, path: tuple[str, ...]):
    """row[path[0]][path[1]]…, or None where any level is missing."""
    cur = row
    for k in path:
        if not isinstance(cur, dict) or cur.get(k) is None:
            return None
        cur = cur[k]
    return cur


def evaluate_gates(row: dict, gates: dict[str, float], skip_bench: bool) -> dict[str, dict]:
    """Each gate: {limit, value, passed}. A gate whose value was not measured fails — except latency gates under
    --skip-bench (passed None, skipped), and latency gates on an emulated kernel (not a speed figure)."""
    out = {}
    for name, limit in gates.items():
        if name.startswith("max_task_drop."):  # per task: the drop (original − target) of that task
            diff = get(row, ("tasks", name.split(".", 1)[1], "diff"))
            value = None if diff is None else -diff + 0.0
            out[name] = {"limit": limit, "value": value, "passed": value is not None and value <= limit}
            continue
        path, op = GATE_FIELDS[name]
        value = get(row, path)
        if path[0] == "latency" and (skip_bench or (row.get("latency") or {}).get("comparable") is False):
            out[name] = {"limit": limit, "value": value, "passed": None,
                         "skipped": "--skip-bench" if skip_bench else f"kernel {row.get('kernel')} is not a speed figure"}
            continue
        passed = value is not None and (value <= limit if op == "<=" else value >= limit)
        out[name] = {"limit": limit, "value": value, "passed": bool(passed)}
    return out


def installed_versions(pkgs) -> dict[str, str]:
    """{distribution: version} of those installed (absent ones left out)."""
    out = {}
    for pkg in dict.fromkeys(pkgs):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict:
    """The machine (CPU, ISA, the kind its int8 arithmetic makes it — see quantprism.hardware) and package versions."""
    from ..hardware import detect

    m = detect()
    from ..runtimes import RUNTIMES

    versions = installed_versions(("quantprism", "torch", "transformers", "numpy",
                                   *(p for r in RUNTIMES.values() for p in r.packages)))
    return {"cpu": m.cpu, "isa": list(m.isa), "cores": m.cores, "machine": m.record(),
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions}


def load_results(path) -> dict:
    """A results.json written by ``quantprism build``; anything else is a ConfigError naming the file."""
    import json
    from pathlib import Path

    from ..errors import ConfigError

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such results file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a results.json ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfigError(f"{path}: not a quantprism build results file (schema {SCHEMA} expected)")
    return doc


def artifact_path(build_dir: Path, recorded: str) -> Path:
    """A target's artifact as recorded (relative to where the build ran) or relative to the build folder."""
    p = Path(recorded)
    tries = [p] if p.is_absolute() else [build_dir / Path(*p.parts[1:]) if len(p.parts) > 1 else build_dir / p,
                                          build_dir.parent / p, p]
    for t in tries:
        if t.exists():
            return t.resolve()
    from ..errors import ConfigError

    raise ConfigError(f"{build_dir}: artifact {recorded} is missing (moved or deleted?); rebuild with `quantprism build`")
