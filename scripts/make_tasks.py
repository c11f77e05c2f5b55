"""Generate the bundled lm-eval task suite from the bundled model's HELD-OUT text (deterministic: fixed seed, fixed
order). Writes src/quantprism/assets/tasks/<task>.jsonl, <task>.yaml, utils.py's data, and a README of the suite.

    python scripts/make_tasks.py [--out src/quantprism/assets/tasks]

Tasks (each a probe of what quantization damages first; 4-way multiple choice = 25 % chance, exact match ≈ 0 %):
- qp_continuation  (multiple choice, loglikelihood): the true next ten words of a held-out passage vs three near
                   misses (two words swapped, one word substituted — twice);
- qp_code          (generate_until, exact match): the last 1–12 characters of a code line (after its last = or ();
- qp_long_recall   (multiple choice): a term used 150–300 words back in a 300-word held-out window (and not since)
                   comes back at its end: the true words vs the term swapped for words absent from the window;
- qp_rare          (multiple choice): the continuation of a context that ends in a word rare in the calibration text (≤ 2);
- qp_structure     (multiple choice): the closing bracket sequence of a nested code expression.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "quantprism" / "assets"
SEED = 0
GOLD_WORDS = 10
N = 120  # documents per task (a standard error of ~4 points at 50 % accuracy)


def words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def prose_paragraphs(text: str) -> list[str]:
    paras = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
    return [p for p in paras if len(words(p)) > 40 and p[0].isalpha() and "::=" not in p and ">>>" not in p]


def code_lines(text: str) -> list[tuple[str, str]]:
    """(preceding context, line) for indented code lines and >>> examples."""
    lines = text.splitlines()
    out = []
    for i, ln in enumerate(lines):
        s = ln.strip()
        if (ln.startswith("   ") or s.startswith(">>>")) and 12 <= len(s) <= 70 and re.search(r"[=(]", s) and "::=" not in s:
            ctx = "\n".join(lines[max(0, i - 12):i])
            out.append((ctx[-600:], ln))
    return out


def minimal_pairs(gold: list[str], vocab: list[str], rng: random.Random) -> list[str]:
    """Three near misses of ``gold``: two adjacent words swapped, and two single-word substitutions (a model must
    prefer the true text by its grammar and sense, not by topic)."""
    out = []
    while len(out) < 3:
        w = list(gold)
        if not out:
            i = rng.randrange(len(w) - 1)
            w[i], w[i + 1] = w[i + 1], w[i]
        else:
            w[rng.randrange(len(w))] = rng.choice(vocab)
        s = " ".join(w)
        if s != " ".join(gold) and s not in out:
            out.append(s)
    return out


def continuation(text: str, rng: random.Random) -> list[dict]:
    paras = prose_paragraphs(text)
    vocab = sorted({x for p in paras for x in words(p) if x.isalpha()})
    docs = []
    for p in rng.sample([p for p in paras if len(words(p)) > 20 + GOLD_WORDS], N):
        w = words(p)
        docs.append(near_miss_doc(w, rng.randrange(20, len(w) - GOLD_WORDS), vocab, rng))
    return docs


def near_miss_doc(w: list[str], k: int, vocab: list[str], rng: random.Random) -> dict:
    """Up to 80 words of context before ``w[k]``; the true next GOLD_WORDS words among three near misses."""
    gold = " ".join(w[k:k + GOLD_WORDS])
    choices = [gold, *minimal_pairs(w[k:k + GOLD_WORDS], vocab, rng)]
    rng.shuffle(choices)
    return {"context": " ".join(w[max(0, k - 80):k]), "choices": choices, "gold": choices.index(gold)}


def code(text: str, rng: random.Random) -> list[dict]:
    cands = []
    for ctx, ln in code_lines(text):
        cut = max(ln.rfind("="), ln.rfind("("))
        target = ln[cut + 1:]
        if cut > 0 and 1 <= len(target.strip()) <= 12 and target.strip():
            cands.append({"context": ctx + "\n" + ln[: cut + 1], "target": target})
    return rng.sample(cands, min(N, len(cands)))


def long_recall(text: str, rng: random.Random) -> list[dict]:
    """A term used early in a 300-word held-out window (150–300 words back) and absent from its last 150 words comes
    back at the window's end: the true three words vs the same with the term replaced by words absent from the
    window."""
    w = words(text)
    term = re.compile(r"[A-Za-z_]{6,}")
    vocab = sorted({x for x in w if term.fullmatch(x)})
    cands = [k for k in range(300, len(w) - 3) if term.fullmatch(w[k]) and w[k] not in w[k - 150:k]
             and w[k] in w[k - 300:k - 150]]
    docs = []
    for k in rng.sample(cands, min(N, len(cands))):
        window = set(w[k - 300:k + 3])
        gold = " ".join(w[k:k + 3])
        wrong = []
        while len(wrong) < 3:
            x = rng.choice(vocab)
            s = " ".join([x, *w[k + 1:k + 3]])
            if x not in window and s not in wrong:
                wrong.append(s)
        choices = [gold, *wrong]
        rng.shuffle(choices)
        docs.append({"context": " ".join(w[k - 300:k]), "choices": choices, "gold": choices.index(gold)})
    return docs


def rare(text: str, calib: str, rng: random.Random) -> list[dict]:
    freq = Counter(words(calib))
    paras = prose_paragraphs(text)
    cands = []
    for p in paras:
        w = words(p)
        for k in range(20, len(w) - GOLD_WORDS - 1):
            if freq[w[k]] <= 2 and any(c.isalpha() for c in w[k]):
                cands.append((w, k + 1))  # the rare word ends the context
    vocab = sorted({x for p in paras for x in words(p) if x.isalpha()})
    return [near_miss_doc(w, k, vocab, rng) for w, k in rng.sample(cands, min(N, len(cands)))]


def structure(text: str, rng: random.Random) -> list[dict]:
    cands = []
    for ctx, ln in code_lines(text):
        m = re.search(r"[)\]}]+\s*$", ln)
        if m and len(m.group().strip()) >= 2:
            cands.append((ctx, ln[: m.start()], m.group().strip()))
    docs = []
    for ctx, head, close in rng.sample(cands, min(N, len(cands))):
        pool = {close, close[::-1], close.replace(")", "]"), close.replace("]", ")"), close + ")", close[:-1],
                close.replace(")", "}"), ")" * len(close)}
        pool.discard(close)
        wrong = sorted(pool - {close})
        rng.shuffle(wrong)
        choices = [close, *wrong[:3]]
        if len(choices) < 4:
            continue
        rng.shuffle(choices)
        docs.append({"context": ctx + "\n" + head, "choices": choices, "gold": choices.index(close)})
    return docs


MC_YAML = """task: {task}
custom_dataset: !function utils.load_{task}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: "{delim}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  chance: 0.25
"""
GEN_YAML = """task: {task}
custom_dataset: !function utils.load_{task}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  chance: 0.0
"""
UTILS = '''"""Loaders of the bundled tasks (lm-eval `custom_dataset`): the JSONL beside this file, offline, path-independent.
Importing it also registers the `quantprism` model backend with lm-eval."""
from __future__ import annotations

import json
from pathlib import Path

try:  # `lm_eval --model quantprism --include_path <this folder>`: the backend registers itself on import
    import quantprism.evaluate.lm_backend  # noqa: F401
except ImportError:
    pass


def _load(name: str, **_):
    import datasets

    rows = [json.loads(ln) for ln in (Path(__file__).with_name(f"{{name}}.jsonl")).read_text(encoding="utf-8").splitlines() if ln]
    return datasets.DatasetDict({{"test": datasets.Dataset.from_list(rows)}})

{loaders}'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS / "tasks")
    args = ap.parse_args()
    text = (ASSETS / "eval_heldout.txt").read_text(encoding="utf-8")
    calib = (ASSETS / "calibration.txt").read_text(encoding="utf-8")
    tasks = {"qp_continuation": (continuation(text, random.Random(SEED)), " "),
             "qp_code": (code(text, random.Random(SEED + 1)), None),
             "qp_long_recall": (long_recall(text, random.Random(SEED + 2)), " "),
             "qp_rare": (rare(text, calib, random.Random(SEED + 3)), " "),
             "qp_structure": (structure(text, random.Random(SEED + 4)), "")}
    args.out.mkdir(parents=True, exist_ok=True)
    for task, (docs, delim) in tasks.items():
        (args.out / f"{task}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        yaml = GEN_YAML.format(task=task) if delim is None else MC_YAML.format(task=task, delim=delim)
        (args.out / f"{task}.yaml").write_text(yaml, encoding="utf-8")
        print(f"{task}: {len(docs)} documents")
    loaders = "".join(f"\n\ndef load_{t}(**kw):\n    return _load({t!r})\n" for t in tasks)
    (args.out / "utils.py").write_text(UTILS.format(loaders=loaders.lstrip("\n")), encoding="utf-8")
    (args.out / "_quantprism.yaml").write_text("group: quantprism_bundled\ntask:\n" + "".join(f"  - {t}\n" for t in tasks)
                                               + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1.0\n",
                                               encoding="utf-8")


if __name__ == "__main__":
    main()
