"""The lm-evaluation-harness backend over the runtime registry and the bundled task suite: the original is clearly
above chance on every bundled task (else the task measures nothing), and `lm_eval --model quantprism` runs a
bundled task against a GGUF and an ONNX artifact from the command line, scored in their own runtimes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval") if not os.environ.get("CI") else __import__("lm_eval")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "src" / "quantprism" / "assets" / "tasks"
BUNDLED = ["qp_continuation", "qp_code", "qp_long_recall", "qp_rare", "qp_structure"]
CHANCE = {"qp_code": 0.0}  # exact match; the multiple-choice tasks are 4-way
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
TARGETS = """
[defaults]
samples = 8
seq_len = 128
[target.gguf]
format = "gguf"
runtime = "llamacpp"
quant = "Q4_K_M"
[target.onnx]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits4"
group_size = 32
[target.genai]
format = "onnx-genai"
runtime = "onnxruntime-genai"
quant = "nbits4"
group_size = 32
"""


def test_the_task_suite_is_generated_deterministically(tmp_path):
    subprocess.run([sys.executable, ROOT / "scripts" / "make_tasks.py", "--out", tmp_path], check=True, capture_output=True)
    for f in sorted(TASKS.iterdir()):
        if f.is_file():
            assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f"{f.name}: regenerate with scripts/make_tasks.py"


def _evaluate(artifact: Path, tasks: list[str], limit: int) -> dict:
    from lm_eval.tasks import TaskManager

    import quantprism.evaluate.lm_backend  # noqa: F401

    r = lm_eval.simple_evaluate(model="quantprism", model_args=f"artifact={artifact},threads=2", tasks=tasks,
                                task_manager=TaskManager(include_path=str(TASKS)), limit=limit)
    return r["results"]


def test_the_original_is_clearly_above_chance_on_every_bundled_task():
    from quantprism.model import load_model_info

    res = _evaluate(load_model_info(None).path, BUNDLED, limit=80)
    for task in BUNDLED:
        metric = "exact_match" if task == "qp_code" else "acc"
        value, se = float(res[task][f"{metric},none"]), float(res[task][f"{metric}_stderr,none"])
        print(f"{task}: {metric} {value:.3f} ± {se:.3f} (chance {CHANCE.get(task, 0.25)})")
        assert value - CHANCE.get(task, 0.25) > 2 * max(se, 0.01), (task, value, se)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmeval")
    (root / "targets.toml").write_text(TARGETS)
    r = subprocess.run([sys.executable, ROOT / "tests" / "release" / "rebuild.py", root / "targets.toml", root / "out",
                        root / "cache"], capture_output=True, text=True, env={**ENV, "QUANTPRISM_CACHE": str(root / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    return {"gguf": root / "out" / "gguf" / "model.gguf", "onnx": root / "out" / "onnx" / "onnx",
            "genai": root / "out" / "genai" / "onnx-genai"}


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_lm_eval_cli_runs_a_bundled_task_in_the_artifacts_runtime(artifacts, kind, tmp_path):
    exe = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert exe, "lm-eval is installed by `make install` (extra: eval)"
    r = subprocess.run([exe, "--model", "quantprism", "--model_args", f"artifact={artifacts[kind]},threads=2",
                        "--tasks", "qp_structure", "--include_path", str(TASKS), "--limit", "30",
                        "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "qp_structure" in r.stdout and "acc" in r.stdout
    doc = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    acc = doc["results"]["qp_structure"]["acc,none"]
    runtime = {"gguf": "llamacpp", "onnx": "onnxruntime"}[kind]
    assert doc["config"].get("quantprism_runtime") == runtime and 0.25 < acc <= 1.0, (doc["config"], acc)


@pytest.mark.parametrize("kind", ["original", "gguf", "onnx", "genai"])
def test_shared_prefill_scores_like_separate_requests(artifacts, kind):
    """A multiple-choice document's choices share one prefill (KV cache kept) in torch (its choices as one padded
    batch), llama.cpp, ONNX Runtime and onnxruntime-genai (rewound to the context); the scores equal scoring each
    request on its own — to float rounding in torch, within the batch-shape arithmetic of the int8-activation
    kernels."""
    from quantprism.evaluate.lm_backend import QuantprismLM
    from quantprism.model import load_model_info

    docs = [json.loads(ln) for ln in (TASKS / "qp_structure.jsonl").read_text().splitlines()[:12]]

    class Req:
        def __init__(self, args):
            self.args = args

    reqs = [Req((d["context"], c)) for d in docs for c in d["choices"]]
    lm = QuantprismLM(str(load_model_info(None).path if kind == "original" else artifacts[kind]), threads=2)
    assert hasattr(lm.sess, "continuation_logits")
    shared = lm.loglikelihood(reqs)
    separate = [lm._score(*lm._split(*r.args)) for r in reqs]
    # llama.cpp and ORT's int8-activation kernels (accuracy_level 4) round per batch shape; torch fp32 only reorders sums
    tol = 1e-4 if kind == "original" else 0.05
    for (a, ga), (b, gb) in zip(shared, separate, strict=True):
        assert abs(a - b) <= tol * max(1.0, abs(b)) and ga == gb
    picks = [max(range(4), key=lambda j, i=i: shared[4 * i + j][0]) for i in range(len(docs))]
    assert picks == [max(range(4), key=lambda j, i=i: separate[4 * i + j][0]) for i in range(len(docs))]
