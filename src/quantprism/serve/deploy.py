"""Fleet manifests for a build: KServe InferenceServices (baseline, candidate as canary, rollback) and a LiteLLM
router config (weighted deployments, mirrored "silent" shadow) — the same flag, in the engines that run fleets.

Artifacts are addressed by content: ``<storage>/<sha256>/`` where the sha256 is the artifact's own (a single file:
its sha256; a folder: the sha256 of its sorted "path sha256" lines, from results.json's file table). artifacts.json
lists which local folder or file to upload under which address, so a rebuilt artifact can never be served under an
old one's name.

KServe: the baseline is applied first; the canary manifest is the same InferenceService with the candidate as its
predictor and ``canaryTrafficPercent`` = share (KServe keeps the previous revision as the stable one); the rollback
manifest sets ``canaryTrafficPercent: 0`` (KServe's one-line rollback). Serving runtimes by format: GGUF → a
ServingRuntime running llama.cpp's own server (OpenAI API); HF checkpoints (the original, GPTQ, AWQ,
compressed-tensors) → KServe's Hugging Face runtime with its vLLM backend. ONNX has no stock KServe runtime that
speaks the OpenAI API (Triton's ONNX backend serves raw tensors), so ONNX targets are refused for --kserve.
LiteLLM: the clients' model name maps to weighted deployments (candidate weight = share); the baseline's traffic
is split into a mirrored and a plain deployment so that exactly the shadow share is mirrored (LiteLLM mirrors every
request of a deployment that names a ``silent_model``).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..manifest import write_text_atomic
from .flag import ORIGINAL

LLAMACPP_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
HF_FORMATS = {"safetensors", "gptq", "awq", "compressed-tensors"}


def content_address(files: dict[str, dict]) -> str:
    """sha256 of an artifact from its file table (one file: that file's own sha256)."""
    if len(files) == 1:
        return next(iter(files.values()))["sha256"]
    lines = "".join(f"{p} {files[p]['sha256']}\n" for p in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def dns_name(name: str) -> str:
    """A Kubernetes object name (RFC 1123 label): lower case, digits and '-', ≤ 63 characters."""
    n = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not n:
        raise ConfigError(f"{name!r} gives no valid Kubernetes name; pass --name")
    return n


def _arm(doc: dict, name: str) -> dict:
    if name == ORIGINAL:
        o = doc.get("original") or {}
        return {"name": ORIGINAL, "format": "safetensors", "files": o.get("files") or {}, "artifact": o.get("artifact")}
    for t in doc.get("targets", []):
        if t["name"] == name:
            if not t.get("files"):
                raise ConfigError(f"target {name} has no artifact files in results.json ({t.get('error', 'not built')})")
            return t
    raise ConfigError(f"no target {name!r} in results.json; built: {', '.join(t['name'] for t in doc.get('targets', []))}")


def _predictor(arm: dict, storage: str, model_name: str) -> dict:
    sha = content_address(arm["files"])
    uri = f"{storage.rstrip('/')}/{sha}"
    fmt = arm["format"]
    if fmt == "gguf":
        gguf = next(iter(arm["files"]))
        return {"model": {"modelFormat": {"name": "gguf"}, "runtime": "quantprism-llamacpp", "storageUri": uri,
                          "args": ["--model", f"/mnt/models/{gguf}", "--alias", model_name]}}
    if fmt in HF_FORMATS:
        return {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": uri,
                          "args": [f"--model_name={model_name}", "--backend=vllm"]}}
    raise ConfigError(f"target {arm['name']}: format {fmt} has no stock KServe runtime with an OpenAI API (Triton's ONNX "
                      "backend serves raw tensors); serve it with `quantprism serve` or deploy it with --litellm")


def llamacpp_runtime() -> dict:
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
            "metadata": {"name": "quantprism-llamacpp"},
            "spec": {"supportedModelFormats": [{"name": "gguf", "version": "3", "autoSelect": True}],
                     "protocolVersions": ["v1"],
                     "containers": [{"name": "kserve-container", "image": LLAMACPP_IMAGE,
                                     "args": ["--host", "0.0.0.0", "--port", "8080"],
                                     "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                                     "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                   "limits": {"cpu": "4", "memory": "8Gi"}}}]}}


