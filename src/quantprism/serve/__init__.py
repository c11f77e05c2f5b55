"""Ship behind a flag: serve a build's original and one candidate artifact side by side (see serve/app.py).

``quantprism serve BUILD_DIR --baseline original --candidate TARGET --share 0.1 --shadow 0.05`` reads the build's
results.json, starts one runtime process per arm (serve/worker.py), writes the flag (serve/flag.py) and runs the
OpenAI-compatible app under uvicorn. ``quantprism flag`` / ``quantprism rollback`` edit the flag file; the running
server picks the change up on its next request.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..report.results import artifact_path
from .arms import Arm, ArmDown, ArmSpec
from .flag import ORIGINAL, FlagState, read_flag, write_flag

log = logging.getLogger(__name__)

__all__ = ["ORIGINAL", "ServeSettings", "arm_specs", "open_server"]


@dataclass
class ServeSettings:
    baseline: str = ORIGINAL
    candidate: str = ""
    share: float = 0.1
    shadow: float = 0.0
    threads: int | None = None
    n_ctx: int = 1024
    max_queue: int = 16
    timeout_s: float = 60.0
    max_new_default: int = 16
    allow_failed: bool = False


def arm_specs(build_dir: Path, s: ServeSettings) -> tuple[dict[str, ArmSpec], dict]:
    """The baseline's and the candidate's ArmSpec from BUILD_DIR/results.json, and the results document."""
    from ..report.results import load_results

    build_dir = Path(build_dir)
    doc = load_results(build_dir / "results.json")
    targets = {t["name"]: t for t in doc.get("targets", [])}

    def spec(name: str) -> ArmSpec:
        if name == ORIGINAL:
            path = (doc.get("original") or {}).get("artifact") or (doc.get("model") or {}).get("path")
            if not path or not Path(path).is_dir():
                raise ConfigError(f"{build_dir}: the original model {path} is not on this machine; serve a target as the "
                                  "baseline (--baseline TARGET) or restore it")
            return ArmSpec(ORIGINAL, "torch", Path(path), s.threads, s.n_ctx, s.max_queue)
        t = targets.get(name)
        if t is None:
            raise ConfigError(f"{build_dir}: no target {name!r} in results.json; built: {', '.join(targets) or 'none'}")
        if not t.get("artifact") or t.get("error"):
            raise ConfigError(f"target {name} has no artifact ({t.get('error', 'not built')}); rebuild it first")
        if not t.get("passed", False) and not s.allow_failed:
            failed = [g for g, v in (t.get("gates") or {}).items() if not v.get("passed", True)]
            raise ConfigError(f"target {name} failed its gates ({', '.join(failed) or 'see report.md'}); fix it, or pass "
                              "--allow-failed to serve it anyway")
        return ArmSpec(name, t["runtime"], artifact_path(build_dir, t["artifact"]), s.threads, s.n_ctx, s.max_queue)

    if not s.candidate:
        raise ConfigError(f"--candidate TARGET is required; built targets: {', '.join(targets) or 'none'}")
    if s.candidate == ORIGINAL:
        raise ConfigError("--candidate must be a target, not the original (the original is the usual baseline)")
    if s.baseline == s.candidate:
        raise ConfigError(f"--baseline and --candidate are both {s.candidate!r}")
    return {s.baseline: spec(s.baseline), s.candidate: spec(s.candidate)}, doc


def open_server(build_dir: Path, s: ServeSettings):
    """Start the arms (baseline first: without it nothing is served), write the flag, return the Server."""
    from ..model import load_model_info, load_tokenizer
    from .app import Server

    FlagState(s.baseline, s.candidate, s.share, s.shadow).check()  # bad fractions are exit 2 before any process
    specs, doc = arm_specs(build_dir, s)
    info = load_model_info((doc.get("model") or {}).get("path"))
    tok = load_tokenizer(info)
    arms: dict[str, Arm] = {}
    try:
        for name, sp in specs.items():
            arm = Arm(sp)
            log.info("starting arm %s: %s in %s", name, sp.artifact, sp.runtime)
            arm.start()
            arms[name] = arm
    except ArmDown as e:
        for a in arms.values():
            a.stop()
        raise ConfigError(str(e)) from None
    prev = read_flag(build_dir)
    state = FlagState(s.baseline, s.candidate, s.share, s.shadow)
    what = f"serve start share {s.share:g} shadow {s.shadow:g}"
    state = write_flag(build_dir, state, what if prev is None else f"{what} (was share {prev.share:g})")
    return Server(build_dir, arms, state, tok, n_ctx=s.n_ctx, timeout_s=s.timeout_s, max_new_default=s.max_new_default)
