"""Loaders of the bundled tasks (lm-eval `custom_dataset`): the JSONL beside this file, offline, path-independent.
Importing it also registers the `quantprism` model backend with lm-eval."""
from __future__ import annotations

import json
from pathlib import Path

try:  # `lm_eval --model quantprism --include_path <this folder>`: the backend registers itself on import
    import quantprism.evaluate.lm_backend  # noqa: F401
except ImportError:
    pass


def _load(name: str, **_):
    import datasets

    rows = [json.loads(ln) for ln in (Path(__file__).with_name(f"{name}.jsonl")).read_text(encoding="utf-8").splitlines() if ln]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

def load_qp_continuation(**kw):
    return _load('qp_continuation')


def load_qp_code(**kw):
    return _load('qp_code')


def load_qp_long_recall(**kw):
    return _load('qp_long_recall')


def load_qp_rare(**kw):
    return _load('qp_rare')


def load_qp_structure(**kw):
    return _load('qp_structure')
