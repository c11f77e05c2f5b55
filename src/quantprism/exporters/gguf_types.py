"""Which GGML type each tensor of a GGUF file gets: llama.cpp's mixture rules for the file type
(``llama_tensor_get_type_impl`` in src/llama-quant.cpp), then its shape fallback (``tensor_type_fallback``)
for rows that are not a multiple of the type's block, then our mixed-precision plan (which only adds bits).

Covered: the dense-model branches of the file types below. Not modelled (they do not apply to the dense
Llama/Qwen2 models we export): MoE expert counts, Falcon's and GLM's own branches, and the 70B-only attn_v bump
(llama.cpp keys it on the model-size label "70B").
"""
from __future__ import annotations

from ..model.archs import LLAMA_LINEARS
from ..quantize.ggml_types import GGML_TYPES

FILE_TYPES = {  # llama_ftype ids
    "F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_XS": 30,
}
DEFAULT_TYPE = {  # llama_ftype_get_default_type
    "F32": "F32", "F16": "F16", "Q4_0": "Q4_0", "Q8_0": "Q8_0", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ4_XS": "IQ4_XS",
}
# a 256-block type whose block does not divide the row falls back to a 32-block type of similar size
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused matrices (llama.cpp splits them)
}
TYPE_BITS = {name: t.bits for name, t in GGML_TYPES.items()}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(ggml_type: str, ncols: int) -> str:
    """tensor_type_fallback: the type llama.cpp writes when ``ncols`` (ne[0]) is not a multiple of the block."""
    if ggml_type in ("F16", "F32") or ncols % GGML_TYPES[ggml_type].block == 0:
        return ggml_type
    t = FALLBACK.get(ggml_type, ggml_type)
    return t if ncols % GGML_TYPES[t].block == 0 else "F16"


def _output_type(default: str, ncols: int) -> str:
    """output.weight (and a tied token_embd): Q8_0 when the default type's block does not fit, else Q6_K."""
    if ncols % GGML_TYPES[default].block:
        return "Q8_0"
    return default if default == "Q8_0" else "Q6_K"


def _layer_type(file_type: str, default: str, lin: str, i: int, n: int, n_gqa: int, imatrix: bool) -> str:
    if lin == "self_attn.qkv_proj":  # llama.cpp's ATTENTION_QKV category
        return {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(file_type, default)
    if lin == "self_attn.v_proj":
        if file_type == "IQ4_XS" and n_gqa >= 4:
            return "Q5_K"
        if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            return "Q6_K"
        if file_type == "Q4_K_S" and i < 4:
            return "Q5_K"
    elif lin == "mlp.down_proj":  # the else-if chain of llama.cpp, in its order
        if file_type == "Q4_K_M":
            return "Q6_K" if use_more_bits(i, n) else default
        if file_type == "IQ4_XS" and i < n // 8 and not imatrix:
            return "Q5_K"
        if file_type == "Q5_K_M":
            return "Q6_K" if use_more_bits(i, n) else default
        if file_type == "Q4_K_S" and i < n // 8:
            return "Q5_K"
        if file_type == "Q4_0" and imatrix and i < n // 8:
            return "Q4_1"  # llama.cpp's guard for the first ffn_down layers, only with an imatrix
    return default


def tensor_types(file_type: str, n_layers: int, tied: bool, plan: dict | None = None, *,
                 ncols: dict[str, int] | None = None, n_gqa: int = 1, imatrix: bool = True,
                 linears: tuple[str, ...] = LLAMA_LINEARS) -> dict[str, str]:
    """GGML type per HF module (decoder linears, lm_head, model.embed_tokens).

    ``ncols``: each module's row length (in_features; the hidden size for the embedding), for the shape
    fallback — modules not listed are taken to fit every block. ``imatrix``: whether the file is built with an
    importance matrix (two of llama.cpp's rules depend on it). ``linears``: the architecture's (Phi-3: fused
    qkv_proj / gate_up_proj). A protected tensor (plan["protected"]) takes the
    plan's higher grid type, through the same fallback, unless the rules already give it as many bits.
    """
    default = DEFAULT_TYPE[file_type]
    cols = ncols or {}
    quantized = default not in ("F16", "F32")

    def fit(mod: str, t: str) -> str:
        return fallback(t, cols[mod]) if quantized and mod in cols else t

    out: dict[str, str] = {}
    for i in range(n_layers):
        for lin in linears:
            mod = f"model.layers.{i}.{lin}"
            out[mod] = fit(mod, _layer_type(file_type, default, lin, i, n_layers, n_gqa, imatrix) if quantized else default)
    head = "model.embed_tokens" if tied else "lm_head"
    if quantized:
        out[head] = fit(head, _output_type(default, cols.get(head, 256)))
    else:
        out[head] = default
    if not tied:
        out["model.embed_tokens"] = fit("model.embed_tokens", default)
    if plan:
        up = plan["high_grid"].split("_imat")[0].upper()
        for mod in plan.get("protected", []):
            t = fit(mod, up)
            if TYPE_BITS[t] > TYPE_BITS[out[mod]]:
                out[mod] = t
    return out


def model_ncols(info) -> dict[str, int]:
    """Row length (ne[0]) of every tensor a GGUF file may quantize, from the checkpoint's shapes."""
    cols = {mod: k for mod, (_n, k) in info.linear_shapes.items()}
    cols["model.embed_tokens"] = int(info.config["hidden_size"])
    if info.tied_embeddings or "lm_head" not in cols:
        cols["lm_head"] = int(info.config["hidden_size"])
    return cols


def model_types(file_type: str, info, plan: dict | None = None, imatrix: bool = True,
                shapes: bool = True) -> dict[str, str]:
    """tensor_types for one checkpoint: its layer count, tying, GQA ratio and (``shapes``) row lengths."""
    cfg = info.config
    n_head = int(cfg["num_attention_heads"])
    n_gqa = n_head // int(cfg.get("num_key_value_heads") or n_head)
    return tensor_types(file_type, int(cfg["num_hidden_layers"]), info.tied_embeddings, plan,
                        ncols=model_ncols(info) if shapes else None, n_gqa=n_gqa, imatrix=imatrix,
                        linears=info.arch.linears)
