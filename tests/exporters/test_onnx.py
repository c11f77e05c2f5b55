"""ONNX exporter: packing checked against the operator spec and ORT itself, fp graphs against transformers,
quantized initializers bit-exact against the canonical weights, deterministic and atomic output."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantprism.errors import ArtifactError
from quantprism.model import load_model_info, load_torch_model
from quantprism.quantize.grids import Int8ChannelGrid, IntGrid, QuantizedTensor

from conftest import require  # noqa: E402

ort = require("onnxruntime", "pip install -e .[onnx]")
onnx = require("onnx", "pip install -e .[onnx]")
from onnx_canonical import bundled_canonical, onnx_targets  # noqa: E402
from onnx_oracle import a4_round, decode_nbits, dynamic_uint8_round, kernel_weights  # noqa: E402

pytestmark = pytest.mark.onnx


def _random_qt(grid: IntGrid, n: int = 48, k: int = 128, seed: int = 0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[:, 5] *= 8  # an outlier column, so some blocks use the extreme codes
    return grid.rtn(torch.from_numpy(w), None, clip=False)


def _single_op_session(rep, k: int, n: int):
    from onnx import TensorProto, helper

    nodes = [m for qs in rep.shared.values() for m in qs] + rep.nodes
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], rep.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


GRIDS = [IntGrid(8, 32, True, "fp32"), IntGrid(4, 32, True, "fp32"), IntGrid(8, 16, False, "fp32"),
         IntGrid(4, 64, False, "fp32"), IntGrid(4, 128, True, "fp32")]
TWO_BIT = [IntGrid(2, 32, False, "fp32"), IntGrid(2, 128, True, "fp32")]  # nbits2: four codes per byte


@pytest.mark.parametrize("grid", GRIDS + TWO_BIT, ids=lambda g: g.id)
def test_nbits_packing_decodes_to_canonical_weights(grid):
    from quantprism.exporters.onnx_kernels import pack_nbits

    qt = _random_qt(grid, n=40, k=128 if grid.group_size != 128 else 256)
    p = pack_nbits(qt)
    n, k = qt.codes.shape
    assert p["B"].dtype == np.uint8 and p["B"].shape == (n, k // grid.group_size, grid.group_size * grid.bits // 8)
    assert ("zero_points" in p) == (not grid.symmetric)  # symmetric: ORT's default zero point 2^(bits-1)
    w = decode_nbits(p["B"], p["scales"], p.get("zero_points"), k, n, grid.bits, grid.group_size)
    assert np.array_equal(w, qt.dequantize())


@pytest.mark.parametrize("grid", GRIDS[:4] + TWO_BIT, ids=lambda g: g.id)
def test_matmulnbits_in_ort_computes_x_times_canonical_weights(grid):
    """Catches layout errors the decoder shares with the packer: ORT itself must compute x @ Wᵀ. accuracy_level 0
    is fp32 arithmetic; level 4 rounds x to int8 per block, which the emulation reproduces."""
    from quantprism.exporters.onnx_kernels import nbits_nodes

    qt = _random_qt(grid, n=64, k=128, seed=1)
    w = qt.dequantize().astype(np.float64)
    x = np.random.default_rng(2).standard_normal((7, 128)).astype(np.float32)
    exact = _single_op_session(nbits_nodes("lin", "x", "y", qt, 0), 128, 64).run(None, {"x": x})[0]
    assert np.abs(exact - x @ w.T).max() <= 1e-5 * np.abs(x @ w.T).max()
    fast = _single_op_session(nbits_nodes("lin", "x", "y", qt, 4), 128, 64).run(None, {"x": x})[0]
    xq = a4_round(torch.from_numpy(x), grid.group_size).double().numpy()
    assert np.abs(fast - xq @ w.T).max() <= 1e-5 * np.abs(xq @ w.T).max()


def test_w8a8_is_exact_including_activation_outliers():
    """U8U8 MatMulInteger: the integer product is exact even where AVX2's U8S8 path would saturate."""
    from quantprism.exporters.onnx_kernels import pack_w8a8, w8a8_nodes

    qt = _random_qt(Int8ChannelGrid("fp32"), n=96, k=256, seed=3)
    p = pack_w8a8(qt)
    assert p["B"].dtype == np.uint8 and p["B"].shape == (256, 96) and int(p["zero_point"]) == 128
    assert np.array_equal((p["B"].astype(np.float32) - 128).T * p["scales"][:, None], qt.dequantize())
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((5, 256)) * 3 + 2).astype(np.float32)
    x[:, 3] = 40.0  # large activations next to large weights: u8·s8 pair sums overflow int16
    y = _single_op_session(w8a8_nodes("lin", "x", "y", qt), 256, 96).run(None, {"x": x})[0]
    ref = dynamic_uint8_round(torch.from_numpy(x)).double().numpy() @ qt.dequantize().astype(np.float64).T
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_grids_without_an_ort_kernel_are_refused():
    from quantprism.exporters.onnx_kernels import kernel_for

    assert kernel_for("int8_g32_sym_fp32") == "MatMulNBits"
    assert kernel_for("int8_gc_sym_n_fp32") == "MatMulInteger"
    for gid in ("int4_g48_sym_fp32", "int4_gc_sym_fp32", "q4_k_imat", "int3_g32_sym_fp32"):
        with pytest.raises(ArtifactError):
            kernel_for(gid)


# ---- whole graphs -------------------------------------------------------------------------------------


