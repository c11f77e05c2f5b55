"""Release commands: `hardware` (this machine against the labels), and the CI / reproducibility tools of the
release pipeline."""
from __future__ import annotations

from pathlib import Path

import click

from . import DEFAULT_TARGETS, _console, cli


@cli.command("hardware", epilog="Example:  quantprism hardware --targets targets.toml")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="Also check the labels this targets file uses (default: ./targets.toml if present).")
@click.option("--json", "as_json", is_flag=True, help="Print the machine and the label checks as JSON.")
def hardware_cmd(targets_file: Path | None, as_json: bool) -> None:
    """Print this machine's hardware label and features, and which labels of the targets file it satisfies
    (a target whose label this machine lacks is validated here with another arithmetic)."""
    import json

    from rich.table import Table

    from ..config import parse_targets
    from ..hardware import BUILTIN_LABELS, detect, resolve_label
    from ..release.workflow import labels_of

    m = detect()
    path = targets_file or (DEFAULT_TARGETS if DEFAULT_TARGETS.is_file() else None)
    tf = parse_targets(path) if path else None
    used = labels_of(tf) if tf else {}
    names = list(used) or [n for n in BUILTIN_LABELS if n.count("-") >= 1 and not n.startswith(("cpu-avx", "cpu-amx", "gpu-cuda"))]
    rows = []
    for n in names:
        lab = resolve_label(n, tf.hardware if tf else None)
        missing = m.missing(lab)
        rows.append({"label": n, "satisfied": not missing, "missing": missing, "features": list(lab.features),
                     "runner": list(lab.runner), "targets": used.get(n, [])})
    rec = m.record()
    if as_json:
        click.echo(json.dumps({"machine": {"label": m.label, "arch": m.arch, "cpu": m.cpu, "cores": m.cores,
                                           "features": rec["features"]}, "labels": rows}, indent=2))
        return
    con = _console()
    con.print(f"this machine: {m.label} ({m.arch}, {m.cpu}, {m.cores} cores)", markup=False, highlight=False)
    con.print(f"features: {' '.join(rec['features']) or '-'}", markup=False, highlight=False)
    table = Table(title=f"labels of {path}" if path else "built-in labels")
    for col in ("label", "satisfied here", "missing", "promises", "runner", "targets"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["label"], "yes" if r["satisfied"] else "no", ", ".join(r["missing"]) or "-",
                      ", ".join(r["features"]) or "-", ", ".join(r["runner"]), ", ".join(r["targets"]) or "-")
    con.print(table)


@cli.command("verify", epilog="Example:  quantprism verify build/   (or build/llamacpp-cpu-q4km/model.gguf)")
@click.argument("path", type=click.Path(path_type=Path))
def verify_cmd(path: Path) -> None:
    """Re-hash artifacts against their manifests: a build folder (every target), a target folder, an artifact, or a
    bundle (its SHA256SUMS and every target's manifest).
    Exit 0 when every file matches, 1 when one is missing, changed or unlisted, 2 when there is no manifest."""
    from ..release.artifact import find_manifests, verify_manifest
    from ..release.bundle import BUNDLE, verify_bundle

    bad = 0
    checks = verify_bundle(path) if (Path(path) / BUNDLE).is_file() else [verify_manifest(m) for m in find_manifests(path)]
    for v in checks:
        if v["ok"]:
            click.echo(f"{v['target']}: OK ({v['files']} files match {v['manifest']})")
            continue
        bad += 1
        what = [f"{k} {', '.join(v[k])}" for k in ("missing", "changed", "unlisted") if v[k]]
        click.echo(f"{v['target']}: FAILED — {'; '.join(what)}")
    if bad:
        raise click.exceptions.Exit(1)


@cli.command("stale", epilog="Example:  quantprism stale build/ --targets targets.toml")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="The targets file a rebuild would use (settings, labels, model, calibration); default: the manifests.")
@click.option("--model", default=None, help="The model a rebuild would use (default: the targets file's or the recorded one).")
@click.option("--calibration", default=None, help="The calibration source a rebuild would use.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def stale_cmd(build_dir: Path, targets_file: Path | None, model: str | None, calibration: str | None,
              as_json: bool) -> None:
    """List each artifact that must be rebuilt and why: model, calibration, settings, runtime version or hardware
    label changed. Exit 1 when any is stale (a CI cron step), 0 when all are current."""
    import json

    from ..release.stale import stale

    rows = stale(build_dir, targets_file, model, calibration)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if not r["stale"]:
                click.echo(f"{r['target']}: current")
            for why in r["reasons"]:
                click.echo(f"{r['target']}: STALE ({why['cause']}) {why['detail']}")
    if any(r["stale"] for r in rows):
        raise click.exceptions.Exit(1)


@cli.group("ci", epilog="Example:  quantprism ci github --targets targets.toml --out .github/workflows/quantprism.yml")
def ci_group() -> None:
    """CI for the deployment matrix: a workflow per hardware label, and the canonical cache key."""


