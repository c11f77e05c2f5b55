"""report.md (fits a CI step summary) and report.html (self-contained: tables + two inline SVG plots)."""
from __future__ import annotations

import html
import math
from pathlib import Path

from ..manifest import write_text_atomic
from .results import get as _get

COLUMNS = [("size MB", ("size_mb",), "{:.2f}"), ("bits/w", ("bits_per_weight",), "{:.2f}"),
           ("KLD", ("quality", "kld_mean"), "{:.6f}"), ("KLD p99", ("quality", "kld_p99"), "{:.5f}"),
           ("top-1", ("quality", "top1_agreement"), "{:.4f}"), ("PPL ratio", ("quality", "ppl_ratio"), "{:.4f}"),
           ("TTFT ms", ("latency", "ttft_ms_p50"), "{:.1f}"), ("prefill tok/s", ("latency", "prefill_tok_s"), "{:.0f}"),
           ("decode tok/s p50", ("latency", "decode_tok_s_p50"), "{:.1f}"), ("p95", ("latency", "decode_tok_s_p95"), "{:.1f}"),
           ("RSS MB", ("latency", "peak_rss_mb"), "{:.0f}")]
LOWER_IS_BETTER = {"KLD", "KLD p99", "PPL ratio", "TTFT ms", "RSS MB", "size MB", "bits/w"}


def fmt_cell(v, f: str) -> str:
    if isinstance(v, float) and -1e-5 < v < 0:
        v = 0.0  # the uint16 base encoding leaves the reference row a rounding hair below zero
    return "–" if v is None else f.format(v)


def _machine(doc: dict) -> str:
    """The hardware label of the machine(s) that validated the build (several after `report --merge`)."""
    parts = doc.get("merged_from") or [{"machine": (doc["environment"].get("machine") or {})}]
    labels = [(p.get("machine") or {}).get("label") or (p.get("machine") or {}).get("kind", "?") for p in parts]
    return ", ".join(dict.fromkeys(labels))


