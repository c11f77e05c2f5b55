"""ONNX Runtime GenAI artifact: onnxruntime-genai's fused decoder graph, built from the canonical weights, with
every quantized decoder linear a ``MatMulNBits`` carrying the canonical codes.

Route (no rounding anywhere in here):

1. the canonical weights (``state.canonical_weights``: transformed fp tensors + each chosen grid dequantized) are
   written as an fp32 Hugging Face folder (config ``dtype = float32``, tokenizer files);
2. onnxruntime-genai's model builder turns it into its fp32 CPU graph (``-p fp32 -e cpu``, ``fuse_mlp_gate_up=true``):
   GroupQueryAttention with rotary embedding, one q/k/v MatMul and one gate/up MatMul per layer,
   SkipSimplifiedLayerNormalization, genai_config.json, tokenizer files;
3. every MatMul whose constant B equals — bit for bit — the dequantized canonical weight of a linear, or the
   row-concatenation of a fused group's (q|k|v, gate|up), becomes ``MatMulNBits`` built from the codes of those
   shards stacked along N. Stacking is exact only when the shards share one grid (same bits, block, scale
   dtype): a fused group whose shards were put on different grids (a mixed-precision plan) is refused;
4. the rotary caches (cos_cache / sin_cache of GroupQueryAttention) are set from the model's own transformers rotary
   embedding, i.e. the torch reference's values, so a builder that computes RoPE differently (scaling variants,
   config fields it reads otherwise) cannot change the model silently. Measured: bit-identical to the builder's
   on the bundled Llama (theta 1e4) and a Qwen2 copy with theta 1e6; the difference is recorded in the provenance.

lm_head stays fp32 (like the ``onnx`` format). Node metadata and doc strings are stripped and the builder's
version stamp replaced, so the same inputs give byte-identical files; the folder appears atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..config import Target
from ..errors import ArtifactError
from ..model import ModelInfo
from ..quantize.grids import QuantizedTensor
from .base import ExportSpec
from .hf_checkpoint import TOKENIZER_FILES, atomic_dir
from .onnx import OnnxFormat, chosen_grids, kv_shape, save_model, strip_metadata
from .onnx_kernels import NBITS, kernel_for, nbits_nodes, splice
from .state import canonical_weights

NAME = "onnx-genai"
MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
LAYOUT_FILE = "quantprism_onnx_genai.json"
SCHEMES = ("nbits8", "nbits4")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
BUILDER = "onnxruntime_genai.models.builder"
BUILDER_OPTIONS = ("fuse_mlp_gate_up=true", "hf_token=false")
# Linears the builder fuses into one MatMul (rows concatenated in this order): per decoder layer.
FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
BUILDER_TIMEOUT_S = 3600


def fused_groups(info: ModelInfo) -> list[tuple[str, ...]]:
    """Module-name groups the builder fuses, layer by layer."""
    return [tuple(f"model.layers.{i}.{m}" for m in group)
            for i in range(int(info.config["num_hidden_layers"])) for group in FUSED_GROUPS]


def check_fused_grids(grids: dict[str, str], groups: list[tuple[str, ...]]) -> None:
    """A fused MatMul is one MatMulNBits: its shards must all be quantized, on one grid, or all stay fp32."""
    for group in groups:
        got = [grids.get(m) for m in group]
        if len(set(got)) > 1:
            parts = ", ".join(f"{m.rsplit('.', 1)[-1]}={g or 'fp32'}" for m, g in zip(group, got, strict=True))
            layer = group[0].rsplit(".", 2)[0]
            raise ArtifactError(
                f"{layer}: the fused {'/'.join(m.rsplit('.', 1)[-1] for m in group)} MatMul needs one grid, but the shards "
                f"are on different grids ({parts}); use format \"onnx\" (unfused) or a plan without protected shards")


def stack_shards(qts: list[QuantizedTensor]) -> QuantizedTensor:
    """Codes and grid parameters of shards that share a grid, stacked along N (output rows): the dequantized
    result is the row-concatenation of the shards' dequantized weights, exactly."""
    gids = {q.grid_id for q in qts}
    if len(gids) != 1:
        raise ArtifactError(f"cannot stack shards on different grids ({', '.join(sorted(gids))})")
    if len(qts) == 1:
        return qts[0]
    keys = set(qts[0].params)
    if any(set(q.params) != keys for q in qts):
        raise ArtifactError(f"{qts[0].grid_id}: shards carry different grid parameters; re-run quantize")
    return QuantizedTensor(qts[0].grid_id, np.concatenate([q.codes for q in qts], axis=0),
                           {k: np.concatenate([q.params[k] for q in qts], axis=0) for k in sorted(keys)})


