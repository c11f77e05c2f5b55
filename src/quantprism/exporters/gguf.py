"""GGUF exporter: canonical codes → a file llama.cpp loads unchanged (shared/reference/gguf-kquants.md §3–4).

The architecture's structure comes from model/archs.py: Llama and Mistral are written as arch "llama" (q/k rows
permuted from HF rotate-half to llama.cpp's adjacent-pair RoPE), Qwen2 as "qwen2" (NEOX RoPE, no permutation,
attention biases), Qwen3 as "qwen3" (NEOX, per-head q/k RMSNorm gains). RoPE scaling: gguf_rope.py. Per-tensor types
follow llama.cpp's mixture rules for the file type; quantized tensors are the canonical stage's codes
packed bit for bit (exporters/kquants.py) — no rounding happens here.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import progress
from ..config import Target
from ..errors import ArtifactError, ConfigError
from ..model import ModelInfo
from ..quantize.mixed import higher_grid
from .base import ExportSpec, Format
from .gguf_rope import rotary_dims, write_rope
from .gguf_types import (
    DEFAULT_TYPE,
    FILE_TYPES,
    LINEAR_NAMES,
    fallback,
    model_ncols,
    model_types,
    tensor_types,
)
from .gguf_vocab import read_vocab
from .grids import GridNeeds
from .kquants import pack
from .state import canonical_fp_state

log = logging.getLogger(__name__)


def gguf_name(module: str) -> str:
    """HF module name → GGUF tensor name (without .weight)."""
    if module == "model.embed_tokens":
        return "token_embd"
    if module == "lm_head":
        return "output"
    _, _, i, rest = module.split(".", 3)
    return f"blk.{i}.{LINEAR_NAMES[rest]}"


def grid_for(ggml_type: str, module: str, imatrix: bool, tied: bool) -> str | None:
    """The canonical grid a tensor's GGML type is packed from (token_embd is never imatrix-weighted)."""
    if ggml_type in ("F16", "F32"):
        return None
    if ggml_type == "Q8_0" or (module == "model.embed_tokens" and not tied):
        return ggml_type.lower()
    return ggml_type.lower() + ("_imat" if imatrix else "")


def choice_from_types(types: dict[str, str], tied: bool, imatrix: bool = True) -> Callable[[str], str | None]:
    """The canonical grid each module is written with (None = fp), keyed as the canonical result keys it
    (a tied embedding is solved as lm_head)."""

    def choose(mod: str) -> str | None:
        src = "model.embed_tokens" if tied and mod == "lm_head" else mod
        if tied and mod == "model.embed_tokens":
            return None
        t = types.get(src)
        return grid_for(t, src, imatrix, tied) if t else None

    return choose


def reference_choice(file_type: str, info: ModelInfo, imatrix: bool = True,
                     plan: dict | None = None) -> Callable[[str], str | None]:
    """choice_from_types for one checkpoint (its shapes decide llama.cpp's fallbacks)."""
    return choice_from_types(model_types(file_type, info, plan, imatrix), info.tied_embeddings, imatrix)


