"""ONNX artifact for ONNX Runtime: one fp32 decoder graph with a KV cache, integer kernels carrying the codes.

Route: ``torch.onnx.export(dynamo=True, opset 18)`` of a decoding-step wrapper (input_ids,
attention_mask over past+current, position_ids, past_key_values.N.key/value → logits,
present.N.key/value), so prefill and decode run the same graph. The torch model is first loaded
with the canonical weights (transformed fp tensors + each chosen grid dequantized); every
quantized linear's MatMul is then found by the exporter's name-scope metadata, its constant B is
checked to equal the dequantized weight bit for bit (so the node↔module mapping cannot be wrong),
and it is replaced by an ORT integer kernel fed the codes themselves (onnx_kernels.py).

Deterministic: node metadata (stack traces, fx names) and doc strings are stripped, initializer
names are the HF names, the external-data file (models over ~2 GB) has a fixed name.
"""
from __future__ import annotations

import ast
import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..config import Target
from ..errors import ArtifactError, ConfigError
from ..model import ModelInfo, load_torch_model
from .base import ExportSpec, Format
from .grids import GridNeeds, int8_reduced, int_grid
from .hf_checkpoint import TOKENIZER_FILES, atomic_dir
from .onnx_kernels import W8A8, kernel_for, linear_nodes, splice
from .onnx_rope import exportable_rope
from .state import canonical_weights, load_weights

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
LAYOUT_FILE = "quantprism_onnx.json"
OPSET = 18
EXTERNAL_BYTES = 2**31 - 2**27  # protobuf's 2 GiB message limit, with room for the graph itself
_WRAPPED = "m."  # attribute name of the model inside the step wrapper: initializer names start with it


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Graph inputs and outputs; present.N.x feeds past_key_values.N.x of the next step (same position)."""
    kv = [(i, s) for i in range(n_layers) for s in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{s}" for i, s in kv],
            ["logits"] + [f"present.{i}.{s}" for i, s in kv])


class DecodeStep(torch.nn.Module):
    """One decoding step of a transformers CausalLM with the KV cache as plain tensors (export-friendly)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model
        self.n_layers = int(model.config.num_hidden_layers)

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache()  # full-length layers: a sliding window, if any, is applied by the mask
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def kv_shape(config: dict) -> tuple[int, int]:
    """(KV heads, head dim) of a transformers config dict."""
    n_head = int(config["num_attention_heads"])
    return int(config.get("num_key_value_heads") or n_head), int(config.get("head_dim") or config["hidden_size"] // n_head)


def export_fp_graph(model: torch.nn.Module) -> onnx.ModelProto:
    """Dynamo export of the decoding step (dynamic batch, sequence and past lengths), HF initializer names."""
    cfg = model.config.to_dict()
    n_layers = int(cfg["num_hidden_layers"])
    n_kv, hd = kv_shape(cfg)
    b, t, p = 1, 5, 3  # not 0/1: torch.export would specialise those sizes
    ids = torch.zeros(b, t, dtype=torch.long)
    args = (ids, torch.ones(b, p + t, dtype=torch.long), torch.arange(p, p + t)[None],
            [torch.zeros(b, n_kv, p, hd) for _ in range(2 * n_layers)])
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}, "position_ids": {0: batch, 1: seq},
           "past": [{0: batch, 2: past} for _ in range(2 * n_layers)]}
    ins, outs = io_names(n_layers)
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # "torchvision is not installed" notices are irrelevant here
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            with exportable_rope(model):
                prog = torch.onnx.export(DecodeStep(model).eval(), args, dynamo=True, dynamic_shapes=dyn,
                                         opset_version=OPSET, input_names=ins, output_names=outs, verbose=False)
    finally:
        log.setLevel(level)
    proto = prog.model_proto
    del prog
    _rename_initializers(proto)
    return proto


def _rename_initializers(proto: onnx.ModelProto) -> None:
    """HF names for parameters; ``{module}.weight.T`` for the transposed linear weights the optimizer folded."""
    g = proto.graph
    rename = {i.name: i.name[len(_WRAPPED):] for i in g.initializer if i.name.startswith(_WRAPPED)}
    inits = {i.name for i in g.initializer}
    for node in g.node:
        mod = _scope(node) if node.op_type == "MatMul" else None
        b = node.input[1] if mod else None
        if b in inits and b not in rename and f"{mod}.weight.T" not in rename.values():
            rename[b] = f"{mod}.weight.T"
    for init in g.initializer:
        init.name = rename.get(init.name, init.name)
    for node in g.node:
        for j, x in enumerate(node.input):
            if x in rename:
                node.input[j] = rename[x]


