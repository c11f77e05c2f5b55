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


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ModelError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{path}: corrupt safetensors header; re-export the checkpoint") from None
    size = path.stat().st_size
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return header


def load_model_info(path: str | Path | None = None) -> ModelInfo:
    root = resolve_model_dir(path)
    if not root.exists():
        raise ModelError(f"{root}: no such model directory; pass --model DIR (a local Hugging Face folder)")
    if not root.is_dir():
        raise ModelError(f"{root}: --model must be a directory with config.json and *.safetensors")
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
