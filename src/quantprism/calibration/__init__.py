"""Calibration sets: local text → hashed token windows."""
from .sources import (
    BUILTIN_CALIBRATION,
    BUILTIN_EVAL,
    CalibrationSet,
    build_calibration,
    eval_text_path,
    read_documents,
)

__all__ = [
    "BUILTIN_CALIBRATION", "BUILTIN_EVAL", "CalibrationSet", "build_calibration", "eval_text_path",
    "read_documents",
]
