"""Architectures: what each supported HF architecture is made of, and why the others are refused.

One entry per ``architectures[0]`` of config.json. The canonical stage, the exporters and the references read the
structure from here (which GGUF arch llama.cpp runs it as, whether q/k rows need llama.cpp's pair permutation,
which per-layer norms exist), instead of testing architecture names in each module.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# linears grouped by the activation they read (one Hessian / imatrix per group)
LLAMA_GROUPS = (("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("attn_out", ("self_attn.o_proj",)),
                ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
                ("mlp_out", ("mlp.down_proj",)))
# Phi-3 ships q/k/v and gate/up fused; a fused matrix is quantized as one (rows are independent: GPTQ on the fused
# rows with the shared Hessian is GPTQ on each shard)
PHI3_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
PHI3_GROUPS = (("attn_in", ("self_attn.qkv_proj",)), ("attn_out", ("self_attn.o_proj",)),
               ("mlp_in", ("mlp.gate_up_proj",)), ("mlp_out", ("mlp.down_proj",)))
LLAMA_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))
# Gemma 2/3: a norm before and after each sub-layer; the MLP's input norm is pre_feedforward_layernorm
GEMMA_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
               ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"))


@dataclass(frozen=True)
class Arch:
    hf: str  # config.json architectures[0]
    gguf: str  # llama.cpp's LLM_ARCH name
    permute_qk: bool  # llama.cpp rotates adjacent pairs for this arch: q/k rows permuted from HF's rotate-half
    qk_norm: bool = False  # per-head RMSNorm on q and k after projection (Qwen3, Gemma 3)
    layer_norms: tuple[tuple[str, str], ...] = LLAMA_NORMS  # (HF module, GGUF name) per layer
    mlp_norm: str = "post_attention_layernorm"  # the norm whose output feeds gate/up (where AWQ folds mlp_in)
    norm_offset: float = 0.0  # the RMSNorm computes x̂·(offset + w): Gemma stores w − 1 (llama.cpp stores the gain)
    gguf_output: bool = True  # llama.cpp reads output.weight (Gemma 2 always uses token_embd: tied only)
    eager_attention: bool = False  # torch must run eager attention: SDPA silently skips Gemma 2's logit soft-cap
    linears: tuple[str, ...] = LLAMA_LINEARS  # quantizable linears of a decoder layer (module suffixes)
    groups: tuple[tuple[str, tuple[str, ...]], ...] = LLAMA_GROUPS
    fold_out: bool = True  # v→o and up→down folds exist (v, up are whole modules, not rows of a fused one)

    @property
    def input_groups(self) -> dict[str, tuple[str, ...]]:
        return dict(self.groups)

    @property
    def linear_to_group(self) -> dict[str, str]:
        return {lin: g for g, lins in self.groups for lin in lins}


ARCHS: dict[str, Arch] = {a.hf: a for a in (
    Arch("LlamaForCausalLM", "llama", True),
    Arch("MistralForCausalLM", "llama", True),
    Arch("Qwen2ForCausalLM", "qwen2", False),
    Arch("Qwen3ForCausalLM", "qwen3", False, qk_norm=True),
    Arch("Gemma2ForCausalLM", "gemma2", False, layer_norms=GEMMA_NORMS, mlp_norm="pre_feedforward_layernorm",
         norm_offset=1.0, gguf_output=False, eager_attention=True),
    Arch("Gemma3ForCausalLM", "gemma3", False, qk_norm=True, layer_norms=GEMMA_NORMS,
         mlp_norm="pre_feedforward_layernorm", norm_offset=1.0),
    Arch("Phi3ForCausalLM", "phi3", False, linears=PHI3_LINEARS, groups=PHI3_GROUPS, fold_out=False),
)}

# Structures the pipeline cannot quantize and prove yet, named by what is missing (a fragment of the class name
# → the reason); checked in order, the first match wins.
UNSUPPORTED = (
    ("Moe", "mixture-of-experts layers (routed expert MLPs)"),
    ("Mixtral", "mixture-of-experts layers (routed expert MLPs)"),
    ("ForConditionalGeneration", "a vision/audio tower or an encoder-decoder stack (only decoder-only causal LMs)"),
    ("T5", "an encoder-decoder stack (only decoder-only causal LMs)"),
    ("Bart", "an encoder-decoder stack (only decoder-only causal LMs)"),
    ("Gemma3n", "Gemma 3n's per-layer embeddings and AltUp (not modelled)"),
)


def arch_of(name: str | None, where: str = "model") -> Arch:
    """The supported architecture ``name``, or a one-line ModelError naming what it has that is not supported."""
    if name in ARCHS:
        return ARCHS[name]
    supported = ", ".join(ARCHS)
    for frag, what in UNSUPPORTED:
        if name and frag.lower() in name.lower():
            raise ModelError(f"{where}: architecture {name} is not supported: it has {what}; supported: {supported}")
    raise ModelError(f"{where}: architecture {name!r} is not supported; supported: {supported}")


SUPPORTED_ARCHS = tuple(ARCHS)
LLAMA = ARCHS["LlamaForCausalLM"]  # the default structure (a model class not in ARCHS is treated as Llama)
