"""GGUF exporter: canonical codes → a file llama.cpp loads unchanged (shared/reference/gguf-kquants.md §3–4).

Llama and Mistral are written as arch "llama" (q/k rows permuted from HF rotate-half to llama.cpp's
adjacent-pair RoPE), Qwen2 as "qwen2" (NEOX RoPE, no permutation, attention biases). Per-tensor types
follow llama.cpp's mixture rules for the file type; quantized tensors are the canonical stage's codes
packed bit for bit (exporters/kquants.py) — no rounding happens here.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import Target
from ..errors import ArtifactError, ConfigError
from ..model import ModelInfo
from ..quantize.ggml_types import GGML_TYPES
from .base import ExportSpec, Format
from .gguf_vocab import read_vocab
from .grids import GridNeeds
from .kquants import pack
from .state import canonical_fp_state

FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # llama_ftype
LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_name(module: str) -> str:
    """HF module name → GGUF tensor name (without .weight)."""
    if module == "model.embed_tokens":
        return "token_embd"
    if module == "lm_head":
        return "output"
    _, _, i, rest = module.split(".", 3)
    return f"blk.{i}.{LINEAR_NAMES[rest]}"


def tensor_types(file_type: str, n_layers: int, tied: bool, plan: dict | None = None) -> dict[str, str]:
    """GGML type per HF module: llama.cpp's rules for a dense model, then our mixed-precision plan on top.

    A protected tensor (plan["protected"]) takes the plan's higher grid type unless the mixture rule
    already gives it at least as many bits — the plan only ever adds precision.
    """
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0", "F16": "F16", "F32": "F32"}[file_type]
    high = {"Q4_K_M": "Q6_K", "Q5_K_M": "Q6_K"}.get(file_type, base)
    head = {"Q8_0": "Q8_0", "F16": "F16", "F32": "F32"}.get(file_type, "Q6_K")
    out: dict[str, str] = {}
    for i in range(n_layers):
        for lin in LINEAR_NAMES:
            more = lin in ("self_attn.v_proj", "mlp.down_proj") and use_more_bits(i, n_layers)
            out[f"model.layers.{i}.{lin}"] = high if more else base
    if tied:
        out["model.embed_tokens"] = head  # the tied embedding takes the output rule
    else:
        out["model.embed_tokens"] = base
        out["lm_head"] = head
    if plan:
        up = plan["high_grid"].split("_imat")[0].upper()
        for mod in plan.get("protected", []):
            if TYPE_BITS[up] > TYPE_BITS[out[mod]]:
                out[mod] = up
    return out


TYPE_BITS = {name: t.bits for name, t in GGML_TYPES.items()}


def grid_for(ggml_type: str, module: str, imatrix: bool, tied: bool) -> str | None:
    """The canonical grid a tensor's GGML type is packed from (token_embd is never imatrix-weighted)."""
    if ggml_type in ("F16", "F32"):
        return None
    if ggml_type == "Q8_0" or (module == "model.embed_tokens" and not tied):
        return ggml_type.lower()
    return ggml_type.lower() + ("_imat" if imatrix else "")


def reference_choice(file_type: str, n_layers: int, tied: bool, imatrix: bool = True,
                     plan: dict | None = None) -> Callable[[str], str | None]:
    """The canonical grid each module is written with (None = fp), keyed as the canonical result keys it
    (a tied embedding is solved as lm_head)."""
    types = tensor_types(file_type, n_layers, tied, plan)

    def choose(mod: str) -> str | None:
        src = "model.embed_tokens" if tied and mod == "lm_head" else mod
        if tied and mod == "model.embed_tokens":
            return None
        t = types.get(src)
        return grid_for(t, src, imatrix, tied) if t else None

    return choose