def _check_architecture(info: ModelInfo) -> None:
    if info.architecture not in ARCHITECTURES:
        raise ArtifactError(f"{info.path}: onnx-genai export supports {', '.join(ARCHITECTURES)}, not {info.architecture}")


def write_fp32_checkpoint(info: ModelInfo, state: dict, dest: Path) -> None:
    """The canonical weights as an fp32 HF folder the builder reads (config dtype float32: nothing is rounded)."""
    import torch
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in sorted(state.items())}
    if info.tied_embeddings:
        tensors.pop("lm_head.weight", None)  # one tensor for both; transformers re-ties on load
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(info.config)
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for f in TOKENIZER_FILES + ("generation_config.json",):
        if (info.path / f).is_file():
            shutil.copyfile(info.path / f, dest / f)


def run_builder(hf_dir: Path, out: Path, precision: str = "fp32", options: tuple[str, ...] = BUILDER_OPTIONS) -> None:
    """onnxruntime-genai's model builder in a child process (its imports patch sys.path; its memory is its own)."""
    cmd = [sys.executable, "-m", BUILDER, "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu",
           "-c", str(out.parent / f"{out.name}.cache")]
    if options:
        cmd += ["--extra_options", *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BUILDER_TIMEOUT_S)
    except FileNotFoundError as e:
        raise ArtifactError(f"cannot run onnxruntime-genai's builder ({e}); run `pip install -e .[onnx]`") from None
    shutil.rmtree(out.parent / f"{out.name}.cache", ignore_errors=True)
    if r.returncode != 0 or not (out / MODEL_FILE).is_file() or not (out / GENAI_CONFIG).is_file():
        lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
        why = lines[-1][:200] if lines else f"exit code {r.returncode}"
        raise ArtifactError(f"onnxruntime-genai's builder failed on the canonical checkpoint ({why}); "
                            "check `pip install -e .[onnx]` and the model architecture")


def _weight_digest(b: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(b, dtype=np.float32).tobytes()).hexdigest()


def _candidates(canonical, grids: dict[str, str], groups: list[tuple[str, ...]]) -> dict[str, list[tuple[str, ...]]]:
    """{sha256 of a weight as a MatMul B [K, N] fp32: module groups it can be}: every quantized linear alone and
    every fused group whose shards are all quantized (on one grid, checked before)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    deq: dict[str, np.ndarray] = {}

    def weight(m: str) -> np.ndarray:
        if m not in deq:
            deq[m] = np.asarray(canonical.quant[m][grids[m]].dequantize(), np.float32)
        return deq[m]

    for m in sorted(grids):
        out.setdefault(_weight_digest(weight(m).T), []).append((m,))
    for g in groups:
        if all(m in grids for m in g):
            w = np.concatenate([weight(m) for m in g], axis=0)
            out.setdefault(_weight_digest(w.T), []).append(g)
    return out


def _hint(node_name: str, group: tuple[str, ...]) -> bool:
    """Does the builder's node name (``/model/layers.3/attn/qkv_proj/MatMul``) plausibly name this group?"""
    layer = group[0].split(".")[2]
    return f"layers.{layer}/" in node_name


