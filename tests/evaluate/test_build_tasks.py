"""Tasks in the build: the original and each target run [defaults].tasks (or their own list) in their own runtimes;
results.json pairs each target with the original (difference, bootstrap interval, answer agreement) and the
max_task_drop gate holds the largest drop; a task name lm-eval does not know is exit 2 before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval") if not os.environ.get("CI") else __import__("lm_eval")

TARGETS = """
[defaults]
samples = 8
seq_len = 128
tasks = ["qp_structure", "qp_code"]
task_limit = 24
[target.q4km]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
[target.q4km.gates]
max_size_mb = 4.0
max_task_drop = 0.15
[target.int4]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits4"
group_size = 32
tasks = ["qp_structure"]
[target.int4.gates]
max_size_mb = 11.2
max_task_drop = -0.5
"""


def qp(*args, cwd=None):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantprism.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def test_build_runs_tasks_paired_with_the_original_and_gates_the_drop(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPRISM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.toml").write_text(TARGETS)
    r = qp("build", "--targets", "t.toml", "--out", "b", "--skip-bench", "--quiet", cwd=tmp_path)
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    orig = doc["original"]["tasks"]
    assert set(orig) == {"qp_structure", "qp_code"} and orig["qp_code"]["metric"] == "exact_match"
    q4, i4 = doc["targets"]
    assert set(q4["tasks"]) == {"qp_structure", "qp_code"} and set(i4["tasks"]) == {"qp_structure"}
    for row in (q4, i4):
        for name, t in row["tasks"].items():
            assert t["n"] == 24 and 0 <= t["agreement"] <= 1 and t["ci95"][0] <= t["diff"] <= t["ci95"][1]
            assert abs(t["value"] - orig[name]["value"] - t["diff"]) < 1e-9
        assert row["tasks_drop_max"] == max(-t["diff"] for t in row["tasks"].values())
    assert q4["gates"]["max_task_drop"]["passed"] is (q4["tasks_drop_max"] <= 0.15)
    # a gate no model can meet (a task must improve by half) fails, and the build exits 1: the gate is live
    assert i4["gates"]["max_task_drop"]["passed"] is False and r.returncode == 1 and not doc["passed"]
    assert "| int4 |" in (tmp_path / "b" / "report.md").read_text() and "qp_structure" in (tmp_path / "b" / "report.md").read_text()
    assert q4["tasks"]["qp_structure"]["agreement"] > 0.5  # the same chosen options, not raw log-likelihoods


DAMAGED = """
[defaults]
samples = 8
seq_len = 128
tasks = ["qp_code"]
[target.int4]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits4"
group_size = 32
[target.int4.gates]
max_task_drop = { qp_code = 0.025 }
[target.rtn-w2]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits2"
group_size = 256
symmetric = true
method = "rtn"
[target.rtn-w2.gates]
max_task_drop = { qp_code = 0.025 }
"""


def test_a_deliberately_damaged_2bit_rtn_target_fails_its_per_task_gate(tmp_path, monkeypatch):
    """2-bit RTN (symmetric, one block per 256 inputs, in ORT's MatMulNBits) loses exact-match code completions
    the original gets right: the drop's whole 95 % interval lies below zero (all 120 documents) and the per-task
    max_task_drop gate fails it, while the GPTQ int4 target under the same gate passes."""
    monkeypatch.setenv("QUANTPRISM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.toml").write_text(DAMAGED)
    r = qp("build", "--targets", "t.toml", "--out", "b", "--skip-bench", "--quiet", cwd=tmp_path)
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    int4, w2 = doc["targets"]
    code = w2["tasks"]["qp_code"]
    print(f"int4 {int4['tasks']['qp_code']['diff']:+.3f}, rtn-w2 {code['diff']:+.3f} {code['ci95']} agree {code['agreement']:.2f}")
    assert code["n"] == 120 and code["ci95"][1] < 0 and code["agreement"] < 0.6
    assert w2["gates"]["max_task_drop.qp_code"]["passed"] is False and w2["smoke"]["passed"]  # runs, but damaged
    assert int4["gates"]["max_task_drop.qp_code"]["passed"] is True and int4["passed"]
    assert r.returncode == 1 and not doc["passed"]
    assert 'id="task-drops"' in (tmp_path / "b" / "report.html").read_text()


def test_per_task_gates_name_tasks_the_target_runs(tmp_path):
    from quantprism.config import parse_targets
    from quantprism.errors import ConfigError

    (tmp_path / "t.toml").write_text(DAMAGED.replace("{ qp_code = 0.025 }\n[target.rtn-w2]", "{ qp_cdoe = 0.025 }\n[target.rtn-w2]"))
    with pytest.raises(ConfigError, match="'qp_cdoe' is not among the tasks this target runs"):
        parse_targets(tmp_path / "t.toml")
    (tmp_path / "t.toml").write_text(DAMAGED.replace('tasks = ["qp_code"]', ""))
    with pytest.raises(ConfigError, match="max_task_drop"):
        parse_targets(tmp_path / "t.toml")


def test_an_unknown_task_is_exit_2_before_any_work(tmp_path):
    (tmp_path / "t.toml").write_text(TARGETS.replace('"qp_code"]', '"qp_cdoe"]'))
    r = qp("build", "--targets", "t.toml", "--out", "b", "--skip-bench", cwd=tmp_path)
    assert r.returncode == 2 and "qp_cdoe" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()


def test_user_tasks_by_name_offline_and_network_tasks_named(tmp_path):
    """A local lm-eval task (dataset_path: json) in a `task_paths` folder works by name in the original's runtime;
    a task that would download its data is refused in one line naming it, before any work."""
    from quantprism.config import parse_targets
    from quantprism.errors import ConfigError
    from quantprism.evaluate.tasks import check_task_names, run_tasks
    from quantprism.model import load_model_info
    from quantprism.runtimes import open_runtime

    tasks = tmp_path / "my-tasks"
    tasks.mkdir()
    rows = [{"q": f"x{i} = {i}\nprint(x{i})  # prints", "a": f" {i}"} for i in range(12)]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mine.yaml").write_text(f"""task: my_local_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'data.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (tmp_path / "t.toml").write_text(TARGETS.replace('task_limit = 24', 'task_limit = 24\ntask_paths = ["my-tasks"]'))
    d = parse_targets(tmp_path / "t.toml").defaults
    assert d.task_paths == (str(tasks.resolve()),)
    check_task_names(["my_local_task", "qp_code"], list(d.task_paths))
    sess = open_runtime("torch", load_model_info(None).path, threads=2)
    try:
        res = run_tasks(sess, ["my_local_task"], 0, 512, None, list(d.task_paths))
    finally:
        sess.close()
    assert res["my_local_task"]["n"] == 12 and res["my_local_task"]["metric"] == "exact_match"
    with pytest.raises(ConfigError, match="task hellaswag: its data is not available offline"):
        check_task_names(["hellaswag"])
    (tmp_path / "bad.toml").write_text(TARGETS.replace('task_limit = 24', 'task_limit = 24\ntask_paths = ["nowhere"]'))
    with pytest.raises(ConfigError, match="task_paths.*nowhere.*not a folder"):
        parse_targets(tmp_path / "bad.toml")
