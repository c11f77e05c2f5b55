"""GGUF tokenizer metadata from the model's own tokenizer files, as llama.cpp reads it.

Two kinds, as HF models ship them:
- byte-level BPE (GPT-2, Llama 3, Qwen2, DeepSeek, StarCoder, Falcon…) → ``tokenizer.ggml.model = "gpt2"`` with the
  vocabulary and merges as they are, and ``tokenizer.ggml.pre`` named the way llama.cpp's converter names it: the
  tokenizer's own ids on a fixed check text, hashed and looked up in llama.cpp's table (assets/llamacpp_pre.json, data
  extracted by scripts/llamacpp_pre_table.py). The name is accepted only when llama.cpp's splitting rules for it
  split a probe text exactly where this tokenizer's pre-tokenizer does and its ignore_merges flag agrees; otherwise
  the first name of the most widely used rule set that does; none → refused, naming the tokenizer. Never a default.
- SentencePiece (Llama 2, Mistral, Phi-3, …) → ``"llama"``: pieces, scores and types from tokenizer.model when the
  model ships it (what llama.cpp's converter reads), else from tokenizer.json's byte-fallback BPE, with each token's
  score = −(rank of the first merge that makes it), which orders llama.cpp's score-driven merges as HF's ranks do.

Special tokens (control / user-defined), bos/eos/eot/pad/unk ids, add_bos/add_eos as the HF tokenizer behaves, and the
chat template are carried over.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from ..errors import ArtifactError
from ..model import ModelInfo

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf TokenType
# tokens llama.cpp's converter treats as control even when the tokenizer does not mark them special
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
# end-of-turn tokens of common chat templates (llama.cpp also finds these by text at load time)
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
PROBE_EXTRA = ("I'M sure 'RE 'Ll 'd WE'VE\r\n\r\n\t\tx  \n 1234567 12,345.67 3.14159 αβγ ÀÉÎ naïve façade "
               "東京都 한국어 ภาษาไทย कि‍ 🙂👍🏽 a\u0301 x_y-z  print('ok')\n\n\n   end ")


@dataclass
class GGUFVocab:
    model: str                      # "gpt2" | "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    identified: dict = field(default_factory=dict)  # how `pre` was chosen

    def write(self, w) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        add = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
               "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
        for k, fn in add.items():
            if k in self.special:
                fn(self.special[k])
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)

    def record(self) -> dict:
        return {"model": self.model, "pre": self.pre, "tokens": len(self.tokens), "add_bos": self.add_bos,
                "add_eos": self.add_eos, "special": dict(self.special), **({"pre_identified": self.identified}
                                                                          if self.identified else {})}


@cache
def pre_table() -> dict:
    return json.loads(resources.files("quantprism").joinpath("assets/llamacpp_pre.json").read_text(encoding="utf-8"))


def check_hash(tok) -> str:
    """llama.cpp's converter: sha256 of str(token ids of the check text), special tokens as the tokenizer adds them."""
    return hashlib.sha256(str(tok.encode(pre_table()["check_text"])).encode()).hexdigest()


def _spans_hf(tok, text: str) -> list[tuple[int, int]]:
    pre = tok.backend_tokenizer.pre_tokenizer
    if pre is None:
        return [(0, len(text))]
    return [tuple(o) for _p, o in pre.pre_tokenize_str(text)]


def _spans_llamacpp(exprs: tuple[str, ...], text: str) -> list[tuple[int, int]] | None:
    """llama.cpp's split: each expression in turn over every piece so far, matches and the gaps between them kept."""
    import regex

    pieces = [(0, len(text))]
    for e in exprs:
        try:
            rx = regex.compile(e)
        except regex.error:
            return None
        out = []
        for s, t in pieces:
            pos = s
            for m in rx.finditer(text, s, t):
                if m.start() == m.end():
                    continue
                if m.start() > pos:
                    out.append((pos, m.start()))
                out.append((m.start(), m.end()))
                pos = m.end()
            if pos < t:
                out.append((pos, t))
        pieces = out
    return pieces


def identify_pre(tok, ignore_merges: bool, where: str) -> tuple[str, dict]:
    """The ``tokenizer.ggml.pre`` name llama.cpp needs for this byte-level BPE tokenizer (see the module doc)."""
    table = pre_table()
    h = check_hash(tok)
    by_hash = table["hashes"].get(h)
    probe = table["check_text"] + "\n" + PROBE_EXTRA
    ours = _spans_hf(tok, probe)
    same_type: dict[str, bool] = {}
    for typ, exprs in table["types"].items():
        same_type[typ] = _spans_llamacpp(tuple(exprs), probe) == ours
    fits = [n for n, v in table["names"].items() if same_type.get(v["type"]) and v["ignore_merges"] == ignore_merges]
    if by_hash in fits:
        return by_hash, {"by": "check-text hash, confirmed by split rules", "hash": h}
    if fits:  # equivalent splitting in llama.cpp: the most widely used rule set, then the loader's first spelling of it
        size = {t: sum(1 for v in table["names"].values() if v["type"] == t) for t in {table["names"][n]["type"] for n in fits}}
        name = min(fits, key=lambda n: (-size[table["names"][n]["type"]], fits.index(n)))
        return name, {"by": "split rules" + (f" (hash names {by_hash}, whose rules differ)" if by_hash else
                                              " (hash not in llama.cpp's table)"), "hash": h, "equivalent": sorted(fits)[:12]}
    raise ArtifactError(
        f"{where}: llama.cpp has no pre-tokenizer that splits text like this tokenizer (check-text hash {h[:16]}…"
        f"{' names ' + by_hash + ' but its rules differ' if by_hash else ' is not in its table'}); a GGUF would tokenize "
        "differently in llama.cpp, so none is written")


