"""`quantprism report --merge`: one report from the results.json of several partial builds (one CI job per hardware
label), which must share the model, the calibration set and the evaluation framing — otherwise their numbers are
not comparable and the merge refuses, naming the difference."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..report.results import get as _get

SAME = (("model", "weights_sha256"), ("calibration", "sha256"), ("calibration", "samples"), ("calibration", "seq_len"),
        ("eval", "n_ctx"), ("eval", "chunks"), ("eval", "skip_bench"))


def merge_results(parts: list[tuple[Path, dict]], order: list[str] | None = None) -> dict:
    """One results document from partial ones. Targets keep ``order`` (the targets file's) when given, else the
    order of the parts; the original row is the first part's that ran."""
    if len(parts) < 2:
        raise ConfigError("--merge needs at least two results.json files")
    (p0, d0), rest = parts[0], parts[1:]
    for p, d in rest:
        for path in SAME:
            if _get(d, path) != _get(d0, path):
                raise ConfigError(f"{p}: {'.'.join(path)} is {_get(d, path)!r} but {p0} has {_get(d0, path)!r}; only builds "
                                  "of the same model, calibration and evaluation settings merge")
    rows: dict[str, dict] = {}
    source: dict[str, Path] = {}
    for p, d in parts:
        for r in d.get("targets", []):
            if r["name"] in rows:
                raise ConfigError(f"target {r['name']} is in both {source[r['name']]} and {p}; merge each target once")
            rows[r["name"]], source[r["name"]] = r, p
    names = list(rows)
    if order:
        names = [n for n in order if n in rows] + [n for n in rows if n not in order]
    original = next((d["original"] for _, d in parts if d.get("original", {}).get("status") == "ok"), d0["original"])
    seconds: dict[str, float] = {}
    for _, d in parts:
        for k, v in (d.get("seconds") or {}).items():
            seconds[k] = round(seconds.get(k, 0.0) + float(v), 1)  # job time summed over the jobs
    doc = {k: v for k, v in d0.items() if k not in ("targets", "original", "seconds", "passed", "peak_rss_mb")}
    doc.update(original=original, targets=[rows[n] for n in names], seconds=seconds,
               peak_rss_mb={}, passed=all(rows[n].get("passed") for n in names),
               merged_from=[{"results": str(p), "targets": [r["name"] for r in d.get("targets", [])],
                             "machine": (d.get("environment") or {}).get("machine"), "passed": d.get("passed")}
                            for p, d in parts])
    return doc
