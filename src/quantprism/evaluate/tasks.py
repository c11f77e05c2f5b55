"""Downstream tasks in each artifact's own runtime (lm-evaluation-harness through evaluate/lm_backend.py), paired
with the original's: per task the metric, its standard error, the difference to the original with a bootstrap
interval over documents, and answer agreement. The build's workers run them; finish_row pairs them."""
from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "tasks"
N_BOOT = 1000


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval warns on every bundled task load (its custom_dataset hook); our build prints its own progress."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(BUNDLED), *paths], include_defaults=defaults)


def task_manager(paths: list[str | Path] | None = None, tasks: list[str] | None = None):
    """lm-eval's task index over the bundled tasks and the user's task folders (``[defaults] task_paths``); data
    is read offline (no hub at run time). lm-eval's own ~13,000 task YAMLs are indexed (≈ 6 s) only when a task
    is not found in those folders. Cached per process."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    own = tuple(str(p) for p in (paths or []))
    tm = _manager(own, False)
    if tasks is not None and all(t in tm.all_tasks for t in tasks):
        return tm
    return _manager(own, True)


def check_task_names(tasks: list[str], paths: list[str | Path] | None = None) -> None:
    """Before any work (exit 2): every task is bundled, in a task folder, or known to lm-eval — and its data loads
    offline (a task that would download its data is named in one line)."""
    if not tasks:
        return
    try:
        tm = task_manager(paths, tasks)
    except ImportError:
        raise ConfigError("tasks need lm-evaluation-harness: run `make install` (extra: eval)") from None
    bad = [t for t in tasks if t not in tm.all_tasks]
    if bad:
        raise ConfigError(f"task {bad[0]!r} is not a bundled task, in a task folder, nor one lm-eval knows; bundled: "
                          f"{', '.join(sorted(n for n in tm.all_tasks if n.startswith('qp_')))}")
    for t in tasks:
        try:
            with _quiet_lm_eval():
                tm.load([t])
        except Exception as e:  # datasets raises assorted errors when the data is not local
            raise ConfigError(f"task {t}: its data is not available offline ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}); use a local task (dataset_path: json)") from None


def run_tasks(sess, tasks: list[str], bos: int, n_ctx: int, limit: int | None = None,
              paths: list[str] | None = None) -> dict[str, dict]:
    """{task: {metric, value, stderr, per_doc, answers}} from an open runtime session. Bundled tasks and any task
    lm-eval can load offline work by name; one that needs the network fails naming the task."""
    tm = task_manager(paths, tasks)
    import lm_eval

    from .lm_backend import QuantprismLM

    lm = QuantprismLM(session=sess, bos=bos, n_ctx=n_ctx)
    try:  # one call for every task: lm-eval batches all their requests by type
        with _quiet_lm_eval():
            r = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=True,
                                        verbosity="ERROR")
    except Exception as e:  # datasets raises ConnectionError / FileNotFoundError when data is not local
        raise ConfigError(f"tasks {', '.join(tasks)}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    out = {}
    for task in tasks:
        res = r["results"][task]
        metric = next(m.split(",")[0] for m in res if m.endswith(",none") and "stderr" not in m)
        samples = sorted(r["samples"][task], key=lambda s: s["doc_id"])
        out[task] = {"metric": metric, "value": float(res[f"{metric},none"]),
                     "stderr": _number(res.get(f"{metric}_stderr,none")), "n": len(samples),
                     "per_doc": [float(s[metric]) for s in samples],
                     "answers": [answer(s) for s in samples]}
    return out


def _number(v) -> float | None:
    """lm-eval writes "N/A" for a standard error it could not compute (one document)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def answer(sample: dict) -> str:
    """What the model answered: the chosen option of a multiple-choice document (argmax of the choices'
    log-likelihoods — the values themselves differ in the last digits between runtimes), else the generated text."""
    resp = sample.get("filtered_resps") or sample.get("resps")
    if isinstance(resp, list) and resp and all(isinstance(r, list | tuple) and r and isinstance(r[0], float) for r in resp):
        return str(int(np.argmax([r[0] for r in resp])))
    return str(resp)


def pair(base: dict, other: dict, seed: int = 0) -> dict:
    """Paired difference (other − base) with a 95 % bootstrap interval over documents, and answer agreement."""
    a, b = np.asarray(base["per_doc"]), np.asarray(other["per_doc"])
    if a.size != b.size or not a.size:
        return {"diff": None, "ci95": None, "agreement": None}
    d = b - a
    boot = d[np.random.default_rng(seed).integers(0, d.size, size=(N_BOOT, d.size))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    agree = float(np.mean([x == y for x, y in zip(base["answers"], other["answers"], strict=True)]))
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "agreement": agree}


def pair_row(row: dict, original: dict) -> None:
    """Pair a target's task results with the original's in place; ``tasks_drop_max``: the largest drop of any task
    (original − target, in the metric's units), what the ``max_task_drop`` gate holds."""
    tasks, base = row.get("tasks") or {}, (original or {}).get("tasks") or {}
    drops = []
    for name, t in tasks.items():
        if name in base:
            t.update(pair(base[name], t))
            if t["diff"] is not None:
                drops.append(-t["diff"])
    if drops:
        row["tasks_drop_max"] = max(drops) + 0.0  # no -0.0


def strip_docs(row: dict) -> None:
    """Per-document lists stay out of results.json (they were needed only for pairing)."""
    for t in (row.get("tasks") or {}).values():
        t.pop("per_doc", None)
        t.pop("answers", None)