def _special_ids(tok, config: dict) -> dict[str, int]:
    out = {}
    for k in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{k}_token_id", None)
        if i is None and isinstance(config.get(f"{k}_token_id"), int):
            i = config[f"{k}_token_id"]
        if i is not None:
            out[k] = int(i)
    vocab = tok.get_vocab()
    for t in EOT_TEXTS:
        if t in vocab and (t != "<|endoftext|>" or "<|im_end|>" not in vocab):
            out["eot"] = int(vocab[t])
            break
    return out


def _adds(tok) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds BOS / EOS itself (by behaviour, not by config keys)."""
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos


def _byte_level(tj: dict) -> bool:
    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False
    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def _added_type(a: dict) -> int:
    """An added token's GGUF type, as llama.cpp's converter decides it."""
    return CONTROL if a.get("special") or a["content"] in LOOKS_SPECIAL else USER_DEFINED


def _table(n: int, vocab: dict[str, int], added: dict[int, dict], where: str) -> tuple[list[str], list[int]]:
    if vocab and max(vocab.values()) >= n:
        raise ArtifactError(f"{where}: tokenizer id {max(vocab.values())} ≥ the model's vocab_size {n}")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    for i, a in added.items():
        if i >= n:
            raise ArtifactError(f"{where}: added token {a['content']!r} has id {i} ≥ the model's vocab_size {n}")
        tokens[i], types[i] = a["content"], _added_type(a)
    return tokens, types


def read_vocab(info: ModelInfo) -> GGUFVocab:
    """The GGUF tokenizer of ``info`` (ArtifactError naming the tokenizer when llama.cpp cannot reproduce it)."""
    from ..model import load_tokenizer

    where = str(info.path)
    n = int(info.config["vocab_size"])
    tjp = info.path / "tokenizer.json"
    if not tjp.is_file():
        raise ArtifactError(f"{where}: GGUF export needs tokenizer.json (found {info.tokenizer_kind})")
    tj = json.loads(tjp.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    tok = load_tokenizer(info)
    add_bos, add_eos = _adds(tok)
    common = dict(special=_special_ids(tok, info.config), add_bos=add_bos, add_eos=add_eos,
                  chat_template=tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None)
    if model.get("type") == "BPE" and not model.get("byte_fallback") and _byte_level(tj):
        tokens, types = _table(n, dict(model["vocab"]), added, where)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre, how = identify_pre(tok, bool(model.get("ignore_merges")), where)
        return GGUFVocab("gpt2", tokens, types, merges=merges, pre=pre, identified=how, **common)
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        spm = info.path / "tokenizer.model"
        if spm.is_file():
            tokens, types, scores = _sentencepiece_model(spm, n, added, where)
        else:
            tokens, types = _table(n, dict(model["vocab"]), added, where)
            scores = _scores_from_merges(tokens, model.get("merges", []))
            unk = model.get("unk_token")
            for i, t in enumerate(tokens):
                if t == unk:
                    types[i] = UNKNOWN
                elif types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                    types[i] = BYTE
        return GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=_space_prefix(tj), **common)
    raise ArtifactError(f"{where}: GGUF export supports byte-level BPE and SentencePiece (byte-fallback BPE) tokenizers; "
                        f"this one is {model.get('type', 'unknown')}{' with byte fallback' if model.get('byte_fallback') else ''}")


def _scores_from_merges(tokens: list[str], merges: list) -> list[float]:
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _space_prefix(tj: dict) -> bool:
    """SentencePiece's add_dummy_prefix as HF spells it: a Prepend("▁") normalizer or a Metaspace that prepends."""
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    pre = tj.get("pre_tokenizer") or {}
    seq = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in seq if p)


def _sentencepiece_model(path: Path, n: int, added: dict[int, dict], where: str):
    """Pieces, scores and types as tokenizer.model holds them (protobuf, read by sentencepiece; no pickle)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.get_piece_size() > n:
        raise ArtifactError(f"{where}: tokenizer.model has {sp.get_piece_size()} pieces, more than vocab_size {n}")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types, scores = [UNUSED] * n, [-1000.0] * n
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), float(sp.get_score(i))
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                    else UNUSED if sp.is_unused(i) else NORMAL)
    for i, a in added.items():
        if i < n and (i >= sp.get_piece_size() or types[i] == NORMAL):
            tokens[i], types[i] = a["content"], _added_type(a)
    return tokens, types, scores
