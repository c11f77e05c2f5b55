"""Our INT8/INT4 ONNX against ONNX Runtime's own quantizers and onnxruntime-genai's int4, each at its best here.

    python benchmarks/onnx_vs_ort.py --out benchmarks/results/onnx_vs_ort.json \
        [--model DIR] [--calibration FILE] [--eval-text FILE] [--synthetic]

Every row is built from ``--model``: ours and every ORT quantizer start from the SAME fp32 graph (our dynamo
export of that model); onnxruntime-genai's builder reads the model directory. lm_head (and the embedding) stay
fp32 everywhere, all MatMulNBits nodes run accuracy_level 4 (as ours), one block size (``--block``, default 32) = our group
size. On a model whose weights carry Q4_1 rounding (the real model of benchmarks/real_model.py) 4-bit asym at block 32
recovers that grid (HQQ's float zero points do so exactly) and proves nothing: compare there at ``--block 64``.

- ours: the canonical GPTQ codes in MatMulNBits 8-bit / 4-bit.
- ort_dynamic: quantize_dynamic (W8A8 MatMulInteger, dynamic per-tensor uint8 activations), per-channel weights, in a
  weight type that does not saturate on this CPU: without VNNI, ORT's u8s8 int8 GEMM adds u8×s8 pairs in a saturating
  int16, so the candidates are QUInt8 weights (u8u8 kernel, exact) or QInt8 with reduce_range (7-bit, no overflow);
  with VNNI, full-range QInt8 joins them.
- ort_nbits8_rtn / ort_nbits8_hqq: MatMulNBitsQuantizer 8-bit, its default RTN (sym or asym) / HQQ.
- ort_nbits4_rtn / _kquant / _hqq / _gptq: MatMulNBitsQuantizer 4-bit with ORT's algorithms: default RTN (sym/asym),
  k_quant, HQQ, and ORT's GPTQ fed our calibration windows (asym, ± mse scale search). ``ort_gptq_check`` records
  a direct test of ORT's GPTQ routine against its RTN on a random layer (in onnxruntime 1.32 its error feedback reads
  the upper Cholesky factor by column, i.e. zeros, so it returns the RTN result).
- genai_int4: onnxruntime-genai's builder -p int4 (its own fused graph), lm_head excluded
  (nodes_to_exclude=/lm_head/MatMul, shared_embeddings=false), algo_config default (sym/asym) or k_quant.

Every candidate setting is scored on the DEV split (calibration-text windows not used for calibration, disjoint
from the eval text); each row reports its best setting there, and the "best ORT" of each bit width is the row with
the lowest dev KLD. Only chosen settings are scored on the eval text (KLD/top-1 vs the torch original,
llama-perplexity definitions) and timed (decode tok/s through our ORT adapter). Built artifacts are cached under
--work in folders named by a hash of their inputs (model / graph sha256, settings, calibration, tool versions).
``--synthetic`` adds decode speed on a ~1B random-weight Llama (ours there = canonical RTN codes from 2×64
calibration tokens: speed does not depend on code values; ORT rows use the settings chosen on the main model).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dev_split, quality_parser, settings_key, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("onnxruntime", "onnxruntime-genai", "onnx", "torch", "transformers")


def machine_dynamic_candidates() -> tuple[list[dict], dict]:
    """quantize_dynamic settings that do not saturate on this CPU, and the rule that picked them."""
    from quantprism.hardware import detect

    m = detect()
    cands = [{"weight_type": "QUInt8", "per_channel": True, "reduce_range": False},
             {"weight_type": "QInt8", "per_channel": True, "reduce_range": True}]
    if not m.int8_pairs_saturate:
        cands.append({"weight_type": "QInt8", "per_channel": True, "reduce_range": False})
    rule = {"cpu": m.cpu, "isa": list(m.isa), "kind": m.kind, "int8_pairs_saturate": m.int8_pairs_saturate,
            "rule": ("no VNNI: ORT's u8s8 int8 GEMM sums u8×s8 pairs in a saturating int16 (255·127·2 > 32767), so "
                     "full-range QInt8 weights are excluded; QUInt8 weights (u8u8 kernel) and QInt8 reduce_range "
                     "(|w| ≤ 64) cannot saturate") if m.int8_pairs_saturate else
                    "VNNI: int8 products accumulate in int32, full-range QInt8 is exact and a candidate"}
    return cands, rule


def families(dyn: list[dict]) -> dict[str, list[dict]]:
    """Row name → candidate settings (first = ORT's default where it has one)."""
    nb = lambda algo, bits, **kw: {"kind": "nbits", "algo": algo, "bits": bits, **kw}  # noqa: E731
    return {
        "ort_dynamic": [{"kind": "dynamic", **d} for d in dyn],
        "ort_nbits8_rtn": [nb("default", 8, sym=True), nb("default", 8, sym=False)],
        "ort_nbits8_hqq": [nb("hqq", 8)],
        "ort_nbits4_rtn": [nb("default", 4, sym=True), nb("default", 4, sym=False)],
        "ort_nbits4_kquant": [nb("k_quant", 4)],
        "ort_nbits4_hqq": [nb("hqq", 4)],
        # sym and act-order dropped after a dev-split trial on a tiny Qwen2 (dev KLD sym 4.0e-3, sym+actorder 4.3e-3 vs
        # asym 1.46e-3): each GPTQ candidate costs ~3 min of Hessian collection here
        "ort_nbits4_gptq": [nb("gptq", 4, sym=False, mse=False, actorder=False), nb("gptq", 4, sym=False, mse=True, actorder=False)],
        "genai_int4": [{"kind": "genai", "algo_config": "default", "is_symmetric": True},
                       {"kind": "genai", "algo_config": "default", "is_symmetric": False},
                       {"kind": "genai", "algo_config": "k_quant", "is_symmetric": True}],
    }


def with_block(fams: dict[str, list[dict]], block: int) -> dict[str, list[dict]]:
    """Every weight-only candidate at ``block`` (dynamic int8 is per channel and has none)."""
    return {f: [c if c["kind"] == "dynamic" else {**c, "block": block} for c in cands] for f, cands in fams.items()}


INT8_ROWS = ("ort_dynamic", "ort_nbits8_rtn", "ort_nbits8_hqq")
INT4_ROWS = ("ort_nbits4_rtn", "ort_nbits4_kquant", "ort_nbits4_hqq", "ort_nbits4_gptq", "genai_int4")


def file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
    return h.hexdigest()


def graph_sha256(model_onnx: Path) -> str:
    """Content hash of a graph folder's model.onnx (+ external data)."""
    return hashlib.sha256("".join(file_sha256(f) for f in sorted(model_onnx.parent.glob("model.onnx*"))).encode()).hexdigest()


def code_sha256() -> str:
    """The quantprism code an exported graph depends on (exporters + canonical stage): part of cache keys."""
    src = ROOT / "src" / "quantprism"
    files = sorted([*(src / "exporters").glob("*.py"), *(src / "quantize").glob("*.py"), src / "model" / "loader.py"])
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


def cached(folder: Path, build) -> Path:
    """``folder``/model.onnx, built by ``build(tmp)`` into a temp folder then renamed (never half-written)."""
    if (folder / "model.onnx").is_file() and (folder / ".complete").is_file():
        return folder / "model.onnx"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("")
    tmp.rename(folder)
    return folder / "model.onnx"


def _set_accuracy_level(model, level: int = 4) -> None:
    """Every MatMulNBits node at ``level`` (HQQ's quantizer writes none, i.e. level 0)."""
    import onnx

    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            for a in list(n.attribute):
                if a.name == "accuracy_level":
                    n.attribute.remove(a)
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


class _Reader:
    """Calibration windows as fp32-graph feeds (empty past), for ORT's GPTQ."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __iter__(self):
        return self

    def __next__(self):
        r = self.get_next()
        if r is None:
            raise StopIteration
        return r


def gptq_feeds(fp32: Path, calib_ids) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    feeds = []
    for row in calib_ids:
        t = len(row)
        f = {}
        for i in sess.get_inputs():
            if i.name == "input_ids":
                f[i.name] = np.asarray(row, np.int64)[None]
            elif i.name == "attention_mask":
                f[i.name] = np.ones((1, t), np.int64)
            elif i.name == "position_ids":
                f[i.name] = np.arange(t, dtype=np.int64)[None]
            else:
                kv = int(meta.get("quantprism.num_kv_heads", i.shape[1]))
                hd = int(meta.get("quantprism.head_dim", i.shape[3]))
                f[i.name] = np.zeros((1, kv, 0, hd), np.float32)
        feeds.append(f)
    return feeds


def ort_quantize(fp32: Path, out_dir: Path, spec: dict, calib_ids=None) -> None:
    """ORT's own quantizers on our fp32 graph (lm_head excluded, as in ours) → ``out_dir``/model.onnx."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for f in fp32.parent.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            shutil.copy(f, out_dir / f.name)
    model = onnx.load(str(fp32))
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i.startswith("lm_head") for i in n.input)]
    large = sum(i.ByteSize() for i in model.graph.initializer) > 1.8e9
    if spec["kind"] == "dynamic":
        del model
        quantize_dynamic(str(fp32), str(out_dir / "model.onnx"), weight_type=getattr(QuantType, spec["weight_type"]),
                         per_channel=spec["per_channel"], reduce_range=spec["reduce_range"], op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=head, use_external_data_format=large)
        return
    bits, algo, block = spec["bits"], spec["algo"], spec["block"]
    if algo == "default":
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=spec["sym"], accuracy_level=4, bits=bits)
    elif algo == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif algo == "k_quant":
        cfg = KQuantWeightOnlyQuantConfig()  # its block is the quantizer's block_size below
    elif algo == "gptq":
        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(gptq_feeds(fp32, calib_ids)), percdamp=0.01,
                                        block_size=128, actorder=spec["actorder"], mse=spec["mse"], perchannel=True)
    else:
        raise ValueError(algo)

    class Quantizer(MatMulNBitsQuantizer):
        def _generate_q4_node_config(self):  # the RTN/k_quant/GPTQ path: excluded nodes stay fp32 for GPTQ too
            cfg = super()._generate_q4_node_config()
            cfg.update({n: "fp32" for n in self.nodes_to_exclude})
            return cfg

    q = Quantizer(model, bits=bits, block_size=block, is_symmetric=spec.get("sym", False), accuracy_level=4,
                  nodes_to_exclude=head, algo_config=cfg)
    q.process()
    out = q.model.model if hasattr(q.model, "model") else q.model
    _set_accuracy_level(out, 4)
    if any(n.op_type == "MatMulNBits" and n.name in head for n in out.graph.node):
        raise RuntimeError("lm_head was quantized")
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(out).save_model_to_file(str(out_dir / "model.onnx"), use_external_data_format=large)


