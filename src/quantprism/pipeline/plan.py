"""The build plan: targets → recipes → one canonical pass (cached) → exports → validation.

Targets that share a transform and rounding settings share one recipe (their grids are merged);
all recipes are solved in ONE calibration pass over the model. Results are cached by content
(model sha256, calibration sha256, recipe, chain recipe, pass settings).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..calibration import CalibrationSet, build_calibration
from ..config import Target, TargetsFile
from ..exporters.grids import grid_needs
from ..model import ModelInfo, load_tokenizer, load_torch_model
from ..quantize import store
from ..quantize.mixed import higher_grid, plan, sensitivity
from ..quantize.stage import CanonicalModel, Recipe, StageSettings, run_canonical

METHOD_TO_RECIPE = {
    "rtn": ("none", "rtn"), "gptq": ("none", "gptq"), "awq": ("awq", "rtn"), "awq+gptq": ("awq", "gptq"),
    "smoothquant+rtn": ("smoothquant", "rtn"), "smoothquant+gptq": ("smoothquant", "gptq"),
}


def _base_recipe(t: Target, info: ModelInfo | None) -> Recipe:
    from ..exporters import FORMATS

    transform, method = METHOD_TO_RECIPE[t.method]
    needs = grid_needs(t, info)
    grids = needs.grids
    mixed = bool(grids) and (t.protect > 0 or t.max_bpw is not None)
    if mixed:  # protected tensors need the next grid up, solved in the same pass
        grids = tuple(dict.fromkeys(grids + (higher_grid(grids[0]),)))
    return Recipe(grids=grids, transform=transform, method=method, head_grids=needs.head,
                  embed_grids=needs.embed, awq_grid=grids[0] if transform == "awq" and grids else None,
                  sq_alpha=None if t.smoothquant_alpha == "auto" else t.smoothquant_alpha,
                  act_round=FORMATS[t.format].act_rounding(t) if transform == "smoothquant" else "none",
                  search_grids=grids if transform == "smoothquant" and t.smoothquant_alpha == "auto" else (),
                  sq_inputs=t.smoothquant_inputs if transform == "smoothquant" else (), damp=t.damp, clip=t.clip_search,
                  act_order=t.act_order,
                  sensitivity=mixed, refit=t.refit and method == "gptq", tune=t.tune if method == "gptq" else 0,
                  tune_round=t.tune_round and method == "gptq" and t.tune > 0,
                  tune_lr=t.tune_lr if t.tune and method == "gptq" else 1.0,
                  tune_mix=_mix_entries(t, needs.mix) if t.tune and method == "gptq" else ())


def _mix_entries(t: Target, mix: tuple[str, ...]) -> tuple[str, ...]:
    """A target's deployed mix as the recipe carries it, named by its content (equal mixes of two targets are one)."""
    import hashlib

    name = f"{t.quant or t.format}-{hashlib.sha256(chr(10).join(mix).encode()).hexdigest()[:8]}"
    return tuple(f"{name}|{e}" for e in mix)


def plan_recipes(targets: list[Target], info: ModelInfo | None = None) -> tuple[list[Recipe], dict[str, int]]:
    """Merge targets into recipes: same transform/method/settings → one recipe with the union of grids.
    ``info``: the model, whose shapes decide some grids (GGUF's fallback types for rows not a multiple of 256)."""
    recipes: list[Recipe] = []
    index: dict[str, int] = {}
    for t in targets:
        r = _base_recipe(t, info)
        if not r.grids:
            continue  # nothing to quantize (e.g. GGUF F16)
        for i, other in enumerate(recipes):
            same = (other.transform, other.method, other.damp, other.clip, other.act_order, other.sq_alpha,
                    other.act_round, other.search_grids, other.sq_inputs, other.awq_grid, other.refit, other.tune,
                    other.tune_round, other.tune_lr) == (
                r.transform, r.method, r.damp, r.clip, r.act_order, r.sq_alpha, r.act_round, r.search_grids, r.sq_inputs,
                r.awq_grid, r.refit, r.tune, r.tune_round, r.tune_lr)
            if same:
                def merge(a, b):
                    return tuple(dict.fromkeys(a + b))

                recipes[i] = dataclasses.replace(other, grids=merge(other.grids, r.grids),
                                                 head_grids=merge(other.head_grids, r.head_grids),
                                                 embed_grids=merge(other.embed_grids, r.embed_grids),
                                                 tune_mix=merge(other.tune_mix, r.tune_mix),
                                                 sensitivity=other.sensitivity or r.sensitivity)
                index[t.name] = i
                break
        else:
            index[t.name] = len(recipes)
            recipes.append(r)
    return recipes, index


@dataclass
class CanonicalRun:
    results: list[CanonicalModel]
    paths: list[Path]
    calibration: CalibrationSet
    cache_hits: list[bool] = field(default_factory=list)
    counter: dict = field(default_factory=dict)


