"""The reference corpus: text every Python 3.11 installation carries.

Documents are (name, text) pairs drawn from the standard library without importing it:
- every pydoc topic (``pydoc_data.topics``: the language reference in prose),
- the docstrings of each stdlib module, parsed with ``ast`` (English with code examples),
- a slice of each module's source (structured text: code).
The split into training and held-out documents is by a hash of the module (or topic) name, so it is
stable across machines and independent of the order files are found in; a module's docstrings and
its source always land on the same side (the source contains the docstrings).
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

HELDOUT_MOD = 12  # 1 document in 12 is held out


def _docstrings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > 40:
                out.append(doc)
    return out


def documents(max_source_chars: int = 6000) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # stdlib, data only

    docs: list[tuple[str, str]] = [(f"topic:{k}", topics[k].strip()) for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if any(part in rel for part in ("site-packages", "test", "idlelib", "lib2to3", "pydoc_data", "encodings/")):
            continue
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        ds = _docstrings(tree)
        if ds:
            docs.append((f"doc:{rel}", "\n\n".join(ds)))
        if len(src) > 2000:
            docs.append((f"src:{rel}", src[:max_source_chars]))
    return docs


def unit(name: str) -> str:
    """The split unit: a module's docstrings and its source share one (the source contains them)."""
    kind, _, rest = name.partition(":")
    return rest if kind in ("doc", "src") else name


def is_heldout(name: str) -> bool:
    return int(hashlib.sha256(unit(name).encode()).hexdigest(), 16) % HELDOUT_MOD == 0


def split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train, held = [], []
    for name, text in documents():
        (held if is_heldout(name) else train).append((name, text))
    return train, held


def heldout_text(train: list[tuple[str, str]], held: list[tuple[str, str]]) -> str:
    """The evaluation text: held-out documents minus any paragraph that also occurs in training.

    pydoc topics and some modules repeat paragraphs verbatim (e.g. the scoping rules appear under
    several topics); dropping those keeps every evaluated paragraph unseen in training.
    """
    seen = {p.strip() for _, t in train for p in t.split("\n\n") if p.strip()}
    docs = []
    for _, t in held:
        paras = [p for p in t.split("\n\n") if p.strip() and p.strip() not in seen]
        if paras:
            docs.append("\n\n".join(paras))
    return "\n\n".join(docs)


if __name__ == "__main__":
    tr, he = split()
    print(len(tr), sum(len(t) for _, t in tr), len(he), sum(len(t) for _, t in he))
    for kind in ("topic", "doc", "src"):
        print(kind, sum(len(t) for n, t in tr if n.startswith(kind)))
