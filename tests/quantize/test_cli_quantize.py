"""`quantprism quantize` / `eval` end to end on a tiny model, and their bad-input paths."""
from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error


def write_targets(tmp_path, model, body, calibration="builtin", samples=4, seq_len=64):
    p = tmp_path / "targets.toml"
    p.write_text(f'[defaults]\nmodel = "{model}"\ncalibration = "{calibration}"\nsamples = {samples}\nseq_len = {seq_len}\n' + body)
    return p


GPTQ = '[target.g]\nformat = "gptq"\nruntime = "vllm"\nbits = 4\ngroup_size = 64\n'


@pytest.mark.parametrize("body, needle", [
    ('[target.g]\nformat="compressed-tensors"\nruntime="vllm"\nquant="W4A16"\ngroup_size=512\n',
     "group_size 512 does not divide in_features 256"),
    ('[target.g]\nformat="gptq"\nruntime="vllm"\nbits=9\n', "out of range"),
    ('[target.g]\nformat="gptq"\nruntime="vllm"\ndamp=1.5\n', "'damp'"),
])
def test_bad_settings(tmp_path, tiny_models, run_cli, body, needle):
    t = write_targets(tmp_path, tiny_models["llama"], body)
    rc, _, err = run_cli("quantize", "--targets", t, "--cache-dir", tmp_path / "cache")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "cache").exists()


def test_empty_calibration_is_refused(tmp_path, tiny_models, run_cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    t = write_targets(tmp_path, tiny_models["llama"], GPTQ, calibration=empty)
    rc, _, err = run_cli("quantize", "--targets", t, "--cache-dir", tmp_path / "cache")
    assert_one_line_error(rc, err, "empty")
    assert not (tmp_path / "cache").exists()


def test_unknown_only_target(tmp_path, tiny_models, run_cli):
    t = write_targets(tmp_path, tiny_models["llama"], GPTQ)
    rc, _, err = run_cli("quantize", "--targets", t, "--only", "nope")
    assert_one_line_error(rc, err, "no target named 'nope'")


def test_quantize_then_cache_hit_then_eval(tmp_path, tiny_models, run_cli):
    t = write_targets(tmp_path, tiny_models["llama"], GPTQ)
    cache = tmp_path / "cache"
    rc, out, err = run_cli("quantize", "--targets", t, "--cache-dir", cache, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "new" in out and "int4_g64_sym_fp16" in out
    rc, out, err = run_cli("quantize", "--targets", t, "--cache-dir", cache)
    assert rc == 0, err
    assert "hit" in out
    (result,) = list((tmp_path / "out").iterdir())
    rc, out, err = run_cli("eval", result, "--chunks", "2", "--json", tmp_path / "e.json")
    assert rc == 0, err
    s = json.loads((tmp_path / "e.json").read_text())
    assert s["grid"] == "int4_g64_sym_fp16" and s["n_tokens"] == 2 * 255
    assert 0 < s["kld_mean"] < 1 and 0 < s["top1_agreement"] <= 1
    rc, _, err = run_cli("eval", result, "--grid", "q4_k")
    assert_one_line_error(rc, err, "was not solved")


def test_eval_refuses_non_canonical_dir(tmp_path, run_cli):
    (tmp_path / "x").mkdir()
    rc, _, err = run_cli("eval", tmp_path / "x")
    assert_one_line_error(rc, err, "not a canonical result")
    (tmp_path / "x" / "canonical.safetensors").write_bytes(b"garbage")
    (tmp_path / "x" / "canonical.json").write_text("{")
    rc, _, err = run_cli("eval", tmp_path / "x")
    assert_one_line_error(rc, err, "corrupt canonical result")


def test_quantize_records_mixed_precision_plan(tmp_path, tiny_models, run_cli):
    t = write_targets(tmp_path, tiny_models["mistral"], GPTQ + "method = \"rtn\"\nprotect = 1\n")
    rc, out, err = run_cli("quantize", "--targets", t, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert rc == 0, err
    assert "mixed precision g: 1 tensors on int8_g64_sym_fp16" in out
    plans = json.loads((tmp_path / "out" / "plans.json").read_text())
    assert len(plans["g"]["protected"]) == 1 and len(plans["g"]["sensitivity"]) == 14
