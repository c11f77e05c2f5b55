"""Real tokenizers nobody here wrote: llama.cpp's test vocabularies (models/ggml-vocab-<family>.gguf with .inp/.out),
from the llama.cpp tree in the llama-cpp-python sdist that `make install` unpacks (QP_LLAMA_CPP overrides where).

``family_tokenizer`` turns one into the HF tokenizer the family ships: transformers builds it from the vocabulary file,
but drops parts of the family's pre-tokenizer (DeepSeek, Falcon, StarCoder splitting; Llama 3's ignore_merges; BOS
insertion), so those are restored from llama.cpp's own definition of the family named in the file — the HF tokenizer
then reproduces the family's .out lines itself (checked in test_vocab_families)."""
from __future__ import annotations

import json
import os
from pathlib import Path

FAMILIES = ("llama-bpe", "qwen2", "qwen35", "llama-spm", "phi-3", "deepseek-llm", "deepseek-coder", "starcoder",
            "falcon", "gpt-2")
LLAMA_CPP = Path(os.environ.get("QP_LLAMA_CPP", Path.home() / ".cache" / "quantprism" / "llama.cpp"))


def vocab_file(family: str) -> Path:
    return LLAMA_CPP / "models" / f"ggml-vocab-{family}.gguf"


def cases(family: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids without BOS) from the family's .inp / .out."""
    f = vocab_file(family)
    inp = f.with_name(f.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = f.with_name(f.name + ".out").read_text(encoding="utf-8").split("\n")
    if inp and inp[-1].endswith("\n__ggml_vocab_test__"):
        inp[-1] = inp[-1].removesuffix("\n__ggml_vocab_test__")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(inp, out, strict=False)]


ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def gguf_fields(path: Path) -> dict:
    """A GGUF's tokenizer.ggml.* and general.* scalars (strings decoded), plus n_tokens."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for k, f in r.fields.items():
        if k.startswith(("tokenizer.ggml.", "general.")) and k not in ARRAYS:
            v = f.parts[f.data[0]]
            out[k] = bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]
    out["n_tokens"] = len(r.fields["tokenizer.ggml.tokens"].data)
    return out


def family_tokenizer(family: str, out: Path) -> dict:
    """Save the family's HF tokenizer in ``out``; returns the vocabulary file's facts."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from quantprism.exporters.gguf_vocab import pre_table

    path = vocab_file(family)
    facts = gguf_fields(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if facts["tokenizer.ggml.model"] == "gpt2":
        table = pre_table()
        rule = table["names"][facts["tokenizer.ggml.pre"]]
        bt = tok.backend_tokenizer
        bt.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(e), behavior="isolated") for e in table["types"][rule["type"]]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        js = json.loads(bt.to_str())
        js["model"]["ignore_merges"] = rule["ignore_merges"]
        # GPT2Tokenizer adds its default "<|endoftext|>" past the end of vocabularies that lack it: not the family's
        js["added_tokens"] = [a for a in js.get("added_tokens", []) if a["id"] < facts["n_tokens"]]
        bos = facts.get("tokenizer.ggml.bos_token_id")
        if facts.get("tokenizer.ggml.add_bos_token") and bos is not None:
            b = tok.convert_ids_to_tokens(bos)
            one = [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
            js["post_processor"] = {"type": "TemplateProcessing", "single": one,
                                    "pair": one + [{"Sequence": {"id": "B", "type_id": 1}}],
                                    "special_tokens": {b: {"id": b, "ids": [bos], "tokens": [b]}}}
        vocab = {**js["model"]["vocab"], **{a["content"]: a["id"] for a in js["added_tokens"]}}
        named = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                 if isinstance(t := getattr(tok, k, None), str) and t in vocab}  # GPT2Tokenizer's defaults may be absent
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(js)), **named)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return facts


def family_model(family: str, out: Path, hidden: int = 64, seed: int = 0, *, inter: int | None = None,
                 layers: int = 1, heads: int = 2, kv_heads: int = 1, tied: bool = False) -> Path:
    """A tiny random Llama carrying the family's tokenizer (vocab_size = the vocabulary file's)."""
    import torch
    import transformers

    facts = family_tokenizer(family, out)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=facts["n_tokens"], hidden_size=hidden, intermediate_size=inter or 2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   tie_word_embeddings=tied,
                                   max_position_embeddings=512, bos_token_id=facts.get("tokenizer.ggml.bos_token_id"),
                                   eos_token_id=facts.get("tokenizer.ggml.eos_token_id"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out
