"""Run one call in a child Python, so that a runtime's native abort or segfault (a GGML_ASSERT on a structurally valid
but wrong GGUF, say) is one line and exit 2 for the user instead of a dead process with a C backtrace.

    python -m quantprism.pipeline.isolate      (JSON {"call": "module:function", "kwargs": {...}} on stdin)

The child's own stdout is pointed at its stderr (native libraries print there too); its result comes back as one
JSON line on the original stdout. A ``QuantprismError`` raised in the child is raised again here as the same class.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

from .. import errors, progress

RESULT = "QUANTPRISM-RESULT "


def call_isolated(call: str, kwargs: dict[str, Any], what: str) -> Any:
    """``module:function(**kwargs)`` in a child process; returns its JSON-able result. Raises the child's own
    ``QuantprismError``, or an ``ArtifactError`` naming ``what`` when the child died or failed unexpectedly."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    with progress.task(what, total=None, unit="step"):
        proc = subprocess.Popen([sys.executable, "-m", "quantprism.pipeline.isolate"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            out, err = proc.communicate(json.dumps({"call": call, "kwargs": kwargs}))
        except BaseException:  # Ctrl-C / SIGTERM: the child goes too
            proc.kill()
            proc.wait()
            raise
    lines = [ln[len(RESULT):] for ln in out.splitlines() if ln.startswith(RESULT)]
    if lines:
        doc = json.loads(lines[-1])
        if "error" not in doc:
            return doc["result"]
        cls = getattr(errors, doc.get("class", ""), None)
        if isinstance(cls, type) and issubclass(cls, errors.QuantprismError):
            raise cls(doc["error"])
        raise errors.ArtifactError(f"{what}: {doc['error']}")
    rc = proc.returncode
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit code {rc}"
    tail = [ln.strip() for ln in err.splitlines() if ln.strip()]
    # the native library's own message (e.g. "GGML_ASSERT(...) failed") is the most useful line, not the backtrace
    said = next((ln for ln in reversed(tail) if "assert" in ln.lower() or "error" in ln.lower()), tail[-1] if tail else "")
    raise errors.ArtifactError(f"{what}: the runtime process died ({how}){': ' + said[:200] if said else ''}; "
                               "the artifact is not loadable — re-export it")


def _main() -> int:
    result_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed from here on (Python or native) goes to stderr
    sys.stdout = sys.stderr
    spec = json.loads(sys.stdin.read())
    module, func = spec["call"].split(":")
    try:
        doc = {"result": getattr(importlib.import_module(module), func)(**spec["kwargs"])}
    except errors.QuantprismError as e:
        doc = {"error": str(e), "class": type(e).__name__}
    except Exception as e:  # an unexpected failure of the runtime on this artifact: one line, not a traceback
        doc = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    with os.fdopen(result_fd, "w") as f:
        f.write(RESULT + json.dumps(doc, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
