"""The model one decoder layer at a time: a transformers skeleton with no weights, filled from the safetensors shards
for the layer being computed and emptied after it.

Memory is then bounded by one layer (in float32, on the compute device) plus the activations between layers, whatever
the depth: this is how the canonical pass, the original model's log-probs and the canonical references run on models
larger than RAM. The skeleton is the model's own transformers class, so the per-layer forward (attention, masks, RoPE,
soft-caps) is exactly transformers' — only parameter storage changes. Buffers (RoPE tables) are real; only parameters
sit on the meta device.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .loader import ModelInfo

log = logging.getLogger("quantprism")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While constructing a model, every registered parameter is moved to the meta device at registration (before
    its initialisation runs), so a 70B skeleton costs no memory; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def skeleton(info: ModelInfo, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model's transformers class with every parameter on the meta device (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(info.path), local_files_only=True)
    extra = {"attn_implementation": "eager"} if info.arch.eager_attention else {}
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    return model.eval()


def device_of(spec: str | None) -> torch.device:
    """``auto`` → the first CUDA device when one is present, else the CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    from ..errors import ConfigError

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA device is visible to torch here; use --device cpu or auto")
        dev = torch.device("cuda:0" if spec == "cuda" else spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    raise ConfigError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")


class LayerStream:
    """Materialises named submodules of a skeleton from a tensor mapping (``exporters.state.TensorStore``: the original
    shards, or the canonical weights), in float32 on ``device``, and empties them again."""

    def __init__(self, model: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model, self.state, self.device, self.dtype = model, state, torch.device(device), dtype

    def load(self, module: nn.Module, prefix: str) -> nn.Module:
        for name, p in list(module.named_parameters(recurse=True)):
            key = f"{prefix}.{name}"
            if key not in self.state:
                raise KeyError(f"{key}: not in the checkpoint")
            t = self.state[key].to(self.device, self.dtype).reshape(p.shape)
            _set_param(module, name, nn.Parameter(t, requires_grad=False))
        return module.to(self.device)  # buffers too (RoPE tables per layer, where a model has them)

    def free(self, module: nn.Module) -> None:
        for name, p in list(module.named_parameters(recurse=True)):
            _set_param(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, prefix: str) -> Iterator[nn.Module]:
        self.load(module, prefix)
        try:
            yield module
        finally:
            self.free(module)

    def tensor(self, key: str) -> torch.Tensor:
        return self.state[key].to(self.device, self.dtype)

    def head_weight(self) -> torch.Tensor:
        """lm_head's weight (the embedding matrix where they are tied), on the device in float32."""
        return self.head_weight_stored().to(self.device, self.dtype)

    def head_weight_stored(self) -> torch.Tensor:
        """lm_head's weight as stored (the checkpoint's dtype, on the CPU): the large matrix, cast by row chunks."""
        return self.state["lm_head.weight" if "lm_head.weight" in self.state else "model.embed_tokens.weight"]


def _set_param(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    owner, _, leaf = dotted.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    mod._parameters[leaf] = value


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch: int, acts: Any) -> list[list[dict]]:
    """Hidden states entering layer 0 (appended to ``acts``, a ``quantize.activations.Activations``) and, per batch,
    the kwargs the model passes to EACH layer (mask, RoPE): models with several layer types (Gemma 2/3 sliding and
    global layers, with their own masks and RoPE bases) give each layer its own. Only the embeddings are computed:
    while capturing, every decoder layer is an identity (its weights may be on the meta device) and the forward stops
    after the last one."""

    class _Stop(Exception):
        pass

    layers = model.model.layers
    per_batch: list[list[dict]] = []
    current: list[dict] = []
    keep = ("attention_mask", "position_embeddings", "position_ids")

    def hook(module, args, kwargs):
        if not current:
            acts.append((args[0] if args else kwargs["hidden_states"]).detach())
        current.append({k: v for k, v in kwargs.items() if k in keep})
        if len(current) == len(layers):
            raise _Stop

    def identity(hidden_states=None, *args, **kwargs):
        return hidden_states

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    saved = [layer.forward for layer in layers]
    for layer in layers:
        layer.forward = identity
    try:
        for b0 in range(0, input_ids.shape[0], batch):
            current = []
            try:
                model.model(input_ids=input_ids[b0 : b0 + batch], use_cache=False)
            except _Stop:
                pass
            per_batch.append(current)
    finally:
        for h in handles:
            h.remove()
        for layer, fwd in zip(layers, saved, strict=True):
            layer.forward = fwd
    return per_batch


def to_device(obj: Any, device: torch.device, memo: dict | None = None) -> Any:
    """Tensors in ``obj`` (nested dicts/tuples/lists) moved to ``device``: the RoPE tables and masks the layers take.
    ``memo``: tensors shared by several layers are moved once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the original is kept alive so its id is not reused
        return memo[id(obj)][1]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device, memo) for o in obj)
    return obj


def layer_forward(layer: nn.Module, hs: Any, kws: list[dict], counter: dict, device: torch.device,
                  out: Any = None) -> None:
    """Run every calibration batch through ``layer`` (float32 on ``device``); outputs go to ``out`` when given."""
    counter["layer_forwards"] = counter.get("layer_forwards", 0) + 1
    for h, kw in zip(hs, kws, strict=True):
        r = layer(h.to(device, torch.float32), **kw)
        if out is not None:
            out.append(r[0] if isinstance(r, tuple) else r)


def final_logits(model: nn.Module, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """What the CausalLM forward does after the last layer: final norm, lm_head, and the logit soft-cap where the
    architecture has one (Gemma 2)."""
    logits = torch.nn.functional.linear(model.model.norm(h), head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def dtype_of(info: ModelInfo) -> torch.dtype:
    """The checkpoint's floating dtype (of its decoder linears): the dtype activations are kept in between layers."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for t in info.tensors.values():
        if t.name.startswith("model.layers.") and t.name.endswith(".weight") and t.dtype in names:
            return names[t.dtype]
    return torch.float32


def describe(info: ModelInfo) -> dict[str, Any]:
    """Bytes on disk, per decoder layer on disk and in float32 (the unit the streamed pass holds at a time), and the
    widest linear input of a layer (its Hessian is the largest statistic)."""
    layer = [t for t in info.tensors.values() if t.name.startswith("model.layers.0.")]
    return {"bytes_on_disk": sum(_nbytes(t) for t in info.tensors.values()),
            "bytes_per_layer_on_disk": sum(_nbytes(t) for t in layer),
            "layer_fp32_bytes": sum(4 * _numel(t.shape) for t in layer),
            "widest_input": max((t.shape[-1] for t in layer if len(t.shape) == 2), default=0)}


def _nbytes(t) -> int:
    from .loader import SAFETENSORS_BYTES

    return SAFETENSORS_BYTES.get(t.dtype, 4) * _numel(t.shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
