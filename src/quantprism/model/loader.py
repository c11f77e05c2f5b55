"""Local Hugging Face model directories: safetensors only, read without executing anything.

Shapes and dtypes come from the safetensors headers (no weights loaded); the torch model is only
built when asked for. Pickle checkpoints (.bin/.pt/.pth/.ckpt) are refused, never opened.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .archs import Arch, arch_of

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODEL = ASSETS / "reference-llama"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str


@dataclass
class ModelInfo:
    path: Path
    architecture: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    tokenizer_kind: str
    tied_embeddings: bool
    _sha256: str | None = field(default=None, repr=False)

    @property
    def n_params(self) -> int:
        total = 0
        for t in self.tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def arch(self) -> Arch:
        return arch_of(self.architecture, str(self.path))

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Decoder linears and lm_head as {module name: (out_features, in_features)}."""
        out = {}
        for name, t in self.tensors.items():
            mod = name.removesuffix(".weight")
            if name.endswith(".weight") and (mod.endswith(self.arch.linears) or mod == "lm_head"):
                out[mod] = (t.shape[0], t.shape[1])
        return out

    @property
    def weights_sha256(self) -> str:
        """sha256 over the safetensors files (sorted by name): the model's identity in every cache key."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for f in sorted({t.file for t in self.tensors.values()}):
                h.update(f.encode() + b"\0")
                with open(self.path / f, "rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
            self._sha256 = h.hexdigest()
        return self._sha256


def resolve_model_dir(path: str | Path | None) -> Path:
    if path is None or str(path) in ("", "builtin"):
        return BUILTIN_MODEL
    return Path(path).expanduser()


ST_HEADER_MAX = 100_000_000  # bytes: the safetensors reference implementation's own bound
ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                  "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, checked before anything is allocated from it: its length fits the file
    and a sane bound, every entry has a known dtype, a shape and offsets inside the data section whose byte count
    matches the shape. Any violation is one ModelError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(ST_HEADER_MAX, size - 8):
            raise ModelError(f"{path}: not a safetensors file (header length {n} in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ModelError(f"{path}: corrupt safetensors header; re-export the checkpoint") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header (not a JSON object); re-export the checkpoint")
    data = size - 8 - n
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if isinstance(v, dict) and isinstance(v.get("dtype"), str) and v["dtype"] not in ST_DTYPE_BYTES:
            raise ModelError(f"{path}: tensor {str(name)[:80]!r} has dtype {v['dtype'][:20]!r}, which quantprism does not read")
        ok = (isinstance(v, dict) and v.get("dtype") in ST_DTYPE_BYTES and isinstance(v.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in v["shape"]) and isinstance(v.get("data_offsets"), list)
              and len(v["data_offsets"]) == 2 and all(type(o) is int for o in v["data_offsets"]))
        if not ok:
            raise ModelError(f"{path}: corrupt safetensors header entry {str(name)[:80]!r}; re-export the checkpoint")
        begin, stop = v["data_offsets"]
        if not 0 <= begin <= stop or stop > data:
            raise ModelError(f"{path}: truncated safetensors file ({size} bytes, tensor {str(name)[:80]!r} ends at "
                             f"{8 + n + stop})")
        count = 1
        for d in v["shape"]:
            count *= d
        if count * ST_DTYPE_BYTES[v["dtype"]] != stop - begin:
            raise ModelError(f"{path}: corrupt safetensors header: tensor {str(name)[:80]!r} has {stop - begin} bytes "
                             f"for shape {v['shape']} {v['dtype']}")
    return header


def _check_links(root: Path) -> None:
    """A model folder's files must not be symlinks leading outside it (a pull request could point one at any file
    on the CI machine) unless the user allows it (``--allow-symlinks``, e.g. for a Hugging Face cache snapshot)."""
    import os

    if os.environ.get("QUANTPRISM_ALLOW_SYMLINKS") == "1":
        return
    real = root.resolve()
    for f in sorted(root.iterdir()):
        if f.is_symlink() and not f.resolve().is_relative_to(real):
            raise ModelError(f"{f}: a symlink to {f.resolve()}, outside the model folder; copy the files in, or pass "
                             "--allow-symlinks (e.g. for a Hugging Face cache snapshot)")


def load_model_info(path: str | Path | None = None) -> ModelInfo:
    root = resolve_model_dir(path)
    if not root.exists():
        raise ModelError(f"{root}: no such model directory; pass --model DIR (a local Hugging Face folder)")
    if not root.is_dir():
        raise ModelError(f"{root}: --model must be a directory with config.json and *.safetensors")
    _check_links(root)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{root}: no config.json; pass a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_path}: invalid JSON ({e})") from None
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    spec = arch_of(arch, str(root))

    st_files = sorted(p for p in root.glob("*.safetensors"))
    if not st_files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(
                f"{root}: only pickle checkpoints ({', '.join(pickles[:3])}); quantprism never unpickles — "
                "convert to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise ModelError(f"{root}: no *.safetensors weights found")
    tensors: dict[str, TensorInfo] = {}
    for f in st_files:
        for name, meta in _read_safetensors_header(f).items():
            if name == "__metadata__":
                continue
            tensors[name] = TensorInfo(name, tuple(meta["shape"]), meta["dtype"], f.name)
    if "model.embed_tokens.weight" not in tensors:
        raise ModelError(f"{root}: missing model.embed_tokens.weight; is this a complete {arch} checkpoint?")
    tied = "lm_head.weight" not in tensors
    if tied and not config.get("tie_word_embeddings", False):
        raise ModelError(f"{root}: lm_head.weight is missing and tie_word_embeddings is false; the checkpoint is incomplete")
    n_layers = int(config.get("num_hidden_layers", 0))
    for i in range(n_layers):
        for suf in spec.linears:
            if f"model.layers.{i}.{suf}.weight" not in tensors:
                raise ModelError(f"{root}: missing model.layers.{i}.{suf}.weight; the checkpoint is incomplete")
    return ModelInfo(root, arch, config, tensors, tokenizer_kind(root), tied)


def tokenizer_kind(root: Path) -> str:
    tj = root / "tokenizer.json"
    if tj.is_file():
        try:
            tok = json.loads(tj.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return "invalid tokenizer.json"
        model = (tok.get("model") or {}).get("type", "?")
        pre = tok.get("pre_tokenizer") or {}
        pres = [pre] + list(pre.get("pretokenizers", []))
        if model == "BPE" and any(p.get("type") == "ByteLevel" for p in pres):
            return "byte-level BPE"
        if model == "BPE" and (tok.get("model") or {}).get("byte_fallback"):
            return "SentencePiece-style BPE (byte fallback)"
        return f"{model} (tokenizer.json)"
    if (root / "tokenizer.model").is_file():
        return "SentencePiece"
    return "none"


def load_tokenizer(info: ModelInfo):
    """The model's own HF tokenizer (local files only)."""
    from transformers import AutoTokenizer

    if info.tokenizer_kind == "none":
        raise ModelError(f"{info.path}: no tokenizer files (tokenizer.json or tokenizer.model)")
    return AutoTokenizer.from_pretrained(str(info.path), local_files_only=True)


def load_torch_model(info: ModelInfo, dtype: Any = None):
    """The original model in transformers (float32 by default, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": "eager"} if info.arch.eager_attention else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(info.path), dtype=dtype or torch.float32, local_files_only=True, use_safetensors=True, **extra
    )
    return model.eval()
