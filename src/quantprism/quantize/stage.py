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

import contextlib
import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import progress as pbar
from ..errors import QuantprismError
from ..evaluate.runtime_arith import activation_rounding
from ..memory import trim_heap
from ..model.archs import ARCHS, LLAMA
from ..model.stream import LayerStream, capture_layer_inputs, layer_forward, to_device
from .activations import Activations
from .gptq import fp_target_weights, gptq_quantize
from .grids import IntGrid, QuantizedTensor, grid_from_id
from .refit import refit_scales
from .stats import Pairing, attach_collectors
from .transforms import (
    apply_scales,
    awq_search,
    foldable,
    scaled_hessian,
    smoothquant_scales,
    smoothquant_search,
)
from .tune import code_units, tunable, tune_layer_scales

TRANSFORMS = ("none", "awq", "smoothquant")
# Recipe fields added after caches existed: left out of the key at their default, so earlier keys stay valid
LATER_FIELDS = ("act_round", "search_grids", "sq_inputs", "tune_lr")


@dataclass(frozen=True)
class Recipe:
    """What one canonical result holds: a transform, a rounding method, and the grids to solve."""

    grids: tuple[str, ...]
    transform: str = "none"
    method: str = "gptq"
    head_grids: tuple[str, ...] = ()
    embed_grids: tuple[str, ...] = ()
    awq_grid: str | None = None
    sq_alpha: float | None = 0.5  # None: searched per layer and input (transforms.smoothquant_search)
    act_round: str = "none"  # the runtime's activation rounding the SmoothQuant search sees (runtime_arith.ACT_ROUNDING)
    # the target's own grids the searched SmoothQuant rounds candidates on (first fitting each input width): a scale
    # that suits one grid can ruin another (Q5_1 on weights that carry Q4_1 rounding is near-exact unscaled)
    search_grids: tuple[str, ...] = ()
    # the input groups SmoothQuant scales (config.SQ_INPUTS values); () = every foldable one. On a model whose weights
    # carry a 32-block origin (SmolLM2's Q4_1), scaling the 576-wide inputs moves Q5_1 rows off their exact grid
    sq_inputs: tuple[str, ...] = ()
    damp: float = 0.01
    clip: bool = True
    act_order: bool = True  # static groups: columns in decreasing H-diagonal order, groups stay col // size
    sensitivity: bool = False  # also measure per-tensor sensitivity of the main grid (mixed precision)
    # "fp": GPTQ's per-linear target is the fp layer's output on the fp inputs (least-squares target weights,
    # gptq.fp_target_weights); "quantized": the fp layer's output on the quantized model's inputs (textbook)
    target: str = "quantized"
    refit: bool = False  # int grids: re-solve each group's scale for GPTQ's codes against the Hessian (refit.py)
    tune: int = 0  # epochs of block-wise output reconstruction of every int grid's scales against the fp model (tune.py)
    tune_round: bool = False  # the reconstruction also learns each weight's rounding, starting from GPTQ's (tune.py)
    tune_lr: float = 1.0  # multiplier of the reconstruction's peak steps (tune.SCALE_LR, ROUND_LR, INT_LR)
    # "target|module=grid": per-tensor deployed grids (GGUF mixes), tuned as deployed together, one run per target and
    # layer; grids no mix names are tuned grid by grid (every linear on that grid)
    tune_mix: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise QuantprismError(f"unknown transform {self.transform!r}; use one of {', '.join(TRANSFORMS)}")
        if self.method not in ("gptq", "rtn"):
            raise QuantprismError(f"unknown rounding method {self.method!r}; use gptq or rtn")
        if self.target not in ("fp", "quantized"):
            raise QuantprismError(f"unknown target {self.target!r}; use fp or quantized")
        if not 0 < self.damp < 1:
            raise QuantprismError(f"damp {self.damp} must be in (0, 1); 0.01 is typical")
        for g in (*self.grids, *self.head_grids, *self.embed_grids, *self.search_grids):
            grid_from_id(g)

    def key(self) -> str:
        d = asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for k in LATER_FIELDS:
            if d[k] == defaults[k]:
                del d[k]  # added later: keys of recipes without them stay as they were
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class CanonicalModel:
    """Transformed fp tensors + {tensor: {grid id: codes}} + statistics + provenance."""

    recipe: Recipe
    fp: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, dict[str, QuantizedTensor]] = field(default_factory=dict)
    imatrix: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def drop_layer(self, prefix: str) -> None:
        """Forget one finished layer's tensors (the checkpoint holds them)."""
        p = prefix + "."
        for d in (self.fp, self.quant, self.imatrix):
            for k in [k for k in d if k.startswith(p)]:
                del d[k]


