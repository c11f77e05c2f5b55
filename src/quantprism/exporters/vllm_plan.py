"""Which grid each decoder linear is exported with for vLLM: the main grid, the protection grid, or fp.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` and refuses (ValueError) a fused
layer whose shards have different schemes. So protecting one shard protects its whole fused group:
the exported set can be larger than the plan's (recorded as ``protected`` beside ``requested``).

Protected modules go to the plan's higher grid (int8) only where the format and the hardware can
run it: GPTQ "+:" bits=8 and compressed-tensors 8-bit groups load on GPUs only (vLLM 0.32 CPU has
4-bit WNA16 kernels only), and AWQ is 4-bit only. Everywhere else a protected module stays fp
(GPTQ "-:", AWQ modules_to_not_convert, CT ignore) — more bits than the plan asked for, never fewer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import Target
from ..errors import ArtifactError
from ..model.archs import LLAMA_LINEARS, PHI3_LINEARS
from .grids import grid_needs

FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
SHARD_TO_FUSED = {s: f for f, shards in FUSED.items() for s in shards}
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# every decoder linear name, in model order: the Llama family's shards, then checkpoints fused already (Phi-3)
LINEAR_ORDER = LLAMA_LINEARS + tuple(x for x in PHI3_LINEARS if x not in LLAMA_LINEARS)


def _split(module: str) -> tuple[int, str]:
    m = _MODULE.match(module)
    if not m or m.group(2) not in LINEAR_ORDER:
        raise ArtifactError(f"{module} is not a decoder linear (model.layers.N.<proj>)")
    return int(m.group(1)), m.group(2)


def model_order(module: str) -> tuple[int, int]:
    i, suffix = _split(module)
    return i, LINEAR_ORDER.index(suffix)


def vllm_prefix(module: str) -> str:
    """The name vLLM gives the layer that holds ``module`` (fused qkv_proj / gate_up_proj)."""
    i, suffix = _split(module)
    return f"model.layers.{i}.{SHARD_TO_FUSED.get(suffix, suffix)}"


def fused_group(module: str) -> list[str]:
    """Every HF module vLLM loads into the same layer as ``module`` (itself when unfused)."""
    i, suffix = _split(module)
    fused = SHARD_TO_FUSED.get(suffix)
    return [f"model.layers.{i}.{s}" for s in FUSED[fused]] if fused else [module]


def can_run_8bit(target: Target) -> bool:
    """8-bit weight-only layers load in vLLM 0.32 on GPUs only; the hardware label says which."""
    return target.hardware.lower().startswith("gpu")


@dataclass(frozen=True)
class ModulePlan:
    main: str
    grids: dict[str, str | None]  # every decoder linear → grid id; None = kept fp
    requested: tuple[str, ...] = ()  # the plan's protected modules
    protected: tuple[str, ...] = ()  # after fused-group expansion, in model order
    protected_grid: str | None = None  # grid of the protected modules; None = fp

    @property
    def fp_modules(self) -> list[str]:
        return [m for m, g in self.grids.items() if g is None]

    @property
    def high_modules(self) -> list[str]:
        """Modules on a quantized grid other than the main one (the plan's 8-bit protection)."""
        return [m for m, g in self.grids.items() if g is not None and g != self.main]

    def prefixes(self, modules: tuple[str, ...] | list[str]) -> list[str]:
        """vLLM layer names of ``modules``, each once, in model order."""
        return list(dict.fromkeys(vllm_prefix(m) for m in modules))

    def record(self) -> dict:
        return {"grid": self.main, "protected_grid": self.protected_grid, "requested": list(self.requested),
                "protected": list(self.protected), "modules": dict(self.grids)}


def module_plan(target: Target, canonical, plan: dict | None = None) -> ModulePlan:
    """Map the canonical result and the target's mixed-precision plan onto what the checkpoint holds."""
    main = grid_needs(target).grids[0]
    modules = sorted((m for m in canonical.quant if m.startswith("model.layers.")), key=model_order)
    if not modules:
        raise ArtifactError("canonical result has no decoder linears; re-run quantize for this target")
    for m in modules:
        if main not in canonical.quant[m]:
            raise ArtifactError(f"canonical result has no grid {main} for {m}; re-run quantize for target {target.name}")
    requested = tuple((plan or {}).get("protected", []))
    unknown = [m for m in requested if m not in canonical.quant]
    if unknown:
        raise ArtifactError(f"plan protects {unknown[0]}, which the canonical result does not have; re-plan")
    expanded = {g for m in requested for g in fused_group(m)}
    protected = tuple(m for m in modules if m in expanded)
    high = (plan or {}).get("high_grid")
    pgrid = None
    if protected and high and high != main and _holds_high(target) and can_run_8bit(target):
        pgrid = high
        missing = [m for m in protected if high not in canonical.quant[m]]
        if missing:
            raise ArtifactError(f"canonical result has no grid {high} for {missing[0]}; re-run quantize with the plan")
    elif protected and high == main:
        pgrid = main  # the main grid is already the top one (8-bit): nothing to change
    grids = {m: (pgrid if m in expanded else main) for m in modules}
    return ModulePlan(main, grids, requested, protected, pgrid)


def _holds_high(target: Target) -> bool:
    """Formats that can hold an 8-bit layer beside 4-bit ones: GPTQ ("+:" bits 8) and CT W4A16 (a second group)."""
    return target.format == "gptq" or (target.format == "compressed-tensors" and target.quant == "W4A16")