def _permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half → llama.cpp adjacent pairs, on the leading (output-row) axis of any array."""
    rows = a.shape[0]
    return a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def write_gguf(out: Path, info: ModelInfo, canonical, file_type: str, imatrix: bool = True,
               provenance: dict | None = None, plan: dict | None = None) -> Path:
    """Write ``out`` (a .gguf file) from a CanonicalModel: its codes, and its fp state for every tensor kept
    in floating point (``canonical`` None: the original model, for F16/F32 files).

    ``plan`` is the target's mixed-precision plan (pipeline.target_plan); it is merged into the
    mixture rules and recorded under ``quantprism.plan``.
    """
    import gguf
    from gguf.utility import model_weight_count_rounded_notation

    from ..manifest import atomic_path

    cfg = info.config
    arch = "qwen2" if info.architecture == "Qwen2ForCausalLM" else "llama"
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    types = tensor_types(file_type, n_layers, info.tied_embeddings, plan)
    choose = reference_choice(file_type, n_layers, info.tied_embeddings, imatrix, plan)
    fp_dtype = np.float32 if file_type == "F32" else np.float16
    rope = cfg.get("rope_parameters") or {}
    fp_state = canonical_fp_state(info, canonical)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        vocab = read_vocab(info)  # first: an unsupported tokenizer fails before anything is written
        w.add_type("model")
        w.add_name(info.path.name)
        w.add_basename(info.path.name)
        w.add_size_label(model_weight_count_rounded_notation(info.n_params))  # gguf-py's own label
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(int(cfg["hidden_size"]))
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        w.add_rope_dimension_count(head_dim)
        if head_dim != int(cfg["hidden_size"]) // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_file_type(FILE_TYPES[file_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        prov = provenance or {}
        w.add_string("quantprism.method", f"{canonical.recipe.transform}+{canonical.recipe.method}" if canonical else "none")
        w.add_string("quantprism.calibration_sha256", str(prov.get("calibration", {}).get("sha256", "")))
        w.add_string("quantprism.model_sha256", info.weights_sha256)
        w.add_string("quantprism.file_type", file_type)
        w.add_string("quantprism.plan", json.dumps(
            {"protected": {m: types[m] for m in plan.get("protected", [])}, "bits_per_weight": plan.get("bits_per_weight")}
            if plan else {}, sort_keys=True))
        vocab.write(w)
        w.add_string("quantprism.tokenizer", json.dumps(vocab.record(), sort_keys=True))  # how `pre` was chosen

        def emit(gname: str, hf: str, permute_heads: int | None = None) -> None:
            mod = hf.removesuffix(".weight")
            t = types.get(mod)
            # a tied embedding is the output matrix: the stage solved it as lm_head
            key = "lm_head" if mod == "model.embed_tokens" and info.tied_embeddings else mod
            gid = choose(key)
            if gid is not None:
                if canonical is None or gid not in canonical.quant.get(key, {}):
                    raise ArtifactError(f"canonical result has no grid {gid} for {key}; re-run quantize for {file_type}")
                qt = canonical.quant[key][gid]
                params = {"codes": qt.codes, **qt.params}
                if permute_heads:
                    params = {k: _permute_rows(v, permute_heads) for k, v in params.items()}
                raw = np.frombuffer(pack(t, params), dtype=np.uint8).reshape(qt.codes.shape[0], -1)
                w.add_tensor(gname, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, t))
                return
            x = fp_state[hf].float().numpy()
            if permute_heads:
                x = _permute_rows(x, permute_heads)
            w.add_tensor(gname, x.astype(fp_dtype if x.ndim == 2 else np.float32))

        emit("token_embd.weight", "model.embed_tokens.weight")
        emit("output_norm.weight", "model.norm.weight")
        if not info.tied_embeddings:
            emit("output.weight", "lm_head.weight")
        for i in range(n_layers):
            p = f"model.layers.{i}"
            for hf, g in NORM_NAMES.items():
                emit(f"blk.{i}.{g}.weight", f"{p}.{hf}.weight")
            for lin, g in LINEAR_NAMES.items():
                perm = None
                if arch == "llama" and lin in ("self_attn.q_proj", "self_attn.k_proj"):
                    perm = n_head if lin.endswith("q_proj") else n_kv
                emit(f"blk.{i}.{g}.weight", f"{p}.{lin}.weight", perm)
                if f"{p}.{lin}.bias" in fp_state:
                    b = fp_state[f"{p}.{lin}.bias"].float().numpy()
                    if perm:  # llama.cpp adds the bias before RoPE: it must follow its rows
                        b = _permute_rows(b, perm)
                    w.add_tensor(f"blk.{i}.{g}.bias", b.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


GGUF_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")
# K-quant super-block (256) or Q8_0 block (32): in_features must be a multiple of it.
GGUF_BLOCK = {ft: GGML_TYPES[base].block for ft, base in
              {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0", "F16": "F16"}.items()}
MAIN_TYPE = {"Q4_K_M": ("q4_k", "q6_k"), "Q5_K_M": ("q5_k", "q6_k"), "Q6_K": ("q6_k",), "Q8_0": ("q8_0",)}


class GGUFFormat(Format):
    name = "gguf"
    runtimes = ("llamacpp",)
    label = "GGUF"
    packages = ("gguf", "llama_cpp_python")

    def check(self, where: str, vals: dict) -> None:
        quant, method = vals.get("quant"), vals.get("method", "gptq")
        if quant not in GGUF_QUANTS:
            raise ConfigError(f"{where} key 'quant': GGUF needs one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
        if method.startswith("awq") and quant in ("Q8_0", "F16"):
            raise ConfigError(f"{where} key 'method': AWQ scaling has no effect at {quant}; use rtn or gptq")

    def bits_group(self, t: Target) -> tuple[int, int]:
        return {"Q4_K_M": (4, 32), "Q5_K_M": (5, 32), "Q6_K": (6, 16), "Q8_0": (8, 32), "F16": (16, -1)}[t.quant or ""]

    def shape_problem(self, t: Target, linear_shapes: dict[str, tuple[int, int]]) -> str | None:
        block = GGUF_BLOCK[t.quant or "F16"]
        for name, (_, k) in linear_shapes.items():
            if k % block:
                return f"{t.quant} needs in_features divisible by {block}, but {name} has {k}; choose Q8_0 or another model"
        return None

    def grid_needs(self, t: Target) -> GridNeeds:
        if t.quant not in MAIN_TYPE:
            return GridNeeds(())  # F16: nothing to quantize
        im = "_imat" if t.imatrix else ""
        types = MAIN_TYPE[t.quant]
        grids = tuple(x if x == "q8_0" else x + im for x in types)
        return GridNeeds(grids, (grids[-1],), (types[0],))  # token_embd: never imatrix-weighted

    def module_grids(self, t: Target, info: ModelInfo, canonical, plan: dict | None) -> dict[str, str | None]:
        choose = reference_choice(t.quant or "F16", int(info.config["num_hidden_layers"]), info.tied_embeddings,
                                  t.imatrix, plan)
        return {m: choose(m) for m in (canonical.quant if canonical is not None else {})}

    def export(self, spec: ExportSpec, info: ModelInfo, canonical, dest: Path) -> Path:
        return write_gguf(Path(dest) / "model.gguf", info, canonical, spec.quant or "F16", imatrix=spec.imatrix,
                          provenance=spec.provenance, plan=spec.plan)

    def recognize(self, path: Path) -> bool:
        return Path(path).suffix == ".gguf"


FORMAT = GGUFFormat()