def _feed(ids: np.ndarray, past: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    p, t = past[0].shape[2], ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": np.ones((1, p + t), np.int64),
            "position_ids": np.arange(p, p + t, dtype=np.int64)[None]}
    feed.update(zip(names, past, strict=True))
    return feed


def _run(sess, ids: np.ndarray, past: list[np.ndarray]):
    names = [i.name for i in sess.get_inputs()][3:]
    outs = sess.run(None, _feed(ids, past, names))
    return outs[0][0], outs[1:]


def _empty_past(info) -> list[np.ndarray]:
    from quantprism.exporters.onnx import kv_shape

    n_kv, hd = kv_shape(info.config)
    return [np.zeros((1, n_kv, 0, hd), np.float32) for _ in range(2 * info.n_layers)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fp_export_matches_transformers_and_decodes_incrementally(tiny_models, tmp_path, arch):
    from quantprism.exporters.onnx import LAYOUT_FILE, MODEL_FILE, export_onnx

    info = load_model_info(tiny_models[arch])
    out = export_onnx(None, info, None, tmp_path / "fp")
    layout = json.loads((out / LAYOUT_FILE).read_text())
    assert layout["files"] == [MODEL_FILE] and (out / "tokenizer.json").is_file()
    sess = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == layout["outputs"]
    ids = np.random.default_rng(0).integers(2, info.config["vocab_size"], (1, 24))
    with torch.no_grad():
        ref = load_torch_model(info)(torch.from_numpy(ids)).logits[0].numpy()
    once, _ = _run(sess, ids, _empty_past(info))
    assert np.abs(once - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    rows, past = [], _empty_past(info)
    for a, b in ((0, 13), (13, 14), (14, 15), (15, 24)):  # prefill, two single-token steps, a chunk
        lg, past = _run(sess, ids[:, a:b], past)
        rows.append(lg)
    assert np.abs(np.concatenate(rows) - once).max() < 1e-5 * max(1.0, np.abs(once).max())
    model = onnx.load(str(out / MODEL_FILE))
    names = {i.name for i in model.graph.initializer}
    if arch == "qwen2":  # biases kept; tied head and embedding stored once
        assert "model.layers.0.self_attn.q_proj.bias" in names
        assert sum(n in names for n in ("lm_head.weight", "model.embed_tokens.weight")) == 1


@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    return bundled_canonical(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["nbits8", "nbits4", "w8a8"])
def test_quantized_initializers_are_the_canonical_weights(canonical, tmp_path, scheme):
    """Every decoder linear is an integer kernel whose initializers decode (spec oracle) to exactly the canonical
    dequantized weights; every other tensor is the canonical fp tensor (SmoothQuant-scaled norms included)."""
    from onnx import numpy_helper

    from quantprism.exporters.onnx import LAYOUT_FILE, MODEL_FILE, export_onnx

    info, results = canonical
    target, res = results[scheme]
    out = export_onnx(target, info, res, tmp_path / scheme)
    model = onnx.load(str(out / MODEL_FILE))
    layout = json.loads((out / LAYOUT_FILE).read_text())
    weights = kernel_weights(model)
    assert len(weights) == 7 * info.n_layers == len(layout["grids"])
    for node, (op, w) in weights.items():
        mod = node.split("/")[0]
        assert op == layout["kernels"][mod]
        assert np.array_equal(w, res.quant[mod][layout["grids"][mod]].dequantize()), mod
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not any(f"{m}.weight" in inits for m in layout["grids"])  # no fp copy left behind
    fp = [n for n in res.fp if n in inits]
    for name in fp:
        assert np.array_equal(inits[name], res.fp[name].numpy()), name
    head = load_torch_model(info).lm_head.weight.detach().numpy()
    assert np.array_equal(inits["lm_head.weight.T"], head.T)  # the head stays fp
    if scheme == "w8a8":  # SmoothQuant folded its scales into the norms: those are the ones the graph holds
        assert sum("layernorm" in n for n in fp) == 2 * info.n_layers


def test_export_is_deterministic_atomic_and_external_data_loads(tiny_models, tmp_path):
    from quantprism.exporters.onnx import DATA_FILE, MODEL_FILE, export_onnx

    info = load_model_info(tiny_models["llama"])
    a = export_onnx(None, info, None, tmp_path / "a")
    b = export_onnx(None, info, None, tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = export_onnx(None, info, None, tmp_path / "a", external_data=True)  # replaces a, atomically
    assert (c / DATA_FILE).stat().st_size > 0.9 * (b / MODEL_FILE).stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    sess = ort.InferenceSession(str(c / MODEL_FILE), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(b / MODEL_FILE), providers=["CPUExecutionProvider"])
    ids = np.arange(2, 12)[None]
    assert np.array_equal(_run(sess, ids, _empty_past(info))[0], _run(ref, ids, _empty_past(info))[0])


def test_missing_grid_is_one_error_and_writes_nothing(tiny_models, tmp_path):
    from quantprism.exporters.onnx import export_onnx
    from quantprism.quantize.stage import CanonicalModel, Recipe

    info = load_model_info(tiny_models["llama"])
    target = onnx_targets()[0]
    res = CanonicalModel(Recipe(grids=("int4_g32_sym_fp32",)), quant={"model.layers.0.self_attn.q_proj": {}})
    with pytest.raises(ArtifactError, match="no grid int8_g32_sym_fp32 for model.layers.0.self_attn.q_proj"):
        export_onnx(target, info, res, tmp_path / "x")
    assert not (tmp_path / "x").exists()
