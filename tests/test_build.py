"""`quantprism build` / `quantprism report`: gates and exit codes, a runtime killed mid-target, the HTML report in
a real headless browser, deltas against a baseline. Two GGUF targets keep it fast (llama.cpp starts in ms)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require  # noqa: E402

require("llama_cpp", "make install builds llama-cpp-python")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

TOML = """
[defaults]
samples = 8
seq_len = 128

[target.q4km]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
method = "gptq"
[target.q4km.gates]
max_kld = {max_kld}
min_top1 = 0.5

[target.q8]
format = "gguf"
runtime = "llamacpp"
quant = "Q8_0"
method = "rtn"
[target.q8.gates]
max_kld = 0.01
"""


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPRISM_CACHE", str(tmp_path / "cache"))

    def make(max_kld: float = 0.05) -> Path:
        p = tmp_path / "targets.toml"
        p.write_text(TOML.format(max_kld=max_kld))
        return p

    return tmp_path, make


def _build(run_cli, toml: Path, out: Path, *extra: str):
    return run_cli("build", "--targets", toml, "--out", out, "--eval-chunks", "2", "--threads", "2", *extra)


def test_build_passes_then_an_impossible_gate_fails_with_exit_1(project, run_cli):
    tmp, make = project
    rc, out, err = _build(run_cli, make(), tmp / "b1", "--skip-bench")
    assert rc == 0, out + err
    doc = json.loads((tmp / "b1" / "results.json").read_text())
    assert doc["schema"] == "quantprism.build/1" and doc["passed"]
    rows = {r["name"]: r for r in doc["targets"]}
    assert set(rows) == {"q4km", "q8"}
    for r in rows.values():
        assert r["smoke"]["passed"] and r["kernel"] == "native" and r["files"] and r["size_bytes"] > 0
        assert 0 < r["quality"]["kld_mean"] < 0.05 and set(r["quality"]["slices"]) == {"long_context", "rare_tokens", "structured"}
        assert r["gates"]["max_kld"]["passed"] is True
    assert rows["q8"]["quality"]["kld_mean"] < rows["q4km"]["quality"]["kld_mean"]  # more bits, less divergence
    assert doc["original"]["quality"]["kld_mean"] < 1e-6  # the reference row scores itself
    assert {"cpu", "isa", "cores", "packages"} <= set(doc["environment"])
    assert "q4km" in (tmp / "b1" / "report.md").read_text()

    rc, out, err = _build(run_cli, make(max_kld=1e-9), tmp / "b2", "--skip-bench")
    assert rc == 1, out + err
    report = (tmp / "b2" / "report.md").read_text()
    assert "GATES FAILED" in report
    assert "q4km: gate max_kld failed" in report
    doc = json.loads((tmp / "b2" / "results.json").read_text())
    assert not doc["passed"] and [r["passed"] for r in doc["targets"]] == [False, True]


def test_runtime_killed_mid_target_others_finish(project, run_cli, monkeypatch):
    tmp, make = project
    monkeypatch.setenv("QUANTPRISM_TEST_KILL_TARGET", "q4km")  # the worker SIGKILLs itself after opening llama.cpp
    # and a memory allowance below what the original model needs in torch: its row is not run, the targets are
    rc, out, err = _build(run_cli, make(), tmp / "b", "--skip-bench", "--max-memory", "100MB")
    assert rc == 1
    doc = json.loads((tmp / "b" / "results.json").read_text())
    rows = {r["name"]: r for r in doc["targets"]}
    assert rows["q4km"]["status"] == "error" and "killed by signal 9" in rows["q4km"]["error"]
    assert rows["q8"]["passed"] and rows["q8"]["quality"]["kld_mean"] > 0
    assert doc["original"]["status"] == "skipped" and "0.1 GB allowed" in doc["original"]["reason"]
    assert not (tmp / "b" / ".work").exists()  # scratch goes, and with it the worker logs: the row keeps the tail
    assert "log_tail" in rows["q4km"]
    report = (tmp / "b" / "report.md").read_text()
    assert "reference not run" in report and "speed-ups against it are not measured" in report


def test_ctrl_c_during_export_leaves_nothing_half_written_and_rerun_resumes(project, run_cli, monkeypatch):
    """Ctrl-C in the middle of writing the second GGUF: exit 130, no artifact and no temp file for it; the first
    target's finished export is reused by the rerun (not rewritten), the second is written, and both are
    byte-identical to an uninterrupted build."""
    import gguf

    from quantprism.pipeline import build as build_mod

    tmp, make = project
    real_write = gguf.GGUFWriter.write_tensor_data
    written = {"q8": 0}

    def write_then_interrupt(self, tensor, *a, **kw):
        if "/q8/" in str(self.path):
            written["q8"] += 1
            if written["q8"] == 5:
                raise KeyboardInterrupt
        return real_write(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_then_interrupt)
    rc, out, err = _build(run_cli, make(), tmp / "b", "--skip-bench")
    assert rc == 130 and "run the same command again" in err, out + err
    assert written["q8"] == 5
    q4 = sorted((tmp / "b" / "q4km").glob("*.gguf"))
    assert len(q4) == 1 and list((tmp / "cache" / "exports").glob("done-*.json"))  # its resume marker, in the cache
    assert not (tmp / "b" / ".work").exists()
    assert not list((tmp / "b" / "q8").rglob("*.gguf")) and not list((tmp / "b").rglob("*.tmp"))
    assert not (tmp / "b" / "results.json").exists()
    q4_bytes, q4_mtime = q4[0].read_bytes(), q4[0].stat().st_mtime_ns

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real_write)
    exported = []
    real_export = build_mod.export_target
    monkeypatch.setattr(build_mod, "export_target", lambda t, *a, **kw: exported.append(t.name) or real_export(t, *a, **kw))
    rc, out, err = _build(run_cli, make(), tmp / "b", "--skip-bench")
    assert rc == 0, out + err
    assert exported == ["q8"]  # q4km's export was finished: reused
    rows = {r["name"]: r for r in json.loads((tmp / "b" / "results.json").read_text())["targets"]}
    assert rows["q4km"].get("export_resumed") and not rows["q8"].get("export_resumed")
    assert q4[0].read_bytes() == q4_bytes and q4[0].stat().st_mtime_ns == q4_mtime
    rc, out, err = _build(run_cli, make(), tmp / "clean", "--skip-bench")
    assert rc == 0, out + err
    for name in ("q4km", "q8"):
        (a,), (b,) = (list((tmp / d / name).glob("*.gguf")) for d in ("b", "clean"))
        assert a.read_bytes() == b.read_bytes(), name


def test_bad_input_is_one_line_exit_2(project, run_cli):
    from conftest import assert_one_line_error

    tmp, make = project
    rc, _, err = _build(run_cli, make(), tmp / "b", "--only", "nope")
    assert_one_line_error(rc, err, "no target named 'nope'")
    rc, _, err = run_cli("report", tmp / "missing.json")
    assert_one_line_error(rc, err, "no such results file")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (scripts/install.sh installs it when root)")
def test_html_report_renders_in_headless_chromium_and_baseline_deltas(project, run_cli):
    from PIL import Image

    tmp, make = project
    rc, out, err = _build(run_cli, make(), tmp / "b")
    assert rc in (0, 1), out + err  # latency gates are not set: quality decides
    doc = json.loads((tmp / "b" / "results.json").read_text())
    q4 = next(r for r in doc["targets"] if r["name"] == "q4km")
    assert q4["latency"]["decode_tok_s_p50"] > 0 and q4["latency"]["repeats"] == 5
    html = tmp / "b" / "report.html"
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1400,1000"]
    dom = subprocess.run(base + ["--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="summary"' in dom and "q4km" in dom and f"{q4['quality']['kld_mean']:.6f}" in dom
    assert dom.count("<svg") == 2 and "<circle" in dom and "tok/s" in dom
    png = tmp / "shot.png"
    subprocess.run(base + [f"--screenshot={png}", html.as_uri()], capture_output=True, timeout=120, check=True)
    img = Image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # not a blank page: text, table fills, plot marks

    prev = json.loads((tmp / "b" / "results.json").read_text())
    for r in prev["targets"]:
        r["quality"]["kld_mean"] /= 2  # the previous release was better: now a regression
    (tmp / "prev.json").write_text(json.dumps(prev))
    rc, out, err = run_cli("report", tmp / "b" / "results.json", "--baseline", tmp / "prev.json", "--out", tmp / "r")
    assert rc == 0, err
    assert "+100.0% ⚠" in (tmp / "r" / "report.md").read_text()
