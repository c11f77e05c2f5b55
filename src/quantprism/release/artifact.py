"""Per-artifact manifests (``BUILD/<target>/manifest.json``) and their verification.

A manifest says everything the artifact was made from — model and calibration hashes, the target's settings, the
canonical recipe and grids, the plan, tool and runtime versions, the hardware label and the machine that built it —
and the sha256 of every file. No timestamps: the same inputs give the same manifest (the double-build tests compare
artifacts and manifests). `stale` reads the recorded inputs; `verify` re-hashes the files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..manifest import MANIFEST_SCHEMA, file_table, write_json_atomic

MANIFEST = "manifest.json"
SCRATCH = ".work/"
# settings that do not change the bytes of an artifact (gates judge it; the label is checked on its own)
NOT_SETTINGS = ("gates", "description", "hardware", "hardware_spec", "threads", "tokenizer_parity", "tasks")


def target_settings(t) -> dict[str, Any]:
    """The target's settings that decide its artifact's bytes."""
    d = dataclasses.asdict(t)
    return {k: v for k, v in sorted(d.items()) if k not in NOT_SETTINGS and k != "name"}


def settings_sha256(t) -> str:
    return hashlib.sha256(json.dumps(target_settings(t), sort_keys=True, default=str).encode()).hexdigest()


def runtime_versions(runtime: str) -> dict[str, str]:
    """Installed versions of the packages a runtime runs on (a change makes its artifacts stale)."""
    from ..report.results import installed_versions
    from ..runtimes import RUNTIMES

    return installed_versions(RUNTIMES[runtime].packages if runtime in RUNTIMES else ())


def tool_versions() -> dict[str, str]:
    from ..report.results import installed_versions

    return {"quantprism": __version__,
            **installed_versions(("torch", "transformers", "numpy", "safetensors", "gguf", "onnx"))}


def artifact_files(target_dir: Path) -> dict[str, dict]:
    """Every file of a target's folder that ships (scratch and the manifest itself excluded)."""
    return {k: v for k, v in file_table(target_dir).items() if not k.startswith(SCRATCH)}


def write_target_manifest(target_dir: Path, artifact: Path, t, model: dict, calibration: dict, recipe: dict | None,
                          canonical_key: str | None, grids: list[str], plan: dict | None, built_on: str) -> dict:
    target_dir = Path(target_dir)
    files = artifact_files(target_dir)
    rel = Path(artifact).resolve().relative_to(target_dir.resolve()).as_posix()
    lab = t.hardware_label
    manifest = {
        "schema": MANIFEST_SCHEMA, "kind": "quantprism-artifact",
        "target": {"name": t.name, "format": t.format, "runtime": t.runtime, "scheme": t.scheme, "method": t.method,
                   "settings": target_settings(t), "settings_sha256": settings_sha256(t)},
        "model": model, "calibration": calibration, "recipe": recipe, "canonical_key": canonical_key,
        "grids": list(grids), "plan": plan,
        "hardware": {"label": t.hardware, "features": list(lab.features)},
        "built_on": built_on,
        "versions": {**tool_versions(), "runtime": runtime_versions(t.runtime)},
        "artifact": {"path": rel or ".", "sha256": files[rel]["sha256"] if rel in files else None,
                     "bytes": sum(f["bytes"] for f in files.values())},
        "files": files,
    }
    write_json_atomic(target_dir / MANIFEST, manifest)
    return manifest


def read_manifest(path: Path) -> dict:
    try:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable manifest ({type(e).__name__}); rebuild the target") from None
    if not isinstance(m, dict) or m.get("kind") != "quantprism-artifact" or not isinstance(m.get("files"), dict):
        raise ConfigError(f"{path}: not a quantprism artifact manifest")
    return m


def find_manifests(path: Path) -> list[Path]:
    """The manifests under what `verify` was given: a build folder (every target), a target folder, or an artifact
    (its folder's manifest, or the one above it for a checkpoint folder)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "results.json").is_file():
        doc = json.loads((path / "results.json").read_text())
        found = [path / r["name"] / MANIFEST for r in doc.get("targets", []) if (path / r["name"] / MANIFEST).is_file()]
        if not found:
            raise ConfigError(f"{path}: no target of this build has a {MANIFEST}; rebuild it with this version")
        return found
    for d in ([path] if path.is_dir() else []) + [path.parent if path.is_file() else path.parent]:
        if (d / MANIFEST).is_file():
            return [d / MANIFEST]
    raise ConfigError(f"{path}: no {MANIFEST} here or beside it; `quantprism build` writes one per target")


def compare_files(listed: dict[str, str], now: dict[str, str]) -> dict:
    """Recorded {path: sha256} against the present ones: missing, changed and unlisted files."""
    missing = sorted(set(listed) - set(now))
    changed = sorted(k for k in set(listed) & set(now) if listed[k] != now[k])
    unlisted = sorted(set(now) - set(listed))
    return {"files": len(listed), "missing": missing, "changed": changed, "unlisted": unlisted,
            "ok": not (missing or changed or unlisted)}


def verify_manifest(manifest_path: Path, hashes: dict[str, str] | None = None) -> dict:
    """Re-hash every file a manifest lists (``hashes``: {path: sha256} of the folder, when already computed)."""
    m = read_manifest(manifest_path)
    if hashes is None:
        hashes = {k: v["sha256"] for k, v in artifact_files(manifest_path.parent).items()}
    return {"target": m["target"]["name"], "manifest": str(manifest_path),
            **compare_files({k: v["sha256"] for k, v in m["files"].items()}, hashes)}
