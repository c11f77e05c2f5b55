"""targets.toml: the deployment matrix.

```toml
[defaults]                       # every key optional
model = "builtin"                # a local HF directory (safetensors), or the bundled reference model
calibration = "builtin"          # .txt, .jsonl (field "text"), a directory of .txt, or "builtin"
samples = 128
seq_len = 512
seed = 0
eval_text = "builtin"

[target.llamacpp-cpu-q4km]
format = "gguf"                  # gguf | gptq | awq | compressed-tensors | onnx
runtime = "llamacpp"             # llamacpp | vllm | onnxruntime
quant = "Q4_K_M"                 # GGUF file type, or a scheme for compressed-tensors / onnx
method = "gptq"                  # rtn | gptq | awq | awq+gptq | smoothquant+rtn | smoothquant+gptq
hardware = "cpu-x86-avx2"        # label: what the deployment machine promises; the CI matrix maps it to runners
[target.llamacpp-cpu-q4km.gates]
max_kld = 0.05

[hardware.my-epyc]               # optional: define or override a label (built-ins: quantprism.hardware)
features = ["avx2", "avx512_vnni"]
runner = ["self-hosted", "epyc"] # GitHub Actions runs-on
extras = ["gguf", "onnx"]        # pip extras of quantprism its jobs install
```

Validation is in two steps: `parse_targets` checks keys, types and combinations that are impossible
for any model; `check_target_against_model` checks the shape rules (block and group divisibility)
against one model. Errors name the file, the table and the key, on one line.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .hardware import HardwareLabel, resolve_label

METHODS = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant+rtn", "smoothquant+gptq")
GATES = {
    "max_kld": float,
    "max_kld_p99": float,
    "min_top1": float,
    "max_ppl_ratio": float,
    "min_decode_tok_s": float,
    "min_decode_speedup": float,
    "min_prefill_tok_s": float,
    "max_ttft_ms": float,
    "max_bits_per_weight": float,
    "max_size_mb": float,
    "max_task_drop": float,
}
TASK_GATE = "max_task_drop"  # a number (every task) or a table {task: drop} (gate names max_task_drop.TASK)
SIZE_GATES = ("max_size_mb", "max_bits_per_weight")  # every target should have one (`quantprism targets` warns)
DEFAULT_KEYS = {
    "model": str, "calibration": str, "samples": int, "seq_len": int, "seed": int, "eval_text": str,
    "tasks": list, "task_limit": int, "task_paths": list,
}
TARGET_KEYS: dict[str, Any] = {
    "format": str, "runtime": str, "quant": str, "bits": int, "group_size": int, "symmetric": bool,
    "method": str, "hardware": str, "description": str, "damp": float, "clip_search": bool,
    "act_order": bool, "smoothquant_alpha": float, "imatrix": bool, "threads": int,
    "protect": int, "max_bpw": float, "tokenizer_parity": str, "gates": dict, "refit": bool, "tune": int,
    "tune_round": bool, "tune_lr": float, "tasks": list, "smoothquant_inputs": list,
}
HARDWARE_KEYS: dict[str, Any] = {"features": list, "runner": list, "extras": list, "arch": str, "description": str}


@dataclass(frozen=True)
class Defaults:
    model: str = "builtin"
    calibration: str = "builtin"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    eval_text: str = "builtin"
    tasks: tuple[str, ...] = ()  # lm-eval tasks run for the original and every target (bundled: qp_*)
    task_limit: int | None = None  # documents per task (default: all)
    task_paths: tuple[str, ...] = ()  # folders of the user's lm-eval task YAMLs (relative to the targets file)


@dataclass(frozen=True)
class Target:
    name: str
    format: str
    runtime: str
    method: str = "gptq"
    quant: str | None = None
    bits: int = 4
    group_size: int | str = 128  # "auto" until resolved against a model
    symmetric: bool = True
    hardware: str = "cpu"
    description: str = ""
    damp: float = 0.01
    clip_search: bool = True
    act_order: bool = True
    refit: bool = False  # Hessian-weighted scale refit after GPTQ (int grids)
    tune: int = 0  # epochs of block-wise output reconstruction of the block parameters (quality knob; ~3× the pass)
    tune_round: bool = False  # the reconstruction also learns each weight's rounding (from GPTQ's)
    tune_lr: float = 1.0  # multiplier of the reconstruction's peak Adam steps (3 on SmolLM2 with 4 epochs)
    smoothquant_alpha: float | str = 0.5  # "auto": searched per layer with the runtime's activation rounding
    smoothquant_inputs: tuple[str, ...] = ()  # the inputs SmoothQuant scales (SQ_INPUTS names); () = every foldable one
    imatrix: bool = True
    threads: int | None = None
    protect: int = 0
    max_bpw: float | None = None
    tokenizer_parity: str = "eval"  # "strict": stress-set mismatches fail the target too
    hardware_spec: HardwareLabel | None = None  # the label resolved at parse time ([hardware.LABEL] or built in)
    tasks: tuple[str, ...] | None = None  # this target's tasks (None: [defaults].tasks)
    auto_group: bool = False  # group_size was "auto", resolved against the model
    gates: dict[str, float] = field(default_factory=dict)

    @property
    def hardware_label(self) -> HardwareLabel:
        """What ``hardware`` promises: the label resolved at parse time, or (a Target built in code) from the name."""
        return self.hardware_spec or resolve_label(self.hardware)

    @property
    def scheme(self) -> str:
        """A short human label for the quantization: Q4_K_M, W4G128-sym, W8A8, nbits8 …"""
        if self.quant:
            return self.quant
        gs = "C" if self.group_size == -1 else f"G{self.group_size}"
        return f"W{self.bits}{gs}-{'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class TargetsFile:
    path: Path
    defaults: Defaults
    targets: dict[str, Target]
    hardware: dict[str, HardwareLabel] = field(default_factory=dict)  # the file's own [hardware.LABEL] tables
    drift: dict[str, float] = field(default_factory=dict)  # [drift] thresholds


def _type_name(t: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "a table",
            list: "a list"}[t]


def _check_type(where: str, key: str, value: Any, expected: Any) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where} key '{key}': expected {_type_name(expected)}, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{where} key '{key}': expected {_type_name(expected)}, got {value!r}")
    return value


def _closest(key: str, options: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{near[0]}'?)" if near else f" (allowed: {', '.join(sorted(options))})"


def parse_targets(path: Path | str) -> TargetsFile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such targets file; pass --targets PATH or create targets.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    for key in data:
        if key not in ("defaults", "target", "hardware", "drift"):
            raise ConfigError(f"{path}: unknown top-level table '{key}'{_closest(key, ['defaults', 'target', 'hardware', 'drift'])}")
    raw_defaults = data.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must be a table")
    dvals: dict[str, Any] = {}
    for key, value in raw_defaults.items():
        if key not in DEFAULT_KEYS:
            raise ConfigError(f"{path}: [defaults] unknown key '{key}'{_closest(key, list(DEFAULT_KEYS))}")
        dvals[key] = _check_type(f"{path}: [defaults]", key, value, DEFAULT_KEYS[key])
        if key == "tasks":
            dvals[key] = _task_names(f"{path}: [defaults]", value)
        if key == "task_paths":
            dirs = [(path.parent / str(v)).resolve() for v in value]
            missing = [d for d in dirs if not d.is_dir()]
            if missing or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: [defaults] key 'task_paths': {missing[0] if missing else value!r} is not a "
                                  "folder (task YAMLs; paths are relative to the targets file)")
            dvals[key] = tuple(str(d) for d in dirs)
    defaults = Defaults(**dvals)
    if defaults.task_limit is not None and defaults.task_limit < 1:
        raise ConfigError(f"{path}: [defaults] key 'task_limit': must be ≥ 1, got {defaults.task_limit}")
    if defaults.samples < 1:
        raise ConfigError(f"{path}: [defaults] key 'samples': must be ≥ 1, got {defaults.samples}")
    if defaults.seq_len < 8:
        raise ConfigError(f"{path}: [defaults] key 'seq_len': must be ≥ 8, got {defaults.seq_len}")

    raw_targets = data.get("target", {})
    if not isinstance(raw_targets, dict) or not raw_targets:
        raise ConfigError(f"{path}: no [target.NAME] tables; add at least one target")
    hardware = _parse_hardware(path, data.get("hardware", {}))
    drift = _parse_drift(path, data.get("drift", {}))
    targets = {name: _parse_target(path, name, raw) for name, raw in raw_targets.items()}
    seen: dict[str, str] = {}
    for name in targets:  # case-insensitive file systems would put two such targets in one folder
        if name.lower() in seen:
            raise ConfigError(f"{path}: targets {seen[name.lower()]!r} and {name!r} differ only in case; rename one")
        seen[name.lower()] = name
    targets = {n: replace(t, hardware_spec=resolve_label(t.hardware, hardware)) for n, t in targets.items()}
    for n, t in targets.items():  # a per-task gate on a task the target does not run could never be measured
        run = t.tasks if t.tasks is not None else defaults.tasks
        for g in t.gates:
            if g.startswith(TASK_GATE + ".") and g.split(".", 1)[1] not in run:
                raise ConfigError(f"{path}: [target.{n}.gates.{TASK_GATE}] task {g.split('.', 1)[1]!r} is not among the "
                                  f"tasks this target runs ({', '.join(run) or 'none: set [defaults] tasks'})")
        if TASK_GATE in t.gates and not run:
            raise ConfigError(f"{path}: [target.{n}.gates] {TASK_GATE} needs tasks: set [defaults] tasks or the target's tasks")
    return TargetsFile(path=path, defaults=defaults, targets=targets, hardware=hardware, drift=drift)


def _parse_drift(path: Path, raw: Any) -> dict[str, float]:
    """[drift]: when `quantprism drift` says re-calibration is due (release/drift.py has the defaults)."""
    from .release.drift import DRIFT_DEFAULTS

    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'drift' must be a table")
    out = {}
    for key, value in raw.items():
        if key not in DRIFT_DEFAULTS:
            raise ConfigError(f"{path}: [drift] unknown key '{key}'{_closest(key, list(DRIFT_DEFAULTS))}")
        out[key] = _check_type(f"{path}: [drift]", key, value, float)
        if out[key] <= 0:
            raise ConfigError(f"{path}: [drift] key '{key}': must be > 0")
    return out


def _task_names(where: str, value: list) -> tuple[str, ...]:
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where} key 'tasks': expected a list of task names, got {value!r}")
    return tuple(value)


# the linears' inputs a SmoothQuant scale can be folded into, by the linears that read them
SQ_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}


def smoothquant_input_groups(where: str, value: list) -> tuple[str, ...]:
    """Linear names → the input groups they read (q/k/v share one input, gate/up another), sorted and unique."""
    bad = [v for v in value if not isinstance(v, str) or v not in SQ_INPUTS]
    if bad or not value:
        raise ConfigError(f"{where} key 'smoothquant_inputs': {bad[0] if bad else value!r} is not one of "
                          f"{', '.join(SQ_INPUTS)} (the linears whose inputs SmoothQuant scales)")
    return tuple(sorted({SQ_INPUTS[v] for v in value}))


def _parse_hardware(path: Path, raw: Any) -> dict[str, HardwareLabel]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'hardware' must hold [hardware.LABEL] tables")
    out = {}
    for name, table in raw.items():
        where = f"{path}: [hardware.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        vals: dict[str, Any] = {}
        for key, value in table.items():
            if key not in HARDWARE_KEYS:
                raise ConfigError(f"{where} unknown key '{key}'{_closest(key, list(HARDWARE_KEYS))}")
            if key == "runner" and isinstance(value, str):
                value = [value]
            value = _check_type(where, key, value, HARDWARE_KEYS[key])
            if isinstance(value, list):
                if not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(f"{where} key '{key}': expected a list of non-empty strings, got {value!r}")
                value = tuple(value)
            vals[key] = value
        if vals.get("arch") not in (None, "x86_64", "aarch64"):
            raise ConfigError(f"{where} key 'arch': {vals['arch']!r}; use \"x86_64\" or \"aarch64\"")
        base = resolve_label(name)  # a table overrides what it names; the rest comes from the built-in / the name
        out[name] = replace(base, **vals)
    return out


TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_target_name(path: Path, name: str) -> None:
    """A target's name becomes a folder under --out: an identifier (letters, digits, '-', '_', '.'), no path
    separator and no '..', so no name can reach outside the output folder."""
    if not TARGET_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{path}: [target.{name!r}] is not a valid target name: use letters, digits, '-', '_' and '.' "
                          "(no '/', no '..', at most 100 characters); the name becomes a folder under --out")


def _parse_target(path: Path, name: str, raw: Any) -> Target:
    check_target_name(path, name)
    where = f"{path}: [target.{name}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    vals: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in TARGET_KEYS:
            raise ConfigError(f"{where} unknown key '{key}'{_closest(key, list(TARGET_KEYS))}")
        if key in ("group_size", "smoothquant_alpha") and value == "auto":
            vals[key] = value  # group size: resolved against the model's shapes; α: searched per layer
            continue
        vals[key] = _check_type(where, key, value, TARGET_KEYS[key])
        if key == "tasks":
            vals[key] = _task_names(where, value)
        elif key == "smoothquant_inputs":
            vals[key] = smoothquant_input_groups(where, value)
    for req in ("format", "runtime"):
        if req not in vals:
            raise ConfigError(f"{where} missing key '{req}'")
    gates: dict[str, float] = {}
    for gkey, gval in vals.pop("gates", {}).items():
        if gkey not in GATES:
            raise ConfigError(f"{path}: [target.{name}.gates] unknown key '{gkey}'{_closest(gkey, list(GATES))}")
        if gkey == TASK_GATE and isinstance(gval, dict):  # per task: max_task_drop = { qp_code = 0.05, … }
            for task, lim in gval.items():
                gates[f"{TASK_GATE}.{task}"] = _check_type(f"{path}: [target.{name}.gates.{TASK_GATE}]", task, lim, float)
            continue
        gates[gkey] = _check_type(f"{path}: [target.{name}.gates]", gkey, gval, GATES[gkey])
    from .exporters import FORMATS

    fmt, runtime = vals["format"], vals["runtime"]
    if fmt not in FORMATS:
        raise ConfigError(f"{where} key 'format': unknown format '{fmt}'{_closest(fmt, list(FORMATS))}")
    if runtime not in FORMATS[fmt].runtimes:
        raise ConfigError(
            f"{where} key 'runtime': {runtime!r} cannot load format {fmt!r}; use {' or '.join(FORMATS[fmt].runtimes)}"
        )
    from .evaluate.tokenizer_parity import MODES

    if vals.get("tokenizer_parity", "eval") not in MODES:
        raise ConfigError(f"{where} key 'tokenizer_parity': {vals['tokenizer_parity']!r}; use \"eval\" (the evaluation text "
                          "must tokenize identically) or \"strict\" (the stress set too)")
    method = vals.get("method", "gptq")
    if method not in METHODS:
        raise ConfigError(f"{where} key 'method': unknown method '{method}'{_closest(method, list(METHODS))}")
    if vals.get("group_size") == "auto":
        if not hasattr(FORMATS[fmt], "quant_method"):
            raise ConfigError(f"{where} key 'group_size': \"auto\" is for vLLM formats (gptq, awq, compressed-tensors)")
        _check_combination(where, fmt, method, {**vals, "group_size": AUTO_GROUPS[0]})
    else:
        _check_combination(where, fmt, method, vals)
    return Target(name=name, gates=gates, **vals)


AUTO_GROUPS = (128, 64, 32)  # group_size = "auto": the largest that divides every quantized in_features


def _quantized_ks(linear_shapes: dict[str, tuple[int, int]]) -> list[int]:
    """in_features of every linear a vLLM format quantizes (lm_head and embeddings stay in high precision)."""
    return sorted({k for name, (_n, k) in linear_shapes.items() if not name.endswith(("lm_head", "embed_tokens"))})


def valid_groups(linear_shapes: dict[str, tuple[int, int]]) -> list[int]:
    ks = _quantized_ks(linear_shapes)
    return [g for g in AUTO_GROUPS if all(k % g == 0 for k in ks)]


def resolve_group_size(t: Target, linear_shapes: dict[str, tuple[int, int]], where: str) -> Target:
    """A target with group_size = "auto" → the largest of 128/64/32 dividing every K (``auto_group`` records it)."""
    from dataclasses import replace

    if t.group_size != "auto":
        return t
    ok = valid_groups(linear_shapes)
    if not ok:
        raise ConfigError(f"{where}: [target.{t.name}] group_size \"auto\": none of 128/64/32 divides every in_features "
                          f"({', '.join(map(str, _quantized_ks(linear_shapes)))}); use group_size = -1 (per channel)")
    return replace(t, group_size=ok[0], auto_group=True)


def _check_combination(where: str, fmt: str, method: str, vals: dict[str, Any]) -> None:
    from .exporters import FORMATS

    bits = vals.get("bits", 4)
    gs = vals.get("group_size", 128)
    if not 2 <= bits <= 8:
        raise ConfigError(f"{where} key 'bits': {bits} is out of range; use 2–8")
    if gs != -1 and (gs < 16 or gs & (gs - 1)):
        raise ConfigError(f"{where} key 'group_size': {gs} must be -1 (per channel) or a power of two ≥ 16")
    if "tune" in vals and not 0 <= vals["tune"] <= 16:
        raise ConfigError(f"{where} key 'tune': {vals['tune']} must be 0–16 epochs; 1 is typical")
    if vals.get("tune_round") and not vals.get("tune"):
        raise ConfigError(f"{where} key 'tune_round' learns the rounding during tuning: set 'tune' to 1 or 2 epochs too")
    if "tune_lr" in vals and not 0 < vals["tune_lr"] <= 10:
        raise ConfigError(f"{where} key 'tune_lr': {vals['tune_lr']} must be in (0, 10]; 1 is the default")
    if vals.get("tune_lr", 1.0) != 1.0 and not vals.get("tune"):
        raise ConfigError(f"{where} key 'tune_lr' scales the tuning's steps: set 'tune' to 1 or more epochs too")
    if "damp" in vals and not 0 < vals["damp"] < 1:
        raise ConfigError(f"{where} key 'damp': {vals['damp']} must be in (0, 1); 0.01 is typical")
    if vals.get("smoothquant_alpha", "auto") != "auto" and not 0 <= vals["smoothquant_alpha"] <= 1:
        raise ConfigError(f"{where} key 'smoothquant_alpha': {vals['smoothquant_alpha']} must be in [0, 1] or \"auto\"")
    if "max_bpw" in vals and vals["max_bpw"] <= 0:
        raise ConfigError(f"{where} key 'max_bpw': must be > 0")
    if vals.get("protect", 0) < 0:
        raise ConfigError(f"{where} key 'protect': must be ≥ 0")
    if "smoothquant_inputs" in vals and not method.startswith("smoothquant"):
        raise ConfigError(f"{where} key 'smoothquant_inputs' needs method = \"smoothquant+gptq\" or \"smoothquant+rtn\"")
    fmt_obj = FORMATS[fmt]  # the format owns its own rules
    if method.startswith("smoothquant") and not fmt_obj.acts_quantized(vals | {"method": method}):
        raise ConfigError(
            f"{where} key 'method': SmoothQuant only helps when activations are quantized; "
            "use it with compressed-tensors quant=\"W8A8\", an onnx target or a quantized GGUF (their kernels round "
            "activations to 8 bits)"
        )
    fmt_obj.check(where, vals | {"method": method})


def effective_bits_group(t: Target) -> tuple[int, int]:
    """Weight bits and group size of a target's main grid (group -1 = per channel)."""
    from .exporters import FORMATS

    return FORMATS[t.format].bits_group(t)


def check_target_against_model(t: Target, linear_shapes: dict[str, tuple[int, int]]) -> str | None:
    """Why ``t`` cannot be built for a model with these linear weights (out, in), or None if it can."""
    from .exporters import FORMATS

    return FORMATS[t.format].shape_problem(t, linear_shapes)
