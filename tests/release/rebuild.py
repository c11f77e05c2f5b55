"""One fresh build of every target's artifact (canonical pass in an empty cache, then each exporter), printing
{target: {file: sha256}} as JSON — run twice in separate processes by test_release.py (same inputs → same bytes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from quantprism.manifest import file_table
from quantprism.model import load_model_info
from quantprism.pipeline.build import export_target
from quantprism.pipeline.plan import plan_recipes, run_stage, target_plan


def main(targets_file: str, out: str, cache: str) -> None:
    from quantprism.config import parse_targets

    tf = parse_targets(targets_file)
    info = load_model_info(None)
    targets = list(tf.targets.values())
    recipes, index = plan_recipes(targets, info)
    d = tf.defaults
    run = run_stage(info, recipes, d.calibration, d.samples, d.seq_len, d.seed, cache_dir=Path(cache), device="cpu")
    prov = {"calibration": run.calibration.record()}
    shas = {}
    for t in targets:
        res = run.results[index[t.name]]
        _, art = export_target(t, info, res, target_plan(t, res), Path(out) / t.name, prov)
        shas[t.name] = {k: v["sha256"] for k, v in file_table(Path(out) / t.name).items() if not k.startswith(".work/")}
    print(json.dumps(shas))


if __name__ == "__main__":
    main(*sys.argv[1:4])
