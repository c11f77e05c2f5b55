"""Tokenization parity: the runtime's own tokenizer against the model's HF tokenizer.

The quality check feeds every runtime token ids from the HF tokenizer, so a runtime that tokenizes text itself
(llama.cpp from the GGUF vocabulary) could be off-distribution in deployment with no metric noticing. Both sides
tokenize plain text: no BOS/EOS added, special-token strings treated as text (HF ``split_special_tokens``, llama.cpp
``special=False``). A mismatch on the evaluation text fails the target; stress-set mismatches are reported with
examples and fail it only in ``strict`` mode (HF and llama.cpp legitimately differ on a few SentencePiece edge cases).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

MODES = ("eval", "strict")
EXAMPLES = 5
STRESS = (
    "0 12 345 6789 1234567890 3.14159 1,000,000 2026-11-30 0x7fff 1e-5 -42 +7 99.9% $1,299.99",
    "a  b   c    d     e\n\nf\n\n\ng\r\nh\r\n\r\ni \n j \n\n k",
    "\tindent\t\ttabs\t \t mixed\n\t\t\treturn x",
    "   leading spaces", "trailing spaces   ", " ", "\n", "  \n  \n", "",
    "東京は日本の首都です。我想在apple工作。한국어 문장입니다. ภาษาไทย हिन्दी",
    "🚀 rocket 😶‍🌫️ face 👍🏽 thumbs 🦙🦙 llamas ✅",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nif __name__ == '__main__':\n    print(f(3))",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }  // C\n<div class=\"x\">&amp;</div>",
    "naïve café façade résumé Ångström Zürich São Paulo Dvořák e\u0301 n\u0303",
    "I'M SURE you'RE right, we'VE seen it; he'd've known. 'Quoted' \"double\" `back`",
    "------======= ......!!!!!!?????? ''''''```````\"\"\"\"",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº –— “smart” ‘quotes’ …",
)


def _hf_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def stress_texts(tok) -> list[str]:
    """The fixed stress set plus this tokenizer's own special-token strings, as plain text."""
    specials = sorted({t for t in getattr(tok, "all_special_tokens", []) if isinstance(t, str)})
    return list(STRESS) + [f"before {s} after" for s in specials[:8]]


def reference(tok, eval_text: Path) -> dict:
    """The HF side, computed once per build: ids of the evaluation text and of every stress text."""
    text = Path(eval_text).read_text(encoding="utf-8")
    return {"eval_sha256": hashlib.sha256(text.encode()).hexdigest(), "eval_text": str(eval_text),
            "eval_ids": _hf_ids(tok, text), "stress": [{"text": s, "ids": _hf_ids(tok, s)} for s in stress_texts(tok)]}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def session_parity(sess, ref: dict, mode: str = "eval") -> dict:
    """A session's own tokenizer (``runtime_tokenize``) against the reference; a runtime that tokenizes with the HF
    tokenizer itself is recorded as such (there is nothing to compare)."""
    own = getattr(sess, "runtime_tokenize", None)
    if own is None:
        return {"tokenizer": "hf", "mode": mode, "passed": True, "note": "the runtime tokenizes with the model's HF tokenizer"}
    return check(own, ref, mode)


def check(tokenize: Callable[[str], list[int]], ref: dict, mode: str = "eval") -> dict:
    """Compare ``tokenize`` (the runtime's own tokenizer) with the reference."""
    text = Path(ref["eval_text"]).read_text(encoding="utf-8")
    got = [int(i) for i in tokenize(text)]
    hf = ref["eval_ids"]
    pos = first_difference(hf, got)
    ev: dict = {"equal": pos is None, "hf_tokens": len(hf), "runtime_tokens": len(got)}
    if pos is not None:
        ev["first_difference"] = {"position": pos, "hf": hf[max(0, pos - 3): pos + 8], "runtime": got[max(0, pos - 3): pos + 8]}
    bad = []
    for case in ref["stress"]:
        ids = [int(i) for i in tokenize(case["text"])]
        if ids != case["ids"]:
            bad.append({"text": case["text"][:80], "hf": case["ids"][:24], "runtime": ids[:24]})
    stress = {"equal": len(ref["stress"]) - len(bad), "total": len(ref["stress"]), "examples": bad[:EXAMPLES]}
    passed = ev["equal"] and (mode != "strict" or not bad)
    return {"tokenizer": "own", "mode": mode, "eval": ev, "stress": stress, "passed": bool(passed)}
