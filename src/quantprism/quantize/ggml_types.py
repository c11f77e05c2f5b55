"""GGML tensor types: the block facts every k-quant encoder, packer, config rule and the mixed-precision planner
read (shared/reference/gguf-kquants.md §1), in one place. ``bits`` is bytes per block · 8 / elements per block."""
from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # elements in a k-quant super-block


@dataclass(frozen=True)
class GGMLType:
    name: str
    ggml_id: int  # enum ggml_type
    block: int  # elements per block (the row length must be a multiple of it)
    type_size: int  # bytes per block

    @property
    def bits(self) -> float:
        return 8 * self.type_size / self.block


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4),
    GGMLType("F16", 1, 1, 2),
    GGMLType("Q4_0", 2, 32, 18),
    GGMLType("Q4_1", 3, 32, 20),
    GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24),
    GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q4_K", 12, QK_K, 144),
    GGMLType("Q5_K", 13, QK_K, 176),
    GGMLType("Q6_K", 14, QK_K, 210),
    GGMLType("IQ4_NL", 20, 32, 18),
    GGMLType("IQ4_XS", 23, QK_K, 136),
)}