def _task_lines(doc: dict) -> list[str]:
    """Task × target: the metric ± its standard error; for targets the paired difference to the original [95 % CI]."""
    names = list(dict.fromkeys(k for r in _rows(doc) for k in (r.get("tasks") or {})))
    if not names:
        return []
    lines = ["", "Tasks (lm-eval, each in the target's runtime; difference to the original with a 95 % bootstrap "
                 "interval, answer agreement):", "", "| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in _rows(doc):
        cells = []
        for n in names:
            t = (r.get("tasks") or {}).get(n)
            if t is None:
                cells.append("–" if not r.get("tasks_error") else "error")
                continue
            cell = f"{t['metric']} {t['value']:.3f}" + (f" ± {t['stderr']:.3f}" if t.get('stderr') is not None else "")
            if t.get("diff") is not None:
                cell += f" ({t['diff']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}], agree {t['agreement']:.0%})"
            cells.append(cell)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def _rows(doc: dict) -> list[dict]:
    return [doc["original"], *doc["targets"]]


def _verdict(row: dict) -> str:
    if row["name"] == "original":
        if row.get("status") == "skipped":
            return "reference not run"
        return "reference" + (f", {row['dtype']}" if row.get("dtype") not in (None, "float32") else "")
    return "PASS" if row.get("passed") else "FAIL"


def _parity(row: dict) -> str:
    """Tokenization parity in one cell: whose tokenizer, evaluation text, stress set."""
    p = row.get("tokenizer_parity")
    if not p:
        return "–"
    if p["tokenizer"] == "hf":
        return "HF tokenizer"
    ev = "same ids" if p["eval"]["equal"] else f"DIFFERS at {p['eval']['first_difference']['position']}"
    return f"own: {ev}, stress {p['stress']['equal']}/{p['stress']['total']}{' (strict)' if p['mode'] == 'strict' else ''}"


def _failures(doc: dict) -> list[str]:
    out = []
    for r in doc["targets"]:
        if r.get("error"):
            out.append(f"{r['name']}: {r['error']}")
        smoke = r.get("smoke") or {}
        bad = [k for k, ok in (smoke.get("checks") or {}).items() if not ok]
        if bad:
            f = (smoke.get("details") or {}).get("fidelity") or {}
            why = (f" (vs the canonical model: top-1 on decisive tokens {f['top1_decisive']:.4f}, KLD {f['kld_mean']:.3g})"
                   if "fidelity" in bad and f else "")
            out.append(f"{r['name']}: smoke failed: {', '.join(bad)}{why}")
        p = r.get("tokenizer_parity") or {}
        if p.get("passed") is False:
            d = p["eval"].get("first_difference")
            out.append(f"{r['name']}: tokenization parity failed: " + (
                f"evaluation text differs at token {d['position']} (HF {d['hf']} vs runtime {d['runtime']})" if d else
                f"{p['stress']['total'] - p['stress']['equal']} stress texts differ (strict), e.g. "
                f"{p['stress']['examples'][0]['text']!r}: HF {p['stress']['examples'][0]['hf']} vs runtime "
                f"{p['stress']['examples'][0]['runtime']}"))
        for g, v in (r.get("gates") or {}).items():
            if v["passed"] is False:
                val = "not measured" if v["value"] is None else f"{v['value']:.6g}"
                out.append(f"{r['name']}: gate {g} failed: {val} vs limit {v['limit']:g}")
    return out


def _delta(cur, old, name: str) -> str:
    if cur is None or old is None or old == 0:
        return ""
    d = (cur - old) / abs(old)
    worse = d > 0.02 if name in LOWER_IS_BETTER else d < -0.02
    return f" ({d:+.1%}{' ⚠' if worse else ''})"


def _shadow_lines(doc: dict, shadow: list[dict]) -> list[str]:
    """Live shadow compares (`quantprism serve --shadow`) beside each candidate's offline KLD."""
    from ..serve.shadow import summarize

    offline = {r["name"]: _get(r, ("quality", "kld_mean")) for r in doc["targets"]}
    lines = ["", "Live shadow compare (serve/shadow.jsonl; the candidate re-runs sampled baseline requests off the "
                 "response path; KLD teacher-forced on the baseline's output):", "",
             "| candidate | baseline | shadowed | skipped | exact match | live KLD mean | live KLD p95 | offline KLD | "
             "first divergence (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for (base, cand) in sorted({(r.get("baseline", "?"), r.get("candidate", "?")) for r in shadow}):
        s = summarize([r for r in shadow if (r.get("baseline", "?"), r.get("candidate", "?")) == (base, cand)])
        lines.append(f"| {cand} | {base} | {s['shadowed']} | {s['skipped']} | {fmt_cell(s['exact_match'], '{:.1%}')} | "
                     f"{fmt_cell(s['kld_mean'], '{:.6f}')} | {fmt_cell(s['kld_p95'], '{:.6f}')} | {fmt_cell(offline.get(cand), '{:.6f}')} | "
                     f"{fmt_cell(s['first_divergence_median'], '{:.0f}')} |")
    return lines


def render_md(doc: dict, baseline: dict | None = None, shadow: list[dict] | None = None) -> str:
    old = {r["name"]: r for r in _rows(baseline)} if baseline else {}
    head = ["target", "runtime", "kernel", "verdict", "tokenizer"] + [c[0] for c in COLUMNS]
    lines = [f"## quantprism build — {'all gates pass' if doc['passed'] else 'GATES FAILED'}", "",
             f"Model `{doc['model']['path']}` ({doc['model']['n_params']:,} params), calibration sha256 "
             f"`{doc['calibration']['sha256'][:12]}…`, {doc['environment']['cpu']} ({', '.join(doc['environment']['isa'][-4:])}), "
             f"{doc['eval']['threads']} threads, machine `{_machine(doc)}`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _rows(doc):
        cells = [r["name"], r["runtime"], r.get("kernel", "–"), _verdict(r), _parity(r)]
        for name, path, f in COLUMNS:
            v = _get(r, path)
            cells.append(fmt_cell(v, f) + (_delta(v, _get(old[r["name"]], path), name) if r["name"] in old else ""))
        lines.append("| " + " | ".join(cells) + " |")
    slices = sorted({k for r in doc["targets"] for k in (_get(r, ("quality", "slices")) or {})})
    if slices:
        lines += ["", "Hard slices — KLD / top-1:", "", "| target | " + " | ".join(slices) + " |", "|---|" + "---|" * len(slices)]
        for r in doc["targets"]:
            sl = _get(r, ("quality", "slices")) or {}
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{sl[k]['kld_mean']:.6f} / {sl[k]['top1_agreement']:.3f}" if k in sl else "–" for k in slices) + " |")
    lines += _task_lines(doc)
    other = [f"{r['name']} ({r['hardware']}: lacks {', '.join(r.get('hardware_missing') or []) or '?'})"
             for r in doc["targets"] if r.get("hardware_match") is False]
    if other:
        lines += ["", f"Built for hardware this machine does not satisfy: {'; '.join(other)} — validated here with this "
                      "machine's arithmetic, which is not the deployment's; its CI job on that label validates it."]
    emulated = [r["name"] for r in doc["targets"] if r.get("kernel") not in (None, "native")]
    if emulated:
        lines += ["", f"Kernel `emulated-wna16` ({', '.join(emulated)}): vLLM's 4-bit op emulated on a CPU without the "
                      "native kernel; correctness only, excluded from speed comparisons."]
    orig = doc["original"]
    if orig.get("status") == "skipped" or orig.get("dtype_reason"):
        lines += ["", f"Original model in torch: {orig.get('reason') or orig.get('dtype_reason')} — speed-ups against it "
                      + ("are not measured." if orig.get("status") == "skipped" else f"are against {orig['dtype']}.")]
    fails = _failures(doc)
    if fails:
        lines += ["", "**Failures:**", ""] + [f"- {f}" for f in fails]
    if shadow:
        lines += _shadow_lines(doc, shadow)
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in doc["seconds"].items())]
    return "\n".join(lines) + "\n"


def _svg_scatter(points: list[tuple[str, float, float]], w: int = 640, h: int = 320) -> str:
    """Quality vs size: x = MB, y = KLD on a log axis."""
    pts = [(n, x, y) for n, x, y in points if x and y and y > 0]
    if not pts:
        return "<p>no quality data</p>"
    xs, ys = [p[1] for p in pts], [math.log10(p[2]) for p in pts]
    x0, x1 = 0, max(xs) * 1.4  # room for labels
    y0, y1 = min(ys) - 0.3, max(ys) + 0.3
    def px(x): return 50 + (x - x0) / (x1 - x0) * (w - 70)
    def py(y): return h - 40 - (y - y0) / (y1 - y0) * (h - 60)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="quality vs size">',
           f'<line x1="50" y1="{h-40}" x2="{w-20}" y2="{h-40}" stroke="#333"/><line x1="50" y1="20" x2="50" y2="{h-40}" stroke="#333"/>',
           f'<text x="{w/2}" y="{h-8}" text-anchor="middle" font-size="12">artifact size (MB)</text>',
           f'<text x="12" y="{h/2}" font-size="12" transform="rotate(-90 12 {h/2})" text-anchor="middle">mean KLD (log)</text>']
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        if y0 <= e <= y1:
            out.append(f'<text x="46" y="{py(e)+4:.1f}" font-size="10" text-anchor="end">1e{e}</text>')
    for i in range(5):
        xv = x1 * i / 4
        out.append(f'<text x="{px(xv):.1f}" y="{h-26}" font-size="10" text-anchor="middle">{xv:.3g}</text>')
    for n, x, y in pts:
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(math.log10(y)):.1f}" r="5" fill="#2a6fdb"><title>{html.escape(n)}</title></circle>'
                   f'<text x="{px(x)+7:.1f}" y="{py(math.log10(y))-6:.1f}" font-size="11">{html.escape(n)}</text>')
    return "\n".join(out + ["</svg>"])