def write_gemma3_attention(w, cfg: dict, head_dim: int) -> None:
    """Gemma 3's local/global layers: the window, which layers use it (from ``layer_types``; llama.cpp's default
    would be every 6th layer global) and the local layers' RoPE base. llama.cpp fixes the query scale at
    1/√head_dim (except its 27B), so another ``query_pre_attn_scalar`` is refused rather than run wrong."""
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar is not None and int(scalar) != head_dim:
        raise ArtifactError(f"query_pre_attn_scalar {scalar} ≠ head_dim {head_dim}: llama.cpp's gemma3 scales queries "
                            "by 1/√head_dim, so this model would run with the wrong attention scale")
    types = cfg.get("layer_types")
    if cfg.get("sliding_window") and types and "sliding_attention" in types:
        w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        if local is None:
            local = cfg.get("rope_local_base_freq")
        if local is not None:
            w.add_rope_freq_base_swa(float(local))


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

    Streamed: the tensor-info table is built from the checkpoint's shapes, then each tensor is read (or packed) and
    written in turn, so memory stays at about one tensor and its packed form; bytes written go to ``progress``. The
    file is the one ``GGUFWriter.add_tensor`` + ``write_tensors_to_file`` would write, byte for byte.
    """
    import gguf
    from gguf.utility import model_weight_count_rounded_notation

    from ..manifest import atomic_path

    cfg = info.config
    spec = info.arch
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    types = model_types(file_type, info, plan, imatrix)
    choose = choice_from_types(types, info.tied_embeddings, imatrix)
    fp_dtype = np.float32 if file_type == "F32" else np.float16
    fp_state = canonical_fp_state(info, canonical)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if spec.gguf == "llama" and window and int(window) < int(cfg.get("max_position_embeddings", 0)):
        # as llama.cpp's own converter: its llama arch has no sliding window (Mistral v0.1's 4096)
        log.warning("%s: llama.cpp runs %s with full attention; the %s-token sliding window is not applied, so "
                    "contexts longer than the window differ from the original", info.path, info.architecture, window)
    if not spec.gguf_output and not info.tied_embeddings:
        raise ArtifactError(f"{info.path}: llama.cpp runs {info.architecture} with the token embedding as output "
                            "matrix; this checkpoint has its own lm_head (untied), which a GGUF cannot carry")
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), spec.gguf)
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
        rope_dims = rotary_dims(cfg, head_dim)
        w.add_rope_dimension_count(rope_dims)
        # every tensor is registered first (name, shape, bytes, loader) and written in pass 2, in registration order
        tensors: list[tuple[str, tuple[int, ...], int, Callable[[], np.ndarray]]] = []

        def add_array(name: str, arr: np.ndarray) -> None:  # a small tensor computed here (RoPE factors)
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
            tensors.append((name, tuple(arr.shape), arr.nbytes, lambda: arr))

        write_rope(w, cfg, rope_dims, add_array)
        if head_dim != int(cfg["hidden_size"]) // n_head or spec.norm_offset:  # Gemma: always, as llama.cpp's converter
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
            if cfg.get(key) is not None:
                add(float(cfg[key]))
        if spec.gguf == "gemma2" and cfg.get("sliding_window"):  # llama.cpp alternates local/global layers itself
            w.add_sliding_window(int(cfg["sliding_window"]))
        if spec.gguf == "gemma3":
            write_gemma3_attention(w, cfg, head_dim)
        if spec.gguf == "phi3":  # llama.cpp reads 0 as "no window" (Phi-4) — its converter always writes the key
            w.add_sliding_window(int(cfg.get("sliding_window") or 0))
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

        # Pass 1: every tensor's name, shape, type and size, from the checkpoint's shapes — nothing is read or packed
        # yet; the tensor-info table is written from it. Pass 2 then reads/packs and writes one tensor at a time.

        def shape_of(hf: str) -> tuple[int, ...]:
            ti = info.tensors.get(hf)
            if ti is None:
                raise ArtifactError(f"{info.path}: the checkpoint has no tensor {hf}, which the GGUF needs")
            return tuple(int(d) for d in ti.shape)

        def load_quant(key: str, gid: str, qtype: str, permute_heads: int | None) -> np.ndarray:
            qt = canonical.quant[key][gid]
            params = {"codes": qt.codes, **qt.params}
            if permute_heads:
                params = {k: _permute_rows(v, permute_heads) for k, v in params.items()}
            return np.frombuffer(pack(qtype, params), dtype=np.uint8).reshape(qt.codes.shape[0], -1)

        def load_fp(hf: str, dtype: np.dtype, permute_heads: int | None, norm: bool) -> np.ndarray:
            x = fp_state[hf].float().numpy()
            if norm:  # HF stores w for x̂·(1 + w); llama.cpp the gain
                x = x + np.float32(spec.norm_offset)
            if permute_heads:
                x = _permute_rows(x, permute_heads)
            return x.astype(dtype)

        def emit(gname: str, hf: str, permute_heads: int | None = None) -> None:
            mod = hf.removesuffix(".weight")
            t = types.get(mod)
            # a tied embedding is the output matrix: the stage solved it as lm_head
            key = "lm_head" if mod == "model.embed_tokens" and info.tied_embeddings else mod
            gid = choose(key)
            shape = shape_of(hf)
            if gid is not None:
                if canonical is None or gid not in canonical.quant.get(key, {}):
                    raise ArtifactError(f"canonical result has no grid {gid} for {key}; re-run quantize for {file_type}")
                qtype = getattr(gguf.GGMLQuantizationType, t)
                byte_shape = tuple(int(d) for d in gguf.quant_shape_to_byte_shape(shape, qtype))
                nbytes = int(np.prod(byte_shape))
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
                tensors.append((gname, byte_shape, nbytes, lambda: load_quant(key, gid, t, permute_heads)))
                return
            dtype = np.dtype(fp_dtype if len(shape) == 2 else np.float32)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            w.add_tensor_info(gname, shape, dtype, nbytes)
            norm = bool(spec.norm_offset) and hf.endswith("norm.weight")
            tensors.append((gname, shape, nbytes, lambda: load_fp(hf, dtype, permute_heads, norm)))

        def emit_bias(gname: str, hf: str, permute_heads: int | None) -> None:
            shape, dtype = shape_of(hf), np.dtype(np.float32)  # llama.cpp adds the bias before RoPE: it follows its rows
            nbytes = int(np.prod(shape)) * dtype.itemsize
            w.add_tensor_info(gname, shape, dtype, nbytes)
            tensors.append((gname, shape, nbytes, lambda: load_fp(hf, dtype, permute_heads, False)))

        emit("token_embd.weight", "model.embed_tokens.weight")
        emit("output_norm.weight", "model.norm.weight")
        if not info.tied_embeddings:
            emit("output.weight", "lm_head.weight")
        for i in range(n_layers):
            p = f"model.layers.{i}"
            for hf, g in spec.layer_norms:
                emit(f"blk.{i}.{g}.weight", f"{p}.{hf}.weight")
            if spec.qk_norm:  # per-head gains on q and k, applied before RoPE (NEOX archs: no permutation)
                emit(f"blk.{i}.attn_q_norm.weight", f"{p}.self_attn.q_norm.weight")
                emit(f"blk.{i}.attn_k_norm.weight", f"{p}.self_attn.k_norm.weight")
            for lin in spec.linears:
                g = LINEAR_NAMES[lin]
                perm = None
                if spec.permute_qk and lin in ("self_attn.q_proj", "self_attn.k_proj"):
                    perm = n_head if lin.endswith("q_proj") else n_kv
                emit(f"blk.{i}.{g}.weight", f"{p}.{lin}.weight", perm)
                if f"{p}.{lin}.bias" in fp_state:
                    emit_bias(f"blk.{i}.{g}.bias", f"{p}.{lin}.bias", perm)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with progress.task(f"export {out.name}", total=sum(n for *_, n, _ in tensors), unit="B") as task:
                for gname, shape, nbytes, load in tensors:
                    data = load()
                    if data.shape != shape or data.nbytes != nbytes:
                        raise ArtifactError(f"{gname}: shape {data.shape}, but the checkpoint's shape gives {shape}; "
                                            "the canonical result does not match the model")
                    w.write_tensor_data(data)
                    task.advance(nbytes)
                    del data
        finally:
            w.close()
    return out


GGUF_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "F16")
BITS_GROUP = {"Q4_K_M": (4, 32), "Q4_K_S": (4, 32), "Q5_K_M": (5, 32), "Q5_K_S": (5, 32), "Q6_K": (6, 16),
              "Q8_0": (8, 32), "Q4_0": (4, 32), "IQ4_XS": (4, 32), "F16": (16, -1)}


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

    def acts_quantized(self, vals: dict) -> bool:
        # llama.cpp's CPU dot products round every activation row to 8 bits (Q8_K per 256, Q8_0/Q8_1 per 32) for
        # every quantized weight type: SmoothQuant's migration of activation outliers into the weights applies
        return vals.get("quant") not in ("F16", "F32", "BF16", None)

    def act_rounding(self, t: Target) -> str:
        return "ggml" if self.acts_quantized({"quant": t.quant}) else "none"

    def bits_group(self, t: Target) -> tuple[int, int]:
        return BITS_GROUP[t.quant or "F16"]

    def shape_problem(self, t: Target, linear_shapes: dict[str, tuple[int, int]]) -> str | None:
        return None  # llama.cpp writes every row length: a 32-block type where 256 does not divide, else F16

    def shape_notes(self, t: Target, info: ModelInfo) -> str:
        """The tensors llama.cpp's shape fallback moves to another type, counted by type."""
        default = DEFAULT_TYPE[t.quant or "F16"]
        if default in ("F16", "F32"):
            return ""
        base = model_types(t.quant, info, None, t.imatrix, shapes=False)
        moved = Counter(f"{base[mod]}→{typ}" for mod, typ in model_types(t.quant, info, None, t.imatrix).items()
                        if typ != base[mod])
        if not moved:
            return ""
        return "llama.cpp fallback (rows not a multiple of 256): " + ", ".join(f"{n} × {k}" for k, n in sorted(moved.items()))

    def grid_needs(self, t: Target, info: ModelInfo | None = None) -> GridNeeds:
        """Exactly the grids the writer will pack for ``info`` (its shapes decide the fallbacks); without a model,
        a nominal one whose rows fit every block."""
        default = DEFAULT_TYPE[t.quant or "F16"]
        if default in ("F16", "F32"):
            return GridNeeds(())  # nothing to quantize
        if info is None:
            types, tied, cols = tensor_types(t.quant, 8, False, imatrix=t.imatrix), False, {}
        else:
            types, tied, cols = model_types(t.quant, info, None, t.imatrix), info.tied_embeddings, model_ncols(info)
        layers = [m for m in types if m.startswith("model.layers.")]
        grids = [grid_for(default, layers[0], t.imatrix, tied)] + [grid_for(types[m], m, t.imatrix, tied) for m in layers]
        if t.protect > 0 or t.max_bpw is not None:  # a protected tensor may need the higher type's fallback
            up = higher_grid(grids[0]).split("_imat")[0].upper()
            grids += [grid_for(fallback(up, cols[m]) if m in cols else up, m, t.imatrix, tied) for m in layers]
        head = "model.embed_tokens" if tied else "lm_head"
        embed = () if tied else (grid_for(types["model.embed_tokens"], "model.embed_tokens", t.imatrix, tied),)
        mix = () if info is None else tuple(f"{m}={g}" for m in layers if (g := grid_for(types[m], m, t.imatrix, tied)))
        return GridNeeds(tuple(g for g in dict.fromkeys(grids) if g), (grid_for(types[head], head, t.imatrix, tied),),
                         tuple(g for g in embed if g), mix)

    def module_grids(self, t: Target, info: ModelInfo, canonical, plan: dict | None) -> dict[str, str | None]:
        choose = reference_choice(t.quant or "F16", info, t.imatrix, plan)
        return {m: choose(m) for m in (canonical.quant if canonical is not None else {})}

    def export(self, spec: ExportSpec, info: ModelInfo, canonical, dest: Path) -> Path:
        return write_gguf(Path(dest) / "model.gguf", info, canonical, spec.quant or "F16", imatrix=spec.imatrix,
                          provenance=spec.provenance, plan=spec.plan)

    def recognize(self, path: Path) -> bool:
        return Path(path).suffix == ".gguf"


FORMAT = GGUFFormat()