def kserve_manifests(doc: dict, baseline: str, candidate: str, share: float, storage: str, name: str) -> dict[str, list]:
    """File name → list of Kubernetes objects."""
    b, c = _arm(doc, baseline), _arm(doc, candidate)
    meta = {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "Serverless"},
            "labels": {"app.kubernetes.io/managed-by": "quantprism"}}

    def isvc(arm: dict, canary: int | None) -> dict:
        pred = _predictor(arm, storage, name)
        if canary is not None:
            pred["canaryTrafficPercent"] = canary
        m = {**meta, "annotations": {**meta["annotations"], "quantprism/arm": arm["name"],
                                     "quantprism/sha256": content_address(arm["files"])}}
        return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": m,
                "spec": {"predictor": pred}}

    runtimes = [llamacpp_runtime()] if "gguf" in (b["format"], c["format"]) else []
    out = {"10-baseline.yaml": [isvc(b, None)], "20-canary.yaml": [isvc(c, round(share * 100))],
           "90-rollback.yaml": [isvc(c, 0)]}
    if runtimes:
        out["00-runtimes.yaml"] = runtimes
    return out


def litellm_config(doc: dict, baseline: str, candidate: str, share: float, shadow: float, endpoint: str,
                   alias: str) -> dict:
    """A LiteLLM Router config: ``alias`` → weighted deployments on `quantprism serve` arms at ``endpoint``."""
    _arm(doc, baseline), _arm(doc, candidate)  # both must exist
    total = 1000  # integer weights, per mille
    w_c = round(share * total)
    w_b = total - w_c
    w_mirror = round(w_b * shadow)

    def dep(model_name: str, arm: str, weight: int | None, **extra) -> dict:
        p = {"model": f"openai/{arm}", "api_base": endpoint, "api_key": "unused", **extra}
        if weight is not None:
            p["weight"] = weight
        return {"model_name": model_name, "litellm_params": p, "model_info": {"id": f"{model_name}-{arm}-{len(extra)}"}}

    deps = []
    if w_b - w_mirror > 0:
        deps.append(dep(alias, baseline, w_b - w_mirror))
    if w_mirror > 0:
        deps.append(dep(alias, baseline, w_mirror, silent_model=f"{alias}-shadow"))
    if w_c > 0:
        deps.append(dep(alias, candidate, w_c))
    deps.append(dep(f"{alias}-shadow", candidate, None))
    return {"model_list": deps, "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 0}}


def write_deploy(build_dir: Path, out: Path, kind: str, baseline: str, candidate: str, share: float, shadow: float,
                 storage: str, endpoint: str, name: str | None) -> list[Path]:
    from ..report.results import load_results

    doc = load_results(Path(build_dir) / "results.json")
    name = dns_name(name or f"{Path(doc['model']['path']).name}-{candidate}")
    written = []
    if kind == "kserve":
        for fname, objs in sorted(kserve_manifests(doc, baseline, candidate, share, storage, name).items()):
            p = Path(out) / "kserve" / fname
            write_text_atomic(p, yaml.safe_dump_all(objs, sort_keys=False))
            written.append(p)
    else:
        p = Path(out) / "litellm" / "config.yaml"
        head = (f"# quantprism deploy --litellm: clients call model {name!r}; baseline {baseline}, candidate {candidate} "
                f"at share {share:g}, shadow {shadow:g}\n# rollback: set the candidate deployment's weight to 0 (or "
                "delete it) and reload the router\n")
        write_text_atomic(p, head + yaml.safe_dump(litellm_config(doc, baseline, candidate, share, shadow, endpoint, name),
                                                   sort_keys=False))
        written.append(p)
    arts = {}
    for arm in (baseline, candidate):
        a = _arm(doc, arm)
        arts[content_address(a["files"])] = {"arm": arm, "format": a["format"], "local": a.get("artifact"),
                                             "files": a["files"]}
    p = Path(out) / "artifacts.json"
    write_text_atomic(p, json.dumps({"storage": storage, "upload": "each local artifact to <storage>/<sha256>/",
                                     "artifacts": arts}, indent=2, sort_keys=True) + "\n")
    written.append(p)
    return written
