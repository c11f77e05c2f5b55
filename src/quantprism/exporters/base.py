"""The format contract: everything about one deployment format lives in one Format object, in its own module.

A Format says which runtimes load it, validates a target's settings and shape rules, declares the grids it
needs from the canonical stage, resolves a target into an ``ExportSpec`` (every tensor's grid object, the
hardware facts), writes the artifact from the canonical model, and recognises an artifact on disk. Adding a
format = one module defining ``FORMAT`` + one line in ``exporters.FORMATS``.

Every exporter reads fp tensors through ``state.canonical_fp_state`` (transformed norms, biases, embeddings)
and the reference a runtime is held against is ``state.canonical_weights(info, canonical, spec.grid_id)``:
the same grids, no packer — so an exporter cannot silently pair transformed codes with original norms.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Target
from ..errors import ConfigError
from ..hardware import int8_pairs_saturate
from ..model import ModelInfo
from ..quantize.grids import Grid, grid_from_id
from .grids import GridNeeds


@dataclass(frozen=True)
class Hardware:
    """What the deployment machine's label promises (quantprism.hardware)."""

    label: str
    int8_pairs_saturate: bool  # AVX2 without VNNI: W8A8 weights in ±63
    gpu: bool

    @classmethod
    def of(cls, lab) -> Hardware:
        """From a resolved label (config.Target.hardware_label)."""
        return cls(lab.name, int8_pairs_saturate(lab), lab.gpu)


@dataclass(frozen=True)
class ExportSpec:
    """A target resolved for its exporter: no ``config.Target``, no grid ids to parse."""

    name: str
    format: str
    scheme: str
    method: str
    quant: str | None
    bits: int
    group_size: int
    symmetric: bool
    imatrix: bool
    hardware: Hardware
    grids: dict[str, Grid | None]  # every quantizable module → the grid its tensor is written with (None = fp)
    plan: dict | None = None
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # format-specific resolution (e.g. vLLM's fused-group plan)

    def grid_id(self, module: str) -> str | None:
        """The cache-boundary id of ``module``'s grid (keys of CanonicalModel.quant), or None when kept fp."""
        g = self.grids.get(module)
        return g.id if g is not None else None


class Format:
    """Base of every format. Subclasses set the class attributes and override what their format needs."""

    name: str = ""
    runtimes: tuple[str, ...] = ()
    label: str = ""  # human name for reports and `validate`
    packages: tuple[str, ...] = ()  # distributions recorded in results.json
    quantizes_activations: bool = False  # SmoothQuant is allowed only then

    # -- targets.toml ---------------------------------------------------------------------------------------
    def check(self, where: str, vals: dict[str, Any]) -> None:
        """Refuse settings this format cannot express (ConfigError naming file, table and key)."""

    def acts_quantized(self, vals: dict[str, Any]) -> bool:
        return self.quantizes_activations

    def act_rounding(self, t: Target) -> str:
        """How this format's runtime rounds a linear's inputs (evaluate/runtime_arith.ACT_ROUNDING): what a searched
        SmoothQuant strength is measured against."""
        return "none"

    def bits_group(self, t: Target) -> tuple[int, int]:
        """Weight bits and group size of the target's main grid (group -1 = per channel)."""
        return t.bits, t.group_size

    def shape_problem(self, t: Target, linear_shapes: dict[str, tuple[int, int]]) -> str | None:
        """Why ``t`` cannot be built for a model with these linear weights (out, in), or None."""
        _, gs = self.bits_group(t)
        for name, (_n, k) in linear_shapes.items():
            if name.endswith(("lm_head", "embed_tokens")):
                continue  # kept in high precision
            if gs != -1 and k % gs:
                from ..config import valid_groups

                ok = valid_groups(linear_shapes)
                choices = (f"valid: {', '.join(map(str, ok))}, \"auto\" or -1" if ok else
                           "valid: -1 (per channel); no group of 128/64/32 divides every in_features")
                return f"group_size {gs} does not divide in_features {k} of {name}; {choices}"
        return None

    def shape_notes(self, t: Target, info: ModelInfo) -> str:
        """What the model's shapes change about the artifact (shown by `quantprism inspect`); empty when nothing."""
        return ""

    # -- the canonical stage -----------------------------------------------------------------------------------
    def grid_needs(self, t: Target, info: ModelInfo | None = None) -> GridNeeds:
        """The grids the stage must solve for ``t`` (``info``: the model, where its shapes change the answer)."""
        raise NotImplementedError

    # -- export ------------------------------------------------------------------------------------------------
    def module_grids(self, t: Target, info: ModelInfo, canonical, plan: dict | None) -> dict[str, str | None]:
        """Grid id per canonical module the artifact carries (None = fp). Default: the main grid on every decoder
        linear, the plan's higher grid on protected ones, the head grid (if any) on lm_head."""
        needs = self.grid_needs(t, info)
        protected = set((plan or {}).get("protected", []))
        high = (plan or {}).get("high_grid")
        out: dict[str, str | None] = {}
        for mod in sorted(canonical.quant if canonical is not None else {}):
            if mod == "lm_head":
                out[mod] = needs.head[0] if needs.head else None
            elif mod.startswith("model.layers.") and needs.grids:
                out[mod] = high if mod in protected and high else needs.grids[0]
            else:
                out[mod] = None
        return out

    def spec(self, t: Target, info: ModelInfo, canonical, plan: dict | None = None,
             provenance: dict | None = None) -> ExportSpec:
        from ..errors import ArtifactError

        grids: dict[str, Grid | None] = {}
        for mod, gid in self.module_grids(t, info, canonical, plan).items():
            if gid is not None and (canonical is None or gid not in canonical.quant.get(mod, {})):
                raise ArtifactError(f"canonical result has no grid {gid} for {mod}; re-run quantize for target {t.name}")
            grids[mod] = grid_from_id(gid) if gid is not None else None
        return ExportSpec(name=t.name, format=t.format, scheme=t.scheme, method=t.method, quant=t.quant, bits=t.bits,
                          group_size=t.group_size, symmetric=t.symmetric, imatrix=t.imatrix,
                          hardware=Hardware.of(t.hardware_label), grids=grids, plan=plan, provenance=provenance or {})

    def export(self, spec: ExportSpec, info: ModelInfo, canonical, dest: Path) -> Path:
        """Write the artifact under ``dest`` (atomically); return what the runtime opens."""
        raise NotImplementedError

    # -- artifacts on disk -------------------------------------------------------------------------------------
    def recognize(self, path: Path) -> bool:
        """Is ``path`` an artifact of this format (for `quantprism validate`)?"""
        return False

    def describe(self, path: Path) -> str | None:
        """Structural facts checked before the runtime opens it (raise ArtifactError when damaged)."""
        return None


class Registry(Mapping[str, Any]):
    """name → object, imported on first use from ``module`` (its attribute ``attr``): registering is one line and
    importing the registry imports no runtime or exporter dependency."""

    def __init__(self, attr: str, entries: dict[str, str]):
        self._attr, self._modules, self._loaded = attr, dict(entries), {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._modules:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded[name] = getattr(importlib.import_module(self._modules[name]), self._attr)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def unknown(kind: str, name: str, options: Mapping[str, Any], where: str = "") -> ConfigError:
    import difflib

    near = difflib.get_close_matches(name, list(options), n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (allowed: {', '.join(sorted(options))})"
    return ConfigError(f"{where}unknown {kind} '{name}'{hint}")


Chooser = Callable[[str], "str | None"]
