"""Broken and hostile input (issue 20): a target name cannot lead outside --out, and a path the targets file names
is checked when `quantprism targets` runs — one line, exit 2, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

GGUF = 'format = "gguf"\nruntime = "llamacpp"\nquant = "Q4_K_M"\n'


def qp(*args, cwd):
    return subprocess.run([sys.executable, "-m", "quantprism.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "QUANTPRISM_CACHE": str(cwd / "cache")})


@pytest.mark.parametrize("name", ["../../evil", "a/b", "..", "a..b", "-x", " x", "x\\\\y", "é", "x" * 101])
def test_a_target_name_that_is_not_an_identifier_is_refused(tmp_path, name, run_cli, monkeypatch):
    from conftest import assert_one_line_error

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.toml").write_text(f'[target."{name}"]\n{GGUF}')
    for cmd in (("targets", "t.toml"), ("build", "--targets", "t.toml", "--out", "b/out")):
        rc, _, err = run_cli(*cmd)
        assert_one_line_error(rc, err, "not a valid target name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]  # nothing written, inside or outside


def test_target_names_differing_only_in_case_are_refused(tmp_path):
    (tmp_path / "t.toml").write_text(f"[target.Q4]\n{GGUF}[target.q4]\n{GGUF}")
    r = qp("targets", "t.toml", cwd=tmp_path)
    assert r.returncode == 2 and "differ only in case" in r.stderr


@pytest.mark.parametrize("defaults, message", [
    ('calibration = "missing.jsonl"', "no such calibration source"),
    ('calibration = "empty-dir"', "directory has no .txt files"),
    ('calibration = "data.parquet"', "unsupported calibration file type"),
    ('eval_text = "missing.txt"', "no such evaluation text file"),
    ('model = "no-model-here"', "no-model-here"),
])
def test_a_missing_or_wrong_kind_of_path_fails_at_targets_time(tmp_path, defaults, message, run_cli, monkeypatch):
    from conftest import assert_one_line_error

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    (tmp_path / "t.toml").write_text(f"[defaults]\n{defaults}\n[target.a]\n{GGUF}")
    rc, _, err = run_cli("targets", "t.toml")
    assert_one_line_error(rc, err, message)


def test_a_model_folder_linking_outside_itself_is_refused_unless_allowed(tmp_path, run_cli):
    import shutil
    from pathlib import Path

    from conftest import assert_one_line_error

    src = Path(__file__).resolve().parents[1] / "src" / "quantprism" / "assets" / "reference-llama"
    model = tmp_path / "model"
    model.mkdir()
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (model / f.name).symlink_to(f)  # leads outside the folder
        else:
            shutil.copy(f, model / f.name)
    rc, _, err = run_cli("inspect", model)
    assert_one_line_error(rc, err, "outside the model folder", "--allow-symlinks")
    rc, out, err = run_cli("--allow-symlinks", "inspect", model)
    assert rc == 0, err
    os.environ.pop("QUANTPRISM_ALLOW_SYMLINKS", None)  # the flag sets it for this process


def test_the_write_side_proves_each_target_folder_is_directly_under_out(tmp_path):
    """Defence in depth behind the name check: the build derives every target folder through one function."""
    from quantprism.errors import ConfigError
    from quantprism.pipeline.build import target_dir

    out = tmp_path / "b" / "out"
    assert target_dir(out, "q4km") == out / "q4km"
    for bad in ("../../evil", "a/b", "..", "/etc"):
        with pytest.raises(ConfigError, match="directly under --out"):
            target_dir(out, bad)


CONCURRENT = """
[defaults]
samples = 8
seq_len = 128
[target.q4km]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
[target.q4km.gates]
max_size_mb = 4.0
"""
INT4 = """
[target.int4]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits4"
group_size = 32
[target.int4.gates]
max_size_mb = 11.2
"""


def test_two_builds_sharing_one_cache_at_once_both_succeed_identically(tmp_path):
    """Same and different target sets at the same time on one canonical cache: the cache lock lets one pass solve
    while the other waits and then reuses it; both exit 0 and the shared target's artifact is byte-identical."""
    import hashlib
    import subprocess

    (tmp_path / "a.toml").write_text(CONCURRENT)
    (tmp_path / "b.toml").write_text(CONCURRENT + INT4)
    env = {**os.environ, "QUANTPRISM_CACHE": str(tmp_path / "cache"), "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "quantprism.cli", "build", "--targets", f"{n}.toml", "--out", n,
                               "--skip-bench", "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in ("a", "b")]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    sha = [hashlib.sha256((tmp_path / n / "q4km" / "model.gguf").read_bytes()).hexdigest() for n in ("a", "b")]
    assert sha[0] == sha[1]
    assert not list((tmp_path / "cache").glob("partial-*"))  # no checkpoint left behind by either pass


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One canonical cache for the interrupt tests (their canonical pass is a cache hit after the first)."""
    return tmp_path_factory.mktemp("qp-cache")


@pytest.mark.parametrize("stage", ["canonical", "export", "runtime", "runtime-onnx"])
def test_sigterm_mid_build_leaves_no_partial_file_no_scratch_no_worker_and_a_rerun_resumes(tmp_path, stage,
                                                                                          shared_cache):
    """SIGTERM (a CI cancel) in each stage takes the Ctrl-C path: exit 143 with one line, the runtime worker goes too,
    no temp or half-written file and no scratch folder remain under --out (resume state lives in the cache), and the
    same command run again finishes — the canonical pass from its last finished layer."""
    import signal
    import time

    (tmp_path / "t.toml").write_text(CONCURRENT + (INT4 if stage == "runtime-onnx" else ""))
    cache = shared_cache  # fresh for the first stage (the pass it interrupts), warm after
    env = {**os.environ, "QUANTPRISM_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "quantprism.cli", "build", "--targets", "t.toml", "--out", "b", "--skip-bench", "--quiet"]
    if stage == "export":
        for p in (cache / "exports").glob("done-*.json"):
            p.unlink()  # an earlier test's marker for another folder is harmless, but wait for this build's own
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def reached() -> bool:  # canonical: layer 0 checkpointed; export: the first export marked; runtime: its worker started
        if stage == "canonical":
            return bool(list((cache / "canonical").glob("partial-*/stream-000.json")))
        if stage == "export":
            return bool(list((cache / "exports").glob("done-*.json")))
        worker = "int4" if stage == "runtime-onnx" else "q4km"  # llama.cpp's worker, or ONNX Runtime's
        return (tmp_path / "b" / ".work" / "target" / worker / "worker-spec.json").exists()

    deadline = time.time() + 600
    while not reached() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-1500:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err[-1500:]
    left = [p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*")]
    assert not [p for p in left if ".tmp" in p or ".work" in p] and "results.json" not in left, left
    if stage == "canonical":
        assert not left and list((cache / "canonical").glob("partial-*/layer_000.r0.safetensors"))
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "b") not in ps  # no orphaned runtime worker
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert not (tmp_path / "b" / ".work").exists() and not list((cache / "canonical").glob("partial-*"))


def test_a_full_disk_during_an_export_is_one_line_and_keeps_the_previous_artifact(tmp_path, shared_cache):
    """A write over the file-size limit (RLIMIT_FSIZE stands in for a full disk: the same failed write(2)) while the
    GGUF is re-exported: one line, exit 2, no temp file, the previous artifact byte-identical."""
    import hashlib
    import resource

    (tmp_path / "t.toml").write_text(CONCURRENT)
    env = {**os.environ, "QUANTPRISM_CACHE": str(shared_cache)}
    cmd = [sys.executable, "-m", "quantprism.cli", "build", "--targets", "t.toml", "--out", "b", "--skip-bench", "--quiet"]
    assert subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    gguf = tmp_path / "b" / "q4km" / "model.gguf"
    before = hashlib.sha256(gguf.read_bytes()).hexdigest()
    for p in (shared_cache / "exports").glob("done-*.json"):
        p.unlink()  # the export runs again (canonical result cached)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB per file; the GGUF is 3.5 MB

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, preexec_fn=small_disk)
    assert r.returncode == 2 and "exporting q4km" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1  # (and the 8-sample warning)
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == before
    assert not [p for p in (tmp_path / "b").rglob("*") if p.name.endswith(".tmp")]
