"""The ONNX Runtime adapter on the bundled model (nbits8 g32 GPTQ): loads, generates, agrees with the canonical
dequantized torch model; damaged artifacts are one-line ArtifactErrors."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from quantprism.errors import ArtifactError
from quantprism.model import BUILTIN_MODEL, load_tokenizer, load_torch_model

from conftest import require  # noqa: E402

ort = require("onnxruntime", "pip install -e .[onnx]")
from onnx_canonical import bundled_canonical  # noqa: E402
from onnx_oracle import ort_activation_hooks  # noqa: E402

pytestmark = pytest.mark.onnx
PROMPT = "class Path:\n    def "


@pytest.fixture(scope="module")
def nbits8(tmp_path_factory):
    """The nbits8 g32 GPTQ result of the shared ONNX canonical pass, exported with external data (small model)."""
    from quantprism.exporters.onnx import export_onnx

    info, results = bundled_canonical(tmp_path_factory)
    target, res = results["nbits8"]
    out = export_onnx(target, info, res, tmp_path_factory.mktemp("ort") / "nbits8", external_data=True)
    return info, target, res, out


def _canonical_torch(info, target, res):
    from quantprism.exporters import reference_choice
    from quantprism.exporters.onnx import chosen_grids
    from quantprism.exporters.state import canonical_weights, load_weights

    model = load_torch_model(info)
    grids = chosen_grids(res, reference_choice(target, info, res))
    load_weights(model, canonical_weights(info, res, grids.get))
    return model, grids


def _heldout_ids(info, n: int = 512) -> list[int]:
    text = (BUILTIN_MODEL.parent / "eval_heldout.txt").read_text(encoding="utf-8")
    bos = info.config["bos_token_id"]
    return [bos] + load_tokenizer(info)(text[:40000], add_special_tokens=False)["input_ids"][: n - 1]


@pytest.mark.slow
def test_smoke_bundled_nbits8_agrees_with_the_canonical_model(nbits8, record_property):
    from quantprism.runtimes.onnxruntime import open_session

    info, target, res, out = nbits8
    s = open_session(out, threads=2)
    try:
        assert (s.runtime, s.kernel, s.threads) == ("onnxruntime", "native", 2)
        assert s.tokenize(PROMPT) == load_tokenizer(info)(PROMPT, add_special_tokens=False)["input_ids"]
        prompt = [info.config["bos_token_id"]] + s.tokenize(PROMPT)
        gen, ttft, per_token = s.timed_generate(prompt, 32, stop_at_eos=False)
        assert len(gen) == 32 and len(per_token) == 31 and ttft > 0
        # prefill + decode through the same graph = teacher forcing on the generated text
        assert list(s.logits(prompt + gen[:-1])[len(prompt) - 1 :].argmax(-1)) == gen
        ids = _heldout_ids(info)
        got = s.logits(ids)
    finally:
        s.close()
    model, grids = _canonical_torch(info, target, res)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        handles = ort_activation_hooks(model, {m: "MatMulNBits" for m in grids}, {m: 32 for m in grids})
        try:
            emu = model(torch.tensor([ids])).logits[0].numpy()
        finally:
            for h in handles:
                h.remove()
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    top1_emu = float((got.argmax(-1) == emu.argmax(-1)).mean())
    d_ref, d_emu = (float(np.median(np.abs(got - x).max(-1))) for x in (ref, emu))
    for k, v in {"top1_vs_canonical": top1, "top1_vs_canonical_a4_emulated": top1_emu,
                 "median_max_abs_logit_diff": d_ref, "median_max_abs_logit_diff_a4_emulated": d_emu}.items():
        record_property(k, v)
    print(f"top-1 vs canonical {top1:.4f} (median max|Δlogit| {d_ref:.3g}); "
          f"with ORT's int8 activation rounding emulated {top1_emu:.4f} ({d_emu:.3g})")
    assert top1 >= 0.99
    # accuracy_level 4 rounds activations to int8: emulating it must bring the reference closer. It cannot make
    # it exact over 512 positions: fp summation-order differences flip near-tie roundings, which then propagate.
    assert top1_emu >= 0.99 and d_emu < d_ref


def test_session_options_and_latency(nbits8, record_property):
    """Two sessions of one artifact (2 threads, all graph optimizations / 1 thread, none) compute the same model.
    ORT chooses its MatMulNBits int8 kernel by ISA (AVX2 vs AVX-512 VNNI) and by the optimized graph; with
    accuracy_level 4 each kernel rounds the activations to int8 per block in its own way, so the logits differ by
    up to half an activation step times the weights (measured: < 1e-3 on AVX2, 0.020 on a VNNI Xeon). What that
    rounding bounds is the decision and the distribution: the same argmax wherever the top-2 margin exceeds
    0.25 (12× the largest difference seen), and a mean KLD far below any quality gate."""
    from quantprism.hardware import detect
    from quantprism.runtimes.latency import measure
    from quantprism.runtimes.onnxruntime import open_session

    info, out = nbits8[0], nbits8[3]
    fast = open_session(out, threads=2)
    plain = open_session(out, threads=1, opt_level="disable", spinning=False)
    try:
        ids = _heldout_ids(info, 256)
        a, b = fast.logits(ids), plain.logits(ids)
        assert a.shape == b.shape
        top2 = np.sort(a, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 0.25
        la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
        lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
        kld = float((np.exp(la) * (la - lb)).sum(-1).mean())
        m = detect()
        print(f"{m.kind} ({m.cpu}): max |Δlogit| {np.abs(a - b).max():.3g}, KLD {kld:.2e}, "
              f"{int(decisive.sum())}/{len(ids)} decisive positions")
        record_property("machine", m.kind)
        record_property("max_abs_logit_diff", float(np.abs(a - b).max()))
        assert decisive.sum() > len(ids) // 4
        assert (a.argmax(-1) == b.argmax(-1))[decisive].all()
        assert kld < 1e-4
        assert fast.present[:2] == ["present.0.key", "present.0.value"] and fast.past[1] == "past_key_values.0.value"
        r = measure(plain, ids, decode_tokens=8, repeats=2)
        assert r["threads"] == 1 and r["decode_tokens"] == 8 and r["decode_tok_s_p50"] > 0
    finally:
        fast.close()
        plain.close()
    with pytest.raises(ValueError, match="opt_level"):
        open_session(out, opt_level="max")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_data", "short_data", "no_model", "escape"])
def test_damaged_artifact_is_one_line_error(nbits8, tmp_path, damage, run_cli):
    from quantprism.exporters.onnx import DATA_FILE, MODEL_FILE
    from quantprism.runtimes.onnxruntime import open_session

    from conftest import assert_one_line_error

    d = shutil.copytree(nbits8[3], tmp_path / "a")
    if damage == "garbage":
        (d / MODEL_FILE).write_bytes(b"\x08\xff" * 500)
    elif damage == "truncated":
        raw = (d / MODEL_FILE).read_bytes()
        (d / MODEL_FILE).write_bytes(raw[: len(raw) // 2])
    elif damage == "no_data":
        (d / DATA_FILE).unlink()
    elif damage == "short_data":
        with open(d / DATA_FILE, "r+b") as f:
            f.truncate(4096)
    elif damage == "escape":  # external data read from outside the artifact (issue 20): the file is there, valid
        import onnx

        proto = onnx.load(str(d / MODEL_FILE), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../outside.data"
        (d / MODEL_FILE).write_bytes(proto.SerializeToString())
        shutil.move(d / DATA_FILE, tmp_path / "outside.data")
    else:
        (d / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError) as e:
        open_session(d, threads=1)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg
    expect = {"no_data": "missing", "short_data": "truncated", "no_model": "no model.onnx",
              "escape": "outside the model folder"}.get(damage)
    assert expect is None or expect in msg
    rc, _, err = run_cli("validate", d)  # the CLI: one line on stderr, exit 2
    assert_one_line_error(rc, err, *([expect] if expect else []))


def test_validate_cli_runs_a_good_onnx_artifact(nbits8, run_cli):
    rc, out, err = run_cli("validate", nbits8[3], "--threads", "1")
    assert rc == 0, err
    assert "loads in ONNX Runtime" in out and "generated" in out and "external data" in out
