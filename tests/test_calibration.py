"""Calibration sets: every source kind, determinism, hashing, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from quantprism.calibration import BUILTIN_CALIBRATION, build_calibration
from quantprism.errors import CalibrationError
from quantprism.model import BUILTIN_MODEL

from conftest import assert_one_line_error


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUILTIN_MODEL), local_files_only=True)


TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_builtin_is_deterministic_and_hashed(tok):
    a = build_calibration(tok, "builtin", samples=128, seq_len=256, seed=0)
    b = build_calibration(tok, None, samples=128, seq_len=256, seed=0)
    assert a.input_ids.shape == (128, 256)
    assert np.array_equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    assert not a.overlapping
    c = build_calibration(tok, "builtin", samples=128, seq_len=256, seed=1)
    assert c.sha256 != a.sha256
    assert a.record()["source"] == "builtin" and a.record()["samples"] == 128


def test_txt_jsonl_dir_sources(tok, tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text(TEXT)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": TEXT[i::3], "id": i}) for i in range(3)) + "\n\n")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.txt").write_text(TEXT)
    (d / "a.txt").write_text("Other words entirely. " * 30)
    sets = [build_calibration(tok, s, samples=4, seq_len=32, seed=0, warn=False) for s in (txt, jl, d)]
    for s in sets:
        assert s.input_ids.shape == (4, 32)
    assert len({s.sha256 for s in sets}) == 3
    # directory order is by name, independent of creation order
    again = build_calibration(tok, d, samples=4, seq_len=32, seed=0, warn=False)
    assert again.sha256 == sets[2].sha256


def test_overlap_and_range_warnings(tok, tmp_path, capsys):
    txt = tmp_path / "small.txt"
    txt.write_text(TEXT)
    cs = build_calibration(tok, txt, samples=64, seq_len=64, seed=0)
    err = capsys.readouterr().err
    assert cs.overlapping and "windows overlap" in err and "outside the recommended 128–512" in err


@pytest.mark.parametrize("content, name, needle", [
    ("", "empty.txt", "empty"),
    ("   \n\n", "blank.txt", "empty"),
    ('{"text": "ok"}\nnot json\n', "bad.jsonl", "bad.jsonl:2: not valid JSON"),
    ('{"txt": "ok"}\n', "nofield.jsonl", 'nofield.jsonl:1: missing string field "text"'),
    ("a,b\n", "data.csv", "unsupported calibration file type"),
    ("tiny", "tiny.txt", "fewer than seq_len"),
])
def test_bad_calibration_sources(tok, tmp_path, content, name, needle):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(CalibrationError, match=needle.replace("(", r"\(").replace('"', '"')):
        build_calibration(tok, p, samples=4, seq_len=64, warn=False)


def test_non_utf8_and_missing_and_empty_dir(tok, tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        build_calibration(tok, p, samples=1, seq_len=8)
    with pytest.raises(CalibrationError, match="no such calibration source"):
        build_calibration(tok, tmp_path / "missing.txt", samples=1, seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .txt files"):
        build_calibration(tok, tmp_path / "empty", samples=1, seq_len=8)
    with pytest.raises(CalibrationError, match="samples must be"):
        build_calibration(tok, BUILTIN_CALIBRATION, samples=0)
    with pytest.raises(CalibrationError, match="exceeds the model's max_position_embeddings"):
        build_calibration(tok, BUILTIN_CALIBRATION, samples=1, seq_len=4096, max_positions=2048)


def test_cli_bad_calibration_is_one_line(tiny_models, tmp_path, run_cli):
    p = tmp_path / "bad.jsonl"
    p.write_text("nope\n")
    before = sorted(tmp_path.iterdir())
    rc, _, err = run_cli("inspect", tiny_models["llama"], "--calibration", p)
    assert_one_line_error(rc, err, "bad.jsonl:1")
    assert sorted(tmp_path.iterdir()) == before
    rc, out, err = run_cli("inspect", tiny_models["llama"], "--calibration", "builtin", "--samples", "128",
                           "--seq-len", "128")
    assert rc == 0, err
    assert "sha256" in out and "calibration set" in out
