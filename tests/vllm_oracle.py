"""Independent decoders for vLLM 0.32 checkpoints, written from shared/reference/vllm-formats.md §1–3, §5.

Nothing here imports quantprism: the oracle reads a checkpoint directory the way vLLM would —
config rules first (which layers are quantized, with which bits and groups, matched on vLLM's fused
layer names), then the tensors — and returns W[out, in] in fp32 for every decoder linear.
Scales are used as stored (fp16 or fp32), computed in fp32, as the CPU kernel dequantizes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
SHARD = {s: f for f, ss in FUSED.items() for s in ss}
PROJS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def load_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor, through the index when the checkpoint is sharded."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(path / f))
        assert not set(part) & set(tensors), f"tensor in two shards: {set(part) & set(tensors)}"
        tensors.update(part)
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        assert set(wm) == set(tensors)
        assert all(name in load_file(str(path / f)) for name, f in wm.items())
    return cfg, tensors


def fields(words: torch.Tensor, bits: int) -> np.ndarray:
    """[..., C] int32 → [..., C, 32/bits]; field i = bits b·i .. b·i+b−1 of the word as uint32."""
    assert words.dtype == torch.int32, words.dtype
    u = words.numpy().astype(np.int64) & 0xFFFFFFFF
    per = 32 // bits
    return (u[..., None] >> (bits * np.arange(per))) & ((1 << bits) - 1)


def layer_name(module: str) -> str:
    """vLLM's name for the layer holding an HF module (q/k/v → qkv_proj, gate/up → gate_up_proj)."""
    head, proj = module.rsplit(".", 1)
    return f"{head}.{SHARD.get(proj, proj)}"


def shard_names(module: str) -> list[str]:
    head, proj = layer_name(module).rsplit(".", 1)
    return [f"{head}.{p}" for p in FUSED.get(proj, [proj])]


