"""Runs ONE peer quantizer inside the peers virtualenv (never imported by quantprism).

    python peers_worker.py {llmcompressor|autoround} MODEL_DIR CALIB.safetensors OUT.safetensors

Reads the exact calibration token ids quantprism used, quantizes decoder linears W4 g128 sym
(lm_head kept), and writes the resulting (dequantized) decoder linear weights as safetensors;
quantprism evaluates them with its own evaluator, so every method is scored identically.
"""
from __future__ import annotations

import json
import sys
import time

import torch
from safetensors.torch import load_file, save_file


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


def run_llmcompressor(model, ids: torch.Tensor) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])


def run_autoround(model, tok, ids: torch.Tensor) -> None:
    from auto_round import AutoRound

    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=8, shuffle=False)
    ar = AutoRound(model, tok, bits=4, group_size=128, sym=True, iters=int(__import__("os").environ.get("AR_ITERS", "200")), nsamples=ids.shape[0],
                   seqlen=ids.shape[1], batch_size=8, dataset=loader, device_map="cpu", amp=False)
    ar.quantize()


def main() -> None:
    method, model_dir, calib, out = sys.argv[1:5]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = load_file(calib)["input_ids"].long()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.time()
    if method == "llmcompressor":
        run_llmcompressor(model, ids)
    else:
        run_autoround(model, tok, ids)
    seconds = time.time() - t0
    save_file(linear_weights(model), out)
    print(json.dumps({"method": method, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