@ci_group.command("github", epilog="Example:  quantprism ci github --out .github/workflows/quantprism.yml")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=DEFAULT_TARGETS, show_default=True)
@click.option("--runners", type=click.Path(path_type=Path), default=Path("ci/hardware.toml"), show_default=True,
              help="The repository's hardware → runner map (optional file).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the workflow here (default: stdout).")
@click.option("--check", is_flag=True, help="Exit 1 when --out differs from what would be generated (a CI/test guard).")
def ci_github_cmd(targets_file: Path, runners: Path, out: Path | None, check: bool) -> None:
    """Generate the GitHub Actions workflow: one canonical job, one build job per hardware label, one merge job."""
    from ..config import parse_targets
    from ..errors import ConfigError
    from ..manifest import write_text_atomic
    from ..release.workflow import github_workflow, load_ci_map

    tf = parse_targets(targets_file)
    text = github_workflow(tf, targets_file.as_posix(), load_ci_map(runners), runners.as_posix())
    if check:
        if out is None:
            raise ConfigError("--check needs --out FILE (the committed workflow)")
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            click.echo(f"{out} is not current; regenerate: quantprism ci github --targets {targets_file} --out {out}", err=True)
            raise click.exceptions.Exit(1)
        click.echo(f"{out} is current")
        return
    if out is None:
        click.echo(text, nl=False)
        return
    write_text_atomic(out, text)
    click.echo(f"wrote {out}")


@ci_group.command("key", epilog="Example:  quantprism ci key --targets targets.toml")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=DEFAULT_TARGETS, show_default=True)
@click.option("--model", default=None, help="Model directory (overrides [defaults].model).")
def ci_key_cmd(targets_file: Path, model: str | None) -> None:
    """Print the canonical result's cache key (model weights, calibration set, recipes, tool version)."""
    from ..pipeline.commands import load_targets
    from ..release.workflow import canonical_key

    tf, info = load_targets(targets_file, model)
    click.echo(canonical_key(tf, info))


@cli.command("bundle", epilog="Example:  quantprism bundle build/ --out release/")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A new folder for the bundle.")
@click.option("--include-failed", is_flag=True, help="Also bundle targets that failed their gates (marked FAIL).")
def bundle_cmd(build_dir: Path, out: Path, include_failed: bool) -> None:
    """Collect what ships: per target the artifact and its manifest, its results and a model card; SHA256SUMS over
    all; the original model referenced by sha256, never copied or modified. Check it with `quantprism verify OUT`."""
    from ..release.bundle import bundle

    b = bundle(build_dir, out, include_failed)
    click.echo(f"bundled {', '.join(b['targets'])} into {b['out']} ({b['files']} files); verify: quantprism verify {b['out']}")


@cli.command("drift", epilog="Example:  quantprism drift --calibration calib.jsonl --sample traffic.jsonl --build build/ --target q4km")
@click.option("--calibration", required=True, help="The calibration source the artifacts were built with.")
@click.option("--sample", required=True, help="A fresh traffic sample (.txt, .jsonl with \"text\", or a folder of .txt).")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="Thresholds from its [drift] table and the model from [defaults] (default: ./targets.toml if present).")
@click.option("--model", default=None, help="Model directory (tokenizer, and the original for the KLD check).")
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=None,
              help="Also measure a built target's KLD on the sample vs on the calibration text, in its runtime.")
@click.option("--target", default=None, help="The target of --build to measure.")
@click.option("--json", "as_json", is_flag=True, help="Print the measures as JSON.")
def drift_cmd(calibration: str, sample: str, targets_file: Path | None, model: str | None, build_dir: Path | None,
              target: str | None, as_json: bool) -> None:
    """Has traffic drifted from the calibration set? Token-distribution divergence, length mix and (with --build) the
    quantized model's KLD on the sample vs on the calibration set, each against [drift] thresholds. Exit 1 when
    re-calibration is due."""
    import json

    from ..config import parse_targets
    from ..errors import ConfigError
    from ..model import load_model_info

    path = targets_file or (DEFAULT_TARGETS if DEFAULT_TARGETS.is_file() else None)
    tf = parse_targets(path) if path else None
    if (build_dir is None) != (target is None):
        raise ConfigError("--build and --target go together (the KLD check measures one built target)")
    from ..release.drift import drift

    d = drift(calibration, sample, load_model_info(model or (tf.defaults.model if tf else None)), tf.drift if tf else None, build_dir, target)
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        lt = "n/a (fewer than 8 documents on a side)" if d["length_tv"] is None else f"{d['length_tv']:.3f}"
        click.echo(f"token distribution JS {d['token_js']:.3f} (max {d['thresholds']['max_token_js']:g}), length mix TV {lt}, "
                   f"tokens unseen in calibration {d['sample_unseen_token_share']:.1%}")
        if "kld_ratio" in d:
            click.echo(f"{d['target']}: KLD on the sample {d['kld_sample']:.6f} vs on the calibration text "
                       f"{d['kld_calibration']:.6f} ({d['kld_ratio']:.2f}×, max {d['thresholds']['max_kld_ratio']:g}×)")
        click.echo("re-calibration due: " + "; ".join(d["reasons"]) if d["due"] else "no re-calibration due")
    if d["due"]:
        raise click.exceptions.Exit(1)