def class_name(module: str) -> str:
    proj = layer_name(module).rsplit(".", 1)[1]
    return {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear"}.get(proj, "RowParallelLinear")


def decoder_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    mods = set()
    for name in tensors:
        m = re.match(r"^(model\.layers\.\d+\.(self_attn|mlp)\.(\w+_proj))\.", name)
        if m and m.group(3) in PROJS:
            mods.add(m.group(1))
    return sorted(mods)


# ---------------------------------------------------------------- scheme resolution (config → per layer)

def gptq_scheme(cfg: dict, module: str) -> dict | None:
    """None = unquantized; else bits/group_size after the first matching ``dynamic`` rule (re.match)."""
    base = {"bits": cfg["bits"], "group_size": cfg["group_size"]}
    for pattern, override in cfg.get("dynamic", {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], layer_name(module)):
                return None
        elif re.match(pattern.removeprefix("+:"), layer_name(module)):
            return {**base, **{k: v for k, v in override.items() if k in base}}
    return base


def awq_scheme(cfg: dict, module: str) -> dict | None:
    skip = [any(entry in shard for entry in cfg.get("modules_to_not_convert") or []) for shard in shard_names(module)]
    assert len(set(skip)) == 1, f"{layer_name(module)}: shards differ in modules_to_not_convert (vLLM raises)"
    gs = cfg.get("q_group_size", cfg.get("group_size"))
    return None if skip[0] else {"bits": cfg.get("w_bit", cfg.get("bits")), "group_size": gs}


def _ct_match(value: str, target: str) -> bool:
    return bool(re.match(target[3:], value)) if target.startswith("re:") else value == target


def ct_scheme(cfg: dict, module: str) -> dict | None:
    ignored = [any(_ct_match(s, t) for t in cfg["ignore"]) for s in shard_names(module)]
    assert len(set(ignored)) == 1, f"{layer_name(module)}: shards differ in ignore (vLLM raises)"
    if ignored[0]:
        return None
    groups = list(cfg["config_groups"].values())
    # vLLM: a layer-name match (fused name) anywhere wins over a class-name match ("Linear")
    chosen = next((g for g in groups for t in g["targets"] if _ct_match(layer_name(module), t)), None)
    if chosen is None:
        cls = class_name(module).lower()
        chosen = next(g for g in groups for t in g["targets"] if not t.startswith("re:") and t.lower() in cls)
    w = chosen["weights"]
    return {"bits": w["num_bits"], "group_size": w["group_size"], "symmetric": w["symmetric"],
            "strategy": w["strategy"], "format": chosen.get("format") or cfg["format"],
            "act": chosen.get("input_activations")}


# ---------------------------------------------------------------- decoders (tensors → W[out, in])

def _group_index(k: int, group_size: int | None) -> np.ndarray:
    return np.zeros(k, dtype=np.int64) if group_size in (None, -1) else np.arange(k) // group_size


def gptq_decode(t: dict[str, torch.Tensor], bits: int, group_size: int) -> np.ndarray:
    per = 32 // bits
    f = fields(t["qweight"], bits)  # [K/f, N, f]
    k, n = f.shape[0] * per, f.shape[1]
    q = f.transpose(0, 2, 1).reshape(k, n)  # q[f·r + i, n]
    gi = _group_index(k, group_size)
    s = t["scales"].float().numpy()
    assert s.shape == (gi.max() + 1, n), s.shape
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (s.shape[0], n // per)
    assert np.array_equal(t["g_idx"].numpy(), gi), "non-trivial g_idx is dropped by vLLM"
    w = (q - (1 << (bits - 1))).astype(np.float32) * s[gi, :]
    return w.T


def awq_decode(t: dict[str, torch.Tensor], group_size: int) -> np.ndarray:
    def unpack(words: torch.Tensor) -> np.ndarray:
        f = fields(words, 4)  # [R, N/8, 8]
        out = np.empty_like(f)
        out[:, :, AWQ_ORDER] = f  # field i holds column 8c + AWQ_ORDER[i]
        return out.reshape(f.shape[0], -1)

    q, z = unpack(t["qweight"]), unpack(t["qzeros"])  # [K, N], [G, N]
    gi = _group_index(q.shape[0], group_size)
    s = t["scales"].float().numpy()
    assert s.shape == z.shape == (gi.max() + 1, q.shape[1])
    return ((q - z[gi, :]).astype(np.float32) * s[gi, :]).T


def ct_packed_decode(t: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool) -> np.ndarray:
    half = 1 << (bits - 1)
    n, k = (int(x) for x in t["weight_shape"].tolist())
    assert t["weight_shape"].dtype == torch.int64
    q = fields(t["weight_packed"], bits).reshape(t["weight_packed"].shape[0], -1)[:, :k] - half
    s = t["weight_scale"].float().numpy()
    gi = _group_index(k, group_size)
    assert q.shape == (n, k) and s.shape == (n, gi.max() + 1), (q.shape, s.shape)
    z = np.zeros_like(s, dtype=np.int64)
    assert ("weight_zero_point" in t) == (not symmetric), "zero point present iff asymmetric"
    if not symmetric:
        f = fields(t["weight_zero_point"], bits)  # [N/f, G, f]
        z = f.transpose(0, 2, 1).reshape(-1, f.shape[1])[:n] - half  # z[f·r + i, g]
    return (q - z[:, gi]).astype(np.float32) * s[:, gi]


def ct_int_decode(t: dict[str, torch.Tensor]) -> np.ndarray:
    assert t["weight"].dtype == torch.int8
    s = t["weight_scale"].float().numpy()
    assert s.shape == (t["weight"].shape[0], 1)
    return t["weight"].numpy().astype(np.float32) * s


QUANT_TENSORS = {
    "gptq": {"qweight", "qzeros", "scales", "g_idx"},
    "awq": {"qweight", "qzeros", "scales"},
    "pack-quantized": {"weight_packed", "weight_scale", "weight_shape"},
    "int-quantized": {"weight", "weight_scale"},
}


def decode(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, torch.Tensor], dict]:
    """{module: (scheme label, W fp32 [out, in])} for every decoder linear, plus all tensors and config.

    Labels: "fp", or "<kind>-int<bits>". Each module must hold exactly the tensors its scheme reads.
    """
    cfg, tensors = load_dir(path)
    qc = cfg["quantization_config"]
    method = qc["quant_method"]
    out: dict[str, tuple[str, np.ndarray]] = {}
    for mod in decoder_modules(tensors):
        own = {n[len(mod) + 1:]: t for n, t in tensors.items() if n.startswith(mod + ".")}
        own.pop("bias", None)
        scheme = {"gptq": gptq_scheme, "awq": awq_scheme, "compressed-tensors": ct_scheme}[method](qc, mod)
        if scheme is None:
            assert set(own) == {"weight"} and own["weight"].is_floating_point(), (mod, sorted(own))
            out[mod] = ("fp", own["weight"].float().numpy())
            continue
        kind = method if method != "compressed-tensors" else scheme["format"]
        want = set(QUANT_TENSORS[kind])
        if kind == "pack-quantized" and not scheme["symmetric"]:
            want.add("weight_zero_point")
        assert set(own) == want, (mod, sorted(own), sorted(want))
        if kind == "gptq":
            w = gptq_decode(own, scheme["bits"], scheme["group_size"])
        elif kind == "awq":
            w = awq_decode(own, scheme["group_size"])
        elif kind == "pack-quantized":
            w = ct_packed_decode(own, scheme["bits"], scheme["group_size"], scheme["symmetric"])
        else:
            w = ct_int_decode(own)
        out[mod] = (f"{kind}-int{scheme['bits']}", w)
    return out, tensors, cfg
