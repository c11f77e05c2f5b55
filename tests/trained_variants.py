"""The bundled TRAINED Llama re-expressed as other families (same shapes, same weights), for tests.

Random-weight models attend almost uniformly, so a wrong RoPE pairing or q/k row permutation barely
moves their logits; the bundled model (src/quantprism/assets/reference-llama, trained for 1,000 steps)
has real attention patterns, so re-expressing it as a Mistral or a Qwen2 checkpoint gives a model of
each family whose logits depend sharply on getting RoPE right.

- ``mistral``: MistralForCausalLM with every tensor as is (no sliding window); the forward is the
  Llama forward, so its logits equal the bundled model's.
- ``qwen2``: Qwen2ForCausalLM, which always carries q/k/v biases: zero by default (then the logits equal
  the bundled model's too), or seeded N(0, ``qkv_bias``²) biases to check that biases go through.
- ``llama``: the bundled model itself, copied (so callers can treat the three alike); with ``qkv_bias``
  a Llama with ``attention_bias=True`` (seeded biases on q/k/v and o).

Untied by default: the bundled model's trained lm_head differs from its embedding, and tying would
throw it away; ``tied=True`` drops lm_head and ties the output to the embedding (a valid checkpoint
of the same shapes, with untrained-looking outputs but the same trained attention).

Tokenizer: each directory holds the bundled tokenizer files unchanged, but transformers' AutoTokenizer
forces its own Qwen2Tokenizer (Qwen's pre-tokenizer regex) on any model_type "qwen2" directory, which
splits text differently from tokenizer.json (89,457 vs 85,243 ids on eval_heldout.txt). Tokenize with
``bundled_tokenizer()`` (what tokenizer.json and the GGUF's gpt-2 pre-tokenizer do) and feed the same ids
to every runtime.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantprism.model import BUILTIN_MODEL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
         "phi3": "Phi3ForCausalLM"}


def bundled_tokenizer():
    """The bundled model's own HF tokenizer (tokenizer.json as written), whatever family a copy claims."""
    from quantprism.model import load_model_info, load_tokenizer

    return load_tokenizer(load_model_info(BUILTIN_MODEL))


def bundled_state() -> dict:
    from safetensors.torch import load_file

    return load_file(str(BUILTIN_MODEL / "model.safetensors"))


# RoPE scalings with the original context shrunk to 64 tokens, so at the 510 scored positions the scaling matters
# everywhere (Llama 3.1's llama3; Phi-3's longrope, whose long factors apply above the original context)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
PHI3_LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 64,
                 "long_factor": [1.0 + 0.25 * i for i in range(32)], "short_factor": [1.0] * 32}
GEMMA2_WINDOW = 128  # local layers see 128 tokens, so at the 510 scored positions local ≠ global attention
# Gemma 3: local and global layers alternate (not llama.cpp's default of every 6th global), so the pattern must
# travel in the file
GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# soft-caps away from llama.cpp's gemma2 defaults (50, 30), so a file without the keys is visibly wrong