def genai_int4(model_dir: Path, out_dir: Path, spec: dict) -> None:
    opts = ["nodes_to_exclude=/lm_head/MatMul", "shared_embeddings=false", "accuracy_level=4", f"block_size={spec['block']}",
            f"algo_config={spec['algo_config']}", f"is_symmetric={str(spec['is_symmetric']).lower()}"]
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
                        "-p", "int4", "-e", "cpu", "-c", str(out_dir / ".cache"), "--extra_options", *opts],
                       capture_output=True, text=True)
    if r.returncode != 0 or not (out_dir / "model.onnx").is_file():
        raise RuntimeError(f"genai builder failed: {(r.stderr or r.stdout).strip()[-800:]}")
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    import onnx

    m = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
    quantized_head = [n.name for n in m.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
                      and ("lm_head" in n.name or "embed" in n.name)]
    if quantized_head:
        raise RuntimeError(f"genai builder quantized {quantized_head} despite the exclusion")
    (out_dir / "genai_options.json").write_text(json.dumps(opts))


def ort_gptq_check() -> dict:
    """ORT's own GPTQ routine vs its RTN on one random layer with a correlated Hessian: Hessian-weighted output error."""
    import numpy as np
    from onnxruntime.quantization.neural_compressor.weight_only import gptq, quant_tensor

    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(2048, k)) @ rng.normal(size=(k, k))
    h = 2 * x.T @ x / len(x)
    q = gptq(w.copy(), h.copy(), num_bits=4, group_size=32, scheme="asym", blocksize=128)
    codes, scale, zp = quant_tensor(w.T.copy(), 4, 32, "asym", "uint")
    r = ((codes - zp) * scale).reshape(n, k).T
    err = lambda a: float(np.trace((a - w).T @ h @ (a - w)))  # noqa: E731
    return {"what": "weight.shape (256, 64), 4-bit asym g32, H = 2XᵀX/n of correlated X; error = tr((Q-W)ᵀH(Q-W))",
            "gptq_error": err(q), "rtn_error": err(r), "gptq_over_rtn": err(q) / err(r),
            "max_abs_diff_gptq_vs_rtn": float(np.abs(q - r).max())}


