"""The canonical stage: one sequential, layer-by-layer calibration pass serving every recipe.

Per decoder layer: (1) one forward of the calibration batch through the layer (fp weights)
collects the input statistics of every linear; (2) each recipe applies its transform to its own
copy of the layer and solves integer codes for all its grids from the same (transformed)
Hessians; (3) in sequential mode the chain recipe's quantized layer is run once more to produce
the next layer's inputs, so later layers calibrate on what deployment will feed them.
Forwards per layer are therefore 2 (sequential) or 1 (fp inputs), whatever the number of
targets. Only one layer's activations are held at a time.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..errors import QuantprismError
from ..model.archs import ARCHS, LLAMA
from .gptq import gptq_quantize
from .grids import IntGrid, QuantizedTensor, grid_from_id
from .stats import attach_collectors
from .transforms import apply_scales, awq_search, foldable, scaled_hessian, smoothquant_scales

TRANSFORMS = ("none", "awq", "smoothquant")


@dataclass(frozen=True)
class Recipe:
    """What one canonical result holds: a transform, a rounding method, and the grids to solve."""

    grids: tuple[str, ...]
    transform: str = "none"
    method: str = "gptq"
    head_grids: tuple[str, ...] = ()
    embed_grids: tuple[str, ...] = ()
    awq_grid: str | None = None
    sq_alpha: float = 0.5
    damp: float = 0.01
    clip: bool = True
    act_order: bool = True  # static groups: columns in decreasing H-diagonal order, groups stay col // size
    sensitivity: bool = False  # also measure per-tensor sensitivity of the main grid (mixed precision)

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise QuantprismError(f"unknown transform {self.transform!r}; use one of {', '.join(TRANSFORMS)}")
        if self.method not in ("gptq", "rtn"):
            raise QuantprismError(f"unknown rounding method {self.method!r}; use gptq or rtn")
        if not 0 < self.damp < 1:
            raise QuantprismError(f"damp {self.damp} must be in (0, 1); 0.01 is typical")
        for g in (*self.grids, *self.head_grids, *self.embed_grids):
            grid_from_id(g)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class CanonicalModel:
    """Transformed fp tensors + {tensor: {grid id: codes}} + statistics + provenance."""

    recipe: Recipe
    fp: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, dict[str, QuantizedTensor]] = field(default_factory=dict)
    imatrix: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class StageSettings:
    recipes: list[Recipe]
    sequential: bool = True
    chain: int = 0
    batch: int = 8
    sample_tokens: int = 4096


def _capture_layer0_inputs(model, input_ids: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering layer 0 and the kwargs the model passes to its layers (mask, RoPE)."""

    class _Stop(Exception):
        pass

    layers = model.model.layers
    hs: list[torch.Tensor] = []
    kws: list[dict] = []

    def hook(_m, args, kwargs):
        hs.append((args[0] if args else kwargs["hidden_states"]).detach().float())
        kws.append({k: v for k, v in kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")})
        raise _Stop

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b0 in range(0, input_ids.shape[0], batch):
            try:
                model.model(input_ids=input_ids[b0 : b0 + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return hs, kws


def _layer_forward(layer, hs: list[torch.Tensor], kws: list[dict], counter: dict) -> list[torch.Tensor]:
    counter["layer_forwards"] = counter.get("layer_forwards", 0) + 1
    out = []
    for h, kw in zip(hs, kws, strict=True):
        r = layer(h, **kw)
        out.append((r[0] if isinstance(r, tuple) else r).detach())
    return out


def fits(gid: str, k: int) -> bool:
    """Whether a grid's blocks tile a row of ``k`` columns (a GGUF target asks for the 32-block fallback type
    where llama.cpp uses one, and the 256-block type only where it fits)."""
    return k % grid_from_id(gid).group_cols(k) == 0


def first_fitting(grids: tuple[str, ...], k: int) -> str | None:
    return next((g for g in grids if fits(g, k)), None)


def _solve(W: torch.Tensor, H: torch.Tensor, imp: torch.Tensor, gid: str, r: Recipe) -> QuantizedTensor:
    grid = grid_from_id(gid)
    if r.method == "rtn":
        return grid.rtn(W, imp, clip=r.clip)
    # k-quant super-blocks are fitted on the error-updated weights (natural order, DESIGN); int grids
    # use static-group act-order, which measured best (benchmarks/canonical_quality.py)
    act_order = r.act_order and isinstance(grid, IntGrid)
    return gptq_quantize(W, H, grid, damp=r.damp, clip=r.clip, act_order=act_order)


class Checkpoint(Protocol):
    """Per-layer progress on disk, so an interrupted pass resumes after its last finished layer."""

    def load(self, recipes: list[Recipe]) -> tuple[int, list[CanonicalModel], list[torch.Tensor]] | None: ...
    def save(self, layer: int, results: list[CanonicalModel], hs: list[torch.Tensor]) -> None: ...


def run_canonical(model, input_ids: np.ndarray | torch.Tensor, settings: StageSettings,
                  progress: Callable[[str, int, int], None] | None = None,
                  counter: dict | None = None, checkpoint: Checkpoint | None = None) -> list[CanonicalModel]:
    """Run the pass over ``model`` (transformers CausalLM, fp32, eval). Returns one result per recipe."""
    t0 = time.time()
    counter = counter if counter is not None else {}
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise QuantprismError("calibration batch is empty; give at least one sample")
    results = [CanonicalModel(r, info={"layers": []}) for r in settings.recipes]
    arch = ARCHS.get(next(iter(getattr(model.config, "architectures", None) or []), type(model).__name__), LLAMA)
    groups = arch.input_groups
    linear_to_group = arch.linear_to_group
    layers = model.model.layers
    n_layers = len(layers)
    start = 0
    with torch.inference_mode():
        hs, kws = _capture_layer0_inputs(model, ids, settings.batch)
        resumed = checkpoint.load(settings.recipes) if checkpoint else None
        if resumed is not None:
            done, results, hs = resumed
            start = done + 1
            counter["resumed_from_layer"] = done  # layers ≤ done are never run again: the stream carries them
        for li in range(start, n_layers):
            layer = layers[li]
            prefix = f"model.layers.{li}"
            stats, handles = attach_collectors(layer, settings.sample_tokens, groups)
            try:
                fp_out = _layer_forward(layer, hs, kws, counter)
            finally:
                for h in handles:
                    h.remove()
            chain_layer = None
            for ri, (r, res) in enumerate(zip(settings.recipes, results, strict=True)):
                work = copy.deepcopy(layer) if r.transform != "none" else layer
                scales: dict[str, torch.Tensor] = {}
                linfo: dict = {"layer": li}
                if r.transform != "none":
                    for group, st in stats.items():
                        if not foldable(work, group, arch):
                            continue
                        if r.transform == "awq":
                            k = work.get_submodule(groups[group][0]).weight.shape[1]
                            fit_ids = ((r.awq_grid,) if r.awq_grid else ()) + r.grids
                            agrid = grid_from_id(first_fitting(fit_ids, k) or fit_ids[0])
                            solver = None
                            if r.method == "gptq":
                                def solver(w, H, agrid=agrid, r=r):
                                    return torch.from_numpy(_solve(w, H, None, agrid.id, r).dequantize())
                            s, ai = awq_search(work, group, st, agrid, n_grid=10 if solver else 20, solver=solver,
                                               arch=arch)
                            linfo[f"awq_{group}"] = ai
                        else:
                            if group not in ("attn_in", "mlp_in"):
                                continue  # SmoothQuant: the norm-fed inputs carry the outliers
                            s = smoothquant_scales(work, group, st, r.sq_alpha, arch)
                        apply_scales(work, group, s, arch)
                        scales[group] = s
                    for name, t in work.state_dict().items():
                        res.fp[f"{prefix}.{name}"] = t.detach().float().clone()
                for lin, group in linear_to_group.items():
                    st = stats[group]
                    H, imp = st.hessian, st.imatrix
                    if group in scales:
                        H = scaled_hessian(H, scales[group])
                        imp = imp / scales[group].float() ** 2
                    W = work.get_submodule(lin).weight.detach().float()
                    mod = f"{prefix}.{lin}"
                    res.imatrix[mod] = imp.clone()
                    res.quant[mod] = {gid: _solve(W, H, imp, gid, r) for gid in r.grids if fits(gid, W.shape[1])}
                    if progress:
                        progress(mod, li, n_layers)
                res.info["layers"].append(linfo)
                if ri == settings.chain:
                    chain_layer = work
            if settings.sequential:
                # the chain recipe's quantized layer produces the next layer's inputs
                q_layer = copy.deepcopy(chain_layer)
                cres = results[settings.chain]
                for lin in linear_to_group:
                    solved = cres.quant[f"{prefix}.{lin}"]
                    qt = solved[next(g for g in cres.recipe.grids if g in solved)]  # the main grid where it fits
                    q_layer.get_submodule(lin).weight.copy_(torch.from_numpy(qt.dequantize()))
                hs = _layer_forward(q_layer, hs, kws, counter)
                del q_layer
            else:
                hs = fp_out
            del stats, fp_out
            if checkpoint:
                checkpoint.save(li, results, hs)
        _solve_head_and_embeddings(model, hs, results)
    for res in results:
        res.info["seconds"] = round(time.time() - t0, 2)
        res.info["sequential"] = settings.sequential
        res.info["chain_recipe"] = settings.recipes[settings.chain].key()
    counter["seconds"] = time.time() - t0
    return results


def _solve_head_and_embeddings(model, hs: list[torch.Tensor], results: list[CanonicalModel]) -> None:
    """lm_head is solved from the final-norm output's Hessian; embeddings (a lookup) by RTN."""
    need_head = any(r.recipe.head_grids for r in results)
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    if need_head:
        from .stats import InputStats

        st = InputStats(head.in_features, sample_tokens=0)
        for h in hs:
            st.add(model.model.norm(h))
        for res in results:
            if res.recipe.head_grids:
                W = head.weight.detach().float()
                res.imatrix["lm_head"] = st.imatrix.clone()
                res.quant["lm_head"] = {g: _solve(W, st.hessian, st.imatrix, g, res.recipe)
                                        for g in res.recipe.head_grids if fits(g, W.shape[1])}
    for res in results:
        if res.recipe.embed_grids and not tied:
            E = model.get_input_embeddings().weight.detach().float()
            res.quant["model.embed_tokens"] = {g: grid_from_id(g).rtn(E, None, clip=False)
                                               for g in res.recipe.embed_grids if fits(g, E.shape[1])}


__all__ = ["CanonicalModel", "Checkpoint", "Recipe", "StageSettings", "run_canonical"]
