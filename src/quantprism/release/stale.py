"""`quantprism stale`: which artifacts of a build must be rebuilt, and why — the re-quantization triggers as a CI
cron step. Each target's manifest is held against what would be used now:

- model: the weights' sha256 (the targets file's model, or --model, or the recorded path);
- calibration: the calibration set's sha256 and its samples / seq_len / seed (--calibration or the targets file);
- settings: the target's artifact-deciding settings (targets file) and the quantprism version;
- runtime: the installed versions of the target's runtime packages;
- hardware: the target's hardware label and the features it promises.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from .artifact import MANIFEST, read_manifest, runtime_versions, settings_sha256, target_settings

CAUSES = ("model", "calibration", "settings", "runtime", "hardware")


@dataclass
class Now:
    """What a rebuild would use now (loaded lazily, once per model / calibration)."""

    model: str | None
    calibration: str | None
    targets: object | None  # config.TargetsFile

    def __post_init__(self):
        self._info: dict = {}
        self._calib: dict = {}

    def info(self, path: str | None):
        from ..model import load_model_info

        if path not in self._info:
            self._info[path] = load_model_info(path)
        return self._info[path]

    def calibration_sha(self, info, source: str, samples: int, seq_len: int, seed: int) -> str:
        from ..calibration import build_calibration
        from ..model import load_tokenizer

        key = (str(info.path), source, samples, seq_len, seed)
        if key not in self._calib:
            self._calib[key] = build_calibration(load_tokenizer(info), source, samples, seq_len, seed,
                                                 max_positions=info.config.get("max_position_embeddings")).sha256
        return self._calib[key]


def _short(v) -> str:
    return v[:12] + "…" if isinstance(v, str) and len(v) == 64 else str(v)


def check_target(manifest: dict, now: Now) -> list[dict]:
    """The reasons one artifact is stale (empty: up to date)."""
    out: list[dict] = []
    name = manifest["target"]["name"]
    tf = now.targets
    t = tf.targets.get(name) if tf is not None else None
    if tf is not None and t is None:
        return [{"cause": "settings", "detail": f"target {name} is no longer in {tf.path}"}]
    d = tf.defaults if tf is not None else None
    m_model = manifest["model"]
    info = now.info(now.model or (d.model if d is not None else m_model["path"]))
    if info.weights_sha256 != m_model["weights_sha256"]:
        out.append({"cause": "model", "detail": f"weights sha256 {_short(m_model['weights_sha256'])} → "
                                                f"{_short(info.weights_sha256)} ({info.path})"})
    rec = manifest["calibration"]
    source = now.calibration or (d.calibration if d is not None else rec["source"])
    samples, seq_len, seed = ((d.samples, d.seq_len, d.seed) if d is not None else
                              (rec["samples"], rec["seq_len"], rec["seed"]))
    if (samples, seq_len, seed) != (rec["samples"], rec["seq_len"], rec["seed"]):
        out.append({"cause": "calibration", "detail": f"samples/seq_len/seed {rec['samples']}/{rec['seq_len']}/{rec['seed']} → "
                                                      f"{samples}/{seq_len}/{seed}"})
    else:
        sha = now.calibration_sha(info, source, samples, seq_len, seed)
        if sha != rec["sha256"]:
            out.append({"cause": "calibration", "detail": f"calibration sha256 {_short(rec['sha256'])} → {_short(sha)} "
                                                          f"({source})"})
    if t is not None and settings_sha256(t) != manifest["target"]["settings_sha256"]:
        was, new = manifest["target"]["settings"], json.loads(json.dumps(target_settings(t), default=str))
        keys = sorted(k for k in set(was) | set(new) if was.get(k) != new.get(k))
        out.append({"cause": "settings", "detail": ", ".join(f"{k} {was.get(k)!r} → {new.get(k)!r}" for k in keys)})
    if manifest["versions"].get("quantprism") != __version__:
        out.append({"cause": "settings", "detail": f"quantprism {manifest['versions'].get('quantprism')} → {__version__}"})
    was_rt, now_rt = manifest["versions"].get("runtime") or {}, runtime_versions(manifest["target"]["runtime"])
    if was_rt != now_rt:
        keys = sorted(set(was_rt) | set(now_rt))
        out.append({"cause": "runtime", "detail": ", ".join(f"{k} {was_rt.get(k, '-')} → {now_rt.get(k, '-')}" for k in keys
                                                            if was_rt.get(k) != now_rt.get(k))})
    if t is not None:
        hw = manifest["hardware"]
        feats = list(t.hardware_label.features)
        if t.hardware != hw["label"]:
            out.append({"cause": "hardware", "detail": f"label {hw['label']} → {t.hardware}"})
        elif hw.get("features") is not None and feats != hw["features"]:
            out.append({"cause": "hardware", "detail": f"{t.hardware} promises {feats} (was {hw['features']})"})
    return out


def stale(build_dir: Path, targets_file: Path | None = None, model: str | None = None,
          calibration: str | None = None) -> list[dict]:
    """Per target of the build: {"target", "stale", "reasons": [{"cause", "detail"}]}."""
    from ..config import parse_targets
    from ..report.results import load_results

    build_dir = Path(build_dir)
    doc = load_results(build_dir / "results.json")
    now = Now(model, calibration, parse_targets(targets_file) if targets_file else None)
    rows = []
    for r in doc.get("targets", []):
        mpath = build_dir / r["name"] / MANIFEST
        if not mpath.is_file():
            rows.append({"target": r["name"], "stale": True,
                         "reasons": [{"cause": "settings", "detail": f"no {MANIFEST} (not built, or built before manifests)"}]})
            continue
        reasons = check_target(read_manifest(mpath), now)
        rows.append({"target": r["name"], "stale": bool(reasons), "reasons": reasons})
    if not rows:
        raise ConfigError(f"{build_dir}: the build has no targets")
    return rows
