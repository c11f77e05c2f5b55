"""Makes `lm_eval --model quantprism …` find our backend without importing it in every process.

lm-eval 0.4 has no plugin entry point for models: a model must be registered before its CLI looks it up. The one
line ``import quantprism.evaluate.lm_eval_hook`` in site-packages/quantprism-lm-eval.pth (scripts/install.sh
writes it) installs a finder that waits for ``lm_eval.api.registry`` to be imported, then registers ``quantprism``
as a lazy placeholder (the backend module, with torch and the runtimes, is imported only when the model is used)
and loads lm-eval's own model table, which its registry otherwise loads only when it is empty.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "lm_eval.api.registry"
BACKEND = "quantprism.evaluate.lm_backend:QuantprismLM"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        try:
            import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry is then not empty)

            if "quantprism" not in module.model_registry:
                module.model_registry.register("quantprism", target=BACKEND)
        except Exception:  # another lm-eval version: `lm_eval --model quantprism` says it does not know the model
            pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
