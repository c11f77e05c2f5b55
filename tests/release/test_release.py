"""The release pipeline: manifests and `verify`, `stale` (each of its five causes), `report --merge` of partial
builds (equal to the full build's report), the generated CI workflow (current and schema-valid), byte-identical
rebuilds for every format."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGETS = """
[defaults]
samples = 8
seq_len = 128

[hardware.fleet-vnni]
features = ["avx2", "avx512_vnni"]
runner = ["self-hosted", "vnni"]
extras = ["onnx"]

[target.q4km]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
hardware = "cpu-x86-avx2"
[target.q4km.gates]
max_size_mb = 4.0

[target.int8]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits8"
group_size = 32
hardware = "fleet-vnni"
[target.int8.gates]
max_size_mb = 13.0
"""


def qp(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantprism.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The CI flow on two labels: the canonical job, then the full build and one partial build per label from its cache."""
    root = tmp_path_factory.mktemp("release")
    (root / "targets.toml").write_text(TARGETS)
    env = {**os.environ, "QUANTPRISM_CACHE": str(root / "cache")}
    r = qp("quantize", "--targets", "targets.toml", "--quiet", cwd=root, env=env)
    assert r.returncode == 0, r.stderr
    canonical = sorted(p.name for p in (root / "cache" / "canonical").iterdir())
    for out, only in (("full", ()), ("a", ("--only", "q4km")), ("b", ("--only", "int8"))):
        r = qp("build", "--targets", "targets.toml", *only, "--out", out, "--skip-bench", "--quiet", cwd=root, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # every build, the partial ones too, used the canonical job's result: no other canonical result was computed
    assert sorted(p.name for p in (root / "cache" / "canonical").iterdir()) == canonical
    return root, env


def _report_body(md: str) -> str:
    return "\n".join(ln for ln in md.splitlines() if not ln.startswith("Seconds:"))  # job times differ, nothing else


def test_merge_of_partial_builds_equals_the_full_build(builds):
    from quantprism.report.render import render_md

    root, env = builds
    r = qp("report", "--merge", "a/results.json", "b/results.json", "--targets", "targets.toml", "--out", "merged",
           cwd=root, env=env)
    assert r.returncode == 0, r.stderr
    merged = json.loads((root / "merged" / "results.json").read_text())
    full = json.loads((root / "full" / "results.json").read_text())
    assert [t["name"] for t in merged["targets"]] == ["q4km", "int8"] and merged["passed"] is full["passed"] is True
    assert _report_body(render_md(merged)) == _report_body(render_md(full))
    assert _report_body((root / "merged" / "report.md").read_text()) == _report_body((root / "full" / "report.md").read_text())
    # the merge refuses builds whose numbers are not comparable, and a target given twice
    other = json.loads((root / "b" / "results.json").read_text())
    other["calibration"]["sha256"] = "0" * 64
    (root / "other.json").write_text(json.dumps(other))
    r = qp("report", "--merge", "a/results.json", "other.json", "--out", "m2", cwd=root, env=env)
    assert r.returncode == 2 and "calibration.sha256" in r.stderr and "Traceback" not in r.stderr
    r = qp("report", "--merge", "a/results.json", "full/results.json", "--out", "m3", cwd=root, env=env)
    assert r.returncode == 2 and "q4km is in both" in r.stderr


def test_manifest_records_the_inputs_and_verify_catches_every_change(builds, tmp_path):
    root, env = builds
    m = json.loads((root / "full" / "q4km" / "manifest.json").read_text())
    assert m["artifact"]["path"] == "model.gguf" and len(m["artifact"]["sha256"]) == 64
    for key in ("model", "calibration", "recipe", "grids", "versions", "hardware", "built_on", "canonical_key"):
        assert m[key], key
    assert m["calibration"]["samples"] == 8 and m["versions"]["runtime"]["llama_cpp_python"]
    assert m["hardware"] == {"label": "cpu-x86-avx2", "features": ["avx2", "fma", "f16c"]}
    r = qp("verify", root / "full")
    assert r.returncode == 0 and r.stdout.count(": OK") == 2, r.stdout + r.stderr
    build = tmp_path / "copy"
    shutil.copytree(root / "full", build)
    gguf = build / "q4km" / "model.gguf"
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 1
    gguf.write_bytes(bytes(data))
    (build / "int8" / "stray.txt").write_text("x")
    r = qp("verify", build)
    assert r.returncode == 1 and "q4km: FAILED — changed model.gguf" in r.stdout and "unlisted stray.txt" in r.stdout
    r = qp("verify", gguf)  # an artifact finds the manifest beside it
    assert r.returncode == 1 and "changed model.gguf" in r.stdout
    (build / "int8" / "stray.txt").unlink()
    next((build / "int8").rglob("*.onnx")).unlink()
    r = qp("verify", build / "int8")
    assert r.returncode == 1 and "missing" in r.stdout
    r = qp("verify", tmp_path)
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr


def _stale(root: Path, env: dict, build: Path, *args) -> tuple[int, dict]:
    r = qp("stale", build, "--json", *args, cwd=root, env=env)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, {row["target"]: sorted({w["cause"] for w in row["reasons"]}) for row in json.loads(r.stdout)}


def test_stale_names_each_cause(builds, tmp_path):
    root, env = builds
    build = tmp_path / "b"  # stale reads results.json and the manifests only
    for f in ["results.json", *(p.relative_to(root / "full") for p in (root / "full").glob("*/manifest.json"))]:
        (build / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "full" / f, build / f)
    assert _stale(root, env, build, "--targets", "targets.toml") == (0, {"q4km": [], "int8": []})
    # 1. model: the same architecture with one weight changed
    from quantprism.model import load_model_info

    src = load_model_info(None).path
    model = tmp_path / "model"
    shutil.copytree(src, model)
    st = next(model.glob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-8] ^= 1
    st.write_bytes(bytes(data))
    assert _stale(root, env, build, "--targets", "targets.toml", "--model", model) == (1, {"q4km": ["model"], "int8": ["model"]})
    # 2. calibration: other text
    heldout = src.parent / "eval_heldout.txt"
    assert _stale(root, env, build, "--targets", "targets.toml", "--calibration", heldout) == (
        1, {"q4km": ["calibration"], "int8": ["calibration"]})
    # 3. settings of one target, 5. its hardware label
    changed = tmp_path / "t.toml"
    changed.write_text(TARGETS.replace('quant = "Q4_K_M"', 'quant = "Q4_K_M"\ndamp = 0.02')
                       .replace('hardware = "fleet-vnni"', 'hardware = "cpu-x86-avx2"'))
    code, causes = _stale(root, env, build, "--targets", changed)
    assert code == 1 and causes == {"q4km": ["settings"], "int8": ["hardware"]}
    # 4. runtime: the artifact was built with another llama.cpp
    mf = build / "q4km" / "manifest.json"
    m = json.loads(mf.read_text())
    m["versions"]["runtime"]["llama_cpp_python"] = "0.3.20"
    mf.write_text(json.dumps(m))
    r = qp("stale", build, "--targets", "targets.toml", cwd=root, env=env)
    assert r.returncode == 1 and "q4km: STALE (runtime) llama_cpp_python 0.3.20 → " in r.stdout and "int8: current" in r.stdout


def test_bundle_ships_each_target_with_a_card_and_verifies(builds, tmp_path):
    root, env = builds
    r = qp("bundle", root / "full", "--out", tmp_path / "rel")
    assert r.returncode == 0, r.stderr
    rel = tmp_path / "rel"
    meta = json.loads((rel / "bundle.json").read_text())
    assert [t["target"] for t in meta["targets"]] == ["q4km", "int8"]
    assert meta["original"]["weights_sha256"] == json.loads((root / "full" / "results.json").read_text())["model"]["weights_sha256"]
    assert not list(rel.rglob("*.safetensors")) or all("artifact" in p.parts for p in rel.rglob("*.safetensors"))
    card = (rel / "q4km" / "MODEL_CARD.md").read_text()
    for part in ("## How it was quantized", "## Why this configuration", "| max_size_mb |", "| int8 |", "rare_tokens",
                 "quantprism rollback"):
        assert part in card, part
    assert "lacks" in (rel / "int8" / "MODEL_CARD.md").read_text() or json.loads(
        (root / "full" / "results.json").read_text())["targets"][1]["hardware_match"]
    r = qp("verify", rel)
    assert r.returncode == 0 and r.stdout.count(": OK") == 3, r.stdout
    (rel / "q4km" / "MODEL_CARD.md").write_text(card.replace("PASS", "FAIL"))
    r = qp("verify", rel)
    assert r.returncode == 1 and "changed q4km/MODEL_CARD.md" in r.stdout
    r = qp("bundle", root / "full", "--out", rel)  # never over an existing bundle
    assert r.returncode == 2 and "not empty" in r.stderr


def test_drift_says_when_recalibration_is_due(builds, tmp_path):
    root, env = builds
    from quantprism.model import load_model_info

    assets = load_model_info(None).path.parent
    calib, heldout = assets / "calibration.txt", assets / "eval_heldout.txt"
    r = qp("drift", "--calibration", calib, "--sample", heldout, "--targets", root / "targets.toml", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    same = json.loads(r.stdout)
    assert same["token_js"] < 0.15 and not same["due"] and same["length_tv"] is None
    # the length mix: long documents calibrated, short chat turns served
    text = calib.read_text()
    long_docs = [text[i:i + 4000] for i in range(0, 64000, 4000)]
    short = [text[i:i + 120] for i in range(0, 64000, 4000)]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in long_docs))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in short))
    r = qp("drift", "--calibration", tmp_path / "calib.jsonl", "--sample", tmp_path / "chat.jsonl", "--targets",
           root / "targets.toml", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d["length_tv"] > 0.5 and any("length mix" in x for x in d["reasons"])
    # another domain, with the quantized model's own damage measured in its runtime
    (tmp_path / "t.toml").write_text(TARGETS + "\n[drift]\nmax_kld_ratio = 1.0\n")
    r = qp("drift", "--calibration", calib, "--sample", ROOT / "README.md", "--targets", tmp_path / "t.toml",
           "--build", root / "full", "--target", "q4km", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d["token_js"] > 0.15 and d["kld_ratio"] > 1.0, d
    assert any("KLD on the sample" in x for x in d["reasons"])
    r = qp("drift", "--calibration", calib, "--sample", tmp_path / "missing.txt")
    assert r.returncode == 2 and "no such calibration source" in r.stderr


def test_generated_workflow_is_current_and_valid(tmp_path):
    r = qp("ci", "github", "--targets", "targets.toml", "--out", ".github/workflows/quantprism.yml", "--check", cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    import yaml

    wf = yaml.safe_load((ROOT / ".github/workflows/quantprism.yml").read_text())
    jobs = wf["jobs"]
    assert list(jobs) == ["canonical", "build-cpu-x86-avx2", "build-gpu-sm80", "merge"]
    assert jobs["build-gpu-sm80"]["runs-on"] == ["self-hosted", "linux", "x64", "gpu-sm80"]
    assert "--only vllm-gptq-w4g128 --only vllm-awq-w4g128" in json.dumps(jobs["build-gpu-sm80"])
    assert jobs["merge"]["needs"] == ["build-cpu-x86-avx2", "build-gpu-sm80"]
    cj = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    assert cj, "check-jsonschema is a dev dependency (make install)"
    ok = subprocess.run([cj, "--builtin-schema", "vendor.github-workflows", ROOT / ".github/workflows/quantprism.yml"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yml"  # the validator catches a job without runs-on
    del jobs["merge"]["runs-on"]
    broken.write_text(yaml.safe_dump(wf))
    bad = subprocess.run([cj, "--builtin-schema", "vendor.github-workflows", broken], capture_output=True, text=True)
    assert bad.returncode == 1
    stale_wf = tmp_path / "old.yml"
    stale_wf.write_text((ROOT / ".github/workflows/quantprism.yml").read_text().replace("gpu-sm80", "gpu-sm90"))
    r = qp("ci", "github", "--targets", "targets.toml", "--out", stale_wf, "--check", cwd=ROOT)
    assert r.returncode == 1 and "not current" in r.stderr


EVERY_FORMAT = """
[defaults]
samples = 8
seq_len = 128
[target.gguf]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
[target.gptq]
format = "gptq"
runtime = "vllm"
[target.awq]
format = "awq"
runtime = "vllm"
symmetric = false
method = "awq+gptq"
[target.compressed-tensors]
format = "compressed-tensors"
runtime = "vllm"
quant = "W4A16"
[target.onnx]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits4"
group_size = 32
[target.onnx-genai]
format = "onnx-genai"
runtime = "onnxruntime-genai"
quant = "nbits4"
group_size = 32
"""


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("twice")
    (root / "targets.toml").write_text(EVERY_FORMAT)
    out = []
    for i in (1, 2):  # fresh processes, fresh caches: the canonical pass runs twice too
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("rebuild.py")), root / "targets.toml",
                            root / f"out{i}", root / f"cache{i}"], capture_output=True, text=True,
                           env={**os.environ, "QUANTPRISM_CACHE": str(root / f"cache{i}")})
        assert r.returncode == 0, r.stderr[-3000:]
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.parametrize("fmt", ["gguf", "gptq", "awq", "compressed-tensors", "onnx", "onnx-genai"])
def test_same_inputs_give_byte_identical_artifacts(two_builds, fmt):
    first, second = (b[fmt] for b in two_builds)
    assert first, f"{fmt}: nothing exported"
    differ = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))
    assert not differ, f"{fmt}: files differ between two builds of the same inputs: {differ}"