def speed(path: Path, prompt: list[int], threads: int) -> dict:
    from quantprism.runtimes.latency import measure
    from quantprism.runtimes.onnxruntime import open_session

    s = open_session(path, threads=threads)
    try:
        r = measure(s, prompt, 32, 5)
    finally:
        s.close()
    return {k: r[k] for k in ("decode_tok_s_p50", "decode_tok_s_p95", "ttft_ms_p50", "prefill_tok_s")}


def main() -> None:
    ap = quality_parser(__doc__.split("\n")[0])
    ap.set_defaults(eval_chunks=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="gptq", help="canonical method for ours (gptq | smoothquant+gptq …)")
    ap.add_argument("--synthetic", action="store_true", help="also decode speed on a synthetic ~1B Llama")
    ap.add_argument("--ours-settings", default=[{"symmetric": True}], type=json.loads,
                    help="JSON list of Target settings tried for ours (e.g. symmetric, method, smoothquant_alpha, tune); the best on dev is "
                         "reported per bit width, as for every ORT row")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "onnx")
    ap.add_argument("--block", type=int, default=32, choices=(16, 32, 64, 128), help="MatMulNBits block = our group size")
    ap.add_argument("--skip-rows", default=[], type=lambda s: [x for x in s.split(",") if x],
                    help="ORT rows not built (comma list, e.g. ort_nbits4_gptq: = its RTN, see ort_gptq_check); recorded")
    ap.add_argument("--ort-quantize", nargs=3, metavar=("SPEC", "FP32", "OUT"), help=argparse.SUPPRESS)
    if "--ort-quantize" in sys.argv:  # child mode: one ORT quantizer in its own process (memory is its own)
        i = sys.argv.index("--ort-quantize")
        ort_quantize(Path(sys.argv[i + 2]), Path(sys.argv[i + 3]), json.loads(sys.argv[i + 1]))
        return
    args = ap.parse_args()

    import numpy as np
    import torch

    from quantprism.calibration import eval_text_path
    from quantprism.config import Target
    from quantprism.evaluate.compare import base_logprobs, compare, eval_token_chunks, torch_logits_fn
    from quantprism.exporters.onnx import export_onnx
    from quantprism.model import load_model_info, load_tokenizer, load_torch_model
    from quantprism.pipeline import plan_recipes, run_stage
    from quantprism.runtimes.onnxruntime import open_session

    torch.set_num_threads(args.threads)
    t_all = time.time()
    info = load_model_info(args.model)
    vers = versions(*VERSIONS)
    tok = load_tokenizer(info)
    vocab = int(info.config.get("vocab_size"))
    ours_settings = args.ours_settings
    targets = {(bits, i): Target(name=f"ours{bits[-1]}-{i}", format="onnx", runtime="onnxruntime", quant=bits,
                                 group_size=args.block, **{"method": args.method, **st})
               for bits in ("nbits4", "nbits8") for i, st in enumerate(ours_settings)}  # 4-bit first: the chain's
    # first recipe is the one that tunes on quantized inputs
    recipes, index = plan_recipes(list(targets.values()))
    run = run_stage(info, recipes, args.calibration, args.samples, args.seq_len, 0)
    calib = run.calibration
    dev, dev_rec = dev_split(tok, calib, args.calibration, 0, args.dev_chunks, args.dev_text)
    w = args.work
    msha = info.weights_sha256
    # fp32 graph and ours: rebuilt every run (seconds on small models), in folders named by the model
    paths = {"fp32": export_onnx(None, info, None, w / f"fp32-{msha[:16]}") / "model.onnx"}
    for (bits, i), t in targets.items():
        dest = w / f"ours-{bits}-{args.method}-{i}-{msha[:16]}"
        shutil.rmtree(dest, ignore_errors=True)
        paths[f"ours_{bits}@{i}"] = export_onnx(t, info, run.results[index[t.name]], dest) / "model.onnx"
    gsha = graph_sha256(paths["fp32"])

    dyn, dyn_rule = machine_dynamic_candidates()
    fams = with_block(families(dyn), args.block)
    skipped = {f: "skipped by --skip-rows" for f in args.skip_rows}
    fams = {f: c for f, c in fams.items() if f not in skipped}

    def artifact(spec: dict) -> Path:
        if spec["kind"] == "genai":
            key = settings_key(model_sha256=msha, spec=spec, genai=vers["onnxruntime-genai"], ort=vers["onnxruntime"])
            return cached(w / f"genai-int4-{msha[:12]}-{key}", lambda d: genai_int4(info.path, d, spec))
        extra = {"calibration_sha256": calib.sha256} if spec.get("algo") == "gptq" else {}
        key = settings_key(graph_sha256=gsha, spec=spec, ort=vers["onnxruntime"], **extra)
        name = f"ort-{spec['kind']}-{spec.get('algo', spec.get('weight_type'))}{spec.get('bits', '')}"
        return cached(w / f"{name}-{msha[:12]}-{key}", lambda d: ort_quantize(paths["fp32"], d, spec, calib.input_ids))

    eval_chunks = eval_token_chunks(tok, eval_text_path(args.eval_text), 512, args.eval_chunks)
    model = load_torch_model(info)
    base = base_logprobs(eval_chunks, torch_logits_fn(model))
    dev_base = base_logprobs(dev, torch_logits_fn(model))
    del model
    prompt = [int(i) for i in eval_chunks[0][:128]]

    def score(p: Path, chunks, b) -> dict:
        s = open_session(p, threads=args.threads)
        try:
            v = s.logits(chunks[0][:8]).shape[-1]
            if v != vocab:
                raise RuntimeError(f"{p}: graph has vocab {v}, model {info.path} has {vocab}: stale artifact?")
            q, _ = compare(chunks, b, s.logits)
        finally:
            s.close()
        return q

    def full_row(p: Path) -> dict:
        q = score(p, eval_chunks, base)
        return {"kld": q["kld_mean"], "kld_p99": q["kld_p99"], "top1": q["top1_agreement"], "ppl_ratio": q["ppl_ratio"],
                "bytes": sum(f.stat().st_size for f in p.parent.glob("model.onnx*")), "artifact": str(p.parent),
                "eval_tokens": int(q["n_tokens"]), **speed(p, prompt, args.threads)}

    rows: dict = {}
    for bits in ("nbits8", "nbits4"):  # ours, like every ORT row: the setting with the lowest dev KLD
        dev_of = {i: score(paths[f"ours_{bits}@{i}"], dev, dev_base)["kld_mean"] for i in range(len(ours_settings))}
        pick = min(dev_of, key=dev_of.get)
        paths[f"ours_{bits}"] = paths[f"ours_{bits}@{pick}"]
        rows[f"ours_{bits}"] = {"settings": ours_settings[pick], "why": f"lowest dev KLD of {len(dev_of)} setting(s)",
                                "dev_kld": dev_of[pick],
                                "candidates": {json.dumps(ours_settings[i], sort_keys=True): {"dev_kld": d}
                                               for i, d in dev_of.items()}}
    for name in ("fp32", "ours_nbits8", "ours_nbits4"):
        rows[name] = dict(rows.get(name, {}), **full_row(paths[name]))
        if "dev_kld" not in rows[name]:  # ours' was scored when its setting was chosen
            rows[name]["dev_kld"] = score(paths[name], dev, dev_base)["kld_mean"]
        print(f"{name:18s} KLD {rows[name]['kld']:.3g} top-1 {rows[name]['top1']:.4f} decode {rows[name]['decode_tok_s_p50']:.1f} tok/s",
              flush=True)
    chosen_specs = {}
    rows.update({f: {"skipped": why} for f, why in skipped.items()})
    for fam, cands in fams.items():
        tried = {}
        for spec in cands:
            label = json.dumps({k: v for k, v in spec.items() if k != "kind"}, sort_keys=True)
            t0 = time.time()
            try:
                p = artifact(spec)
                tried[label] = {"spec": spec, "path": p, "dev_kld": score(p, dev, dev_base)["kld_mean"],
                                "build_or_cache_s": round(time.time() - t0, 1)}
            except Exception as e:  # a candidate ORT cannot build/run is recorded, not fatal
                tried[label] = {"spec": spec, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  {fam:18s} {label}: {tried[label].get('dev_kld', tried[label].get('error'))}", flush=True)
        ok = {k: v for k, v in tried.items() if "dev_kld" in v}
        cand_rec = {k: ({"dev_kld": v["dev_kld"]} if "dev_kld" in v else {"error": v["error"]}) for k, v in tried.items()}
        if not ok:
            rows[fam] = {"error": "no candidate built", "candidates": cand_rec}
            continue
        pick = min(ok, key=lambda k: ok[k]["dev_kld"])
        chosen_specs[fam] = ok[pick]["spec"]
        rows[fam] = {"settings": ok[pick]["spec"], "why": f"lowest dev KLD of {len(ok)} setting(s)", "dev_kld": ok[pick]["dev_kld"],
                     "candidates": cand_rec, **full_row(ok[pick]["path"])}
        print(f"{fam:18s} KLD {rows[fam]['kld']:.3g} top-1 {rows[fam]['top1']:.4f} decode {rows[fam]['decode_tok_s_p50']:.1f} tok/s "
              f"[{pick}]", flush=True)
    rows.setdefault("ort_dynamic", {})["weight_type_rule"] = dyn_rule

    def best_of(names) -> str | None:
        ok = [n for n in names if "dev_kld" in rows.get(n, {})]
        return min(ok, key=lambda n: rows[n]["dev_kld"]) if ok else None

    r = rows
    b8, b4 = best_of(INT8_ROWS), best_of(INT4_ROWS)
    out = {
        "model": str(info.path), "model_sha256": msha, "vocab": vocab, "method": args.method, "calibration": calib.record(),
        "dev_split": dev_rec, "eval_tokens_scored": r["ours_nbits8"]["eval_tokens"], "threads": args.threads,
        "block": args.block,
        "versions": vers, "machine": {k: dyn_rule[k] for k in ("cpu", "isa", "kind", "int8_pairs_saturate")},
        "selection_rule": "each ORT row = its setting with the lowest dev KLD; best ORT per bit width = the row with the lowest "
                          "dev KLD; the eval text is scored only for chosen settings",
        "rows": rows, "ort_gptq_check": ort_gptq_check(),
        "best_ort_int8": {"row": b8, "settings": b8 and r[b8]["settings"], "kld": b8 and r[b8]["kld"]},
        "best_ort_int4": {"row": b4, "settings": b4 and r[b4]["settings"], "kld": b4 and r[b4]["kld"]},
        "goals": {
            "kld_vs_best_ort": b8 and r["ours_nbits8"]["kld"] / r[b8]["kld"],
            "decode_vs_ort_nbits8": "decode_tok_s_p50" in r["ort_nbits8_rtn"]
            and r["ours_nbits8"]["decode_tok_s_p50"] / r["ort_nbits8_rtn"]["decode_tok_s_p50"],
            "decode_vs_fp32": r["ours_nbits8"]["decode_tok_s_p50"] / r["fp32"]["decode_tok_s_p50"],
        },
        "int4": {"ours_kld": r["ours_nbits4"]["kld"], "best_ort_row": b4, "ours_kld_vs_best_ort": b4 and r["ours_nbits4"]["kld"] / r[b4]["kld"],
                 **{f"{n}_kld": r[n].get("kld") for n in INT4_ROWS},
                 "ours_decode_tok_s": r["ours_nbits4"]["decode_tok_s_p50"],
                 "genai_int4_decode_tok_s": r["genai_int4"].get("decode_tok_s_p50")},
    }
    if args.synthetic:
        out["synthetic_1b"] = synthetic_speed(w, args.threads, chosen_specs)
    out["seconds"] = round(time.time() - t_all, 1)
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]  # the 2 cores were shared: speeds are indicative
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)) + "\n")
    print(json.dumps(out["goals"]), json.dumps(out["int4"]))