def quantize_genai_graph(proto: onnx.ModelProto, canonical, grids: dict[str, str], groups: list[tuple[str, ...]],
                         accuracy_level: int = 4) -> dict[str, list[str]]:
    """Replace, in place, every MatMul whose B is a canonical weight (or a fused group's stacked weights) by
    MatMulNBits from the stacked codes. Returns {new node name: [modules, in row order]}."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    cands = _candidates(canonical, grids, groups)
    used: set[tuple[str, ...]] = set()
    replaced: dict[str, list[onnx.NodeProto]] = {}
    mapping: dict[str, list[str]] = {}
    new_inits: list[onnx.TensorProto] = []
    for node in g.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            continue
        b_init = inits[node.input[1]]
        if len(b_init.dims) != 2 or b_init.data_type != onnx.TensorProto.FLOAT:
            continue
        b = numpy_helper.to_array(b_init)
        options = [c for c in cands.get(_weight_digest(b), []) if c not in used]
        if not options:
            continue
        group = next((c for c in options if _hint(node.name, c)), options[0])
        qt = stack_shards([canonical.quant[m][grids[m]] for m in group])
        if not np.array_equal(b, qt.dequantize().T):
            raise ArtifactError(f"{node.name}: the builder's weight is not the canonical weight of {'+'.join(group)}")
        if kernel_for(qt.grid_id) != NBITS:
            raise ArtifactError(f"{'+'.join(group)}: grid {qt.grid_id} has no MatMulNBits kernel; onnx-genai takes nbits8/nbits4")
        label = node.input[1].removesuffix(".weight")  # the builder's name, e.g. model.layers.0.attn.qkv_proj.MatMul
        rep = nbits_nodes(label, node.input[0], node.output[0], qt, accuracy_level)
        replaced[node.name] = rep.nodes
        new_inits.extend(rep.initializers)
        mapping[rep.nodes[0].name] = list(group)
        used.add(group)
    covered = [m for grp in used for m in grp]
    dup = sorted({m for m in covered if covered.count(m) > 1})
    if dup:
        raise ArtifactError(f"{dup[0]} is carried by two MatMuls of the builder's graph; cannot map it")
    missing = sorted(set(grids) - set(covered))
    if missing:
        raise ArtifactError(f"no MatMul of the builder's graph holds the canonical weight of {missing[0]} "
                            "(did the builder change the weights or the fusion?)")
    splice(proto, replaced, new_inits)
    return mapping


def reference_rotary_caches(info: ModelInfo, length: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, half] from the model's own transformers rotary embedding (what the torch reference uses)."""
    import torch
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(info.path), local_files_only=True)
    cls = getattr(transformers, info.architecture)
    mod = sys.modules[cls.__module__]
    rotary = [getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and isinstance(getattr(mod, n), type)]
    if len(rotary) != 1:
        raise ArtifactError(f"{info.architecture}: cannot find its rotary embedding in {mod.__name__}")
    rot = rotary[0](config=cfg)
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, 1, 2 * half), torch.arange(length)[None])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    if cos.shape[-1] != 2 * half or not np.array_equal(cos[:, :half], cos[:, half:]):
        raise ArtifactError(f"{info.architecture}: rotary embedding layout differs from GroupQueryAttention's cos/sin caches")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def set_rotary_caches(proto: onnx.ModelProto, info: ModelInfo) -> dict:
    """Overwrite cos_cache/sin_cache with the reference values; returns what changed (for provenance)."""
    inits = {i.name: i for i in proto.graph.initializer}
    if "cos_cache" not in inits or "sin_cache" not in inits:
        raise ArtifactError("the builder's graph has no cos_cache/sin_cache initializers; unsupported builder version")
    old_cos, old_sin = (numpy_helper.to_array(inits[n]) for n in ("cos_cache", "sin_cache"))
    cos, sin = reference_rotary_caches(info, *old_cos.shape)
    for name, arr in (("cos_cache", cos), ("sin_cache", sin)):
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(old_cos.dtype), name))
    return {"source": f"transformers {info.architecture} rotary embedding", "shape": list(cos.shape),
            "builder_max_abs_diff": float(max(np.abs(old_cos - cos).max(), np.abs(old_sin - sin).max()))}