def run_stage(info: ModelInfo, recipes: list[Recipe], calibration: str | None, samples: int, seq_len: int,
              seed: int, sequential: bool = True, cache_dir: Path | None = None,
              progress: Callable[[str, int, int], None] | None = None, device: str | None = "auto",
              max_memory: int | None = None) -> CanonicalRun:
    """Solve every recipe in one streamed pass (one decoder layer in memory at a time), reusing cached results; the
    first recipe is the chain. ``max_memory``: bytes the pass may use (default: half of the available memory); the
    activations between layers spill to disk beyond what is left of it after one layer's working set."""
    from ..model.stream import dtype_of

    cache_dir = cache_dir or store.default_cache_dir()
    tok = load_tokenizer(info)
    calib = build_calibration(tok, calibration, samples, seq_len, seed,
                              max_positions=info.config.get("max_position_embeddings"))
    settings = StageSettings(recipes=list(recipes), sequential=sequential)
    act_dtype = dtype_of(info)  # hidden states between layers: the checkpoint's dtype (README "Memory")
    keys = [store.cache_key(info.weights_sha256, calib.sha256, r, recipes[0], sequential, settings.sample_tokens,
                            str(act_dtype).removeprefix("torch."), settings.forward_batch(calib.input_ids.shape[1]))
            for r in recipes]
    paths = [cache_dir / k for k in keys]
    with store.cache_lock(cache_dir):  # another build on this cache finishes (and saves) first
        return _solve(info, recipes, calib, settings, act_dtype, keys, paths, cache_dir, seed, device, max_memory,
                      progress)


def _solve(info, recipes, calib, settings, act_dtype, keys, paths, cache_dir, seed, device, max_memory,
           progress) -> CanonicalRun:
    """run_stage under the cache lock: the pass for whatever is not cached yet, then every result loaded."""
    import torch

    from ..exporters.state import TensorStore
    from ..model.stream import LayerStream, device_of, skeleton
    from ..quantize.stage import Streaming

    hits = [store.is_complete(p) for p in paths]
    counter: dict = {}
    if not all(hits):
        torch.manual_seed(seed)
        dev = device_of(device)
        # the partial directory is keyed by every result of the pass: a resumed run must be the same pass
        ckpt = store.LayerCheckpoint(cache_dir / f"partial-{store.sha_of(keys)}", offload=True)
        model = skeleton(info)
        sm = Streaming(LayerStream(model, TensorStore(info), dev), dev, act_dtype,
                       activation_budget(info, max_memory), ckpt.root / "spill", offload=True)
        solved = run_canonical(model, calib.input_ids, settings, progress=progress, counter=counter, checkpoint=ckpt,
                               streaming=sm)
        counter["activation_budget_bytes"] = sm.act_budget
        prov = {"model": str(info.path), "model_sha256": info.weights_sha256, "calibration": calib.record()}
        for ri, (res, p, hit) in enumerate(zip(solved, paths, hits, strict=True)):
            if not hit:
                store.save(res, p, prov, layer_files=ckpt.layer_files(ri, info.n_layers))
        ckpt.clear()
    results = [store.load(p)[0] for p in paths]
    need = [(res, p) for res, p in zip(results, paths, strict=True)
            if res.recipe.sensitivity and "sensitivity" not in res.info]
    if need:  # mixed precision: measured on the whole model (not streamed; see README "Memory")
        model = load_torch_model(info)
        for res, p in need:
            res.info["sensitivity"] = measure_sensitivity(model, res, calib.input_ids[:8])
            store.update_info(p, res.info)
    return CanonicalRun(results, paths, calib, hits, counter)


def activation_budget(info: ModelInfo, max_memory: int | None) -> int:
    """Bytes of RAM the activations between layers may take: the memory allowance (default: half of what is available)
    minus what the process already holds and one layer's working set (the fp32 layer, its transformed and quantized
    copies, and the Hessians of its widest input). Never below 64 MB: the rest spills to disk."""
    from ..model.stream import describe
    from ..quantize.activations import available_memory
    from .rss import current_rss

    allowance = max_memory if max_memory is not None else available_memory() // 2
    d = describe(info)
    working = 3 * d["layer_fp32_bytes"] + 3 * 8 * d["widest_input"] ** 2
    return max(64 << 20, allowance - current_rss() - working)


def measure_sensitivity(model, res: CanonicalModel, ids) -> dict[str, dict[str, float]]:
    """Per-tensor sensitivity of every grid of ``res`` except the protection grids."""
    import torch

    from ..evaluate.canonical import canonical_overrides

    out = {}
    base = canonical_overrides(res, lambda mod: None)  # transformed fp tensors only
    for gid in res.recipe.grids[:1]:
        q = {mod: torch.from_numpy(grids[gid].dequantize()) for mod, grids in res.quant.items() if gid in grids}
        out[gid] = sensitivity(model, base, q, ids)
    return out


def target_plan(t: Target, res: CanonicalModel) -> dict | None:
    """The mixed-precision plan of one target (None when it asks for none)."""
    if not (t.protect > 0 or t.max_bpw is not None):
        return None
    main = grid_needs(t).grids[0]
    sens = res.info.get("sensitivity", {}).get(main)
    if sens is None:
        return None
    sizes = {mod: int(res.quant[mod][main].codes.size) for mod in sens}
    return plan(sens, sizes, main, protect=t.protect, max_bpw=t.max_bpw)


def targets_of(tf: TargetsFile, only: list[str] | None) -> list[Target]:
    from ..errors import ConfigError

    if not only:
        return list(tf.targets.values())
    missing = [n for n in only if n not in tf.targets]
    if missing:
        raise ConfigError(f"{tf.path}: no target named {missing[0]!r}; targets: {', '.join(tf.targets)}")
    return [tf.targets[n] for n in only]