def _svg_bars(bars: list[tuple[str, float, bool]], w: int = 560) -> str:
    """Decode tok/s per target; hatched grey = emulated kernel (not a speed figure)."""
    bars = [b for b in bars if b[1]]
    if not bars:
        return "<p>no latency data (--skip-bench)</p>"
    h = 30 + 26 * len(bars)
    top = max(b[1] for b in bars)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="decode speed">']
    for i, (n, v, native) in enumerate(bars):
        y = 10 + 26 * i
        bw = (w - 260) * v / top
        out.append(f'<text x="170" y="{y+15}" font-size="11" text-anchor="end">{html.escape(n)}</text>'
                   f'<rect x="175" y="{y}" width="{bw:.1f}" height="20" fill="{"#2a9d5c" if native else "#bbb"}"/>'
                   f'<text x="{180+bw:.1f}" y="{y+15}" font-size="11">{v:.1f} tok/s{"" if native else " (emulated)"}</text>')
    return "\n".join(out + ["</svg>"])


def _svg_task_drops(doc: dict, w: int = 640) -> str:
    """Forest plot: each target's paired difference to the original per task, with its 95 % bootstrap interval
    (red: the interval lies below zero — a drop the documents support; dashed: a max_task_drop limit)."""
    rows = [(task, r["name"], t) for task in dict.fromkeys(k for r in doc["targets"] for k in (r.get("tasks") or {}))
            for r in doc["targets"] if (t := (r.get("tasks") or {}).get(task)) and t.get("diff") is not None]
    if not rows:
        return "<p>no task results</p>"
    lims = [g["limit"] for r in doc["targets"] for k, g in (r.get("gates") or {}).items() if k.startswith("max_task_drop")]
    span = max([abs(x) for _, _, t in rows for x in (t["ci95"] or [t["diff"]])] + [abs(-x) for x in lims] + [0.02]) * 1.15
    h, left = 30 + 18 * len(rows) + 30, 230
    def px(x): return left + (x + span) / (2 * span) * (w - left - 20)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="task drops">',
           f'<line x1="{px(0):.1f}" y1="10" x2="{px(0):.1f}" y2="{h-30}" stroke="#333"/>']
    for lim in sorted(set(lims)):
        out.append(f'<line x1="{px(-lim):.1f}" y1="10" x2="{px(-lim):.1f}" y2="{h-30}" stroke="#c33" stroke-dasharray="4 3">'
                   f'<title>max_task_drop {lim:g}</title></line>')
    for i, (task, name, t) in enumerate(rows):
        y = 22 + 18 * i
        lo, hi = t["ci95"] or (t["diff"], t["diff"])
        col = "#c33" if hi < 0 else "#2a6fdb"
        out.append(f'<text x="{left-8}" y="{y+4}" font-size="11" text-anchor="end">{html.escape(task)} · {html.escape(name)}</text>'
                   f'<line x1="{px(lo):.1f}" y1="{y}" x2="{px(hi):.1f}" y2="{y}" stroke="{col}" stroke-width="2"/>'
                   f'<circle cx="{px(t["diff"]):.1f}" cy="{y}" r="4" fill="{col}"><title>{t["diff"]:+.3f} [{lo:+.3f}, {hi:+.3f}]'
                   f'</title></circle>')
    for xv in (-span / 1.15, 0.0, span / 1.15):
        out.append(f'<text x="{px(xv):.1f}" y="{h-14}" font-size="10" text-anchor="middle">{xv:+.3f}</text>')
    out.append(f'<text x="{px(0):.1f}" y="{h-2}" font-size="11" text-anchor="middle">difference to the original (metric units)</text>')
    return "\n".join(out + ["</svg>"])