def synthetic_hf(work: Path) -> Path:
    """The ~1B random-weight Llama of benchmarks/synthetic.py as an HF folder (built once, bf16)."""
    from quantprism.model import BUILTIN_MODEL

    hf = ROOT / "benchmarks" / ".work" / "latency" / "synthetic-1b"  # shared with benchmarks/gguf_latency.py
    if not (hf / "model.safetensors").is_file() and not (hf / "model.safetensors.index.json").is_file():
        import torch

        from synthetic import build_model

        model = build_model()
        model.config.bos_token_id, model.config.eos_token_id = 0, 1
        model.to(torch.bfloat16).save_pretrained(hf, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(BUILTIN_MODEL / f, hf / f)
    return hf


def synthetic_speed(work: Path, threads: int, chosen: dict) -> dict:
    """Decode tok/s on a ~1B random-weight Llama: fp32, ours nbits8, and ORT's int8 rows with the chosen settings."""
    from quantprism.config import Target
    from quantprism.model import load_model_info
    from quantprism.pipeline import plan_recipes, run_stage

    info = load_model_info(synthetic_hf(work))
    msha, csha = info.weights_sha256, code_sha256()
    t = Target(name="ours8", format="onnx", runtime="onnxruntime", quant="nbits8", group_size=32, method="rtn")
    paths = {"fp32": cached(work / f"syn-fp32-{settings_key(model=msha, code=csha)}",
                            lambda d: _export_into(None, info, None, d))}
    key8 = settings_key(model=msha, code=csha, target="nbits8-g32-rtn", calib="builtin-2x64-seed0")

    def ours8(d: Path) -> None:
        recipes, index = plan_recipes([t])
        run = run_stage(info, recipes, None, 2, 64, 0)
        _export_into(t, info, run.results[index["ours8"]], d)

    paths["ours_nbits8"] = cached(work / f"syn-ours8-{key8}", ours8)
    gsha = graph_sha256(paths["fp32"])
    ort_ver = versions("onnxruntime")["onnxruntime"]
    settings = {}
    for fam in ("ort_dynamic", "ort_nbits8_rtn"):  # each ORT quantizer in its own process: a 4 GB graph, copied inside
        spec = chosen.get(fam)
        if spec is None:
            continue
        settings[fam] = spec
        d = work / f"syn-{fam}-{settings_key(graph_sha256=gsha, spec=spec, ort=ort_ver)}"

        def build(tmp: Path, spec=spec) -> None:
            subprocess.run([sys.executable, __file__, "--out", "-", "--ort-quantize", json.dumps(spec), str(paths["fp32"]), str(tmp)],
                           check=True)

        paths[fam] = cached(d, build)
    prompt = list(range(10, 138))
    out: dict = {"model": str(info.path), "model_sha256": msha, "settings": settings}
    for k, p in paths.items():  # each session in its own process too
        code = (f"import json,sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from onnx_vs_ort import speed; "
                f"from pathlib import Path; print(json.dumps(speed(Path({str(p)!r}), {prompt!r}, {threads})))")
        r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        out[k] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"synthetic-1b {k:16s} decode {out[k]['decode_tok_s_p50']:.2f} tok/s", flush=True)
    return out


def _export_into(target, info, res, d: Path) -> None:
    """export_onnx writes its folder atomically itself; move its files into the cache's temp folder."""
    tmp = d.with_name(d.name + ".export")
    shutil.rmtree(tmp, ignore_errors=True)
    from quantprism.exporters.onnx import export_onnx

    export_onnx(target, info, res, tmp)
    for f in tmp.iterdir():
        shutil.move(str(f), d / f.name)
    tmp.rmdir()


if __name__ == "__main__":
    main()
