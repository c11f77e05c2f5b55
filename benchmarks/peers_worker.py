"""Runs peer quantizers inside the peers virtualenv (never imported by quantprism).

    python peers_worker.py JOBS.json

JOBS.json: {"model": DIR, "calibration": CALIB.safetensors, "results": OUT.json,
            "jobs": [{"name": ..., "peer": "llmcompressor"|"autoround", "method": ..., "settings": {...},
                      "out": WEIGHTS.safetensors, ["calibration": OTHER_CALIB.safetensors]}, ...]}

Every job starts from a fresh fp32 load of the model, gets the exact calibration token ids quantprism used,
quantizes the decoder linears on the spec's W4 grid ({"group": 128, "sym": true} by default; lm_head kept), and writes every parameter as safetensors, the
decoder linears dequantized from the peer's codes (AWQ also rescales the norms in front of them); quantprism
scores them with its own evaluator, so every method is scored identically. Each written weight is checked to be on a 4-bit grid (≤ 16 distinct values per 128-group).
llm-compressor methods: rtn (QuantizationModifier), gptq (GPTQModifier), awq (AWQModifier + QuantizationModifier),
awq+gptq (AWQModifier + GPTQModifier); auto-round: signround (AutoRound's default algorithm).
RESULTS.json gets, per job, the seconds, the settings actually used, the grid check, and the package versions.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import versions  # noqa: E402

TORCH_SEED = 0
AUTOROUND_SEED = 42  # AutoRound's own default, passed explicitly
PEER_DISTS = ("llmcompressor", "compressed-tensors", "auto-round", "torch", "transformers", "accelerate", "datasets")


def model_weights(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every parameter (AWQ rescales the RMSNorm weights in front of the balanced linears: they must travel with the
    linears) with the decoder linears fake-quantized on the peer's grid; and the decoder linears' names."""
    out = {name: p.detach().float().contiguous() for name, p in model.named_parameters()
           if not name.endswith(("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale"))}
    lin = linear_weights(model)
    out.update(lin)
    return out, list(lin)


def linear_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            w = mod.weight.detach().float()
            if hasattr(mod, "weight_scale") and hasattr(mod, "quantization_scheme"):
                from compressed_tensors.quantization.lifecycle.forward import fake_quantize

                zp = getattr(mod, "weight_zero_point", None)
                w = fake_quantize(w, mod.weight_scale.float(), zp, mod.quantization_scheme.weights).float()
            out[f"{name}.weight"] = w.contiguous()
    return out


def grid_check(weights: dict[str, torch.Tensor], group: int = 128) -> dict:
    """Max distinct values in any ``group``-column group of any decoder linear (a 4-bit grid has ≤ 16)."""
    worst = 0
    for w in weights.values():
        g = w.reshape(-1, group).sort(dim=1).values
        distinct = 1 + (g[:, 1:] != g[:, :-1]).sum(dim=1)
        worst = max(worst, int(distinct.max()))
    return {"max_distinct_per_group": worst, "on_4bit_grid": worst <= 16, "tensors": len(weights)}


def llmc_scheme(grid: dict) -> dict:
    """llm-compressor's targets/scheme arguments for a W4 grid: its preset for g128 sym, config groups otherwise."""
    if grid["group"] == 128 and grid["sym"]:
        return dict(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    weights = {"num_bits": 4, "type": "int", "symmetric": grid["sym"], "strategy": "group", "group_size": grid["group"]}
    return dict(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])