@dataclass
class StageSettings:
    recipes: list[Recipe]
    sequential: bool = True
    chain: int = 0
    batch: int = 0  # calibration windows per forward; 0: as many as fit in ``batch_tokens``
    sample_tokens: int = 4096
    batch_tokens: int = 2048  # bounds a forward's activations (the MLP's intermediates dominate: tokens × inter × 4 B)

    def forward_batch(self, seq_len: int) -> int:
        """Windows per forward. It sets the fp32 partial sums of the Hessians, so it is part of the cache key."""
        return self.batch or max(1, self.batch_tokens // max(1, seq_len))


def fits(gid: str, k: int) -> bool:
    """Whether a grid's blocks tile a row of ``k`` columns (a GGUF target asks for the 32-block fallback type
    where llama.cpp uses one, and the 256-block type only where it fits)."""
    return k % grid_from_id(gid).group_cols(k) == 0


def first_fitting(grids: tuple[str, ...], k: int) -> str | None:
    return next((g for g in grids if fits(g, k)), None)


def _solve(W: torch.Tensor, H: torch.Tensor, imp: torch.Tensor, gid: str, r: Recipe, factors: dict | None = None,
           hessian_key=None, cont: dict | None = None) -> QuantizedTensor:
    """``cont``: receives, for an int grid solved by GPTQ, its error-updated weights in code units (tune.py)."""
    grid = grid_from_id(gid)
    if r.method == "rtn":  # row blocks: the k-quant searches' temporaries are many times the rows they fit
        return _by_rows(W, lambda w: grid.rtn(w, imp, clip=r.clip))
    # k-quant super-blocks are fitted on the error-updated weights (natural order, DESIGN); int grids
    # use static-group act-order, which measured best (benchmarks/canonical_quality.py)
    act_order = r.act_order and isinstance(grid, IntGrid)
    upd = torch.empty(W.shape, dtype=torch.float32) if cont is not None and tunable(grid) else None
    q = gptq_quantize(W, H, grid, damp=r.damp, clip=r.clip, act_order=act_order, factors=factors,
                      hessian_key=hessian_key, updated=upd)
    if upd is not None:  # in units of the solve's own scales (a refit below moves the scales, not the codes)
        cont[gid] = code_units(q, upd)
    return refit_scales(W, H, q) if r.refit else q


ROW_CHUNK_BYTES = 16 << 20  # a large matrix (lm_head, embeddings) is solved this many float32 bytes of rows at a time


def _by_rows(W: torch.Tensor, solve: Callable[[torch.Tensor], QuantizedTensor]) -> QuantizedTensor:
    """``solve`` on row blocks of ``W`` of ROW_CHUNK_BYTES in float32, concatenated: every grid fits per row and
    GPTQ's updates stay within a row, so the codes are the whole matrix's while one block's temporaries exist."""
    rows = max(1, ROW_CHUNK_BYTES // (4 * W.shape[1]))
    if W.shape[0] <= rows:
        return solve(W.float())
    parts = [solve(W[a : a + rows].float()) for a in range(0, W.shape[0], rows)]
    out = QuantizedTensor(parts[0].grid_id, np.concatenate([q.codes for q in parts], axis=0))
    out.params = {k: np.concatenate([q.params[k] for q in parts], axis=0) for k in parts[0].params}
    return out


def _solve_rows(W: torch.Tensor, H: torch.Tensor | None, imp: torch.Tensor | None, gid: str, r: Recipe,
                factors: dict | None = None, hessian_key=None) -> QuantizedTensor:
    """``_solve`` on row blocks of ``W`` (any float dtype: a vocabulary-sized matrix is cast a block at a time)."""
    return _by_rows(W, lambda w: _solve(w, H, imp, gid, r, factors, hessian_key))


class Checkpoint(Protocol):
    """Per-layer progress on disk, so an interrupted pass resumes after its last finished layer."""

    def load(self, recipes: list[Recipe]) -> tuple[int, list[CanonicalModel], list[torch.Tensor]] | None: ...
    def save(self, layer: int, results: list[CanonicalModel], hs: list[torch.Tensor]) -> None: ...


@dataclass
class Streaming:
    """How the pass holds the model: ``stream`` materialises one layer at a time (None: the model is in memory);
    activations between layers in ``act_dtype``, in RAM up to ``act_budget`` bytes (None: no bound), beyond it in a
    memory-mapped file under ``spill_dir``; layers and activations are computed on ``device``; ``offload`` drops each
    finished layer's results from memory once the checkpoint holds them."""

    stream: LayerStream | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    act_dtype: torch.dtype = torch.float32
    act_budget: int | None = None
    spill_dir: Path | None = None
    offload: bool = False


def run_canonical(model, input_ids: np.ndarray | torch.Tensor, settings: StageSettings,
                  progress: Callable[[str, int, int], None] | None = None,
                  counter: dict | None = None, checkpoint: Checkpoint | None = None,
                  streaming: Streaming | None = None) -> list[CanonicalModel]:
    """Run the pass over ``model`` (transformers CausalLM, eval; fp32 in memory, or a skeleton with
    ``streaming.stream``). Returns one result per recipe."""
    t0 = time.time()
    sm = streaming or Streaming()
    dev = sm.device
    counter = counter if counter is not None else {}
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise QuantprismError("calibration batch is empty; give at least one sample")
    if sm.offload and checkpoint is None:
        raise QuantprismError("offloading finished layers needs a checkpoint to hold them")
    results = [CanonicalModel(r, info={"layers": []}) for r in settings.recipes]
    arch = ARCHS.get(next(iter(getattr(model.config, "architectures", None) or []), type(model).__name__), LLAMA)
    layers = model.model.layers
    n_layers = len(layers)
    start = 0

    # fp targets: the fp model's own hidden states travel beside the quantized model's (same tokens, same batches)
    paired = settings.sequential and any((r.target == "fp" or r.tune) and r.method == "gptq" for r in settings.recipes)

    def new_acts() -> Activations:
        # inputs and outputs of a layer (of both models when paired) share the budget
        part = None if sm.act_budget is None else sm.act_budget // (4 if paired else 2)
        return Activations(sm.act_dtype, part, sm.spill_dir)

    def materialise(module, prefix):
        return sm.stream.loaded(module, prefix) if sm.stream else contextlib.nullcontext(module)

    hs = new_acts()
    with torch.inference_mode(), pbar.task("canonical pass", total=n_layers, unit="layer") as bar:
        with materialise(model.model.embed_tokens, "model.embed_tokens"):
            # per batch, per layer: the kwargs each layer gets (layer types differ in mask and RoPE)
            kws = to_device(capture_layer_inputs(model, ids, settings.forward_batch(ids.shape[1]), hs), dev)
        hs_fp = None
        if paired:
            hs_fp = new_acts()
            for h in hs:
                hs_fp.append(h)
        resumed = checkpoint.load(settings.recipes) if checkpoint else None
        if resumed is not None:
            done, results, saved = resumed
            hs.close()
            hs = new_acts()
            for h in saved:
                hs.append(h)
            del saved
            start = done + 1
            counter["resumed_from_layer"] = done  # layers ≤ done are never solved again: the checkpoint carries them
            if hs_fp is not None:  # the fp stream is not checkpointed: the fp layers re-run (a forward each)
                for li in range(start):
                    nxt = new_acts()
                    with materialise(layers[li], f"model.layers.{li}") as layer:
                        layer_forward(layer.to(dev), hs_fp, [kw[li] for kw in kws], counter, dev, nxt)
                    hs_fp.close()
                    hs_fp = nxt
            bar.advance(start, note=f"resumed after layer {done}")
        for li in range(start, n_layers):
            t_layer = time.time()
            prefix = f"model.layers.{li}"
            with materialise(layers[li], prefix) as layer:
                hs, hs_fp = _solve_layer(layer, li, prefix, hs, [kw[li] for kw in kws], settings, results, arch, counter, dev,
                                         new_acts, progress, n_layers, owned=sm.stream is not None, hs_fp=hs_fp)
            if checkpoint:
                checkpoint.save(li, results, hs)
                if sm.offload:
                    for res in results:
                        res.drop_layer(prefix)
            trim_heap()  # the finished layer's small buffers: without this the heap's resident free pages creep per layer
            bar.advance(1, note=f"layer {li + 1}/{n_layers}: {time.time() - t_layer:.1f} s")
        if hs_fp is not None:
            hs_fp.close()
        _solve_head_and_embeddings(model, hs, results, sm)
        hs.close()
    for res in results:
        res.info["seconds"] = round(time.time() - t0, 2)
        res.info["sequential"] = settings.sequential
        res.info["chain_recipe"] = settings.recipes[settings.chain].key()
    counter["seconds"] = time.time() - t0
    return results


def _solve_layer(layer, li: int, prefix: str, hs: Activations, kws: list[dict], settings: StageSettings,
                 results: list[CanonicalModel], arch, counter: dict, dev: torch.device, new_acts,
                 progress, n_layers: int, owned: bool = False,
                 hs_fp: Activations | None = None) -> tuple[Activations, Activations | None]:
    """Statistics, transforms and codes of one decoder layer for every recipe; returns the next layer's inputs (the
    quantized model's, and the fp model's when ``hs_fp`` carries them for fp targets).
    ``owned``: the layer is the stream's (emptied afterwards), so it may be modified."""
    groups, linear_to_group = arch.input_groups, arch.linear_to_group
    # the token sample feeds the transform searches only (AWQ, SmoothQuant): 4096 tokens × every input width in
    # float32 is a layer's second-largest statistic, not kept when no recipe transforms
    keep = settings.sample_tokens if any(r.transform != "none" for r in settings.recipes) else 0
    cross = any(r.target == "fp" and r.method == "gptq" for r in settings.recipes)
    tuning = any(r.tune for r in settings.recipes)
    pairing = Pairing(cross) if hs_fp is not None else None
    stats, handles = attach_collectors(layer, keep, groups, pairing)
    fp_out = None if settings.sequential else new_acts()
    fp_next = None
    try:
        if pairing is None:
            layer_forward(layer, hs, kws, counter, dev, fp_out)
        else:  # per batch: the fp model's inputs first (recorded), then the quantized model's (accumulated against them)
            fp_next = new_acts()
            counter["layer_forwards"] = counter.get("layer_forwards", 0) + 2
            for h, hf, kw in zip(hs, hs_fp, kws, strict=True):
                pairing.fp = True
                r = layer(hf.to(dev, torch.float32), **kw)
                fp_next.append(r[0] if isinstance(r, tuple) else r)
                pairing.fp = False
                layer(h.to(dev, torch.float32), **kw)
            if not tuning:
                hs_fp.close()  # otherwise after tuning: sets other than the chain's are tuned on the fp inputs
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st.to_cpu()
    cpu_layer = layer if dev.type == "cpu" else copy.deepcopy(layer).cpu()  # transforms and solvers run on the CPU
    chain_layer = None
    for ri, (r, res) in enumerate(zip(settings.recipes, results, strict=True)):
        work = copy.deepcopy(cpu_layer) if r.transform != "none" else cpu_layer
        scales: dict[str, torch.Tensor] = {}
        linfo: dict = {"layer": li}
        if r.transform != "none":
            for group, st in stats.items():
                if not foldable(work, group, arch) or (r.transform == "smoothquant" and r.sq_inputs
                                                       and group not in r.sq_inputs):
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
                elif r.sq_alpha is None:  # every foldable input: SmolLM2's down_proj inputs carry outliers too
                    k = work.get_submodule(groups[group][0]).weight.shape[1]
                    fit = r.search_grids or r.grids
                    sgrid = grid_from_id(first_fitting(fit, k) or fit[0])
                    s, si = smoothquant_search(work, group, st, sgrid, activation_rounding(r.act_round, sgrid), arch)
                    linfo[f"sq_{group}"] = si
                else:
                    s = smoothquant_scales(work, group, st, r.sq_alpha, arch)
                apply_scales(work, group, s, arch)
                scales[group] = s
            for name, t in work.state_dict().items():
                res.fp[f"{prefix}.{name}"] = t.detach().float().clone()
        hessians: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        factors: dict = {}  # inverse-Hessian factors of this recipe's layer, shared by the linears of one input
        tune_sets = _tune_sets(r, prefix, list(linear_to_group), work) if r.tune and fp_next is not None else []
        learn_round = bool(tune_sets and r.tune_round and r.method == "gptq")
        conts: dict[str, dict] = {lin: {} for lin in linear_to_group}
        for lin, group in linear_to_group.items():
            if group not in hessians:
                factors.clear()  # linears of one input are contiguous: the last input's factors are done with
                st = stats[group]
                H, imp = st.hessian, st.imatrix
                if group in scales:
                    H = scaled_hessian(H, scales[group])
                    imp = imp / scales[group].float() ** 2
                hessians[group] = H, imp
            H, imp = hessians[group]
            W = work.get_submodule(lin).weight.detach().float()
            G = stats[group].cross_hessian
            if r.target == "fp" and r.method == "gptq" and G is not None:
                W = fp_target_weights(W, H, scaled_hessian(G, scales[group]) if group in scales else G, r.damp)
            mod = f"{prefix}.{lin}"
            res.imatrix[mod] = imp.clone()
            res.quant[mod] = {gid: _solve(W, H, imp, gid, r, factors, group,
                                          conts[lin] if learn_round and any(a.get(lin) == gid for _, a in tune_sets) else None)
                              for gid in r.grids if fits(gid, W.shape[1])}
            if progress:
                progress(mod, li, n_layers)
        del hessians, factors
        tuned_pairs: set[tuple[str, str]] = set()
        for si, (name, assign) in enumerate(tune_sets):  # each set once; a (linear, grid) tuned earlier stays as tuned
            solved = {lin: res.quant[f"{prefix}.{lin}"][gid] for lin, gid in assign.items()}
            frozen = {lin for lin, gid in assign.items() if (lin, gid) in tuned_pairs}
            cont = {lin: conts[lin][gid] for lin, gid in assign.items() if gid in conts[lin] and lin not in frozen}
            # the chain's own deployment (its recipe's first set) learns to undo the error of the inputs it will get;
            # any other set sees inputs from a different model than its own, so it fits the fp inputs instead (on the
            # chain's inputs Q5_K_M, tuned beside a Q4_K_M chain, over-corrected to 2.5× its untuned KLD)
            own = ri == settings.chain and si == 0
            tuned, linfo[f"tune_{name}"] = tune_layer_scales(work, solved, hs if own else hs_fp, fp_next, kws,
                                                             epochs=r.tune, cont=cont, frozen=frozen,
                                                             lr_scale=r.tune_lr)
            linfo[f"tune_{name}"]["inputs"] = "quantized" if own else "fp"
            for lin, gid in assign.items():
                res.quant[f"{prefix}.{lin}"][gid] = tuned[lin]
                tuned_pairs.add((lin, gid))
        del conts
        res.info["layers"].append(linfo)
        if ri == settings.chain:
            chain_layer = work
    if hs_fp is not None and tuning:
        hs_fp.close()
    del stats
    if not settings.sequential:
        hs.close()
        return fp_out, None
    # the chain recipe's quantized layer produces the next layer's inputs
    # ``owned``: the layer is the stream's, emptied after this call; a transformed copy is ours too — either can take
    # the quantized weights in place instead of a deep copy (a whole fp32 layer less at peak)
    q_layer = chain_layer if owned or chain_layer is not layer else copy.deepcopy(chain_layer)
    cres = results[settings.chain]
    for lin in linear_to_group:
        solved = cres.quant[f"{prefix}.{lin}"]
        qt = solved[next(g for g in cres.recipe.grids if g in solved)]  # the main grid where it fits
        q_layer.get_submodule(lin).weight.copy_(torch.from_numpy(qt.dequantize()))
    out = new_acts()
    layer_forward(q_layer.to(dev), hs, kws, counter, dev, out)
    hs.close()
    return out, fp_next


def _tune_sets(r: Recipe, prefix: str, lins: list[str], layer) -> list[tuple[str, dict[str, str]]]:
    """The (name, {linear: grid}) sets one layer's block-wise tuning runs: each target mix of ``r.tune_mix`` as deployed,
    then every other tunable grid on all linears it fits."""
    sets: dict[str, dict[str, str]] = {}
    mixed = set()  # grids some mix deploys: not tuned where no mix puts them
    for e in r.tune_mix:
        name, assign = e.split("|", 1)
        mod, gid = assign.rsplit("=", 1)
        mixed.add(gid)
        if mod.startswith(prefix + ".") and (lin := mod[len(prefix) + 1:]) in lins and tunable(grid_from_id(gid)):
            sets.setdefault(name, {})[lin] = gid
    for gid in r.grids:
        if gid not in mixed and tunable(grid_from_id(gid)):
            on = {lin: gid for lin in lins if fits(gid, layer.get_submodule(lin).weight.shape[1])}
            if on:
                sets[gid] = on
    return list(sets.items())


def _solve_head_and_embeddings(model, hs: Activations, results: list[CanonicalModel], sm: Streaming) -> None:
    """lm_head is solved from the final-norm output's Hessian; embeddings (a lookup) by RTN."""
    need_head = any(r.recipe.head_grids for r in results)
    need_embed = any(r.recipe.embed_grids for r in results)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight if sm.stream is None \
        else "lm_head.weight" not in sm.stream.state
    if need_head:
        from .stats import InputStats

        norm = model.model.norm
        ctx = sm.stream.loaded(norm, "model.norm") if sm.stream else contextlib.nullcontext()
        # in its stored dtype (fp32 in memory, the checkpoint's on disk): rows are cast a chunk at a time
        W = sm.stream.head_weight_stored() if sm.stream else model.get_output_embeddings().weight.detach()
        st = InputStats(W.shape[1], sample_tokens=0)
        with ctx:
            for h in hs:
                st.add(norm(h.to(sm.device, torch.float32)))
        st.to_cpu()
        H, imp = st.hessian, st.imatrix
        for res in results:
            if res.recipe.head_grids:
                factors: dict = {}
                res.imatrix["lm_head"] = imp.clone()
                res.quant["lm_head"] = {g: _solve_rows(W, H, imp, g, res.recipe, factors, "lm_head")
                                        for g in res.recipe.head_grids if fits(g, W.shape[1])}
        del W, H
    if need_embed and not tied:
        E = sm.stream.state["model.embed_tokens.weight"] if sm.stream else model.get_input_embeddings().weight.detach()
        for res in results:
            if res.recipe.embed_grids:  # a lookup table: RTN without clipping, whatever the recipe's method
                rtn = dataclasses.replace(res.recipe, method="rtn", clip=False)
                res.quant["model.embed_tokens"] = {g: _solve_rows(E, None, None, g, rtn)
                                                   for g in res.recipe.embed_grids if fits(g, E.shape[1])}


__all__ = ["CanonicalModel", "Checkpoint", "Recipe", "StageSettings", "Streaming", "run_canonical"]