def chosen_grids(canonical, choose: Callable[[str], str | None]) -> dict[str, str]:
    """{module: grid id} for every module the artifact quantizes; a missing grid is an error."""
    out = {}
    for mod in sorted(canonical.quant if canonical is not None else {}):
        gid = choose(mod)
        if gid is None:
            continue
        if gid not in canonical.quant[mod]:
            raise ArtifactError(f"canonical result has no grid {gid} for {mod}; re-run quantize for this target")
        kernel_for(gid)  # refuses grids ORT cannot run, before the slow export
        out[mod] = gid
    return out


def _scope(node: onnx.NodeProto) -> str | None:
    """The torch module a node came from (the exporter's ``name_scopes`` metadata), without the wrapper prefix."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            mod = scopes[-2] if len(scopes) >= 2 else ""
            return mod[len(_WRAPPED):] if mod.startswith(_WRAPPED) else None
    return None


def _weight_of(g: onnx.GraphProto, name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """B of a MatMul as [K, N]: an initializer, or a Transpose of one (tied embeddings feed lm_head that way)."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for n in g.node:
        if n.op_type == "Transpose" and n.output[0] == name and n.input[0] in inits:
            perm = [a.ints for a in n.attribute if a.name == "perm"]
            if not perm or list(perm[0]) == [1, 0]:
                return numpy_helper.to_array(inits[n.input[0]]).T
    return None