def run_llmcompressor(model, ids: torch.Tensor, method: str, s: dict, grid: dict) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    quant = llmc_scheme(grid)
    workaround = None
    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations (a host→device transfer optimization) and fails
        # without an accelerator ("Cannot access accelerator device"); pinning does not change any value.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        workaround = "IntermediatesCache.pin_memory disabled (CPU only; no numerical effect)"
    recipe = []
    if method in ("awq", "awq+gptq"):
        recipe.append(AWQModifier(duo_scaling=s.get("duo_scaling", True), n_grid=s.get("n_grid", 20)))
    if method in ("gptq", "awq+gptq"):
        recipe.append(GPTQModifier(**quant, actorder=s.get("actorder", "static"), dampening_frac=s.get("dampening_frac", 0.01),
                                   block_size=s.get("block_size", 128)))
    else:
        recipe.append(QuantizationModifier(**quant))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # batch_size only groups the same windows (Hessians and AWQ losses are sums over all tokens); 16 makes its
    # per-batch Python overhead (AWQ re-runs every cached batch per grid point) bearable on CPU
    bs = s.get("batch_size", 16)
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0],
            batch_size=bs)
    return {"recipe": [repr(m) for m in recipe], "workaround": workaround, "oneshot_batch_size": bs}


def run_autoround(model, tok, ids: torch.Tensor, s: dict, grid: dict) -> dict:
    from auto_round import AutoRound

    bs = s.get("batch_size", 8)
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=bs, shuffle=False)
    kw = dict(bits=4, group_size=grid["group"], sym=grid["sym"], iters=s["iters"], nsamples=ids.shape[0], seqlen=ids.shape[1],
              batch_size=bs, dataset=loader, device_map="cpu", amp=False, seed=AUTOROUND_SEED)
    for k in ("lr", "enable_minmax_tuning", "enable_alg_ext", "nblocks"):
        if s.get(k) is not None:
            kw[k] = s[k]
    ar = AutoRound(model, tok, **kw)
    ar.quantize()
    return {"autoround_kwargs": {k: v for k, v in kw.items() if k != "dataset"}}


def main() -> None:
    spec = json.load(open(sys.argv[1], encoding="utf-8"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(spec.get("threads", 2)))  # scale.py pairs it with our side's --threads
    grid = spec.get("grid", {"group": 128, "sym": True})
    calib_ids = {}
    tok = AutoTokenizer.from_pretrained(spec["model"])
    results = {"versions": versions(*PEER_DISTS), "torch_seed": TORCH_SEED, "autoround_seed": AUTOROUND_SEED, "jobs": {}}
    for job in spec["jobs"]:
        torch.manual_seed(TORCH_SEED)
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
        cal = job.get("calibration", spec["calibration"])
        if cal not in calib_ids:
            calib_ids[cal] = load_file(cal)["input_ids"].long()
        ids = calib_ids[cal]
        rec = {"peer": job["peer"], "method": job["method"], "settings": job["settings"], "calibration_windows": int(ids.shape[0])}
        t0 = time.time()
        try:
            if job["peer"] == "llmcompressor":
                rec.update(run_llmcompressor(model, ids, job["method"], job["settings"], grid))
            else:
                rec.update(run_autoround(model, tok, ids, job["settings"], grid))
            rec["seconds"] = round(time.time() - t0, 1)
            # the worker's peak so far (jobs run one after another in this process: an upper bound for later jobs)
            rec["peak_rss_mb_so_far"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            w, lin = model_weights(model)
            rec["grid_check"] = grid_check({k: w[k] for k in lin}, grid["group"])
            save_file(w, job["out"] + ".tmp")
            os.replace(job["out"] + ".tmp", job["out"])
            rec["out"] = job["out"]
            if job.get("record"):  # the caller's cache: written as soon as the job is done (runs take hours)
                full = dict(rec, versions=results["versions"], torch_seed=TORCH_SEED, autoround_seed=AUTOROUND_SEED)
                with open(job["record"] + ".tmp", "w", encoding="utf-8") as f:
                    json.dump(full, f, indent=1)
                os.replace(job["record"] + ".tmp", job["record"])
        except Exception as e:  # one failing peer config must not lose the others
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            rec["traceback"] = traceback.format_exc()[-2000:]
        results["jobs"][job["name"]] = rec
        print(f"peer job {job['name']}: {rec.get('seconds')} s {rec.get('grid_check', rec.get('error'))}", file=sys.stderr,
              flush=True)
        with open(spec["results"], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        del model


if __name__ == "__main__":
    main()
