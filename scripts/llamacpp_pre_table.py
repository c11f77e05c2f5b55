"""Extract llama.cpp's BPE pre-tokenizer facts as data: src/quantprism/assets/llamacpp_pre.json.

    python scripts/llamacpp_pre_table.py LLAMA_CPP_DIR

LLAMA_CPP_DIR is llama.cpp's source tree (the one the llama-cpp-python sdist vendors: `make install` unpacks it to
~/.cache/quantprism/llama.cpp). Three tables, all facts of that version, none of its code:
- ``check_text`` and ``hashes``: the converter's check text and its sha256(str(token ids)) → pre name table
  (conversion/base.py, get_vocab_base_pre), the way llama.cpp names a BPE pre-tokenizer;
- ``names``: pre name → the pre-tokenizer type it selects at load time and whether it sets ignore_merges
  (src/llama-vocab.cpp, llama_vocab::impl::load);
- ``types``: pre-tokenizer type → the regular expressions llama.cpp splits text with, in order.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "quantprism" / "assets" / "llamacpp_pre.json"
ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


def cpp_string(body: str) -> str:
    """A C++ string literal's value (the escapes llama-vocab.cpp uses)."""
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\":
            out.append(ESCAPES[body[i + 1]])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def converter_tables(src: str) -> tuple[str, dict[str, str]]:
    check = ast.literal_eval(re.search(r"^\s*chktxt = (.+)$", src, re.M).group(1))
    hashes = dict(re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', src))
    return check, hashes


def vocab_tables(cpp: str) -> tuple[dict[str, dict], dict[str, list[str]]]:
    types: dict[str, list[str]] = {}
    case = r"((?:\s*case LLAMA_VOCAB_PRE_TYPE_\w+:\n|\s*default:\n)+)((?:\s*//[^\n]*\n)*)\s*regex_exprs = \{(.*?)\};"
    for m in re.finditer(case, cpp, re.S):
        lines = [ln.strip() for ln in m.group(3).split("\n")]
        exprs = [cpp_string(re.match(r'^"(.*)",?\s*(?://.*)?$', ln).group(1)) for ln in lines if ln and not ln.startswith("//")]
        for enum in re.findall(r"LLAMA_VOCAB_PRE_TYPE_(\w+)", m.group(1)) + (["DEFAULT"] if "default:" in m.group(1) else []):
            types[enum] = exprs
    names: dict[str, dict] = {}
    block = re.compile(r"((?:\s*(?:\} else if \(|\|\|)?\s*tokenizer_pre == \"[^\"]+\"\s*(?:\|\||\)\s*\{)?)+)"
                       r"\s*pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+);(.*?)(?=\} else if|\} else \{)", re.S)
    for m in block.finditer(cpp):
        for name in re.findall(r'tokenizer_pre == "([^"]+)"', m.group(1)):
            names[name] = {"type": m.group(2), "ignore_merges": "ignore_merges = true" in m.group(3)}
    return names, types


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(sys.argv[1])
    check, hashes = converter_tables((src / "conversion" / "base.py").read_text(encoding="utf-8"))
    names, types = vocab_tables((src / "src" / "llama-vocab.cpp").read_text(encoding="utf-8"))
    missing = sorted({n for n in hashes.values() if n not in names})
    doc = {"source": "llama.cpp as vendored in llama-cpp-python 0.3.36 (MIT): conversion/base.py, src/llama-vocab.cpp",
           "check_text": check, "hashes": dict(sorted(hashes.items())), "names": names,  # in the loader's order: the first of equivalent names is its primary spelling
           "types": dict(sorted(types.items())), "hash_names_without_type": missing}
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(hashes)} hashes, {len(names)} names, {len(types)} regex types; names without a type: {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
