"""`quantprism bundle BUILD_DIR --out DIR`: what ships. Per target: ``<target>/artifact/`` (the artifact's files and
its manifest, byte for byte), ``<target>/results.json`` (its row of the build), ``<target>/MODEL_CARD.md`` (how it
was quantized, why this configuration won — its gates and the other targets side by side —, quality per slice,
speed, the rollback line). At the top: ``bundle.json`` (the original model referenced by path and sha256, never
copied or modified) and ``SHA256SUMS`` over every file. `quantprism verify DIR` checks a bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..manifest import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from ..report.render import fmt_cell
from .artifact import MANIFEST, read_manifest

BUNDLE = "bundle.json"
SUMS = "SHA256SUMS"


def model_card(row: dict, doc: dict, manifest: dict, build_dir: Path) -> str:
    q, lat = row.get("quality") or {}, row.get("latency") or {}
    cal = manifest["calibration"]
    lines = [f"# {row['name']} — {row['scheme']} for {row['runtime']} ({row['hardware']})", "",
             f"Quantized from `{doc['model']['path']}` (weights sha256 `{doc['model']['weights_sha256']}`, "
             f"{doc['model']['n_params']:,} parameters, {doc['model']['architecture']}). The original is referenced, "
             "not shipped: it stays the rollback target.", "",
             "## How it was quantized", "",
             f"- method `{row['method']}`, scheme `{row['scheme']}`, format `{row['format']}`, grids "
             f"{', '.join(f'`{g}`' for g in manifest['grids'])}"
             + (f", mixed precision: {len(row['plan']['protected'])} tensors kept higher" if row.get("plan") else ""),
             f"- calibration: `{cal['source']}`, {cal['samples']} × {cal['seq_len']} tokens, seed {cal['seed']}, "
             f"sha256 `{cal['sha256']}`",
             f"- canonical result `{manifest['canonical_key']}`; settings sha256 `{manifest['target']['settings_sha256'][:16]}…`",
             f"- built with quantprism {manifest['versions']['quantprism']}, "
             + ", ".join(f"{k} {v}" for k, v in manifest["versions"]["runtime"].items()) + f"; built on `{manifest['built_on']}`, "
             f"validated on `{row.get('validated_on')}`" + ("" if row.get("hardware_match", True) else
                                                             f" (lacks {', '.join(row.get('hardware_missing') or [])}: "
                                                             "validated with another arithmetic than the deployment's)"),
             "", "## Why this configuration", "",
             f"Verdict: **{'PASS' if row.get('passed') else 'FAIL'}** — every gate of targets.toml:", "",
             "| gate | limit | measured | |", "|---|---|---|---|"]
    for g, v in (row.get("gates") or {}).items():
        lines.append(f"| {g} | {v['limit']:g} | {fmt_cell(v['value'], '{:.6g}')} | "
                     f"{'pass' if v['passed'] else 'skipped' if v['passed'] is None else 'FAIL'} |")
    lines += ["", "Side by side with the original and the other targets of the same build (same calibration, same "
                  "evaluation text, each in its own runtime):", "",
              "| target | runtime | size MB | KLD | top-1 | PPL ratio | decode tok/s | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in [doc["original"], *doc["targets"]]:
        rq, rl = r.get("quality") or {}, r.get("latency") or {}
        name = f"**{r['name']}**" if r["name"] == row["name"] else r["name"]
        verdict = "reference" if r["name"] == "original" else ("PASS" if r.get("passed") else "FAIL")
        lines.append(f"| {name} | {r['runtime']} | {fmt_cell(r.get('size_mb'), '{:.2f}')} | {fmt_cell(rq.get('kld_mean'), '{:.6f}')} | "
                     f"{fmt_cell(rq.get('top1_agreement'), '{:.4f}')} | {fmt_cell(rq.get('ppl_ratio'), '{:.4f}')} | "
                     f"{fmt_cell(rl.get('decode_tok_s_p50'), '{:.1f}')} | {verdict} |")
    lines += ["", "## Quality on each slice", "", "| slice | KLD | top-1 |", "|---|---|---|",
              f"| all ({q.get('n_tokens', '?')} tokens) | {fmt_cell(q.get('kld_mean'), '{:.6f}')} | {fmt_cell(q.get('top1_agreement'), '{:.4f}')} |"]
    for k, s in (q.get("slices") or {}).items():
        lines.append(f"| {k} | {fmt_cell(s.get('kld_mean'), '{:.6f}')} | {fmt_cell(s.get('top1_agreement'), '{:.4f}')} |")
    lines += ["", "## Speed", ""]
    if lat:
        lines.append(f"{lat.get('threads')} threads, {lat.get('prompt_tokens')}-token prompt: TTFT {fmt_cell(lat.get('ttft_ms_p50'), '{:.1f}')} ms, "
                     f"prefill {fmt_cell(lat.get('prefill_tok_s'), '{:.0f}')} tok/s, decode {fmt_cell(lat.get('decode_tok_s_p50'), '{:.1f}')} "
                     f"tok/s p50 ({fmt_cell(lat.get('decode_speedup'), '{:.2f}')}× the original), peak RSS "
                     f"{fmt_cell(lat.get('peak_rss_mb'), '{:.0f}')} MB.")
    else:
        lines.append("Not measured in this build (--skip-bench or an emulated kernel).")
    lines += ["", "## Ship and roll back", "",
              f"    quantprism serve {build_dir} --baseline original --candidate {row['name']} --share 0.1",
              f"    quantprism rollback {build_dir}        # everyone back on the original, on the next request", "",
              "Verify this folder before deploying: `quantprism verify <bundle>`.", ""]
    return "\n".join(lines)


def bundle(build_dir: Path, out: Path, include_failed: bool = False) -> dict:
    from ..report.results import load_results

    build_dir, out = Path(build_dir), Path(out)
    doc = load_results(build_dir / "results.json")
    rows = [r for r in doc.get("targets", []) if r.get("status") == "ok" and (r.get("passed") or include_failed)]
    if not rows:
        raise ConfigError(f"{build_dir}: no target passed its gates; fix them or pass --include-failed")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; bundle into a new folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shipped = []
    for r in rows:
        src = build_dir / r["name"]
        if not (src / MANIFEST).is_file():
            raise ConfigError(f"{src}: no {MANIFEST}; rebuild {r['name']} with this version")
        m = read_manifest(src / MANIFEST)
        dst = tmp / r["name"]
        for rel in [*m["files"], MANIFEST]:
            (dst / "artifact" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / "artifact" / rel)
        write_json_atomic(dst / "results.json", r)
        write_text_atomic(dst / "MODEL_CARD.md", model_card(r, doc, m, build_dir))
        shipped.append({"target": r["name"], "passed": r.get("passed"), "artifact": f"{r['name']}/artifact/{m['artifact']['path']}",
                        "sha256": m["artifact"]["sha256"]})
    write_json_atomic(tmp / BUNDLE, {"kind": "quantprism-bundle", "original": doc["model"], "calibration": doc["calibration"],
                                     "targets": shipped})
    sums = "".join(f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}\n" for p in sorted(tmp.rglob("*"))
                   if p.is_file() and p.name != SUMS)
    with atomic_path(tmp / SUMS) as t:
        t.write_text(sums, encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # the bundle appears whole or not at all
    return {"out": str(out), "targets": [s["target"] for s in shipped], "files": sums.count("\n")}


def verify_bundle(root: Path) -> list[dict]:
    """SHA256SUMS over the bundle, then each target's manifest against its artifact folder (each file hashed once)."""
    from .artifact import SCRATCH, compare_files, verify_manifest

    root = Path(root)
    listed = {}
    for line in (root / SUMS).read_text(encoding="utf-8").splitlines():
        sha, _, rel = line.partition("  ")
        listed[rel] = sha
    now = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != SUMS}
    out = [{"target": "bundle (SHA256SUMS)", "manifest": str(root / SUMS), **compare_files(listed, now)}]
    for t in json.loads((root / BUNDLE).read_text())["targets"]:
        prefix = f"{t['target']}/artifact/"
        files = {k[len(prefix):]: v for k, v in now.items() if k.startswith(prefix)}
        files = {k: v for k, v in files.items() if k != MANIFEST and not k.startswith(SCRATCH)}
        out.append(verify_manifest(root / prefix / MANIFEST, files))
    return out
