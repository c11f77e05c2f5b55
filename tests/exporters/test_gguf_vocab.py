"""GGUF tokenizers from real vocabularies nobody here wrote (llama.cpp's ggml-vocab-* test files, see
tests/vocab_families.py): our GGUF must make llama.cpp tokenize every .inp string to exactly its .out ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from vocab_families import FAMILIES, LLAMA_CPP, cases, family_model, gguf_fields, vocab_file

from conftest import require


@pytest.fixture(scope="session")
def vocab_dir():
    missing = [f for f in FAMILIES if not vocab_file(f).is_file()]
    if missing:
        pytest.skip(f"llama.cpp's vocabulary files are not in {LLAMA_CPP} ({', '.join(missing)}); run `make install`")
    return LLAMA_CPP


@pytest.fixture(scope="session")
def family_ggufs(vocab_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every family: tiny model + its tokenizer → our F16 GGUF (built once)."""
    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import load_model_info

    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in FAMILIES:
        model = family_model(fam, root / fam)
        out[fam] = (model, write_gguf(root / f"{fam}.gguf", load_model_info(model), None, "F16"))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_tokenizes_every_reference_string_exactly(family_ggufs, family):
    require("llama_cpp")
    from llama_cpp import Llama

    _, path = family_ggufs[family]
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    bad = [(t, ids, llm.tokenize(t.encode(), add_bos=False, special=False)) for t, ids in cases(family)]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"{family}: {len(bad)}/{len(cases(family))} differ, e.g. {bad[0][0]!r}: {bad[0][1][:12]} vs {bad[0][2][:12]}"


def test_pre_tokenizer_names_and_metadata(family_ggufs):
    """Each family gets the pre name llama.cpp itself uses for it (or one it treats identically), never a default."""
    from quantprism.exporters.gguf_vocab import pre_table

    names = pre_table()["names"]
    for fam in FAMILIES:
        f = gguf_fields(family_ggufs[fam][1])
        original = gguf_fields(vocab_file(fam))
        assert f["tokenizer.ggml.model"] == original["tokenizer.ggml.model"], fam
        if f["tokenizer.ggml.model"] == "gpt2":
            ours, theirs = names[f["tokenizer.ggml.pre"]], names[original["tokenizer.ggml.pre"]]
            assert (ours["type"], ours["ignore_merges"]) == (theirs["type"], theirs["ignore_merges"]), fam
        else:
            assert "tokenizer.ggml.pre" not in f and f["tokenizer.ggml.add_space_prefix"] in (True, 1)
        for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            if k in original:
                assert f[k] == original[k], (fam, k)
        assert f["general.type"] == "model" and f["general.size_label"]


def test_special_and_user_defined_tokens_stay_whole(family_ggufs):
    """Control tokens parse as one id with special=True and as text without; add_bos as the HF tokenizer does."""
    require("llama_cpp")
    from llama_cpp import Llama

    from quantprism.model import load_model_info, load_tokenizer

    model, path = family_ggufs["qwen2"]
    tok = load_tokenizer(load_model_info(model))
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    text = "<|im_start|>user\nhi<|im_end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)
    assert len(llm.tokenize(text.encode(), add_bos=False, special=False)) > len(tok.encode(text, add_special_tokens=False))
    f = gguf_fields(path)
    assert bool(f["tokenizer.ggml.add_bos_token"]) == (tok.encode("a")[0] == tok.bos_token_id)


def test_unknown_pre_tokenizer_is_refused_naming_it(vocab_dir, tmp_path):
    """A byte-level BPE whose splitting matches no llama.cpp pre-tokenizer is refused, not written as "gpt-2"."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    from quantprism.errors import ArtifactError
    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import load_model_info

    model = family_model("gpt-2", tmp_path / "m")
    tj = json.loads((model / "tokenizer.json").read_text())
    bt = Tokenizer.from_str(json.dumps(tj))
    bt.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{L}{1,2}|\s+|."), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bt.save(str(model / "tokenizer.json"))
    with pytest.raises(ArtifactError, match="no pre-tokenizer that splits text like this tokenizer"):
        write_gguf(tmp_path / "x.gguf", load_model_info(model), None, "F16")
    assert not (tmp_path / "x.gguf").exists()


def test_tokenizer_ids_beyond_the_model_vocab_are_refused(vocab_dir, tmp_path):
    from quantprism.errors import ArtifactError
    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import load_model_info

    model = family_model("gpt-2", tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 50000  # the tokenizer has 50257
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="vocab_size 50000"):
        write_gguf(tmp_path / "x.gguf", load_model_info(model), None, "F16")


def test_hf_tokenizer_of_each_family_is_the_real_one(vocab_dir, family_ggufs):
    """The test tokenizers themselves reproduce .out (llama-spm: HF's SentencePiece emulation is known to differ on
    some strings, which is why the GGUF must carry the vocabulary rather than HF behaviour)."""
    from quantprism.model import load_model_info, load_tokenizer

    for fam in FAMILIES:
        tok = load_tokenizer(load_model_info(family_ggufs[fam][0]))
        ok = sum(tok.encode(t, add_special_tokens=False) == ids for t, ids in cases(fam))
        if fam == "llama-spm":
            assert ok < len(cases(fam))
        else:
            assert ok == len(cases(fam)), fam


def test_parity_gate_catches_the_wrong_pre_tokenizer(family_ggufs, tmp_path, monkeypatch):
    """The old bug: a Llama 3 vocabulary written with pre "gpt-2" loads and talks, but llama.cpp splits digits and
    newlines differently; the parity check sees it on the evaluation text (and passes the correct file)."""
    require("llama_cpp")
    from quantprism.calibration import eval_text_path
    from quantprism.evaluate.tokenizer_parity import check, reference
    from quantprism.exporters import gguf_vocab
    from quantprism.exporters.gguf import write_gguf
    from quantprism.model import load_model_info, load_tokenizer
    from quantprism.runtimes.llamacpp import LlamaCppSession

    model, good = family_ggufs["llama-bpe"]
    info = load_model_info(model)
    ref = reference(load_tokenizer(info), eval_text_path(None))
    monkeypatch.setattr(gguf_vocab, "identify_pre", lambda *a: ("gpt-2", {"by": "the old default"}))
    bad = write_gguf(tmp_path / "gpt2-pre.gguf", info, None, "F16")
    results = {}
    for name, path in (("good", good), ("bad", bad)):
        s = LlamaCppSession(path, n_ctx=64, threads=1)
        try:
            results[name] = check(s.runtime_tokenize, ref)
        finally:
            s.close()
    assert results["good"]["passed"] and results["good"]["eval"]["equal"]
    assert results["good"]["stress"]["equal"] == results["good"]["stress"]["total"]
    assert not results["bad"]["passed"] and not results["bad"]["eval"]["equal"]
    d = results["bad"]["eval"]["first_difference"]
    assert d["hf"] != d["runtime"]