def quantize_graph(proto: onnx.ModelProto, canonical, grids: dict[str, str], accuracy_level: int = 4) -> None:
    """Replace the MatMul of every module in ``grids`` by its integer kernel (in place)."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    found: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        mod = _scope(n) if n.op_type == "MatMul" else None
        if mod in grids:
            if mod in found:
                raise ArtifactError(f"{mod}: the exported graph has two MatMuls for one linear; cannot map it")
            found[mod] = n
    missing = sorted(set(grids) - set(found))
    if missing:
        raise ArtifactError(f"no MatMul found for {missing[0]} in the exported graph (torch.onnx metadata changed?)")
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    emitted: set[str] = set()
    for mod, node in found.items():
        qt = canonical.quant[mod][grids[mod]]
        b = _weight_of(g, node.input[1], inits)
        if b is None or not np.array_equal(b, qt.dequantize().T):
            raise ArtifactError(f"{mod}: the graph's weight is not the canonical weight; the MatMul mapping is wrong")
        rep = linear_nodes(mod, node.input[0], node.output[0], qt, accuracy_level)
        pre = [q for x, qs in rep.shared.items() if x not in emitted for q in qs]
        emitted.update(rep.shared)
        new_nodes[node.name] = pre + rep.nodes
        g.initializer.extend(rep.initializers)
    splice(proto, new_nodes, [], prune=True)


def strip_metadata(proto: onnx.ModelProto) -> None:
    """Stack traces and fx names vary with the calling code: drop them so identical inputs give identical bytes."""
    g = proto.graph
    for n in g.node:
        del n.metadata_props[:]
        n.doc_string = ""
    for v in (*g.input, *g.output, *g.value_info):
        del v.metadata_props[:]
        v.doc_string = ""
    for i in g.initializer:
        del i.metadata_props[:]
    del g.metadata_props[:]
    g.doc_string = ""
    proto.doc_string = ""


def save_model(proto: onnx.ModelProto, root: Path, external: bool | None = None) -> list[str]:
    """Write ``root/model.onnx`` (+ ``model.onnx.data`` when external or larger than protobuf allows)."""
    size = sum(len(i.raw_data) for i in proto.graph.initializer)
    if external is None:
        external = size > EXTERNAL_BYTES
    onnx.save_model(proto, str(root / MODEL_FILE), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    return [MODEL_FILE, DATA_FILE] if external else [MODEL_FILE]


def _set_metadata(proto: onnx.ModelProto, meta: dict[str, object]) -> None:
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        proto.metadata_props.add(key=k, value=json.dumps(v) if not isinstance(v, str) else v)
    proto.producer_name = "quantprism"
    proto.producer_version = ""


def _runtime_meta(info: ModelInfo) -> dict[str, object]:
    """Facts the runtime needs without the exporter: KV geometry and special tokens."""
    cfg = info.config
    n_kv, hd = kv_shape(cfg)
    eos = cfg.get("eos_token_id")
    return {"num_layers": int(cfg["num_hidden_layers"]), "num_kv_heads": n_kv, "head_dim": hd,
            "vocab_size": int(cfg["vocab_size"]), "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
            "architecture": info.architecture}


def export_onnx(spec: ExportSpec | Target | None, info: ModelInfo, canonical, out_dir: Path, plan: dict | None = None, *,
                accuracy_level: int = 4, external_data: bool | None = None) -> Path:
    """Write ``out_dir`` (model.onnx [+ model.onnx.data], tokenizer, quantprism_onnx.json) atomically.

    ``spec`` None (or no canonical result) exports the fp32 graph of ``info``'s weights; a ``Target`` is
    resolved into its ExportSpec first (a convenience for scripts and tests).
    """
    if isinstance(spec, Target):
        spec = FORMAT.spec(spec, info, canonical, plan)
    grids = chosen_grids(canonical, spec.grid_id if spec is not None else (lambda _m: None))
    model = load_torch_model(info)
    load_weights(model, canonical_weights(info, canonical, grids.get))
    with torch.inference_mode(False), torch.no_grad():
        proto = export_fp_graph(model)
    del model
    if grids:
        quantize_graph(proto, canonical, grids, accuracy_level)
    strip_metadata(proto)
    meta = _runtime_meta(info)
    _set_metadata(proto, {f"quantprism.{k}": v for k, v in meta.items()})
    ins, outs = io_names(meta["num_layers"])  # type: ignore[arg-type]
    kernels = {m: kernel_for(gid) for m, gid in grids.items()}
    layout = {
        "schema": 1, "opset": OPSET, "inputs": ins, "outputs": outs,
        "past_to_present": {p: q for p, q in zip(ins[3:], outs[1:], strict=True)},
        "kv_layout": "[batch, kv_heads, positions, head_dim] float32", **meta,
        "format": "onnx", "scheme": spec.scheme if spec is not None else "fp32",
        "accuracy_level": accuracy_level if any(k != W8A8 for k in kernels.values()) else None,
        "grids": grids, "kernels": kernels,
        "recipe": canonical.recipe.key() if canonical is not None else None,
    }
    with atomic_dir(Path(out_dir)) as tmp:
        layout["files"] = save_model(proto, tmp, external_data)
        for f in TOKENIZER_FILES + ("config.json", "generation_config.json"):
            if (info.path / f).is_file():
                shutil.copyfile(info.path / f, tmp / f)
        (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


ONNX_SCHEMES = ("nbits8", "w8a8", "nbits4", "nbits2")
SCHEME_BITS = {"nbits8": 8, "nbits4": 4, "nbits2": 2}  # MatMulNBits weight bits; 2 is a floor for damage probes, not a default


class OnnxFormat(Format):
    name = "onnx"
    runtimes = ("onnxruntime",)
    label = "ONNX"
    packages = ("onnx", "onnxruntime")
    # MatMulNBits runs with accuracy_level 4: activations are rounded to int8 per block inside the kernel
    quantizes_activations = True

    def act_rounding(self, t: Target) -> str:
        return "nbits" if (t.quant or "").startswith("nbits") else "tensor" if t.quant == "w8a8" else "none"

    def check(self, where: str, vals: dict) -> None:
        quant, gs = vals.get("quant"), vals.get("group_size", 128)
        if quant not in ONNX_SCHEMES:
            raise ConfigError(f"{where} key 'quant': ONNX needs one of {', '.join(ONNX_SCHEMES)}, got {quant!r}")
        if quant == "w8a8" and vals.get("group_size", -1) != -1:
            raise ConfigError(f"{where} key 'group_size': w8a8 (MatMulInteger) weights are per channel; set group_size = -1")
        if quant in SCHEME_BITS and gs == -1:
            raise ConfigError(f"{where} key 'group_size': MatMulNBits needs a block size (32/64/128)")
        if vals.get("method", "gptq").startswith("awq") and quant == "w8a8":
            raise ConfigError(f"{where} key 'method': AWQ targets weight-only grids")

    def bits_group(self, t: Target) -> tuple[int, int]:
        if t.quant == "w8a8":
            return 8, -1
        return SCHEME_BITS[t.quant], t.group_size

    def grid_needs(self, t: Target, info: ModelInfo | None = None) -> GridNeeds:
        if t.quant == "w8a8":
            return GridNeeds((int_grid(8, -1, True, "fp32", narrow=True, reduced=int8_reduced(t)),))
        return GridNeeds((int_grid(SCHEME_BITS[t.quant], t.group_size, t.symmetric, "fp32"),))

    def module_grids(self, t: Target, info: ModelInfo | None, canonical, plan: dict | None) -> dict[str, str | None]:
        grids = super().module_grids(t, info, canonical, plan)
        for gid in grids.values():
            if gid is not None:
                kernel_for(gid)  # refuses grids ORT cannot run, before the slow export
        return grids

    def export(self, spec: ExportSpec, info: ModelInfo, canonical, dest: Path) -> Path:
        return export_onnx(spec, info, canonical, Path(dest) / "onnx") / MODEL_FILE

    def recognize(self, path: Path) -> bool:
        path = Path(path)
        return path.suffix == ".onnx" or (path / MODEL_FILE).is_file() or (path / LAYOUT_FILE).is_file()


FORMAT = OnnxFormat()
