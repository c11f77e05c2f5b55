"""Model directories: discovery, validation, hashing, loading."""
from .archs import ARCHS, SUPPORTED_ARCHS, Arch, arch_of
from .loader import (
    BUILTIN_MODEL,
    ModelInfo,
    load_model_info,
    load_tokenizer,
    load_torch_model,
    resolve_model_dir,
)

__all__ = [
    "ARCHS", "BUILTIN_MODEL", "SUPPORTED_ARCHS", "Arch", "arch_of", "ModelInfo", "load_model_info", "load_tokenizer",
    "load_torch_model", "resolve_model_dir",
]
