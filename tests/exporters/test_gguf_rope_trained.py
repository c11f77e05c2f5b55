"""q/k row permutation, RoPE style and RoPE scaling of the GGUF writer, proven on TRAINED weights in real llama.cpp.

Also Qwen3 (NEOX, per-head q/k RMSNorm gains, seeded away from 1) and the RoPE scalings llama.cpp runs — Llama 3's
rope_freqs, linear, YaRN — each checked over 510 positions, far beyond the (shrunk) original context, and each
failing when the writer leaves the scaling out.

llama.cpp's "llama" arch (Llama, Mistral) rotates adjacent pairs, so the writer permutes q/k rows from
HF's rotate-half order; "qwen2" uses NEOX RoPE (rotate-half) and must not be permuted, and carries q/k/v
biases. Random-weight models attend almost uniformly, so a wrong pairing barely moves their logits
(measured on a random tiny Mistral with the permutation removed: KLD 8.8e-5, top-1 91.8 %). Here the
bundled trained Llama, re-expressed as a Mistral and as a Qwen2 checkpoint (tests/trained_variants.py),
is exported as an F32 GGUF and run teacher-forced in llama.cpp against the transformers model
(MistralForCausalLM / Qwen2ForCausalLM) on eval_heldout.txt: 2 chunks of 512 tokens, 510 scored
positions (llama-perplexity's framing). The right file agrees (top-1 ≥ 99 %, KLD < 1e-4); the same
file written with the permutation deliberately broken must fail by a wide margin (top-1 < 60 %,
KLD > 0.3), and a Qwen2 file whose q/k/v biases are zeroed must fail too, so the biases provably go
through.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from trained_variants import LLAMA3_ROPE, PHI3_LONGROPE, bundled_tokenizer, save_trained_as

from quantprism.calibration import BUILTIN_EVAL
from quantprism.evaluate.compare import base_logprobs, compare, eval_token_chunks, torch_logits_fn
from quantprism.exporters import gguf as gguf_writer
from quantprism.model import load_model_info, load_torch_model

from conftest import require

require("llama_cpp", "make install builds llama-cpp-python")

N_CTX, CHUNKS = 512, 2
QKV_BIAS = 0.25  # std of the seeded q/k/v biases of "qwen2-bias"
# LLAMA3_ROPE / PHI3_LONGROPE (trained_variants): original context 64, so a file without the scaling runs visibly
# unscaled at the 510 scored positions
FAMILIES = {  # name → (family the trained weights are saved as, q/k/v bias std, GGUF arch, transformers class[, rope])
    "mistral": ("mistral", 0.0, "llama", "MistralForCausalLM"),
    "qwen3": ("qwen3", 0.0, "qwen3", "Qwen3ForCausalLM"),
    "llama3-rope": ("llama", 0.0, "llama", "LlamaForCausalLM", LLAMA3_ROPE),
    "linear-rope": ("llama", 0.0, "llama", "LlamaForCausalLM", {"rope_type": "linear", "factor": 4.0}),
    "gemma2": ("gemma2", 0.0, "gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3", 0.0, "gemma3", "Gemma3ForCausalLM"),
    "phi3": ("phi3", 0.0, "phi3", "Phi3ForCausalLM"),
    "phi3-longrope": ("phi3", 0.0, "phi3", "Phi3ForCausalLM", PHI3_LONGROPE),
    "yarn-rope": ("qwen2", 0.0, "qwen2", "Qwen2ForCausalLM",
                  {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128}),
    "qwen2": ("qwen2", 0.0, "qwen2", "Qwen2ForCausalLM"),
    "qwen2-bias": ("qwen2", QKV_BIAS, "qwen2", "Qwen2ForCausalLM"),
    "llama-bias": ("llama", QKV_BIAS, "llama", "LlamaForCausalLM"),  # attention_bias=True: q/k/v/o biases
}
# llama.cpp's llama arch rotates q/k AFTER adding the bias, so q/k biases need the same row permutation as the
# weights (convert_hf_to_gguf.py permutes q_proj/k_proj ".bias" too). Before write_gguf did: top-1 0.9235, KLD 0.0138.
RIGHT_MIN_TOP1, RIGHT_MAX_KLD = 0.99, 1e-4
WRONG_MAX_TOP1, WRONG_MIN_KLD = 0.60, 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """get(family) → (ModelInfo, torch model's base log-probs); each family saved and scored once."""
    root = tmp_path_factory.mktemp("trained")
    chunks = eval_token_chunks(bundled_tokenizer(), BUILTIN_EVAL, N_CTX, CHUNKS)
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            arch, bias, _, cls, *rope = FAMILIES[family]
            # llama.cpp keys Phi-3 token attributes on general.name (the directory name): a name containing "phi3"
            # requires <s>, </s>, <unk> and <|endoftext|>, which the bundled tokenizer lacks — so not "phi3…" here
            out = root / family.replace("phi3", "p3")
            info = load_model_info(save_trained_as(arch, out, qkv_bias=bias, rope=rope[0] if rope else None))
            model = load_torch_model(info)
            assert type(model).__name__ == cls
            cache[family] = (info, base_logprobs(chunks, torch_logits_fn(model)))
        return cache[family]

    return chunks, get


def llama_cpp_scores(path, chunks, base) -> dict:
    from quantprism.runtimes.llamacpp import open_session

    sess = open_session(path, n_ctx=N_CTX, threads=2)
    try:
        return {**compare(chunks, base, sess.logits)[0], "gguf_arch": sess.info["architecture"]}
    finally:
        sess.close()


def _line(family: str, case: str, s: dict) -> str:
    return (f"{family} {case}: top-1 {s['top1_agreement']:.4f}, KLD mean {s['kld_mean']:.3g} "
            f"(p99 {s['kld_p99']:.3g}), PPL {s['ppl']:.2f} vs torch {s['ppl_base']:.2f}, {s['n_tokens']} tokens")


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_family_in_llama_cpp_matches_torch(trained, tmp_path, family):
    chunks, get = trained
    info, base = get(family)
    s = llama_cpp_scores(gguf_writer.write_gguf(tmp_path / "m.gguf", info, None, "F32"), chunks, base)
    print(_line(family, "right", s))
    assert s["gguf_arch"] == FAMILIES[family][2]
    assert s["top1_agreement"] >= RIGHT_MIN_TOP1 and s["kld_mean"] < RIGHT_MAX_KLD, _line(family, "right", s)


def _on_write(monkeypatch, change) -> None:
    """A writer whose tensors pass through ``change(name, array)`` on the way to gguf-py. The GGUF writer streams:
    it registers every tensor's info first, then writes the data in the same order, so the names are queued."""
    import gguf

    add_info, write_data = gguf.GGUFWriter.add_tensor_info, gguf.GGUFWriter.write_tensor_data
    names: list[str] = []

    def add_tensor_info(self, name, *args, **kwargs):
        names.append(name)
        return add_info(self, name, *args, **kwargs)

    def write_tensor_data(self, tensor, *args, **kwargs):
        return write_data(self, change(names.pop(0), tensor), *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor_info", add_tensor_info)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)


def _llama_pairing_on_writes(monkeypatch, n_head: int, n_kv: int) -> None:
    """A writer that applies the llama permutation to a qwen2 file: q/k weights and biases are permuted as they
    are handed to gguf-py (the writer itself never permutes for qwen2, so there is no function to patch)."""

    def change(name, tensor):
        parts = name.split(".")  # blk.<i>.attn_q.weight / .bias
        if len(parts) == 4 and parts[2] in ("attn_q", "attn_k"):
            return gguf_writer._permute_rows(tensor, n_head if parts[2] == "attn_q" else n_kv)
        if len(parts) == 4 and parts[2] == "attn_qkv":  # Phi-3: the q and k row blocks of the fused matrix
            hd = tensor.shape[0] // (n_head + 2 * n_kv)
            q, k, v = np.split(tensor, [n_head * hd, (n_head + n_kv) * hd])
            return np.concatenate([gguf_writer._permute_rows(q, n_head), gguf_writer._permute_rows(k, n_kv), v])
        return tensor

    _on_write(monkeypatch, change)


def _replaced(monkeypatch, which, make) -> None:
    """A writer whose tensors named ``which`` are replaced by ``make(tensor)`` (zeros, ones) on the way to gguf-py."""
    _on_write(monkeypatch, lambda name, tensor: make(tensor) if which(name) else tensor)


WRONG = [
    ("mistral", "no-permutation"),  # rotate-half rows under llama.cpp's adjacent-pair RoPE
    ("mistral", "k-permuted-with-q-heads"),  # the GQA slip: k's rows split into n_head heads, not n_kv
    ("qwen2", "llama-permutation"),  # qwen2 (NEOX RoPE) permuted as if it were llama
    ("qwen2-bias", "llama-permutation"),  # … weights and biases alike
    ("qwen2-bias", "biases-zeroed"),  # the q/k/v biases lost on the way
    ("qwen3", "llama-permutation"),  # qwen3 is NEOX too
    ("qwen3", "qk-norm-dropped"),  # the per-head q/k gains written as ones
    ("llama3-rope", "rope-unscaled"),  # Llama 3's rope_freqs left out: llama.cpp runs plain RoPE
    ("gemma2", "norm-offset-dropped"),  # Gemma's stored w written as the gain, not 1 + w
    ("gemma2", "softcap-dropped"),  # attention / final logit soft-capping keys left out
    ("gemma3", "norm-offset-dropped"),
    ("gemma3", "swa-pattern-dropped"),  # llama.cpp's default pattern (every 6th layer global) instead of the config's
    ("gemma3", "swa-rope-base-dropped"),  # local layers at the global base
    ("phi3", "llama-permutation"),  # Phi-3 is NEOX
    ("phi3-longrope", "rope-unscaled"),
    ("linear-rope", "rope-unscaled"),  # the scaling keys left out
    ("yarn-rope", "rope-unscaled"),
]


# Breakages that move the model less than a broken RoPE on the llama arch — still ≥ 100× the right file's KLD.
# Qwen3's q/k RMSNorm flattens attention (PPL 118 vs 81 for the same weights as Llama), so a wrong pairing there
# measured top-1 0.594, KLD 0.245.
MILDER = {("qwen2-bias", "biases-zeroed"): (0.95, 0.01), ("qwen3", "qk-norm-dropped"): (0.95, 0.01),
          ("qwen3", "llama-permutation"): (0.8, 0.1),
          # soft-caps 20/15 read as llama.cpp's defaults 50/30: top-1 0.882, KLD 0.002 (right file: 1e-7)
          ("gemma2", "softcap-dropped"): (0.95, 1e-3),
          ("gemma3", "swa-pattern-dropped"): (0.95, 0.01),
          # local layers at 10⁴ instead of 2·10⁴: top-1 0.971, KLD 3.7e-3 (right file: 0.998, 1e-7)
          ("gemma3", "swa-rope-base-dropped"): (0.99, 1e-3)}


@pytest.mark.llamacpp
@pytest.mark.parametrize("family, wrong", WRONG)
def test_broken_permutation_or_bias_fails_clearly(trained, tmp_path, monkeypatch, family, wrong):
    chunks, get = trained
    info, base = get(family)
    n_head, n_kv = info.config["num_attention_heads"], info.config["num_key_value_heads"]
    assert n_kv != n_head  # else the GQA slip would be invisible
    permute = gguf_writer._permute_rows
    if wrong == "no-permutation":
        monkeypatch.setattr(gguf_writer, "_permute_rows", lambda a, heads: a)
    elif wrong == "k-permuted-with-q-heads":
        monkeypatch.setattr(gguf_writer, "_permute_rows", lambda a, heads: permute(a, n_head))
    elif wrong == "llama-permutation":
        _llama_pairing_on_writes(monkeypatch, n_head, n_kv)
    elif wrong == "qk-norm-dropped":
        _replaced(monkeypatch, lambda name: name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")), np.ones_like)
    elif wrong == "swa-pattern-dropped":
        import gguf

        monkeypatch.setattr(gguf.GGUFWriter, "add_sliding_window_pattern", lambda self, value: None)
    elif wrong == "swa-rope-base-dropped":
        import gguf

        monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base_swa", lambda self, value: None)
    elif wrong == "norm-offset-dropped":
        from quantprism.model import archs

        arch = archs.ARCHS[info.architecture]
        monkeypatch.setitem(archs.ARCHS, arch.hf, dataclasses.replace(arch, norm_offset=0.0))
    elif wrong == "softcap-dropped":
        import gguf

        for name in ("add_attn_logit_softcapping", "add_final_logit_softcapping"):
            monkeypatch.setattr(gguf.GGUFWriter, name, lambda self, value: None)
    elif wrong == "rope-unscaled":
        from quantprism.exporters import gguf_rope

        monkeypatch.setattr(gguf_rope, "rope_params", lambda cfg: {"rope_theta": cfg["rope_parameters"]["rope_theta"]})
    else:
        _replaced(monkeypatch, lambda name: name.endswith(".bias"), np.zeros_like)
    path = gguf_writer.write_gguf(tmp_path / "m.gguf", info, None, "F32")
    monkeypatch.undo()
    s = llama_cpp_scores(path, chunks, base)
    print(_line(family, wrong, s))
    max_top1, min_kld = MILDER.get((family, wrong), (WRONG_MAX_TOP1, WRONG_MIN_KLD))
    assert s["top1_agreement"] < max_top1 and s["kld_mean"] > min_kld, _line(family, wrong, s)