def _set_metadata(proto: onnx.ModelProto, info: ModelInfo) -> None:
    cfg = info.config
    n_kv, hd = kv_shape(cfg)
    eos = cfg.get("eos_token_id")
    meta = {"num_layers": int(cfg["num_hidden_layers"]), "num_kv_heads": n_kv, "head_dim": hd,
            "vocab_size": int(cfg["vocab_size"]), "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
            "architecture": info.architecture}
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        proto.metadata_props.add(key=f"quantprism.{k}", value=json.dumps(v))
    proto.producer_name = "quantprism"
    proto.producer_version = ""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("onnxruntime-genai", "onnxruntime", "onnx", "transformers"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "missing"
    return out


def export_onnx_genai(spec: ExportSpec | Target, info: ModelInfo, canonical, out_dir: Path, plan: dict | None = None, *,
                      accuracy_level: int = 4) -> Path:
    """Write ``out_dir`` (model.onnx [+ model.onnx.data], genai_config.json, tokenizer files,
    quantprism_onnx_genai.json) atomically; returns ``out_dir`` (what onnxruntime-genai opens). A ``Target`` is
    resolved into its ExportSpec first (a convenience for scripts and tests)."""
    _check_architecture(info)
    if canonical is None:
        raise ArtifactError(f"target {spec.name}: onnx-genai needs a canonical result; run quantize first")
    if isinstance(spec, Target):
        spec = FORMAT.spec(spec, info, canonical, plan)
    grids = chosen_grids(canonical, spec.grid_id)
    for m, gid in grids.items():
        if kernel_for(gid) != NBITS:
            raise ArtifactError(f"{m}: grid {gid} has no MatMulNBits kernel; onnx-genai takes nbits8/nbits4")
    groups = fused_groups(info)
    check_fused_grids(grids, groups)  # before the slow builder
    state = canonical_weights(info, canonical, grids.get)
    with tempfile.TemporaryDirectory(prefix="quantprism-genai-") as work:
        hf, built = Path(work) / "hf", Path(work) / "built"
        write_fp32_checkpoint(info, state, hf)
        del state
        run_builder(hf, built)
        proto = onnx.load(str(built / MODEL_FILE))
        mapping = quantize_genai_graph(proto, canonical, grids, groups, accuracy_level)
        rope = set_rotary_caches(proto, info)
        strip_metadata(proto)
        _set_metadata(proto, info)
        extra = sorted(f.name for f in built.iterdir() if f.is_file() and not f.name.startswith(MODEL_FILE))
        layout = {
            "schema": 1, "format": NAME, "scheme": spec.scheme, "accuracy_level": accuracy_level,
            "grids": grids, "kernels": {m: NBITS for m in grids}, "node_modules": mapping,
            "recipe": canonical.recipe.key(),
            "builder": {"module": BUILDER, "precision": "fp32", "execution_provider": "cpu", "options": list(BUILDER_OPTIONS),
                        "versions": _versions()},
            "rotary_caches": rope, "lm_head": "fp32",
            "ops": sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in proto.graph.node}),
            "nodes": len(proto.graph.node),
        }
        with atomic_dir(Path(out_dir)) as tmp:
            layout["files"] = save_model(proto, tmp) + extra
            for f in extra:
                shutil.copyfile(built / f, tmp / f)
            (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


class OnnxGenaiFormat(OnnxFormat):
    """onnxruntime-genai's fused decoder graph (the builder's shape) carrying the canonical MatMulNBits codes."""

    name = NAME
    runtimes = ("onnxruntime-genai",)
    label = "ONNX (onnxruntime-genai)"
    packages = ("onnxruntime-genai", "onnx")

    def check(self, where: str, vals: dict) -> None:
        from ..errors import ConfigError

        if vals.get("quant") not in SCHEMES:
            raise ConfigError(f"{where} key 'quant': onnx-genai needs one of {', '.join(SCHEMES)}, got {vals.get('quant')!r}")
        if vals.get("group_size", 128) == -1:
            raise ConfigError(f"{where} key 'group_size': MatMulNBits needs a block size (32/64/128)")

    def export(self, spec: ExportSpec, info: ModelInfo, canonical, dest: Path) -> Path:
        return export_onnx_genai(spec, info, canonical, Path(dest) / "onnx-genai")

    def recognize(self, path: Path) -> bool:
        path = Path(path)
        return (path / GENAI_CONFIG).is_file() or (path.suffix == ".onnx" and (path.parent / GENAI_CONFIG).is_file())


FORMAT = OnnxGenaiFormat()