def _as_gemma2(state: dict, n_layers: int, hidden: int, keep_head: bool = False) -> dict:
    """Llama tensors → Gemma 2/3 (tied unless ``keep_head``): the embedding ÷ √hidden (Gemma scales it back up), every norm stored as
    gain − 1 (Gemma computes x̂·(1 + w)) — the final one ×√hidden, so the tied output is not flattened — the Llama
    post-attention norm as the pre-feed-forward norm, and the new
    post-sub-layer norms at gain 1. Attention and MLP weights as trained (the MLP then runs GELU, not SiLU)."""
    import torch

    drop = ("model.norm.weight",) if keep_head else ("lm_head.weight", "model.norm.weight")
    out = {k: v for k, v in state.items() if "layernorm" not in k and k not in drop}
    out["model.embed_tokens.weight"] = (state["model.embed_tokens.weight"].float() / hidden ** 0.5).to(torch.bfloat16)
    # tied: the output matrix is the embedding ÷ √hidden, so the final gain takes the √hidden back
    out["model.norm.weight"] = state["model.norm.weight"].float() * (1 if keep_head else hidden ** 0.5) - 1
    for i in range(n_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = state[f"{p}.input_layernorm.weight"].float() - 1
        out[f"{p}.pre_feedforward_layernorm.weight"] = state[f"{p}.post_attention_layernorm.weight"].float() - 1
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
            out[f"{p}.{norm}.weight"] = torch.zeros(hidden)
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


BIASED = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"), "qwen2": ("q_proj", "k_proj", "v_proj")}


def _config(arch: str, tied: bool, bias: bool, rope: dict | None = None):
    import transformers

    base = json.loads((BUILTIN_MODEL / "config.json").read_text())
    for k in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
        base.pop(k, None)
    base["tie_word_embeddings"] = tied
    if rope:
        base["rope_parameters"] = {**base["rope_parameters"], **rope}
    if arch == "llama":
        return transformers.LlamaConfig(**{**base, "attention_bias": bias}), transformers.LlamaForCausalLM
    for k in ("attention_bias", "mlp_bias", "pretraining_tp"):  # Llama-only options
        base.pop(k, None)
    if arch == "mistral":
        return transformers.MistralConfig(**base, sliding_window=None), transformers.MistralForCausalLM
    if arch == "qwen2":
        return transformers.Qwen2Config(**base, use_sliding_window=False, sliding_window=None), transformers.Qwen2ForCausalLM
    if arch == "qwen3":
        return transformers.Qwen3Config(**base, use_sliding_window=False, sliding_window=None), transformers.Qwen3ForCausalLM
    if arch == "gemma2":
        base.pop("hidden_act")
        base["tie_word_embeddings"] = True  # llama.cpp's gemma2 has no output matrix of its own
        return transformers.Gemma2Config(**base, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=64,
                                         sliding_window=GEMMA2_WINDOW, attn_logit_softcapping=20.0,
                                         final_logit_softcapping=15.0), transformers.Gemma2ForCausalLM
    if arch == "phi3":
        for k in ("head_dim",):
            base.pop(k, None)
        rp = {**base.pop("rope_parameters"), **(rope or {})}
        return transformers.Phi3Config(**base, rope_parameters=rp, sliding_window=None,
                                       original_max_position_embeddings=rp.get("original_max_position_embeddings", 2048)), \
            transformers.Phi3ForCausalLM
    if arch == "gemma3":
        base.pop("hidden_act")
        # per layer type: global at 10⁶ (as Gemma 3), local at 2·10⁴ — not llama.cpp's default 10⁴, so a file
        # without the local base is visibly wrong
        base["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
        return transformers.Gemma3TextConfig(**base, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=64,
                                             sliding_window=GEMMA2_WINDOW, layer_types=GEMMA3_LAYERS), \
            transformers.Gemma3ForCausalLM
    raise ValueError(f"unknown family {arch!r}; one of {sorted(ARCHS)}")


def save_trained_as(arch: str, out: Path, qkv_bias: float = 0.0, tied: bool = False, seed: int = 0,
                    rope: dict | None = None, qk_norm: float = 0.3) -> Path:
    """Save the bundled trained weights as an HF ``arch`` directory (safetensors, bfloat16, bundled tokenizer).

    ``qkv_bias``: standard deviation of seeded random attention biases (qwen2: q/k/v, always present, 0 = zero
    biases; llama: q/k/v/o with attention_bias=True when nonzero; mistral has none). ``rope``: entries merged into
    ``rope_parameters`` (e.g. Llama 3's scaling). ``qk_norm`` (qwen3): the per-head q/k RMSNorm gains are
    1 + N(0, qk_norm²), seeded, so a file that drops or misplaces them is visibly wrong.
    """
    import torch

    if qkv_bias and arch == "mistral":
        raise ValueError("mistral has no attention biases")
    cfg, cls = _config(arch, tied, bool(qkv_bias), rope)
    state = bundled_state()
    if arch == "phi3":  # the same weights, fused as Phi-3 ships them: qkv = [q; k; v], gate_up = [gate; up]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            state[f"{p}.self_attn.qkv_proj.weight"] = torch.cat(
                [state.pop(f"{p}.self_attn.{x}_proj.weight") for x in ("q", "k", "v")])
            state[f"{p}.mlp.gate_up_proj.weight"] = torch.cat([state.pop(f"{p}.mlp.{x}_proj.weight") for x in ("gate", "up")])
    if arch in ("gemma2", "gemma3"):
        tied = arch == "gemma2" or tied
        state = _as_gemma2(state, cfg.num_hidden_layers, cfg.hidden_size, keep_head=not tied)
    if arch in ("qwen3", "gemma3"):  # Gemma 3 stores the gain − 1: the same seeded draw around 0
        g = torch.Generator().manual_seed(seed + 1)
        for i in range(cfg.num_hidden_layers):
            for norm in ("q_norm", "k_norm"):
                gain = (arch == "qwen3") + torch.randn(cfg.head_dim, generator=g) * qk_norm
                state[f"model.layers.{i}.self_attn.{norm}.weight"] = gain.to(torch.bfloat16)
    if tied:
        state.pop("lm_head.weight", None)
    if arch == "qwen2" or (arch == "llama" and qkv_bias):
        g = torch.Generator().manual_seed(seed)
        for i in range(cfg.num_hidden_layers):
            for proj in BIASED[arch]:
                rows = state[f"model.layers.{i}.self_attn.{proj}.weight"].shape[0]
                b = torch.randn(rows, generator=g) * qkv_bias if qkv_bias else torch.zeros(rows)
                state[f"model.layers.{i}.self_attn.{proj}.bias"] = b.to(torch.bfloat16)
    model = cls(cfg).to(torch.bfloat16).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied lm_head is filled from the embedding; nothing else may be missing or left over
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        model.tie_weights()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(BUILTIN_MODEL / f, out / f)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["architectures"] == [ARCHS[arch]], cfg_json["architectures"]
    return out
