"""Model directories: discovery, validation, hashing, loading."""
from .loader import (
    BUILTIN_MODEL,
    SUPPORTED_ARCHS,
    ModelInfo,
    load_model_info,
    load_tokenizer,
    load_torch_model,
    resolve_model_dir,
)

__all__ = [
    "BUILTIN_MODEL", "SUPPORTED_ARCHS", "ModelInfo", "load_model_info", "load_tokenizer",
    "load_torch_model", "resolve_model_dir",
]