def render_html(doc: dict, baseline: dict | None = None, shadow: list[dict] | None = None) -> str:
    md_rows = _rows(doc)
    head = ["target", "runtime", "kernel", "verdict", "tokenizer"] + [c[0] for c in COLUMNS]
    trs = []
    for r in md_rows:
        cls = "ref" if r["name"] == "original" else ("pass" if r.get("passed") else "fail")
        cells = [r["name"], r["runtime"], r.get("kernel", "–"), _verdict(r), _parity(r)] + [fmt_cell(_get(r, p), f) for _, p, f in COLUMNS]
        trs.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    scatter = _svg_scatter([(r["name"], r.get("size_mb"), _get(r, ("quality", "kld_mean"))) for r in doc["targets"]])
    bars = _svg_bars([(r["name"], _get(r, ("latency", "decode_tok_s_p50")), r.get("kernel") == "native") for r in md_rows])
    fails = "".join(f"<li>{html.escape(f)}</li>" for f in _failures(doc))
    verdict = "all gates pass" if doc["passed"] else "GATES FAILED"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>quantprism build report</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}
tr.fail td{{background:#fde2e2}} tr.pass td{{background:#e6f6ea}} tr.ref td{{background:#eef2f7}}
.plots{{display:flex;gap:32px;flex-wrap:wrap}}</style></head>
<body><h1 id="verdict">quantprism build — {verdict}</h1>
<p>Model {html.escape(doc['model']['path'])} · {doc['model']['n_params']:,} params · {html.escape(doc['environment']['cpu'])} · {doc['eval']['threads']} threads</p>
<table id="summary"><thead><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr></thead><tbody>{''.join(trs)}</tbody></table>
{f'<h2>Failures</h2><ul id="failures">{fails}</ul>' if fails else ''}
<div class="plots"><figure><figcaption>Quality vs size</figcaption>{scatter}</figure>
<figure><figcaption>Decode speed per backend</figcaption>{bars}</figure>
{f'<figure id="task-drops"><figcaption>Task differences to the original, 95 % intervals</figcaption>{_svg_task_drops(doc)}</figure>' if any(r.get("tasks") for r in doc["targets"]) else ''}</div>
<pre>{html.escape(render_md(doc, baseline, shadow))}</pre>
</body></html>
"""


def write_reports(doc: dict, out: Path, baseline: dict | None = None, shadow: list[dict] | None = None) -> None:
    write_text_atomic(out / "report.md", render_md(doc, baseline, shadow))
    write_text_atomic(out / "report.html", render_html(doc, baseline, shadow))
